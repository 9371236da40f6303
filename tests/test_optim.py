"""The optimizer (optim.py): torch's fused AdamW with one step count per parameter group."""

import io

import pytest
import torch

from bigatlas.config import TrainConfig
from bigatlas.optim import GroupStepAdamW, make_optimizer


def fused_adamw_available() -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


pytestmark = pytest.mark.skipif(not fused_adamw_available(), reason="this torch has no fused AdamW")


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((5, 3), (3,), (4, 5), (1,))]


def test_shared_step_count_makes_torchs_fused_update_bit_for_bit():
    """Ten steps with a clipping factor (grad_scale), a skipped step (found_inf), a learning-rate cut, a
    parameter without a gradient for one step (torch's own step then), and the optimizer's state sent
    through torch.save and loaded into a new one mid-run: the weights and moments equal torch's fused
    AdamW's exactly, and every parameter's count is the number of its updates."""
    ours_p, theirs_p = params(), params()
    settings = {"lr": 0.01, "weight_decay": 0.1, "eps": 1e-3, "fused": True}
    ours, theirs = GroupStepAdamW(ours_p, **settings), torch.optim.AdamW(theirs_p, **settings)
    g = torch.Generator().manual_seed(1)
    updates = [0] * len(ours_p)
    for t in range(10):
        grads = [torch.randn(p.shape, generator=g) * (t + 1) for p in ours_p]
        if t == 6:
            grads[3] = None  # no gradient: this parameter is left alone
        skip = torch.tensor(1.0 if t == 3 else 0.0)
        for opt, ps in ((ours, ours_p), (theirs, theirs_p)):
            for p, gr in zip(ps, grads):
                p.grad = None if gr is None else gr.clone()
            opt.grad_scale, opt.found_inf = torch.tensor(1.0 + t / 4), skip.clone()
            if t == 5:
                opt.param_groups[0]["lr"] = 0.004
            opt.step()
        updates = [u + (t != 3 and gr is not None) for u, gr in zip(updates, grads)]
        if t == 4:  # a checkpoint round trip: the counts come back as separate tensors
            buf = io.BytesIO()
            torch.save(ours.state_dict(), buf)
            ours = GroupStepAdamW(ours_p, **settings)
            buf.seek(0)
            ours.load_state_dict(torch.load(buf, weights_only=True))
        for a, b in zip(ours_p, theirs_p):
            assert torch.equal(a, b), t
    for p, q, n in zip(ours_p, theirs_p, updates):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[p][key], theirs.state[q][key]), key
        assert float(ours.state[p]["step"]) == n
    assert updates[3] == updates[0] - 1


def test_one_count_per_group_moves_once_per_step():
    """The count is one tensor for the group's parameters (what saves torch's per-parameter calls)."""
    ps = params()
    opt = make_optimizer(ps, TrainConfig())
    assert isinstance(opt, GroupStepAdamW)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    counts = {id(opt.state[p]["step"]) for p in ps}
    assert len(counts) == 1 and float(opt.state[ps[0]]["step"]) == 3


def test_tiny_moments_become_zero_and_the_rest_stay():
    from bigatlas.optim import TINY_MOMENT, zero_tiny_moments

    p = torch.nn.Parameter(torch.zeros(6))
    opt = make_optimizer([p], TrainConfig())
    values = torch.tensor([1e-39, -1e-35, 0.5 * TINY_MOMENT, 2 * TINY_MOMENT, -0.25, 0.0])
    opt.state[p].update(exp_avg=values.clone(), exp_avg_sq=values.abs(), step=torch.tensor(3.0))
    zero_tiny_moments(opt)
    kept = torch.tensor([0.0, 0.0, 0.0, 2 * TINY_MOMENT, -0.25, 0.0])
    assert torch.equal(opt.state[p]["exp_avg"], kept) and torch.equal(opt.state[p]["exp_avg_sq"], kept.abs())
    assert float(opt.state[p]["step"]) == 3.0


def test_a_weight_without_gradient_keeps_no_subnormal_moment():
    """A weight whose gradient turns 0 (a dead unit's) keeps a first moment that decays by beta1 a step: without
    the pass it becomes subnormal within ~1,000 steps; with it every 50 steps (as train_step) it ends exactly 0."""
    from bigatlas.optim import TINY_EVERY, zero_tiny_moments

    def run(passes: bool) -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(4))
        opt = make_optimizer([p], TrainConfig())
        for step in range(1, 1001):
            p.grad = torch.ones(4) if step == 1 else torch.zeros(4)
            opt.step()
            if passes and step % TINY_EVERY == 0:
                zero_tiny_moments(opt)
        return opt.state[p]["exp_avg"]

    tiny = torch.finfo(torch.float32).tiny
    without = run(False)
    assert bool(((without != 0) & (without.abs() < tiny)).all())
    assert bool((run(True) == 0).all())
