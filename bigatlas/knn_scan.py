"""The inverted-file scan on CPU, compiled with numba (a dependency of umap-learn, so always present):
per query, the candidates of its probed partition cells are scanned once, keeping the k nearest in a
small sorted buffer. torch needed a top-k per (partition cell, queries) block, 82% of the search time;
this scan is ~5× faster on 2 threads (bench/results/transfer.json). Compiled once per machine
(cache=True), in a few seconds."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always", fastmath=True)
def _keep_nearest(q, i, rows, sqs, j, best_d, best_i):  # pragma: no cover - compiled
    """Row j of `rows` (its squared norm sqs[j]) into query i's sorted buffers of the nearest, if it is nearer than
    their last: best_d holds squared distances minus |q|², best_i the rows."""
    acc = np.float32(0.0)
    for t in range(q.shape[1]):
        acc += q[i, t] * rows[j, t]
    dist = sqs[j] - 2.0 * acc
    k = len(best_d)
    if dist < best_d[k - 1]:
        m = k - 1
        while m > 0 and best_d[m - 1] > dist:
            best_d[m] = best_d[m - 1]
            best_i[m] = best_i[m - 1]
            m -= 1
        best_d[m] = dist
        best_i[m] = j


@numba.njit(parallel=True, cache=True, fastmath=True)
def scan(q, zs, sqs, offsets, probes, k):  # pragma: no cover - compiled
    """(squared distances minus |q|², row indices into zs) of the k nearest candidates per query."""
    n = q.shape[0]
    out_d = np.full((n, k), np.inf, dtype=np.float32)
    out_i = np.zeros((n, k), dtype=np.int64)
    for i in numba.prange(n):
        best_d, best_i = out_d[i], out_i[i]
        for p in range(probes.shape[1]):
            c = probes[i, p]
            for j in range(offsets[c], offsets[c + 1]):
                _keep_nearest(q, i, zs, sqs, j, best_d, best_i)
    return out_d, out_i


@numba.njit(parallel=True, cache=True, fastmath=True)
def probe_cells(q, coarse_top, first, centroids, csq, probe):  # pragma: no cover - compiled
    """Per query, the `probe` nearest partition cells among those of its coarse cells `coarse_top` (the cells of
    coarse cell g are first[g]..first[g + 1] - 1), nearest first."""
    n = q.shape[0]
    out = np.zeros((n, probe), dtype=np.int64)
    for i in numba.prange(n):
        best_d, best_c = np.full(probe, np.inf, dtype=np.float32), out[i]
        for t in range(coarse_top.shape[1]):
            g = coarse_top[i, t]
            for c in range(first[g], first[g + 1]):
                _keep_nearest(q, i, centroids, csq, c, best_d, best_c)
    return out
