"""The reconstruction loss of a training step from the decoder's raw outputs, fused by torch.compile.

The model's mean is softmax(logits) × library, its inverse dispersion exp(clamp(log θ)), and the ZI
gate penalty the per-cell sum of sigmoid(gate logits). Op by op, these are ~10 passes over cells ×
genes forward and as many backward, outside the likelihood's fused kernels (distributions.nll).
`logit_nll` takes the raw outputs instead and returns the per-cell NLL and gate penalty, with the
gradients in logits, log θ and gate logits computed in the same forward pass:

  d/dlogit_j = μ_j g_j − s_j Σ_k μ_k g_k  (g = dNLL/dμ, s = softmax),  d/dlog θ = θ · dNLL/dθ (0 where
  clamped),  d/dgate of the penalty = σ(gate) σ(−gate).

Three compiled passes: every entry's x = 0 terms (distributions.zero_terms) with the softmax and exp,
the nonzeros' corrections (distributions.nonzero_terms) on gathered logits, and the backward's scaling
by the per-cell loss weights, which also forms the softmax gradient. The value equals
softmax/exp/sigmoid followed by distributions.nll to float32 rounding (tests).
"""

from __future__ import annotations

import torch

from .distributions import EPS, Counts, exp_neg_abs, fused, nonzero_terms, sigmoid_from, zero_terms


def _dense_terms(logits, library, log_theta, gate, lo: float, hi: float, eps: float, grad: bool, pen: bool):
    """Every entry (x = 0): per-cell NLL and gate penalty, the softmax's row max and sum; with grad, μ·dNLL/dμ
    (and its row sum), dNLL/dlog θ and dNLL/dgate before the nonzeros' corrections."""
    m = logits.amax(1, keepdim=True)
    e = torch.exp(logits - m)
    ssum = e.sum(1, keepdim=True)
    mu = e * (library.unsqueeze(1) / ssum)
    theta = torch.exp(log_theta.clamp(lo, hi))
    per_cell, d_mu, d_theta, d_gate = zero_terms(mu, theta, gate, eps, grad)
    penalty = sigmoid_from(gate, exp_neg_abs(gate)).sum(1) if pen else None  # the exp zero_terms has
    if not grad:
        return per_cell, penalty, m.squeeze(1), ssum.squeeze(1), None, None, None, d_gate
    mg = mu * d_mu
    d_lt = torch.where((log_theta >= lo) & (log_theta <= hi), d_theta * theta, 0.0)
    return per_cell, penalty, m.squeeze(1), ssum.squeeze(1), mg, mg.sum(1), d_lt, d_gate


def _zero_d_mu(mu, theta, g, eps: float):
    """dNLL/dμ of the x = 0 term (what _dense_terms counted at a nonzero entry)."""
    t_mu = theta + mu + eps
    d = theta / t_mu
    if g is None:
        return d
    nb0 = theta * (torch.log(theta + eps) - torch.log(t_mu))
    return d * torch.sigmoid(nb0 - g)


def _gather(t: torch.Tensor, flat, cols) -> torch.Tensor:
    """A (cells, genes) or (genes,) tensor's values at the nonzeros."""
    return t[cols] if t.dim() == 1 else t.reshape(-1).take(flat)


def _nonzero_terms(x, flat, rows, cols, logits, m, ssum, library, log_theta, gate, lo, hi, eps: float, grad: bool):
    """At the nonzeros x (1-D; flat, rows, cols: their positions): the NLL correction, and with grad the
    corrected μ·dNLL/dμ, its change (for the softmax's row sum), dNLL/dlog θ and dNLL/dgate. The gathers
    run inside the fused loop."""
    mu = torch.exp(logits.reshape(-1).take(flat) - m[rows]) * (library[rows] / ssum[rows])
    lt_nz = _gather(log_theta, flat, cols)
    g_nz = None if gate is None else _gather(gate, flat, cols)
    theta = torch.exp(lt_nz.clamp(lo, hi))
    delta, d_mu, d_theta, d_gate = nonzero_terms(x, mu, theta, g_nz, eps, grad)
    if not grad:
        return delta, None, None, None, None
    mg = mu * d_mu
    d_lt = torch.where((lt_nz >= lo) & (lt_nz <= hi), d_theta * theta, 0.0)
    return delta, mg, mg - mu * _zero_d_mu(mu, theta, g_nz, eps), d_lt, d_gate


def _grads(w, w_pen, mg, logits, m, ssum, r, d_lt, d_gate, gate, theta_per_gene: bool, gate_per_gene: bool):
    """The backward pass: dNLL/dlogits (μ_j g_j − s_j Σ_k μ_k g_k), dNLL/dlog θ and dNLL/dgate scaled per
    cell by the NLL's weights w (summed over cells for a per-gene parameter), the gate penalty's
    gradient by its weights w_pen."""
    w1 = w.unsqueeze(1)
    s = torch.exp(logits - m.unsqueeze(1)) / ssum.unsqueeze(1)
    g_logits = w1 * (mg - s * r.unsqueeze(1))
    g_lt = (w1 * d_lt).sum(0) if theta_per_gene else w1 * d_lt
    if d_gate is None:
        return g_logits, g_lt, None
    if gate_per_gene:
        return g_logits, g_lt, (w1 * d_gate).sum(0)
    u = exp_neg_abs(gate)  # σ(g) σ(−g) = u / (1 + u)²
    return g_logits, g_lt, w1 * d_gate + w_pen.unsqueeze(1) * (u / ((1.0 + u) * (1.0 + u)))


class _LogitNLL(torch.autograd.Function):
    """Forward: the three passes' value and gradients (the nonzeros' corrections written into the dense
    ones); backward: only their scaling by the per-cell weights of the NLL and of the gate penalty."""

    @staticmethod
    def forward(ctx, logits, log_theta, gate, counts: Counts, lo, hi, eps, grad):
        pen = gate is not None and gate.dim() == 2
        library = counts.library.to(logits.dtype)
        per_cell, penalty, m, ssum, mg, r, d_lt, d_gate = fused(_dense_terms)(
            logits, library, log_theta, gate, lo, hi, eps, grad, pen
        )
        flat, rows = counts.flat, counts.rows
        x = counts.values.to(logits.dtype)
        if x._base is not None:  # a view of the sparse batch: dynamo cannot trace its base
            x = x.clone()
        delta, mg_nz, r_nz, d_lt_nz, d_gate_nz = fused(_nonzero_terms)(
            x, flat, rows, counts.cols, logits, m, ssum, library, log_theta, gate, lo, hi, eps, grad
        )
        value = per_cell + counts.row_sums(delta)
        if penalty is None:
            penalty = torch.zeros_like(value)
        if grad:
            r = r + counts.row_sums(r_nz)
            mg.reshape(-1).scatter_(0, flat, mg_nz)
            d_lt.reshape(-1).scatter_(0, flat, d_lt_nz)
            if gate is not None:
                d_gate.reshape(-1).scatter_(0, flat, d_gate_nz)
            ctx.save_for_backward(logits, m, ssum, mg, r, d_lt, d_gate, gate)
            ctx.shapes = (log_theta.shape, None if gate is None else gate.shape)
        if not pen:
            ctx.mark_non_differentiable(penalty)
        return value, penalty

    @staticmethod
    def backward(ctx, grad_value, grad_penalty):
        logits, m, ssum, mg, r, d_lt, d_gate, gate = ctx.saved_tensors
        theta_shape, gate_shape = ctx.shapes
        w = grad_value.to(logits.dtype)
        w_pen = grad_penalty.to(logits.dtype)
        per_gene = (len(theta_shape) == 1, gate_shape is not None and len(gate_shape) == 1)
        grads = fused(_grads)(w, w_pen, mg, logits, m, ssum, r, d_lt, d_gate, gate, *per_gene)
        return *grads, None, None, None, None, None


def logit_nll(
    counts: Counts,
    logits: torch.Tensor,
    log_theta: torch.Tensor,
    gate_logits: torch.Tensor | None,
    theta_range: tuple[float, float],
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell NLL of the counts under μ = softmax(logits) × library, θ = exp(clamp(log_theta, *theta_range))
    and the gate (NB if None), and the per-cell gate penalty Σ sigmoid(gate) for a gate per cell and gene
    (zeros otherwise). logits: (cells, genes); log_theta, gate_logits: (cells, genes) or (genes,)."""
    params = (logits, log_theta, gate_logits)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    lo, hi = theta_range
    return _LogitNLL.apply(logits, log_theta, gate_logits, counts, float(lo), float(hi), eps, grad)
