"""Negative binomial and zero-inflated NB log-likelihoods, mean/inverse-dispersion parameterised.

NB(x; μ, θ):  log p = θ log(θ/(θ+μ)) + x log(μ/(θ+μ)) + lgamma(x+θ) − lgamma(θ) − lgamma(x+1)
ZINB with gate logit g (π = sigmoid(g), the structural-zero probability):
  x = 0: log(π + (1−π) NB(0)) = softplus(−g + log NB(0)) − softplus(−g)
  x > 0: log(1−π) + log NB(x)  = −softplus(g) + log NB(x)

The counts are sparse (~5-30% nonzero), so `nll` evaluates the x = 0 expression densely — it needs no
lgamma — and adds, only at the nonzero entries, the difference to the x > 0 expression. lgamma and
its derivative digamma, the most expensive ops of a step, then run on the nonzeros alone, and
lgamma(x+1) (no gradient) likewise. `nll` computes the gradient in the same forward pass from the
quantities the value needs anyway (digamma by a vectorised series: torch's runs scalar on CPU), so
autograd keeps no tape of cells × genes temporaries; `nll_reference` is the op-by-op version the tests
hold it to. The value and gradient come from two pure elementwise functions (zero_terms over every
entry, nonzero_terms over the nonzeros), which decoder_nll composes with the decoder's softmax and exp
for torch.compile to fuse (training runs with --compile-loss); where compiled, lgamma is a vectorised
series too (log_gamma_terms). fwd + bwd for 128 cells × 2,000 genes, 30% nonzero, 2 threads (median
ms): 4.9 eager, 6.0 the previous in-place version (which gathered dense intermediates), 8.1 autograd
op by op.
This is the correct NB: the original scAtlasVAE used logits
μ − log θ instead of log μ − log θ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .device_copy import csr_to_device

EPS = 1e-8


class Counts:
    """One minibatch of counts: its nonzero entries (for the likelihood) and the matrix itself as a
    sparse CSR tensor or a dense one (for the encoder, which reads CSR without densifying)."""

    def __init__(self, rows, cols, values, library, n_genes: int, csr=None, dense=None):
        self.rows, self.cols, self.values, self.library = rows, cols, values, library  # (nnz,) ×3, (cells,)
        self.n_genes, self.csr, self._dense = n_genes, csr, dense
        if csr is not None:  # where each cell's nonzeros start (rows are sorted), and the end
            self.offsets = csr.crow_indices()
        else:
            self.offsets = F.pad(torch.bincount(rows, minlength=len(library)).cumsum(0), (1, 0))
        # each nonzero's index into the flattened (cells, genes) matrix (int64: take and index_copy_ want it)
        if cols.device.type == "cpu":
            # numpy, on this thread (see from_sparse_csr): each row's offset repeated over its nonzeros, plus the
            # column, with the indices in their stored width (0.18 vs 0.28 ms at 128 × 80k nonzeros for int64
            # rows × genes + cols)
            flat = np.repeat(np.arange(len(library), dtype=np.int64) * n_genes, np.diff(self.offsets.numpy()))
            flat += cols.numpy()
            self.flat = torch.from_numpy(flat)
        else:
            self.flat = torch.add(cols.long(), rows.long(), alpha=n_genes)

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> Counts:
        rows, cols = torch.nonzero(x, as_tuple=True)
        return cls(rows, cols, x[rows, cols], x.sum(1), x.shape[1], dense=x)

    @classmethod
    def from_sparse_csr(cls, x: torch.Tensor, device=None) -> Counts:
        """From a torch.sparse_csr batch, moved to `device` as it is (never densified on the CPU)."""
        x = csr_to_device(x, device) if device is not None else x
        rows, library = csr_rows_and_library(x)
        # on the CPU numpy, on this thread: torch's int64 conversion and add run as OpenMP teams, whose threads
        # wait on each other while other threads hold the cores (an epoch's 391 batches of 80k values with another
        # process on both cores: 0.13 vs 4.8 s; no change in bench.train's epoch on an idle machine). There the row
        # and column indices stay as stored (int32 from the loaders): they only index.
        cols = x.col_indices()
        cols = cols if cols.device.type == "cpu" else cols.long()
        return cls(rows, cols, x.values(), library, x.shape[1], csr=x)

    @property
    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.csr.to_dense()
        return self._dense

    def row_sums(self, v: torch.Tensor) -> torch.Tensor:
        """Per-cell sums of a value per nonzero: a segmented sum over the sorted rows (0.04 vs 0.15 ms for
        index_add_ at 128 cells × 46k nonzeros on CPU, where index_add_ runs serially)."""
        return torch.segment_reduce(v, "sum", offsets=self.offsets)

    def __len__(self) -> int:
        return int(self.library.shape[0])


def csr_rows_and_library(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row index of every stored value of a sparse CSR tensor, and each row's total."""
    crow, values = x.crow_indices().long(), x.values()
    if x.device.type == "cpu":  # numpy: 0.04 vs 0.24 ms for 128 cells with torch's kernels (bench.train O1)
        starts, sizes, v = crow.numpy()[:-1], np.diff(crow.numpy()), values.detach().numpy()
        # the indices' own width (int32 from the loaders): rows only index, as the columns do
        rows = np.repeat(np.arange(x.shape[0], dtype=x.col_indices().numpy().dtype), sizes)
        # a start past the end (empty last rows) needs a 0 appended (a copy); reduceat gives an empty row
        # the value at its start
        if len(starts) and starts[-1] >= len(v):
            v = np.append(v, v.dtype.type(0))
        sums = np.add.reduceat(v, starts, dtype=np.float64) if len(starts) else starts
        library = np.where(sizes > 0, sums, 0.0)
        return torch.from_numpy(rows), torch.from_numpy(library).to(values.dtype)
    # output_size: without it a GPU waits for the device to learn how many values there are
    rows = torch.repeat_interleave(
        torch.arange(x.shape[0], device=crow.device), crow[1:] - crow[:-1], output_size=values.numel()
    )
    return rows, torch.zeros(x.shape[0], device=values.device, dtype=values.dtype).index_add_(0, rows, values)


def log_nb_dense(x, mu, theta, eps: float = EPS):
    """Elementwise log NB(x; mu, theta) — the plain formula, for reference and small inputs."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_zinb_dense(x, mu, theta, gate_logits, eps: float = EPS):
    """Elementwise log ZINB — the plain formula, for reference and small inputs."""
    nb0 = theta * (torch.log(theta + eps) - torch.log(theta + mu + eps))
    zero = F.softplus(-gate_logits + nb0) - F.softplus(-gate_logits)
    nonzero = -F.softplus(gate_logits) + log_nb_dense(x, mu, theta, eps)
    return torch.where(x == 0, zero, nonzero)


class _TakeUnique(torch.autograd.Function):
    """t.flatten()[flat] for indices without repeats: the backward is a plain scatter into zeros, not
    the accumulating (sorting) index_put that advanced indexing falls back to."""

    @staticmethod
    def forward(ctx, t, flat):
        ctx.shape = t.shape
        ctx.save_for_backward(flat)
        return t.reshape(-1).take(flat)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        return write_at(grad.new_zeros(ctx.shape), flat, grad), None


def write_at(dense: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """dense (contiguous, any shape) with values written at the flat positions, in place. index_copy_: on
    the CPU scatter_ takes 1.5× as long in float32 and converts the whole bfloat16 tensor to float32 and
    back (~40 vs 60 / 120 µs alone for 80k values into 128 × 2,000; a training step 5% faster)."""
    dense.view(-1).index_copy_(0, flat, values)
    return dense


def _at(t: torch.Tensor, counts: Counts) -> torch.Tensor:
    """Values of a (cells, genes) or (genes,) tensor at the nonzero positions."""
    if t.dim() == 1:
        return t[counts.cols]
    return _TakeUnique.apply(t, counts.flat)


def nll_reference(
    counts: Counts, mu: torch.Tensor, theta: torch.Tensor, gate_logits: torch.Tensor | None = None, eps: float = EPS
) -> torch.Tensor:
    """nll through autograd, op by op: the reference that tests hold the analytic gradients of nll to.

    mu: (cells, genes); theta and gate_logits: (cells, genes) or (genes,). Only mu, theta and the gate
    are gathered at the nonzeros; every nonzero-only term is recomputed from those gathered values.
    """
    x = counts.values
    log_theta = torch.log(theta + eps)
    log_theta_mu = torch.log(theta + mu + eps)
    nb0 = theta * (log_theta - log_theta_mu)  # log NB(0), every entry
    if gate_logits is None:
        zero = nb0
    else:
        neg_gate = -gate_logits
        zero = F.softplus(neg_gate + nb0) - F.softplus(neg_gate)
    per_cell = zero.sum(1)  # (cells, genes): mu is always per cell
    # at the nonzeros: replace the x = 0 term by the x > 0 term, from gathered mu, theta, gate
    mu_nz, theta_nz = _at(mu, counts), _at(theta, counts)
    lt_mu_nz = torch.log(theta_nz + mu_nz + eps)
    nb0_nz = theta_nz * (torch.log(theta_nz + eps) - lt_mu_nz)
    nonzero = (
        nb0_nz
        + x * (torch.log(mu_nz + eps) - lt_mu_nz)
        + torch.lgamma(x + theta_nz)
        - torch.lgamma(theta_nz)
        - torch.lgamma(x + 1)
    )
    if gate_logits is None:
        zero_nz = nb0_nz
    else:
        g_nz = _at(gate_logits, counts)
        zero_nz = F.softplus(nb0_nz - g_nz) - F.softplus(-g_nz)
        nonzero = nonzero - F.softplus(g_nz)
    return -per_cell.index_add(0, counts.rows, nonzero - zero_nz)


def digamma(y: torch.Tensor) -> torch.Tensor:
    """ψ(y) for y > 0 in ~20 vectorised passes: ψ(y) = ψ(y+6) − Σ_{k<6} 1/(y+k), then the asymptotic
    series at y+6 (relative error < 1e-6 in float32, like torch.digamma, which runs scalar on CPU
    and took 1 ms per 94k nonzeros against 0.33 here). The six reciprocals as two of three terms each,
    1/t + 1/(t+1) + 1/(t+2) = ((3t + 6) t + 2) / (t (t+1) (t+2)), and one of w = y+6 for the series:
    three divisions instead of eight, the costliest vector op left in the nonzeros' pass."""
    b = y + 3.0
    acc = ((3.0 * y + 6.0) * y + 2.0) / (y * (y + 1.0) * (y + 2.0))
    acc = acc + ((3.0 * b + 6.0) * b + 2.0) / (b * (b + 1.0) * (b + 2.0))
    w = y + 6.0
    inv = w.reciprocal()
    f = inv * inv
    poly = f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f / 132))))
    return torch.log(w) - 0.5 * inv - poly - acc


def _stirling(w: torch.Tensor) -> torch.Tensor:
    """The series part of log Γ(w) − ((w − ½) log w − w + ½ log 2π), w ≥ 6 (error < 1e-9), from one
    reciprocal of w (which log_gamma_terms' x / w shares in a compiled loop)."""
    r = w.reciprocal()
    f = r * r
    return (1 / 12 - f * (1 / 360 - f * (1 / 1260 - f / 1680))) * r


def lgamma(y: torch.Tensor) -> torch.Tensor:
    """log Γ(y), y > 0: Stirling's series at y, or at y + 6 less log y(y+1)…(y+5) below 6."""
    small = y < 6.0
    w = torch.where(small, y + 6.0, y)
    shift = torch.where(small, torch.log(y * (y + 1.0) * (y + 2.0) * (y + 3.0) * (y + 4.0) * (y + 5.0)), 0.0)
    return (w - 0.5) * torch.log(w) - w + 0.5 * math.log(2 * math.pi) + _stirling(w) - shift


def log_gamma_terms(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """lgamma(x + θ) − lgamma(θ) − lgamma(x + 1), the NB's normalising terms at the nonzeros (x ≥ 1).

    Eagerly torch's lgamma. Where torch.compile fuses it into a loop (torch.compiler.is_compiling), a
    vectorised series instead (torch's lgamma runs scalar on CPU): the first difference as one expression,
    (w+x−½) log1p(x/w) + x (log w − 1) + the series' difference, w = θ (+6 below 6, less
    log Π_k<6 (θ+x+k)/(θ+k)), which also keeps the digits float32 loses to the two lgammas' cancellation at a
    large θ."""
    if not torch.compiler.is_compiling():
        return torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
    small = theta < 6.0
    w = torch.where(small, theta + 6.0, theta)
    a, b = theta + x, theta  # log Π_k (a+k)/(b+k), k < 6, as two logs of three-factor ratios (no overflow)
    shift = torch.log(a * (a + 1.0) * (a + 2.0) / (b * (b + 1.0) * (b + 2.0)))
    shift = shift + torch.log((a + 3.0) * (a + 4.0) * (a + 5.0) / ((b + 3.0) * (b + 4.0) * (b + 5.0)))
    ratio = (w + x - 0.5) * torch.log1p(x * w.reciprocal()) + x * (torch.log(w) - 1.0) + _stirling(w + x) - _stirling(w)
    return ratio - torch.where(small, shift, 0.0) - lgamma(x + 1.0)


class _NLL(torch.autograd.Function):
    """nll with its gradient computed in the forward pass from the quantities the value needs anyway
    (no autograd tape of ~25 cells × genes temporaries); the backward pass only scales it."""

    @staticmethod
    def forward(ctx, mu, theta, gate_logits, counts, eps, grad):
        value, grads = _nll_and_grads(counts, mu, theta, gate_logits, eps, grad)
        ctx.shapes = (theta.shape, None if gate_logits is None else gate_logits.shape)
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        d_mu, d_theta, d_gate = ctx.saved_tensors
        theta_shape, gate_shape = ctx.shapes
        w = grad_out.to(d_mu.dtype)
        g_mu = d_mu * w.unsqueeze(1) if ctx.needs_input_grad[0] else None
        g_theta = _scale_rows(d_theta, w, theta_shape) if ctx.needs_input_grad[1] else None
        g_gate = _scale_rows(d_gate, w, gate_shape) if gate_shape is not None and ctx.needs_input_grad[2] else None
        return g_mu, g_theta, g_gate, None, None, None


def _scale_rows(d: torch.Tensor, w: torch.Tensor, shape) -> torch.Tensor:
    """Per-cell gradient rows × w; summed over cells for a per-gene parameter."""
    return w @ d if len(shape) == 1 else d * w.unsqueeze(1)


def zero_terms(mu, theta, gate, eps: float, grad: bool, log_theta=None):
    """The x = 0 NLL term of every cell and gene, summed per cell, and with grad its derivatives in
    mu, theta and the gate (the ZINB's through nb0 with weight sigmoid(nb0 − g)). Only elementwise
    ops and one row sum over cells × genes — the step's costliest memory traffic, which
    torch.compile fuses into one pass (see fused). log_theta: log θ where the caller has it (θ = its exp),
    used for log θ instead of log(θ + ε) (nb_zero)."""
    t_mu, _, diff, nb0 = nb_zero(mu, theta, eps, log_theta)
    if gate is None:
        per_cell = -nb0.sum(1)
    else:
        a = nb0 - gate
        u, v = exp_neg_abs(gate), exp_neg_abs(a)
        per_cell = (F.relu(-gate) + torch.log1p(u) - F.relu(a) - torch.log1p(v)).sum(1)  # softplus(−g) − softplus(a)
    if not grad:
        return per_cell, None, None, None
    d_mu = theta / t_mu
    d_theta = d_mu - diff - d_log_theta(theta, eps, log_theta)
    if gate is None:
        return per_cell, d_mu, d_theta, None
    s_a = sigmoid_from(a, v)
    return per_cell, d_mu * s_a, d_theta * s_a, s_a - sigmoid_from(-gate, u)


def nb_zero(mu, theta, eps: float, log_theta=None):
    """θ + μ + ε, its log, log(θ/(θ+μ)) and log NB(0) = θ log(θ/(θ+μ)): the pieces every fused term and
    derivative starts from (elementwise, any shape). log θ is log(θ + ε), or log_theta where given (the
    decoder's clamped output, whose exp θ is: one log fewer per entry, and exact where ε would shift it)."""
    t_mu = theta + mu + eps
    log_t_mu = torch.log(t_mu)
    diff = (torch.log(theta + eps) if log_theta is None else log_theta) - log_t_mu
    return t_mu, log_t_mu, diff, theta * diff


def d_log_theta(theta, eps: float, log_theta=None):
    """d(θ · log θ)/dθ − log θ for nb_zero's log θ: θ / (θ + ε), or 1 with the exact log_theta."""
    return 1.0 if log_theta is not None else theta / (theta + eps)


def exp_neg_abs(t: torch.Tensor) -> torch.Tensor:
    """exp(−|t|): with it softplus(±t) = relu(±t) + log1p(·) and sigmoid(±t) (sigmoid_from) share one exp
    instead of one each, where a compiled loop evaluates several of them (the ZINB's gate terms)."""
    return torch.exp(-t.abs())


def sigmoid_from(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """sigmoid(t) from u = exp_neg_abs(t) (also of −t: |t| is the same), as a product with 1 / (1 + u): a
    compiled loop computes that reciprocal once for sigmoid(t), sigmoid(−t) and their product (sigmoid_product)
    instead of a division each."""
    return torch.where(t >= 0, 1.0, u) * (1.0 + u).reciprocal()


def sigmoid_product(u: torch.Tensor) -> torch.Tensor:
    """sigmoid(t) · sigmoid(−t) = u / (1 + u)² from u = exp_neg_abs(t), with sigmoid_from's reciprocal."""
    r = (1.0 + u).reciprocal()
    return u * r * r


def nonzero_terms(x, mu_nz, theta_nz, g_nz, eps: float, grad: bool, log_theta=None, u=None, log_mu=None):
    """At the nonzero entries (1-D, gathered): the NLL's x > 0 term minus the x = 0 term zero_terms
    already counted, and with grad the derivatives that replace zero_terms' there (of −log p:
    d/dμ = (θ+x)/(θ+μ+ε) − x/(μ+ε); d/dθ = −∂nb0/∂θ + x/(θ+μ+ε) − ψ(x+θ) + ψ(θ); d/dg = sigmoid(g)),
    and last the d/dμ of zero_terms at these entries (θ/(θ+μ+ε), × sigmoid(nb0 − g) for the ZINB): the one
    that d/dμ replaces, for a caller that takes it back out of a sum over genes. log_theta: as zero_terms';
    u: exp_neg_abs(g_nz) where the caller has it (sigmoid(g) from it, sharing its exp and reciprocal); log_mu:
    log μ where the caller has it from the logits (instead of log(μ + ε): one log per cell, not per nonzero)."""
    t_mu, log_t_mu, diff, nb0 = nb_zero(mu_nz, theta_nz, eps, log_theta)
    log_p = nb0 + x * ((torch.log(mu_nz + eps) if log_mu is None else log_mu) - log_t_mu)
    log_p = log_p + log_gamma_terms(x, theta_nz)
    if g_nz is None:
        delta = nb0 - log_p
    else:
        delta = F.softplus(nb0 - g_nz) + g_nz - log_p  # softplus(g) − softplus(−g) = g
    if not grad:
        return delta, None, None, None, None
    inv = 1.0 / t_mu
    d_mu = (theta_nz + x) * inv - x / (mu_nz + eps)
    d_theta = (theta_nz + x) * inv - diff - d_log_theta(theta_nz, eps, log_theta)
    d_theta = d_theta + digamma(theta_nz) - digamma(x + theta_nz)
    d_mu0 = theta_nz * inv
    if g_nz is None:
        return delta, d_mu, d_theta, None, d_mu0
    s_g = torch.sigmoid(g_nz) if u is None else sigmoid_from(g_nz, u)
    return delta, d_mu, d_theta, s_g, d_mu0 * torch.sigmoid(nb0 - g_nz)


_FUSED: dict = {}  # function -> its _Fused


def fused(fn):
    """fn compiled by torch.compile, once per process (dynamic shapes: one compilation serves every
    batch size and number of nonzeros); see _Fused for when it runs uncompiled."""
    if fn not in _FUSED:
        _FUSED[fn] = _Fused(fn)
    return _FUSED[fn]


class _Fused:
    """Calls the compiled fn; where compiling fails (no C++ compiler, no Triton, a compiler bug), fn runs
    uncompiled from then on, and the process's first such failure is named in one warning. These
    functions are elementwise arithmetic on checked inputs, so an error here is the toolchain's; a real
    one raises again uncompiled."""

    warned = False  # this process has named a failure

    def __init__(self, fn):
        self.fn, self.call = fn, torch.compile(fn, dynamic=True, fullgraph=True)

    def __call__(self, *args):
        if self.call is self.fn:
            return self.fn(*args)
        try:
            return self.call(*args)
        except Exception as e:
            self.call = self.fn
            if not _Fused.warned:
                import warnings

                _Fused.warned = True
                warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {str(e)[:300]}); "
                              "the likelihood runs uncompiled", stacklevel=2)  # fmt: skip
            return self.fn(*args)


def _nll_and_grads(counts: Counts, mu, theta, gate, eps: float, grad: bool):
    """Per-cell NLL and, with grad, its derivatives in mu, theta, gate per cell and gene (else empty):
    zero_terms for every entry, then nonzero_terms' corrections at the nonzeros, from the gathered
    mu, theta and gate."""
    per_cell, d_mu, d_theta, d_gate = zero_terms(mu, theta, gate, eps, grad)
    x, flat = counts.values.to(mu.dtype), counts.flat
    mu_nz, theta_nz = mu.detach().reshape(-1).take(flat), _at(theta, counts).detach()
    g_nz = None if gate is None else _at(gate, counts).detach()
    delta, d_mu_nz, d_theta_nz, d_gate_nz, _ = nonzero_terms(x, mu_nz, theta_nz, g_nz, eps, grad)
    value = per_cell + counts.row_sums(delta)
    if not grad:
        return value, ()
    write_at(d_mu, flat, d_mu_nz)
    write_at(d_theta, flat, d_theta_nz)
    if gate is None:
        return value, (d_mu, d_theta, torch.empty(0))
    write_at(d_gate, flat, d_gate_nz)
    return value, (d_mu, d_theta, d_gate)


def nll(
    counts: Counts,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """Per-cell negative log-likelihood summed over genes (NB if gate_logits is None, else ZINB).

    mu: (cells, genes); theta and gate_logits: (cells, genes) or (genes,). The value equals
    nll_reference's; the gradient is computed with it in one forward pass (see _NLL)."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (mu, theta, gate_logits))
    return _NLL.apply(mu, theta, gate_logits, counts, eps, grad)
