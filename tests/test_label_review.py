"""Label review: flips of labels among separated clusters are flagged with the true label suggested,
clean labels are not, agreement is the share of the k nearest other cells under the cell's label, and
the inverted-file search above knn.EXACT_MAX never returns a cell as its own neighbour."""

import numpy as np
import pandas as pd
import pytest
import torch

from bigatlas import knn as knn_module
from bigatlas import label_review
from bigatlas.label_review import neighbour_chunks, review, summary
from bigatlas.metrics import knn, knn_label_accuracy, neighbour_votes


def other_neighbours(z, k):
    """Every cell's k nearest other cells, the review's chunks joined."""
    return np.concatenate([near for _, near in neighbour_chunks(z, k)])


def clusters(n_per=200, n_classes=6, dims=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (n_classes, dims))
    truth = np.repeat(np.arange(n_classes), n_per)
    z = (centres[truth] + rng.normal(0, 1, (len(truth), dims))).astype(np.float32)
    return z, truth


def flip(truth, fraction, n_classes, seed=1):
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(truth)) < fraction
    given = truth.copy()
    given[wrong] = (truth[wrong] + rng.integers(1, n_classes, wrong.sum())) % n_classes
    return given, wrong


def categorical(codes, names="ABCDEFG"):
    return pd.Categorical.from_codes(codes, categories=list(names[: codes.max() + 1]))


def test_wrong_labels_are_flagged_with_the_true_one_suggested():
    z, truth = clusters()
    given, wrong = flip(truth, 0.1, 6)
    t = review(z, categorical(given))
    flagged = t.flagged.to_numpy()
    assert (flagged & wrong).sum() >= 0.95 * wrong.sum()  # recall
    assert (flagged & wrong).sum() >= 0.95 * flagged.sum()  # precision
    assert (t.suggested.cat.codes.to_numpy()[wrong] == truth[wrong]).mean() >= 0.95
    assert list(t.label.cat.codes) == list(given)
    clean = review(z, categorical(truth))
    assert not clean.flagged.any() and (clean.suggested == clean.label).all()


def test_agreement_is_the_share_of_other_neighbours_with_the_label():
    z, truth = clusters(n_per=40, n_classes=3)
    given, _ = flip(truth, 0.3, 3)
    t = review(z, categorical(given), k=7, min_agreement=0.5, min_class_agreement=0)
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    near = np.argsort(d, axis=1, kind="stable")[:, :7]
    expected = (given[near] == given[:, None]).mean(1)
    np.testing.assert_allclose(t.agreement.to_numpy(), expected, atol=1e-6)
    assert (t.flagged.to_numpy() == (expected < 0.5)).all()


def test_neighbours_given_by_the_caller_review_as_its_own_search_does():
    z, truth = clusters(n_per=60, n_classes=4, seed=2)
    given, _ = flip(truth, 0.1, 4)
    own = review(z, categorical(given))
    lent = review(z, categorical(given), neighbours=knn(z, 40))  # more columns than k: the first k count
    pd.testing.assert_frame_equal(own, lent)
    with pytest.raises(ValueError, match="neighbours of shape"):
        review(z, categorical(given), neighbours=knn(z, 5))


def test_neighbour_votes_count_each_label_and_keep_knn_accuracy():
    z, truth = clusters(n_per=30, n_classes=4)
    given, _ = flip(truth, 0.2, 4)
    near = knn(z, 9)
    votes = neighbour_votes(near, given)
    assert votes.shape == (len(z), 4) and (votes.sum(1) == 9).all()
    assert (votes[np.arange(len(z)), given] == (given[near] == given[:, None]).sum(1)).all()
    assert knn_label_accuracy(near, given) == pytest.approx((votes.argmax(1) == given).mean())


@pytest.mark.parametrize("max_cells, fit_points", [(None, None), (4, 1000)])
def test_inverted_file_neighbours_exclude_the_cell_itself(monkeypatch, max_cells, fit_points):
    """Also with the partition limited as for millions of cells (few partition cells, k-means on a sample)."""
    z, _ = clusters(n_per=500, n_classes=6, seed=3)
    z = np.concatenate([z, np.repeat(z[:1], 20, axis=0)])  # 21 copies of one cell: itself may not be returned
    monkeypatch.setattr(label_review, "EXACT_MAX", 1000)
    monkeypatch.setattr(knn_module, "EXACT_MAX", 1000)
    if max_cells is not None:
        monkeypatch.setattr(label_review, "MAX_COARSE_CELLS", max_cells)
        monkeypatch.setattr(label_review, "FIT_POINTS", fit_points)
    got = other_neighbours(z, 15)
    assert got.shape == (len(z), 15)
    assert not (got == np.arange(len(z))[:, None]).any()
    assert all(len(set(row)) == 15 for row in got)
    exact = knn(z, 15)
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(got[:3000], exact[:3000])])
    assert recall > 0.9, recall
    # the review votes chunk by chunk as it searches: the same as from the joined neighbours
    monkeypatch.setattr(label_review, "CHUNK", 700)
    labels = categorical(np.concatenate([np.repeat(np.arange(6), 500), np.zeros(20, int)]))
    pd.testing.assert_frame_equal(review(z, labels), review(z, labels, neighbours=other_neighbours(z, 15)))


def test_a_partition_fitted_on_a_sample_assigns_every_point_to_its_nearest_centroid():
    z, _ = clusters(n_per=400, n_classes=6, seed=4)
    assign, centroids = knn_module.LatentIndex.partition(z, 32, max_cells=20, fit_points=500)
    assert len(centroids) == 20 and len(assign) == len(z)
    nearest = torch.cdist(torch.from_numpy(z), centroids).argmin(1)
    assert (assign == nearest).float().mean() > 0.999  # float ties aside
    whole, _ = knn_module.LatentIndex.partition(z, 32)
    assert len(torch.unique(whole)) > 20  # unlimited: one partition cell per 32 points


def test_a_two_level_partition_keeps_its_cell_size_and_probes_the_nearest_cells_of_the_nearest_coarse_cells(
    monkeypatch,
):
    z, _ = clusters(n_per=4000, n_classes=5, seed=5)
    q = torch.from_numpy(z[::7])
    cells, centroids, (coarse, first) = knn_module.LatentIndex.partition_two_level(z, 64, max_coarse=8, fit_points=4000)
    assert len(coarse) == 8 and first[0] == 0 and first[-1] == len(centroids)
    assert 0.8 < len(z) / 64 / len(centroids) < 1.25  # ~64 points a cell, not 20,000 / 8
    coarse_of = torch.cdist(torch.from_numpy(z), coarse).argmin(1)
    lo, hi = first[coarse_of], first[coarse_of + 1]
    assert ((cells >= lo) & (cells < hi)).float().mean() > 0.999  # a point's cell is one of its coarse cell's
    d = torch.cdist(torch.from_numpy(z), centroids)
    within = torch.where(
        (torch.arange(len(centroids)) >= lo[:, None]) & (torch.arange(len(centroids)) < hi[:, None]), d, torch.inf
    )
    assert (within.argmin(1) == cells).float().mean() > 0.999  # ... its nearest one there
    index = knn_module.LatentIndex(z, cells, centroids, groups=(coarse, first), exact=False)
    top = torch.cdist(q, coarse).topk(knn_module.COARSE_PROBE, dim=1, largest=False).indices
    ranked = torch.full((len(q), len(centroids)), torch.inf)
    for j in range(knn_module.COARSE_PROBE):  # only the cells of the COARSE_PROBE nearest coarse cells compete
        mask = (torch.arange(len(centroids)) >= first[top[:, j], None]) & (
            torch.arange(len(centroids)) < first[top[:, j] + 1, None]
        )
        ranked = torch.where(mask, torch.cdist(q, centroids), ranked)
    want = ranked.topk(4, dim=1, largest=False).indices
    assert (torch.from_numpy(index._probes(q)) == want).float().mean() > 0.999
    exact = torch.cdist(q, torch.from_numpy(z)).topk(15, largest=False).indices

    def recall(ix):
        return np.mean([len(set(a.tolist()) & set(b.tolist())) / 15 for a, b in zip(ix.search(q, 15)[1], exact)])

    # as good as one level of cells of the same size fitted on every point (whose ranking costs points × cells)
    one_level = knn_module.LatentIndex(z, *knn_module.LatentIndex.partition(z, 64), exact=False)
    assert recall(index) > recall(one_level) - 0.02 > 0.7
    # the numba scan finds what the torch reference finds: the same 15 distances in order (to a few float32 units
    # of the largest), and the same neighbours except where two of them tie at that precision (45 of 42,870
    # slots differed so with numba 0.68.1 / torch 2.13.0 / numpy 2.4.6, every one at such a tie)
    (d_ref, i_ref), (d_scan, i_scan) = index._inverted_file_torch(q, 15), index._inverted_file(q, 15)
    tol = 8 * torch.finfo(torch.float32).eps * d_ref.abs().max()
    assert ((d_ref - d_scan).abs() <= tol).all()
    close = (d_ref[:, 1:] - d_ref[:, :-1]).abs() <= tol
    tied = torch.zeros(len(q), 15, dtype=torch.bool)
    tied[:, 1:] |= close
    tied[:, :-1] |= close
    tied[:, -1] = True  # the 15th may tie with a 16th neither returns
    assert ((i_ref == i_scan) | tied).all() and tied[:, :-1].float().mean() < 0.05
    with pytest.raises(ValueError, match="probe 9"):
        knn_module.LatentIndex(z, cells, centroids, groups=(coarse, first), exact=False, probe=9)
    monkeypatch.setattr(knn_module, "COARSE_PROBE", 2)  # fewer coarse cells ranked: other probes
    assert (torch.from_numpy(index._probes(q)) != want).any()


def test_a_class_the_latent_does_not_separate_is_unresolved_not_flagged():
    """A small class spread inside a big one (a rare subtype the latent does not tell apart): its cells are
    not flagged, the class is named unresolved; a wrong label in a resolved class is still flagged."""
    z, truth = clusters(n_per=300, n_classes=3)
    given = truth.copy()
    inside = np.flatnonzero(truth == 0)[::10]  # every tenth cell of class 0 called class 3
    given[inside] = 3
    given[np.flatnonzero(truth == 1)[:5]] = 2  # five plain errors
    t = review(z, categorical(given))
    assert t.unresolved.to_numpy()[inside].all() and not t.flagged.to_numpy()[inside].any()
    assert t.flagged.to_numpy()[np.flatnonzero(truth == 1)[:5]].all()
    assert not t.unresolved.to_numpy()[given != 3].any()
    s = summary(t)
    assert s["unresolved_classes"] == ["D"] and s["per_class"]["D"]["flagged"] == 0
    assert s["per_class"]["D"]["median_agreement"] < 0.2 <= s["per_class"]["B"]["median_agreement"]
    for m in (0.2, 0.6, 0.95):  # unset, the class threshold is min_agreement: unresolved = median below it
        medians = review(z, categorical(given), min_agreement=m).groupby("label", observed=True).agreement.median()
        got = review(z, categorical(given), min_agreement=m)
        assert set(got.label[got.unresolved].astype(str)) == set(medians.index[medians < m].astype(str))
    loose = review(z, categorical(given), min_class_agreement=0)  # the guard off: the subtype's cells flagged
    assert loose.flagged.to_numpy()[inside].mean() > 0.5


def test_summary_counts_per_class_and_sorts_by_share():
    z, truth = clusters()
    given, wrong = flip(truth, 0.1, 6)
    given[truth == 2] = np.where(np.arange((truth == 2).sum()) % 2, 3, 2)  # half of class 2 called 3
    t = review(z, categorical(given))
    s = summary(t)
    assert s["cells"] == len(z) and s["flagged"] == int(t.flagged.sum())
    assert sum(v["flagged"] for v in s["per_class"].values()) == s["flagged"]
    shares = [v["flagged_share"] for v in s["per_class"].values()]
    assert shares == sorted(shares, reverse=True)
    assert sum(v["cells"] for v in s["per_class"].values()) == len(z)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_threshold_or_missing_labels_are_refused(bad):
    z, truth = clusters(n_per=10, n_classes=2)
    with pytest.raises(ValueError, match="min_agreement"):
        review(z, categorical(truth), min_agreement=bad)
    with pytest.raises(ValueError, match="min_class_agreement"):
        review(z, categorical(truth), min_class_agreement=bad)
    codes = truth.copy()
    codes[0] = -1
    with pytest.raises(ValueError, match="1 cells have no label"):
        review(z, pd.Categorical.from_codes(codes, categories=["A", "B"]))


@pytest.mark.parametrize("trained_on_labels", [False, True])
def test_the_report_warns_about_a_labelled_latent_and_otherwise_points_to_the_full_review(trained_on_labels):
    from bigatlas.report import _review_lines

    z, truth = clusters(n_per=100, n_classes=3)
    given, _ = flip(truth, 0.1, 3)
    result = summary(review(z, categorical(given))) | {"trained_on_labels": trained_on_labels}
    assert result["flagged"] > 0
    text = "\n".join(_review_lines(result, "cell_type"))
    assert ("trained on `cell_type`" in text) == trained_on_labels
    assert ("--drop-labels cell_type=" in text) != trained_on_labels
