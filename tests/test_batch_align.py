"""The batch alignment (ModelConfig.batch_align): its pairs are the mutual nearest neighbours of other batches,
its gradient pulls each cell's latent mean to its partners', training steps fill its pool with their training
cells, the held-out loss leaves it out, and it takes the batch out of the latent and keeps the types (a whole
run and a query: test_batch_options)."""

import pytest
import torch
from batch_toy import toy, toy_scores

from bigatlas.config import ModelConfig
from bigatlas.model import ALIGN_POOL, VAEModule


def partners_by_definition(mu, code, pool, pool_code):
    """Per cell, the mean of its partners in [mu; pool] by loops over the definition (None: no partner):
    j of another batch is i's partner when j is the nearest to i of j's batch and i the nearest to j of i's."""
    every, codes = torch.cat([mu, pool]), torch.cat([code, pool_code])
    d = torch.cdist(every, every)
    n = len(every)

    def nearest(x, y, batch):  # whether y is x's nearest of `batch` (x itself excluded)
        return all(d[x, y] <= d[x, o] for o in range(n) if o != x and codes[o] == batch)

    out = []
    for i in range(len(mu)):
        found = [
            j
            for j in range(n)
            if j != i and codes[i] >= 0 and codes[j] >= 0 and codes[j] != codes[i]
            and nearest(i, j, codes[j]) and nearest(j, i, codes[i])
        ]  # fmt: skip
        out.append(every[found].mean(0) if found else None)
    return out


@pytest.mark.parametrize("batches,cells,seed", [(2, 9, 0), (3, 12, 1), (6, 30, 2), (6, 30, 3)])
def test_the_pairs_are_mutual_nearest_neighbours_of_other_batches_and_the_gradient_pulls_to_them(batches, cells, seed):
    """Against loops over the definition, on a pool with unused slots (code −1) and held-out cells: each cell's
    term is its squared distance to its partners' mean (0 without a partner), and its gradient reaches the cell's
    own latent mean only, as 2 × (mean − partners' mean)."""
    g = torch.Generator().manual_seed(seed)
    m = VAEModule(10, [batches], [], ModelConfig(batch_align=1.0, n_latent=4)).eval()
    m.align_pool[:60] = torch.randn(60, 4, generator=g)
    m.align_codes[:60] = torch.randint(-1, batches, (60,), generator=g)
    mu = torch.randn(cells, 4, generator=g).requires_grad_()
    codes = torch.randint(0, batches, (cells, 1), generator=g)
    mask = torch.rand(cells, generator=g) < 0.8
    got = m._align_term(mu, codes, mask)
    want = partners_by_definition(
        mu.detach(), torch.where(mask, codes[:, 0], -1), m.align_pool[:60], m.align_codes[:60]
    )
    assert sum(t is not None for t in want) >= 2  # the case has pairs to find
    for i, target in enumerate(want):
        expected = 0.0 if target is None else float(((mu[i].detach() - target) ** 2).sum())
        assert got[i].item() == pytest.approx(expected, abs=1e-5), i
    got.sum().backward()
    for i, target in enumerate(want):
        expected = torch.zeros(4) if target is None else 2 * (mu[i].detach() - target)
        assert torch.allclose(mu.grad[i], expected, atol=1e-5), i


def test_training_steps_fill_the_pool_with_their_training_cells_and_the_loss_adds_the_term():
    """A training forward writes its training cells' latent means and batches into the next slots of the ring
    (held-out cells with code −1) and wraps at its end; an evaluation forward leaves the pool. The training
    loss is the model's own plus batch_align × the term; the held-out loss is the model's own."""
    torch.manual_seed(0)
    w = 3.0
    m = VAEModule(40, [2], [], ModelConfig(batch_align=w))
    counts, codes, _ = toy(cells=1500)
    held_out = torch.arange(1500) % 5 == 0
    m.eval()
    out = m(counts, codes, cell_mask=~held_out, eval_mask=held_out, kl_weight=0.3)
    assert (m.align_codes == -1).all() and int(m.align_next) == 0  # evaluation: the pool is left as it was
    t = out.terms
    assert torch.isclose(t["loss"], t["recon"] + 0.3 * t["kl"] + t["gate"] + w * t["align"])
    assert torch.isclose(t["val_loss"], t["val_recon"] + t["val_kl"] + t["val_gate"])
    assert t["align"] > 0 and t["val_align"] == 0  # held-out cells are neither pulled nor partners

    m.train()
    for step in range(2):
        m(counts, codes, cell_mask=~held_out, eval_mask=held_out, kl_weight=0.3)
        means = m.encode(counts)[0].detach()  # BatchNorm in training mode: the forward's own statistics
        slots = (step * 1500 + torch.arange(1500)) % ALIGN_POOL
        assert torch.allclose(m.align_pool[slots], means, atol=1e-5)
        assert torch.equal(m.align_codes[slots], torch.where(held_out, -1, codes[:, 0]))
    assert int(m.align_next) == 3000 % ALIGN_POOL


@pytest.mark.parametrize("seed", [1, 2])
def test_the_alignment_takes_the_batch_out_of_the_latent_and_keeps_the_types(seed):
    """The adversary's toy (a KL weight low enough that the latent keeps the batch): a fresh classifier tells the
    batch apart 75-88% of the time without the alignment on seeds 1-3, 60-64% with it at weight 10 (chance: ~50%),
    and every type as separable (98.7-100%)."""
    scores = {w: toy_scores(seed, batch_align=w) for w in (0.0, 10.0)}
    assert scores[0.0][0] >= 0.72, scores  # the latent without the alignment holds the batch
    assert scores[10.0][0] <= min(0.70, scores[0.0][0] - 0.08), scores
    assert scores[10.0][1] >= 0.95 and scores[0.0][1] >= 0.95, scores
