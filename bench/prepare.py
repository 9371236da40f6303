"""Prepare benchmark: `bigatlas prepare` (out-of-core, dask) beside scanpy in memory (read the store,
per-gene mean/variance, batch-aware seurat_v3 HVGs), each in a fresh process on the same store, at
two store sizes: seconds, peak RSS, HVG overlap. Writes bench/results/prepare.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import main, write_results
from bigatlas.synth import synth

SCANPY = """
import json, resource, sys, time
import anndata as ad, numpy as np, scanpy as sc
t = time.perf_counter()
a = ad.read_zarr(sys.argv[1])
mean = np.asarray(a.X.mean(0)).ravel()
sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=int(sys.argv[2]), batch_key="dataset_id")
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "hvg": list(a.var.feature_id[a.var.highly_variable].astype(str))}))
"""

OURS = """
import json, sys, time
from bigatlas.prepare import prepare
t = time.perf_counter()
s = prepare(sys.argv[1], sys.argv[3], batch_key="dataset_id", label_keys=["cell_type"], n_top_genes=int(sys.argv[2]),
            log=lambda *_: None)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": s["peak_rss_mb"],
                  "hvg": open(sys.argv[3] + "/hvg.txt").read().split()}))
"""


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, nargs="+", default=[100_000, 400_000], help="store sizes")
    p.add_argument("--genes", type=int, default=2000, help="genes")
    p.add_argument("--n-top-genes", type=int, default=1000, help="HVGs to select")
    p.add_argument("--data-dir", default="bench/data", help="where stores are built or reused")
    p.add_argument("--out", default="bench/results/prepare.json", help="JSON result file")


def _run(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(a) -> dict:
    rows = []
    for n in a.cells:
        data = Path(a.data_dir) / f"prepare_{n}x{a.genes}.zarr"
        if not data.exists():
            synth(data, n, a.genes, "zarr", seed=0)
        ours = _run(OURS, data, a.n_top_genes, Path(a.data_dir) / f"prepare_{n}_out")
        ref = _run(SCANPY, data, a.n_top_genes)
        rows.append(
            {
                "cells": n,
                "genes": a.genes,
                "bigatlas_seconds": round(ours["seconds"], 2),
                "scanpy_seconds": round(ref["seconds"], 2),
                "speedup": round(ref["seconds"] / ours["seconds"], 2),
                "bigatlas_peak_rss_mb": round(ours["peak_rss_mb"]),
                "scanpy_peak_rss_mb": round(ref["peak_rss_mb"]),
                "memory_ratio": round(ref["peak_rss_mb"] / ours["peak_rss_mb"], 2),
                "hvg_overlap": round(len(set(ours["hvg"]) & set(ref["hvg"])) / len(ref["hvg"]), 4),
            }
        )
    res = {
        "benchmark": "prepare: gene statistics + batch-aware seurat_v3 HVGs, fresh process each",
        "command": " ".join(["python -m bench.prepare", *sys.argv[1:]]),
        "runs": rows,
        "bigatlas_rss_growth_mb": rows[-1]["bigatlas_peak_rss_mb"] - rows[0]["bigatlas_peak_rss_mb"],
        "scanpy_rss_growth_mb": rows[-1]["scanpy_peak_rss_mb"] - rows[0]["scanpy_peak_rss_mb"],
    }
    return write_results(res, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
