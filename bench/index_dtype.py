"""Column index dtype of the Zarr stores bigatlas writes: int16 indices with an int64 indptr (the layout before
2026-12-07) against int32 indices with an int32 indptr (since), on the same synthetic atlas written twice.

Reports per layout: bytes of X/indices on disk, the loader's cells/s over full epochs (the layouts alternate,
median of --epochs), and whether the matrix anndata reads from the store is one scikit-learn's sparse functions
take (scanpy's PCA calls them). Ratio I1 = int32 cells/s ÷ int16 cells/s.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import main, write_results
from loaders import CellStream, open_store

LAYOUTS = {"int16": np.int16, "int32": np.int32}


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, default=100_000, help="cells in the atlas")
    p.add_argument("--genes", type=int, default=2000, help="genes in the atlas")
    p.add_argument("--data-dir", default="bench/data", help="where the two stores are built or reused")
    p.add_argument("--epochs", type=int, default=5, help="epochs per layout; the median is reported")
    p.add_argument("--out", default="bench/results/index_dtype.json")


def _write(path: Path, cells: int, genes: int, dtype) -> None:
    """The atlas with this index dtype (the writer's indptr follows the indices while the nonzeros fit)."""
    from bigatlas import write_store
    from bigatlas.synth import synth

    if path.exists():
        return
    default = write_store.index_dtype_for
    write_store.index_dtype_for = lambda n_vars: dtype
    try:
        synth(path, cells, genes, "zarr", seed=0)
    finally:
        write_store.index_dtype_for = default


def _scikit_learn_takes(path: Path) -> bool:
    import anndata as ad
    from sklearn.utils.sparsefuncs import mean_variance_axis

    try:
        mean_variance_axis(ad.read_zarr(path).X, axis=0)
        return True
    except (TypeError, ValueError):
        return False


def run(a) -> dict:
    paths = {k: Path(a.data_dir) / f"index_{k}_{a.cells}x{a.genes}.zarr" for k in LAYOUTS}
    for k, dtype in LAYOUTS.items():
        _write(paths[k], a.cells, a.genes, dtype)
    res = {}
    for k, p in paths.items():
        x = open_store(str(p))
        res[k] = {
            "indices_dtype": str(x._indices.dtype),
            "indices_bytes_on_disk": int(subprocess.check_output(["du", "-sb", str(p / "X" / "indices")]).split()[0]),
            "scikit_learn_takes_it": _scikit_learn_takes(p),
            "cells_per_s": [],
        }
    for epoch in range(a.epochs):
        for k, p in paths.items():
            stream = CellStream(open_store(str(p)), batch_size=512, seed=epoch)
            t = time.perf_counter()
            n = sum(len(b.index) for b in stream)
            res[k]["cells_per_s"].append(round(n / (time.perf_counter() - t)))
    for r in res.values():
        r["median_cells_per_s"] = float(np.median(r["cells_per_s"]))
    ratios = {
        "I1_cells_per_s": round(res["int32"]["median_cells_per_s"] / res["int16"]["median_cells_per_s"], 3),
        "indices_bytes": round(res["int32"]["indices_bytes_on_disk"] / res["int16"]["indices_bytes_on_disk"], 3),
    }
    command = "python -m bench.index_dtype " + " ".join(sys.argv[1:])
    meta = {"cells": a.cells, "genes": a.genes, "epochs": a.epochs}
    return write_results({"command": command, "config": meta, **res, "ratios": ratios}, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
