"""An exponential moving average of the model's weights, kept beside training; the run writes it as
its final weights.

The last iterate of a stochastic optimizer sits wherever the last few hundred minibatches pushed it;
the average over those steps is a steadier point of the same basin. On the hard synthetic atlases it
kept more cell-type structure in the latent (bench/results/defaults.json). The decay at step t is
min(decay, (1 + t) / (2 + t)): the plain mean of every step so far until that reaches the decay (step
~1,000 at 0.999), then an exponential average over the last ~1 / (1 − decay) steps. A warm-up to
(1 + t) / (10 + t), which averages about the last 10% of a run, kept less (bio on the rare atlas
+0.005 over no average, against +0.021). Updates run on the device with no host sync; a step the NaN
guard skipped leaves the average where it was. Every rank holds the same parameters (data parallel),
so every rank keeps the same average; checkpoints carry it, so a resumed run ends with the same weights.
With --ema-start warmup the average begins where the KL warm-up ends (it follows the weights until then), and the
checkpoint carries that start too (docs/quality.md, "Where the average begins").

The average moves every `every` optimizer steps, by the decay raised to that power (and the plain
mean over those samples until then): the same span of steps for a quarter of the memory traffic at 4
— a pass over every weight and its average that cost 0.17-0.45 ms of a ~10 ms CPU step. Screened
on the hard atlases (tag ema4 in bench/results/defaults.json): the same latent as every step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FILE = "bigatlas_weight_average.safetensors"


class WeightAverage:
    def __init__(self, module: nn.Module, decay: float, every: int = 1, start: int = 0):
        """start: the optimizer step after which the average begins (0: the first); until then it follows the
        weights (decay 0), so the steps before it leave no trace in the written weights."""
        self.decay, self.every, self.start = decay, every, start
        names, params = zip(*module.named_parameters())
        # detached views of the parameters (the optimizer updates them in place): made once, not per step
        self.names, self.params = names, [p.detach() for p in params]
        self.shadow = [p.clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        """The decay applied by the update after optimizer step `step` (1-based, a multiple of every)."""
        if step <= self.start:
            return 0.0
        n = (step - self.start) // self.every  # the updates since the start, this one included
        return min(self.decay**self.every, (1.0 + n) / (2.0 + n))

    @torch.no_grad()
    def update(self, step: int, skipped: torch.Tensor) -> None:
        """Move the average towards the weights after optimizer step `step`; `skipped` is the NaN
        guard's device flag (1.0: that step's update did not happen, the average stays). Steps that
        are not a multiple of `every` leave it."""
        if step % self.every:
            return
        weight = (1.0 - skipped) * (1.0 - self.decay_at(step))  # a device scalar
        # shadow + weight·(params − shadow), lerp's own formula for weights below 0.5 (here ≤ 1/3); lerp_ itself
        # takes its weight as a Python number and read it off the GPU every update (a host sync per 4 steps)
        step_to = torch._foreach_sub(self.params, self.shadow)
        torch._foreach_mul_(step_to, weight)
        torch._foreach_add_(self.shadow, step_to)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {n: s.cpu().contiguous() for n, s in zip(self.names, self.shadow)}
        save_file(tensors, str(directory / FILE), metadata={"start": str(self.start)})

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        """The average saved in a checkpoint; for a checkpoint without one (written by a version without
        the average) a warning names it and the average starts at the resumed weights."""
        path = directory / FILE
        if not path.exists():
            import warnings

            warnings.warn(f"{directory}: no {FILE} (a checkpoint from before the weight average); the average "
                          "starts at the resumed weights", stacklevel=2)  # fmt: skip
            for p, s in zip(self.params, self.shadow):
                s.copy_(p)
            return
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:  # the weights and, in its metadata, the start: one read
            saved = {n: f.get_tensor(n) for n in f.keys()}
            start = int((f.metadata() or {}).get("start", 0))
        if sorted(saved) != sorted(self.names):
            raise ValueError(f"{path}: weights {sorted(set(saved) ^ set(self.names))} do not match the model's")
        for n, s in zip(self.names, self.shadow):
            s.copy_(saved[n])
        self.start = start  # the start it was saved with: an elastic resume changes an epoch's steps, not this
