"""Stores that measured different genes: what bigatlas makes of genes a cell's store never measured.

Collection (`--what collection`): the preset atlas cut in two stores, studies 0-3 with every gene and
studies 4-5 without a share of them (`--drop`), trained as one collection with `--gene-join outer`, the
missing genes either left out of the likelihood (`masked`, the default) or counted as zeros (`zero`, before),
beside the same cells with every gene (`all`). Scored like bench.quality (scIB against the true types and
the study), plus how the second store's cells meet the first's: the share of their 15 nearest cells that
come from the first store (`b_among_a`), the true-type accuracy of their 15 nearest first-store cells
(`b_to_a_knn_acc`), and the decoder's prediction of the genes they lack against the counts held back
(`imputed_r`, mean per-gene correlation over those cells; `imputed_mean_ratio`, predicted / true mean share).

Query (`--what query`): a model trained on studies 0-4, and study 5 embedded zero-shot with every gene
(`acc_all`), without a share of the model's genes (`acc_fill`: the model fills them in for the encoder, the
default), and with those genes present as zeros (`acc_zero`: what missing genes were before): the
true-type accuracy of each query cell's 15 nearest reference cells, and how far its latent moves from the
every-gene latent (`dist_*`, mean distance over the mean distance to the query's centre).

    python -m bench.panels --what collection --presets rare condition --seeds 0 1
    python -m bench.panels --what query --presets rare condition subtle --seeds 0 1
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import main, write_results
from bench.quality import BATCH_KEY, TRUTH, preset_atlas, score

FIRST = ["study_0", "study_1", "study_2", "study_3"]


def add_arguments(p) -> None:
    p.add_argument("--what", choices=["collection", "query"], default="collection", help="which comparison")
    p.add_argument("--presets", nargs="+", default=["rare", "condition"], help="synth presets")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="atlas and training seeds")
    p.add_argument("--cells", type=int, default=8000, help="cells per atlas")
    p.add_argument("--genes", type=int, default=1000, help="genes per atlas")
    p.add_argument("--drop", type=float, nargs="+", default=[0.25], help="share of genes the second store lacks")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--data-dir", default="bench/data", help="where atlases are built or reused")
    p.add_argument("--out", default="bench/results/panels.json", help="JSON result file, rows merged into it")


def kept_genes(n_genes: int, drop: float, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(100 + seed).permutation(n_genes)[: int(n_genes * (1 - drop))])


def neighbours(fit, query, k: int = 15) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k).fit(fit).kneighbors(query, return_distance=False)


def collection_rows(a, preset: str, seed: int, drop: float) -> list[dict]:
    import anndata as ad

    from bigatlas.api import AtlasVAE

    full = preset_atlas(a.data_dir, preset, seed, a.cells, a.genes)
    first = full.obs[BATCH_KEY].astype(str).isin(FIRST).to_numpy()
    keep = kept_genes(full.n_vars, drop, seed)
    work = Path(a.data_dir) / f"panels_{preset}_{seed}_{drop:g}"
    pa, pb = work / "a.zarr", work / "b.zarr"
    if not (pb / "zarr.json").exists() and not (pb / ".zgroup").exists():
        work.mkdir(parents=True, exist_ok=True)
        full[first].copy().write_zarr(pa)
        full[~first][:, keep].copy().write_zarr(pb)
    cells = ad.concat([full[first], full[~first]])  # the collection's order
    for key in (TRUTH, BATCH_KEY):
        cells.obs[key] = cells.obs[key].astype("category")
    cells.obs["bench_mislabelled"] = False
    b = np.arange(cells.n_obs) >= int(first.sum())
    truth = cells.obs[TRUTH].astype(str).to_numpy()
    lacked = np.setdiff1d(np.arange(full.n_vars), keep)
    x = full[~first].X
    x = np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=float)
    share = x[:, lacked] / x.sum(1, keepdims=True).clip(1)
    rows = []
    for variant in ("all", "zero", "masked"):
        t = time.perf_counter()
        train = {"seed": seed, "checkpoint_every_steps": 0}
        if variant == "all":
            model = AtlasVAE(cells, batch_key=BATCH_KEY, train=train)
        else:
            model = AtlasVAE([str(pa), str(pb)], batch_key=BATCH_KEY, gene_join="outer",
                             train={**train, "missing_genes": variant})  # fmt: skip
        model.fit()
        z = model.get_latent_representation()
        seconds = time.perf_counter() - t
        row = {"preset": preset, "seed": seed, "drop": drop, "variant": variant, **score(cells, z, None)}
        row["b_among_a"] = round(float((~b[neighbours(z, z[b], 16)[:, 1:]]).mean()), 4)
        row["b_to_a_knn_acc"] = round(float((truth[~b][neighbours(z[~b], z[b])] == truth[b][:, None]).mean()), 4)
        fractions = model.get_normalized_expression(cells if variant == "all" else None).to_numpy()
        pred = fractions[b][:, pd.Index(model.vocab.genes).get_indexer(full.var_names)][:, lacked]
        r = [np.corrcoef(pred[:, j], share[:, j])[0, 1] for j in range(len(lacked)) if share[:, j].std() > 0]
        row["imputed_r"] = round(float(np.nanmean(r)), 4)
        row["imputed_mean_ratio"] = round(float(pred.mean() / share.mean()), 4)
        row["epochs"] = int(pd.read_csv(model.run_dir / "metrics.csv")["epoch"].max()) + 1
        row["train_seconds"] = round(seconds, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def query_rows(a, preset: str, seed: int) -> list[dict]:
    from bigatlas.api import AtlasVAE

    full = preset_atlas(a.data_dir, preset, seed, a.cells, a.genes)
    last = (full.obs[BATCH_KEY].astype(str) == "study_5").to_numpy()
    ref, query = full[~last].copy(), full[last].copy()
    model = AtlasVAE(ref, batch_key=BATCH_KEY, train={"seed": seed, "checkpoint_every_steps": 0}).fit()
    truth_ref, truth_query = ref.obs[TRUTH].astype(str).to_numpy(), query.obs[TRUTH].astype(str).to_numpy()
    z_ref = model.get_latent_representation()

    def accuracy(z):
        return round(float((truth_ref[neighbours(z_ref, z)] == truth_query[:, None]).mean()), 4)

    z_all = model.get_latent_representation(query)
    spread = float(np.linalg.norm(z_all - z_all.mean(0), axis=1).mean())
    rows = []
    for drop in a.drop:
        keep = kept_genes(full.n_vars, drop, seed)
        zeroed = query.copy()
        x = zeroed.X.tolil()
        x[:, np.setdiff1d(np.arange(full.n_vars), keep)] = 0
        zeroed.X = x.tocsr()
        zeroed.X.eliminate_zeros()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "… genes are missing from …; they are zero-filled"
            z_fill = model.get_latent_representation(query[:, keep].copy())
        z_zero = model.get_latent_representation(zeroed)
        row = {"preset": preset, "seed": seed, "drop": drop, "acc_all": accuracy(z_all)}
        for name, z in (("zero", z_zero), ("fill", z_fill)):
            row[f"acc_{name}"] = accuracy(z)
            row[f"dist_{name}"] = round(float(np.linalg.norm(z - z_all, axis=1).mean()) / spread, 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def summary(rows: list[dict], what: str) -> dict:
    frame = pd.DataFrame([r for r in rows if r["what"] == what])
    if frame.empty:
        return {}
    by = ["drop", "variant"] if what == "collection" else ["drop"]
    cols = [c for c in frame.columns if frame[c].dtype.kind == "f" and c != "drop"]
    means = frame.groupby(["preset", *by])[cols].mean().round(4).reset_index()
    return {f"{what}_means": means.to_dict("records")}


def run(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    old = json.loads(out.read_text())["rows"] if out.exists() else []
    new = []
    for preset in a.presets:
        for seed in a.seeds:
            if a.what == "collection":
                made = [r for drop in a.drop for r in collection_rows(a, preset, seed, drop)]
            else:
                made = query_rows(a, preset, seed)
            new += [{"what": a.what, **r} for r in made]
    key = ("what", "preset", "seed", "drop", "variant")
    done = {tuple(r.get(k) for k in key) for r in new}
    rows = [r for r in old if tuple(r.get(k) for k in key) not in done] + new
    setup = {"cells": a.cells, "genes": a.genes, "threads": a.threads, "commands": [
        "python -m bench.panels --what collection --presets rare condition --seeds 0 1",
        "python -m bench.panels --what query --presets rare condition subtle --seeds 0 1 --drop 0.1 0.25 0.4",
    ]}  # fmt: skip
    return write_results({"setup": setup, "rows": rows, **summary(rows, "collection"), **summary(rows, "query")}, out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
