"""Real cells, technical batches: bench.quality's `pbmc` atlas.

scanpy ships a sample of 10x Genomics' fresh PBMCs (Zheng et al. 2017, donor A; `scanpy.datasets.pbmc68k_reduced`:
700 cells x 765 genes, each cell with the FACS-sorted population it correlates best with, `bulk_labels`). Its `.raw`
holds log1p(counts / cell total x 10,000), so each cell's smallest non-zero value is one count and the raw counts
come back exactly: every value is within 0.12 of an integer (the stored floats' rounding).

The cells are one donor's in one run: no batch. The atlas splits them at random into studies, so every study holds
every type in the sample's proportions and complete mixing is the right answer, and gives each study a technical
effect by binomial thinning: gene g is captured in study s with probability min(1, capture x exp(effect[s, g] +
depth[s])), effect ~ N(0, study_effect) per gene, depth ~ N(0, depth_sd) per study, and each count is kept with that
probability. The biology is real; the batch effect is known (var `capture_<study>`: each gene's capture there) and
technical only. obs as the synthetic atlases': dataset_id, cell_type and true_cell_type (the sorted population). The
store is written as `bigatlas synth` writes its atlases (bigatlas.write_store.ZarrWriter).

`pbmc_skewed` is the same cells and technical effects, but each study has its own type composition, as the synthetic
atlases' studies do (drawn from Dirichlet(0.8) over the types, some types nearly absent from a study): a cell of
type t goes to study s with probability proportional to that study's share of t. Mixing is still the right answer
within each type, but a model that aligns the studies' whole distributions pulls one study's cells onto another's
types. The study sizes differ; var `capture_<study>` and the effects are drawn as `pbmc`'s (the same seed gives the
same capture).

    python -m bench.quality --presets pbmc pbmc_skewed --seeds 0 1 2 3 4 --epochs 0
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

N_STUDIES = 3
STUDY_EFFECT = 0.6  # the synthetic atlases' sd of per-study gene log-fold changes
DEPTH_SD = 0.4  # the synthetic atlases' sd of log mean library size between studies
CAPTURE = 0.6  # a study's median capture of a count
COMPOSITION = 0.8  # pbmc_skewed: the Dirichlet concentration of each study's type composition, as synth's
PRESETS = ("pbmc", "pbmc_skewed")


def sample():
    """scanpy's PBMC sample as it ships: (log-normalised values as float64 cells x genes, obs, the gene names)."""
    import warnings
    from importlib.resources import files

    import anndata as ad

    with warnings.catch_warnings():  # the file predates today's AnnData layout, which reads it as it is
        warnings.simplefilter("ignore")
        src = ad.read_h5ad(files("scanpy") / "datasets" / "10x_pbmc68k_reduced.h5ad")
    logged = src.raw.X.toarray() if hasattr(src.raw.X, "toarray") else np.asarray(src.raw.X)
    return logged.astype(np.float64), src.obs, src.raw.var_names


def shipped():
    """scanpy's PBMC sample: (raw counts as int64 cells x genes, the sorted populations, the gene names)."""
    logged, obs, genes = sample()
    scaled = np.expm1(logged)
    one = np.where(scaled > 0, scaled, np.inf).min(1, keepdims=True)  # one count of each cell
    counts = scaled / one
    off = np.abs(counts - np.round(counts)).max()
    if off > 0.25:
        raise ValueError(f"scanpy's pbmc68k_reduced: its raw values are not log-normalised counts (off by {off:.2f})")
    return np.round(counts).astype(np.int64), obs["bulk_labels"].astype(str).to_numpy(), genes


def thinned(
    counts: np.ndarray,
    seed: int,
    n_studies=N_STUDIES,
    study_effect=STUDY_EFFECT,
    depth_sd=DEPTH_SD,
    labels: np.ndarray | None = None,
):
    """Each cell's study and its counts thinned by its study's capture: (study, thinned, capture). The study is drawn
    at random, or with `labels` by each study's own type composition (pbmc_skewed); either way the effects are the
    seed's same draws."""
    rng = np.random.default_rng(seed)
    study = rng.integers(0, n_studies, counts.shape[0])
    effect = rng.normal(0, study_effect, (n_studies, counts.shape[1]))
    depth = rng.normal(0, depth_sd, (n_studies, 1))
    capture = np.minimum(1.0, CAPTURE * np.exp(effect + depth))
    if labels is not None:
        types, code = np.unique(labels, return_inverse=True)
        comp = rng.dirichlet(np.full(len(types), COMPOSITION), n_studies)  # studies x types
        odds = comp[:, code].T  # cells x studies: P(study | type) up to the type's normaliser
        cum = np.cumsum(odds / odds.sum(1, keepdims=True), 1)
        study = np.minimum((rng.random((len(code), 1)) > cum).sum(1), n_studies - 1)
    return study, rng.binomial(counts, capture[study]), capture


def pbmc_atlas(path, seed: int, preset: str = "pbmc") -> Path:
    """Write the seed's atlas of that preset (pbmc or pbmc_skewed) to `path` (.zarr), whole or not at all
    (ZarrWriter builds it beside, then renames)."""
    import scipy.sparse as sp

    from bigatlas.write_store import ZarrWriter

    if preset not in PRESETS:
        raise ValueError(f"bench.pbmc: no preset {preset!r}, only {', '.join(PRESETS)}")
    counts, labels, genes = shipped()
    study, x, capture = thinned(counts, seed, labels=labels if preset == "pbmc_skewed" else None)
    names = [f"study_{s}" for s in range(capture.shape[0])]
    types = pd.Categorical(labels)
    obs = pd.DataFrame(
        {"dataset_id": pd.Categorical([names[s] for s in study]), "cell_type": types, "true_cell_type": types},
        index=pd.Index([f"cell_{i}" for i in range(len(labels))]),
    )
    var = pd.DataFrame({f"capture_{n}": c.astype(np.float32) for n, c in zip(names, capture)}, index=genes)
    x = sp.csr_matrix(x)
    with ZarrWriter(path, len(genes)) as writer:
        writer.append(x.indptr, x.indices, x.data)
        return writer.finish(obs, var)
