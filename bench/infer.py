"""Inference benchmark, side by side in one run on the same cells, model and batch size:

I1 = embed-to-disk cells/s ÷ the serial bound of its two halves, each measured alone:
     1 / (1/decode + 1/forward), decode = reading and checking the chunks from the store, forward =
     the embedding's own computation on chunks already in memory (posterior means, label head, kNN
     transfer). On CPU the halves share the cores, so overlap cannot hide either: I1 = 1 means
     writing, threads and bookkeeping cost nothing. I1_old = embed ÷ forward alone (the first
     definition, kept for comparison). Plus peak RSS and cells/s embedding a 1,000,000-cell store in
     a fresh process. Writes bench/results/infer.json."""

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


def chunks(data, chunk_size):
    store = open_store(data)
    return store, [np.arange(lo, min(lo + chunk_size, store.n_obs)) for lo in range(0, store.n_obs, chunk_size)]


def decode_alone(data, chunk_size) -> tuple[float, list]:
    """Cells/s reading and checking the chunks as embed does (its read(k)); the chunks are kept."""
    from loaders.csr import check_counts

    store, parts = chunks(data, chunk_size)
    t = time.perf_counter()
    out = []
    for rows in parts:
        m = store.read(rows)
        check_counts(m, store, integer=True, positions=rows)
        out.append(m)
    return store.n_obs / (time.perf_counter() - t), out


def forward_alone(run, matrices, batch_size) -> float:
    """Cells/s of embed's computation on chunks in memory: latent means and the label transfer."""
    from bigatlas.infer import _latent
    from bigatlas.reference import read_reference
    from bigatlas.transfer import LabelTransfer

    model = load_run(run)
    module = model.module.eval()
    transfer = LabelTransfer(module, model.vocab, read_reference(run))
    t = time.perf_counter()
    for m in matrices:
        z = _latent(module, m, batch_size, torch.device("cpu"))
        transfer(z)
    return sum(m.n_rows for m in matrices) / (time.perf_counter() - t)


def embed_to_disk(run, data, out, batch_size, chunk_size) -> float:
    shutil.rmtree(out, ignore_errors=True)
    n = open_store(data).n_obs
    t = time.perf_counter()
    embed(run, data, out, batch_size=batch_size, chunk_size=chunk_size, progress=False)
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
    chunk = 16384  # embed's default chunk, passed to it explicitly below
    decode, matrices = decode_alone(data, chunk)
    forward = forward_alone(run_dir, matrices, a.batch_size)
    del matrices
    disk = embed_to_disk(run_dir, data, out, a.batch_size, chunk)
    bound = 1 / (1 / decode + 1 / forward)
    res = {
        "cells": a.cells,
        "genes": a.genes,
        "batch_size": a.batch_size,
        "decode_alone_cells_per_s": round(decode),
        "forward_alone_cells_per_s": round(forward),
        "serial_bound_cells_per_s": round(bound),
        "embed_to_disk_cells_per_s": round(disk),
        "I1_embed_over_serial_bound": round(disk / bound, 3),
        "I1_old_embed_over_forward": round(disk / forward, 3),
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
