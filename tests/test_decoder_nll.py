"""The fused reconstruction loss (decoder_nll.logit_nll, torch.compile) against softmax, exp and sigmoid
followed by the eager likelihood (distributions.nll): values and gradients, every dispersion and gate."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from bigatlas import distributions
from bigatlas.decoder_nll import logit_nll
from bigatlas.distributions import Counts, nll

RANGE = (-12.0, 12.0)


def decoder_batch(seed, cells, genes=300, theta_per_gene=False, gate="gene-cell"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(cells, genes, generator=g) * 2
    library = torch.randint(500, 5000, (cells, 1), generator=g).float()
    x = torch.poisson(F.softmax(logits, -1) * library * 2 * torch.rand(cells, genes, generator=g), generator=g)
    x[3] = 0  # a cell without counts
    log_theta = torch.randn(genes if theta_per_gene else (cells, genes), generator=g) * 3
    log_theta.view(-1)[:7] = torch.tensor([12.5, -13.0, 12.0, -12.0, 40.0, 11.9, -11.9])  # at / past the clamp
    gates = {"none": None, "gene": torch.randn(genes, generator=g), "gene-cell": torch.randn(cells, genes, generator=g)}
    # the training batches' form: values are a view of a CSR tensor
    return Counts.from_sparse_csr(x.to_sparse_csr()), (logits, log_theta, gates[gate])


def eager(counts, logits, log_theta, gate):
    mu = F.softmax(logits, dim=-1) * counts.library.unsqueeze(1)
    recon = nll(counts, mu, torch.exp(log_theta.clamp(*RANGE)), gate)
    per_cell_gate = gate is not None and gate.dim() == 2
    return recon, torch.sigmoid(gate).sum(-1) if per_cell_gate else torch.zeros_like(recon)


def fused(counts, logits, log_theta, gate, w=None, w_pen=None):
    """(NLL, penalty) per cell without gradient and the loss Σ w·NLL + Σ w_pen·penalty with it."""
    w = torch.ones(len(counts)) if w is None else w
    return logit_nll(counts, logits, log_theta, gate, RANGE, w, w if w_pen is None else w_pen)


def value_and_grads(f, counts, params, w, w_pen, upstream=1.0):
    """Per-cell NLL and penalty, and the gradients of upstream × (Σ w·NLL + Σ w_pen·penalty)."""
    params = [None if t is None else t.clone().requires_grad_() for t in params]
    if f is fused:
        recon, penalty, loss = fused(counts, *params, w, w_pen)
    else:
        recon, penalty = f(counts, *params)
        loss = (recon * w).sum() + (penalty * w_pen).sum()
    grads = torch.autograd.grad(upstream * loss, [t for t in params if t is not None])
    return recon.detach(), penalty.detach(), grads


@pytest.mark.parametrize(
    "theta_per_gene,gate", [(False, "gene-cell"), (True, "gene-cell"), (False, "gene"), (False, "none")]
)
def test_fused_reconstruction_equals_softmax_exp_and_the_eager_likelihood(theta_per_gene, gate):
    """As accurate as the eager float32 ops, for two batch sizes (one compilation, dynamic shapes): the
    per-cell NLL, the gate penalty, and the gradients in logits, log θ (0 where clamped) and gate logits,
    under different per-cell weights of the NLL and of the penalty, each held to the float64 eager
    value (the log θ gradient of a large θ cancels digammas: both float32 paths lose digits there)."""
    for seed, cells in ((5, 96), (6, 37)):
        counts, params = decoder_batch(seed, cells, theta_per_gene=theta_per_gene, gate=gate)
        g = torch.Generator().manual_seed(seed)
        w, w_pen = torch.rand(cells, generator=g), torch.rand(cells, generator=g)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "torch.compile of")  # a failure falls back with a warning: not here
            got = value_and_grads(fused, counts, params, w, w_pen)
        eager32 = value_and_grads(eager, counts, params, w, w_pen)
        counts64 = Counts.from_sparse_csr(counts.csr.to(torch.float64))
        params64 = [None if t is None else t.double() for t in params]
        ref = value_and_grads(eager, counts64, params64, w.double(), w_pen.double())
        for a, b, r in zip((got[0], got[1], *got[2]), (eager32[0], eager32[1], *eager32[2]), (ref[0], ref[1], *ref[2])):
            err, err_eager = (a.double() - r).abs().max(), (b.double() - r).abs().max()
            assert err <= 2 * err_eager + 1e-6 * r.abs().max(), (float(err), float(err_eager))
        theta_grad = got[2][1].view(-1)
        assert float(theta_grad[0]) == float(theta_grad[1]) == float(theta_grad[4]) == 0.0  # clamped: none
        with torch.no_grad():
            torch.testing.assert_close(fused(counts, *params)[0], got[0], rtol=1e-6, atol=1e-4)
        # an upstream gradient other than training's 1 scales every gradient
        scaled = value_and_grads(fused, counts, params, w, w_pen, upstream=2.5)
        for a, b in zip(scaled[2], got[2]):
            torch.testing.assert_close(a, 2.5 * b)


def test_a_compiler_failure_warns_once_and_runs_uncompiled(monkeypatch):
    """Every fused function falls back; one warning names the first failure."""

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return call

    monkeypatch.setattr(distributions, "_FUSED", {})
    monkeypatch.setattr(distributions._Fused, "warned", False)
    monkeypatch.setattr(distributions.torch, "compile", broken_compile)
    counts, params = decoder_batch(7, 40)
    params = [t.requires_grad_() for t in params]
    ref = eager(counts, *params)
    with pytest.warns(UserWarning, match=r"torch.compile of _forward_terms failed \(RuntimeError: InvalidCxxCompiler"):
        got = fused(counts, *params)
    torch.testing.assert_close(got[:2], ref, rtol=1e-5, atol=1e-3)
    got[2].backward()  # the gradient pass's fused function falls back too
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "torch.compile of")  # later calls: no new warning, still uncompiled
        torch.testing.assert_close(fused(counts, *params)[:2], ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("theta_per_gene,gate", [(False, "gene-cell"), (True, "gene")])
def test_bfloat16_decoder_outputs_are_read_as_float32_and_get_bfloat16_gradients(theta_per_gene, gate):
    """The decoder's heads in bfloat16 (bf16 products, autocast): the fused loss reads them as float32, so its
    values equal the float32 loss of the same (rounded) numbers, and hands each gradient back in its input's
    dtype: bfloat16 ones that are the float32 gradients rounded."""
    counts, params = decoder_batch(8, 64, theta_per_gene=theta_per_gene, gate=gate)
    low = [None if t is None else (t.bfloat16() if t.dim() == 2 else t) for t in params]  # per-gene stay float32
    rounded = [None if t is None else t.float() for t in low]
    w, w_pen = torch.rand(64), torch.rand(64)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "torch.compile of")  # the compiled bfloat16 path, not the fallback
        got, ref = value_and_grads(fused, counts, low, w, w_pen), value_and_grads(fused, counts, rounded, w, w_pen)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-4)
    for t, g, r in zip([t for t in low if t is not None], got[2], ref[2]):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.float(), r.to(g.dtype).float(), rtol=2**-7, atol=1e-6 * float(r.abs().max()))


def test_a_count_where_the_mean_is_below_eps_is_scored_at_that_mean():
    """log μ comes from the logits (logit − max + log(library / Σ exp)), not log(μ + ε): a count at a gene whose
    mean is far below ε = 1e-8, which log(μ + ε) would floor at −18.4, scores as scipy's NB at that mean."""
    import numpy as np
    from scipy.stats import nbinom

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50, generator=g)
    logits[:, 7] = -25.0  # μ ~ 1e-11 there
    x = torch.poisson(torch.full((4, 50), 3.0), generator=g)
    x[:, 7] = 1.0
    log_theta = torch.randn(50, generator=g)
    counts = Counts.from_sparse_csr(x.to_sparse_csr())
    with torch.no_grad():
        got = fused(counts, logits, log_theta, None)[0].double().numpy()
    mu = (F.softmax(logits.double(), -1) * x.sum(1, keepdim=True).double()).numpy()
    theta = log_theta.double().exp().numpy()
    assert mu[:, 7].max() < 1e-9
    want = -nbinom.logpmf(x.numpy(), theta, theta / (theta + mu)).sum(1)
    np.testing.assert_allclose(got, want, rtol=2e-5)
