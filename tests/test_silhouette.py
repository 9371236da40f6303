"""Our silhouette widths equal scib-metrics' (the reference), edge cases included, whatever the chunk
size."""

import numpy as np
import pytest

from bigatlas.silhouette import isolated_labels, silhouette_batch, silhouette_label, silhouette_samples


def clusters(seed: int, n: int = 700, k: int = 7, dim: int = 6):
    rng = np.random.default_rng(seed)
    labels = rng.choice(k, n, p=np.r_[np.full(k - 1, 0.97 / (k - 1)), 0.03])  # the last label rare
    batches = rng.integers(0, 3, n)
    batches[labels == k - 2] = 0  # one label in a single batch: skipped by the batch silhouette, isolated
    emb = rng.normal(size=(k, dim))[labels] + 0.3 * rng.normal(size=(3, dim))[batches]
    emb += rng.normal(scale=0.7, size=(n, dim))
    return emb.astype(np.float32), labels, batches


@pytest.mark.parametrize("seed", [0, 1])
def test_silhouettes_equal_scib_metrics(seed):
    import scib_metrics as sm
    from scib_metrics.utils import silhouette_samples as scib_samples

    emb, labels, batches = clusters(seed)
    assert np.allclose(silhouette_samples(emb, labels), scib_samples(emb, labels), atol=2e-5)
    assert silhouette_label(emb, labels) == pytest.approx(sm.silhouette_label(emb, labels), abs=1e-5)
    assert silhouette_batch(emb, labels, batches) == pytest.approx(sm.silhouette_batch(emb, labels, batches), abs=1e-5)
    assert isolated_labels(emb, labels, batches) == pytest.approx(sm.isolated_labels(emb, labels, batches), abs=1e-5)
    # string labels, and chunks of 16 rows: the same widths
    names = np.array([f"type {v}" for v in labels])
    assert np.allclose(silhouette_samples(emb, names, budget=16 * len(emb)), silhouette_samples(emb, labels))


def test_undefined_silhouettes_are_zero_like_scib_metrics():
    from scib_metrics.utils import silhouette_samples as scib_samples

    emb = np.array([[0, 0], [0, 1], [5, 5], [5, 6], [9, 9], [0, 0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2, 0])  # label 2: a single cell; cells 0 and 5 coincide
    ours = silhouette_samples(emb, labels)
    assert ours[4] == 0 and np.allclose(ours, scib_samples(emb, labels), atol=1e-6)
    assert np.array_equal(silhouette_samples(emb, np.zeros(6)), np.zeros(6))  # one cluster
    assert np.isnan(silhouette_batch(emb, labels, np.zeros(6)))  # every label in one batch: none scored
