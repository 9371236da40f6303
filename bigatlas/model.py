"""The torch module of scAtlasVAE (VAEModule; the user-facing class is api.AtlasVAE): a ZINB/NB
variational autoencoder with batch embeddings in the decoder and label heads on z.

Encoder: log1p(counts) → [Linear → BatchNorm(momentum 0.01, eps 1e-3; by default without label heads) or
LayerNorm without affine terms (by default with them) → ReLU → Dropout (by default 0.1 with label heads, none
without)] → q(z|x),
var = exp(logvar) + 1e-4; the batch is not an encoder input, so a query embeds without retraining.
Decoder: [z, one embedding per batch/covariate key] → [Linear → the encoder's norm → ReLU] → softmax(Linear) ×
observed library size = mean (with batch_in_heads the mean's Linear reads the embeddings too, beside the
hidden layer); dispersion per gene-cell, gene or gene-batch; ZI gate per gene or gene-cell. Label heads:
one Linear(n_latent, n_classes) per label key on z. Batch adversary (batch_adversary > 0): Linear → ReLU →
Linear from the sampled z to the first batch key's categories, fitted to the batch (its gradient stops at z);
the encoder, through the adversary's weights as they are, learns to make every cell's prediction the
minibatch's average one (a domain-confusion loss, Tzeng et al. 2015), weighted by batch_adversary. Batch
alignment (batch_align > 0): each training cell's latent mean is pulled, weighted by batch_align, towards the
mean of its mutual nearest neighbours of other batches of the first key (as in MNN correction, Haghverdi et al.
2018) among the step's cells and a ring buffer of the latest training cells' means (ALIGN_POOL). In a
multi-process run DDP broadcasts buffers from the main process, so every rank reads the main process's pool.
Batch-by-state term (batch_interaction): the mean's logits plus a bias-free Linear (zero at the start) of the
outer product of the batch embeddings (all keys) and z, so each batch has its own linear map from the latent to
the genes beside the shared decoder (a batch effect that differs by cell type or state). With
batch_interaction_detach (the default) the term reads z detached: the maps fit each batch's effect on the states
the encoder finds, and the encoder's gradient comes through the shared decoder alone, so placing one state's
cells apart by batch gains it nothing. The mean over training cells of the term's squared logit shifts, summed
over the genes each cell measured, is added to the training loss at batch_interaction_penalty.
Prior (prior_components > 0; the default without label keys): a mixture of Gaussians with learned means, variances
and weights instead of N(0, I); the KL term is the posterior's entropy in closed form minus the mixture's log density
at the cell's sample z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .bf16_linear import DTYPE as BF16
from .bf16_linear import bf16_linear
from .config import ModelConfig
from .decoder_nll import logit_nll
from .distributions import Counts, nll, write_at

# Bounds on log-scale outputs: exp() of a runaway logit is what turns a real-data run into NaN.
LOGVAR_MAX = 15.0
LOG_THETA_RANGE = (-12.0, 12.0)
PRIOR_LOGVAR_RANGE = (-8.0, 4.0)  # a mixture prior's components' log variances


@dataclass
class LossOutput:
    total: torch.Tensor  # scalar to backpropagate
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached per-cell means; n, val_n: cells
    n_cells: torch.Tensor | int = 0  # cells in the loss (a device tensor: reading it would sync)


def mlp(sizes, dropout: float, norm: str = "batch") -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        if norm == "batch":
            normalise = nn.BatchNorm1d(b, momentum=0.01, eps=1e-3)
        else:
            normalise = nn.LayerNorm(b, elementwise_affine=False)
        layers += [nn.Linear(a, b), normalise, nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _counts(x: torch.Tensor) -> Counts:
    return Counts.from_sparse_csr(x) if x.layout == torch.sparse_csr else Counts.from_dense(x)


# On a GPU the first layer reads a batch of up to this many cells × genes as a dense matrix (256 MiB in float32:
# 4,096 cells × 16,384 genes); larger ones take the sparse matmul, whose weight gradient makes the host wait
# once a step (measured on an H200: the sync is inside torch's SparseAddmmBackward0).
GPU_DENSE_MAX = 1 << 26


def _dense_is_faster(x: torch.Tensor) -> bool:
    """On CPU, a dense GEMM beats torch's sparse CSR matmul (forward and weight gradient) unless the
    batch is large and sparse: measured at 2,000 genes × 128 hidden, 2 threads, fwd + bwd (ms), dense
    incl. to_dense: 128 cells: 1.0 vs 1.1 (3% nonzero), 1.1 vs 2.3 (10%), 2.6 vs 6.6 (37%); 1,024
    cells: 7.2 vs 2.7 (3%), 10.6 vs 8.3 (10%), 28 vs 59 (37%). A GPU reads it dense up to GPU_DENSE_MAX."""
    n, genes = x.shape
    if x.device.type != "cpu":
        return n * genes <= GPU_DENSE_MAX
    return n * genes <= (1 << 19) or x.values().numel() > 0.15 * n * genes


def gce(ce: torch.Tensor, q: float) -> torch.Tensor:
    """Generalised cross-entropy (Zhang & Sabuncu 2018) from the cross-entropy -log p: (1 - p^q) / q. Its
    gradient is p^q times the cross-entropy's, so a cell whose given label the model finds unlikely pulls
    the latent less; q -> 0 is the cross-entropy, q = 1 the absolute error 1 - p."""
    return -torch.expm1(-q * ce) / q


# the batch adversary's hidden width
ADVERSARY_HIDDEN = 64
# the batch alignment's pool: the latent means of the latest training cells (a ring buffer) beside the step's own;
# on condition (seed 5) 512 kept less biology (0.611 against 0.643) at the same batch correction
ALIGN_POOL = 2048


def class_weights(counts: torch.Tensor, weighting: str = "inverse") -> torch.Tensor:
    """inverse: w_c = N / (K · n_c) over the K non-empty classes (the original); sqrt-inverse: its
    square root; none: 1. Scaled to a count-weighted mean of 1; 0 for empty classes (the original gave
    inf)."""
    counts = counts.double()
    present = counts > 0
    w = torch.zeros_like(counts)
    if bool(present.any()):
        power = {"inverse": 1.0, "sqrt-inverse": 0.5, "none": 0.0}[weighting]
        w[present] = counts[present] ** -power
        w *= counts.sum() / (w * counts).sum()
    return w.float()


class VAEModule(nn.Module):
    def __init__(
        self,
        n_genes: int,
        n_batch_categories: list[int],
        n_label_classes: list[int],
        cfg: ModelConfig | None = None,
        class_counts: list | None = None,
    ):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg, self.n_genes = cfg, n_genes
        hidden = list(cfg.hidden)
        labelled = bool(n_label_classes)
        self.n_latent = k = cfg.latent_size(labelled)
        norm = cfg.hidden_norm(labelled)
        self.encoder = mlp([n_genes, *hidden], cfg.encoder_dropout(labelled), norm)
        self.z_mean = nn.Linear(hidden[-1], k)
        self.z_logvar = nn.Linear(hidden[-1], k)
        self.embeddings = nn.ModuleList(nn.Embedding(n, cfg.embedding_dim) for n in n_batch_categories)
        dec_in = k + cfg.embedding_dim * len(n_batch_categories)
        self.decoder = mlp([dec_in, *reversed(hidden)], 0.0, norm)
        h = hidden[0]
        # the mean head's inputs beside the hidden layer: the batch embeddings (batch_in_heads)
        beside = cfg.embedding_dim * len(n_batch_categories) if cfg.batch_in_heads else 0
        self.px_scale = nn.Linear(h + beside, n_genes)
        if cfg.interaction(labelled) and n_batch_categories:  # zero at the start: the shared decoder's model
            self.interaction = nn.Linear(k * cfg.embedding_dim * len(n_batch_categories), n_genes, bias=False)
            nn.init.zeros_(self.interaction.weight)
        if cfg.dispersion == "gene-cell":
            self.px_r = nn.Linear(h, n_genes)
        elif cfg.dispersion == "gene":
            self.px_r = nn.Parameter(torch.zeros(n_genes))
        else:  # gene-batch: one dispersion vector per category of the first batch key
            self.px_r = nn.Parameter(torch.zeros(n_batch_categories[0], n_genes))
        if cfg.likelihood == "zinb":
            if cfg.zi_gate == "gene":
                self.gate = nn.Parameter(torch.zeros(n_genes))
            else:
                self.gate = nn.Linear(h, n_genes)
        self.heads = nn.ModuleList(nn.Linear(k, n) for n in n_label_classes)
        if cfg.batch_adversary > 0 and n_batch_categories:
            # drawn from a fork of the random stream, so the rest of the run (dropout, z's noise, a later module's
            # init) draws what it draws without the adversary, and the option pairs with the default seed by seed
            with torch.random.fork_rng(devices=[]):
                self.adversary = nn.Sequential(
                    nn.Linear(k, ADVERSARY_HIDDEN), nn.ReLU(), nn.Linear(ADVERSARY_HIDDEN, n_batch_categories[0])
                )
        if cfg.batch_align > 0 and n_batch_categories:
            self.n_align = n_batch_categories[0]
            self.register_buffer("align_pool", torch.zeros(ALIGN_POOL, k))
            self.register_buffer("align_codes", torch.full((ALIGN_POOL,), -1, dtype=torch.long))
            self.register_buffer("align_next", torch.zeros((), dtype=torch.long))
        components = cfg.mixture_components(labelled)
        if components:  # drawn from a fork of the random stream, as the adversary's init
            with torch.random.fork_rng(devices=[]):
                self.prior_means = nn.Parameter(torch.randn(components, k))
            self.prior_logvar = nn.Parameter(torch.zeros(components, k))
            self.prior_logits = nn.Parameter(torch.zeros(components))
        for i, n in enumerate(n_label_classes):
            counts = torch.as_tensor(class_counts[i]) if class_counts is not None else torch.ones(n)
            self.register_buffer(f"class_weight_{i}", class_weights(counts, cfg.class_weighting))
        # genes some training cell's store lacked (Vocab.unmeasured_genes): the encoder learnt them as zeros in
        # those cells, so encode_measured leaves them at zero wherever they are missing (not in the weights)
        self.register_buffer("read_as_zero", torch.zeros(n_genes, dtype=torch.bool), persistent=False)
        # per key, the embedding rows whose mean is the batch-average cell (a mapped query's rows are not)
        self.average_rows = list(n_batch_categories)

    compiled_loss = False  # the reconstruction loss fused by torch.compile (decoder_nll.logit_nll)
    bf16_matmul = False  # training's wide products (first layer, heads) on bfloat16 operands (bf16_linear)
    fill_in_training = False  # forward fills the genes a cell did not measure (surgery on a query that lacks some)
    frozen_modules: tuple[str, ...] = ()  # kept in eval mode (BatchNorm statistics fixed) by train()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()
        return self

    # -- pieces -----------------------------------------------------------------------------------
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalize_total:
            lib = x.sum(1, keepdim=True).clamp_min(1.0)
            x = x / lib * self.cfg.normalize_total
        return torch.log1p(x)

    def encode(self, x, fill: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) from a dense tensor, a sparse CSR tensor or Counts (CSR used when it has one: the
        first layer then reads the nonzeros, densified where that is faster, see _dense_is_faster). `fill`
        (cells × genes, 0 where a gene was measured) stands in for the genes a cell's store did not measure,
        which are 0 in x: the first layer is linear, so their input adds W · log1p(fill) (with normalize_total,
        which divides by the filled cell's total, x + fill is encoded as one)."""
        if fill is not None and self.cfg.normalize_total:
            x = (x.csr if x.csr is not None else x.dense) if isinstance(x, Counts) else x
            return self.encode((x.to_dense() if x.layout == torch.sparse_csr else x) + fill)
        counts = None
        if isinstance(x, Counts):
            counts, x = x, (x.csr if x.csr is not None else x.dense)
        if x.layout == torch.sparse_csr:
            h = self._first_layer_sparse(x, counts)
        elif self._bf16_products():
            h = bf16_linear(self.encoder_input(x), self.encoder[0], keep=False)
        else:
            h = self.encoder[0](self.encoder_input(x))
        if fill is not None:
            h = h + F.linear(torch.log1p(fill).to(h.dtype), self.encoder[0].weight.to(h.dtype))
        q = self.encoder[1:](h)
        return self.z_mean(q), torch.exp(self.z_logvar(q).clamp(max=LOGVAR_MAX)) + self.cfg.var_eps

    @torch.no_grad()
    def unmeasured_fill(self, z: torch.Tensor, library: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
        """The expected counts of the genes each cell did not measure (0 at those it did): the decoder's mean at
        z for the batch-average cell (every key's mean embedding row: a query's batches are new to the model),
        scaled so that the means of the cell's measured genes sum to its observed total."""
        s = F.softmax(self._mean_logits(z, None).float(), dim=-1)
        scale = library.float() / (s * measured).sum(1).clamp_min(1e-30)
        return torch.where(measured, 0.0, s * scale.unsqueeze(1))

    def _first_layer_sparse(self, x: torch.Tensor, counts: Counts | None = None) -> torch.Tensor:
        """log1p over the nonzeros, then a sparse matmul (or, where faster, a dense GEMM on the matrix
        filled from the nonzeros: 0.10 vs 0.53 ms for torch's CSR to_dense at 128 × 2,000). `counts`
        (the same batch) lends its row indices, library sizes and flat indices."""
        values = x.values()
        if counts is None:
            counts = Counts.from_sparse_csr(x)
        if self.cfg.normalize_total:
            values = values / counts.library.clamp_min(1.0)[counts.rows] * self.cfg.normalize_total
        values, first = torch.log1p(values), self.encoder[0]
        if _dense_is_faster(x):
            bf16 = self._bf16_products()
            dense = values.new_zeros(x.shape, dtype=BF16 if bf16 else values.dtype)
            write_at(dense, counts.flat, values.to(dense.dtype))
            if bf16:
                return bf16_linear(dense, first, keep=False)
            return first(dense)  # a GPU's autocast applies, as to every other Linear
        # in float32 even under bf16 autocast: cuSPARSE has no fp32-sparse × bf16-dense SpMM (it fails)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logx = torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, x.shape, check_invariants=False)
            return torch.sparse.mm(logx, first.weight.float().t()) + first.bias.float()

    def _bf16_products(self) -> bool:
        return self.bf16_matmul and self.training and torch.is_grad_enabled()

    def _wide(self, layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        """A decoder head onto the genes (bfloat16 products and output in CPU training with bf16_matmul: the
        fused loss reads it as float32)."""
        if not self._bf16_products():
            return layer(h)
        return bf16_linear(h, layer, keep=self.compiled_loss)

    def _hidden(self, z: torch.Tensor, batch_codes: torch.Tensor | None):
        """The decoder's hidden layer and the batch embeddings per cell, all keys side by side (None without
        keys); batch_codes None: the batch-average cell, every key's mean row over the categories the model was
        trained on (average_rows)."""
        if batch_codes is None:
            rows = zip(self.embeddings, self.average_rows)
            parts = [z] + [emb.weight[:n].mean(0).expand(len(z), -1) for emb, n in rows]
        else:
            parts = [z] + [emb(batch_codes[:, i]) for i, emb in enumerate(self.embeddings)]
        return self.decoder(torch.cat(parts, dim=1)), (torch.cat(parts[1:], dim=1) if len(parts) > 1 else None)

    def _mean_head(self, z, h, emb) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean's logits, and the batch-by-state term's part of them (None without the term): the hidden
        layer's head (beside it the embeddings, with batch_in_heads) plus the interaction layer on emb ⊗ z."""
        beside = self.cfg.batch_in_heads and emb is not None
        logits = self._wide(self.px_scale, torch.cat([h, emb], dim=1) if beside else h)
        if not hasattr(self, "interaction"):
            return logits, None
        zi = z.detach() if self.cfg.batch_interaction_detach else z  # the encoder's gradient skips the term
        shift = self._wide(self.interaction, (emb[:, :, None] * zi[:, None, :]).flatten(1))
        return logits + shift, shift

    def _mean_logits(self, z: torch.Tensor, batch_codes: torch.Tensor | None) -> torch.Tensor:
        return self._mean_head(z, *self._hidden(z, batch_codes))[0]

    def decoder_outputs(self, z: torch.Tensor, batch_codes: torch.Tensor):
        """The decoder's raw outputs: mean logits, log inverse dispersion (before its clamp) and gate
        logits (None for NB), each per cell and gene or per gene."""
        return self._decoder_outputs(z, batch_codes)[:3]

    def _decoder_outputs(self, z: torch.Tensor, batch_codes: torch.Tensor):
        """decoder_outputs, and the batch-by-state term's part of the mean logits (None without the term)."""
        h, emb = self._hidden(z, batch_codes)
        if self.cfg.dispersion == "gene-cell":
            log_theta = self._wide(self.px_r, h)
        elif self.cfg.dispersion == "gene":
            log_theta = self.px_r
        else:
            log_theta = self.px_r[batch_codes[:, 0]]
        gate = None
        if self.cfg.likelihood == "zinb":
            gate = self.gate if self.cfg.zi_gate == "gene" else self._wide(self.gate, h)
        logits, shift = self._mean_head(z, h, emb)
        return logits, log_theta, gate, shift

    def decode(self, z: torch.Tensor, batch_codes: torch.Tensor, library: torch.Tensor):
        """Mean, inverse dispersion and gate logits (None for NB) for each cell and gene."""
        logits, log_theta, gate = self.decoder_outputs(z, batch_codes)
        mu = F.softmax(logits, dim=-1) * library.unsqueeze(1)
        return mu, torch.exp(log_theta.clamp(*LOG_THETA_RANGE)), gate

    def label_logits(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [head(z) for head in self.heads]

    # -- loss -------------------------------------------------------------------------------------
    def forward(
        self,
        counts: Counts,
        batch_codes: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        cell_mask: torch.Tensor | None = None,
        eval_mask: torch.Tensor | None = None,
        kl_weight: float = 1.0,
        eval_kl_weight: float = 1.0,
        gate_weight: float = 1.0,
        label_weight: float = 1.0,
        measured: torch.Tensor | None = None,
    ) -> LossOutput:
        """Loss as a per-cell mean over the cells in cell_mask (all if None), so a short last batch
        weighs each cell like a full one. labels: (cells, label keys), -1 = unlabelled/undefined.
        Cells in eval_mask are scored from the same forward pass into LossOutput.terms['val_*']
        (no gradient), with eval_kl_weight. measured: (cells or 1, genes) bool, the genes each cell's store
        measured (None: all); the others are zero-filled, and the likelihood leaves them out."""
        fill = self.fill_in_training and measured is not None
        q_mu, q_var = self.encode_measured(counts, measured) if fill else self.encode(counts)
        z = q_mu + torch.sqrt(q_var) * torch.randn_like(q_mu)
        mask = torch.ones(len(counts), dtype=torch.bool, device=q_mu.device) if cell_mask is None else cell_mask
        # no host sync on whether eval_mask has cells: its sums are 0 when it has none
        masks = mask[None] if eval_mask is None else torch.stack([mask, eval_mask])
        n = masks.sum(1, dtype=torch.float32)
        w = mask / n[0].clamp_min(1)  # each cell's weight in the loss's per-cell means
        recon, gate_pen, fused, shift = self._reconstruction(z, batch_codes, counts, w, gate_weight * w, measured)
        kl = self._kl(z, q_mu, q_var)
        extra = {}  # the batch options' per-cell terms, by name
        if shift is not None:  # the term's size: its squared logit shifts, summed over the genes the cell measured
            size = shift.float() ** 2  # (a gene the cell lacks has mean 0 whatever the shift, as in the likelihood)
            extra["interaction"] = (size if measured is None else size * measured).sum(1)
        adversary = self._adversary_terms(z, batch_codes, labels)
        if adversary is not None:
            extra["adversary"], extra["confusion"] = adversary
        align = self._align_term(q_mu, batch_codes, mask)
        if align is not None:
            extra["align"] = align
        per_mask = self._terms(recon, kl, gate_pen, z, labels, masks, n, extra)
        weights = (gate_weight, label_weight)
        in_fused = fused is not None and gate_pen is not None and gate_pen.dim() == 1  # the gate's term in it
        train = per_mask[0]
        total = _weighted(train, train["recon"] if fused is None else fused, kl_weight, *weights, in_fused)
        if "adversary" in train:  # training only: the held-out loss (early stopping) is the model's own
            total = total + train["adversary"] + self.cfg.batch_adversary * train["confusion"]
        if "align" in train:
            total = total + self.cfg.batch_align * train["align"]
        if "interaction" in train:
            total = total + self.cfg.batch_interaction_penalty * train["interaction"]
        terms = {k: v.detach() for k, v in train.items()}
        terms["loss"] = total.detach()
        if eval_mask is not None:
            val = {k: v.detach() for k, v in per_mask[1].items()}
            val["loss"] = _weighted(val, val["recon"], eval_kl_weight, *weights, False)
            terms.update({f"val_{k}": v for k, v in val.items()})
        return LossOutput(total, terms, terms["n"])

    def _kl(self, z, q_mu, q_var) -> torch.Tensor:
        """Per cell, KL(q(z|x) || p(z)): in closed form for the standard normal prior; for the mixture, the
        posterior's entropy in closed form and the prior's log density at the cell's sample z."""
        if not hasattr(self, "prior_means"):
            return 0.5 * (q_var + q_mu**2 - 1.0 - torch.log(q_var)).sum(1)
        log_2pi = math.log(2 * math.pi)
        entropy = 0.5 * (torch.log(q_var) + 1.0 + log_2pi).sum(1)
        return -entropy - torch.logsumexp(self._log_components(z), dim=1)

    def _log_components(self, z) -> torch.Tensor:
        """Cells x components: log of each mixture component's weight times its density at z."""
        logvar = self.prior_logvar.clamp(*PRIOR_LOGVAR_RANGE)
        d = (z.float()[:, None, :] - self.prior_means[None]) ** 2 * torch.exp(-logvar)[None]
        return -0.5 * (d + logvar[None] + math.log(2 * math.pi)).sum(2) + F.log_softmax(self.prior_logits, 0)[None]

    def _reconstruction(self, z, batch_codes, counts: Counts, w, w_pen, measured=None):
        """Per-cell NLL and ZI gate penalty (per cell; one scalar for a per-gene gate; None for NB), in float32,
        where the loss is fused (decoder_nll) their weighted sum Σ w·NLL + Σ w_pen·penalty (the per-cell
        penalty's only), which alone carries the gradient (None otherwise), and the batch-by-state term's part
        of the mean logits (None without it).

        Genes a cell's store did not measure get a mean logit of −inf: the softmax then spreads the cell's
        library over the genes it measured (as if the model had those genes only), and a zero count at mean 0
        has likelihood 1 under NB and ZINB alike, so those genes add nothing to the loss or its gradient."""
        logits, log_theta, gate, shift = self._decoder_outputs(z, batch_codes)
        if measured is not None:
            logits = logits.masked_fill(~measured, float("-inf"))
        per_cell_gate = gate is not None and gate.dim() == 2
        fused = None
        with torch.autocast(device_type=z.device.type, enabled=False):
            if self.compiled_loss:  # softmax, exp, the gate penalty and the likelihood fused (decoder_nll)
                recon, penalty, fused = logit_nll(counts, logits, log_theta, gate, LOG_THETA_RANGE, w, w_pen)
            else:
                gate = None if gate is None else gate.float()
                mu = F.softmax(logits.float(), dim=-1) * counts.library.unsqueeze(1)
                theta = torch.exp(log_theta.float().clamp(*LOG_THETA_RANGE))
                recon, penalty = nll(counts, mu, theta, gate), None
            if gate is not None and not (per_cell_gate and self.compiled_loss):
                penalty = torch.sigmoid(gate.float()).sum(-1)
        return recon, penalty, fused, shift

    def _adversary_terms(self, z, batch_codes, labels=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per cell (None without an adversary): the adversary's cross-entropy on the cell's batch, whose gradient
        trains the adversary alone; and the confusion loss, whose gradient reaches z alone: the cross-entropy of
        the adversary's prediction against the minibatch's average prediction, least when z tells no cell's batch
        from another's. Pushing the adversary's loss up instead (a reversed gradient) was unstable: past a weight
        of ~3 the encoder made the adversary confidently wrong, which takes a latent that holds the batch. On the
        sample, not the posterior mean: on the mean the encoder fooled the adversary of the moment and a fresh
        classifier still told the batch 84% of the time (tests/test_batch_adversary.py's toy, seed 1), on the
        sample 64% (chance 50%). With batch_adversary_by_label (and a label head) the target is the average over
        the minibatch's cells of the cell's label instead: each cell weighs in by its given label, or the first
        head's probabilities where it has none, so the target is what a mixed latent leaves of the batch: the
        batches' shares of that type. Without a label head, the mixture prior's components stand for the labels:
        each cell weighs into each component's average by its responsibility (the component's share of the prior's
        density at its z). On bench's pbmc_skewed (studies with their own type compositions, seeds 0-4) that took
        0.010 of bio for +0.023 batch correction where the minibatch's average took 0.053 for +0.124."""
        if not hasattr(self, "adversary"):
            return None
        fit = F.cross_entropy(self.adversary(z.detach()).float(), batch_codes[:, 0].long(), reduction="none")
        fixed = {name: p.detach() for name, p in self.adversary.named_parameters()}
        log_p = F.log_softmax(torch.func.functional_call(self.adversary, fixed, (z,)).float(), dim=-1)
        p = log_p.detach().exp()
        if self.cfg.batch_adversary_by_label and len(self.heads) and labels is not None:
            with torch.no_grad():
                y = labels[:, 0]
                soft = F.softmax(self.heads[0](z).float(), dim=-1)
                given = F.one_hot(y.clamp_min(0).long(), soft.shape[1]).to(soft.dtype)
                target = _group_target(torch.where((y >= 0).unsqueeze(1), given, soft), p)
        elif self.cfg.batch_adversary_by_label and hasattr(self, "prior_means"):
            with torch.no_grad():
                target = _group_target(F.softmax(self._log_components(z.detach()), dim=1), p)
        else:
            target = p.mean(0, keepdim=True)
        return fit, -(log_p * target).sum(1)

    def _align_term(self, q_mu, batch_codes, mask) -> torch.Tensor | None:
        """Per cell (None without alignment): the squared distance from its latent mean to the mean of its mutual
        nearest neighbours of other batches (the first key) among a pool of the step's cells and the latest
        training cells' means: j of batch b and i of batch a are mutual when j is i's nearest of batch b and i is
        j's nearest of batch a. Held-out cells neither pull nor are pulled; training steps add their cells to the
        pool. No host sync: the pool's cells that could be someone's partner (at most one per cell and other
        batch) are found by topk, and only their rows of pool distances are computed."""
        if not hasattr(self, "align_pool"):
            return None
        mu = q_mu.detach().float()
        code = torch.where(mask, batch_codes[:, 0].long(), -1)
        pool, pool_code = torch.cat([mu, self.align_pool]), torch.cat([code, self.align_codes])
        b, size, trash = len(mu), len(pool), self.n_align  # code −1 (unused slots, held-out cells): column 'trash'
        cols = torch.where(pool_code < 0, trash, pool_code)
        inf = torch.tensor(float("inf"), device=mu.device)
        square = (pool * pool).sum(1)

        def nearest_by_batch(rows):  # squared distances from pool[rows] to the pool, each row's least per batch
            d = torch.addmm(square[None, :], pool[rows], pool.T, alpha=-2).add_(square[rows, None]).clamp_min_(0)
            d.index_put_((torch.arange(len(rows), device=rows.device), rows), inf)
            near = torch.full((len(rows), trash + 1), float("inf"), device=d.device)
            return d, near.scatter_reduce_(1, cols[None, :].expand(len(rows), size), d, "amin")

        d, near = nearest_by_batch(torch.arange(b, device=mu.device))
        other = (pool_code[None, :] >= 0) & (pool_code[None, :] != code[:, None]) & (code[:, None] >= 0)
        nearest = (d <= near.gather(1, cols[None, :].expand(b, size))) & other  # a row's own column: not 'other'
        k = min(size, b * max(trash - 1, 1))  # each cell has at most one nearest per other batch (ties aside)
        candidates = torch.topk(nearest.sum(0).float(), k).indices
        d_c, near_c = nearest_by_batch(candidates)
        # whether cell i is candidate j's nearest of i's batch, read off j's own row (as i's side is off i's: a
        # distance computed twice can differ in its last bit)
        back = d_c[:, :b] <= near_c[:, code.clamp_min(0)]  # (candidates, cells)
        row = torch.zeros(size, dtype=torch.long, device=mu.device).index_put_(
            (candidates,), torch.arange(k, device=mu.device)
        )
        listed = torch.zeros(size, dtype=torch.bool, device=mu.device).index_fill_(0, candidates, True)
        mutual = nearest & back[row].T & listed[None, :]
        w = mutual.float()
        count = w.sum(1, keepdim=True)
        target = (w @ pool) / count.clamp_min(1)
        loss = ((q_mu.float() - target) ** 2).sum(1) * (count[:, 0] > 0)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                keep = min(b, ALIGN_POOL)
                slots = (self.align_next + torch.arange(keep, device=mu.device)) % ALIGN_POOL
                self.align_pool.index_copy_(0, slots, mu[-keep:])
                self.align_codes.index_copy_(0, slots, code[-keep:])
                self.align_next.copy_((self.align_next + keep) % ALIGN_POOL)
        return loss

    def _terms(self, recon, kl, gate_pen, z, labels, masks, n, extra=None) -> list[dict]:
        """Per row of masks (rows, cells), over its n cells: the per-cell means of the NLL, KL, gate
        penalty and the batch options' terms (extra: per-cell columns by name), the label loss (label_loss) and
        'n'; every row's sums in one matrix product (the training and the held-out cells of a batch)."""
        extra = extra or {}
        cols = [recon, kl]
        per_cell_gate = gate_pen is not None and gate_pen.dim() == 1
        if per_cell_gate:
            cols.append(gate_pen)
        cols += extra.values()
        n_means = len(cols)
        heads = len(self.heads) and labels is not None
        if heads:
            cols += self._label_columns(z, labels)
        m = masks.to(kl.dtype)
        sums = m @ torch.stack(cols, 1)  # (rows, columns)
        means = sums[:, :n_means] / n.clamp_min(1).unsqueeze(1)
        out = []
        for r in range(len(masks)):
            terms = {"recon": means[r, 0], "kl": means[r, 1], "n": n[r]}
            if gate_pen is not None:
                terms["gate"] = means[r, 2] if per_cell_gate else gate_pen
            for j, name in enumerate(extra):  # extra's columns: the last of the means
                terms[name] = means[r, n_means - len(extra) + j]
            if heads:
                terms["label"] = self.label_loss(sums[r, n_means:])
            out.append(terms)
        return out

    def _label_columns(self, z, labels) -> list[torch.Tensor]:
        """Per label key, each cell's class weight × cross-entropy and its class weight (0 if unlabelled)."""
        cols = []
        for i, logits in enumerate(self.label_logits(z)):
            y = labels[:, i]
            w = getattr(self, f"class_weight_{i}")[y.clamp_min(0)] * (y >= 0)
            ce = F.cross_entropy(
                logits.float(), y.clamp_min(0), reduction="none", label_smoothing=self.cfg.label_smoothing
            )
            cols += [w * (gce(ce, self.cfg.label_gce_q) if self.cfg.label_gce_q else ce), w]
        return cols

    @staticmethod
    def label_loss(sums: torch.Tensor) -> torch.Tensor:
        """Mean over label keys of the class-weighted cross-entropy over the labelled cells, from the sums of
        _label_columns' pairs. A batch without labelled cells contributes exactly 0 (the original gave NaN),
        with every head still in the graph (DDP) and no host sync to find out."""
        pairs = sums.view(-1, 2)
        return (pairs[:, 0] / pairs[:, 1].clamp_min(1e-12)).mean()

    # -- inference --------------------------------------------------------------------------------
    def encode_measured(self, counts: Counts, measured: torch.Tensor):
        """q(z|x) for cells that measured only the genes of `measured` ((cells or 1, genes) bool): encoded once
        with the others at 0, then again with them filled by unmeasured_fill at that latent (no gradient through
        the fill). Genes in read_as_zero stay 0, as in training. On queries without a quarter of the model's
        genes, the fill took the true-type accuracy of their reference neighbours from 0.638 to 0.663 (every
        gene: 0.705) and moved their latents 30% less (bench.panels, 3 atlases × 2 seeds; docs/quality.md,
        "Stores that measured different genes")."""
        measured = measured | self.read_as_zero
        with torch.no_grad():
            fill = self.unmeasured_fill(self.encode(counts)[0], counts.library, measured)
        return self.encode(counts, fill)

    @torch.no_grad()
    def posterior(self, x, measured: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x)'s mean and variance for x: Counts, a dense or a sparse CSR tensor; `measured` (cells or 1,
        genes) bool marks the genes each cell's store measured (None: all)."""
        if measured is None or bool((measured | self.read_as_zero).all()):
            return self.encode(x)
        return self.encode_measured(x if isinstance(x, Counts) else _counts(x), measured)

    @torch.no_grad()
    def latent(self, x, sample: bool = False, measured: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior mean (or a sample) of x (see posterior)."""
        q_mu, q_var = self.posterior(x, measured)
        return draw(q_mu, q_var) if sample else q_mu

    @torch.no_grad()
    def label_probs(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [F.softmax(logits.float(), dim=-1) for logits in self.label_logits(z)]


def _weighted(terms: dict, recon, kl_weight: float, gate_weight: float, label_weight: float, gate_in_recon: bool):
    """The loss from a mask's terms: recon (the NLL's mean, or the fused loss that may hold the gate's term
    already) + the weighted KL, gate penalty and label loss."""
    total = recon + kl_weight * terms["kl"]
    if "gate" in terms and not gate_in_recon:
        total = total + gate_weight * terms["gate"]
    if "label" in terms:
        total = total + label_weight * terms["label"]
    return total


def draw(q_mu: torch.Tensor, q_var: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from each posterior N(q_mu, q_var) (torch's random stream, or `generator`'s on their device)."""
    noise = torch.randn(q_mu.shape, generator=generator, device=q_mu.device, dtype=q_mu.dtype)
    return q_mu + q_var.sqrt() * noise


def _group_target(member: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The adversary's target per cell (cells x batches) where cells belong to groups (`member`: cells x groups,
    rows summing to 1; a label, or a mixture component): each group's average prediction `p` over the minibatch's
    cells, weighted by membership, and each cell's mix of its groups' averages."""
    by_group = (member.T @ p) / member.sum(0).clamp_min(1e-12).unsqueeze(1)  # groups x batches
    return member @ by_group
