"""The Bayes bound of a synthetic atlas's cell types: how well any model could name them from the counts.

For each cell, the posterior over fine types given its counts and every draw of the generator except its type:
its study, donor and treatment, its library size, ambient share and activation, the gene programmes, effects,
dispersions and gates, and its study's type composition as the prior. On `continuous` the cell's place on its
coarse type's path is a draw of the type too (the subtype is the segment it falls in), so the likelihood of a
type averages over places along its segment. A model sees only the counts and the study, so no model's accuracy
can beat this posterior's argmax on average: it is the ceiling against which a held-out or kNN accuracy says
how much of the type information in the counts was kept.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import softmax

from .distributions import log_zinb_dense
from .synth import CHUNK_CELLS, SynthSpec, cell_probs, chunk_library, chunk_rng, draw

PLACES = 16  # places along a segment the continuous likelihood averages over (midpoints of equal parts; 8 and
# 32 gave the same accuracy to 0.0005 on a 2,000-cell continuous atlas)


def type_posterior(spec: SynthSpec, counts, chunk_cells: int = CHUNK_CELLS) -> np.ndarray:
    """Cells x fine types (spec.fine_names' order): each cell's posterior over its type. `counts` is the
    atlas `spec` generated (cells x genes, sparse or dense, in store order)."""
    if counts.shape != (spec.n_cells, spec.n_genes):
        raise ValueError(f"counts are {counts.shape}; the atlas of this spec is {(spec.n_cells, spec.n_genes)}")
    d = draw(spec, np.random.default_rng(spec.seed))
    theta = torch.from_numpy(d.theta)
    gate = np.clip(d.gate, 1e-9, 1 - 1e-9)
    gate_logits = torch.from_numpy(np.log(gate) - np.log1p(-gate))
    with np.errstate(divide="ignore"):
        log_prior = np.log(d.comp)
    F = spec.n_fine_per_coarse
    out = np.zeros((spec.n_cells, spec.n_fine))
    for lo in range(0, spec.n_cells, chunk_cells):
        hi = min(lo + chunk_cells, spec.n_cells)
        lib = chunk_library(spec, d, lo, hi, chunk_rng(spec, lo)).astype(np.float64)
        rows = counts[lo:hi]
        x = torch.from_numpy(np.asarray(rows.toarray() if sp.issparse(rows) else rows, np.float64))
        loglik = np.zeros((hi - lo, spec.n_fine))
        for k in range(spec.n_fine):
            t = np.full(hi - lo, k)
            places = [None] if d.pos is None else [k % F + (j + 0.5) / PLACES for j in range(PLACES)]
            per_place = []
            for place in places:
                pos = None if place is None else np.full(hi - lo, place, np.float32)
                mu = torch.from_numpy(cell_probs(spec, d, lo, hi, t, pos).astype(np.float64) * lib[:, None])
                per_place.append(log_zinb_dense(x, mu, theta, gate_logits).sum(1).numpy())
            ll = np.stack(per_place)
            loglik[:, k] = np.logaddexp.reduce(ll, axis=0) - np.log(len(places))
        out[lo:hi] = softmax(loglik + log_prior[d.study[lo:hi]], axis=1)
    return out
