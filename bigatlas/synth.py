"""Synthetic atlas: ZINB counts from a low-rank program model with Census-like obs/var.

Cell types form a 2-level hierarchy (coarse → fine); studies contain donors; each study and donor
multiplies gene means by its own log-normal effect (strong, as between real studies); library sizes
vary by study and cell. About 7% of cells carry the label 'undefined'; `true_cell_type` keeps the
truth. Cell metadata is drawn first (a few ints per cell), then counts are drawn and written chunk
by chunk, so memory is bounded by one chunk whatever the number of cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

ASSAYS = ["10x 3' v3", "10x 3' v2", "10x 5' v1"]
TISSUES = ["blood", "lung", "kidney"]


@dataclass(frozen=True)
class SynthSpec:
    n_cells: int
    n_genes: int = 2000
    n_coarse: int = 4
    n_fine_per_coarse: int = 3
    n_studies: int = 6
    donors_per_study: int = 4
    study_effect: float = 0.6  # sd of per-study gene log-fold changes
    donor_effect: float = 0.2
    mean_library: float = 2500.0
    undefined_fraction: float = 0.07
    zero_inflation: float = 0.05  # mean per-gene structural-zero probability
    order: str = "study"  # storage order: study (concatenated datasets), cell_type (sorted), random
    seed: int = 0


def _programs(spec: SynthSpec, rng: np.random.Generator):
    """Gene log-means: base + coarse program + fine program; plus dispersion and gate per gene."""
    G = spec.n_genes
    base = rng.normal(-1.0, 1.2, G)
    coarse = np.zeros((spec.n_coarse, G))
    for c in range(spec.n_coarse):
        genes = rng.choice(G, max(G // 12, 1), replace=False)
        coarse[c, genes] = rng.normal(2.0, 0.6, len(genes))
    n_fine = spec.n_coarse * spec.n_fine_per_coarse
    fine = np.zeros((n_fine, G))
    for f in range(n_fine):
        genes = rng.choice(G, max(G // 40, 1), replace=False)
        fine[f, genes] = rng.normal(1.5, 0.5, len(genes))
    fine += coarse[np.arange(n_fine) // spec.n_fine_per_coarse]
    theta = np.exp(rng.normal(1.0, 0.8, G))  # NB inverse dispersion
    gate = np.clip(rng.beta(1.0, 1.0 / max(spec.zero_inflation, 1e-6) - 1.0, G), 0, 0.9)
    return base + fine, theta, gate


def _cells(spec: SynthSpec, rng: np.random.Generator):
    n_fine = spec.n_coarse * spec.n_fine_per_coarse
    study = np.sort(rng.integers(0, spec.n_studies, spec.n_cells))
    donor = study * spec.donors_per_study + rng.integers(0, spec.donors_per_study, spec.n_cells)
    # each study has its own cell-type composition, some types nearly absent
    comp = rng.dirichlet(np.full(n_fine, 0.8), spec.n_studies)
    u = rng.random(spec.n_cells)
    ctype = np.minimum((u[:, None] > np.cumsum(comp[study], axis=1)).sum(1), n_fine - 1)
    if spec.order == "cell_type":
        perm = np.lexsort((study, ctype))
    elif spec.order == "random":
        perm = rng.permutation(spec.n_cells)
    elif spec.order == "study":
        perm = np.lexsort((donor, study))
    else:
        raise ValueError(f"order must be study, cell_type or random, not {spec.order!r}")
    return study[perm], donor[perm], ctype[perm]


def generate(spec: SynthSpec, writer, chunk_cells: int = 8192) -> None:
    """Draw the atlas and stream it into `writer` (write_store.ZarrWriter or SomaWriter)."""
    rng = np.random.default_rng(spec.seed)
    logits, theta, gate = _programs(spec, rng)
    G, n_donors = spec.n_genes, spec.n_studies * spec.donors_per_study
    study_fx = rng.normal(0, spec.study_effect, (spec.n_studies, G))
    donor_fx = rng.normal(0, spec.donor_effect, (n_donors, G))
    study_lib = np.log(spec.mean_library) + rng.normal(0, 0.4, spec.n_studies)
    study, donor, ctype = _cells(spec, rng)
    for lo in range(0, spec.n_cells, chunk_cells):
        hi = min(lo + chunk_cells, spec.n_cells)
        crng = np.random.default_rng([spec.seed, lo])  # chunk-local stream: output independent of chunking order
        s, d, t = study[lo:hi], donor[lo:hi], ctype[lo:hi]
        eta = (logits[t] + study_fx[s] + donor_fx[d]).astype(np.float32)
        eta -= eta.max(axis=1, keepdims=True)
        p = np.exp(eta)
        p /= p.sum(axis=1, keepdims=True)
        lib = np.exp(study_lib[s] + crng.normal(0, 0.35, hi - lo)).astype(np.float32)
        mu = p * lib[:, None]
        counts = crng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)
        counts[crng.random(counts.shape, dtype=np.float32) < gate] = 0
        rows, cols = np.nonzero(counts)
        indptr = np.zeros(hi - lo + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=hi - lo), out=indptr[1:])
        writer.append(indptr, cols, counts[rows, cols])
    writer.finish(*_frames(spec, study, donor, ctype, rng))


def _frames(spec: SynthSpec, study, donor, ctype, rng):
    n = spec.n_cells
    fine_names = np.array(
        [
            f"type_{c // spec.n_fine_per_coarse}.{c % spec.n_fine_per_coarse}"
            for c in range(spec.n_coarse * spec.n_fine_per_coarse)
        ]
    )
    coarse_names = np.array([f"type_{c}" for c in range(spec.n_coarse)])
    undefined = rng.random(n) < spec.undefined_fraction
    cell_type = np.where(undefined, "undefined", fine_names[ctype])
    coarse = np.where(undefined, "undefined", coarse_names[ctype // spec.n_fine_per_coarse])
    study_assay = rng.integers(0, len(ASSAYS), spec.n_studies)
    study_tissue = np.arange(spec.n_studies) % len(TISSUES)

    def cat(values):
        return pd.Categorical(values)

    obs = pd.DataFrame(
        {
            "dataset_id": cat(np.char.add("study_", study.astype(str))),
            "donor_id": cat(np.char.add("donor_", donor.astype(str))),
            "assay": cat(np.asarray(ASSAYS)[study_assay[study]]),
            "tissue_general": cat(np.asarray(TISSUES)[study_tissue[study]]),
            "cell_type": cat(cell_type),
            "cell_type_coarse": cat(coarse),
            "true_cell_type": cat(fine_names[ctype]),
            "is_primary_data": rng.random(n) < 0.9,
            "soma_joinid": np.arange(n, dtype=np.int64),
        },
        index=pd.Index(np.char.add("cell_", np.arange(n).astype(str)), name="obs_id"),
    )
    g = np.arange(spec.n_genes)
    var = pd.DataFrame(
        {
            "feature_id": np.char.add("ENSSYN", np.char.zfill(g.astype(str), 11)),
            "feature_name": np.char.add("GENE", g.astype(str)),
            "soma_joinid": g.astype(np.int64),
        },
        index=pd.Index(np.char.add("ENSSYN", np.char.zfill(g.astype(str), 11)), name="gene_id"),
    )
    return obs, var


def synth(out, n_cells: int, n_genes: int, fmt: str = "zarr", seed: int = 0, overwrite: bool = False, **spec_kwargs):
    from .write_store import SomaWriter, ZarrWriter

    spec = SynthSpec(n_cells=n_cells, n_genes=n_genes, seed=seed, **spec_kwargs)
    if fmt == "zarr":
        writer = ZarrWriter(out, n_genes, overwrite=overwrite)
    elif fmt == "soma":
        writer = SomaWriter(out, n_cells, n_genes, overwrite=overwrite)
    else:
        raise ValueError(f"format must be zarr or soma, not {fmt!r}")
    with writer:
        generate(spec, writer)
    return spec
