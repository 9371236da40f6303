"""`bigatlas prepare`: out-of-core passes over a store with dask, before training.

- conversion of an `.h5ad` (opened backed: X is read block by block, never loaded whole), a SOMA
  experiment or Census slice, or an AnnData-Zarr store into the chunked (optionally sharded) Zarr v3
  layout the loader reads fastest;
- per-gene mean, variance (ddof 1, as scanpy) and detection rate, library-size distribution;
- batch-aware highly variable genes, seurat_v3 flavour on counts (Seurat's loess of log variance on
  log mean per batch, clipped standardised variance, genes ranked by median rank across batches
  with the number of batches as tie-break, as scanpy): `hvg.txt` is a gene list `--genes` accepts;
- class counts per label key.

The cells are cut into blocks of `block_cells`; a dask bag with one partition per worker folds each
partition's blocks into one accumulator (batches × genes), then the partitions' results are summed,
so memory is a block and an accumulator per worker whatever the number of cells. Conversion reads
windows of `workers` blocks in parallel and appends them in order.
"""

from __future__ import annotations

import json
import resource
import time
import warnings
from functools import partial, reduce
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders import StoreError, data_name

from .config import UNLABELED
from .errors import MissingExtra
from .plots import library_size
from .sources import Source, StoreSource, feature_ids, open_source
from .vocab import defined_labels
from .write_store import DEFAULT_CHUNK_ELEMS, ZarrWriter

LIB_BINS = np.concatenate([[0.0], np.logspace(0, 7, 281)])  # library sizes 1 .. 1e7, 40 bins per decade


# -- dask passes ---------------------------------------------------------------------------------


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + block, n)) for lo in range(0, n, block)]


def _bag(n: int, block: int, workers: int):
    import dask.bag as db

    ranges = _blocks(n, block)
    # one partition per worker: each folds its blocks into ONE accumulator (batches × genes), which
    # for the Census (hundreds of datasets × 60k genes) is the largest object in memory
    return db.from_sequence(ranges, npartitions=max(1, min(len(ranges), workers)))


def _add(a: dict, b: dict) -> dict:
    return {
        k: (np.minimum(a[k], b[k]) if k == "lib_min" else np.maximum(a[k], b[k]) if k == "lib_max" else a[k] + b[k])
        for k in a
    }


def _moments(source: Source, batch_key: str | None, n_batches: int, ranges) -> dict:
    """Per batch and gene sum and sum of squares, per gene nonzeros, library histogram, of `ranges`."""
    g, batch = len(source.var), source.batch_codes(batch_key)
    acc = {
        "n": np.zeros(n_batches),
        "sum": np.zeros((n_batches, g)),
        "sumsq": np.zeros((n_batches, g)),
        "nnz": np.zeros(g, np.int64),
        "lib_hist": np.zeros(len(LIB_BINS), np.int64),
        "lib_min": np.array(np.inf),
        "lib_max": np.array(0.0),
        "lib_sum": np.array(0.0),
        "non_integer": np.array(0),
        "negative": np.array(0),
    }
    for lo, hi in ranges:
        x = source.read(lo, hi).astype(np.float64)
        b = batch[lo:hi]
        onehot = sp.csr_matrix((np.ones(hi - lo), (b, np.arange(hi - lo))), shape=(n_batches, hi - lo))
        acc["n"] += np.bincount(b, minlength=n_batches)
        acc["sum"] += (onehot @ x).toarray()
        sq = x.copy()
        sq.data **= 2
        acc["sumsq"] += (onehot @ sq).toarray()
        acc["nnz"] += np.bincount(x.indices[x.data != 0], minlength=g)
        lib = np.asarray(x.sum(1)).ravel()
        bins = np.maximum(np.searchsorted(LIB_BINS, lib, side="right") - 1, 0)  # negative totals: bin 0, refused later
        acc["lib_hist"] += np.bincount(bins, minlength=len(LIB_BINS))
        acc["lib_min"] = np.minimum(acc["lib_min"], lib.min())
        acc["lib_max"] = np.maximum(acc["lib_max"], lib.max())
        acc["lib_sum"] = acc["lib_sum"] + lib.sum()
        acc["non_integer"] = acc["non_integer"] + int(np.count_nonzero(x.data != np.floor(x.data)))
        acc["negative"] = acc["negative"] + int(np.count_nonzero(x.data < 0))
    return acc


def _clipped(source: Source, batch_key: str | None, clip: np.ndarray, ranges) -> dict:
    """Per batch and gene sum and sum of squares of min(count, clip[batch, gene]) (zeros stay zero)."""
    acc, batch = {"sum": np.zeros(clip.shape), "sumsq": np.zeros(clip.shape)}, source.batch_codes(batch_key)
    for lo, hi in ranges:
        x = source.read(lo, hi)
        rows = np.repeat(batch[lo:hi], np.diff(x.indptr))
        v = np.minimum(x.data.astype(np.float64), clip[rows, x.indices])
        flat = rows * clip.shape[1] + x.indices
        acc["sum"] += np.bincount(flat, weights=v, minlength=clip.size).reshape(clip.shape)
        acc["sumsq"] += np.bincount(flat, weights=v * v, minlength=clip.size).reshape(clip.shape)
    return acc


def _reduce(bag, per_partition, run: dict) -> dict:
    return bag.reduction(
        lambda part: per_partition(list(part)), lambda parts: reduce(_add, parts), split_every=4
    ).compute(**run)


def _n_workers(client) -> int:
    return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))


def _scheduler(scheduler, workers: int):
    """dask compute() arguments and the client to close: local threads, or a dask.distributed
    scheduler (an address such as tcp://host:8786, or a Client/LocalCluster object)."""
    if scheduler is None:
        return {"scheduler": "threads", "num_workers": workers}, None
    try:
        from distributed import Client
    except ImportError:
        raise MissingExtra("prepare --scheduler needs dask.distributed: pip install 'bigatlas[distributed]'") from None
    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    return {"scheduler": client}, (None if client is scheduler else client)


# -- seurat_v3 -----------------------------------------------------------------------------------


def _mean_var(n: np.ndarray, s: np.ndarray, sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ddof-1 variance per row of (batches × genes) sums."""
    n = n[:, None]
    mean = s / np.maximum(n, 1)
    var = (sq / np.maximum(n, 1) - mean**2) * n / np.maximum(n - 1, 1)
    return mean, np.maximum(var, 0)


MIN_FIT_GENES = 10


def seurat_v3_fit(mean: np.ndarray, var: np.ndarray, span: float = 0.3) -> np.ndarray | None:
    """Regularised standard deviation per gene of one batch: 10**(loess of log10 var on log10 mean)/2;
    None when the batch has too few variable genes for the fit (tiny batches)."""
    from skmisc.loess import loess

    fitted = np.zeros(len(mean))
    ok = var > 0
    if ok.sum() < MIN_FIT_GENES:  # loess needs points to fit (and crashes on none)
        return None
    try:
        model = loess(np.log10(mean[ok]), np.log10(var[ok]), span=span, degree=2)
        model.fit()
    except ValueError:  # skmisc refuses spans too small for the points it has
        return None
    fitted[ok] = model.outputs.fitted_values
    return np.sqrt(10**fitted)


def seurat_v3_rank(norm_var: np.ndarray, n_top: int) -> pd.DataFrame:
    """scanpy's seurat_v3 selection from normalised variances (batches × genes)."""
    ranks = np.argsort(np.argsort(-norm_var, axis=1), axis=1).astype(np.float32)
    nbatches = (ranks < n_top).sum(0)
    ranks[ranks >= n_top] = np.nan
    median = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    df = pd.DataFrame({"hvg_rank": median, "hvg_nbatches": nbatches, "variance_norm": norm_var.mean(0)})
    order = df.sort_values(["hvg_rank", "hvg_nbatches"], ascending=[True, False], na_position="last").index
    df["highly_variable"] = False
    df.loc[order[:n_top], "highly_variable"] = True
    df["hvg_order"] = -1
    df.loc[order[:n_top], "hvg_order"] = np.arange(min(n_top, len(df)))
    return df


# -- conversion ----------------------------------------------------------------------------------


def convert(
    source: Source,
    out,
    *,
    block: int,
    workers: int,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    shard_elems: int | None = None,
    overwrite: bool = False,
    log=print,
    run: dict | None = None,
) -> Path:
    """Write `source` as an AnnData-Zarr v3 store: windows of `workers` blocks read in parallel by
    dask, appended in order; the store appears under its name only when complete."""
    import dask

    ranges = _blocks(source.n_obs, block)
    read = dask.delayed(source.read, pure=True)
    with ZarrWriter(out, len(source.var), chunk_elems=chunk_elems, shard_elems=shard_elems, overwrite=overwrite) as w:
        for i in range(0, len(ranges), workers):
            window = dask.compute(
                *[read(lo, hi) for lo, hi in ranges[i : i + workers]],
                **(run or {"scheduler": "threads", "num_workers": workers}),
            )
            for m in window:
                w.append(m.indptr, m.indices, m.data)
        obs = source.obs_frame()
        obs = obs.set_axis(obs.index.astype(str))
        for col in obs.columns:  # strings as categoricals: compact, and what AnnData users expect
            if obs[col].dtype == object:
                obs[col] = obs[col].astype("category")
        path = w.finish(obs, source.var)
    log(f"wrote {out}: {source.n_obs} cells x {len(source.var)} genes")
    return path


# -- the command ---------------------------------------------------------------------------------


def prepare(
    data,
    out,
    *,
    batch_key: str | None = None,
    label_keys=(),
    obs_filter=None,
    layer=None,
    genes=None,
    n_top_genes: int = 2000,
    span: float = 0.3,
    convert_to=None,
    shard_elems: int | None = None,
    block_cells: int = 8192,
    workers: int = 2,
    overwrite: bool = False,
    unlabeled_categories=None,
    scheduler=None,
    log=print,
) -> dict:
    """Statistics (and optionally a converted store) of `data`; writes OUT/{stats.json, genes.csv,
    hvg.txt, library_size.png} and returns stats.json's content. `scheduler`: a dask.distributed
    scheduler address (or Client / LocalCluster) to run the passes on; unset: `workers` local threads."""
    run, client = _scheduler(scheduler, workers)
    try:
        return _prepare(data, out, batch_key, label_keys, obs_filter, layer, genes, n_top_genes, span, convert_to,
                        shard_elems, block_cells, workers, overwrite, unlabeled_categories, run, log)  # fmt: skip
    finally:
        if client is not None:
            client.close()


def _prepare(data, out, batch_key, label_keys, obs_filter, layer, genes, n_top_genes, span, convert_to, shard_elems,
             block_cells, workers, overwrite, unlabeled_categories, run, log) -> dict:  # fmt: skip
    t0 = time.perf_counter()
    out = Path(out)
    with warnings.catch_warnings():
        if convert_to:  # the notice that a slow .h5ad layout should be converted: being done
            warnings.filterwarnings("ignore", message=".*writes the fast layout")
        source = open_source(data, obs_filter, layer, genes)
    log(f"{data_name(data)}: {source.n_obs} cells x {len(source.var)} genes{' after filtering' if obs_filter else ''}")
    others = getattr(getattr(source, "store", None), "other_layers", ())  # where raw counts may be instead
    elsewhere = f" (--layer names another matrix: the data also has {', '.join(others)})" if others else ""
    if convert_to:
        convert(
            source,
            convert_to,
            block=block_cells,
            workers=workers,
            shard_elems=shard_elems,
            overwrite=overwrite,
            log=log,
            run=run,
        )
        source = StoreSource(str(convert_to))  # later passes read the fast copy (already filtered)
    n, g = source.n_obs, len(source.var)
    if batch_key:
        bcat = source.obs(batch_key)
        if (bcat.codes < 0).any():
            raise StoreError(f"obs column {batch_key!r} (batch key) is missing for {(bcat.codes < 0).sum()} cells")
        batch_names = [str(c) for c in bcat.categories]  # the passes read the codes where they run
    else:
        batch_names = ["all"]
    nb = len(batch_names)
    bag = _bag(n, block_cells, workers if "num_workers" in run else max(workers, _n_workers(run["scheduler"])))
    m = _reduce(bag, partial(_moments, source, batch_key, nb), run)
    if int(m["negative"]):
        raise StoreError(f"{data}: {int(m['negative'])} negative values; raw counts are required{elsewhere}")
    mean, var = _mean_var(np.array([n], float), m["sum"].sum(0, keepdims=True), m["sumsq"].sum(0, keepdims=True))
    table = pd.DataFrame(
        {"mean": mean[0], "variance": var[0], "detection_rate": m["nnz"] / n},
        index=pd.Index(feature_ids(source.var), name="feature_id"),
    )
    if "feature_name" in source.var:
        table.insert(0, "feature_name", source.var["feature_name"].astype(str).to_numpy())
    hvg_genes = []
    if n_top_genes:
        bmean, bvar = _mean_var(m["n"], m["sum"], m["sumsq"])
        reg_std = np.ones((nb, g))
        used = np.zeros(nb, bool)  # batches that take part: cells after filtering and a mean-variance fit
        for i in np.flatnonzero(m["n"] >= 2):  # a single cell has no variance
            fit = seurat_v3_fit(bmean[i], bvar[i], span)
            if fit is not None:
                reg_std[i], used[i] = fit, True
        if not used.any():
            raise StoreError(
                f"{data}: no batch of {batch_key or 'cells'} has {MIN_FIT_GENES} genes with nonzero "
                "variance; too few cells for highly variable genes (--n-top-genes 0 skips them)"
            )
        clip = reg_std * np.sqrt(m["n"])[:, None] + bmean
        c = _reduce(bag, partial(_clipped, source, batch_key, clip), run)
        nn = m["n"][:, None]
        norm_var = (nn * bmean**2 + c["sumsq"] - 2 * c["sum"] * bmean) / (np.maximum(nn - 1, 1) * reg_std**2)
        repeated = table.index.duplicated(keep=False)  # training cannot select such a gene by its id
        if repeated.any():
            ids = list(table.index[repeated].unique())
            warnings.warn(
                f"{int(repeated.sum())} genes of {data_name(data)} share a feature id ({', '.join(ids[:8])}"
                f"{' …' if len(ids) > 8 else ''}); they are left out of hvg.txt. Training refuses a repeated id: "
                "make the var ids unique (AnnData: var_names_make_unique()) to keep them",
                stacklevel=2,
            )
        ranking = np.where(repeated, -np.inf, norm_var)  # a repeated id ranks last, never among the top genes
        ranked = seurat_v3_rank(ranking[used], min(n_top_genes, g - int(repeated.sum())))
        ranked["variance_norm"] = norm_var[used].mean(0)  # genes.csv keeps every gene's own
        for col in ranked:
            table[col] = ranked[col].to_numpy()
        hvg_genes = list(table[table.hvg_order >= 0].sort_values("hvg_order").index)  # most variable first
    class_counts = {}
    for key in label_keys:
        cat = source.obs(key)
        labels = defined_labels(cat.codes, cat.categories, unlabeled_categories or UNLABELED)
        known = labels.codes[labels.codes >= 0]
        counts = np.bincount(known, minlength=len(labels.categories))
        class_counts[key] = {
            "classes": dict(zip(labels.categories, map(int, counts))),
            "unlabelled": int(len(labels) - len(known)),
        }
    stats = {
        "data": data_name(data),
        "obs_filter": obs_filter,
        "converted_to": str(convert_to) if convert_to else None,
        "n_obs": int(n),
        "n_vars": int(g),
        "batch_key": batch_key,
        "cells_per_batch": dict(zip(batch_names, map(int, m["n"]))),
        "non_integer_values": int(m["non_integer"]),
        "library_size": _library_summary(m, n),
        "class_counts": class_counts,
        "hvg": {
            "flavor": "seurat_v3",
            "n_top_genes": len(hvg_genes),
            "span": span,
            "file": "hvg.txt",
            "batches_skipped": [b for b, u in zip(batch_names, used) if not u],
        }
        if hvg_genes
        else None,
        "block_cells": block_cells,
        "workers": workers,
    }
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "genes.csv")
    if hvg_genes:
        (out / "hvg.txt").write_text("\n".join(hvg_genes) + "\n")
    library_size(m["lib_hist"][1:-1], LIB_BINS[1:], n, out / "library_size.png")
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    stats["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if stats["non_integer_values"]:
        log(
            f"warning: {stats['non_integer_values']} non-integer values: "
            f"seurat_v3 HVG and the ZINB model expect raw counts{elsewhere}"
        )
    log(
        f"wrote {out}/stats.json, genes.csv{', hvg.txt (' + str(len(hvg_genes)) + ' genes)' if hvg_genes else ''}"
        f" in {stats['seconds']}s, peak RSS {stats['peak_rss_mb']} MB"
    )
    return stats


def _library_summary(m: dict, n: int) -> dict:
    cdf = np.cumsum(m["lib_hist"]) / max(n, 1)
    upper = np.append(LIB_BINS[1:], np.inf)
    q = {
        f"q{int(p * 100):02d}": float(upper[np.searchsorted(cdf, p)]) for p in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
    }
    return {
        "mean": float(m["lib_sum"] / max(n, 1)),
        "min": float(m["lib_min"]),
        "max": float(m["lib_max"]),
        "quantiles_upper_bound": q,
        "zero_count_cells": int(m["lib_hist"][0]),
    }
