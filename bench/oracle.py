"""The Bayes bound of bench.quality's atlases beside what the models reached on them.

Per preset × seed: bench.quality's atlas and hidden cells (the same files and draw), the posterior of each
cell's fine type given its counts and every other draw of the generator (`bigatlas.synth_oracle`), scored as
bench.transfer scores a predictor (accuracy, macro-F1, ECE, NLL, AURC, rare recall) on the hidden cells (its
accuracy the ceiling of a held-out accuracy) and on every cell (of a kNN accuracy), and the accuracy of the
study's composition alone (the floor: the commonest type of the cell's study). Beside them, the rows of a
bench.quality result file on the same atlas and seed (`--against`, `--tags`; the peers' rows are tagged
`peer`): held-out accuracy of the labelled methods, kNN accuracy of every method, and the share of the way
from floor to bound each covers.

    python -m bench.oracle --presets subtle hard --seeds 5 6 --against bench/results/detached.json --tags head detach
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.special import softmax

from bench.common import main, write_results
from bench.quality import TRUTH, atlas
from bench.transfer import predictor_scores
from bigatlas.synth import draw
from bigatlas.synth import preset as synth_spec
from bigatlas.synth_oracle import type_posterior

METHODS = ("bigatlas", "scvi", "bigatlas_labels", "scanvi")
KEYS = ("accuracy", "nll", "rare_recall")  # the learned classifier's scores kept
PRESETS = ["subtle", "rare", "condition", "continuous", "ambient", "tissues", "hard"]


def add_arguments(p) -> None:
    p.add_argument("--presets", nargs="+", default=PRESETS, help="synth presets")
    p.add_argument("--seeds", nargs="+", type=int, default=[5, 6], help="atlas seeds (and bench.quality's hidden draw)")
    p.add_argument("--cells", type=int, default=8000, help="cells per atlas")
    p.add_argument("--genes", type=int, default=1000, help="genes per atlas")
    p.add_argument("--hidden-fraction", type=float, default=0.2, help="labelled cells whose label is hidden")
    p.add_argument("--data-dir", default="bench/data", help="where atlases are built or reused")
    p.add_argument("--against", default="bench/results/detached.json", help="bench.quality result file to set beside")
    p.add_argument("--tags", nargs="+", default=["head", "detach"], help="its bigatlas tags (peers: `peer`)")
    p.add_argument("--out", default="bench/results/oracle.json")


def floor_accuracy(comp: np.ndarray, study: np.ndarray, true_idx: np.ndarray) -> float:
    """Accuracy of naming every cell its study's commonest type."""
    return float((comp.argmax(1)[study] == true_idx).mean())


def count_classifier(x, study: np.ndarray, y: np.ndarray, train: np.ndarray, n_types: int) -> np.ndarray:
    """A naive-Bayes NB classifier on the counts, learned from the visible labels (`train`) alone: each gene's
    rate in study s and type k is e[s] x r[k] (fitted by alternating the two Poisson MLEs, r[k] shrunk toward
    the pooled rates by one median cell's counts), one inverse dispersion per gene (by moments), and the
    study's visible type counts (+1) as the prior. Returns each cell's posterior over the types."""
    x = sp.csr_matrix(x, dtype=np.float64)
    lib = np.asarray(x.sum(1)).ravel()
    n_studies = int(study.max()) + 1
    cell = study[train] * n_types + y[train]
    onehot = sp.csr_matrix((np.ones(train.sum()), (cell, np.arange(train.sum()))), (n_studies * n_types, train.sum()))
    sums = np.asarray((onehot @ x[train]).todense()).reshape(n_studies, n_types, -1)
    libs = np.bincount(cell, lib[train], n_studies * n_types).reshape(n_studies, n_types)
    pooled, weight = sums.sum((0, 1)) / libs.sum(), float(np.median(lib[train]))
    e = np.ones((n_studies, x.shape[1]))
    for _ in range(10):
        r = (sums.sum(0) + weight * pooled) / (np.einsum("sk,sg->kg", libs, e) + weight)
        e = (sums.sum(1) + 1.0) / (libs @ r + 1.0)
    mu = e[study[train]] * r[y[train]] * lib[train, None]
    dense = x[train].toarray()
    theta = np.clip((mu**2).sum(0) / np.maximum(((dense - mu) ** 2 - mu).sum(0), 1e-6), 0.05, 1e4)
    prior = np.log(np.bincount(cell, minlength=n_studies * n_types).reshape(n_studies, n_types) + 1.0)
    loglik = np.zeros((x.shape[0], n_types))
    for lo in range(0, x.shape[0], 4096):
        rows, xs = slice(lo, lo + 4096), x[lo : lo + 4096].toarray()
        for k in range(n_types):
            mu = np.maximum(e[study[rows]] * r[k] * lib[rows, None], 1e-12)  # a gene no visible cell expressed
            loglik[rows, k] = (xs * np.log(mu) - (theta + xs) * np.log(theta + mu)).sum(1)
    return softmax(loglik + prior[study], axis=1)


def model_rows(rows: list[dict], tags, preset: str, seed: int) -> dict:
    """{method (tag): row} of a bench.quality file's rows on this atlas and seed."""
    found = {}
    for r in rows:
        if r["preset"] == preset and r["seed"] == seed and r.get("method") in METHODS:  # bench.quality rows only
            if r["tag"] == "peer" or r["tag"] in tags:
                found[r["method"] if r["tag"] == "peer" else f"{r['method']} ({r['tag']})"] = r
    return found


def covered(acc, floor: float, bound: float):
    return None if acc is None else round((acc - floor) / (bound - floor), 4)


def atlas_row(a, preset: str, seed: int, against: list[dict]) -> dict:
    adata = atlas(a, preset, seed)
    spec = synth_spec(preset, a.cells, a.genes, seed=seed)
    t = time.perf_counter()
    post = type_posterior(spec, adata.X)
    seconds = time.perf_counter() - t
    truth = adata.obs[TRUTH].astype(str).to_numpy()
    hidden = adata.obs["bench_hidden"].to_numpy()
    d = draw(spec, np.random.default_rng(seed))
    true_idx = d.ctype
    if not (np.asarray(spec.fine_names)[true_idx] == truth).all():
        raise ValueError(f"{preset} seed {seed}: the stored atlas's types are not the ones its spec draws")
    row = {"preset": preset, "seed": seed, "seconds": round(seconds, 1)}
    for name, cells in (("hidden", hidden), ("all", np.ones(len(truth), bool))):
        row[name] = predictor_scores(post[cells], truth[cells], spec.fine_names)
        row[name]["floor_accuracy"] = round(floor_accuracy(d.comp, d.study[cells], true_idx[cells]), 4)
    visible = (adata.obs["cell_type"] != "undefined").to_numpy() & ~hidden
    counts_post = count_classifier(adata.X, d.study, true_idx, visible, spec.n_fine)
    learned = predictor_scores(counts_post[hidden], truth[hidden], spec.fine_names)
    row["hidden"].update({f"count_classifier_{k}": v for k, v in learned.items() if k in KEYS})
    bound, floor = row["hidden"]["accuracy"], row["hidden"]["floor_accuracy"]
    kbound, kfloor = row["all"]["accuracy"], row["all"]["floor_accuracy"]
    models = {}
    for method, r in model_rows(against, a.tags, preset, seed).items():
        held, knn = r.get("heldout_accuracy"), r.get("knn_label_accuracy")
        models[method] = {
            "heldout_accuracy": held,
            "heldout_share_of_bound": covered(held, floor, bound),
            "heldout_rare_recall": r.get("heldout_rare_recall"),
            "knn_label_accuracy": knn,
            # a labelled method's kNN accuracy counts its training labels' own neighbours: no bound applies
            "knn_share_of_bound": covered(knn, kfloor, kbound) if held is None else None,
        }
    row["models"] = models
    print(json.dumps(row), flush=True)
    return row


def summary(rows) -> dict:
    """Means over seeds per preset: the bound, the floor and each method's accuracies."""
    out = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        s = {
            "seeds": [r["seed"] for r in mine],
            **{
                f"{part}_{k}": round(float(np.mean([r[part][k] for r in mine])), 4)
                for part in ("hidden", "all")
                for k in ("accuracy", "floor_accuracy", "nll", "rare_recall", *(f"count_classifier_{k}" for k in KEYS))
                if all(k in r[part] for r in mine)
            },
        }
        for method in dict.fromkeys(m for r in mine for m in r["models"]):
            vals = [r["models"][method] for r in mine if method in r["models"]]
            s[method] = {
                k: round(float(np.mean([v[k] for v in vals])), 4)
                for k in vals[0]
                if all(v[k] is not None for v in vals)
            }
            s[method]["seeds"] = len(vals)
        out[preset] = s
    return out


def run(a) -> dict:
    against = json.loads(Path(a.against).read_text())["rows"] if Path(a.against).exists() else []
    rows = [atlas_row(a, preset, seed, against) for preset in a.presets for seed in a.seeds]
    setup = {k: getattr(a, k) for k in ("cells", "genes", "hidden_fraction", "against", "tags")}
    return write_results({"setup": setup, "rows": rows, "summary": summary(rows)}, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
