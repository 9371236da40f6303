"""Quality benchmark beside scvi-tools, on the hard synthetic atlases (`bigatlas synth --preset`).

For every preset × seed, on the same cells: bigatlas without labels and scVI; bigatlas with 80% of the
labels and scANVI (from that scVI, its default schedule), the other 20% hidden and predicted. Every
embedding is scored by `bigatlas evaluate`'s scib-metrics against the *true* cell types and the study
(bio, batch, total, kNN label accuracy); label transfer by accuracy and macro-F1 on the hidden cells.
Writes bench/results/quality.json: one row per (atlas, seed, method), and the mean per method and atlas.

    python -m bench.quality                              # the table the defaults are chosen from
    python -m bench.quality --only bigatlas bigatlas_labels --tag sqrt --train label_weight=10
        # a variant of bigatlas beside the peers' rows already in the result file

On your own data, the same comparison: an AnnData of raw counts (the genes to model, e.g. 2,000 highly
variable ones) with a study column and cell-type labels, which are the truth every method is scored
against and, 20% hidden per seed, the labels bigatlas_labels and scANVI train on:

    python -m bench.quality --data pbmc.h5ad --batch-key batch --label-key cell_type --seeds 0 1 2 --epochs 0

scvi-tools is optional (`pip install scvi-tools`); without it only bigatlas rows are made. Epochs: the
same number on both sides (--epochs; 0: each method's own rule; scANVI adds its default fine-tuning after
scVI). `--only scatlasvae` adds the original scAtlasVAE without labels (its package, its defaults).
`--covariate-keys donor_id` gives every method a nested key beside the study, as the README advises for bigatlas
(scVI/scANVI take it as a categorical covariate); those rows are their own atlas, `<preset>+cov_donor_id`.
"""

from __future__ import annotations

import ast
import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import main, write_results

BATCH_KEY = "dataset_id"
TRUTH = "true_cell_type"
LABELS = "bench_label"  # cell_type with 20% of the labelled cells hidden ('undefined')
METHODS = ("bigatlas", "bigatlas_labels", "scvi", "scanvi", "scatlasvae")  # scatlasvae: only when asked (--only)


def add_arguments(p) -> None:
    p.add_argument(
        "--presets", nargs="+", default=["subtle", "rare", "condition"],
        help="synth presets, or pbmc: real PBMCs split into studies with technical effects, pbmc_skewed: the same with "
        "a type composition per study (bench/pbmc.py; always its 700 cells x 765 genes, whatever --cells and --genes)",
    )  # fmt: skip
    p.add_argument(
        "--data", default=None,
        help="an AnnData of raw counts (.h5ad or .zarr) instead of the synthetic presets; rows name it by its file "
        "name without suffix",
    )  # fmt: skip
    p.add_argument("--batch-key", default=BATCH_KEY, help="--data's obs column of the batch (the study)")
    p.add_argument("--label-key", default="cell_type", help="--data's obs column of the cell types (the truth)")
    p.add_argument("--layer", default=None, help="--data's layer of raw counts (default: X)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="atlas and training seeds")
    p.add_argument("--cells", type=int, default=8000, help="cells per atlas")
    p.add_argument("--genes", type=int, default=1000, help="genes per atlas")
    p.add_argument(
        "--epochs", type=int, default=60, help="training epochs, the same for every method (0: bigatlas's own rule)"
    )
    p.add_argument("--hidden-fraction", type=float, default=0.2, help="labelled cells whose label is hidden")
    p.add_argument(
        "--mislabel-fraction", type=float, default=0.0,
        help="visible labels made wrong (a sibling subtype where the type has one), as marker-based annotation "
        "errs; rows name the atlas <preset>+mislabel<F>",
    )  # fmt: skip
    p.add_argument(
        "--review-with", default=None, metavar="TAG",
        help="bigatlas_labels trains without the visible labels that the label review of the unlabelled bigatlas "
        "row TAG's latent (saved by an earlier run on the same atlas and seed) flags: the README's recipe for noisy "
        "labels",
    )  # fmt: skip
    p.add_argument(
        "--covariate-keys", nargs="*", default=[], metavar="KEY",
        help="obs columns every method also corrects for beside the study (bigatlas --covariate-keys, scVI/scANVI "
        "categorical_covariate_keys; e.g. donor_id, nested in the study); rows name the atlas <preset>+cov_<KEY>",
    )  # fmt: skip
    p.add_argument(
        "--only", nargs="*", default=None, help=f"subset of {' '.join(METHODS)} (with --table: the methods shown)"
    )
    p.add_argument("--tag", default="default", help="name of this bigatlas variant in the results")
    p.add_argument("--model", nargs="*", default=[], help="ModelConfig overrides, key=value")
    p.add_argument("--train", nargs="*", default=[], help="TrainConfig overrides, key=value")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--data-dir", default="bench/data", help="where atlases are built or reused")
    p.add_argument(
        "--out", default=None,
        help="JSON result file, rows merged into it (default: bench/results/quality.json, with --data "
        "bench/results/quality_<its name>.json)",
    )  # fmt: skip
    p.add_argument("--table", action="store_true", help="print the result file's table (markdown) and exit")
    p.add_argument("--tags", nargs="*", default=["before", "default"], help="bigatlas variants in --table")
    p.add_argument(
        "--own-rule", action="store_true",
        help="--table: only scVI / scANVI trained at their own epoch rule (--epochs 0), and bigatlas rows on the "
        "same atlases and seeds",
    )  # fmt: skip


def overrides(pairs) -> dict:
    """key=value pairs as config values: Python literals, true / false (any case) as booleans, else the string."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if value.lower() in ("true", "false"):  # a string would be truthy either way
            out[key] = value.lower() == "true"
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def preset_atlas(data_dir, preset: str, seed: int, cells: int, genes: int):
    """The preset's atlas of that seed and size, built once under data_dir and read into memory. Runs started side
    by side (one preset and seed per process) build it once: the first holds a lock on `<atlas>.build.lock` while
    it builds, the others wait on it and then read what it built (the writer's own `<atlas>.lock` refuses a
    second writer rather than wait)."""
    import fcntl

    import anndata as ad

    from bench.pbmc import PRESETS, pbmc_atlas
    from bigatlas.synth import synth

    size = "" if preset in PRESETS else f"_{cells}x{genes}"  # the real cells: always all of scanpy's sample
    path = Path(data_dir) / f"quality_{preset}_{seed}{size}.zarr"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".build.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not path.exists():
                if preset in PRESETS:
                    pbmc_atlas(path, seed, preset)
                else:
                    synth(path, cells, genes, "zarr", seed=seed, preset_name=preset)
    return ad.read_zarr(path)


def atlas(a, preset: str, seed: int):
    """The preset's atlas (built once under --data-dir), or --data's cells, in memory, with the hidden-label
    column (drawn by the seed)."""
    covariates = tuple(getattr(a, "covariate_keys", ()))  # benches that reuse atlas() may not have the flag
    if getattr(a, "data", None):  # benches that reuse atlas() (bench.transfer) have no --data
        adata = user_data(a.data, a.batch_key, a.label_key, a.layer, covariates).copy()  # read once, a copy per seed
    else:
        adata = preset_atlas(a.data_dir, preset, seed, a.cells, a.genes)
        for key in covariates:
            if key not in adata.obs:
                raise ValueError(f"--covariate-keys: the {preset} atlas has no obs column {key!r}")
    rng = np.random.default_rng(seed)
    labelled = (adata.obs.cell_type != "undefined").to_numpy()
    hidden = labelled & (rng.random(adata.n_obs) < a.hidden_fraction)
    lab = adata.obs.cell_type.astype(str).to_numpy().copy()
    lab[hidden] = "undefined"
    wrong = mislabel(lab, labelled & ~hidden, getattr(a, "mislabel_fraction", 0.0), seed)
    adata.obs[LABELS] = pd.Categorical(lab)
    adata.obs["bench_hidden"] = hidden
    adata.obs["bench_mislabelled"] = wrong
    return adata


def mislabel(lab: np.ndarray, visible: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Give `fraction` of the visible labels (in place) a wrong one, as annotation by markers errs: another
    subtype of the same coarse type (the part before '.') where the type has one, else any other type; either
    drawn by its frequency. Its own random stream, so the hidden draw stays the seed's. Returns which cells
    it changed."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--mislabel-fraction must be in [0, 1), not {fraction}")
    wrong = np.zeros(len(lab), bool)
    if fraction == 0:
        return wrong
    given = lab.copy()
    types, counts = np.unique(given[visible], return_counts=True)
    if len(types) < 2:
        raise ValueError(f"--mislabel-fraction needs two cell types or more, the labels have {len(types)}")
    rng = np.random.default_rng([seed, 1])
    wrong[visible] = rng.random(int(visible.sum())) < fraction
    coarse = np.array([t.split(".")[0] for t in types])
    for i, t in enumerate(types):
        cells = np.flatnonzero(wrong & (given == t))
        siblings = (coarse == coarse[i]) & (types != t)
        others = siblings if siblings.any() and "." in t else types != t
        p = counts * others / (counts * others).sum()
        lab[cells] = rng.choice(types, size=len(cells), p=p)
    return wrong


def data_name(path) -> str:
    """--data's name in the rows (the atlas column): its file name without suffix."""
    name = Path(path).name
    for suffix in (".h5ad", ".zarr"):
        name = name.removesuffix(suffix)
    return name


@functools.lru_cache(maxsize=1)
def user_data(path, batch_key: str, label_key: str, layer=None, covariate_keys: tuple = ()):
    """The benchmark's AnnData from a user's file: its raw counts as float32 CSR, the batch as BATCH_KEY, the
    covariate columns as they are named, and the labels as the truth and as cell_type (what the hidden-label
    column is drawn from). One ValueError naming the file and the column or layer when one is missing, a cell has
    no label, batch or covariate, or a value is not a count."""
    import anndata as ad
    import scipy.sparse as sp

    from bigatlas.config import UNLABELED

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    src = ad.read_zarr(path) if path.suffix == ".zarr" or path.is_dir() else ad.read_h5ad(path)
    flags = (("--batch-key", batch_key), ("--label-key", label_key), *(("--covariate-keys", k) for k in covariate_keys))
    for flag, key in flags:
        if key not in src.obs:
            raise ValueError(f"{path}: no obs column {key!r} ({flag}); obs has {', '.join(map(str, src.obs.columns))}")
    if layer is not None and layer not in src.layers:
        raise ValueError(f"{path}: no layer {layer!r} (--layer); layers: {', '.join(src.layers) or 'none'}")
    x = sp.csr_matrix(src.layers[layer] if layer is not None else src.X, dtype=np.float32)
    where = f"layer {layer!r}" if layer is not None else "X"
    bad = (x.data < 0) | ~np.isfinite(x.data) | (x.data != np.floor(x.data))
    if bad.any():
        raise ValueError(
            f"{path}: {where} holds {int(bad.sum()):,} values that are not counts (e.g. {x.data[bad][0]!r}): the "
            "benchmark trains every method on raw counts (--layer names a layer of them)"
        )
    for flag, key in (("--batch-key", batch_key), *(("--covariate-keys", k) for k in covariate_keys)):
        absent = src.obs[key].isna().to_numpy()
        if absent.any():
            raise ValueError(f"{path}: obs column {key!r} ({flag}) is missing for {int(absent.sum()):,} cells")
    labels = src.obs[label_key].astype("string")
    missing = labels.isna().to_numpy() | labels.isin(UNLABELED).to_numpy()
    if missing.any():
        raise ValueError(
            f"{path}: obs column {label_key!r} (--label-key) has {int(missing.sum()):,} cells without a label (missing "
            f"or {', '.join(map(repr, UNLABELED))}); it is the truth every method is scored against: drop them first"
        )
    truth = pd.Categorical(labels.to_numpy(dtype=str))
    obs = pd.DataFrame(
        {
            BATCH_KEY: pd.Categorical(src.obs[batch_key].astype(str).to_numpy()),
            **{k: pd.Categorical(src.obs[k].astype(str).to_numpy()) for k in covariate_keys},
            TRUTH: truth,
            "cell_type": truth,
        },
        index=src.obs_names,
    )
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=src.var_names))


def review_flags(adata, z) -> np.ndarray:
    """Per cell, whether the label review (bigatlas.label_review) of the visible labels in latent `z` flags it."""
    from bigatlas.label_review import review

    given = adata.obs[LABELS].astype(str).to_numpy()
    visible = given != "undefined"
    flagged = np.zeros(len(given), bool)
    flagged[visible] = review(np.asarray(z)[visible], pd.Categorical(given[visible])).flagged.to_numpy()
    return flagged


def reviewed(adata, latent: Path):
    """A copy of `adata` whose visible labels flagged by the label review of `latent` are 'undefined', and
    how many were."""
    if not latent.exists():
        raise FileNotFoundError(f"--review-with: no latent {latent}; run the unlabelled bigatlas with that tag first")
    flagged = review_flags(adata, np.load(latent))
    given = adata.obs[LABELS].astype(str).to_numpy()
    given[flagged] = "undefined"
    out = adata.copy()
    out.obs[LABELS] = pd.Categorical(given)
    return out, int(flagged.sum())


def run_bigatlas(adata, a, seed: int, labels: bool):
    from bigatlas.api import AtlasVAE

    train = {"seed": seed, "checkpoint_every_steps": 0, **overrides(a.train)}
    model = AtlasVAE(
        adata, batch_key=BATCH_KEY, covariate_keys=a.covariate_keys, label_keys=[LABELS] if labels else [],
        model=overrides(a.model), train=train,
    )  # fmt: skip
    model.fit(max_epochs=a.epochs or None)
    z = model.get_latent_representation()
    pred = model.predict()[f"{LABELS}_pred"].astype(str).to_numpy() if labels else None
    return z, pred, curve(model.run_dir / "metrics.csv")


def curve(metrics_csv) -> dict:
    """Epochs trained, the validation loss per epoch and Q1: the first epoch (and the training seconds
    up to it) whose validation loss is within 0.5% of the run's best."""
    m = pd.read_csv(metrics_csv)
    val, seconds = m.val_loss.to_numpy(), m.seconds.cumsum().to_numpy()
    best = np.nanmin(val)
    q1 = int(np.argmax(val <= best + 0.005 * abs(best)))
    return {
        "epochs": len(m),
        "q1_epoch": q1 + 1,
        "q1_seconds": round(float(seconds[q1]), 1),
        "loop_seconds": round(float(seconds[-1]), 1),
        "val_loss_curve": [round(float(v), 3) for v in val],
    }


def run_scvi(adata, a, seed: int, labels: bool, cache: dict):
    import scvi

    scvi.settings.seed = seed
    scvi.settings.num_threads = a.threads
    if "scvi" not in cache:
        t = time.perf_counter()
        data = adata.copy()
        scvi.model.SCVI.setup_anndata(
            data, batch_key=BATCH_KEY, labels_key=LABELS, categorical_covariate_keys=a.covariate_keys or None
        )
        model = scvi.model.SCVI(data)
        model.train(max_epochs=a.epochs or None, accelerator="cpu", enable_progress_bar=False)
        cache["scvi"], cache["scvi_seconds"] = model, time.perf_counter() - t
    if not labels:
        return cache["scvi"].get_latent_representation(), None
    model = scvi.model.SCANVI.from_scvi_model(cache["scvi"], unlabeled_category="undefined")
    try:
        model.train(accelerator="cpu", enable_progress_bar=False)
    except ValueError as e:  # a last training batch of 1 cell (BatchNorm refuses it; e.g. 32,000 cells)
        if "Expected more than 1 value per channel" not in str(e):
            raise
        model = scvi.model.SCANVI.from_scvi_model(cache["scvi"], unlabeled_category="undefined")
        model.train(accelerator="cpu", enable_progress_bar=False, datasplitter_kwargs={"drop_last": True})
    return model.get_latent_representation(), np.asarray(model.predict()).astype(str)


def run_scatlasvae(adata, a, seed: int):
    """scAtlasVAE 1.0.5.9 (the model bigatlas reimplements) with its defaults (gene-cell dispersion and
    gate, learning rate 5e-5, KL weight 1 warmed up over the whole run) and no labels; --epochs 0 is its
    own rule (400 epochs below 20,000 cells). `pip install --no-deps scatlasvae==1.0.5.9 …` (README)."""
    import warnings

    import scatlasvae

    data = adata.copy()
    data.X = data.X.astype(np.int32)  # it wants integer counts for ZINB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scatlasvae.model.scAtlasVAE(adata=data, batch_key=BATCH_KEY, device="cpu")
        model.fit(max_epoch=a.epochs or None, random_seed=seed)
        return model.get_latent_embedding(show_progress=False)


KMEANS_SEEDS = 10


def kmeans_mean(z, labels, first: dict, seeds: int | None = None) -> dict:
    """ARI and NMI of k-means against the labels averaged over k-means seeds 0..seeds-1 (KMEANS_SEEDS), with
    seed 0's (scIB's single draw) taken from first, the scib_scores already computed. One draw moves by up to
    ~0.2 ARI between seeds on the same latent, and by ~0.06 between two runs whose latents agree on every
    other metric: too much to choose defaults by."""
    from bigatlas.metrics import kmeans_scores

    seeds = seeds or KMEANS_SEEDS

    rest = kmeans_scores(z, labels, range(1, seeds))
    return {f"{k}_k{seeds}": (first[k] + (seeds - 1) * rest[k]) / seeds for k in ("ari", "nmi")}


CONTINUOUS = {"true_pseudotime": "pseudotime_r2", "true_state": "state_r2"}  # the continuous preset's truth


def graded_r2(z, value: np.ndarray, groups: np.ndarray, k: int = 15) -> float:
    """How well a cell's latent neighbours (k, within its own coarse type) predict a graded truth of the
    cell (pseudotime, activation): R² of the neighbours' mean against the cell's value, averaged over
    the coarse types. 1: the latent orders cells along it; 0: no better than the type's mean."""
    from bigatlas.metrics import knn

    out = []
    for g in np.unique(groups):
        cells = np.flatnonzero(groups == g)
        if len(cells) <= k:
            continue
        v = value[cells]
        guess = v[knn(z[cells], k)].mean(1)
        out.append(1.0 - ((v - guess) ** 2).sum() / ((v - v.mean()) ** 2).sum())
    return float(np.mean(out))


def resident_purity(z, resident: np.ndarray, coarse: np.ndarray, k: int = 15) -> float:
    """The tissues preset's over-correction check: of the 15 latent neighbours of each cell of a type resident
    in one tissue (absent from the other tissues' studies), the share of its own coarse type, averaged over
    those cells. Low: the latent aligned the resident type with types the other studies have."""
    from bigatlas.metrics import knn

    cells = np.flatnonzero(resident)
    nn = knn(z, k)[cells]
    return float((coarse[nn] == coarse[cells, None]).mean())


def condition_kept(z, treated: np.ndarray, donor: np.ndarray, fine: np.ndarray, affected: np.ndarray, k=15) -> float:
    """The condition and hard presets' treatment check (odd donors treated; the treatment changes some coarse
    types' programs): of a cell's k nearest cells of its own fine type from *other* donors (so a latent that keeps
    each donor apart scores as one that mixes them), the share in its arm; the mean over cells of the affected
    types minus that over the other types, where the arm is no biology (about 0.48 either way). 0: the latent
    holds no more of the treatment than of an arm drawn at random; higher: it keeps the treatment's effect."""
    import torch

    from bigatlas.knn import LatentIndex

    z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    share = np.full(len(z), np.nan)
    for t in np.unique(fine):
        cells = np.flatnonzero(fine == t)
        for d in np.unique(donor[cells]):
            query, ref = cells[donor[cells] == d], cells[donor[cells] != d]
            if len(ref) < k:
                continue
            nn = ref[LatentIndex(z[ref], exact=True).search(z[query], k)[1].numpy()]
            share[query] = (treated[nn] == treated[query, None]).mean(1)
    return float(np.nanmean(share[affected]) - np.nanmean(share[~affected]))


def score(adata, z, pred) -> dict:
    from bigatlas.metrics import BIO, confusion, prediction_scores, scib_scores

    truth = adata.obs[TRUTH]
    names = truth.astype(str).to_numpy()  # each cell's true type
    batch = adata.obs[BATCH_KEY]
    codes = truth.cat.codes.to_numpy()
    s = scib_scores(z, codes, batch.cat.codes.to_numpy(), seed=0)  # kmeans_mean reuses this draw as its seed 0
    row = {k: round(s[k], 4) for k in ("bio_conservation", "batch_correction", "total", "knn_label_accuracy")}
    row.update({k: round(s[k], 4) for k in ("ari", "nmi", "silhouette_label", "isolated_labels", "ilisi", "kbet")})
    km = kmeans_mean(z, codes, s)
    row.update({k: round(v, 4) for k, v in km.items()})
    # bio with the k-means terms averaged over draws (the scIB bio's other three terms unchanged)
    bio = [km[f"{k}_k{KMEANS_SEEDS}"] if k in ("ari", "nmi") else s[k] for k in BIO]
    row[f"bio_k{KMEANS_SEEDS}"] = round(float(np.nanmean(bio)), 4)
    coarse = truth.astype(str).str.split(".").str[0].to_numpy()
    for column, name in CONTINUOUS.items():
        if column in adata.obs:
            row[name] = round(graded_r2(np.asarray(z), adata.obs[column].to_numpy(), coarse), 4)
    if "tissue_resident" in adata.obs:
        resident = adata.obs["tissue_resident"].to_numpy()
        row["resident_purity"] = round(resident_purity(np.asarray(z), resident, coarse), 4)
    if "condition_affected" in adata.obs:
        treated = (adata.obs["condition"].astype(str) == "treated").to_numpy()
        hit = np.unique(coarse[adata.obs["condition_affected"].to_numpy()])
        row["condition_kept"] = round(
            condition_kept(
                np.asarray(z, np.float32), treated, adata.obs["donor_id"].astype(str).to_numpy(),
                names, np.isin(coarse, hit),
            ),
            4,
        )  # fmt: skip
    row.update(review_scores(adata, z))
    if pred is not None:
        hidden = adata.obs["bench_hidden"].to_numpy()
        t = pd.Categorical(names[hidden])
        scores = prediction_scores(confusion(t, pd.Categorical(pred[hidden])))
        row["heldout_accuracy"] = round(scores["accuracy"], 4)
        row["heldout_macro_f1"] = round(scores["macro_f1"], 4)
        # the cells trained on (visible labels), against their truth: above heldout_accuracy by what the
        # predictor learnt of its training cells that does not carry over to cells like them
        seen = (adata.obs[LABELS].astype(str) != "undefined").to_numpy() & ~hidden
        row["visible_accuracy"] = round(float((pred[seen] == names[seen]).mean()), 4)
        rare = t.categories[np.bincount(t.codes, minlength=len(t.categories)) < 0.01 * len(t)]
        is_rare = np.isin(np.asarray(t), rare)
        if is_rare.any():
            row["heldout_rare_recall"] = round(float((pred[hidden][is_rare] == np.asarray(t)[is_rare]).mean()), 4)
        wrong = adata.obs["bench_mislabelled"].to_numpy()
        if wrong.any():  # the cells trained on a wrong label: predicted as what they are, or as they were told
            row["mislabelled_corrected"] = round(float((pred[wrong] == names[wrong]).mean()), 4)
            given = adata.obs[LABELS].astype(str).to_numpy()[wrong]
            row["mislabelled_kept"] = round(float((pred[wrong] == given).mean()), 4)
    return row


def review_scores(adata, z) -> dict:
    """With wrong labels (--mislabel-fraction): how the label review (bigatlas.label_review) of the visible
    labels in this latent finds them — the share of the wrong ones it flags (recall) and of the flagged
    that are wrong (precision)."""
    wrong = adata.obs["bench_mislabelled"].to_numpy()  # visible cells only (mislabel())
    if not wrong.any():
        return {}
    flagged = review_flags(adata, z)
    hit = int((flagged & wrong).sum())
    return {
        "review_recall": round(hit / int(wrong.sum()), 4),
        "review_precision": round(hit / max(int(flagged.sum()), 1), 4),
    }


def summary(rows: list[dict]) -> dict:
    df = pd.DataFrame(rows)
    metrics = [c for c in df.columns if c not in ("preset", "seed", "method", "tag", "val_loss_curve")]
    mean = df.groupby(["tag", "method", "preset"])[metrics].mean().round(4)
    overall = df.groupby(["tag", "method"])[metrics].mean().round(4)
    return {
        "by_atlas": {" / ".join(k): v for k, v in mean.to_dict(orient="index").items()},
        "overall": {" / ".join(k): v for k, v in overall.to_dict(orient="index").items()},
    }


TABLE = (
    ("bio_conservation", "bio"),
    (f"bio_k{KMEANS_SEEDS}", f"bio (k-means × {KMEANS_SEEDS})"),  # shown only where rows carry it
    ("batch_correction", "batch"),
    ("total", "total"),
    ("knn_label_accuracy", "kNN acc."),
    ("heldout_accuracy", "held-out acc."),
    ("heldout_macro_f1", "held-out F1"),
    ("mislabelled_corrected", "mislabels corrected"),  # shown only with --mislabel-fraction
    ("review_recall", "review recall"),  # the label review's, likewise
    ("review_precision", "review precision"),
    ("pseudotime_r2", "pseudotime R²"),  # shown only where rows carry them (the continuous preset)
    ("state_r2", "state R²"),
    ("resident_purity", "resident purity"),  # the tissues preset
    ("condition_kept", "condition kept"),  # the condition and hard presets
    ("epochs", "epochs"),
    ("train_seconds", "seconds"),
)


PEER = {"bigatlas": "scvi", "bigatlas_labels": "scanvi"}  # each bigatlas method's peer


def table(rows: list[dict], tags, own_rule: bool = False, methods=None) -> str:
    """Markdown: per atlas, the mean over seeds of every method (bigatlas variants in `tags`; only `methods`,
    when given). own_rule: the peers' rows trained at their own epoch rule (max_epochs 0) only, and bigatlas
    rows where its peer has one on the same atlas and seed, so every line pairs the same cells."""
    df = pd.DataFrame(rows)
    df = df[((df.tag == "peer") | df.tag.isin(tags)) & (df.method.isin(methods) if methods else True)]
    if own_rule:
        own = df[(df.tag == "peer") & (df.get("max_epochs", pd.Series(np.nan, df.index)) == 0)]
        pairs = {(m, p, s) for m, p, s in zip(own.method, own.preset, own.seed)}
        mine = [(PEER.get(m), p, s) in pairs for m, p, s in zip(df.method, df.preset, df.seed)]
        df = df[((df.tag != "peer") & np.array(mine, bool)) | df.index.isin(own.index)]
    df["name"] = np.where(df.tag == "peer", df.method, df.method + " (" + df.tag + ")")
    pair = {m: i for i, item in enumerate(PEER.items()) for m in item}  # each bigatlas method, then its peer
    cols = [(k, h) for k, h in TABLE if k in df and df[k].notna().any()]
    lines = ["| atlas | method | seeds | " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for preset in dict.fromkeys(df.preset):
        sub = df[df.preset == preset]
        names = sorted(
            dict.fromkeys(sub.name), key=lambda n: (pair.get(m := n.split(" ")[0], len(PEER)), m not in PEER, n)
        )
        for name in names:
            g = sub[sub.name == name]
            cells = [
                f"{g[k].mean():.{0 if k in ('epochs', 'train_seconds') else 3}f}"
                if k in g and g[k].notna().any()
                else "–"
                for k, _ in cols
            ]
            lines.append(f"| {preset} | {name} | {len(g)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(a) -> dict:
    import torch

    a.out = a.out or (f"bench/results/quality_{data_name(a.data)}.json" if a.data else "bench/results/quality.json")
    if a.table:
        print(table(json.loads(Path(a.out).read_text())["rows"], a.tags, a.own_rule, a.only))
        return {}

    torch.set_num_threads(a.threads)
    methods = a.only or list(METHODS[:4])
    if a.covariate_keys and "scatlasvae" in methods:
        raise ValueError("--covariate-keys: the scatlasvae row corrects for the study only; leave it out (--only)")
    out = Path(a.out)
    old = json.loads(out.read_text())["rows"] if out.exists() else []
    new = []
    latent_dir = Path(a.data_dir) / "latents"  # every run's latent, to score again without training
    latent_dir.mkdir(parents=True, exist_ok=True)
    for preset in [data_name(a.data)] if a.data else a.presets:
        name = f"{preset}+mislabel{a.mislabel_fraction:g}" if a.mislabel_fraction else preset
        name += "".join(f"+cov_{k}" for k in a.covariate_keys)
        for seed in a.seeds:
            adata = atlas(a, preset, seed)
            cache: dict = {}
            for method in methods:
                t, pretrained = time.perf_counter(), "scvi" in cache
                labels = method in ("bigatlas_labels", "scanvi")
                extra = {}
                if method == "bigatlas_labels" and a.review_with:
                    latent = latent_dir / f"{name}_{seed}_bigatlas_{a.review_with}.npy"
                    train_data, n_hidden = reviewed(adata, latent)
                    z, pred, extra = run_bigatlas(train_data, a, seed, labels)
                    extra["review_hidden"] = n_hidden
                elif method.startswith("bigatlas"):
                    z, pred, extra = run_bigatlas(adata, a, seed, labels)
                elif method == "scatlasvae":
                    z, pred = run_scatlasvae(adata, a, seed), None
                else:
                    z, pred = run_scvi(adata, a, seed, labels, cache)
                seconds = time.perf_counter() - t
                if method == "scanvi" and pretrained:  # scANVI's time includes the scVI it starts from
                    seconds += cache["scvi_seconds"]
                tag = a.tag if method.startswith("bigatlas") else "peer"
                np.save(latent_dir / f"{name}_{seed}_{method}_{tag}.npy", np.asarray(z, dtype=np.float32))
                row = {"preset": name, "seed": seed, "method": method, "tag": tag, **score(adata, z, pred)}
                row["train_seconds"] = round(seconds, 1)
                row["max_epochs"] = a.epochs  # 0: the method's own epoch rule
                row.update(extra)
                print(json.dumps(row), flush=True)
                new.append(row)
    done = {(r["preset"], r["seed"], r["method"], r["tag"]) for r in new}
    rows = [r for r in old if (r["preset"], r["seed"], r["method"], r["tag"]) not in done] + new
    keys = ("data", "batch_key", "label_key", "layer") if a.data else ("cells", "genes")
    setup = {k: getattr(a, k) for k in (*keys, "epochs", "hidden_fraction", "mislabel_fraction", "threads")}
    return write_results({"setup": setup, "rows": rows, **summary(rows)}, out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
