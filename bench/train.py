"""Training benchmark, side by side in one run on the same synthetic data and architecture.

T1 = streaming epoch time (bigatlas train loop on the store) ÷ in-memory epoch time (the store as one
     scipy CSR matrix in memory, minibatches sliced from it; same model and step); also ÷ the same
     step over the epoch's inputs read beforehand (the compute alone: no feeding can beat it);
T2 = bigatlas training cells/s (--batch-size, by default the trainer's default) ÷ scatlasvae 1.0.5.9
     `fit` cells/s (--peer-batch-size, by default its own 128), in --t2-rounds rounds of the two back to
     back, the order alternating (a slow spell of the machine then falls on one pair, and on either side
     in turn): each round's ratio, and their median as T2; with bigatlas at the peer's batch size too, in
     the same run, when the two differ (skipped with the reason if scatlasvae is not installed); with
     --also-precision P also bigatlas with --mixed-precision P (T2_P); these two against the rounds'
     median scatlasvae cells/s;
M1 = peak RSS training a fixed number of steps on a 1,000,000-cell store ÷ on a 100,000-cell store;
O1 = framework overhead per step (ms): the trainer's own epoch loop (bigatlas.train._epoch: input
     conversion, NaN guard, running sums, syncs, progress bar, epoch-end row and checkpoint) over
     batches read beforehand, minus the bare forward + backward + clip + AdamW of the same batches,
     on a tiny model (16 hidden, 4 latent) where the overhead is visible.
Writes bench/results/train.json.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import KEYS, ensure_store, main, train_config, write_results
from bigatlas.batches import ModelInput, holdout_all
from bigatlas.bf16_linear import native_bf16
from bigatlas.checkpoint import Progress
from bigatlas.config import PRECISIONS, TrainConfig
from bigatlas.distributions import Counts
from bigatlas.optim import clip_gradients, torch_optimizer
from bigatlas.train import loss_weights, make_accelerator, set_up, train, train_step
from bigatlas.vocab import apply_lut
from loaders import open_store


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, default=50_000, help="cells for T1/T2")
    p.add_argument("--genes", type=int, default=2000, help="genes")
    p.add_argument(
        "--epochs", type=int, default=5,
        help="epochs timed per side (median reported: of 3, with the first paying the compile, the median was the "
        "slower of the other two)",
    )  # fmt: skip
    p.add_argument(
        "--compile-loss", default="on", choices=("on", "off"),
        help="likelihood compiled or not (on: what a default run of >= 5,000 steps does; the first epoch pays the "
        "compile)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=TrainConfig().batch_size,
        help="bigatlas's minibatch size (default: the trainer's default)",
    )  # fmt: skip
    p.add_argument(
        "--peer-batch-size", type=int, default=128,
        help="scatlasvae's minibatch size (its default); T2 is also reported with bigatlas at this size when the "
        "two differ",
    )  # fmt: skip
    p.add_argument(
        "--mixed-precision", default=TrainConfig().mixed_precision, choices=PRECISIONS,
        help="bigatlas's --mixed-precision (default: the trainer's)",
    )  # fmt: skip
    p.add_argument(
        "--also-precision", default=None, choices=PRECISIONS,
        help="also time the streaming epochs with this --mixed-precision in the same run (T2_<value>; e.g. no: "
        "float32 beside the default's bfloat16 products on a CPU with AMX)",
    )  # fmt: skip
    p.add_argument(
        "--t2-rounds", type=int, default=3,
        help="T2 rounds, each a bigatlas run and a scatlasvae fit of --epochs back to back (T2: the median ratio)",
    )  # fmt: skip
    p.add_argument("--m1-steps", type=int, default=300, help="steps per M1 run")
    p.add_argument("--o1-steps", type=int, default=300, help="steps per O1 loop")
    p.add_argument("--only", nargs="*", default=None, help="subset of: T1 T2 M1 O1")
    p.add_argument("--data-dir", default="bench/data", help="where stores are built or reused")
    p.add_argument("--out", default="bench/results/train.json", help="JSON result file")


def rate(cells: int, epoch_seconds: list[float]) -> dict:
    """Epoch seconds as timed and the cells/s of their median epoch."""
    return {
        "epoch_seconds": [round(s, 2) for s in epoch_seconds],
        "cells_per_s": round(cells / float(np.median(epoch_seconds))),
    }


def bench_config(data, a, epochs=None, batch_size=None, precision=None):
    """The benchmark's training config with this run's flags (likelihood compiled or not, precision)."""
    return train_config(
        data, epochs or a.epochs, batch_size or a.batch_size, compile_loss=a.compile_loss,
        mixed_precision=precision or a.mixed_precision,
    )  # fmt: skip


def streaming_epochs(data, a, run_dir, batch_size=None, precision=None) -> list[float]:
    """Epoch seconds of the real `bigatlas train` loop (metrics.csv)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = bench_config(data, a, batch_size=batch_size, precision=precision)
    train(cfg, run_dir, accelerator=make_accelerator(cfg))
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def in_memory_epochs(data, a, run_dir) -> list[float]:
    """The trainer's own step (bigatlas.train.train_step) on the store held in memory as one scipy CSR
    matrix, minibatches sliced from it in a fresh random order per epoch (what an in-memory AnnData
    trainer does): what streaming costs beside the same model, optimizer and step."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = bench_config(data, a)
    s = set_up(cfg, run_dir, False, make_accelerator(cfg), None)
    store = open_store(data)
    x = store.read(np.arange(store.n_obs)).to_scipy().astype(np.float32).tocsr()
    to = s.to_input
    codes = torch.from_numpy(np.stack([apply_lut(to.batch_luts[k], store.obs_codes(k)[0]) for k in to.batch_keys], 1))
    labels = torch.from_numpy(np.stack([apply_lut(to.label_luts[k], store.obs_codes(k)[0]) for k in to.label_keys], 1))
    val = holdout_all(store.n_obs, cfg.train.val_fraction, cfg.train.seed)
    progress = Progress()
    s.model.train()
    seconds = []
    for epoch in range(a.epochs):
        perm = torch.randperm(store.n_obs)
        t = time.perf_counter()
        for lo in range(0, store.n_obs, a.batch_size):
            idx = perm[lo : lo + a.batch_size]
            rows = x[idx.numpy()]
            csr = torch.sparse_csr_tensor(
                torch.from_numpy(rows.indptr).long(), torch.from_numpy(rows.indices).long(),
                torch.from_numpy(rows.data), rows.shape,
            )  # fmt: skip
            inp = ModelInput(Counts.from_sparse_csr(csr), codes[idx], labels[idx], idx.numpy(), val[idx.numpy()])
            kl, lw = loss_weights(s.cfg.train, epoch, epoch + lo / store.n_obs, s.max_epochs)
            train_step(s, progress, inp, kl, lw)
        seconds.append(time.perf_counter() - t)
    return seconds


class Replay:
    """One epoch of the stream's batches, read beforehand and replayed: the loop without the reader."""

    def __init__(self, batches):
        self.batches, self.epoch, self.consumed = batches, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for j in range(self.consumed, len(self.batches)):
            self.consumed = j + 1
            yield self.batches[j]
        self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}


def prebuilt_epoch(data, a, run_dir) -> float:
    """Seconds of train_step over one epoch of the stream's own ModelInputs, read beforehand: the
    model's compute alone, the floor under any way of feeding it."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = bench_config(data, a)
    s = set_up(cfg, run_dir, False, make_accelerator(cfg), None)
    s.stream.set_epoch(0)
    inputs = [s.to_input(b) for b in s.stream]
    progress = Progress()
    s.model.train()
    t = time.perf_counter()
    for inp in inputs:
        train_step(s, progress, inp, s.cfg.train.kl_weight, s.cfg.train.label_weight)
    return time.perf_counter() - t


def loop_overhead(data, a, run_dir) -> dict:
    """O1: ms per step of the real epoch loop minus the bare model step, same batches, tiny model."""
    from bigatlas.config import ModelConfig
    from bigatlas.metrics_log import MetricsLog
    from bigatlas.train import _epoch

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = bench_config(data, a, epochs=100)
    cfg = type(cfg)(model=ModelConfig(hidden=(16,), n_latent=4), train=cfg.train, data=cfg.data)
    s = set_up(cfg, run_dir, False, make_accelerator(cfg), None)
    s.stream.set_epoch(0)
    s.stream = Replay([b for _, b in zip(range(a.o1_steps), s.stream)])
    inputs = [s.to_input(b) for b in s.stream.batches]
    model, opt, t = s.model, torch_optimizer(s.optimizer), s.cfg.train  # the torch AdamW itself
    loop, bare = [], []
    for rep in range(5):
        progress, log = Progress(epoch=rep), MetricsLog(s.run, True)
        start = time.perf_counter()
        _epoch(s, progress, log, False)
        loop.append(time.perf_counter() - start)
        log.close()
        start = time.perf_counter()
        for inp in inputs:
            mask = torch.from_numpy(~inp.val)
            out = model(inp.counts, inp.codes, inp.labels, cell_mask=mask, eval_mask=~mask, kl_weight=t.kl_weight)
            out.total.backward()
            clip_gradients(model.parameters(), opt, t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        bare.append(time.perf_counter() - start)
    steps = len(inputs)
    return {
        "steps": steps,
        "loop_ms_per_step": round(1e3 * min(loop) / steps, 3),  # fastest of 5 repetitions each
        "bare_ms_per_step": round(1e3 * min(bare) / steps, 3),
        "O1_overhead_ms_per_step": round(1e3 * (min(loop) - min(bare)) / steps, 3),
    }


def scatlasvae_epochs(data, a) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import anndata as ad
    import scatlasvae

    adata = ad.read_zarr(data)
    adata.X = adata.X.astype(np.int32)  # scatlasvae wants integer counts for ZINB
    model = scatlasvae.model.scAtlasVAE(adata=adata, batch_key=KEYS["batch_key"], label_key="cell_type", device="cpu")
    t = time.perf_counter()
    model.fit(max_epoch=a.epochs, n_per_batch=a.peer_batch_size)
    dt = time.perf_counter() - t
    return {"seconds": round(dt, 2), "cells_per_s": round(adata.n_obs * a.epochs / dt)}


def t2_rounds(data, a, run_dir) -> dict:
    """T2's rounds: a bigatlas run and a scatlasvae fit back to back, bigatlas first in even rounds and
    second in odd ones; each round's cells/s and ratio, T2 = the median ratio with its range, and the
    rounds' median scatlasvae cells/s (what the other T2 variants divide by)."""
    import scatlasvae  # noqa: F401  (ImportError before any timing: the caller reports T2 skipped)

    rounds = []
    for r in range(a.t2_rounds):
        order = ("bigatlas", "scatlasvae") if r % 2 == 0 else ("scatlasvae", "bigatlas")
        sides = {}
        for side in order:
            if side == "bigatlas":
                sides[side] = rate(a.cells, streaming_epochs(data, a, run_dir))
            else:
                sides[side] = scatlasvae_epochs(data, a)
        ratio = sides["bigatlas"]["cells_per_s"] / sides["scatlasvae"]["cells_per_s"]
        rounds.append({"first": order[0], **sides, "T2": round(ratio, 3)})
        print(json.dumps({"T2_round": rounds[-1]}), flush=True)
    ratios = [r["T2"] for r in rounds]
    peer = [r["scatlasvae"]["cells_per_s"] for r in rounds]
    return {
        "T2_rounds": rounds,
        "T2_bigatlas_over_scatlasvae": round(float(np.median(ratios)), 3),
        "T2_range": [min(ratios), max(ratios)],
        "scatlasvae": {"cells_per_s": round(float(np.median(peer))), "rounds": len(rounds)},
        "bigatlas_cells_per_s_median": round(float(np.median([r["bigatlas"]["cells_per_s"] for r in rounds]))),
    }


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
    wanted = set(a.only or ["T1", "T2", "M1", "O1"])
    data = ensure_store(a.data_dir, a.cells, a.genes)
    res: dict = {
        "cells": a.cells,
        "genes": a.genes,
        "batch_size": a.batch_size,
        "peer_batch_size": a.peer_batch_size,
        "epochs": a.epochs,
        "threads": torch.get_num_threads(),
        "compile_loss": a.compile_loss,
        "mixed_precision": a.mixed_precision,
        "cpu_bf16_units": native_bf16(),  # what auto means on this CPU: bf16 where True
    }
    run_dir = Path(a.data_dir) / "bench_train_run"
    if "T1" in wanted:
        stream = streaming_epochs(data, a, run_dir)
        res["bigatlas_stream"] = rate(a.cells, stream)
        print(json.dumps({"bigatlas_stream": res["bigatlas_stream"]}), flush=True)
        mem = in_memory_epochs(data, a, run_dir)
        res["in_memory_csr"] = rate(a.cells, mem)
        res["T1_stream_over_memory_epoch_time"] = round(float(np.median(stream) / np.median(mem)), 3)
        floor = prebuilt_epoch(data, a, run_dir)
        res["prebuilt_inputs_epoch_seconds"] = round(floor, 2)
        res["T1_stream_over_prebuilt_inputs"] = round(float(np.median(stream)) / floor, 3)
        print(json.dumps({"in_memory_csr": res["in_memory_csr"]}), flush=True)
    if "T2" in wanted:
        try:
            res.update(t2_rounds(data, a, run_dir))
            peer = res["scatlasvae"]["cells_per_s"]
            if a.batch_size != a.peer_batch_size:  # the same batch size on both sides, in the same run
                same = rate(a.cells, streaming_epochs(data, a, run_dir, a.peer_batch_size))
                res[f"bigatlas_stream_batch_{a.peer_batch_size}"] = same
                res[f"T2_at_batch_{a.peer_batch_size}"] = round(same["cells_per_s"] / peer, 3)
            if a.also_precision:
                other = rate(a.cells, streaming_epochs(data, a, run_dir, precision=a.also_precision))
                res[f"bigatlas_stream_{a.also_precision}"] = other
                res[f"T2_{a.also_precision}"] = round(other["cells_per_s"] / peer, 3)
        except ImportError as e:
            res["scatlasvae"] = {"skipped": f"not installed: {e} (see README, Benchmarks)"}
            print(json.dumps({"scatlasvae": res["scatlasvae"]}), flush=True)
    if "O1" in wanted:
        res["loop_overhead"] = loop_overhead(data, a, run_dir)
        print(json.dumps({"loop_overhead": res["loop_overhead"]}), flush=True)
    if "M1" in wanted:
        small = ensure_store(a.data_dir, 100_000, a.genes)
        large = ensure_store(a.data_dir, 1_000_000, a.genes)
        rss = {n: peak_rss_training(p, a.m1_steps, a.batch_size, run_dir) for n, p in (("100k", small), ("1M", large))}
        res["peak_rss_mb"] = {k: round(v) for k, v in rss.items()}
        res["M1_rss_1M_over_100k"] = round(rss["1M"] / rss["100k"], 3)
        print(json.dumps({"peak_rss_mb": res["peak_rss_mb"]}), flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return write_results(res, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
