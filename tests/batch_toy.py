"""Shared by the tests of the batch-mixing options (test_batch_adversary, test_batch_align): a toy whose latent
holds the batch unless something takes it out, a probe of what a latent holds, and a reference and a query
with new studies to map."""

import anndata as ad
import torch
import torch.nn.functional as F

from bigatlas.config import ModelConfig
from bigatlas.distributions import Counts
from bigatlas.model import VAEModule
from bigatlas.synth import synth


def toy(seed=0, cells=600, genes=40):
    """Three types; the second of two batches quadruples half the genes."""
    g = torch.Generator().manual_seed(seed)
    types = torch.randint(0, 3, (cells,), generator=g)
    batch = torch.randint(0, 2, (cells,), generator=g)
    programme = torch.rand(3, genes, generator=g) * 3 + 0.2
    shift = torch.ones(2, genes)
    shift[1, : genes // 2] = 4.0
    return Counts.from_dense(torch.poisson(programme[types] * shift[batch], generator=g)), batch[:, None], types


def probe(z, y, steps=300) -> float:
    """Held-out accuracy of a fresh small classifier of y from z (trained on one half, scored on the other)."""
    torch.manual_seed(0)
    n = len(z) // 2
    clf = torch.nn.Sequential(torch.nn.Linear(z.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, int(y.max()) + 1))
    opt = torch.optim.Adam(clf.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(clf(z[:n]), y[:n]).backward()
        opt.step()
    return float((clf(z[n:]).argmax(1) == y[n:]).float().mean())


def toy_scores(seed: int, **model) -> tuple[float, float]:
    """How well a fresh classifier tells the batch and the type from the toy's latent after 300 steps at a KL
    weight low enough that the latent keeps the batch (8 latent dimensions; ModelConfig settings from `model`,
    without the batch-by-state term unless they ask for it). On one thread, as an xdist worker has: the tests'
    numbers were measured so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts, codes, types = toy(seed)
        torch.manual_seed(0)
        m = VAEModule(40, [2], [], ModelConfig(n_latent=8, **{"batch_interaction": False, **model})).train()
        opt = torch.optim.Adam(m.parameters(), 3e-3)
        for _ in range(300):
            i = torch.randint(0, len(types), (128,))
            opt.zero_grad()
            m(Counts.from_dense(counts.dense[i]), codes[i], kl_weight=0.01).total.backward()
            opt.step()
        z = m.eval().latent(counts)
        return probe(z, codes[:, 0]), probe(z, types)
    finally:
        torch.set_num_threads(threads)


def reference_and_query(tmp_path):
    """A small reference store (3 studies) and a query AnnData of 2 studies the reference lacks."""
    data, query = tmp_path / "ref.zarr", tmp_path / "query.zarr"
    synth(data, 400, 60, "zarr", seed=3, n_studies=3, donors_per_study=2)
    synth(query, 200, 60, "zarr", seed=5, n_studies=2, donors_per_study=1)
    query = ad.read_zarr(query)
    query.obs["dataset_id"] = ("q_" + query.obs["dataset_id"].astype(str)).astype("category")  # new studies
    return data, query
