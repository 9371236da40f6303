"""Negative binomial and zero-inflated NB log-likelihoods, mean/inverse-dispersion parameterised.

NB(x; μ, θ):  log p = θ log(θ/(θ+μ)) + x log(μ/(θ+μ)) + lgamma(x+θ) − lgamma(θ) − lgamma(x+1)
ZINB with gate logit g (π = sigmoid(g), the structural-zero probability):
  x = 0: log(π + (1−π) NB(0)) = softplus(−g + log NB(0)) − softplus(−g)
  x > 0: log(1−π) + log NB(x)  = −softplus(g) + log NB(x)

The counts are sparse (~5-30% nonzero), so `nll` evaluates the x = 0 expression densely — it needs no
lgamma — and adds, only at the nonzero entries, the difference to the x > 0 expression. lgamma and
its derivative digamma, the most expensive ops of a step, then run on the nonzeros alone, and
lgamma(x+1) (no gradient) likewise. This is the correct NB: the original scAtlasVAE used logits
μ − log θ instead of log μ − log θ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


class Counts:
    """One minibatch of counts: its nonzero entries (for the likelihood) and the matrix itself as a
    sparse CSR tensor or a dense one (for the encoder, which reads CSR without densifying)."""

    def __init__(self, rows, cols, values, library, n_genes: int, csr=None, dense=None):
        self.rows, self.cols, self.values, self.library = rows, cols, values, library  # (nnz,) ×3, (cells,)
        self.n_genes, self.csr, self._dense = n_genes, csr, dense

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> Counts:
        rows, cols = torch.nonzero(x, as_tuple=True)
        return cls(rows, cols, x[rows, cols], x.sum(1), x.shape[1], dense=x)

    @classmethod
    def from_sparse_csr(cls, x: torch.Tensor, device=None) -> Counts:
        """From a torch.sparse_csr batch, moved to `device` as it is (never densified on the CPU)."""
        x = x.to(device) if device is not None else x
        rows, library = csr_rows_and_library(x)
        return cls(rows, x.col_indices().long(), x.values(), library, x.shape[1], csr=x)

    @property
    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.csr.to_dense()
        return self._dense

    def __len__(self) -> int:
        return int(self.library.shape[0])


def csr_rows_and_library(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row index of every stored value of a sparse CSR tensor, and each row's total."""
    crow, values = x.crow_indices().long(), x.values()
    rows = torch.repeat_interleave(torch.arange(x.shape[0], device=crow.device), crow[1:] - crow[:-1])
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
        out = grad.new_zeros(ctx.shape.numel())
        out.index_copy_(0, flat, grad)
        return out.view(ctx.shape), None


def _at(t: torch.Tensor, counts: Counts) -> torch.Tensor:
    """Values of a (cells, genes) or (genes,) tensor at the nonzero positions."""
    if t.dim() == 1:
        return t[counts.cols]
    return _TakeUnique.apply(t, counts.rows * t.shape[1] + counts.cols)


def nll(
    counts: Counts, mu: torch.Tensor, theta: torch.Tensor, gate_logits: torch.Tensor | None = None, eps: float = EPS
) -> torch.Tensor:
    """Per-cell negative log-likelihood summed over genes (NB if gate_logits is None, else ZINB).

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
