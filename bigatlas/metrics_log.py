"""Training metrics: running per-epoch sums of the loss terms, the epoch row reduced over processes,
and where it goes (metrics.csv, TensorBoard, one printed line), main process only."""

from __future__ import annotations

import csv
import os
import time

import torch

from .rundir import RunDir

FIELDS = [
    "epoch", "step", "loss", "recon", "kl", "gate", "label", "adversary", "align", "interaction", "val_loss",
    "val_recon", "val_kl", "val_gate", "val_label", "val_adversary", "val_align", "val_interaction", "kl_weight", "lr",
    "cells", "seconds", "cells_per_s",
]  # fmt: skip


def new_sums() -> dict:
    return {"t0": time.time(), "cells": 0}


class DeviceSums:
    """The epoch's running sums of a step's loss terms × cells, kept on the device (no host sync per
    step) and folded into the host dict of sums at sync points. Steps after a non-finite loss (the
    NaN guard's flag) add nothing."""

    def __init__(self):
        self.keys: list[str] | None = None
        self.vec: torch.Tensor | None = None
        self.weight_of: list[int] | None = None  # per key: 0 = × cells, 1 = × validation cells, 2 = as it is

    def add(self, terms: dict, skip: torch.Tensor) -> None:
        """A handful of device ops per step whatever the number of terms (a stack of the terms, one of their
        weights), not a few per term."""
        n = terms["n"]
        if self.keys is None:
            self.keys = list(terms)
            self.weight_of = [2 if k in ("n", "val_n") else 1 if k.startswith("val_") else 0 for k in self.keys]
        per = (n, terms.get("val_n", n), torch.ones_like(n))
        weights = torch.stack([per[w] for w in self.weight_of])  # one kernel; no index tensor to copy to a GPU
        v = (torch.stack([terms[k] for k in self.keys]) * weights).double()
        v = torch.where(skip > 0, torch.zeros_like(v), v)
        self.vec = v if self.vec is None else self.vec + v

    def fold(self, sums: dict, values: list[float] | None = None) -> None:
        """Add to `sums` and start again from zero: `values`, the running sums (`vec`) already read off the
        device with other values, or read here (one host sync)."""
        if self.vec is not None:
            for k, x in zip(self.keys, self.vec.tolist() if values is None else values):
                sums[k] = sums.get(k, 0.0) + x
            self.vec = None


def epoch_row(acc, sums: dict, epoch: int, step: int, kl_weight: float, lr: float) -> dict:
    """Per-cell means over all processes' training and validation cells of this epoch."""
    keys = sorted(k for k in sums if k not in ("t0", "cells"))
    local = torch.tensor(
        [float(sums[k]) for k in keys] + [float(sums["cells"])], dtype=torch.float64, device=acc.device
    )
    total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
    agg = dict(zip(keys + ["cells"], total.tolist()))
    row = {"epoch": epoch, "step": step}
    for prefix in ("", "val_"):
        n = agg.get(prefix + "n", 0.0)
        for k in ("loss", "recon", "kl", "gate", "label", "adversary", "align", "interaction"):
            if prefix + k in agg:
                row[prefix + k] = agg[prefix + k] / n if n else None
    seconds = time.time() - sums["t0"]
    row.update(
        kl_weight=kl_weight,
        lr=lr,
        cells=int(agg["cells"]),
        seconds=round(seconds, 2),
        cells_per_s=round(agg["cells"] / max(seconds, 1e-9)),
    )
    return row


def _keep_rows_before(path, epoch: int) -> list[str] | None:
    """Rewrite metrics.csv `path` without its rows of `epoch` and later; returns its columns (None: no header)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        path.unlink()
        return None
    at = rows[0].index("epoch")
    kept = [row for row in rows[1:] if row and int(row[at]) < epoch]
    if len(kept) < len(rows) - 1:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([rows[0], *kept])
        os.replace(tmp, path)
    return rows[0]


class MetricsLog:
    """metrics.csv (one row per epoch) and TensorBoard scalars, main process only."""

    def __init__(self, run: RunDir, main: bool, first_epoch: int = 0):
        """The run's rows from `first_epoch` on (a resumed run's) follow those before it in the file, which keeps
        its own columns (from before one was added); rows of that epoch and later already there (written by a
        run killed before that epoch's checkpoint) are dropped, so the file holds one row per epoch."""
        self.main = main
        self.path = run.metrics
        self.fields = FIELDS
        if self.main and self.path.exists():
            self.fields = _keep_rows_before(self.path, first_epoch) or FIELDS
        self.tb = None
        if self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.path / "tb"))
            except ImportError:  # tensorboard is optional for users who only want metrics.csv
                print("TensorBoard events skipped (pip install 'bigatlas[tensorboard]'); metrics.csv has them")

    def step(self, step: int, terms: dict, kl_weight: float) -> None:
        """The step's loss terms (numbers) to TensorBoard, every 50th step."""
        if self.tb is not None and step % 50 == 0:
            for k, v in terms.items():
                self.tb.add_scalar(f"step/{k}", v, step)
            self.tb.add_scalar("step/kl_weight", kl_weight, step)

    def epoch(self, row: dict) -> None:
        if not self.main:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: row.get(k) for k in self.fields})
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(f"epoch/{k}", v, row["epoch"])
        msg = ", ".join(
            f"{k} {row[k]:.4g}" for k in ("loss", "val_loss", "recon", "kl", "label") if row.get(k) is not None
        )
        print(f"epoch {row['epoch']}: {msg}, {row['cells_per_s']} cells/s", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
