"""Silhouette widths of scIB (label silhouette, batch silhouette per label, isolated labels) with the
definitions and edge cases of scib-metrics 0.5, computed with torch in chunks instead of JAX.

scib-metrics compiles its chunked reduction once per array shape: every label's subset in the batch
silhouette and every last chunk is a new shape, ~800 compilations (~45 s on 2 cores) per evaluation of
a few thousand cells. Here a chunk's distances to all cells are one cdist and its per-cluster sums one
difference of running sums over the cells ordered by cluster (float64, so the widths match
scib-metrics' float32 to ~1e-6).
"""

from __future__ import annotations

import numpy as np
import torch


def silhouette_samples(x: np.ndarray, labels: np.ndarray, budget: int = 1 << 23) -> np.ndarray:
    """Per-cell silhouette (b - a) / max(a, b) by Euclidean distance: a = mean distance to the other cells
    of its cluster, b = the smallest mean distance to another cluster. 0 where undefined (a cluster of one
    cell, a single cluster, coincident points), as scib-metrics' nan_to_num makes it."""
    codes = np.unique(np.asarray(labels), return_inverse=True)[1].ravel()
    order = np.argsort(codes, kind="stable")  # columns by cluster: a cluster's sum is a difference of cumsums
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64)
    by_cluster = t[torch.as_tensor(order)]
    n = len(t)
    freq = torch.as_tensor(np.bincount(codes), dtype=torch.float64)
    ends = torch.cumsum(freq, 0).long() - 1
    code_t = torch.as_tensor(codes)
    out = np.empty(n, dtype=np.float64)
    chunk = max(16, budget // max(n, 1))
    for lo in range(0, n, chunk):
        own = code_t[lo : lo + chunk]
        rows = torch.arange(len(own))
        run = torch.cdist(t[lo : lo + chunk], by_cluster).cumsum_(1)[:, ends]
        sums = torch.diff(run, dim=1, prepend=torch.zeros_like(run[:, :1]))  # (chunk, clusters)
        a = sums[rows, own] / (freq[own] - 1)  # 0 / 0 for a cluster of one: NaN, then 0 below
        other = sums / freq
        other[rows, own] = float("inf")
        b = other.min(1).values
        out[lo : lo + chunk] = ((b - a) / torch.maximum(a, b)).numpy()
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def silhouette_label(x: np.ndarray, labels: np.ndarray, samples: np.ndarray | None = None) -> float:
    """Mean silhouette of the labels, rescaled to [0, 1] ((s + 1) / 2)."""
    return float(((silhouette_samples(x, labels) if samples is None else samples).mean() + 1) / 2)


def silhouette_batch(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """Within each label, 1 - |silhouette of the batches|, averaged over the label's cells, then over the
    labels; a label in one batch only, or with every cell in its own batch, is skipped. NaN if all are."""
    means = []
    for label in np.unique(labels):
        m = labels == label
        n_batches = len(np.unique(batches[m]))
        if n_batches == 1 or n_batches == int(m.sum()):
            continue
        means.append(float((1 - np.abs(silhouette_samples(x[m], batches[m]))).mean()))
    return float(np.mean(means)) if means else float("nan")


def isolated_labels(x: np.ndarray, labels: np.ndarray, batches: np.ndarray, samples: np.ndarray | None = None) -> float:
    """Mean rescaled label silhouette of the cells of each isolated label (a label present in no more
    batches than the label present in the fewest), averaged over those labels. samples: the labels'
    silhouette_samples when already computed."""
    uniq, codes = np.unique(labels, return_inverse=True)
    codes = codes.ravel()
    b_codes = np.unique(batches, return_inverse=True)[1].ravel()
    n_batches = b_codes.max() + 1
    pairs = np.unique(codes * n_batches + b_codes)
    per_label = np.bincount(pairs // n_batches, minlength=len(uniq))
    isolated = np.flatnonzero(per_label <= per_label.min())
    s = ((silhouette_samples(x, labels) if samples is None else samples) + 1) / 2
    return float(np.mean([s[codes == i].mean() for i in isolated]))
