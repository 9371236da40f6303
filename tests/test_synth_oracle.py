"""The Bayes bound of a synthetic atlas's types: it reads the generator's own draws, and knows nothing else."""

import argparse
import json

import anndata as ad
import numpy as np
import pytest
from scipy import stats

from bench.oracle import count_classifier, run
from bigatlas.synth import CHUNK_CELLS, cell_probs, chunk_library, chunk_rng, draw, preset, synth
from bigatlas.synth_oracle import type_posterior


def _atlas(tmp_path, name, cells, genes, seed, **kw):
    path = tmp_path / f"{name}.zarr"
    spec = synth(path, cells, genes, "zarr", seed=seed, preset_name=name, **kw)
    return spec, ad.read_zarr(path)


def test_the_bound_uses_the_library_each_cell_was_drawn_with(tmp_path):
    # near-Poisson counts without structural zeros: a cell's total is Poisson around its drawn library, so the
    # z-scores against the library the oracle re-draws are ~N(0, 1); another draw's libraries (sd 0.35 in log)
    # are off by ~10 sd at 2,500 counts. More than one chunk, so the chunk streams are followed too.
    cells = CHUNK_CELLS + 300
    spec, a = _atlas(tmp_path, "default", cells, 50, 4, zero_inflation=1e-6, log_theta_mean=12.0)
    d = draw(spec, np.random.default_rng(spec.seed))
    lib = np.concatenate(
        [chunk_library(spec, d, lo, min(lo + CHUNK_CELLS, cells), chunk_rng(spec, lo)) for lo in (0, CHUNK_CELLS)]
    )
    total = np.asarray(a.X.sum(1)).ravel()
    z = (total - lib) / np.sqrt(lib)
    assert abs(z.mean()) < 0.1 and 0.8 < z.std() < 1.3
    wrong = np.roll(lib, 1)
    assert np.abs((total - wrong) / np.sqrt(wrong)).mean() > 5


def test_the_posterior_is_bayes_rule_on_the_zinb_likelihood_scipy_computes(tmp_path):
    spec, a = _atlas(tmp_path, "subtle", 300, 60, 2)
    post = type_posterior(spec, a.X)
    d = draw(spec, np.random.default_rng(spec.seed))
    lib = chunk_library(spec, d, 0, 300, chunk_rng(spec, 0)).astype(np.float64)
    x = a.X.toarray()
    loglik = np.zeros((300, spec.n_fine))
    for k in range(spec.n_fine):
        mu = cell_probs(spec, d, 0, 300, np.full(300, k), None).astype(np.float64) * lib[:, None]
        nb = stats.nbinom.logpmf(x, d.theta, d.theta / (d.theta + mu))
        zero = np.log(d.gate + (1 - d.gate) * np.exp(stats.nbinom.logpmf(0, d.theta, d.theta / (d.theta + mu))))
        loglik[:, k] = np.where(x == 0, zero, np.log1p(-d.gate) + nb).sum(1)
    joint = loglik + np.log(d.comp[d.study])
    want = np.exp(joint - joint.max(1, keepdims=True))
    np.testing.assert_allclose(post, want / want.sum(1, keepdims=True), atol=1e-4)


def test_identical_subtypes_get_their_studys_proportions_and_distinct_coarse_types_are_found(tmp_path):
    spec, a = _atlas(tmp_path, "default", 800, 200, 1, subtype_lfc=0.0)
    post = type_posterior(spec, a.X)
    d = draw(spec, np.random.default_rng(spec.seed))
    F = spec.n_fine_per_coarse
    coarse_post = post.reshape(len(post), spec.n_coarse, F).sum(2)
    assert (coarse_post.argmax(1) == d.ctype // F).mean() > 0.99
    c = d.ctype // F  # within the true coarse type: the siblings' shares are the study's composition's
    within = post.reshape(len(post), spec.n_coarse, F)[np.arange(len(post)), c]
    comp = d.comp.reshape(spec.n_studies, spec.n_coarse, F)[d.study, c]
    np.testing.assert_allclose(within / within.sum(1, keepdims=True), comp / comp.sum(1, keepdims=True), atol=1e-3)
    assert (post.argmax(1) == d.ctype).mean() < 0.8  # the siblings cannot be told apart


def test_on_a_path_the_bound_does_not_know_where_a_cell_sits(tmp_path):
    spec, a = _atlas(tmp_path, "continuous", 1500, 300, 3)
    post = type_posterior(spec, a.X)
    pos = a.obs["true_pseudotime"].to_numpy()
    off = np.abs(pos - np.round(pos))  # 0 on a boundary between subtypes, 0.5 at a subtype's centre
    truth = np.array([spec.fine_names.index(t) for t in a.obs["true_cell_type"].astype(str)])
    wrong = post.argmax(1) != truth
    # knowing the place, the bound would never err; not knowing it, it errs only where neighbours blend
    assert wrong.sum() >= 5 and off[wrong].mean() < 0.1 < off.mean()
    assert post.max(1)[off > 0.4].mean() > 0.95


def test_the_bound_refuses_counts_of_another_shape(tmp_path):
    spec, a = _atlas(tmp_path, "default", 200, 40, 0)
    with pytest.raises(ValueError, match=r"counts are \(200, 39\); the atlas of this spec is \(200, 40\)"):
        type_posterior(spec, a.X[:, :39])
    with pytest.raises(ValueError, match=r"the atlas of this spec is \(201, 40\)"):
        type_posterior(preset("default", 201, 40, seed=0), a.X)


def test_the_bench_sets_the_bound_beside_the_models_rows(tmp_path):
    spec, a = _atlas(tmp_path, "rare", 1200, 200, 1)
    (tmp_path / "quality_rare_1_1200x200.zarr").symlink_to(tmp_path / "rare.zarr")
    against = tmp_path / "q.json"
    rows = [
        {"preset": "rare", "seed": 1, "method": "bigatlas_labels", "tag": "mine", "heldout_accuracy": 0.9,
         "knn_label_accuracy": 0.95},
        {"preset": "rare", "seed": 1, "method": "scvi", "tag": "peer", "knn_label_accuracy": 0.8},
        {"preset": "rare", "seed": 1, "method": "scvi", "tag": "other", "knn_label_accuracy": 0.1},
        {"preset": "rare", "seed": 1, "tag": "mine", "head": {"accuracy": 0.5}},  # a bench.transfer row: not read
    ]  # fmt: skip
    against.write_text(json.dumps({"rows": rows}))
    a_ = argparse.Namespace(
        presets=["rare"], seeds=[1], cells=1200, genes=200, hidden_fraction=0.2, data_dir=str(tmp_path),
        against=str(against), tags=["mine"], out=str(tmp_path / "o.json"),
    )  # fmt: skip
    res = run(a_)
    row = res["rows"][0]
    assert row["hidden"]["accuracy"] >= row["hidden"]["count_classifier_accuracy"] - 0.02
    assert row["hidden"]["floor_accuracy"] < row["hidden"]["accuracy"]
    assert set(row["models"]) == {"bigatlas_labels (mine)", "scvi"}
    mine = row["models"]["bigatlas_labels (mine)"]
    floor, bound = row["hidden"]["floor_accuracy"], row["hidden"]["accuracy"]
    assert mine["heldout_share_of_bound"] == pytest.approx((0.9 - floor) / (bound - floor), abs=1e-4)
    assert mine["knn_share_of_bound"] is None  # its kNN accuracy counts its own training labels
    assert row["models"]["scvi"]["knn_share_of_bound"] is not None
    assert res["summary"]["rare"]["hidden_accuracy"] == row["hidden"]["accuracy"]


def test_the_count_classifier_learns_types_from_the_visible_labels_only(tmp_path):
    spec, a = _atlas(tmp_path, "default", 1500, 200, 5)
    d = draw(spec, np.random.default_rng(spec.seed))
    train = np.random.default_rng(0).random(1500) < 0.5
    post = count_classifier(a.X, d.study, d.ctype, train, spec.n_fine)
    assert (post[~train].argmax(1) == d.ctype[~train]).mean() > 0.95
    shuffled = np.random.default_rng(1).permutation(d.ctype)  # labels that say nothing: chance on the others
    post = count_classifier(a.X, d.study, shuffled, train, spec.n_fine)
    assert (post[~train].argmax(1) == d.ctype[~train]).mean() < 0.35
