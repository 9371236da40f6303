"""Accelerate training loop: streaming, multi-process, checkpointed, resumable mid-epoch.

Run with `accelerate launch [--multi_gpu --num_processes N] -m bigatlas.train …` or
`torchrun --standalone --nproc_per_node N -m bigatlas.train …` (scripts/train.py is the same entry
point as a file; `bigatlas train` runs one process). Model and optimizer go through
`accelerator.prepare`; the stream does not (it partitions by rank itself). Validation cells are
held out by a hash of their store position and never enter the training loss; each minibatch's
validation rows are scored in the same forward pass, so validation costs no extra read.

`train()` reads top to bottom: set-up (store, vocab, stream, model), resume, the epoch loop
(batch → step → log → checkpoint), finish (weights, loss curves).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from loaders import CellStream, open_store

from . import dropped_labels
from .batches import ModelInput, ToModelInput, holdout_all
from .bf16_linear import native_bf16
from .checkpoint import Progress, restore_checkpoint, save_checkpoint
from .config import RunConfig, TrainConfig
from .device_copy import to_device
from .ema import WeightAverage
from .errors import LaunchError, reported
from .faults import Faults
from .guard import SYNC_EVERY, NanGuard
from .lock import OutputLock
from .metrics_log import DeviceSums, MetricsLog, epoch_row, new_sums
from .norm_refresh import refresh_batch_norms
from .optim import TINY_EVERY, clip_gradients, make_optimizer, zero_tiny_moments
from .preempt import Preempted, Preemption
from .process_group import leave_at_exit
from .rundir import RunDir, build_model
from .vocab import Vocab, unlabeled_report


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    # bf16 on the CPU: the wide layers' products (bf16_linear), not autocast; auto on a GPU: float32
    autocast = not cpu and cfg.train.mixed_precision == "bf16"
    acc = Accelerator(cpu=cpu, mixed_precision="bf16" if autocast else "no")
    leave_at_exit()
    check_world(acc.num_processes)
    return acc


def check_world(num_processes: int) -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process: N asked for, one silent copy.
    Caught from WORLD_SIZE when the launcher sets it, else from the launcher's own command line."""
    world = os.environ.get("WORLD_SIZE")
    asked = int(world) if world is not None else _launcher_processes()
    if asked is not None and asked != num_processes:
        raise LaunchError(
            f"{asked} processes were asked for but Accelerate started {num_processes} process(es): every "
            "process would train its own copy. On CPU use `accelerate launch --multi_gpu "
            "--num_processes N` or `torchrun --nproc_per_node N` (not --cpu)"
        )


def _launcher_processes() -> int | None:
    """--num_processes of an `accelerate launch` that started this process (None when it did not)."""
    import psutil

    try:
        cmd = psutil.Process(os.getppid()).cmdline()
    except (psutil.Error, OSError):
        return None
    head = cmd[:4]
    if not any("accelerate" in c for c in head) or not any(c == "launch" or c.endswith(".launch") for c in head):
        return None
    for flag in ("--num_processes", "--num-processes"):
        if flag in cmd[:-1]:
            return int(cmd[cmd.index(flag) + 1])
    return None


def loss_weights(t: TrainConfig, epoch: int, frac_epoch: float, max_epochs: int) -> tuple[float, float]:
    """(KL weight, label weight) at a point of the run: the KL weight warms up linearly over
    t.warmup_epochs(max_epochs) epochs; the label loss applies from t.label_start_epoch on."""
    warmup = t.warmup_epochs(max_epochs)
    kl = t.kl_weight * min(1.0, frac_epoch / warmup) if warmup > 0 else t.kl_weight
    return kl, (t.label_weight if epoch >= t.label_start_epoch else 0.0)


@dataclass
class Session:
    """What set-up builds and the loop uses."""

    cfg: RunConfig
    acc: object
    run: RunDir
    stream: CellStream
    to_input: ToModelInput
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    max_epochs: int
    faults: Faults
    preempt: Preemption
    guard: NanGuard
    data: object = None  # the AnnData trained on in memory (None: cfg.data.data is opened)
    surgery: object = None
    average: WeightAverage | None = None  # of the weights, written at the end (ema_decay > 0)
    params: list | None = None  # the trained parameters, listed once (walking the modules every step: ~20 µs)
    floor_epochs: int = 0  # early stopping does not stop before (TrainConfig.floor_epochs)


def train(
    cfg: RunConfig,
    run_dir,
    *,
    resume: bool = False,
    overwrite: bool = False,
    accelerator=None,
    trace_cells: bool = False,
    surgery=None,
    data=None,
) -> Path:
    """Train and write RUN_DIR; returns the path of model.safetensors. Without `resume`, a RUN_DIR that holds an
    earlier run is refused unless `overwrite`, which removes that run's outputs first. `surgery` (query.Surgery)
    starts from a reference model with grown embedding tables instead of a fresh model. `data` (an
    AnnData object, in memory or backed) is read in place of cfg.data.data, which then only names it."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in RUN_DIR and --overwrite replaces it: pass one of them")
    acc = accelerator or make_accelerator(cfg)
    lock = OutputLock(Path(run_dir) / ".lock", f"RUN_DIR {run_dir}") if acc.is_main_process else nullcontext()
    with lock, Preemption() as preempt, flush_denormals():  # one writer per RUN_DIR; SIGTERM acted on per step
        if not resume:
            _start_afresh(RunDir(run_dir), overwrite, acc)
        s = set_up(cfg, run_dir, resume, acc, surgery, data, preempt)
        progress = Progress()
        if resume and s.run.latest() is not None:
            _resume(s, progress)
        log = MetricsLog(s.run, acc.is_main_process, progress.epoch)
        stopped_early = False
        try:
            while progress.epoch < s.max_epochs and not stopped_early:
                stopped_early = _epoch(s, progress, log, trace_cells)
        finally:  # also when preempted or stopped by an error
            log.close()
        return _finish(s, stopped_early, trace_cells)


def _start_afresh(run: RunDir, overwrite: bool, acc) -> None:
    """A run started without resume: refuse a RUN_DIR that holds an earlier run unless `overwrite`, which removes
    that run's outputs first (its checkpoints would otherwise pass for this run's: `latest` named a checkpoint
    the pruning of the earlier run's later steps removed). Every process has looked before the main one removes."""
    earlier = run.outputs()
    if earlier and not overwrite:
        raise ValueError(
            f"RUN_DIR {run.path} holds an earlier run ({', '.join(earlier)}): continue it with --resume "
            "(fit(resume=True)), replace it with --overwrite (fit(overwrite=True)), or train into a new folder"
        )
    acc.wait_for_everyone()
    if earlier and acc.is_main_process:
        run.remove_outputs()
        print(f"{run.path}: the earlier run's {', '.join(earlier)} removed (--overwrite)", flush=True)
    acc.wait_for_everyone()


@contextmanager
def flush_denormals():
    """Subnormal floats (below ~1.2e-38) flushed to zero while training, then the process's setting as it was
    (torch has no getter: a subnormal product that comes out 0 says the flush was already on). On an x86 CPU
    every operation on one takes ~100 cycles: with LayerNorm (the default with label keys) a run's epochs
    after the first slowed from ~15,000 to ~10,000 cells/s (50k x 2,000 atlas, 2 threads, measured three
    times each way) and came back with the flush; values that small change no loss. torch sets the flush for the
    calling thread only: the subnormals the other intra-op threads meet (Adam's moments of weights without
    gradient) are zeroed by optim.zero_tiny_moments."""
    was_on = float(torch.tensor([1e-39]) * 1.0) == 0.0
    on = torch.set_flush_denormal(True)  # False where the CPU cannot
    try:
        yield
    finally:
        if on and not was_on:
            torch.set_flush_denormal(False)


def set_up(cfg: RunConfig, run_dir, resume: bool, acc, surgery, data=None, preempt=None) -> Session:
    from accelerate.utils import set_seed

    run = RunDir(run_dir)
    cfg = _resolved_precision(cfg, run, resume, acc.device.type)
    cfg = _resolved_by_labels(cfg, run, resume, surgery)
    cfg = _resolved_average(cfg, run, resume, acc.num_processes)
    t, d = cfg.train, cfg.data
    set_seed(t.seed)
    store = open_store(
        d.data if data is None else data, obs_filter=d.obs_filter, layer=d.layer, genes=d.genes, gene_join=d.gene_join
    )
    if acc.is_main_process:
        genes = f", training on {len(d.genes)} listed genes" if d.genes else ""
        for line in getattr(store, "summary", list)():  # a collection: cells and genes per store
            print(line, flush=True)
        print(f"{store.uri}: {store.n_obs} cells x {store.n_vars} genes after filtering{genes}", flush=True)
    fresh = not (resume and run.vocab_file.exists())
    dropped = dropped_labels.apply(store, run, d, fresh=fresh, main=acc.is_main_process)
    train_mask = np.logical_not(holdout_all(store.n_obs, t.val_fraction, t.seed))  # one byte per cell
    n_train = int(np.count_nonzero(train_mask))
    vocab = _vocab(run, store, cfg, resume, train_mask, surgery, acc.is_main_process)
    del train_mask
    if acc.is_main_process:
        for line in (*dropped, *unlabeled_report(store, d)):
            print(line, flush=True)
    # surgery may zero-fill genes the query lacks; a fresh model requires all of them
    colmap = vocab.colmap(store) if surgery is not None else None
    stream = CellStream(
        store,
        batch_size=t.batch_size,
        seed=t.seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        num_workers=t.num_workers,
        genes=vocab.genes,
        colmap=colmap,
        obs_keys=(*d.batch_keys, *d.label_keys),
        validate="finite" if d.allow_non_integer else "counts",
        min_batch=2,  # BatchNorm cannot normalise a minibatch of one cell
    )
    panels = stream.gene_panels() if t.missing_genes == "masked" else None
    if panels is not None and acc.is_main_process:
        print(
            f"the likelihood leaves out the zero-filled genes of each cell's store ({len(panels)} gene panel(s); "
            "--missing-genes zero counts them)", flush=True
        )  # fmt: skip
    to_input = ToModelInput(
        vocab, store, acc.device, batch_keys=d.batch_keys, label_keys=d.label_keys, val_fraction=t.val_fraction,
        seed=t.seed, panels=panels,
    )  # fmt: skip
    model = build_model(vocab, cfg)
    if surgery is not None:
        surgery.apply(model, vocab, store)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], t)
    model, optimizer = acc.prepare(model, optimizer)
    max_epochs = t.epochs_for(n_train)
    planned_steps = t.max_steps if t.max_steps is not None else max_epochs * len(stream)
    module = acc.unwrap_model(model)
    module.compiled_loss = t.compiles_loss(planned_steps)
    module.bf16_matmul = t.mixed_precision == "bf16" and acc.device.type == "cpu"
    # a query without some of the reference's genes: its latents, as embed will give them (encode_measured)
    module.fill_in_training = surgery is not None and panels is not None
    if module.bf16_matmul and acc.is_main_process and not native_bf16():
        print("note: this CPU has no bfloat16 matrix units (AMX or AVX-512 BF16): --mixed-precision bf16 is "
              "emulated there and slower than float32", flush=True)  # fmt: skip
    guard = NanGuard(model, optimizer, acc.device)
    start = t.average_start(max_epochs, len(stream))
    average = WeightAverage(module, t.ema_decay, t.ema_every, start) if t.ema_decay > 0 else None
    return Session(
        cfg,
        acc,
        run,
        stream,
        to_input,
        model,
        optimizer,
        max_epochs,
        Faults(),
        preempt or Preemption(),
        guard,
        data,
        surgery,
        average,
        [p for p in model.parameters() if p.requires_grad],
        t.floor_epochs(n_train),
    )


def _resolved_precision(cfg: RunConfig, run: RunDir, resume: bool, device_type: str) -> RunConfig:
    """cfg with --mixed-precision auto made what it means here, as config.json records it: a resumed run's own
    setting on the CPU, else bf16 on a CPU with bfloat16 matrix units and float32 elsewhere (GPUs too)."""
    if cfg.train.mixed_precision != "auto":
        return cfg
    value = "no"
    if device_type == "cpu":
        saved = run.saved_setting("train", "mixed_precision") if resume else None
        value = saved if saved in ("no", "bf16") else ("bf16" if native_bf16() else "no")
    return replace(cfg, train=replace(cfg.train, mixed_precision=value))


def _resolved_by_labels(cfg: RunConfig, run: RunDir, resume: bool, surgery) -> RunConfig:
    """cfg with the unset settings whose default depends on label heads (the latent size, the prior's components,
    the KL weight, early stopping's floor) made the ones this run's model has, as config.json records them: a
    resumed run's own, else the default for a model with label heads or without (a query's heads are its
    reference's)."""
    heads = bool(cfg.data.label_keys) or (surgery is not None and bool(surgery.reference.vocab.label_classes))
    for section, key, default in (
        ("model", "n_latent", cfg.model.latent_size),
        ("model", "prior_components", cfg.model.mixture_components),
        ("train", "kl_weight", cfg.train.kl),
        ("train", "min_cells", cfg.train.cell_floor),
    ):
        part = getattr(cfg, section)
        if getattr(part, key) is not None:
            continue
        saved = run.saved_setting(section, key) if resume else None
        fallback = default(heads)
        value = fallback if saved is None else type(fallback)(saved)  # config.json's JSON number as the field's type
        cfg = replace(cfg, **{section: replace(part, **{key: value})})
    return cfg


def _resolved_average(cfg: RunConfig, run: RunDir, resume: bool, processes: int = 1) -> RunConfig:
    """cfg with an unset weight-average decay made the one this run uses, as config.json records it: a resumed
    run's own, else the default with label keys or without for this run's cells a step (a query mapping
    inherits its reference's, set)."""
    if cfg.train.ema_decay is not None:
        return cfg
    saved = run.saved_setting("train", "ema_decay") if resume else None
    if saved is None:
        saved = cfg.train.average_decay(labelled=bool(cfg.data.label_keys), processes=processes)
    return replace(cfg, train=replace(cfg.train, ema_decay=float(saved)))


def _vocab(run: RunDir, store, cfg: RunConfig, resume: bool, train_mask, surgery, main: bool) -> Vocab:
    """The saved vocab on resume (after checking the settings), else a new one from the store."""
    if resume and run.vocab_file.exists():
        run.check_resumable(cfg)
        if main:  # record the new length of the run
            run.write_config(cfg)
        return run.read_vocab()
    vocab = surgery.vocab(store) if surgery is not None else Vocab.from_store(store, cfg.data, train_mask)
    if main:
        run.write_vocab(vocab)
        run.write_config(cfg)
    return vocab


def _resume(s: Session, progress: Progress) -> None:
    latest = s.run.latest()
    saved_world = restore_checkpoint(s.acc, latest, s.stream, progress, s.average)
    if s.acc.is_main_process:
        print(
            f"resumed from {latest.name}: epoch {progress.epoch}, step {progress.step}, "
            f"{s.stream.consumed} minibatches into the epoch",
            flush=True,
        )
        if saved_world != s.acc.num_processes:
            left = s.stream.elastic_cells
            rest = (
                f"; the {left:,} cells of epoch {progress.epoch} not yet seen go to the new processes" if left else ""
            )
            print(
                f"elastic resume: {s.acc.num_processes} process(es), the checkpoint had {saved_world}{rest}", flush=True
            )


def _epoch(s: Session, progress: Progress, log: MetricsLog, trace_cells: bool) -> bool:
    """One epoch (or the rest of one, after a resume); True when the run should stop. Steps do not
    wait on the device: loss terms add up there, and the NaN/SIGTERM flags are read every SYNC_EVERY
    steps, before any checkpoint and at the epoch's end (_sync)."""
    t, acc, stream, epoch = s.cfg.train, s.acc, s.stream, progress.epoch
    if stream.epoch != epoch or stream.consumed == 0:
        stream.set_epoch(epoch)
    if progress.sums is None:
        progress.sums = new_sums()
    s.model.train()
    steps_per_epoch = len(stream)
    trace = [] if trace_cells else None
    kl_weight = 0.0
    sums = DeviceSums()
    bar = _bar(acc, steps_per_epoch, stream.consumed, epoch)
    try:
        for batch in stream:
            inp = s.to_input(batch)  # on this thread: a second thread's Python work took the GIL from the step
            kl_weight, label_weight = loss_weights(t, epoch, epoch + stream.consumed / max(steps_per_epoch, 1),
                                                   s.max_epochs)  # fmt: skip
            out = train_step(s, progress, inp, kl_weight, label_weight)
            sums.add(out.terms, s.guard.stop)
            progress.sums["cells"] += len(inp)
            if trace is not None:
                trace.append(inp.positions[~inp.val])
            if bar is not None:
                bar.update(1)
            last = stream.consumed >= steps_per_epoch  # the epoch's end writes its own checkpoint
            ckpt = bool(t.checkpoint_every_steps) and progress.step % t.checkpoint_every_steps == 0 and not last
            done = t.max_steps is not None and progress.step >= t.max_steps
            if ckpt or done or last or progress.step % SYNC_EVERY == 0:
                _sync(s, progress, sums, out.terms, kl_weight, bar, log)
                if ckpt or (s.preempt.agreed and not last):
                    save_checkpoint(acc, s.run, progress, stream, t.keep_checkpoints, s.faults, s.average)
                if s.preempt.agreed and not last:
                    _preempted(s, progress)
            s.faults.kill("after_step", progress.step)
            if done:
                return True  # mid-epoch: no epoch row, no end-of-epoch checkpoint
    finally:  # also on an error: the bar's line is cleared before the message
        if bar is not None:
            bar.close()
    sums.fold(progress.sums)
    if trace is not None:
        (s.run.path / "trace").mkdir(parents=True, exist_ok=True)
        np.save(
            s.run.path / "trace" / f"rank{acc.process_index}_epoch{epoch}.npy",
            np.concatenate(trace) if trace else np.zeros(0, np.int64),
        )
    row = epoch_row(acc, progress.sums, epoch, progress.step, kl_weight, s.optimizer.param_groups[0]["lr"])
    log.epoch(row)
    stop = _early_stop(t, progress, row.get("val_loss"), s.max_epochs, s.floor_epochs)
    if not stop and _lr_cut_due(t, progress, row.get("val_loss"), s.max_epochs):
        for group in s.optimizer.param_groups:
            group["lr"] *= t.lr_plateau_factor
    progress.epoch, progress.sums = epoch + 1, None
    save_checkpoint(acc, s.run, progress, stream, t.keep_checkpoints, s.faults, s.average)
    if s.preempt.agreed:
        _preempted(s, progress)
    return stop


def _sync(s: Session, progress: Progress, sums: DeviceSums, terms: dict, kl_weight: float, bar, log) -> None:
    """The loop's host sync, one read of the device: the running sums come over with the step's loss terms
    (progress bar, TensorBoard), and all ranks agree on whether a loss went non-finite (then the state after
    the last good step is saved and the run stops) and on SIGTERM."""
    acc = s.acc
    # a fill on the device, not a copy from the host (which on a GPU would wait as a sync of its own)
    flags = torch.stack([s.guard.stop, torch.full((), float(s.preempt.requested), device=acc.device)])
    if acc.num_processes > 1:  # every rank stops together, none waits on a dead collective
        flags = acc.reduce(flags, reduction="sum")
    keys = list(terms)
    now = torch.stack([terms[k].reshape(()).double() for k in keys])
    host = torch.cat([flags.double(), now, *([] if sums.vec is None else [sums.vec])]).tolist()
    (bad, term), now = host[:2], dict(zip(keys, host[2 : 2 + len(keys)]))
    sums.fold(progress.sums, host[2 + len(keys) :])
    if bad > 0:
        _non_finite(s, progress, now)
    s.preempt.agreed = term > 0  # the loop then checkpoints and stops
    if bar is not None:
        bar.set_postfix(loss=f"{now['loss']:.4g}", kl_w=f"{kl_weight:.2f}", refresh=False)
    log.step(progress.step, now, kl_weight)


def _non_finite(s: Session, progress: Progress, terms: dict):
    """Save the state after the last good step (the guard kept it: no update since) and stop. The
    stream's position is the bad step's, so a resume continues after the batch that went bad."""
    first, now = s.guard.first_bad_step(), progress.step
    s.stream.consumed -= now - first
    progress.step = first - 1
    save_checkpoint(s.acc, s.run, progress, s.stream, s.cfg.train.keep_checkpoints, s.faults, s.average)
    detail = {k: round(float(v), 4) for k, v in terms.items()}
    raise FloatingPointError(
        f"non-finite loss at epoch {progress.epoch}, step {first} (loss terms at step {now}: {detail}); the last "
        f"good state is saved as {s.run.latest()}"
    )


def _preempted(s: Session, progress: Progress):
    raise Preempted(
        f"stopped on SIGTERM after step {progress.step} (epoch {progress.epoch}); checkpoint "
        f"{s.run.latest()} written: rerun with --resume to continue"
    )


def train_step(s: Session, progress: Progress, inp: ModelInput, kl_weight: float, label_weight: float):
    """Forward, the on-device all-ranks NaN check (guard.py), backward, clip, optimizer step (skipped
    on the device once a loss went non-finite). No host sync."""
    t, acc = s.cfg.train, s.acc
    train_mask = to_device(torch.from_numpy(~inp.val), acc.device)
    with acc.autocast():
        out = s.model(
            inp.counts, inp.codes, inp.labels, cell_mask=train_mask, eval_mask=~train_mask, kl_weight=kl_weight,
            eval_kl_weight=t.kl_weight, gate_weight=t.gate_weight, label_weight=label_weight, measured=inp.measured,
        )  # fmt: skip
    reduce = (lambda x: acc.reduce(x, reduction="sum")) if acc.num_processes > 1 else None
    s.guard.check(out.total, progress.step + 1, s.faults.at("nan_loss", progress.step + 1), reduce)
    acc.backward(out.total)
    if t.grad_clip:
        acc.unscale_gradients()  # what acc.clip_grad_norm_ does first
        clip_gradients(s.params, s.optimizer, t.grad_clip)
    s.guard.step()
    for p in s.params:  # zero_grad(set_to_none=True) without the wrappers' per-step signature look-ups
        p.grad = None
    progress.step += 1
    if progress.step % TINY_EVERY == 0:
        zero_tiny_moments(s.optimizer)
    if s.average is not None:
        s.average.update(progress.step, s.guard.stop)
    return out


def _early_stop(t: TrainConfig, progress: Progress, val_loss: float | None, max_epochs: int, floor: int) -> bool:
    """True after `early_stopping_patience` epochs in a row without a validation loss below the best
    so far by more than early_stopping_min_delta (relative), once the run has trained `floor` epochs. Epochs
    of the KL warm-up do not count: the loss is still falling there for a reason that ends."""
    if val_loss is None:
        return False
    best = progress.best_val
    if not np.isfinite(best) or val_loss < best - max(t.early_stopping_min_delta * abs(best), 1e-6):
        progress.best_val, progress.bad_epochs = val_loss, 0
        return False
    if not _counted(t, progress, max_epochs):
        return False
    progress.bad_epochs += 1
    patience = t.early_stopping_patience
    return bool(patience) and progress.bad_epochs >= patience and progress.epoch + 1 >= floor


def _counted(t: TrainConfig, progress: Progress, max_epochs: int) -> bool:
    """Whether this epoch counts towards the patience of early stopping and of a plateau: not one of
    the KL warm-up."""
    return progress.epoch + 1 > t.warmup_epochs(max_epochs)


def _lr_cut_due(t: TrainConfig, progress: Progress, val_loss: float | None, max_epochs: int) -> bool:
    """After _early_stop of this epoch: the learning rate is cut every `lr_plateau_patience` counted
    bad epochs in a row. bad_epochs moves only on counted epochs (reset by an improvement), so on a
    counted epoch a multiple of the patience means this one completed it — and a resumed run, whose
    Progress carries bad_epochs, cuts at the same epochs. (An uncounted epoch leaves bad_epochs as it
    was: a resume with a larger max_epochs can lengthen the warm-up past epochs already counted.)"""
    p = t.lr_plateau_patience
    if not p or val_loss is None or not _counted(t, progress, max_epochs):
        return False
    return progress.bad_epochs > 0 and progress.bad_epochs % p == 0


def _finish(s: Session, stopped_early: bool, trace: bool) -> Path:
    acc, run = s.acc, s.run
    acc.wait_for_everyone()
    module = acc.unwrap_model(s.model)
    if s.average is not None:  # the last checkpoint keeps the last step's weights and the average apart
        s.average.copy_to_model()
        _refresh_norms(s, module)
    if trace:  # each rank's own weights and BatchNorm statistics, to check that data-parallel ranks stayed identical
        state = [v for v in module.state_dict().values() if v.is_floating_point()]
        params = torch.cat([v.detach().cpu().double().ravel() for v in state])
        np.save(run.path / "trace" / f"rank{acc.process_index}_params.npy", params.numpy())
    if acc.is_main_process:
        out = run.write_weights(module)
        from .plots import loss_curves  # matplotlib: only the main process, only at the end

        loss_curves(run.metrics, run.path / "loss_curves.png")
        print(f"wrote {out}{' (stopped early)' if stopped_early else ''}", flush=True)
        _reference(s)
    acc.wait_for_everyone()
    return run.weights_file


def _refresh_norms(s: Session, module) -> None:
    """BatchNorm statistics gathered anew for the weight average (norm_refresh.py) over norm_refresh_cells
    training cells, from the epochs after the last one trained."""
    t, acc = s.cfg.train, s.acc
    steps = math.ceil(t.norm_refresh_cells / (t.batch_size * acc.num_processes))

    def forward(batch):
        inp = s.to_input(batch)
        with acc.autocast():
            module(inp.counts, inp.codes, inp.labels, measured=inp.measured)

    reduce = (lambda x: acc.reduce(x, reduction="mean")) if acc.num_processes > 1 else None
    start = time.perf_counter()
    with closing(_epochs_from(s.stream, s.stream.epoch + (s.stream.consumed > 0))) as batches:
        used = refresh_batch_norms(module, batches, forward, steps, reduce)
    if used and acc.is_main_process:
        print(f"BatchNorm statistics gathered for the weight average over {used} minibatches "
              f"({time.perf_counter() - start:.1f}s)", flush=True)  # fmt: skip


def _epochs_from(stream: CellStream, epoch: int):
    """The stream's minibatches from the start of `epoch` on, epoch after epoch (ending at an epoch without any)."""
    while True:
        stream.set_epoch(epoch)
        if not len(stream):  # the epoch about to be read, not the one before it
            return
        it = iter(stream)
        try:
            yield from it
        finally:
            it.close()
        epoch += 1


def _reference(s: Session) -> None:
    """RUN_DIR/reference/ from the final weights (main process; see reference_build)."""
    t = s.cfg.train
    if t.reference_cells <= 0:
        return
    if s.surgery is not None:
        from .reference_build import extend_reference

        extend_reference(s.surgery.reference.path, s.run.path, s.data, max_cells=t.reference_cells,
                         umap=t.reference_umap)  # fmt: skip
    else:
        from .reference_build import build_reference

        build_reference(s.run.path, s.data, max_cells=t.reference_cells, umap=t.reference_umap)


def _bar(acc, total: int, start: int, epoch: int):
    if not acc.is_main_process:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit="batch", leave=False, mininterval=2.0)


def train_from_args(a) -> Path:
    """train() as the command line asks for it (flags of flags.add_train_arguments)."""
    from .flags import config_from_args

    return train(config_from_args(a), a.out, resume=a.resume, overwrite=a.overwrite, trace_cells=a.trace_cells)


def main(argv=None) -> int:
    """`python -m bigatlas.train` (under accelerate launch or torchrun): `bigatlas train`'s flags."""
    import argparse
    import sys

    from .flags import HelpFormatter, add_train_arguments

    p = argparse.ArgumentParser(
        prog="bigatlas.train", description="train scAtlasVAE on a store", formatter_class=HelpFormatter
    )
    add_train_arguments(p)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    return reported("train", lambda: train_from_args(a))


if __name__ == "__main__":
    raise SystemExit(main())
