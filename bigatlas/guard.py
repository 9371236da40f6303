"""Non-finite losses caught on the device, without a host sync per step.

Every step adds to a sticky device flag whether the loss is finite (summed over ranks, so all agree)
and records the number of the first bad step. From that step on the optimizer skips its update on
the device (fused AdamW's found_inf: weights, moments and step counts stay as they were) and the
BatchNorm running statistics are put back to their last good values, so the model stays in the state
after the last good step. The trainer reads the flag at its next sync point (every SYNC_EVERY steps,
at checkpoints and at the end of an epoch), saves that state and stops. Without a fused optimizer
the update is skipped by a host check per step instead.
"""

from __future__ import annotations

import torch
from torch import nn

from .optim import torch_optimizer

SYNC_EVERY = 50  # steps between host syncs: the NaN and SIGTERM flags, the progress bar, TensorBoard


class NanGuard:
    def __init__(self, model: nn.Module, optimizer, device):
        self.stop = torch.zeros((), device=device)  # 1.0 once a non-finite loss was seen on any rank
        self.first = torch.zeros((), dtype=torch.long, device=device)  # number of that step (0: none)
        self.buffers = [
            b
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        self.good = [b.clone() for b in self.buffers]
        inner = torch_optimizer(optimizer)
        # The wrapper's step adds a gradient scaler (fp16: not offered), XLA gradient syncs and skipped
        # accumulation steps (neither used), and it looks up an optional package twice per step (accelerate
        # 1.x, is_lomo_available: 0.36 ms per step on CPU). Without a scaler or XLA it is the inner step.
        state = getattr(optimizer, "accelerator_state", None)
        plain = getattr(optimizer, "scaler", None) is None and (state is None or state.distributed_type != "XLA")
        self.optimizer = inner if plain else optimizer
        self.on_device = bool(inner.defaults.get("fused"))
        if self.on_device:
            inner.found_inf = self.stop  # read by every fused step; updated in place

    def check(self, loss: torch.Tensor, step: int, forced: bool = False, reduce=None) -> None:
        """Record step `step` (1-based): bad if its loss is not finite (or `forced`) on any rank."""
        bad = torch.isfinite(loss.detach()).logical_not().float()
        if forced:
            bad = bad + 1.0
        if reduce is not None:  # all ranks: a collective, not a host sync
            bad = reduce(bad)
        bad = bad > 0
        self.first.copy_(torch.where(bad & (self.stop == 0), step, self.first))
        self.stop.copy_(torch.where(bad, 1.0, self.stop))

    def step(self) -> None:
        """The optimizer's update, skipped once the flag is set; then the BatchNorm statistics the bad
        forward moved are put back (after the backward pass, which still needs them)."""
        if self.on_device or not bool(self.stop):
            self.optimizer.step()
        if not self.buffers:
            return
        stopped = self.stop > 0
        for b, g in zip(self.buffers, self.good):  # where, not a lerp by the flag: a bad forward leaves NaN in b
            b.copy_(torch.where(stopped, g, b))
        torch._foreach_copy_(self.good, self.buffers)

    def first_bad_step(self) -> int:
        """0 when every step so far was finite (a host sync: call at sync points)."""
        return int(self.first)
