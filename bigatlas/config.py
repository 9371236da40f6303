"""Configuration as data: frozen dataclasses saved into the run dir and every checkpoint.

A config file (TOML or JSON) has sections [model], [train], [data]; command-line flags override it.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

LIKELIHOODS = ("zinb", "nb")
DISPERSIONS = ("gene-cell", "gene", "gene-batch")
GATES = ("gene", "gene-cell")
NORMS = ("batch", "layer")
GENE_JOINS = ("inner", "outer")
CLASS_WEIGHTINGS = ("inverse", "sqrt-inverse", "none")
COMPILE_LOSS = ("auto", "on", "off")
PRECISIONS = ("auto", "no", "bf16")
EMA_STARTS = ("run", "warmup")
MISSING_GENES = ("masked", "zero")
COMPILE_MIN_STEPS = 5000
AVERAGE_CELLS = 128  # cells a step at which the weight average's default decays were chosen (TrainConfig)
# early stopping's floor without label keys, in training cells: below ~1,100 cells the epoch rule's 400 epochs
# (scVI's length), at 4,000 cells 119 epochs, at 8,000 cells 60, about where the early-stopped benchmark runs stop
# (docs/quality.md, "A floor on the cells trained on" and "The floor at 450,000 cells")
MIN_CELLS_UNLABELLED = 450_000
# training cells over which BatchNorm's statistics are gathered for the weight average a run writes
NORM_REFRESH_CELLS = 20_000
UNLABELED = ("undefined",)  # label values that mean "no label" unless the user names others


def opt(default, help: str, **cli):
    """A config field with its command-line help (and flag, choices, … for the generated flag)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class ModelConfig:
    # unset: 10 (scAtlasVAE's) with label keys, where 16 loosened the type clusters (bio -0.026 / -0.019 on rare
    # / condition); 16 without, where the latent kept subtypes and the condition programme apart: bio +0.008 to
    # +0.033 on four of five atlases (rare -0.004 +- 0.005), kNN accuracy +0.01 to +0.05, batch correction -0.003
    # to -0.030 (bench.quality, 5-6 seeds, tag lat16b against bf16). config.json records the size a run used.
    n_latent: int | None = opt(None, "latent dimensions; unset: 10 when the model has label keys, 16 without")
    hidden: tuple[int, ...] = opt((128,), "hidden layer widths of the encoder (the decoder mirrors them)")
    embedding_dim: int = opt(8, "embedding size per batch/covariate key, concatenated to z in the decoder")
    batch_in_heads: bool = opt(
        False, "the batch/covariate embeddings also feed the decoder's mean head (a per-batch shift of each "
        "gene's log mean beside the hidden layer's)",
    )  # fmt: skip
    # unset: layer with label keys, where it kept more biology on all five atlases (bio +0.001 to +0.024, held-out
    # accuracy +0.001 to +0.013; bench.quality, 3 seeds, tag ln against bf16); batch without, where it mixed more
    # and kept fewer subtypes (subtle kNN accuracy -0.056), as every such lever before
    norm: str | None = opt(
        None, "normalisation of the hidden layers: batch (BatchNorm, scAtlasVAE's and scVI's) or layer (LayerNorm "
        "without affine terms: each cell on its own, as scArches advises for reference mapping); unset: layer when "
        "the model has label keys, batch without", choices=NORMS,
    )  # fmt: skip
    # unset: 0.1 (scAtlasVAE's) with label keys, where it kept the type clusters tight (bio -0.004 / -0.006
    # / -0.012 without it); 0 without, where dropout took out biology that looks like batch: a graded state
    # whose level differs by study (R^2 0.59 -> 0.68, scVI 0.67) and bio +0.005 / +0.004 / +0.001 / +0.005
    # on the subtle / rare / condition / continuous atlases, batch correction still >= scVI's (bench.quality)
    dropout: float | None = opt(
        None, "encoder dropout (the decoder has none); unset: 0.1 when the model has label keys, 0 without"
    )
    likelihood: str = opt("zinb", "count likelihood", choices=LIKELIHOODS)
    # per gene (scVI's) rather than the original's per gene-cell: with kl_weight 0.1 it kept more biology
    # on the hard synthetic atlases (bench.quality), where gene-cell dispersion absorbed cell-type signal
    dispersion: str = opt("gene", "inverse dispersion per gene-cell, gene or gene-batch", choices=DISPERSIONS)
    # ZI gate: gene-cell (predicted from the decoder per cell and gene, like the released 1.0.5.9 code)
    # fit the synthetic atlas better than per-gene logits: held-out NLL 618.2 vs 626.2 per cell
    # (6k cells, 25 epochs; NB: 621.9)
    zi_gate: str = opt("gene-cell", "zero-inflation gate per gene or per gene-cell", choices=GATES)
    normalize_total: float | None = opt(None, "scale counts to this total before log1p (unset: log1p of raw counts)")
    var_eps: float = opt(1e-4, "added to the posterior variance")
    class_weighting: str = opt(
        "inverse", "label loss weight per class: inverse frequency (the original), its square root, or none",
        choices=CLASS_WEIGHTINGS,
    )  # fmt: skip
    label_gce_q: float = opt(
        0.0, "the label loss per cell: 0 = cross-entropy; q in (0, 1] = generalised cross-entropy (1 - p^q) / q "
        "of the given label's probability p, whose pull on a cell the model finds unlikely under its label "
        "(a mislabelled one) shrinks as p^q",
    )  # fmt: skip
    label_smoothing: float = opt(
        0.0, "label smoothing of the label loss: the given label's target probability 1 - e + e / K, every other "
        "class e / K (0: the plain cross-entropy)",
    )  # fmt: skip

    batch_adversary: float = opt(
        0.0, "weight of a batch adversary: a small classifier learns the first batch key's category from each "
        "cell's latent while the encoder learns, at this weight, to leave its predictions no better than the "
        "minibatch's average (0: off)",
    )  # fmt: skip
    batch_adversary_by_label: bool = opt(
        False, "the batch adversary's target per label: no better than the average of the minibatch's cells of the "
        "same label (the first label key; the head's prediction where a cell has none; without label keys, of "
        "the same component of the mixture prior) rather than of all its cells, so a type some studies lack is "
        "not pulled onto other types to look like every study's",
    )  # fmt: skip

    batch_align: float = opt(
        0.0, "weight of a batch alignment: each cell's latent mean is pulled towards its mutual nearest neighbours "
        "of other categories of the first batch key among the latest cells (0: off)",
    )  # fmt: skip

    # without labels it kept more biology on six of seven atlases and mixed more on five; with labels more
    # biology on all seven, held-out accuracy within 0.002 (bench.quality, detached.json *detach* / *before*).
    # None: the rule of run dirs saved while it was unset by default (on without label keys, off with them)
    batch_interaction: bool | None = opt(
        True, "a batch-by-state term in the decoder: the mean's logits also read the outer product of the batch "
        "embeddings and z through one linear layer (zero at the start), so each batch has its own linear map from "
        "the latent to the genes beside the shared decoder, for batch effects that differ by cell type",
    )  # fmt: skip
    # detached: 0.1 kept the subtypes, the activation and the resident types nearly as before the term; 0 mixed
    # more for them (bench.quality, detached.json *detach* / *detach0*)
    batch_interaction_penalty: float = opt(
        0.1, "with batch_interaction: weight of the penalty on the term's size, the mean over training cells of "
        "its squared logit shifts summed over genes",
    )  # fmt: skip
    batch_interaction_detach: bool = opt(
        True, "with batch_interaction: the term reads z without passing its gradient to the encoder, so the maps "
        "explain each batch's effect on the states the encoder finds and the encoder gains nothing from placing "
        "a state's cells apart by batch (off: the encoder also learns through the term)",
    )  # fmt: skip

    # unset: 32 without label keys, with KL weight 0.3 there (TrainConfig.kl_weight): against the defaults before,
    # batch correction +0.070 +- 0.009 (14 of 14 up), bio -0.003 +- 0.003, bio and batch correction both at or above
    # scVI's on 8 of 13 runs (before: 1), the within-type biology down to about scVI's (bench.quality, seeds 5-6 of
    # seven atlases, mixture_prior.json *mog32kl3* against *rerun*); 0 with them, where the labelled criterion held
    prior_components: int | None = opt(
        None, "components of a Gaussian-mixture prior on z (learned means, variances and weights; the KL term is "
        "then estimated from each cell's sample); 0: the standard normal prior; unset: 32 when the model has no "
        "label keys, 0 with them",
    )  # fmt: skip

    def latent_size(self, labelled: bool) -> int:
        """The latent size: the configured one, or the default for a model with or without labels."""
        return self.n_latent if self.n_latent is not None else (10 if labelled else 16)

    def mixture_components(self, labelled: bool) -> int:
        """The prior's components: the configured number, or the default for a model with or without labels."""
        return self.prior_components if self.prior_components is not None else (0 if labelled else 32)

    def encoder_dropout(self, labelled: bool) -> float:
        """The encoder's dropout: the configured one, or the default for a model with or without labels."""
        return self.dropout if self.dropout is not None else (0.1 if labelled else 0.0)

    def interaction(self, labelled: bool) -> bool:
        """Whether the model has the batch-by-state term: the configured choice; unset (a run dir saved while that
        was the default), on without label keys and off with them."""
        return self.batch_interaction if self.batch_interaction is not None else not labelled

    def hidden_norm(self, labelled: bool) -> str:
        """The hidden layers' normalisation: the configured one, or the default for a model with or without labels."""
        return self.norm if self.norm is not None else ("layer" if labelled else "batch")

    def __post_init__(self):
        _check_flags(self)
        _check("likelihood", self.likelihood, LIKELIHOODS)
        _check("dispersion", self.dispersion, DISPERSIONS)
        _check("zi_gate", self.zi_gate, GATES)
        if self.norm is not None:
            _check("norm", self.norm, NORMS)
        _check("class_weighting", self.class_weighting, CLASS_WEIGHTINGS)
        if not 0 <= self.label_gce_q <= 1:
            raise ValueError(f"label_gce_q must be in [0, 1], not {self.label_gce_q}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.label_smoothing and self.label_gce_q:
            raise ValueError("label_smoothing and label_gce_q are two different label losses: set one of them")
        if self.batch_adversary < 0:
            raise ValueError(f"batch_adversary must be at least 0 (0: off), not {self.batch_adversary}")
        if self.batch_adversary_by_label and not self.batch_adversary:
            raise ValueError("batch_adversary_by_label sets the batch adversary's target: set batch_adversary too")
        if self.batch_align < 0:
            raise ValueError(f"batch_align must be at least 0 (0: off), not {self.batch_align}")
        if self.prior_components is not None and self.prior_components < 0:
            raise ValueError(
                f"prior_components must be at least 0 (0: the standard normal prior), not {self.prior_components}"
            )
        if self.batch_interaction_penalty < 0:
            raise ValueError(f"batch_interaction_penalty must be at least 0, not {self.batch_interaction_penalty}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))


@dataclass(frozen=True)
class TrainConfig:
    # lr 2e-3 / batch 128: on the synthetic atlas (6k cells, 25 epochs) held-out label accuracy 0.90,
    # study mixing 0.76; the original's 5e-5 reached 0.35 and 0.07 in the same epochs
    lr: float = opt(2e-3, "AdamW learning rate")
    weight_decay: float = opt(1e-6, "AdamW weight decay")
    # 0.01 (scVI's) instead of torch's 1e-8: bio conservation without labels +0.002 to +0.006 on each
    # hard atlas (means of 4 seeds, 9 of 12 paired runs up; bench/results/defaults.json)
    adam_eps: float = opt(0.01, "AdamW epsilon (added to the root of the second moment)")
    batch_size: int = opt(128, "cells per minibatch per process")
    max_epochs: int | None = opt(None, "epochs (unset: min(round(20000 / n_cells * 400), 400), at least 10)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (benchmarks, smoke runs)")
    # 0.1, not 1: the latent kept subtypes apart (kNN accuracy 0.50 -> 0.61 on the subtle atlas) at
    # almost the same batch mixing (bench.quality)
    # unset: 0.1 with label keys; 0.3 without, beside the mixture prior (ModelConfig.prior_components): at 0.3 with
    # the standard normal prior bio -0.005 +- 0.004 (2 of 11 up); the mixture gives back +0.003 and mixes +0.009 more
    kl_weight: float | None = opt(
        None, "weight of the KL term after warm-up; unset: 0.1 when the model has label keys, 0.3 without"
    )
    kl_warmup_epochs: float = opt(10.0, "epochs of linear KL warm-up from 0 (at most half of the run)")
    gate_weight: float = opt(1.0, "weight of the ZI gate penalty (mean summed gate probability per cell)")
    # 50 (scANVI's classification ratio) instead of the original's 1: beside a per-cell reconstruction
    # loss of ~10^3 nats a weight of 1 left the latent almost untouched by labels (bench.quality:
    # bio 0.59 -> 0.82, held-out accuracy 0.83 -> 0.98 on the condition atlas; tables in docs/quality.md)
    label_weight: float = opt(50.0, "weight of the label loss (a per-cell mean cross-entropy)")
    label_start_epoch: int = opt(0, "epoch from which the label loss applies (original: the last 10 only)")
    val_fraction: float = opt(0.05, "fraction of cells held out for validation, by a hash of their position")
    # 10, not off: on the hard atlases (bench/results/epochs.json) the 400-epoch rule overfitted
    # (validation loss 2% above its best, lower bio and held-out accuracy) where stopping 10 epochs
    # after the best (25-70 epochs) matched or beat a fixed 60 on every atlas (two seeds) and beat a
    # patience of 20; 0 turns it off
    early_stopping_patience: int | None = opt(
        10, "stop after this many epochs (after the KL warm-up) without validation improvement (0: off)"
    )
    early_stopping_min_delta: float = opt(0.0, "improvement (relative to the best validation loss) that counts")
    min_epochs: int = opt(0, "early stopping does not stop a run before this many epochs (0: any after the KL warm-up)")
    # unset: MIN_CELLS_UNLABELLED without label keys, 0 with (docs/quality.md, "A floor on the cells trained on")
    min_cells: int | None = opt(
        None, "early stopping does not stop a run before its epochs have held this many training cells in all "
        f"(unset: {MIN_CELLS_UNLABELLED:,} without label keys, 0 with)",
    )  # fmt: skip
    # docs/quality.md, "BatchNorm statistics for the averaged weights"
    norm_refresh_cells: int = opt(
        NORM_REFRESH_CELLS, "after training, BatchNorm's running statistics are gathered anew for the weight "
        "average over this many training cells (0: the running statistics of the last steps' own weights)",
    )  # fmt: skip
    lr_plateau_patience: int = opt(
        0, "multiply the learning rate by lr_plateau_factor after every this many epochs (after the KL warm-up) "
        "without validation improvement (0: off)"
    )  # fmt: skip
    lr_plateau_factor: float = opt(0.5, "learning-rate factor of lr_plateau_patience")
    grad_clip: float | None = opt(10.0, "gradient norm clipping (unset: off)")
    # 0.999, not off: the final weights average the run's last ~1,000 steps (all of a shorter run's);
    # bio +0.002 / +0.021 / -0.002 without labels, +0.015 / +0.014 / +0.011 with, at the same held-out
    # accuracy and batch correction -0.003 to -0.029 (hard atlases, 4 seeds; bench/results/defaults.json).
    # Unset: 0.9997 with label keys, where the average over ~3,300 steps (at 8,000 cells about the whole run)
    # kept more biology on all seven atlases (+0.003 to +0.023; label silhouette and isolated labels up on all
    # seven) at the same held-out accuracy (within 0.002), batch correction -0.034 to +0.010 (bench.quality,
    # seeds 5-6, detached.json ema9997); 0.999 without, where 0.9997 mixed less (-0.017 to -0.053) and 0.995
    # mixed more for the treatment kept (ema995). config.json records the decay a run used. Those are the
    # decays at AVERAGE_CELLS a step; at more cells a step (a larger batch, more processes) the unset decay
    # is raised to (cells a step / AVERAGE_CELLS), so the average spans the same cells: every larger-batch
    # recipe screened so did (512 / 1,024 / 2,048 / 4,096; docs/quality.md), and with label keys at 32,000
    # cells 0.9997**8 at batch 1,024 kept the treatment (0.321 against 0.264 with 0.999**8) and bio (0.823
    # against 0.816), as 0.9997**16 at 2,048 did (0.315 against 0.139; size_32k.json, b1024l / b2048l).
    ema_decay: float | None = opt(
        None, "decay of the moving average of the weights written at the end (0: the last step's; unset: 0.9997 "
        "with label keys, 0.999 without, at 128 cells a step, raised to (batch size x processes / 128) so the "
        "average spans as many cells; a query mapped onto a reference takes the reference's)",
    )  # fmt: skip
    # 4: a quarter of the average's memory traffic for the same latent as every step (kNN accuracy, label
    # silhouette, isolated labels within 0.001 on the hard atlases; bench/results/defaults.json, tag ema4)
    ema_every: int = opt(
        4, "optimizer steps between updates of the weight average (its decay raised to this power: the same span)"
    )
    # run: warmup kept more of the types with labels on pbmc's ~400-step runs (bio +0.002 to +0.008) and mixed more
    # without (+0.013 to +0.029, bio -0.000 to -0.003), but took bio with labels on the 8,000-cell synthetic atlases
    # (-0.003, 12 of 14 down; bench/results/average_start.json, pbmc.json, pbmc_skewed.json, tag ewarm)
    ema_start: str = opt(
        "run", "where the weight average begins: run (its first step) or warmup (the end of the KL warm-up: the "
        "weights of the warm-up leave no trace in those written)", choices=EMA_STARTS,
    )  # fmt: skip
    # auto = bf16 on CPUs with bfloat16 matrix units: the quality benchmark's atlases (subtle, rare, condition,
    # continuous, hard; 3 seeds, with and without labels) scored within seed noise of float32 (bio -0.005 to
    # +0.005, held-out accuracy -0.000 to +0.002; bench/results/kmeans10.json, continuous.json, hard.json, tag
    # bf16); a step 4-8%, an epoch 12-23% faster (bench.train --also-precision no)
    mixed_precision: str = opt(
        "auto", "bf16: autocast on GPUs; on the CPU the wide layers' products (first layer, decoder heads) on "
        "bfloat16 operands, the rest float32. auto: bf16 on CPUs with bfloat16 matrix units (AMX, AVX-512 "
        "BF16), float32 elsewhere and on GPUs; a resumed run keeps its own", choices=PRECISIONS,
    )  # fmt: skip
    # auto: runs of >= COMPILE_MIN_STEPS steps, where compiling pays for itself: the reconstruction loss's
    # fwd + bwd (decoder_nll) takes 2.1 instead of 6.5 ms per step of 128 cells x 2,000 genes on 2 threads,
    # so the ~5 s compile (~17 s the first time on a machine) is repaid after ~1,100 steps (~3,900 the first)
    compile_loss: str = opt(
        "auto", f"fuse the reconstruction loss with torch.compile: on, off, or auto (runs of at least "
        f"{COMPILE_MIN_STEPS:,} steps)", choices=COMPILE_LOSS,
    )  # fmt: skip
    missing_genes: str = opt(
        "masked", "genes a cell's store lacks, read as zeros (a collection's outer gene join; a query without some "
        "of the model's genes): masked leaves them out of the likelihood, zero takes them as counted zeros",
        choices=MISSING_GENES,
    )  # fmt: skip
    checkpoint_every_steps: int = opt(500, "mid-epoch checkpoint interval (0: epoch ends only)")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk")
    seed: int = opt(0, "seed of shuffling, hold-out and initialisation")
    num_workers: int = opt(1, "reader threads per process", flag="--workers")
    reference_cells: int = opt(
        200_000, "training cells (label-stratified) in the reference index written at the end (0: none); "
        "kNN label transfer, uncertainty and the reference UMAP read it",
    )  # fmt: skip
    reference_umap: bool = opt(True, "lay the reference index out with UMAP (queries are placed on it)")

    def __post_init__(self):
        _check_flags(self)
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off), not {self.ema_decay}")
        for key in ("min_epochs", "min_cells", "norm_refresh_cells"):
            if (getattr(self, key) or 0) < 0:
                raise ValueError(f"{key} must be at least 0, not {getattr(self, key)}")
        if self.ema_every < 1:
            raise ValueError(f"ema_every must be at least 1, not {self.ema_every}")
        _check("compile_loss", self.compile_loss, COMPILE_LOSS)
        _check("ema_start", self.ema_start, EMA_STARTS)
        _check("mixed_precision", self.mixed_precision, PRECISIONS)
        _check("missing_genes", self.missing_genes, MISSING_GENES)

    def compiles_loss(self, planned_steps: int) -> bool:
        return self.compile_loss == "on" or (self.compile_loss == "auto" and planned_steps >= COMPILE_MIN_STEPS)

    def kl(self, labelled: bool) -> float:
        """The KL term's weight: the configured one, or the default for a model with or without labels."""
        return self.kl_weight if self.kl_weight is not None else (0.1 if labelled else 0.3)

    def cell_floor(self, labelled: bool) -> int:
        """min_cells: the configured one, or the default for a model with or without labels."""
        return self.min_cells if self.min_cells is not None else (0 if labelled else MIN_CELLS_UNLABELLED)

    def floor_epochs(self, n_train: int) -> int:
        """The epochs before which early stopping does not stop: min_epochs, and as many as min_cells takes at
        n_train training cells an epoch."""
        return max(self.min_epochs, math.ceil((self.min_cells or 0) / max(n_train, 1)))

    def average_decay(self, labelled: bool, processes: int = 1) -> float:
        """The weight average's decay: the configured one, or the default for a model with or without labels,
        over the cells that AVERAGE_CELLS a step would average (`processes` ranks of batch_size cells a step)."""
        if self.ema_decay is not None:
            return self.ema_decay
        base = 0.9997 if labelled else 0.999
        return round(base ** (self.batch_size * processes / AVERAGE_CELLS), 6)

    def warmup_epochs(self, max_epochs: int) -> float:
        return min(self.kl_warmup_epochs, 0.5 * max_epochs)

    def average_start(self, max_epochs: int, steps_per_epoch: int) -> int:
        """The optimizer step after which the weight average begins (ema_start): with warmup the first at which
        the KL weight is full."""
        if self.ema_start == "run":
            return 0
        return math.ceil(self.warmup_epochs(max_epochs) * steps_per_epoch - 1e-9)

    def epochs_for(self, n_cells: int) -> int:
        if self.max_epochs is not None:
            return int(self.max_epochs)
        return max(10, min(round(20000 / max(n_cells, 1) * 400), 400))


@dataclass(frozen=True)
class DataConfig:
    data: str | tuple[str, ...] = opt(
        "", "AnnData-Zarr store, .h5ad, SOMA experiment or census:<version> (e.g. census:2025-01-30); several "
        "(or a collection manifest, .toml/.json) are trained on as one data set", required=True, nargs="+",
    )  # fmt: skip
    batch_key: str = opt("", "obs column of the batch (embedded in the decoder)", required=True)
    covariate_keys: tuple[str, ...] = opt((), "further categorical obs columns to embed")
    label_keys: tuple[str, ...] = opt((), "obs columns with cell-type labels to predict")
    obs_filter: str | None = opt(None, "SOMA value_filter selecting the cells, e.g. \"tissue_general == 'blood'\"")
    layer: str | None = opt(
        None, "Zarr layer / SOMA X layer of raw counts (unset: X; for SOMA raw, or its only X layer)"
    )
    genes: tuple[str, ...] | None = opt(None, "file with one feature id (or name) per line, in model order",
                                        metavar="FILE", from_file=True)  # fmt: skip
    unlabeled_categories: tuple[str, ...] = opt(
        UNLABELED, "a label value that means 'unlabelled' (repeat the flag for several; missing values always "
        "are; matched exactly, so a real class named like one is a class)", flag="--unlabeled-category",
        action="append", metavar="VALUE",
    )  # fmt: skip
    drop_labels: tuple[str, ...] = opt(
        (), "KEY=FILE: train as if the cells FILE lists had no KEY label (a CSV with a 'cell' column of obs names "
        "and, where they repeat, a 'row' column of cell ids, as `bigatlas review` writes); one KEY=FILE per label "
        "key", metavar="KEY=FILE",
    )  # fmt: skip
    allow_non_integer: bool = opt(False, "accept non-integer values (still finite and >= 0)")
    gene_join: str = opt("inner", "genes of several stores: their intersection (inner), or their union (outer; "
                         "a gene a store lacks is left out of its cells' likelihood)", choices=GENE_JOINS)  # fmt: skip

    def __post_init__(self):
        _check_flags(self)
        if not isinstance(self.data, str):  # several stores: a tuple; one: its string
            data = tuple(map(str, self.data))
            object.__setattr__(self, "data", data[0] if len(data) == 1 else data)
        _check("gene_join", self.gene_join, GENE_JOINS)
        for name in ("covariate_keys", "label_keys", "unlabeled_categories", "drop_labels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        keys = []
        for spec in self.drop_labels:
            key, sep, file = spec.partition("=")
            if not (key and sep and file):
                raise ValueError(f"--drop-labels takes KEY=FILE (a label key and a CSV of cells), not {spec!r}")
            if key not in self.label_keys or key in keys:
                why = "twice" if key in keys else f"but the label keys are: {', '.join(self.label_keys) or 'none'}"
                raise ValueError(f"--drop-labels {spec!r} names label key {key!r} {why}")
            keys.append(key)
        if self.genes is not None:
            object.__setattr__(self, "genes", tuple(self.genes))

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Keys embedded in the decoder: the batch key first, then covariates."""
        return (self.batch_key, *self.covariate_keys)

    def read_as(self, layer: str | None = None, allow_non_integer: bool = False) -> tuple[str | None, bool]:
        """How a trained model reads new data: a call's own matrix (layer) and leave for non-whole values, else
        those the model was trained with."""
        return layer or self.layer, allow_non_integer or self.allow_non_integer


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        unknown = set(d) - {"model", "train", "data"}
        if unknown:
            raise ValueError(f"config has unknown section(s) {sorted(unknown)}; expected model, train, data")
        return cls(
            model=_build(ModelConfig, d.get("model", {})),
            train=_build(TrainConfig, d.get("train", {})),
            data=_build(DataConfig, d.get("data", {})),
        )

    @classmethod
    def from_file(cls, path) -> RunConfig:
        """A user's config file: TOML (by suffix) or JSON, with [model], [train], [data] sections."""
        path = Path(path)
        text = path.read_text()
        d = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.from_dict(d)

    def override(self, section: str, **values) -> RunConfig:
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        return replace(self, **{section: replace(getattr(self, section), **values)})


def _build(cls, d: dict):
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {sorted(unknown)} (have: {', '.join(sorted(names))})")
    return cls(**d)


def _check_flags(config) -> None:
    """A yes/no option must be a boolean (None where unset is allowed): a config file's string "false" would
    otherwise be truthy and turn the option on."""
    for f in fields(config):
        value = getattr(config, f.name)
        if f.type in ("bool", "bool | None") and not isinstance(value, bool):
            if value is None and f.type == "bool | None":
                continue
            kind = "true or false" + (" (or unset)" if f.type == "bool | None" else "")
            raise ValueError(f"{type(config).__name__}.{f.name} must be {kind}, not {value!r}")


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
