"""BatchNorm statistics gathered anew for the weights a run writes (bigatlas/norm_refresh.py): the average over
the minibatches for the weights as they are, no dropout, frozen layers untouched, ranks averaged."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigatlas.norm_refresh import refresh_batch_norms


class Net(nn.Module):
    frozen: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, momentum=0.01, eps=1e-3), nn.Dropout(0.5))
        self.b = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.01, eps=1e-3))

    def train(self, mode: bool = True):  # as the model's frozen_modules
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def forward(self, x):
        return self.b(self.a(x))


@pytest.fixture
def stale():
    """A net whose running statistics belong to other weights (those before its first layer was scaled), and
    four minibatches of 32 cells."""
    torch.manual_seed(0)
    net, x = Net(), torch.randn(128, 5) * 3 + 1
    batches = list(x.split(32))
    net.train()
    with torch.no_grad():
        for _ in range(20):
            for b in batches:
                net(b)
        net.a[0].weight.mul_(2.0)
    return net.eval(), batches


def expected(net: Net, batches):
    """Each layer's statistics as the minibatches give them to the net as it is, in training mode without
    dropout: the mean over minibatches of each one's mean and unbiased variance."""
    stats = {"a": [], "b": []}
    with torch.no_grad():
        for x in batches:
            h = net.a[0](x)
            stats["a"].append((h.mean(0), h.var(0)))
            n = F.batch_norm(h, None, None, net.a[1].weight, net.a[1].bias, training=True, eps=net.a[1].eps)
            g = net.b[0](n)  # no dropout
            stats["b"].append((g.mean(0), g.var(0)))
    return {k: tuple(torch.stack(s).mean(0) for s in zip(*v)) for k, v in stats.items()}


def test_statistics_are_the_minibatch_average_for_the_weights_as_they_are_without_dropout(stale):
    net, batches = stale
    want = expected(net, batches)
    assert not torch.allclose(net.a[1].running_mean, want["a"][0], atol=1e-2)  # stale before
    assert refresh_batch_norms(net, iter(batches), net, steps=len(batches)) == len(batches)
    for name in ("a", "b"):
        norm = getattr(net, name)[1]
        torch.testing.assert_close(norm.running_mean, want[name][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm.running_var, want[name][1], rtol=1e-5, atol=1e-5)
        assert norm.momentum == 0.01  # training's momentum back
    assert not net.training  # the mode it had
    assert all(p.grad is None for p in net.parameters())


def test_steps_bound_the_minibatches_used(stale):
    net, batches = stale
    want = expected(net, batches[:2])
    assert refresh_batch_norms(net, iter(batches), net, steps=2) == 2
    torch.testing.assert_close(net.a[1].running_mean, want["a"][0], rtol=1e-5, atol=1e-5)


def test_frozen_layers_and_a_run_without_minibatches_keep_their_statistics(stale):
    net, batches = stale
    net.frozen = ("b",)
    before = copy.deepcopy(net.state_dict())
    assert refresh_batch_norms(net, iter([]), net, steps=4) == 0
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert net.a[1].momentum == 0.01
    refresh_batch_norms(net, iter(batches), net, steps=4)
    torch.testing.assert_close(net.b[1].running_mean, before["b.1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(net.a[1].running_mean, expected(net, batches)["a"][0], rtol=1e-5, atol=1e-5)


def test_two_ranks_end_with_the_mean_of_their_own_statistics(stale):
    """Two ranks (threads here) each gather over their share, and a reduce that every rank joins averages them."""
    net, batches = stale
    nets = [copy.deepcopy(net) for _ in range(2)]
    alone = [copy.deepcopy(net) for _ in range(2)]
    shares = [batches[:2], batches[2:]]
    for n, share in zip(alone, shares):
        refresh_batch_norms(n, iter(share), n, steps=2)
    barrier, slots = threading.Barrier(2), [None, None]

    def reduce_for(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            out = (slots[0] + slots[1]) / 2
            barrier.wait()
            return out

        return reduce

    threads = [
        threading.Thread(target=refresh_batch_norms, args=(n, iter(s), n, 2, reduce_for(r)))
        for r, (n, s) in enumerate(zip(nets, shares))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for name in ("a.1.running_mean", "a.1.running_var", "b.1.running_mean", "b.1.running_var"):
        want = (alone[0].state_dict()[name] + alone[1].state_dict()[name]) / 2
        for n in nets:
            torch.testing.assert_close(n.state_dict()[name], want, rtol=1e-6, atol=1e-6)
