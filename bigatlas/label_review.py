"""Label review: cells whose given label disagrees with their neighbours in the latent space.

Labels from marker genes err, and a model trained on them learns the errors. A cell whose k nearest
other cells mostly carry another label is flagged, with the neighbours' most common label as the
suggestion: a list to check by hand, or labels to train without (`--drop-labels`, `AtlasVAE(drop_labels=...)`).

Review the embedding of a run trained without the label key: a run trained on the labels pulls each
cell toward its given label's cluster, wrong ones too. On the quality benchmark's atlases with a tenth of
the visible labels wrong (bench.quality --mislabel-fraction 0.1, seeds 5-6) the latent of a run without labels
flags 0.67-0.85 of the wrong labels at a precision of 0.80-0.996 where types differ in many genes (rare,
condition, continuous), and 0.36-0.46 at 0.40-0.63 where subtypes differ in a handful (subtle, hard); the
latent of a run trained on those labels flags 0.04-0.13 of them (scANVI's 0.10-0.17; docs/quality.md,
"Reviewing the labels"). A million cells are reviewed in ~45 s on 2 threads (bench/review.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .knn import EXACT_MAX, LatentIndex
from .metrics import K_SMALL, knn, neighbour_votes

MIN_AGREEMENT = 0.2  # flagged: fewer than 3 of the 15 nearest cells share the label
# unset min_class_agreement = min_agreement: a class whose median cell would be flagged (more than half of it) is
# not resolved by the latent rather than mislabelled (a rare subtype inside its sibling's cluster): its cells
# are not flagged, the class is reported
CHUNK = 1 << 16  # cells whose neighbour votes are counted at once
# above knn.EXACT_MAX cells: a two-level partition (knn.LatentIndex.partition_two_level), at most this many coarse
# cells fitted on a sample of FIT_POINTS cells, each split into cells of ~256: the scan per cell stays the same at
# any size (one level of 4,096 cells, the review's index before, scans ~12,000 candidates per probe at 50M cells);
# 1,024 coarse cells rather than 4,096: at 3M cells a partition in 11 s against 63 s, the same neighbour recall
MAX_COARSE_CELLS = 1024
FIT_POINTS = 1 << 18
# partition cells scanned per cell: 8 of ~256 find 0.72 / 0.57 / 0.50 of the 15 nearest at 1M / 4M / 16M cells,
# 0.54 for the one-level index at 1M (4 of ~256: 0.53 / 0.41 / 0.35; bench/results/review.json and its note)
PROBE = 8


def neighbour_chunks(z: np.ndarray, k: int):
    """(first cell, the k nearest other cells of its chunk's cells), chunk by chunk: exact (one chunk) up to
    knn.EXACT_MAX cells, above that through label transfer's inverted-file search on a two-level partition
    (each cell is found in its own partition cell and dropped). Chunks keep memory flat: 50M cells × 15 neighbours would
    be 6 GB at once."""
    if len(z) <= EXACT_MAX:
        yield 0, knn(z, k)
        return
    clusters, centroids, groups = LatentIndex.partition_two_level(z, max_coarse=MAX_COARSE_CELLS, fit_points=FIT_POINTS)
    index = LatentIndex(z, clusters, centroids, groups=groups, probe=PROBE)
    k = min(k, len(z) - 1)
    for lo in range(0, len(z), CHUNK):
        _, idx = index.search(torch.as_tensor(z[lo : lo + CHUNK], dtype=torch.float32), k + 1)
        idx = idx.numpy()
        own = idx == np.arange(lo, lo + len(idx))[:, None]
        own[~own.any(1), -1] = True  # not among its k + 1 (exact duplicates): drop the farthest
        yield lo, idx[~own].reshape(len(idx), k)  # a search lists a cell once: one column each


def review(
    z: np.ndarray, labels: pd.Categorical, *, k: int = K_SMALL, min_agreement: float = MIN_AGREEMENT,
    min_class_agreement: float | None = None, neighbours: np.ndarray | None = None, progress: bool = False,
) -> pd.DataFrame:  # fmt: skip
    """Per cell of `z` (cells × dims) with its label (pd.Categorical; missing labels not allowed):
    a DataFrame of the given label, the share of its k nearest other cells with that label
    (`agreement`), their most common label (`suggested`), `unresolved` (its class's median agreement is
    below min_class_agreement, unset: min_agreement; the latent does not tell the class apart) and `flagged` =
    agreement < min_agreement in a resolved class. neighbours: each cell's nearest other cells, nearest first
    (k columns or more; knn's), when the caller has them already. progress: a bar over the searched chunks."""
    min_class_agreement = min_agreement if min_class_agreement is None else min_class_agreement
    for name, v in (("min_agreement", min_agreement), ("min_class_agreement", min_class_agreement)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must be in [0, 1], not {v}")
    codes = np.asarray(labels.codes)
    if (codes < 0).any():
        raise ValueError(f"{int((codes < 0).sum())} cells have no label; review only labelled cells")
    if len(codes) < 2:
        raise ValueError(f"a label review needs two cells or more, not {len(codes)}")
    if neighbours is None:
        chunks = neighbour_chunks(np.ascontiguousarray(z, dtype=np.float32), k)
    elif len(neighbours) != len(codes) or neighbours.shape[1] < min(k, len(codes) - 1):
        raise ValueError(f"neighbours of shape {neighbours.shape} for {len(codes)} cells and k = {k}")
    else:
        chunks = [(0, neighbours[:, :k])]
    agreement = np.empty(len(codes), np.float32)
    suggested = np.empty(len(codes), codes.dtype)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, total=-(-len(codes) // CHUNK) if len(codes) > EXACT_MAX else 1, desc="label review",
                      unit="chunk", mininterval=5)  # fmt: skip
    for first, near in chunks:
        for lo in range(0, len(near), CHUNK):  # votes are cells × classes: a chunk at a time
            part, at = near[lo : lo + CHUNK], slice(first + lo, first + lo + CHUNK)
            votes = neighbour_votes(part, codes, len(labels.categories))
            agreement[at] = votes[np.arange(len(votes)), codes[at]] / part.shape[1]
            suggested[at] = votes.argmax(1)
    median = pd.Series(agreement).groupby(codes).median()
    unresolved = np.isin(codes, median.index[median.to_numpy() < min_class_agreement])
    return pd.DataFrame(
        {
            "label": labels,
            "suggested": pd.Categorical.from_codes(suggested, categories=labels.categories),
            "agreement": agreement,
            "unresolved": unresolved,
            "flagged": (agreement < min_agreement) & ~unresolved,
        }
    )


def flagged_cells(table: pd.DataFrame, store, positions: np.ndarray) -> pd.DataFrame:
    """The flagged rows of review()'s `table` over the cells at `positions` of `store`, most doubtful first:
    `cell` (obs name), `row` (Store.cell_ids, which finds a cell where names repeat), label, suggested and
    agreement; the names of those cells only are read. What `bigatlas review` and evaluate's label_review.csv
    list, and `--drop-labels` reads."""
    hit = np.flatnonzero(table.flagged.to_numpy())
    out = table.iloc[hit].drop(columns=["unresolved", "flagged"]).reset_index(drop=True)
    out.insert(0, "cell", store.obs_names(positions[hit]).astype(str))
    out.insert(1, "row", store.cell_ids(positions[hit]))
    return out.sort_values("agreement", kind="stable")


def summary(
    table: pd.DataFrame, *, k: int = K_SMALL, min_agreement: float = MIN_AGREEMENT,
    min_class_agreement: float | None = None,
) -> dict:  # fmt: skip
    """metrics.json's label_review section (`table` from review() with the same settings): the counts, the
    unresolved classes, and per class its cells, median agreement, flagged cells and the label most often
    suggested for them."""
    min_class_agreement = min_agreement if min_class_agreement is None else min_class_agreement
    flagged = table[table.flagged]
    per_class = {}
    for cls, cells in table.groupby("label", observed=True):
        mine = flagged[flagged.label == cls]
        per_class[str(cls)] = {
            "cells": len(cells),
            "median_agreement": round(float(cells.agreement.median()), 4),
            "unresolved": bool(cells.unresolved.iloc[0]),
            "flagged": len(mine),
            "flagged_share": round(len(mine) / len(cells), 4),
            "suggested": str(mine.suggested.value_counts().idxmax()) if len(mine) else None,
        }
    return {
        "k": k,
        "min_agreement": min_agreement,
        "min_class_agreement": min_class_agreement,
        "cells": len(table),
        "flagged": len(flagged),
        "flagged_share": round(len(flagged) / max(len(table), 1), 4),
        "unresolved_classes": [c for c, v in per_class.items() if v["unresolved"]],
        "per_class": dict(sorted(per_class.items(), key=lambda kv: -kv[1]["flagged_share"])),
    }
