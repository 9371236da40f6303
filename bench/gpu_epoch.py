"""GPU check: one 1,000,000-cell training epoch on one GPU, fp32 vs bf16 autocast.

Default: the model's own forward/backward/AdamW step, with per-step host syncs (a NaN check's bool/.item()
and float() of every logged term, as the trainer once did) vs none (terms summed on the device). Counts are
synthetic CSR minibatches already on the GPU (a pool reused round-robin), so this measures the step and
its syncs, not the loader. `python -m bench.gpu_epoch --out bench/results/gpu_epoch.json`.

`--trainer`: the trainer's own epoch loop instead (bigatlas.train._epoch: each batch's ModelInput and its
copy to the device, the step with the NaN guard, clipping, fused AdamW and the weight average, the host
sync every SYNC_EVERY steps, the epoch's checkpoint) over a pool of a generated store's batches replayed
to 1,000,000 cells. Every host sync is counted (torch.cuda.set_sync_debug_mode) and the lines that made
them are named (`sync_sites`), so a run shows where a step still waits on the device.
`python -m bench.gpu_epoch --trainer --batch-sizes 128 1024 --out bench/results/gpu_trainer.json`."""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from bigatlas.config import ModelConfig, TrainConfig
from bigatlas.distributions import Counts
from bigatlas.model import VAEModule
from bigatlas.optim import make_optimizer


def batches(n_pool: int, batch: int, genes: int, nnz_per_cell: int, n_batch_cats: int, n_classes: int, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    out = []
    for _ in range(n_pool):
        crow = torch.arange(0, (batch + 1) * nnz_per_cell, nnz_per_cell, device=dev)
        cols = torch.sort(torch.randint(0, genes, (batch, nnz_per_cell), device=dev, generator=g), 1).values
        cols = cols.reshape(-1)  # repeats inside a row are rare and harmless for timing
        vals = torch.randint(1, 20, (batch * nnz_per_cell,), device=dev, generator=g).float()
        x = torch.sparse_csr_tensor(crow, cols, vals, (batch, genes))
        codes = torch.randint(0, n_batch_cats, (batch, 2), device=dev, generator=g)
        labels = torch.randint(-1, n_classes, (batch, 1), device=dev, generator=g)
        out.append((Counts.from_sparse_csr(x), codes, labels))
    return out


def epoch(model, opt, pool, n_cells: int, batch: int, bf16: bool, sync_per_step: bool) -> dict:
    steps = -(-n_cells // batch)
    sums = torch.zeros(8, device="cuda")
    syncs = 0
    torch.cuda.synchronize()
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")  # counts every host sync, in both modes
        for i in range(steps):
            counts, codes, labels = pool[i % len(pool)]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = model(counts, codes, labels, kl_weight=1.0)
            if sync_per_step:  # what bigatlas.train.train_step + metrics_log.accumulate do today
                finite = bool(torch.isfinite(out.total))
                if not finite or torch.tensor([0.0], device="cuda").item() > 0:
                    raise FloatingPointError("non-finite loss")
                for v in out.terms.values():
                    float(v)
            else:  # device-side: a skipped update on NaN would be torch.where; sums stay on the GPU
                sums[: len(out.terms)] += torch.stack([v.float().reshape(()) for v in out.terms.values()])
            out.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    sums.sum().item()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"seconds": round(dt, 2), "cells_per_s": round(steps * batch / dt), "steps": steps,
            "host_syncs_per_step_seen": round(syncs / steps, 2)}  # fmt: skip


@contextmanager
def counted_syncs(on: bool):
    """Counter of host syncs by the Python line that made them (file:line), filled when the block ends;
    empty where `on` is false (no CUDA: nothing to count)."""
    sites: Counter = Counter()
    if not on:
        yield sites
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(0)
            for w in caught:
                if "synchroniz" in str(w.message):
                    parts = Path(w.filename).parts
                    sites[f"{'/'.join(parts[-2:])}:{w.lineno}"] += 1


def trainer_epoch(a, batch: int, precision: str) -> dict:
    """Seconds, cells/s and host syncs of bigatlas.train._epoch over a.cells cells at this batch size and
    precision ('no' or 'bf16'), after a short compiling epoch; a pool of the store's batches replayed."""
    from accelerate.state import AcceleratorState

    from bench.common import ensure_store, train_config
    from bench.train import Replay
    from bigatlas.checkpoint import Progress
    from bigatlas.metrics_log import MetricsLog
    from bigatlas.train import _epoch, make_accelerator, set_up

    cuda = torch.cuda.is_available()
    data = ensure_store(a.data_dir, a.store_cells, a.genes)
    run_dir = Path(a.data_dir) / "gpu_trainer_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = train_config(data, 1, batch, compile_loss=a.compile_loss, mixed_precision=precision)
    AcceleratorState._reset_state(reset_partial_state=True)  # each row its own precision, in one process
    s = set_up(cfg, run_dir, False, make_accelerator(cfg), None)
    s.stream.set_epoch(0)
    pool = [b for _, b in zip(range(a.pool), s.stream)]

    progress = Progress()

    def epoch(steps: int, number: int) -> float:
        s.stream = Replay([pool[i % len(pool)] for i in range(steps)])
        progress.epoch, log = number, MetricsLog(s.run, s.acc.is_main_process)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _epoch(s, progress, log, False)
        if cuda:
            torch.cuda.synchronize()
        log.close()
        return time.perf_counter() - start

    epoch(min(20, a.cells // batch + 1), 0)  # compiles the loss, warms the allocator
    steps, before = -(-a.cells // batch), progress.step
    with counted_syncs(cuda) as sites:
        seconds = epoch(steps, 1)
    row = {"mode": "trainer", "batch_size": batch, "precision": precision, "seconds": round(seconds, 2),
           "cells_per_s": round(steps * batch / seconds), "steps": steps,
           "optimizer_steps": progress.step - before}  # fmt: skip
    if cuda:
        row["host_syncs_per_step_seen"] = round(sum(sites.values()) / steps, 3)
        row["sync_sites"] = dict(sites.most_common(10))
        try:
            row["backward_sync"] = backward_sync(s, pool[0])
        except Exception as e:  # the timing row stands without it
            row["backward_sync"] = f"not found: {type(e).__name__}: {e}"[:300]
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def backward_sync(s, batch) -> str:
    """The backward op that makes the host wait, with the forward line that made it: one training forward
    under anomaly mode (which keeps each op's forward traceback), then its backward with host syncs raised
    as errors. 'none' when the backward makes no sync."""
    inp = s.to_input(batch)
    with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly(check_nan=False):
        warnings.simplefilter("always")
        with s.acc.autocast():
            out = s.model(inp.counts, inp.codes, inp.labels)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out.total.backward()
            return "none"
        except RuntimeError as e:
            error = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
            for p in s.params:
                p.grad = None
    traces = [str(w.message) for w in caught if "Traceback of forward call" in str(w.message)]
    lines = traces[-1].splitlines() if traces else []
    node = [ln for ln in lines[:1] if ln.startswith("Error detected in")]  # names the backward op
    frames = [f"{ln.strip()}: {nxt.strip()}" for ln, nxt in zip(lines, lines[1:]) if "bigatlas/" in ln]
    return " | ".join([error[:200], *node, *frames[-4:]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--nnz-per-cell", type=int, default=650)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--compile-loss", default="on", choices=("on", "off"), help="likelihood through torch.compile")
    p.add_argument(
        "--out", default=None, help="default: bench/results/gpu_epoch.json (gpu_trainer.json with --trainer)"
    )
    p.add_argument("--trainer", action="store_true", help="the trainer's own epoch loop (see above)")
    p.add_argument("--store-cells", type=int, default=20_000, help="--trainer: cells of the generated store")
    p.add_argument("--pool", type=int, default=64, help="--trainer: batches read from it and replayed")
    p.add_argument("--data-dir", default="bench/data")
    p.add_argument(
        "--gpu-dense-max", type=int, default=None,
        help="bigatlas.model.GPU_DENSE_MAX for this run: cells × genes up to which the first layer reads a batch "
        "dense (0: always the sparse matmul, as before 2026-12-04)",
    )  # fmt: skip
    a = p.parse_args()
    if a.gpu_dense_max is not None:
        import bigatlas.model

        bigatlas.model.GPU_DENSE_MAX = a.gpu_dense_max
    if a.trainer:
        return run_trainer(a)
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cells": a.cells, "genes": a.genes,
           "nnz_per_cell": a.nnz_per_cell, "runs": []}  # fmt: skip
    for batch in a.batch_sizes:
        pool = batches(32, batch, a.genes, a.nnz_per_cell, 6, 12, dev)
        for bf16 in (p == "bf16" for p in a.precisions):
            for sync in (True, False):
                torch.manual_seed(0)
                model = VAEModule(a.genes, [6, 6], [12], ModelConfig(), [[10] * 12]).to(dev)
                model.compiled_loss = a.compile_loss == "on"  # compiled in the warm-up epoch
                opt = make_optimizer(model.parameters(), TrainConfig())  # the trainer's AdamW
                row = {"batch_size": batch, "bf16": bf16, "host_syncs_per_step": sync, "compile_loss": a.compile_loss}
                try:
                    epoch(model, opt, pool, 20 * batch, batch, bf16, sync)  # warm-up (kernels, allocator)
                    row.update(epoch(model, opt, pool, a.cells, batch, bf16, sync))
                except Exception as e:  # recorded, the other configurations still run
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(json.dumps(row), flush=True)
                res["runs"].append(row)
    with open(a.out or "bench/results/gpu_epoch.json", "w") as f:
        json.dump(res, f, indent=2)


def run_trainer(a) -> None:
    import bigatlas.model as model_module

    res = {"mode": "trainer", "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "cells": a.cells, "genes": a.genes, "store_cells": a.store_cells,
           "pool": a.pool, "compile_loss": a.compile_loss, "gpu_dense_max": model_module.GPU_DENSE_MAX,
           "runs": []}  # fmt: skip
    for batch in a.batch_sizes:
        for precision in a.precisions:
            try:
                row = trainer_epoch(a, batch, "bf16" if precision == "bf16" else "no")
            except Exception as e:  # recorded, the other configurations still run
                row = {"batch_size": batch, "precision": precision, "error": f"{type(e).__name__}: {e}"[:500]}
            print(json.dumps(row), flush=True)
            res["runs"].append(row)
    with open(a.out or "bench/results/gpu_trainer.json", "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
