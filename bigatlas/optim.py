"""The optimizer: torch's fused AdamW with one step count per parameter group, and gradient clipping
through its gradient scale. No host sync either way."""

from __future__ import annotations

import torch

from .config import TrainConfig


class GroupStepAdamW(torch.optim.AdamW):
    """torch's fused AdamW, the same update bit for bit, with one step-count tensor shared by the
    parameters of a group. torch keeps one per parameter and, on the CPU, adds 1 to each and subtracts
    the skip flag from each one call at a time (66 small calls per step for scAtlasVAE's 22 parameter
    tensors, beside the Python loop that gathers the state): here the fused kernel reads one tensor for
    every parameter, counted up once. Where a group does not fit (a parameter without a gradient this
    step, amsgrad or maximize, devices or dtypes mixed, counts that differ), torch's own step runs."""

    @torch.no_grad()
    def step(self, closure=None):
        plans = [self._plan(group) for group in self.param_groups] if closure is None else [None]
        if any(plan is None for plan in plans):
            for st in self.state.values():  # torch's step counts each parameter's tensor up: one each again
                if "step" in st:
                    st["step"] = st["step"].clone()
            return super().step(closure)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group, (params, grads, exp_avgs, exp_avg_sqs, count) in zip(self.param_groups, plans):
            beta1, beta2 = group["betas"]
            count.add_(1)
            torch._fused_adamw_(
                params, grads, exp_avgs, exp_avg_sqs, [], [count] * len(params), amsgrad=False,
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=False, grad_scale=grad_scale, found_inf=found_inf,
            )  # fmt: skip
            if found_inf is not None:  # a skipped update does not count (as torch's step)
                count.sub_(found_inf)
        return None

    def _plan(self, group):
        """The group's tensors for one fused call and its shared count, or None where torch's step must run."""
        params = group["params"]
        if (
            not params
            or not group.get("fused")
            or group["amsgrad"]
            or group["maximize"]
            or isinstance(group["lr"], torch.Tensor)
            or any(p.grad is None or p.grad.is_sparse for p in params)
            or len({(p.device, p.dtype) for p in params}) > 1
        ):
            return None
        states = [self.state[p] for p in params]
        if not any(states):  # the first step: the state torch's step would create, one count for all
            count = torch.zeros((), dtype=torch.float32, device=params[0].device)
            for p, st in zip(params, states):
                st["step"] = count
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not all(states):
            return None
        count = states[0]["step"]
        if any(st["step"] is not count for st in states):  # loaded from a checkpoint: one tensor again
            if any(not torch.equal(st["step"], count) for st in states):
                return None
            for st in states:
                st["step"] = count
        grads = [p.grad for p in params]
        return params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], count


def make_optimizer(params, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters, on CPU too) with a step count per group where this
    torch has it, else foreach: the per-parameter loop took 4.4 ms of a ~20 ms CPU step with clipping
    (fused + foreach clip: 0.7)."""
    settings = {"lr": t.lr, "weight_decay": t.weight_decay, "eps": t.adam_eps}
    try:
        return GroupStepAdamW(params, **settings, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **settings, foreach=True)


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself, under Accelerate's wrapper where there is one."""
    return getattr(optimizer, "optimizer", optimizer)


TINY_MOMENT = 1e-30  # below this an Adam moment moves no weight: the update is lr * m / (sqrt(v) + eps >= 1e-8)
TINY_EVERY = 50  # optimizer steps between passes of zero_tiny_moments (train_step)


def zero_tiny_moments(optimizer) -> None:
    """Adam's moments below TINY_MOMENT set to exactly 0, on the device, no host sync. A weight whose gradient is
    always 0 — the decoder's outputs from a hidden unit no cell switches on, about half of them with LayerNorm
    (the default with label keys) — keeps a first moment that shrinks by beta1 (0.9) a step and after ~800 steps
    is a subnormal float, on which every operation of the CPU's fused AdamW costs ~100 cycles; the flush of
    train.flush_denormals reaches the calling thread only, not the kernel's other threads. Measured on the 50k x
    2,000 atlas (LayerNorm, 2 threads): epochs 2-4 of the in-memory loop 3.96 / 5.25 / 5.09 s before, 3.65 /
    3.56 / 3.68 s with this every 50 steps (BatchNorm: 3.88-3.91); a moment once 0 stays 0 while its
    gradient is."""
    for state in torch_optimizer(optimizer).state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            m = state.get(key)
            if m is not None:
                m.masked_fill_(m.abs() < TINY_MOMENT, 0.0)


def clip_gradients(params, optimizer, max_norm: float) -> None:
    """Gradient-norm clipping by torch's clip_grad_norm_ factor. A fused AdamW takes the factor as its
    grad_scale and divides each gradient by it as its kernel reads it: the same update without a pass
    that scales every gradient first, and no host sync (the norm: grad_norm)."""
    inner = torch_optimizer(optimizer)
    if not inner.defaults.get("fused"):
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    grads = [p.grad for p in params if p.grad is not None]  # one device and dtype: no grouping needed
    norm = grad_norm(grads)
    inner.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # 1 / clip_grad_norm_'s factor


DOT_MIN = 4096  # gradients of at least this many values take a BLAS dot on the CPU (grad_norm)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the gradients together, as a device scalar. On a GPU one foreach call; on the CPU
    torch's foreach norm runs the tensors one at a time and a large one at a third of a BLAS dot's speed
    (145 vs 50 µs for the four 2,000 × 128 weight gradients of a scAtlasVAE step on 2 threads): the large
    ones' squared norms come from dots, the small ones' from one foreach call. No gradients: 0."""
    if not grads:
        return torch.zeros(())
    if grads[0].device.type != "cpu":
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    flat = [g.reshape(-1) for g in grads if g.numel() >= DOT_MIN]
    squares = [torch.dot(g, g) for g in flat]
    small = [g for g in grads if g.numel() < DOT_MIN]
    if small:
        squares.append(torch.stack(torch._foreach_norm(small)).square().sum())
    return torch.stack(squares).sum().sqrt()
