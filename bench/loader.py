"""Loader benchmark: bigatlas CellStream vs the sequential decode limit, annbatch and tiledbsoma-ml;
and the same stream over an .h5ad as anndata writes it (H1 = its cells/s ÷ the converted Zarr store's)
over the AnnData in memory, and over the same cells cut into a collection of 3 stores (C1 = its
cells/s ÷ the single store's).

Full epochs (median of --epochs) each, minibatches of 512, on a store whose rows are SORTED by cell type (the hard
case for shuffling). Reports cells/s, mean per-minibatch cell-type entropy ÷ that of a random
permutation, and RSS growth; ratios L1 = b/c, L2 = b/a, L3 = d/e. Peer loaders are optional: a
missing one is reported as skipped with the reason, never silently.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import PeakRSS, ensure_store, main, write_results
from loaders import CellStream, open_store

LABEL = "true_cell_type"


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, default=200_000, help="cells in the benchmark store")
    p.add_argument("--genes", type=int, default=2000, help="genes in the benchmark store")
    p.add_argument("--data-dir", default="bench/data", help="where stores are built or reused")
    p.add_argument("--batch-size", type=int, default=512, help="cells per minibatch")
    p.add_argument("--workers", type=int, default=1, help="bigatlas reader threads")
    p.add_argument("--block-size", type=int, default=None, help="bigatlas block rows (default: store's)")
    p.add_argument(
        "--blocks-per-request", type=int, default=None, help="bigatlas blocks per read request (default: store's)"
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs per loader; the median epoch is reported")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="subset of loaders: sequential bigatlas_zarr annbatch bigatlas_soma tiledbsoma_ml bigatlas_h5ad "
        "bigatlas_h5ad_gzip bigatlas_memory bigatlas_collection",
    )
    p.add_argument("--out", default="bench/results/loader.json", help="JSON result file")


def batch_entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def measure(make_iter, n_expected: int, epochs: int) -> dict:
    """Run `epochs` epochs of make_iter(epoch) → iterator of (n_cells, labels or None); report the
    median epoch's cells/s (this 2-core box is noisy), first-epoch entropy, peak RSS growth."""
    gc.collect()
    with PeakRSS() as rss:
        seconds, ents, complete = [], [], True
        for epoch in range(epochs):
            t = time.perf_counter()
            cells = 0
            for n, labels in make_iter(epoch):
                cells += n
                if labels is not None and epoch == 0:
                    ents.append(batch_entropy(labels))
            seconds.append(time.perf_counter() - t)
            complete &= cells == n_expected
    med = float(np.median(seconds))
    return {
        "cells": n_expected,
        "epochs": epochs,
        "epoch_seconds": [round(x, 3) for x in seconds],
        "cells_per_s": round(n_expected / med),
        "first_epoch_cells_per_s": round(n_expected / seconds[0]),
        "mean_batch_entropy": round(float(np.mean(ents)), 4) if ents else None,
        "rss_growth_mb": round(rss.growth_mb, 1),
        "complete_epochs": complete,
    }


def ensure_stores(a) -> tuple[str, str]:
    return tuple(
        ensure_store(a.data_dir, a.cells, a.genes, fmt, order="cell_type", prefix="sorted") for fmt in ("zarr", "soma")
    )


def h5ad_copy(zarr_path, data_dir, compression=None) -> str:
    """The Zarr store's cells as an .h5ad written by anndata (defaults, or gzip: what users bring)."""
    import anndata as ad

    path = Path(data_dir) / (Path(zarr_path).stem + (f"_{compression}" if compression else "") + ".h5ad")
    if not path.exists():
        ad.read_zarr(zarr_path).write_h5ad(path.with_suffix(".tmp.h5ad"), compression=compression)
        os.replace(path.with_suffix(".tmp.h5ad"), path)
    return str(path)


def split_copy(zarr_path, data_dir, parts: int = 3) -> list[str]:
    """The Zarr store's cells cut into `parts` stores in the same fast layout (a collection's members)."""
    import anndata as ad

    from bigatlas.write_store import ZarrWriter

    store = open_store(zarr_path)
    obs = ad.read_zarr(zarr_path).obs
    cuts = np.linspace(0, store.n_obs, parts + 1).astype(int)
    paths = []
    for k in range(parts):
        path = Path(data_dir) / f"{Path(zarr_path).stem}_part{k}of{parts}.zarr"
        if not path.exists():
            with ZarrWriter(path, store.n_vars) as w:
                for lo in range(cuts[k], cuts[k + 1], 65536):
                    m = store.read(np.arange(lo, min(lo + 65536, cuts[k + 1])))
                    w.append(m.indptr, m.indices, m.data)
                w.finish(obs.iloc[cuts[k] : cuts[k + 1]], store.var)
        paths.append(str(path))
    return paths


def in_memory(zarr_path):
    import anndata as ad

    return ad.read_zarr(zarr_path)


def sequential(zarr_path, batch_size):
    store = open_store(zarr_path)
    step = 65536

    def it(epoch):
        for lo in range(0, store.n_obs, step):
            m = store.read(np.arange(lo, min(lo + step, store.n_obs)))
            for b in range(0, m.n_rows, batch_size):
                yield min(batch_size, m.n_rows - b), None

    return it


def bigatlas_stream(path, a, codes):
    import warnings

    with warnings.catch_warnings():  # the .h5ad's slow-layout notice: measured here
        warnings.simplefilter("ignore")
        store = open_store(path)
    s = CellStream(
        store,
        batch_size=a.batch_size,
        seed=0,
        num_workers=a.workers,
        block_size=a.block_size,
        blocks_per_request=a.blocks_per_request,
    )

    def it(epoch):
        s.set_epoch(epoch)
        for b in s:
            yield len(b), codes[b.index.numpy()]

    return it


def annbatch_loader(zarr_path, a, codes_of_name):
    import annbatch  # optional peers: a missing one is reported as skipped
    import anndata as ad
    import zarr

    coll_path = Path(a.data_dir) / f"annbatch_{Path(zarr_path).name}"
    info = {}
    if coll_path.exists() and annbatch.DatasetCollection(str(coll_path), mode="r").is_empty:
        shutil.rmtree(coll_path)  # an interrupted earlier build
    if not coll_path.exists():
        t = time.perf_counter()
        annbatch.DatasetCollection(str(coll_path)).add_adatas([zarr_path], shuffle=True, rng=np.random.default_rng(0))
        info["collection_build_s"] = round(time.perf_counter() - t, 1)

    def load(g: zarr.Group):  # backed X and the label column only, like the other loaders
        return ad.AnnData(X=ad.io.sparse_dataset(g["X"]), obs=ad.io.read_elem(g["obs"])[[LABEL]])

    loader = annbatch.Loader(batch_size=a.batch_size, shuffle=True, preload_to_gpu=False, rng=np.random.default_rng(0))
    loader.use_collection(annbatch.DatasetCollection(str(coll_path), mode="r"), load_adata=load)

    def it(epoch):
        for out in loader:
            labels = codes_of_name(out["obs"][LABEL].astype(str).to_numpy())
            yield out["X"].shape[0], labels

    return it, info


def tiledbsoma_ml_loader(soma_path, a, codes_of_name):
    import tiledbsoma as soma
    from tiledbsoma_ml import ExperimentDataset

    def it(epoch):
        with soma.Experiment.open(soma_path) as exp, exp.axis_query("RNA") as q:
            ds = ExperimentDataset(
                q,
                layer_name="raw",
                obs_column_names=[LABEL],
                batch_size=a.batch_size,
                shuffle=True,
                seed=0,
                return_sparse_X=True,
            )
            for x, obs in ds:
                yield x.shape[0], codes_of_name(obs[LABEL].astype(str).to_numpy())

    return it


def run(a) -> dict:
    zarr_path, soma_path = ensure_stores(a)
    codes, cats = open_store(zarr_path).obs_codes(LABEL)
    lookup = {c: i for i, c in enumerate(cats)}

    def codes_of_name(names):
        return np.fromiter((lookup[n] for n in names), np.int64, len(names))

    n = len(codes)
    perm = np.random.default_rng(0).permutation(codes)
    random_entropy = float(np.mean([batch_entropy(perm[i : i + a.batch_size]) for i in range(0, n, a.batch_size)]))
    everything = ["sequential", "bigatlas_zarr", "annbatch", "bigatlas_soma", "tiledbsoma_ml", "bigatlas_h5ad"]
    wanted = set(a.only or everything + ["bigatlas_h5ad_gzip", "bigatlas_memory", "bigatlas_collection"])
    res: dict = {
        "store": {
            "cells": n,
            "genes": a.genes,
            "order": "sorted by cell type",
            "nnz_per_cell": round(open_store(zarr_path)._indptr[-1] / n, 1),
        },
        "batch_size": a.batch_size,
        "random_permutation_entropy": round(random_entropy, 4),
        "cpu_count": os.cpu_count(),
    }
    runs = {  # pairs whose ratio is reported run next to each other (this 2-core box drifts within a run)
        "sequential": lambda: (sequential(zarr_path, a.batch_size), {}),
        "bigatlas_zarr": lambda: (bigatlas_stream(zarr_path, a, codes), {}),
        "bigatlas_collection": lambda: (bigatlas_stream(split_copy(zarr_path, a.data_dir), a, codes), {}),
        "annbatch": lambda: annbatch_loader(zarr_path, a, codes_of_name),
        "bigatlas_soma": lambda: (bigatlas_stream(soma_path, a, codes), {}),
        "tiledbsoma_ml": lambda: (tiledbsoma_ml_loader(soma_path, a, codes_of_name), {}),
        "bigatlas_h5ad": lambda: (bigatlas_stream(h5ad_copy(zarr_path, a.data_dir), a, codes), {}),
        "bigatlas_h5ad_gzip": lambda: (bigatlas_stream(h5ad_copy(zarr_path, a.data_dir, "gzip"), a, codes), {}),
        "bigatlas_memory": lambda: (bigatlas_stream(in_memory(zarr_path), a, codes), {}),
    }
    for name, make in runs.items():
        if name not in wanted:
            continue
        try:
            it, info = make()
            r = measure(it, n, a.epochs)
            r.update(info)
        except ImportError as e:
            r = {"skipped": f"not installed: {e} (see README, Benchmarks)"}
        if r.get("mean_batch_entropy") is not None:
            r["entropy_ratio"] = round(r["mean_batch_entropy"] / random_entropy, 4)
        res[name] = r
        print(json.dumps({name: r}), flush=True)

    def ratio(x, y, key="cells_per_s"):
        try:
            return round(res[x][key] / res[y][key], 3)
        except KeyError:
            return None

    pairs = {
        "L1_bigatlas_over_annbatch": ("bigatlas_zarr", "annbatch"),
        "L2_bigatlas_over_sequential": ("bigatlas_zarr", "sequential"),
        "L3_bigatlas_soma_over_tiledbsoma_ml": ("bigatlas_soma", "tiledbsoma_ml"),
        "H1_h5ad_over_converted_zarr": ("bigatlas_h5ad", "bigatlas_zarr"),
        "H2_converted_zarr_over_h5ad_gzip": ("bigatlas_zarr", "bigatlas_h5ad_gzip"),
        "M1_memory_over_zarr": ("bigatlas_memory", "bigatlas_zarr"),
        "C1_collection_of_3_over_merged_zarr": ("bigatlas_collection", "bigatlas_zarr"),
    }
    for name, (x, y) in pairs.items():
        res[name] = ratio(x, y)  # median epochs
        res[name + "_first_epoch"] = ratio(x, y, "first_epoch_cells_per_s")
    return write_results(res, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
