"""BatchNorm statistics for the weights a run writes.

A run writes the weight average (ema.py), but BatchNorm's running means and variances were gathered by
the last ~100 steps' own weights (momentum 0.01): each layer would normalise the averaged weights'
activations by another network's statistics. As stochastic weight averaging does, the statistics are
gathered again for the averaged weights: forward passes over training minibatches with no gradient and
no update, every BatchNorm layer in training mode averaging the minibatches' statistics with equal weight,
everything else in eval mode (no dropout: the network as `embed` runs it). Layers a surgery froze keep the
reference's statistics. Each rank gathers over its own share and the ranks' averages are averaged, so every
rank ends with the same statistics (docs/quality.md, "BatchNorm statistics for the averaged weights").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def trained_batch_norms(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers that training updates: those in training mode after module.train() (a model's
    frozen_modules stay in eval mode there)."""
    was = module.training
    module.train()
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training]
    module.train(was)
    return norms


@torch.no_grad()
def refresh_batch_norms(
    module: nn.Module,
    batches: Iterable,
    forward: Callable[[object], None],
    steps: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Gather the statistics of `module`'s trained BatchNorm layers anew over the first `steps` minibatches
    of `batches` (forward(batch) runs the model on one). reduce: a tensor's mean over the ranks (None: one
    process). Returns the minibatches used; with none (or no such layer) the statistics stay as they were."""
    norms = trained_batch_norms(module)
    if not norms or steps <= 0:
        return 0
    was = module.training
    kept = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every minibatch weighs the same
        m.train()
    used = 0
    try:
        for batch in batches:
            if used >= steps:
                break
            forward(batch)
            used += 1
    finally:
        for m, (momentum, *_) in zip(norms, kept):
            m.momentum = momentum
        module.train(was)
    if not used:
        for m, (_, mean, var, tracked) in zip(norms, kept):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
    if reduce is not None:  # on every rank, whatever it used: a collective all ranks join
        for m in norms:
            m.running_mean.copy_(reduce(m.running_mean))
            m.running_var.copy_(reduce(m.running_var))
    return used
