"""Differential expression beside scvi-tools, on generated atlases whose marker genes are known.

For every preset × seed, on the same cells: bigatlas and scVI each trained at their defaults without labels,
then each subtype of 100 cells or more against its sibling subtypes (the same coarse type) by the method's own
differential expression in scvi-tools' "change" mode (delta 0.25, batch correction on, FDR 0.05). The truth: the
genes of the three subtypes' own programmes (synth.truth's markers) differ, no other gene does. Per comparison:
the AUROC of proba_de against the truth, and of the calls at FDR 0.05 the share that are true (precision) and the
share of the true genes called (recall); `log2_mean_ratio` is the same AUROC for the plain ratio of the groups'
mean counts per 10,000 (no model), the floor a model should beat. Writes bench/results/differential.json.

    python -m bench.differential                  # presets default and subtle, seeds 0 and 1
"""

from __future__ import annotations

import time

import numpy as np
from scipy.stats import mannwhitneyu

from bench.common import main, write_results

BATCH_KEY, TRUTH = "dataset_id", "true_cell_type"


def add_arguments(p) -> None:
    p.add_argument("--presets", nargs="+", default=["default", "subtle"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--cells", type=int, default=4000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--min-cells", type=int, default=100, help="subtypes with fewer cells are not compared")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/tmp/bigatlas_bench")
    p.add_argument("--out", default="bench/results/differential.json")


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    u = mannwhitneyu(score[positive], score[~positive]).statistic
    return float(u / (positive.sum() * (~positive).sum()))


def comparisons(adata, spec, tr, min_cells: int):
    """(subtype, its siblings, the truth: a bool per gene) of each subtype with min_cells cells or more."""
    names, sizes = spec.fine_names, adata.obs[TRUTH].astype(str).value_counts()
    for f in range(spec.n_fine):
        first = f // spec.n_fine_per_coarse * spec.n_fine_per_coarse
        sibs = [g for g in range(first, first + spec.n_fine_per_coarse) if g != f and sizes.get(names[g], 0) >= 20]
        if sizes.get(names[f], 0) < min_cells or not sibs:
            continue
        true = np.zeros(spec.n_genes, bool)
        true[np.concatenate([tr.markers[g] for g in [f, *sibs]])] = True
        yield names[f], [names[g] for g in sibs], true


def scores(proba: np.ndarray, called: np.ndarray, true: np.ndarray) -> dict:
    return {
        "auroc": round(auroc(true, proba), 4),
        "precision": round(float(true[called].mean()), 4) if called.any() else None,
        "recall": round(float(called[true].mean()), 4),
        "called": int(called.sum()),
    }


def mean_ratio(adata, one: str, two: list[str]) -> np.ndarray:
    """|log2| of the groups' mean counts per 10,000 (+1): the model-free ranking."""
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    x = x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4
    group = adata.obs[TRUTH].astype(str)
    a, b = x[(group == one).to_numpy()].mean(0), x[group.isin(two).to_numpy()].mean(0)
    return np.abs(np.log2(a + 1) - np.log2(b + 1))


def run_atlas(a, preset_name: str, seed: int) -> list[dict]:
    import scvi

    from bench.quality import preset_atlas
    from bigatlas.api import AtlasVAE
    from bigatlas.synth import preset, truth

    adata = preset_atlas(a.data_dir, preset_name, seed, a.cells, a.genes)
    spec = preset(preset_name, a.cells, a.genes, seed=seed)
    tr = truth(spec)
    t = time.perf_counter()
    ours = AtlasVAE(adata, batch_key=BATCH_KEY, train={"seed": seed, "checkpoint_every_steps": 0}).fit()
    seconds = {"bigatlas": time.perf_counter() - t}
    scvi.settings.seed, scvi.settings.num_threads = seed, a.threads
    t = time.perf_counter()
    data = adata.copy()
    scvi.model.SCVI.setup_anndata(data, batch_key=BATCH_KEY)
    theirs = scvi.model.SCVI(data)
    theirs.train(accelerator="cpu", enable_progress_bar=False)
    seconds["scvi"] = time.perf_counter() - t
    rows = []
    for one, two, true in comparisons(adata, spec, tr, a.min_cells):
        row = {"atlas": preset_name, "seed": seed, "group1": one, "group2": two, "n_true": int(true.sum())}
        t = time.perf_counter()
        table = ours.differential_expression(groupby=TRUTH, group1=one, group2=two, batch_correction=True)
        table = table.loc[ours.vocab.genes]  # the atlas's gene order, as the truth's
        row["bigatlas"] = {**scores(table.proba_de.to_numpy(), table["is_de_fdr_0.05"].to_numpy(), true),
                           "seconds": round(time.perf_counter() - t, 2)}  # fmt: skip
        t = time.perf_counter()
        group = data.obs[TRUTH].astype(str)  # several siblings: scvi-tools takes them as a mask (idx2)
        table = theirs.differential_expression(
            idx1=(group == one).to_numpy(), idx2=group.isin(two).to_numpy(), mode="change", delta=0.25,
            batch_correction=True, silent=True,
        ).loc[data.var_names]  # fmt: skip
        row["scvi"] = {**scores(table.proba_de.to_numpy(), table["is_de_fdr_0.05"].to_numpy(), true),
                       "seconds": round(time.perf_counter() - t, 2)}  # fmt: skip
        row["log2_mean_ratio"] = {"auroc": round(auroc(true, mean_ratio(adata, one, two)), 4)}
        row["train_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        rows.append(row)
        print(row, flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for method in ("bigatlas", "scvi", "log2_mean_ratio"):
        for key in ("auroc", "precision", "recall"):
            values = [r[method][key] for r in rows if r[method].get(key) is not None]
            if values:
                out.setdefault(method, {})[key] = round(float(np.mean(values)), 4)
    paired = np.array([r["bigatlas"]["auroc"] - r["scvi"]["auroc"] for r in rows])
    out["auroc_bigatlas_minus_scvi"] = {
        "mean": round(float(paired.mean()), 4),
        "se": round(float(paired.std(ddof=1) / np.sqrt(len(paired))), 4) if len(paired) > 1 else None,
        "n_up": int((paired > 0).sum()),
        "n": len(paired),
    }
    return out


def run(a) -> dict:
    rows = [row for name in a.presets for seed in a.seeds for row in run_atlas(a, name, seed)]
    setup = {k: v for k, v in vars(a).items() if k != "out"}
    return write_results({"setup": setup, "rows": rows, "summary": summary(rows)}, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
