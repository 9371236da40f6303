"""Training benchmark, side by side in one run on the same synthetic data and architecture.

T1 = streaming epoch time (bigatlas train loop on the store) ÷ in-memory epoch time (dense tensors
     preloaded, same model and step);
T2 = bigatlas training cells/s ÷ scatlasvae 1.0.5.9 `fit` cells/s (skipped with the reason if
     scatlasvae is not installed);
M1 = peak RSS training a fixed number of steps on a 1,000,000-cell store ÷ on a 100,000-cell store.
Writes bench/results/train.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

KEYS = dict(batch_key="dataset_id", covariate_keys=("donor_id",), label_keys=("cell_type",))


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, default=50_000, help="cells for T1/T2")
    p.add_argument("--genes", type=int, default=2000, help="genes")
    p.add_argument("--epochs", type=int, default=2, help="epochs timed per side (median reported)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size on both sides")
    p.add_argument("--m1-steps", type=int, default=300, help="steps per M1 run")
    p.add_argument("--only", nargs="*", default=None, help="subset of: T1 T2 M1")
    p.add_argument("--data-dir", default="bench/data", help="where stores are built or reused")
    p.add_argument("--out", default="bench/results/train.json", help="JSON result file")


def ensure_store(data_dir, cells, genes) -> str:
    from .synth import synth

    path = Path(data_dir) / f"train_{cells}x{genes}.zarr"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        synth(path, cells, genes, "zarr", seed=0)
        print(f"built {path} in {time.perf_counter() - t:.0f}s", flush=True)
    return str(path)


def config(data, epochs, batch_size, **train):
    from .config import DataConfig, RunConfig, TrainConfig

    return RunConfig(
        train=TrainConfig(max_epochs=epochs, batch_size=batch_size, checkpoint_every_steps=0, **train),
        data=DataConfig(data=data, **KEYS),
    )


def streaming_epochs(data, a, run_dir) -> list[float]:
    """Epoch seconds of the real `bigatlas train` loop (metrics.csv)."""
    import csv
    import shutil

    from .train import make_accelerator, train

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = config(data, a.epochs, a.batch_size)
    train(cfg, run_dir, accelerator=make_accelerator(cfg))
    return [float(r["seconds"]) for r in csv.DictReader(open(Path(run_dir) / "metrics.csv"))]


def in_memory_epochs(data, a) -> list[float]:
    """The same model and step on dense tensors preloaded in memory, shuffled per epoch."""
    from loaders import open_store

    from .distributions import Counts
    from .train import build_model, holdout_mask
    from .vocab import Vocab, apply_lut

    cfg = config(data, a.epochs, a.batch_size)
    store = open_store(data)
    vocab = Vocab.from_store(store, cfg.data)
    x = torch.from_numpy(store.read(np.arange(store.n_obs)).to_scipy().toarray())
    codes = torch.from_numpy(
        np.stack([apply_lut(lut, store.obs_codes(k)[0]) for k, lut in vocab.batch_luts(store).items()], 1)
    )
    labels = torch.from_numpy(
        np.stack([apply_lut(lut, store.obs_codes(k)[0]) for k, lut in vocab.label_luts(store).items()], 1)
    )
    val = torch.from_numpy(holdout_mask(np.arange(store.n_obs), cfg.train.val_fraction))
    torch.manual_seed(0)
    model = build_model(vocab, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    seconds = []
    for _epoch in range(a.epochs):
        perm = torch.randperm(store.n_obs)
        t = time.perf_counter()
        for lo in range(0, store.n_obs, a.batch_size):
            idx = perm[lo : lo + a.batch_size]
            counts = Counts.from_dense(x[idx])
            out = model(counts, codes[idx], labels[idx], cell_mask=~val[idx], eval_mask=val[idx])
            out.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t)
    return seconds


def scatlasvae_epochs(data, a) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import anndata as ad
    import scatlasvae

    adata = ad.read_zarr(data)
    adata.X = adata.X.astype(np.int32)  # scatlasvae wants integer counts for ZINB
    model = scatlasvae.model.scAtlasVAE(adata=adata, batch_key=KEYS["batch_key"], label_key="cell_type", device="cpu")
    t = time.perf_counter()
    model.fit(max_epoch=a.epochs, n_per_batch=a.batch_size)
    dt = time.perf_counter() - t
    return {"seconds": round(dt, 2), "cells_per_s": round(adata.n_obs * a.epochs / dt)}


def peak_rss_training(data, steps, batch_size, run_dir) -> float:
    """Peak RSS (MiB) of a fresh process training `steps` steps on `data`."""
    code = (
        "import resource, sys; from bigatlas.cli import main; "
        f"main(['train', '--data', {data!r}, '--batch-key', 'dataset_id', '--covariate-keys', 'donor_id', "
        f"'--label-keys', 'cell_type', '--out', {str(run_dir)!r}, '--max-steps', '{steps}', "
        f"'--batch-size', '{batch_size}', '--checkpoint-every-steps', '0']); "
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS ")][-1]
    return int(line.split()[1]) / 1024


def run(a) -> dict:
    import shutil

    wanted = set(a.only or ["T1", "T2", "M1"])
    data = ensure_store(a.data_dir, a.cells, a.genes)
    res: dict = {
        "cells": a.cells,
        "genes": a.genes,
        "batch_size": a.batch_size,
        "epochs": a.epochs,
        "threads": torch.get_num_threads(),
    }
    run_dir = Path(a.data_dir) / "bench_train_run"
    if wanted & {"T1", "T2"}:
        stream = streaming_epochs(data, a, run_dir)
        res["bigatlas_stream"] = {"epoch_seconds": stream, "cells_per_s": round(a.cells / float(np.median(stream)))}
        print(json.dumps({"bigatlas_stream": res["bigatlas_stream"]}), flush=True)
    if "T1" in wanted:
        mem = in_memory_epochs(data, a)
        res["in_memory_dense"] = {
            "epoch_seconds": [round(s, 2) for s in mem],
            "cells_per_s": round(a.cells / float(np.median(mem))),
        }
        res["T1_stream_over_memory_epoch_time"] = round(float(np.median(stream) / np.median(mem)), 3)
        print(json.dumps({"in_memory_dense": res["in_memory_dense"]}), flush=True)
    if "T2" in wanted:
        try:
            res["scatlasvae"] = scatlasvae_epochs(data, a)
            res["T2_bigatlas_over_scatlasvae"] = round(
                res["bigatlas_stream"]["cells_per_s"] / res["scatlasvae"]["cells_per_s"], 3
            )
        except ImportError as e:
            res["scatlasvae"] = {"skipped": f"not installed: {e} (see README, Benchmarks)"}
        print(json.dumps({"scatlasvae": res["scatlasvae"]}), flush=True)
    if "M1" in wanted:
        small = ensure_store(a.data_dir, 100_000, a.genes)
        large = ensure_store(a.data_dir, 1_000_000, a.genes)
        rss = {n: peak_rss_training(p, a.m1_steps, a.batch_size, run_dir) for n, p in (("100k", small), ("1M", large))}
        res["peak_rss_mb"] = {k: round(v) for k, v in rss.items()}
        res["M1_rss_1M_over_100k"] = round(rss["1M"] / rss["100k"], 3)
        print(json.dumps({"peak_rss_mb": res["peak_rss_mb"]}), flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    from .bench_loader import write_results

    return write_results(res, a.out)
