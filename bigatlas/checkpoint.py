"""Mid-run state: loop position and running sums (Progress), saved with model and optimizer so that
a resumed run continues exactly where the interrupted one stood."""

from __future__ import annotations

import base64
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .faults import Faults
from .rundir import RunDir


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
        # fields this version has: a checkpoint may carry derived ones of earlier versions (lr_cut)
        self.__dict__.update({k: v for k, v in d.items() if k in self.__dataclass_fields__})


def save_checkpoint(acc, run: RunDir, progress: Progress, stream, keep: int, faults: Faults, average=None) -> None:
    """Model and optimizer through Accelerate (safetensors / tensors only); loop position, stream
    position and this process's torch RNG in bigatlas_rank<r>.json; the weight average (ema.py, the
    same on every rank) by the main process in safetensors — no pickle of ours to trust. Written
    under a temporary name on every rank, then published by the main process."""
    tmp, name = run.checkpoint_tmp(progress.step)
    if acc.is_main_process:
        run.ckpt.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    acc.wait_for_everyone()
    state = {
        "progress": progress.state_dict(),
        "stream": stream.state_dict(),
        "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    try:
        faults.io("checkpoint_write", progress.step, tmp)
        acc.save_state(str(tmp), safe_serialization=True)
        (tmp / f"bigatlas_rank{acc.process_index}.json").write_text(json.dumps(state))
        if average is not None and acc.is_main_process:
            average.save(tmp)
    except OSError as e:  # a full disk or an I/O error: `latest` still names the last good checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            e.errno, f"writing checkpoint {tmp} failed ({e.strerror or e}); the last good checkpoint stays "
            f"{run.latest() or 'none'}"
        ) from None  # fmt: skip
    faults.kill("checkpoint_written", progress.step)
    acc.wait_for_everyone()
    if acc.is_main_process:
        run.publish(tmp, name, keep)
    acc.wait_for_everyone()


def restore_checkpoint(acc, path: Path, stream, progress: Progress, average=None) -> int:
    """Load the checkpoint; returns the number of processes that wrote it. On another number (an
    elastic resume) a rank without a file of its own takes rank 0's loop and stream position (the
    same on every rank) and RNG, the stream deals the rest of the epoch to the new ranks, and the
    interrupted epoch's running sums restart (its logged row covers the cells after the resume)."""
    try:
        acc.load_state(str(path))  # weights_only loads: a checkpoint file carrying code is refused
        saved_world = len(list(path.glob("bigatlas_rank*.json")))
        own = path / f"bigatlas_rank{acc.process_index}.json"
        state = json.loads((own if own.exists() else path / "bigatlas_rank0.json").read_text())
        if average is not None:
            average.load(path)
    except Exception as e:
        raise ValueError(
            f"checkpoint {path} cannot be loaded safely ({type(e).__name__}: {e}); restore it or start a new RUN_DIR"
        ) from None
    if saved_world != acc.num_processes:
        state["progress"]["sums"] = None
    progress.load_state_dict(state["progress"])
    stream.load_state_dict(state["stream"])
    torch.set_rng_state(_bytes_tensor(state["torch_rng"]))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda_rng"]])
    return saved_world


def _bytes_tensor(b64: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)
