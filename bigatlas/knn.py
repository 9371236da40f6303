"""Nearest reference cells in the latent space.

Exact search is one distance matmul per block of queries (torch); it is what a GPU does, and what
small references get. On CPU an exact scan of a 200,000-cell reference runs at ~1,400 queries/s (2
threads), so larger references are searched through an inverted file: the reference is cut into
k-means cells of ~`cell_size` members (the partition is stored in the reference, so every process
searches the same one), and each query scans the members of its `probe` nearest cells (knn_scan.py,
compiled). Cells of 256 and 4 probes: on the latents of a real run's 95k-cell reference 99.2% of the
exact 15 nearest at 236k queries/s on 2 threads (cells of 512: 99.8% at 165k/s). Recall against the
exact search is measured in bench/transfer.py and tested in tests/test_transfer.py.
"""

from __future__ import annotations

import numpy as np
import torch

from .threads import torch_threads_kept

EXACT_MAX = 20_000  # references up to this size are searched exactly on CPU as well
QUERY_BLOCK = 1024  # queries per distance matmul in the exact search
COARSE_PROBE = 8  # in a two-level partition, the coarse cells whose partition cells a query ranks


def kmeans(z: torch.Tensor, n_clusters: int, *, iters: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from a seeded random sample of the points: (centroids, assignment)."""
    g = torch.Generator().manual_seed(seed)
    n_clusters = max(1, min(n_clusters, len(z)))
    centroids = z[torch.randperm(len(z), generator=g)[:n_clusters]].clone()
    assign = nearest_centroid(z, centroids)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assign, z)
        counts = torch.bincount(assign, minlength=n_clusters)
        keep = counts > 0  # an emptied cell keeps its old centre
        centroids[keep] = sums[keep] / counts[keep, None].to(z.dtype)
        assign = nearest_centroid(z, centroids)
    return centroids, assign


def nearest_centroid(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each point's nearest centroid: |c|² - 2 z·c ranks them (no square roots), in blocks of ~2^20
    distances, which stay in cache (1M points × 4,096 centroids: 3.7 s on 2 threads; torch.cdist in blocks of
    16,384 points: ~4× longer)."""
    block = max(64, (1 << 20) // max(len(centroids), 1))
    sq = (centroids * centroids).sum(1)[None]
    out = torch.empty(len(z), dtype=torch.long)
    dist = torch.empty(min(block, len(z)), len(centroids), dtype=z.dtype)  # one buffer: a fresh block each time
    for lo in range(0, len(z), block):  # grew the memory to all points × centroids under some allocators
        d = dist[: min(block, len(z) - lo)]
        torch.addmm(sq, z[lo : lo + block], centroids.T, alpha=-2, out=d)
        torch.argmin(d, 1, out=out[lo : lo + len(d)])
    return out


class LatentIndex:
    """k-nearest-neighbour search over reference latents `z` (cells × dims).

    `clusters`/`centroids` (from `partition`) enable the inverted-file search; without them, or on a
    GPU, or when `exact` is set, the search is exact. `groups` (from `partition_two_level`) makes the choice of
    a query's probed cells two-level: only the cells of its COARSE_PROBE nearest coarse cells are ranked."""

    def __init__(self, z, clusters=None, centroids=None, *, probe: int = 4, exact: bool | None = None, groups=None):
        self.z = torch.as_tensor(z, dtype=torch.float32)
        self.sqnorm = (self.z * self.z).sum(1)
        self.probe = probe
        if exact is None:
            exact = clusters is None or self.z.device.type != "cpu" or len(self.z) <= EXACT_MAX
        self.exact = exact
        if not exact:
            clusters = torch.as_tensor(clusters, dtype=torch.long)
            self.centroids = torch.as_tensor(centroids, dtype=torch.float32)
            self.order = torch.argsort(clusters, stable=True)  # members of each cell contiguous
            self.zs, self.sqs = self.z[self.order], self.sqnorm[self.order]
            counts = torch.bincount(clusters, minlength=len(self.centroids))
            self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
            self.scan_arrays = (self.zs.numpy(), self.sqs.numpy(), np.asarray(self.offsets, np.int64))
            self.coarse = None
            if groups is not None:  # coarse centroids; the cells of coarse cell g are centroids[first[g]:first[g + 1]]
                self.coarse = torch.as_tensor(groups[0], dtype=torch.float32)
                self.first = np.asarray(groups[1], dtype=np.int64)
                self.csq = (self.centroids * self.centroids).sum(1).numpy()
                if self.probe > COARSE_PROBE:  # then a query could have fewer candidate cells than probes
                    raise ValueError(f"probe {self.probe} above the {COARSE_PROBE} coarse cells ranked")

    @staticmethod
    def partition(
        z, cell_size: int = 256, seed: int = 0, *, max_cells: int | None = None, fit_points: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(clusters, centroids) for the inverted-file search: about len(z) / cell_size partition cells, at most
        max_cells; k-means fitted on a seeded sample of fit_points of z (all of them when unset) and every point
        then assigned to its nearest centroid. Assigning costs points × cells, so an index of millions needs
        both limits (the label review of a whole atlas; a reference index is a sample of ≤ 200,000 cells)."""
        z = torch.as_tensor(z, dtype=torch.float32)
        n_cells = max(1, len(z) // cell_size)
        n_cells = n_cells if max_cells is None else min(n_cells, max_cells)
        if fit_points is None or len(z) <= fit_points:
            centroids, assign = kmeans(z, n_cells, seed=seed)
            return assign, centroids
        g = torch.Generator().manual_seed(seed)
        centroids, _ = kmeans(z[torch.randperm(len(z), generator=g)[:fit_points]], n_cells, seed=seed)
        return nearest_centroid(z, centroids), centroids

    @staticmethod
    def partition_two_level(
        z, cell_size: int = 256, seed: int = 0, *, max_coarse: int, fit_points: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(clusters, centroids, groups) of about len(z) / cell_size partition cells at any size: `partition`
        limited to max_coarse coarse cells fitted on fit_points, then each coarse cell split by k-means on its
        own members into members // cell_size cells. Assigning costs points × (max_coarse + cells per coarse
        cell) distances instead of points × cells (50M points, 1,024 coarse cells: 1,024 + ~190 against 195,000),
        and the scan per query stays ~probe × cell_size candidates instead of growing with the points (probe ×
        12,000 at 50M with one level of 4,096 cells). groups = (coarse centroids, first): the cells of coarse cell g are
        first[g]..first[g + 1] - 1."""
        z = torch.as_tensor(z, dtype=torch.float32)
        coarse_of, coarse = LatentIndex.partition(z, cell_size, seed, max_cells=max_coarse, fit_points=fit_points)
        order = torch.argsort(coarse_of, stable=True)
        counts = torch.bincount(coarse_of, minlength=len(coarse)).tolist()
        clusters = torch.empty(len(z), dtype=torch.long)
        centroids, first, lo = [], [0], 0
        for g, m in enumerate(counts):
            members = order[lo : lo + m]
            lo += m
            # cells of cell_size to 2 × cell_size; up to ~cell_size × max_coarse points, the one level of `partition`
            n_cells = max(1, m // cell_size)
            if n_cells == 1:
                cells, assign = coarse[g : g + 1], torch.zeros(m, dtype=torch.long)
            else:
                cells, assign = kmeans(z[members], n_cells, seed=seed + g)
            clusters[members] = assign + first[-1]
            centroids.append(cells)
            first.append(first[-1] + len(cells))
        return clusters, torch.cat(centroids), (coarse, torch.tensor(first))

    def _probes(self, q: torch.Tensor) -> np.ndarray:
        """Each query's probed partition cells (queries × probe)."""
        probe = min(self.probe, len(self.centroids))
        if self.coarse is None:
            return torch.cdist(q, self.centroids).topk(probe, dim=1, largest=False).indices.numpy()
        from .knn_scan import probe_cells

        top = torch.cdist(q, self.coarse).topk(min(COARSE_PROBE, len(self.coarse)), dim=1, largest=False).indices
        return probe_cells(q.contiguous().numpy(), top.numpy(), self.first, self.centroids.numpy(), self.csq, probe)

    def to(self, device) -> LatentIndex:
        if self.exact:
            self.z, self.sqnorm = self.z.to(device), self.sqnorm.to(device)
        return self

    @torch.no_grad()
    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices) of the k nearest reference cells of each query, nearest first, on the index's
        device (a query on another is moved there: an exact index may have been moved to a GPU, `to`)."""
        q = q.to(self.z.device, torch.float32)
        k = min(k, len(self.z))
        if self.exact:
            d2, idx = self._exact(q, k)
        else:
            with torch_threads_kept():  # numba's scan would leave torch on its thread count
                d2, idx = self._inverted_file(q, k)
        return torch.sqrt((d2 + (q * q).sum(1, keepdim=True)).clamp_min(0)), idx

    def _exact(self, q, k):
        dist, idx = [], []
        for lo in range(0, len(q), QUERY_BLOCK):
            d2 = torch.addmm(self.sqnorm[None], q[lo : lo + QUERY_BLOCK], self.z.T, alpha=-2)
            v, i = d2.topk(k, dim=1, largest=False)
            dist.append(v)
            idx.append(i)
        if not dist:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        return torch.cat(dist), torch.cat(idx)

    def _inverted_file(self, q, k):
        """Squared distances minus |q|² (enough to rank) of the k nearest among the probed cells."""
        from .knn_scan import scan  # numba: compiled on first use, cached on disk

        zs, sqs, offsets = self.scan_arrays
        d2, rows = scan(q.contiguous().numpy(), zs, sqs, offsets, self._probes(q), k)
        d2, rows = torch.from_numpy(d2), torch.from_numpy(rows)
        return d2, torch.where(torch.isfinite(d2), self.order[rows], 0)

    def _inverted_file_torch(self, q, k):
        """The same search in torch (one top-k per partition cell): the reference the scan is tested against."""
        probes = torch.from_numpy(self._probes(q))
        n, probe = probes.shape
        cell = probes.reshape(-1)
        by_cell = torch.argsort(cell, stable=True)  # (query, probe) pairs grouped by partition cell
        qs = q.repeat_interleave(probe, 0)[by_cell]
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(cell, minlength=len(self.centroids))])
        bounds = bounds.cumsum(0).tolist()
        dist = torch.full((n * probe, k), float("inf"))
        idx = torch.zeros((n * probe, k), dtype=torch.long)
        for c in range(len(self.centroids)):
            a, b = bounds[c], bounds[c + 1]
            m0, m1 = self.offsets[c], self.offsets[c + 1]
            if a == b or m0 == m1:
                continue
            kk = min(k, m1 - m0)
            d2 = torch.addmm(self.sqs[m0:m1][None], qs[a:b], self.zs[m0:m1].T, alpha=-2)
            v, i = d2.topk(kk, dim=1, largest=False)
            dist[a:b, :kk] = v
            idx[a:b, :kk] = i + m0
        pair_dist, pair_idx = torch.empty_like(dist), torch.empty_like(idx)
        pair_dist[by_cell], pair_idx[by_cell] = dist, idx  # back to (query, probe) order
        v, j = pair_dist.reshape(n, probe * k).topk(k, dim=1, largest=False)
        return v, self.order[pair_idx.reshape(n, probe * k).gather(1, j)]
