"""Census-scale memory, by simulation: a virtual store of N cells (no disk; each cell 3 nonzero counts
over a few genes, two obs columns) stands in for the Census, so everything sized by the number of
cells shows: obs codes, the hold-out mask, the epoch plan and the stream.

S1 (per rank): RSS growth of opening the stream (world 8, rank 0; and world 1) and streaming 50
     minibatches, at 1M, 10M, 50M and 100M cells, each in a fresh process.
S2 = peak RSS of one whole training epoch (tiny model, so the cells dominate) on 10M ÷ on 1M cells.
Writes bench/results/scale.json.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd

from bench.common import main, write_results
from loaders.csr import CSR
from loaders.store import Store


class VirtualStore(Store):
    """n_obs cells x n_vars genes computed on read: cell i has counts 1, 2, 3 at genes (7i + j) % n_vars;
    obs 'batch' (8 categories) and 'cell_type' (20), built in slices so no cells-sized int64 exists."""

    def __init__(self, n_obs: int, n_vars: int = 32):
        super().__init__(pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]))
        self.uri, self.n_obs, self.n_vars = f"virtual:{n_obs}", int(n_obs), int(n_vars)
        self.block_rows, self.blocks_per_request = 4096, 16

    @property
    def obs_columns(self) -> list[str]:
        return ["batch", "cell_type"]

    def _read_obs(self, column):
        k = 8 if column == "batch" else 20
        codes = np.empty(self.n_obs, np.int8)
        for lo in range(0, self.n_obs, 1 << 22):
            hi = min(self.n_obs, lo + (1 << 22))
            codes[lo:hi] = (np.arange(lo, hi, dtype=np.int64) * 2654435761 >> 7) % k
        return pd.Categorical.from_codes(codes, categories=[f"{column}{i}" for i in range(k)])

    def read(self, rows: np.ndarray) -> CSR:
        rows = np.asarray(rows, dtype=np.int64)
        indices = ((rows[:, None] * 7 + np.arange(3)) % self.n_vars).ravel().astype(np.int32)
        data = np.tile(np.array([1, 2, 3], np.float32), len(rows))
        return CSR(np.arange(0, 3 * len(rows) + 1, 3, dtype=np.int64), indices, data, self.n_vars)

    def store_rows(self, rows):
        return rows

    def obs_names(self, rows):
        return np.asarray([f"c{i}" for i in rows], dtype=object)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def stream_child(n: int, world: int) -> dict:
    """In a fresh process: RSS growth of a rank's stream over n cells, and of 50 of its minibatches."""
    from bigatlas.batches import holdout_all
    from loaders import CellStream

    base = rss_mb()
    store = VirtualStore(n)
    t = time.perf_counter()
    mask = holdout_all(n, 0.05, 0)  # what training holds per cell besides the stream
    s = CellStream(store, batch_size=1024, seed=0, rank=0, world_size=world, obs_keys=["batch", "cell_type"])
    n_batches = len(s)
    opened = rss_mb() - base
    it = iter(s)
    for _ in range(50):
        next(it)
    it.close()
    return {
        "cells": n,
        "world_size": world,
        "minibatches_per_rank": n_batches,
        "rss_growth_open_mb": round(opened, 1),
        "rss_growth_after_50_batches_mb": round(rss_mb() - base, 1),
        "bytes_per_cell": round((rss_mb() - base) * 2**20 / n, 2),
        "seconds": round(time.perf_counter() - t, 2),
        "holdout_mask_mb": round(mask.nbytes / 2**20, 1),
    }


def train_child(n: int, run_dir: str) -> dict:
    """In a fresh process: one whole training epoch on n virtual cells; peak RSS."""
    from bigatlas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from bigatlas.train import train

    cfg = RunConfig(
        model=ModelConfig(hidden=(32,), n_latent=4),
        train=TrainConfig(max_epochs=1, batch_size=4096, checkpoint_every_steps=0, num_workers=1),
        data=DataConfig(data=f"virtual:{n}", batch_key="batch", label_keys=("cell_type",)),
    )
    t = time.perf_counter()
    train(cfg, run_dir, data=VirtualStore(n))
    return {
        "cells": n,
        "seconds": round(time.perf_counter() - t, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.scale", "--child", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, nargs="*", default=[1_000_000, 10_000_000, 50_000_000, 100_000_000])
    p.add_argument("--train-cells", type=int, nargs="*", default=[1_000_000, 10_000_000])
    p.add_argument("--out", default="bench/results/scale.json", help="JSON result file")
    p.add_argument("--child", nargs="*", default=None, help="internal: run one measurement")


def run(a) -> dict:
    if a.child is not None:
        kind, n, extra = a.child[0], int(a.child[1]), a.child[2]
        out = stream_child(n, int(extra)) if kind == "stream" else train_child(n, extra)
        print(json.dumps(out))
        return out
    import tempfile

    res = {"command": "python -m bench.scale", "stream": [], "train_epoch": []}
    for world in (8, 1):
        for n in a.cells:
            r = child(["stream", str(n), str(world)])
            res["stream"].append(r)
            print(json.dumps(r), flush=True)
    for n in a.train_cells:
        with tempfile.TemporaryDirectory() as d:
            r = child(["train", str(n), d + "/run"])
        res["train_epoch"].append(r)
        print(json.dumps(r), flush=True)
    peaks = {r["cells"]: r["peak_rss_mb"] for r in res["train_epoch"]}
    if 1_000_000 in peaks and 10_000_000 in peaks:
        res["S2_peak_rss_10M_over_1M"] = round(peaks[10_000_000] / peaks[1_000_000], 3)
    return write_results(res, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
