"""Accelerate training loop: streaming, multi-process, checkpointed, resumable mid-epoch.

Run with `accelerate launch [--multi_gpu --num_processes N] scripts/train.py …` or
`torchrun --standalone --nproc_per_node N scripts/train.py …`. Model and optimizer go through
`accelerator.prepare`; the stream does not (it partitions by rank itself). Validation cells are
held out by a hash of their store position and never enter the training loss; each minibatch's
validation rows are scored in the same forward pass, so validation costs no extra read.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loaders import CellStream, open_store

from .config import RunConfig
from .distributions import Counts
from .model import ScAtlasVAE
from .vocab import Vocab, align_genes, apply_lut

FORMAT_VERSION = 1
RESUMABLE_CHANGES = ("max_epochs", "max_steps", "early_stopping_patience")


def fault_point(name: str, step: int) -> None:
    """Fault injection for tests: BIGATLAS_FAULT="<name>:<step>[@<rank>]" SIGKILLs this process there
    (on every rank, or only on the given one)."""
    if _fault_matches(name, step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _fault_matches(name: str, step: int) -> bool:
    spec = os.environ.get("BIGATLAS_FAULT", "")
    where, _, rank = spec.partition("@")
    return where == f"{name}:{step}" and (not rank or rank == os.environ.get("RANK", "0"))


def holdout_mask(positions: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """True for validation cells: splitmix64 of (position, seed) below `fraction` of 2**64."""
    if fraction <= 0:
        return np.zeros(len(positions), dtype=bool)
    with np.errstate(over="ignore"):
        z = np.asarray(positions, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


@dataclass
class Progress:
    """Loop position and running sums: checkpointed with the model so a resume continues exactly."""

    epoch: int = 0
    step: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    sums: dict | None = None

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        self.__dict__.update(d)


class RunDir:
    """RUN_DIR layout: config.json, vocab.json, model.safetensors, checkpoints/, metrics.csv, tb/, plots."""

    def __init__(self, path):
        self.path = Path(path)
        self.ckpt = self.path / "checkpoints"

    def latest(self) -> Path | None:
        pointer = self.ckpt / "latest"
        if not pointer.exists():
            return None
        target = self.ckpt / pointer.read_text().strip()
        return target if target.is_dir() else None

    def publish(self, tmp: Path, name: str, keep: int) -> None:
        """Rename a fully written checkpoint into place, then point `latest` at it (atomically)."""
        final = self.ckpt / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = self.ckpt / "latest.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, self.ckpt / "latest")
        done = sorted(p for p in self.ckpt.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)
    check_world(acc.num_processes)
    return acc


def check_world(num_processes: int) -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process per launch: N silent copies."""
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) != num_processes:
        raise RuntimeError(
            f"WORLD_SIZE={world} but Accelerate started {num_processes} process(es): every "
            "process would train its own copy. On CPU use `accelerate launch --multi_gpu "
            "--num_processes N` or `torchrun --nproc_per_node N` (not --cpu)"
        )


def build_model(vocab: Vocab, cfg: RunConfig) -> ScAtlasVAE:
    return ScAtlasVAE(
        len(vocab.genes),
        [len(c) for c in vocab.batch_categories.values()],
        [len(c) for c in vocab.label_classes.values()],
        cfg.model,
        [vocab.class_counts[k] for k in vocab.label_classes],
    )


def train(
    cfg: RunConfig, run_dir, *, resume: bool = False, accelerator=None, trace_cells: bool = False, surgery=None
) -> Path:
    """Train and write RUN_DIR; returns the path of model.safetensors. `surgery` (query.Surgery)
    starts from a reference model with grown embedding tables instead of a fresh model."""
    from accelerate.utils import set_seed

    acc = accelerator or make_accelerator(cfg)
    run = RunDir(run_dir)
    t_cfg, d_cfg = cfg.train, cfg.data
    set_seed(t_cfg.seed)
    store = open_store(d_cfg.data, obs_filter=d_cfg.obs_filter, layer=d_cfg.layer)
    if acc.is_main_process:
        genes = f", training on {len(d_cfg.genes)} listed genes" if d_cfg.genes else ""
        print(f"{d_cfg.data}: {store.n_obs} cells x {store.n_vars} genes after filtering{genes}", flush=True)
    # in slices: the hash's uint64 temporaries for 50M cells at once would be gigabytes
    step = 1 << 20
    val_all = np.concatenate(
        [
            holdout_mask(np.arange(lo, min(lo + step, store.n_obs)), t_cfg.val_fraction, t_cfg.seed)
            for lo in range(0, store.n_obs, step)
        ]
    )
    vocab = _vocab(run, store, cfg, resume, ~val_all, surgery)
    colmap = align_genes(store, vocab.genes)[0] if surgery is not None else None
    stream = CellStream(
        store,
        batch_size=t_cfg.batch_size,
        seed=t_cfg.seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        num_workers=t_cfg.num_workers,
        genes=vocab.genes,
        colmap=colmap,
        obs_keys=(*d_cfg.batch_keys, *d_cfg.label_keys),
        validate="finite" if d_cfg.allow_non_integer else "counts",
    )
    batch_luts, label_luts = vocab.batch_luts(store), vocab.label_luts(store, d_cfg.label_keys)
    model = build_model(vocab, cfg)
    if surgery is not None:
        surgery.apply(model, vocab)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=t_cfg.lr, weight_decay=t_cfg.weight_decay
    )
    model, optimizer = acc.prepare(model, optimizer)
    progress = Progress()
    if resume and run.latest() is not None:
        _restore(acc, run.latest(), stream, progress)
        if acc.is_main_process:
            print(
                f"resumed from {run.latest().name}: epoch {progress.epoch}, step {progress.step}, "
                f"{stream.consumed} minibatches into the epoch",
                flush=True,
            )
    max_epochs = t_cfg.epochs_for(int((~val_all).sum()))
    warmup = t_cfg.warmup_epochs(max_epochs)
    steps_per_epoch = len(stream)
    logger = _Logger(run, acc, resume)
    stopped_early = False
    while progress.epoch < max_epochs and not stopped_early:
        epoch = progress.epoch
        if stream.epoch != epoch or stream.consumed == 0:
            stream.set_epoch(epoch)
        if progress.sums is None:
            progress.sums = {"t0": time.time(), "cells": 0}
        model.train()
        trace = [] if trace_cells else None
        bar = _bar(acc, steps_per_epoch, stream.consumed, epoch)
        for batch in stream:
            step_in_epoch = stream.consumed
            counts = Counts.from_sparse_csr(batch.x, acc.device)
            positions = batch.index.numpy()
            val = holdout_mask(positions, t_cfg.val_fraction, t_cfg.seed)
            codes = torch.stack(
                [torch.from_numpy(apply_lut(batch_luts[k], batch.obs[k].numpy())) for k in d_cfg.batch_keys], 1
            ).to(acc.device)
            labels = (
                torch.stack(
                    [torch.from_numpy(apply_lut(label_luts[k], batch.obs[k].numpy())) for k in d_cfg.label_keys], 1
                ).to(acc.device)
                if d_cfg.label_keys
                else None
            )
            frac_epoch = epoch + step_in_epoch / max(steps_per_epoch, 1)
            kl_weight = t_cfg.kl_weight * min(1.0, frac_epoch / warmup) if warmup > 0 else t_cfg.kl_weight
            label_weight = t_cfg.label_weight if epoch >= t_cfg.label_start_epoch else 0.0
            train_mask = torch.from_numpy(~val).to(acc.device)
            with acc.autocast():
                out = model(
                    counts,
                    codes,
                    labels,
                    cell_mask=train_mask,
                    eval_mask=~train_mask,
                    kl_weight=kl_weight,
                    eval_kl_weight=t_cfg.kl_weight,
                    gate_weight=t_cfg.gate_weight,
                    label_weight=label_weight,
                )
            finite = bool(torch.isfinite(out.total)) and not _fault_matches("nan_loss", progress.step + 1)
            bad = torch.tensor([0.0 if finite else 1.0], device=acc.device)
            if acc.num_processes > 1:  # every rank stops together, none waits on a dead collective
                bad = acc.reduce(bad, reduction="sum")
            if bad.item() > 0:
                _checkpoint(acc, run, progress, stream, t_cfg.keep_checkpoints)  # weights not yet updated
                raise FloatingPointError(
                    f"non-finite loss at epoch {epoch}, step {progress.step + 1} "
                    f"(terms: { {k: round(float(v), 4) for k, v in out.terms.items()} }); the last good state "
                    f"is saved as {run.latest()}"
                )
            acc.backward(out.total)
            if t_cfg.grad_clip:
                acc.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            _accumulate(progress.sums, out.terms, out.n_cells)
            progress.sums["cells"] += len(counts)
            if trace is not None:
                trace.append(positions[~val])
            if bar is not None:
                bar.update(1)
                if progress.step % 25 == 0:
                    bar.set_postfix(loss=f"{float(out.terms['loss']):.4g}", kl_w=f"{kl_weight:.2f}", refresh=False)
            logger.step(progress.step, out.terms, kl_weight)
            if (
                t_cfg.checkpoint_every_steps
                and progress.step % t_cfg.checkpoint_every_steps == 0
                and stream.consumed < steps_per_epoch
            ):
                _checkpoint(acc, run, progress, stream, t_cfg.keep_checkpoints)
            fault_point("after_step", progress.step)
            if t_cfg.max_steps is not None and progress.step >= t_cfg.max_steps:
                stopped_early = True
                break
        if bar is not None:
            bar.close()
        if stopped_early:  # max_steps reached mid-epoch: no epoch row, no end-of-epoch checkpoint
            break
        if trace is not None:
            (run.path / "trace").mkdir(parents=True, exist_ok=True)
            np.save(
                run.path / "trace" / f"rank{acc.process_index}_epoch{epoch}.npy",
                np.concatenate(trace) if trace else np.zeros(0, np.int64),
            )
        row = _epoch_row(acc, progress, epoch, kl_weight, optimizer)
        logger.epoch(row)
        if row.get("val_loss") is not None and t_cfg.early_stopping_patience:
            if row["val_loss"] < progress.best_val - 1e-6:
                progress.best_val, progress.bad_epochs = row["val_loss"], 0
            else:
                progress.bad_epochs += 1
                stopped_early = progress.bad_epochs >= t_cfg.early_stopping_patience
        progress.epoch, progress.sums = epoch + 1, None
        _checkpoint(acc, run, progress, stream, t_cfg.keep_checkpoints)
    logger.close()
    return _finish(acc, run, model, stopped_early, trace_cells)


def _vocab(run: RunDir, store, cfg: RunConfig, resume: bool, train_mask, surgery=None) -> Vocab:
    path = run.path / "vocab.json"
    if resume and path.exists():
        saved = json.loads((run.path / "config.json").read_text()).get("config", {})
        now = json.loads(json.dumps(cfg.to_dict()))
        for c in (saved, now):  # how long to train may change on resume; nothing that shapes the run
            for key in RESUMABLE_CHANGES:
                c.get("train", {}).pop(key, None)
        if saved != now:
            diff = sorted(f"{sec}.{k}" for sec in now for k in now[sec] if saved.get(sec, {}).get(k) != now[sec][k])
            raise ValueError(
                f"{run.path}/config.json differs from this run's settings ({', '.join(diff)}); resume "
                "with the same configuration or start a new RUN_DIR"
            )
        if _is_main():  # record the new length of the run
            _write_config(run, cfg)
        return Vocab.load(path)
    vocab = surgery.vocab(store) if surgery is not None else Vocab.from_store(store, cfg.data, train_mask)
    run.path.mkdir(parents=True, exist_ok=True)
    if _is_main():
        vocab.save(path)
        _write_config(run, cfg)
    return vocab


def _is_main() -> bool:
    import accelerate

    return accelerate.PartialState().is_main_process


def _write_config(run: RunDir, cfg: RunConfig) -> None:
    (run.path / "config.json").write_text(
        json.dumps({"format_version": FORMAT_VERSION, "config": cfg.to_dict()}, indent=2) + "\n"
    )


def _accumulate(sums: dict, terms: dict, n_train: int) -> None:
    """Running sums of per-cell means × cells, for training and (val_*) validation terms."""
    n_val = float(terms.get("val_n", 0.0))
    for k, v in terms.items():
        if k != "val_n":
            sums[k] = sums.get(k, 0.0) + float(v) * (n_val if k.startswith("val_") else n_train)
    sums["n"] = sums.get("n", 0) + n_train
    sums["val_n"] = sums.get("val_n", 0.0) + n_val


def _epoch_row(acc, progress: Progress, epoch: int, kl_weight: float, optimizer) -> dict:
    """Per-cell means over all processes' training and validation cells of this epoch."""
    s = progress.sums
    keys = sorted(k for k in s if k not in ("t0", "cells"))
    local = torch.tensor([float(s[k]) for k in keys] + [float(s["cells"])], dtype=torch.float64, device=acc.device)
    total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
    agg = dict(zip(keys + ["cells"], total.tolist()))
    row = {"epoch": epoch, "step": progress.step}
    for prefix in ("", "val_"):
        n = agg.get(prefix + "n", 0.0)
        for k in ("loss", "recon", "kl", "gate", "label"):
            if prefix + k in agg:
                row[prefix + k] = agg[prefix + k] / n if n else None
    seconds = time.time() - s["t0"]
    row.update(
        kl_weight=kl_weight,
        lr=optimizer.param_groups[0]["lr"],
        cells=int(agg["cells"]),
        seconds=round(seconds, 2),
        cells_per_s=round(agg["cells"] / max(seconds, 1e-9)),
    )
    return row


def _checkpoint(acc, run: RunDir, progress: Progress, stream, keep: int) -> None:
    """Model and optimizer through Accelerate (safetensors / tensors only); loop position, stream
    position and this process's torch RNG in bigatlas_rank<r>.json — no pickle of ours to trust."""
    name = f"step-{progress.step:09d}"
    tmp = run.ckpt / f".tmp-{name}"
    if acc.is_main_process:
        run.ckpt.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    state = {
        "progress": progress.state_dict(),
        "stream": stream.state_dict(),
        "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    (tmp / f"bigatlas_rank{acc.process_index}.json").write_text(json.dumps(state))
    fault_point("checkpoint_written", progress.step)
    acc.wait_for_everyone()
    if acc.is_main_process:
        run.publish(tmp, name, keep)
    acc.wait_for_everyone()


def _restore(acc, path: Path, stream, progress: Progress) -> None:
    try:
        acc.load_state(str(path))  # weights_only loads: a checkpoint file carrying code is refused
        state = json.loads((path / f"bigatlas_rank{acc.process_index}.json").read_text())
    except Exception as e:
        raise ValueError(
            f"checkpoint {path} cannot be loaded safely ({type(e).__name__}: {e}); restore it or start a new RUN_DIR"
        ) from None
    progress.load_state_dict(state["progress"])
    stream.load_state_dict(state["stream"])
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda_rng"]]
        )


def _finish(acc, run: RunDir, model, stopped_early: bool, trace: bool) -> Path:
    from safetensors.torch import save_file

    acc.wait_for_everyone()
    if trace:  # each rank's own weights, to check that data-parallel ranks stayed identical
        params = torch.cat([p.detach().cpu().double().ravel() for p in acc.unwrap_model(model).parameters()])
        np.save(run.path / "trace" / f"rank{acc.process_index}_params.npy", params.numpy())
    out = run.path / "model.safetensors"
    if acc.is_main_process:
        state = {k: v.detach().cpu().contiguous() for k, v in acc.unwrap_model(model).state_dict().items()}
        tmp = run.path / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        os.replace(tmp, out)
        from .plots import loss_curves

        loss_curves(run.path / "metrics.csv", run.path / "loss_curves.png")
        print(f"wrote {out}{' (stopped early)' if stopped_early else ''}", flush=True)
    acc.wait_for_everyone()
    return out


def _bar(acc, total: int, start: int, epoch: int):
    if not acc.is_main_process:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit="batch", leave=False, mininterval=2.0)


class _Logger:
    """metrics.csv (one row per epoch) and TensorBoard scalars, main process only."""

    def __init__(self, run: RunDir, acc, resume: bool):
        self.main = acc.is_main_process
        self.path = run.path / "metrics.csv"
        self.tb = None
        if self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.path / "tb"))
            except ImportError:  # tensorboard is optional for users who only want metrics.csv
                self.tb = None

    def step(self, step: int, terms: dict, kl_weight: float) -> None:
        if self.tb is not None and step % 50 == 0:
            for k, v in terms.items():
                self.tb.add_scalar(f"step/{k}", float(v), step)
            self.tb.add_scalar("step/kl_weight", kl_weight, step)

    def epoch(self, row: dict) -> None:
        if not self.main:
            return
        fields = [
            "epoch",
            "step",
            "loss",
            "recon",
            "kl",
            "gate",
            "label",
            "val_loss",
            "val_recon",
            "val_kl",
            "val_gate",
            "val_label",
            "kl_weight",
            "lr",
            "cells",
            "seconds",
            "cells_per_s",
        ]
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: row.get(k) for k in fields})
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
