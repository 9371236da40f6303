"""Inference benchmark: I1 = embed-to-disk cells/s ÷ pure forward-pass cells/s on tensors already in
memory (same model, same batch size, side by side in one run), plus peak RSS and cells/s embedding a
1,000,000-cell store in a fresh process. Writes bench/results/infer.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import ensure_store, main, train_config, write_results
from bigatlas.infer import embed
from bigatlas.rundir import load_run
from bigatlas.train import make_accelerator, train
from loaders import open_store


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, default=100_000, help="cells for I1")
    p.add_argument("--genes", type=int, default=2000, help="genes")
    p.add_argument("--batch-size", type=int, default=4096, help="cells per forward pass on both sides")
    p.add_argument("--large", type=int, default=1_000_000, help="cells for the RSS run (0 to skip)")
    p.add_argument("--data-dir", default="bench/data", help="where stores are built or reused")
    p.add_argument("--out", default="bench/results/infer.json", help="JSON result file")


def _run_dir(data, data_dir) -> Path:
    """A small trained model (weights do not change the speed)."""
    run = Path(data_dir) / "bench_infer_run"
    if not (run / "model.safetensors").exists():
        shutil.rmtree(run, ignore_errors=True)
        cfg = train_config(data, 1, 512).override("train", max_steps=50)
        train(cfg, run, accelerator=make_accelerator(cfg))
    return run


def forward_in_memory(run, data, batch_size) -> float:
    model = load_run(run)
    x = torch.from_numpy(open_store(data).read(np.arange(open_store(data).n_obs)).to_scipy().toarray())
    with torch.no_grad():
        t = time.perf_counter()
        for lo in range(0, len(x), batch_size):
            z = model.module.latent(x[lo : lo + batch_size])
            model.module.label_probs(z)
        dt = time.perf_counter() - t
    return len(x) / dt


def embed_to_disk(run, data, out, batch_size) -> float:
    shutil.rmtree(out, ignore_errors=True)
    n = open_store(data).n_obs
    t = time.perf_counter()
    embed(run, data, out, batch_size=batch_size, progress=False)
    return n / (time.perf_counter() - t)


def embed_rss(run, data, out, batch_size) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import resource, time; from bigatlas.infer import embed; t = time.perf_counter(); "
        f"embed({str(run)!r}, {data!r}, {str(out)!r}, batch_size={batch_size}, progress=False); "
        "print('RESULT', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    _, rss_kb, seconds = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1].split()
    return {"peak_rss_mb": round(int(rss_kb) / 1024), "seconds": round(float(seconds), 1)}


def run(a) -> dict:
    data = ensure_store(a.data_dir, a.cells, a.genes)
    run_dir = _run_dir(data, a.data_dir)
    open_store(data).obs_codes("cell_type")  # one-time imports (anndata readers) outside the timings
    out = Path(a.data_dir) / "bench_infer_out.zarr"
    mem = forward_in_memory(run_dir, data, a.batch_size)
    disk = embed_to_disk(run_dir, data, out, a.batch_size)
    res = {
        "cells": a.cells,
        "genes": a.genes,
        "batch_size": a.batch_size,
        "forward_in_memory_cells_per_s": round(mem),
        "embed_to_disk_cells_per_s": round(disk),
        "I1_disk_over_memory": round(disk / mem, 3),
    }
    print(json.dumps(res), flush=True)
    if a.large:
        large = ensure_store(a.data_dir, a.large, a.genes)
        big = embed_rss(run_dir, large, out, a.batch_size)
        big["cells_per_s"] = round(a.large / big["seconds"])
        res[f"embed_{a.large}"] = big
    shutil.rmtree(out, ignore_errors=True)
    return write_results(res, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
