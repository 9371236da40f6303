"""Embedding quality on a subsample: scIB metrics (scib-metrics), label kNN accuracy, batch mixing,
a PCA baseline, and label-prediction accuracy / macro-F1 from counts.

Neighbours come from exact chunked distances (torch), so memory is chunk × n, never n × n.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .silhouette import isolated_labels, silhouette_batch, silhouette_label, silhouette_samples

# neighbour counts of scib-metrics' benchmarker: 15 (graph connectivity, kNN accuracy), 50 (kBET), 90 (LISI)
K_SMALL, K_KBET, K_LISI = 15, 50, 90


def knn(x: np.ndarray, k: int = 15, *, return_distances: bool = False, budget: int = 1 << 24):
    """Indices (and Euclidean distances) of the k nearest other points of every row, exact.

    Rows are processed in chunks of budget // n so one chunk's distance matrix stays ~64 MB."""
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    n = len(t)
    k = min(k, n - 1)
    chunk = max(16, budget // max(n, 1))
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    for lo in range(0, n, chunk):
        d = torch.cdist(t[lo : lo + chunk], t)
        d[torch.arange(d.shape[0]), torch.arange(lo, lo + d.shape[0])] = float("inf")
        top = torch.topk(d, k, largest=False)
        idx[lo : lo + chunk], dist[lo : lo + chunk] = top.indices.numpy(), top.values.numpy()
    return (idx, dist) if return_distances else idx


def neighbour_votes(neighbours: np.ndarray, labels: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """cells × classes: how many of each cell's neighbours carry each label code."""
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    rows = np.repeat(np.arange(len(neighbours)), neighbours.shape[1])
    flat = rows * n_classes + labels[neighbours].ravel()
    return np.bincount(flat, minlength=len(neighbours) * n_classes).reshape(len(neighbours), n_classes)


def knn_label_accuracy(neighbours: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of cells whose majority neighbour label equals their own."""
    return float((neighbour_votes(neighbours, labels).argmax(1) == labels).mean())


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


def neighbour_scores(neighbours: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict:
    return {
        "knn_label_accuracy": knn_label_accuracy(neighbours, labels),
        "batch_mixing": batch_mixing(neighbours, batches),
    }


def embedding_scores(emb: np.ndarray, labels: np.ndarray, batches: np.ndarray, k: int = 15) -> dict:
    return neighbour_scores(knn(emb, k), labels, batches)


BIO = ("ari", "nmi", "silhouette_label", "clisi", "isolated_labels")
BATCH = ("silhouette_batch", "ilisi", "kbet", "graph_connectivity")


def kmeans_scores(emb: np.ndarray, labels: np.ndarray, seeds) -> dict:
    """ARI and NMI of k-means (scib-metrics' KMeans, k = the number of labels) against the labels, averaged
    over the given k-means seeds. scIB's score is one draw, seed 0; a draw moves ARI by up to ~0.2 on the
    same embedding, so comparing models calls for several."""
    from scib_metrics.utils import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    k = len(np.unique(labels))
    ari, nmi = [], []
    for seed in seeds:
        pred = KMeans(k, seed=seed).fit(emb).labels_
        ari.append(adjusted_rand_score(labels, pred))
        nmi.append(normalized_mutual_info_score(labels, pred, average_method="arithmetic"))
    return {"ari": float(np.mean(ari)), "nmi": float(np.mean(nmi))}


def scib_scores(
    emb: np.ndarray, labels: np.ndarray, batches: np.ndarray, seed: int = 0, neighbours: tuple | None = None
) -> dict:
    """scIB bio-conservation and batch-correction metrics (scib-metrics; the silhouettes by .silhouette, the
    same definitions without JAX's per-shape compilations), our kNN label accuracy and batch mixing, and
    the scIB aggregates (bio, batch, total = 0.6 bio + 0.4 batch); all in [0, 1].
    seed: the k-means draw behind ARI and NMI (0 is scib-metrics' own). neighbours: knn(emb, K_LISI,
    return_distances=True) when the caller has it already."""
    import scib_metrics as sm
    from scib_metrics.nearest_neighbors import NeighborsResults

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    idx, dist = neighbours if neighbours is not None else knn(emb, K_LISI, return_distances=True)
    # scib-metrics' neighbour results include each cell itself at distance 0
    self_col = np.arange(len(emb))[:, None]
    full = NeighborsResults(indices=np.hstack([self_col, idx]), distances=np.hstack([np.zeros_like(dist[:, :1]), dist]))
    small, kb = full.subset_neighbors(K_SMALL + 1), full.subset_neighbors(K_KBET + 1)
    out = neighbour_scores(idx[:, :K_SMALL], labels, batches)
    out.update(kmeans_scores(emb, labels, [seed]))  # seed 0: scib-metrics' nmi_ari_cluster_labels_kmeans
    label_widths = silhouette_samples(emb, labels)  # for the label silhouette and the isolated labels
    out["silhouette_label"] = silhouette_label(emb, labels, label_widths)
    out["clisi"] = float(sm.clisi_knn(full, labels))
    out["isolated_labels"] = isolated_labels(emb, labels, batches, label_widths)
    n_batches = len(np.unique(batches))
    out["silhouette_batch"] = silhouette_batch(emb, labels, batches) if n_batches > 1 else float("nan")
    out["ilisi"] = float(sm.ilisi_knn(full, batches)) if n_batches > 1 else float("nan")
    out["kbet"] = float(sm.kbet(kb, batches)[0]) if n_batches > 1 else float("nan")
    out["graph_connectivity"] = float(sm.graph_connectivity(small, labels))
    out = {k: float(v) for k, v in out.items()}
    out["bio_conservation"] = float(np.nanmean([out[k] for k in BIO]))
    out["batch_correction"] = float(np.nanmean([out[k] for k in BATCH]))
    out["total"] = 0.6 * out["bio_conservation"] + 0.4 * out["batch_correction"]
    return out


def confusion(truth: pd.Categorical, pred: pd.Categorical) -> pd.DataFrame:
    """Counts of (true label, predicted label); rows = true classes, columns = union of classes."""
    classes = pd.Index(truth.categories.astype(str)).union(pd.Index(pred.categories.astype(str)), sort=False)
    t = classes.get_indexer(np.asarray(truth.categories.astype(str)))[truth.codes]
    p = classes.get_indexer(np.asarray(pred.categories.astype(str)))[pred.codes]
    ok = (truth.codes >= 0) & (pred.codes >= 0)
    m = np.bincount(t[ok] * len(classes) + p[ok], minlength=len(classes) ** 2).reshape(len(classes), -1)
    present = np.asarray(truth.categories.astype(str))
    return pd.DataFrame(m, index=classes, columns=classes).loc[present]


def prediction_scores(conf: pd.DataFrame) -> dict:
    """Accuracy and macro-F1 (over the true classes) from a confusion table of `confusion`."""
    m = conf.to_numpy()
    n = int(m.sum())
    cols = conf.columns.get_indexer(conf.index)
    tp = m[np.arange(len(m)), cols].astype(float)
    fn = m.sum(1) - tp
    fp = conf.to_numpy(dtype=float).sum(0)[cols] - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "n_cells": n,
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": float(f1[m.sum(1) > 0].mean()) if n else float("nan"),
    }
