"""Embedding quality on a subsample: label kNN accuracy and batch mixing, plus a PCA baseline.

Neighbours come from exact chunked distances (torch), so memory is chunk × n, never n × n.
"""
from __future__ import annotations

import numpy as np
import torch


def knn(x: np.ndarray, k: int = 15, chunk: int = 2048) -> np.ndarray:
    """Indices of the k nearest other points of every row (exact, Euclidean)."""
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    out = np.empty((len(t), k), dtype=np.int64)
    for lo in range(0, len(t), chunk):
        d = torch.cdist(t[lo : lo + chunk], t)
        d[torch.arange(d.shape[0]), torch.arange(lo, lo + d.shape[0])] = float("inf")
        out[lo : lo + chunk] = torch.topk(d, k, largest=False).indices.numpy()
    return out


def knn_label_accuracy(neighbours: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of cells whose majority neighbour label equals their own."""
    votes = labels[neighbours]
    n_classes = int(labels.max()) + 1
    counts = np.zeros((len(labels), n_classes), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(labels)), neighbours.shape[1]), votes.ravel()), 1)
    return float((counts.argmax(1) == labels).mean())


def batch_mixing(neighbours: np.ndarray, batches: np.ndarray) -> float:
    """Fraction of neighbours from another batch ÷ that expected if batches were perfectly mixed
    (1.0 = as mixed as random, 0 = every neighbour from the cell's own batch)."""
    other = (batches[neighbours] != batches[:, None]).mean()
    freq = np.bincount(batches) / len(batches)
    expected = 1.0 - float((freq[batches]).mean())
    return float(other / expected) if expected > 0 else 0.0


def pca(x: np.ndarray, n: int = 10) -> np.ndarray:
    x = x - x.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :n] * s[:n]


def log1p_normalized(counts: np.ndarray, target: float = 1e4) -> np.ndarray:
    lib = counts.sum(1, keepdims=True)
    return np.log1p(counts / np.maximum(lib, 1) * target)


def embedding_scores(emb: np.ndarray, labels: np.ndarray, batches: np.ndarray, k: int = 15) -> dict:
    nn_ = knn(emb, k)
    return {"knn_label_accuracy": knn_label_accuracy(nn_, labels), "batch_mixing": batch_mixing(nn_, batches)}
