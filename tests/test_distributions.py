"""Likelihoods against scipy, sparse evaluation against the dense formula, finite gradients."""

import numpy as np
import pytest
import torch
from scipy import stats

from bigatlas.distributions import (
    Counts,
    digamma,
    lgamma,
    log_gamma_terms,
    log_nb_dense,
    log_zinb_dense,
    nll,
    nll_reference,
)

X = np.array([0, 1, 2, 5, 17, 100, 1000, 50_000], dtype=np.float64)
MU = np.array([1e-3, 0.1, 1.0, 10.0, 1e3, 1e5])
THETA = np.array([1e-3, 0.05, 1.0, 20.0, 1e4])


def grid():
    x, mu, theta = np.meshgrid(X, MU, THETA, indexing="ij")
    return x.ravel(), mu.ravel(), theta.ravel()


def scipy_nb(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_nb_matches_scipy():
    x, mu, theta = grid()
    got = log_nb_dense(*(torch.tensor(a) for a in (x, mu, theta)), eps=0.0).numpy()
    ref = scipy_nb(x, mu, theta)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate", [-8.0, -1.0, 0.0, 2.5])
def test_zinb_matches_scipy_mixture(gate):
    x, mu, theta = grid()
    pi = 1 / (1 + np.exp(-gate))
    ref = np.where(
        x == 0, np.log(pi + (1 - pi) * np.exp(scipy_nb(x, mu, theta))), np.log1p(-pi) + scipy_nb(x, mu, theta)
    )
    got = log_zinb_dense(
        *(torch.tensor(a) for a in (x, mu, theta)), torch.full((len(x),), gate, dtype=torch.float64), eps=0.0
    ).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def random_batch(seed=0, cells=64, genes=50, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mu = torch.exp(torch.randn(cells, genes, generator=g, dtype=dtype) * 2)
    theta = torch.exp(torch.randn(cells, genes, generator=g, dtype=dtype))
    x = torch.poisson(mu * (torch.rand(cells, genes, generator=g, dtype=dtype) > 0.6), generator=g)
    gate = torch.randn(cells, genes, generator=g, dtype=dtype)
    return x, mu, theta, gate


@pytest.mark.parametrize("zi", [False, True])
@pytest.mark.parametrize("per_gene", [False, True])
def test_sparse_evaluation_equals_dense(zi, per_gene):
    x, mu, theta, gate = random_batch()
    if per_gene:
        theta, gate = theta[0], gate[0]
    th = theta.expand_as(mu)
    ref = -(log_zinb_dense(x, mu, th, gate.expand_as(mu)) if zi else log_nb_dense(x, mu, th)).sum(1)
    got = nll(Counts.from_dense(x), mu, theta, gate if zi else None)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-8)


def test_sparse_csr_batches_give_the_same_counts():
    x, *_ = random_batch(dtype=torch.float32)
    x[0], x[9], x[-1] = 0, 0, 0  # empty rows, the first and last too
    a, b = Counts.from_dense(x), Counts.from_sparse_csr(x.to_sparse_csr())
    torch.testing.assert_close(a.library, b.library)
    assert torch.equal(a.dense, b.dense)
    assert sorted(zip(a.rows.tolist(), a.cols.tolist())) == sorted(zip(b.rows.tolist(), b.cols.tolist()))
    csr = x.to_sparse_csr()
    narrow = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape)
    for c in (a, b, Counts.from_sparse_csr(narrow)):  # int32 indices, as the loaders store them, too
        assert c.flat.dtype == torch.int64  # take and index_copy_ want it
        assert torch.equal(c.flat, c.rows.long() * x.shape[1] + c.cols.long())
        assert torch.equal(x.reshape(-1).take(c.flat), c.values)
    for c in (a, b):  # per-cell sums over the nonzeros (a segmented sum): 0 for the empty rows
        v = torch.randn(len(c.values), dtype=torch.float64)
        torch.testing.assert_close(c.row_sums(v), torch.zeros(len(x), dtype=v.dtype).index_add_(0, c.rows, v))
        assert float(c.row_sums(v)[0]) == float(c.row_sums(v)[-1]) == 0.0


def test_gradients_finite_at_extremes():
    x = torch.tensor([[0.0, 1.0, 50_000.0, 0.0]], dtype=torch.float32)
    mu = torch.tensor([[1e-6, 1e5, 1e-3, 1e6]], requires_grad=True)
    theta = torch.tensor([[1e-4, 1e4, 1e-3, 1e5]], requires_grad=True)
    gate = torch.tensor([[-20.0, 20.0, 0.0, 5.0]], requires_grad=True)
    loss = nll(Counts.from_dense(x), mu, theta, gate).sum()
    loss.backward()
    for t in (mu, theta, gate):
        assert torch.isfinite(t.grad).all()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("zi", [False, True])
@pytest.mark.parametrize("per_gene", [False, True])
def test_analytic_gradients_equal_autograd_of_the_reference(zi, per_gene):
    """nll computes its gradient by hand in the forward pass; autograd through nll_reference, op by
    op, is the truth. Weighted per-cell sum, so a wrong row scaling or a wrong per-gene reduction fails."""
    x, mu, theta, gate = random_batch(seed=3)
    x[7] = 0  # an empty cell
    if per_gene:
        theta, gate = theta[0].clone(), gate[0].clone()
    counts, w = Counts.from_dense(x), torch.randn(len(x), dtype=x.dtype)
    results = []
    for f in (nll, nll_reference):
        params = [t.clone().requires_grad_() for t in ((mu, theta, gate) if zi else (mu, theta))]
        value = f(counts, *params, *(() if zi else (None,)))
        results.append((value.detach(), torch.autograd.grad((value * w).sum(), params)))
    (v, grads), (v_ref, grads_ref) = results
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-9)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_nll_without_gradients_gives_the_same_value():
    x, mu, theta, gate = random_batch(seed=4, dtype=torch.float32)
    counts = Counts.from_dense(x)
    with torch.no_grad():
        a = nll(counts, mu, theta, gate)
    b = nll(counts, mu.requires_grad_(), theta, gate)
    assert torch.equal(a, b.detach())


def test_series_lgamma_matches_torch():
    y = torch.cat([torch.logspace(-6, 7, 2000, dtype=torch.float64), torch.arange(1, 300, dtype=torch.float64) + 0.5])
    torch.testing.assert_close(lgamma(y), torch.lgamma(y), rtol=1e-12, atol=1e-7)


def test_compiled_log_gamma_terms_are_as_accurate_as_torchs_float32():
    """The series torch.compile uses (log_gamma_terms under is_compiling) against float64 lgamma: as close
    as float32 torch.lgamma gets, over counts 1-10^5 and θ from the clamp's low end to its high end."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.poisson(torch.rand(5000, generator=g) * 5) + 1, torch.logspace(0, 5, 200).round()])
    theta = torch.exp(torch.empty(len(x)).uniform_(-12, 12, generator=g))
    ref = torch.lgamma(x.double() + theta.double()) - torch.lgamma(theta.double()) - torch.lgamma(x.double() + 1)
    eager = log_gamma_terms(x, theta)
    compiled = torch.compile(log_gamma_terms, dynamic=True, fullgraph=True)(x, theta)
    assert not torch.equal(compiled, eager)  # the series ran, not torch's lgamma
    err, err_eager = (compiled.double() - ref).abs().max(), (eager.double() - ref).abs().max()
    assert err <= err_eager, (float(err), float(err_eager))


def test_fast_digamma_matches_torch():
    y = torch.cat([torch.logspace(-6, 6, 500, dtype=torch.float64), torch.arange(1, 200, dtype=torch.float64) + 0.5])
    torch.testing.assert_close(digamma(y), torch.digamma(y), rtol=1e-9, atol=1e-9)
    y32 = y.float()
    torch.testing.assert_close(digamma(y32), torch.digamma(y32), rtol=2e-6, atol=2e-6)
