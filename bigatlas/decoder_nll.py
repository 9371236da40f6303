"""The reconstruction loss of a training step from the decoder's raw outputs, fused by torch.compile.

The model's mean is softmax(logits) × library, its inverse dispersion exp(clamp(log θ)), and the ZI
gate penalty the per-cell sum of sigmoid(gate logits). Op by op, these are ~10 passes over cells ×
genes forward and as many backward, outside the likelihood's fused kernels (distributions.nll).
`logit_nll` takes the raw outputs and the loss's per-cell weights instead and returns the per-cell
NLL and gate penalty and their weighted sum, the loss, with its gradients in logits, log θ and gate
logits computed in the same forward pass:

  d/dlogit_j = μ_j g_j − s_j Σ_k μ_k g_k  (g = dNLL/dμ, s = softmax),  d/dlog θ = θ · dNLL/dθ (0 where
  clamped),  d/dgate of the penalty = σ(gate) σ(−gate),  each times the cell's weight.

Three passes in two compiled calls: every entry's x = 0 terms (distributions.zero_terms) with the softmax,
the exp and the weights, then the nonzeros' corrections (distributions.nonzero_terms) on gathered logits; and
the softmax gradient, which needs the corrected row sums. The backward pass only scales the gradients by
the loss's upstream gradient (on the CPU not even that when it is 1, as in training). The value
equals softmax/exp/sigmoid followed by distributions.nll to float32 rounding (tests), except at a nonzero
count whose mean is below ~1e-6: there log μ comes from the logits (as scipy's NB has it) where nll, given μ
alone, takes log(μ + ε).
"""

from __future__ import annotations

import torch

from .distributions import (
    EPS,
    Counts,
    exp_neg_abs,
    fused,
    nonzero_terms,
    sigmoid_from,
    sigmoid_product,
    write_at,
    zero_terms,
)


def _dense_terms(logits, library, log_theta, gate, w, w_pen, lo: float, hi: float, eps: float, grad: bool, pen: bool):
    """Every entry (x = 0): per-cell NLL and gate penalty, the softmax's row max and sum; with grad, the
    weighted w·μ·dNLL/dμ (and its row sum), w·dNLL/dlog θ and w·dNLL/dgate + w_pen·dpenalty/dgate before
    the nonzeros' corrections."""
    lt_dtype, gate_dtype = log_theta.dtype, None if gate is None else gate.dtype
    logits, log_theta = logits.float(), log_theta.float()
    gate = None if gate is None else gate.float()
    m = logits.amax(1, keepdim=True)
    e = torch.exp(logits - m)
    ssum = e.sum(1, keepdim=True)
    mu = e * (library.unsqueeze(1) / ssum)
    lt = log_theta.clamp(lo, hi)
    theta = torch.exp(lt)
    per_cell, d_mu, d_theta, d_gate = zero_terms(mu, theta, gate, eps, grad, lt)
    u = exp_neg_abs(gate) if pen else None  # the exp zero_terms has
    penalty = sigmoid_from(gate, u).sum(1) if pen else None
    if not grad:
        return per_cell, penalty, m.squeeze(1), ssum.squeeze(1), None, None, None, None
    wmg, d_lt, d_gate = _weighted_grads(
        w.unsqueeze(1), mu, d_mu, log_theta, theta, d_theta, d_gate, w_pen.unsqueeze(1), u, lo, hi
    )
    d_gate = None if d_gate is None else d_gate.to(gate_dtype)
    return per_cell, penalty, m.squeeze(1), ssum.squeeze(1), wmg, wmg.sum(1), d_lt.to(lt_dtype), d_gate


def _weighted_grads(w, mu, d_mu, log_theta, theta, d_theta, d_gate, w_pen, u, lo: float, hi: float):
    """The loss's gradients from the NLL's derivatives and the cells' weights w: w μ dNLL/dμ (the softmax
    gradient's input), w θ dNLL/dθ in log θ (0 where clamped), w dNLL/dgate plus, with u = exp(−|gate|)
    given, the penalty's w_pen σ(g) σ(−g) = w_pen u / (1 + u)². Dense or at the nonzeros alike."""
    wmg = w * (mu * d_mu)
    d_lt = torch.where((log_theta >= lo) & (log_theta <= hi), w * (d_theta * theta), 0.0)
    if d_gate is not None:
        d_gate = w * d_gate
        if u is not None:
            d_gate = d_gate + w_pen * sigmoid_product(u)
    return wmg, d_lt, d_gate


def _gather(t: torch.Tensor, flat, cols) -> torch.Tensor:
    """A (cells, genes) or (genes,) tensor's values at the nonzeros."""
    return t[cols] if t.dim() == 1 else t.reshape(-1).take(flat)


def _nonzero_terms(
    x, flat, rows, cols, logits, m, ssum, library, log_theta, gate, w, w_pen, lo, hi, eps: float, grad: bool, pen: bool
):
    """At the nonzeros x (1-D; flat, rows, cols: their positions): the NLL correction, and with grad the
    corrected weighted μ·dNLL/dμ, its change (for the softmax's row sum), dNLL/dlog θ and dNLL/dgate (with
    the penalty's, which the dense values they replace hold). The gathers run inside the fused loop."""
    scale = library / ssum  # per cell: μ = exp(logit − m) × scale, log μ = logit − m + log scale
    z = logits.reshape(-1).take(flat).float() - m[rows]
    mu, log_mu = torch.exp(z) * scale[rows], z + torch.log(scale)[rows]
    lt_nz = _gather(log_theta, flat, cols).float()
    g_nz = None if gate is None else _gather(gate, flat, cols).float()
    lt_c = lt_nz.clamp(lo, hi)
    theta = torch.exp(lt_c)
    u = None if g_nz is None else exp_neg_abs(g_nz)
    delta, d_mu, d_theta, d_gate, d_mu0 = nonzero_terms(x, mu, theta, g_nz, eps, grad, lt_c, u, log_mu)
    if not grad:
        return delta, None, None, None, None
    w_nz = w[rows]
    u = u if pen else None
    wmg, d_lt, d_gate = _weighted_grads(w_nz, mu, d_mu, lt_nz, theta, d_theta, d_gate, w_pen[rows], u, lo, hi)
    d_gate = None if d_gate is None else d_gate.to(gate.dtype)
    return delta, wmg, wmg - w_nz * (mu * d_mu0), d_lt.to(log_theta.dtype), d_gate


def _softmax_grad(wmg, logits, m, ssum, r):
    """dLoss/dlogits = w μ_j g_j − s_j Σ_k w μ_k g_k, from the corrected weighted terms and row sums (in the
    logits' dtype)."""
    s = torch.exp(logits.float() - m.unsqueeze(1)) * ssum.reciprocal().unsqueeze(1)  # a product per entry
    return (wmg - s * r.unsqueeze(1)).to(logits.dtype)


def _forward_terms(logits, library, log_theta, gate, w, w_pen, x, flat, rows, cols, lo, hi, eps, grad: bool, pen: bool):
    """_dense_terms, then _nonzero_terms from its row max and sum: one compiled call for both (each call's
    guards and wrappers cost ~0.1 ms, 2-3% of a CPU step)."""
    per_cell, penalty, m, ssum, wmg, r, d_lt, d_gate = _dense_terms(
        logits, library, log_theta, gate, w, w_pen, lo, hi, eps, grad, pen
    )
    nz = _nonzero_terms(
        x, flat, rows, cols, logits, m, ssum, library, log_theta, gate, w, w_pen, lo, hi, eps, grad, pen
    )
    return (per_cell, penalty, m, ssum, wmg, r, d_lt, d_gate, *nz)


class _LogitNLL(torch.autograd.Function):
    """Forward: the per-cell values, the loss and its gradients (the nonzeros' corrections written into
    the dense ones); backward: only their scaling by the loss's upstream gradient."""

    @staticmethod
    def forward(ctx, logits, log_theta, gate, w, w_pen, counts: Counts, lo, hi, eps, grad):
        pen = gate is not None and gate.dim() == 2
        library = counts.library.float()
        flat, rows = counts.flat, counts.rows
        x = counts.values.float()
        if x._base is not None:  # a view of the sparse batch: dynamo cannot trace its base
            x = x.clone()
        per_cell, penalty, m, ssum, wmg, r, d_lt, d_gate, delta, wmg_nz, r_nz, d_lt_nz, d_gate_nz = fused(
            _forward_terms
        )(logits, library, log_theta, gate, w, w_pen, x, flat, rows, counts.cols, lo, hi, eps, grad, pen)
        value = per_cell + counts.row_sums(delta)
        if penalty is None:
            penalty = torch.zeros_like(value)
        loss = (w * value).sum() + (w_pen * penalty).sum()
        ctx.mark_non_differentiable(value, penalty)
        if grad:
            write_at(wmg, flat, wmg_nz)
            write_at(d_lt, flat, d_lt_nz)
            g_logits = fused(_softmax_grad)(wmg, logits, m, ssum, r + counts.row_sums(r_nz))
            g_lt = d_lt.sum(0) if log_theta.dim() == 1 else d_lt
            g_gate = None
            if gate is not None:
                write_at(d_gate, flat, d_gate_nz)
                g_gate = d_gate.sum(0) if gate.dim() == 1 else d_gate
            ctx.grads = (g_logits, g_lt, g_gate)  # not inputs or outputs: no need for save_for_backward
        return value, penalty, loss

    @staticmethod
    def backward(ctx, _grad_value, _grad_penalty, grad_loss):
        grads, ctx.grads = ctx.grads, None
        # training's upstream gradient is exactly 1 (a host check only on the CPU, where it costs nothing)
        if not (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return *grads, None, None, None, None, None, None, None


def logit_nll(
    counts: Counts,
    logits: torch.Tensor,
    log_theta: torch.Tensor,
    gate_logits: torch.Tensor | None,
    theta_range: tuple[float, float],
    weights: torch.Tensor,
    penalty_weights: torch.Tensor,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cell NLL of the counts under μ = softmax(logits) × library, θ = exp(clamp(log_theta, *theta_range))
    and the gate (NB if None), the per-cell gate penalty Σ sigmoid(gate) for a gate per cell and gene
    (zeros otherwise), both without gradient, and the loss Σ weights · NLL + Σ penalty_weights · penalty
    with it. logits: (cells, genes); log_theta, gate_logits: (cells, genes) or (genes,); weights: (cells,). The
    decoder's outputs may be bfloat16 (bf16 products or autocast): read as float32 inside the fused passes, which
    compute in float32 and write each gradient in its input's dtype (no cast of cells × genes either way)."""
    params = (logits, log_theta, gate_logits)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    lo, hi = theta_range
    w, w_pen = weights.float(), penalty_weights.float()
    return _LogitNLL.apply(logits, log_theta, gate_logits, w, w_pen, counts, float(lo), float(hi), eps, grad)
