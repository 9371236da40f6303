"""`bigatlas evaluate`: integrated latents beat a PCA of the counts, a scrambled embedding scores at
chance, prediction scores agree with sklearn, the report is written whole or not at all."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

from bigatlas import AtlasVAE
from bigatlas.cli import main
from bigatlas.dropped_labels import listed_cells, read_cells
from bigatlas.embedding import EmbeddingError
from bigatlas.evaluate import evaluate, stratified_subsample
from bigatlas.infer import embed
from bigatlas.metrics import confusion, kmeans_scores, prediction_scores
from bigatlas.review_embedding import review_embedding
from bigatlas.synth import synth
from loaders import open_store

N = 4000


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "atlas.zarr"
    synth(data, N, 200, "zarr", seed=5, n_studies=4, donors_per_study=2)
    run = root / "run"
    AtlasVAE.setup(
        str(data),
        batch_key="dataset_id",
        covariate_keys=["donor_id"],
        label_keys=["cell_type"],
        train={"max_epochs": 25},
    ).fit(run)
    out = root / "emb.zarr"
    embed(run, data, out, chunk_size=1000, progress=False)
    return data, run, out


def test_integrated_beats_pca_and_report_is_complete(embedded, tmp_path):
    data, run, emb = embedded
    report = tmp_path / "report"
    r = evaluate(
        emb,
        label_key="cell_type",
        batch_key="dataset_id",
        truth_keys=["true_cell_type"],
        out=report,
        n_cells=3000,
        umap_cells=1500,
        log=lambda *_: None,
    )
    ours, base = r["scores"]["bigatlas"], r["scores"]["pca_baseline"]
    assert ours["batch_mixing"] > base["batch_mixing"] + 0.2, (ours, base)
    assert ours["ilisi"] > base["ilisi"] and ours["batch_correction"] > base["batch_correction"]
    assert ours["knn_label_accuracy"] >= base["knn_label_accuracy"] - 0.01, (ours, base)
    assert ours["total"] > base["total"]
    assert 2900 <= r["n_evaluated"] <= 3100
    truth = r["predictions"]["cell_type_pred vs true_cell_type"]
    assert truth["n_cells"] == N and truth["accuracy"] > 0.9
    assert set(truth["per_batch_accuracy"]) == {f"study_{i}" for i in range(4)}
    files = {p.name for p in report.iterdir()}
    assert {
        "metrics.json",
        "report.md",
        "report.html",
        "umap.png",
        "loss_curves.png",
        "confusion_cell_type_pred_vs_true_cell_type.png",
    } <= files
    assert json.loads((report / "metrics.json").read_text())["scores"] == r["scores"]
    html = (report / "report.html").read_text()
    assert "<table>" in html and 'src="umap.png"' in html
    assert not (tmp_path / "report.partial").exists()


def test_scrambled_embedding_scores_at_chance(embedded, tmp_path):
    data, run, emb = embedded
    scrambled = tmp_path / "scrambled.zarr"
    shutil.copytree(emb, scrambled)
    z = zarr.open_group(str(scrambled), mode="r+")["obsm/X_bigatlas"]
    z[:] = np.random.default_rng(0).permutation(z[:])
    r = evaluate(
        scrambled,
        label_key="cell_type",
        batch_key="dataset_id",
        run=run,
        out=tmp_path / "r",
        n_cells=3000,
        umap_cells=500,
        baseline=False,
        log=lambda *_: None,
    )
    s = r["scores"]["bigatlas"]
    assert s["ari"] < 0.05 and s["nmi"] < 0.1, s
    assert s["knn_label_accuracy"] < 0.25, s  # 12 balanced-ish classes: chance ~ the largest class
    assert s["batch_mixing"] > 0.9, s  # random neighbours are as mixed as random


def test_soma_embedding_scores_like_the_zarr_one(embedded, tmp_path):
    """The same atlas as SOMA gets a SOMA embedding (keyed by soma_joinid): identical metrics."""
    data, run, emb = embedded
    soma_data = tmp_path / "atlas.soma"
    synth(soma_data, N, 200, "soma", seed=5, n_studies=4, donors_per_study=2)
    soma_emb = tmp_path / "emb.soma"
    embed(run, soma_data, soma_emb, chunk_size=1000, progress=False)
    kw = dict(
        label_key="cell_type", batch_key="dataset_id", n_cells=1500, umap_cells=300, baseline=False, log=lambda *_: None
    )
    a = evaluate(emb, out=tmp_path / "a", **kw)
    b = evaluate(soma_emb, out=tmp_path / "b", **kw)
    assert b["n_evaluated"] == a["n_evaluated"]
    for name, value in a["scores"]["bigatlas"].items():
        assert b["scores"]["bigatlas"][name] == pytest.approx(value, abs=1e-4), name

    def common(preds):  # the run trained on the Zarr copy: only that embedding has a reference split
        return {k: {f: v for f, v in p.items() if not f.startswith(("reference_", "query_"))} for k, p in preds.items()}

    assert common(b["predictions"]) == common(a["predictions"])
    assert "query_cells" not in b["predictions"]["cell_type_pred vs cell_type"]
    # the review of every labelled cell: the same cells flagged (by soma_joinid, which is also their row)
    review_a = review_embedding(emb, label_key="cell_type", out=tmp_path / "ra.csv", log=lambda *_: None)
    review_b = review_embedding(soma_emb, label_key="cell_type", out=tmp_path / "rb.csv", log=lambda *_: None)
    assert review_b["cells"] == review_a["cells"] and review_b["flagged"] == review_a["flagged"] > 0, review_a[
        "flagged"
    ]
    ra, rb = pd.read_csv(tmp_path / "ra.csv"), pd.read_csv(tmp_path / "rb.csv")
    assert sorted(ra.row) == sorted(rb.row) == sorted(rb.cell.astype(int))


def test_cells_outside_the_training_slice_are_scored_as_query(embedded, tmp_path):
    import anndata as ad

    data, run, emb = embedded
    other = tmp_path / "run"  # the same model, recorded as trained without study_3
    shutil.copytree(run, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["config"]["data"]["obs_filter"] = "dataset_id != 'study_3'"
    (other / "config.json").write_text(json.dumps(cfg))
    r = evaluate(
        emb,
        label_key="cell_type",
        batch_key="dataset_id",
        run=other,
        out=tmp_path / "r",
        n_cells=1000,
        umap_cells=300,
        baseline=False,
        log=lambda *_: None,
    )
    obs = ad.read_zarr(data).obs
    labelled = obs.cell_type.astype(str) != "undefined"
    s = r["predictions"]["cell_type_pred vs cell_type"]
    assert r["reference_query"] == {
        "reference_cells": int((obs.dataset_id != "study_3").sum()),
        "query_cells": int((obs.dataset_id == "study_3").sum()),
    }
    assert s["query_cells"] == int(((obs.dataset_id == "study_3") & labelled).sum())
    assert s["query_accuracy"] == pytest.approx(s["per_batch_accuracy"]["study_3"], abs=1e-4)
    assert "Query cells" in (tmp_path / "r" / "report.md").read_text()


def test_mismatched_or_incomplete_embedding_is_refused(embedded, tmp_path):
    data, run, emb = embedded
    with pytest.raises(EmbeddingError, match="has 4000 cells but"):
        evaluate(
            emb,
            label_key="cell_type",
            batch_key="dataset_id",
            obs_filter="dataset_id == 'study_0'",
            out=tmp_path / "r",
            log=lambda *_: None,
        )
    partial = tmp_path / "partial.zarr"
    shutil.copytree(emb, partial)
    g = zarr.open_group(str(partial), mode="r+")
    g.attrs["bigatlas"] = {**g.attrs["bigatlas"], "complete": False}
    assert (
        main(
            [
                "evaluate",
                "--emb",
                str(partial),
                "--label-key",
                "cell_type",
                "--batch-key",
                "dataset_id",
                "--out",
                str(tmp_path / "r2"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "r2").exists()


def test_prediction_scores_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    truth = rng.choice(["a", "b", "c", "d"], 500)
    pred = np.where(rng.random(500) < 0.7, truth, rng.choice(["a", "b", "e"], 500))  # 'e' never true
    s = prediction_scores(confusion(pd.Categorical(truth), pd.Categorical(pred)))
    assert s["n_cells"] == 500
    assert s["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert s["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro", labels=["a", "b", "c", "d"]))


def test_kmeans_seed_0_is_scibs_draw_and_seeds_average():
    import scib_metrics as sm

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 600)
    emb = rng.normal(size=(6, 5))[labels] + rng.normal(scale=0.8, size=(600, 5))  # overlapping clusters
    ours = kmeans_scores(emb, labels, [0])
    scib = sm.nmi_ari_cluster_labels_kmeans(emb.astype(np.float32), labels)
    assert ours["ari"] == pytest.approx(scib["ari"]) and ours["nmi"] == pytest.approx(scib["nmi"])
    each = [kmeans_scores(emb, labels, [s]) for s in range(4)]
    both = kmeans_scores(emb, labels, range(4))
    assert both["ari"] == pytest.approx(np.mean([e["ari"] for e in each]))
    assert len({round(e["ari"], 6) for e in each}) > 1  # the draws differ: one seed is not the score


def test_quality_table_shows_the_ten_draw_bio_only_where_rows_carry_it():
    from bench.quality import table

    row = {"preset": "rare", "method": "bigatlas", "tag": "default", "bio_conservation": 0.7, "batch_correction": 0.5}
    old = table([dict(row, seed=s) for s in range(2)], ["default"])
    assert "k-means" not in old and old.splitlines()[2].count("|") == old.splitlines()[0].count("|")
    new = table([dict(row, seed=s, bio_k10=0.6 + 0.1 * s) for s in range(2)] + [dict(row, seed=2)], ["default"])
    head, _, body = new.splitlines()
    assert body.split(" | ")[head.split(" | ").index("bio (k-means × 10)")] == "0.650"  # the mean of rows with it


def test_graded_r2_rewards_a_latent_ordered_along_the_truth_within_each_type():
    from bench.quality import graded_r2

    rng = np.random.default_rng(4)
    groups = np.repeat(["a", "b"], 400)
    value = rng.random(800)
    offset = np.where(groups == "a", 0.0, 10.0)[:, None]  # types apart; inside each, cells along value
    ordered = np.c_[value, rng.normal(scale=0.02, size=800)] + offset
    noise = rng.normal(size=(800, 2)) + offset
    assert graded_r2(ordered, value, groups) > 0.95
    assert graded_r2(noise, value, groups) < 0.05
    half = np.c_[value + rng.normal(scale=0.3, size=800), rng.normal(size=800)] + offset
    assert 0.1 < graded_r2(half, value, groups) < 0.9


def test_stratified_subsample_keeps_rare_classes():
    labels = np.repeat([0, 1, 2, -1], [9000, 900, 30, 500])
    s = stratified_subsample(labels, 1000, seed=3, floor=50)
    assert np.all(np.diff(s) > 0) and np.all(labels[s] >= 0)
    counts = np.bincount(labels[s])
    assert counts[2] == 30 and counts[1] >= 50 and abs(counts[0] - 1000 * 9000 / 9930) < 5


def test_label_review_lists_the_cells_whose_label_was_changed(embedded, tmp_path):
    """A copy of the atlas with 5% of the labels moved to another type: the review flags mostly those
    cells, by name, and suggests their old label; --review-min-agreement 0 writes no review."""
    import anndata as ad

    data, run, emb = embedded
    copy = tmp_path / "relabelled.zarr"
    shutil.copytree(data, copy)
    codes = zarr.open_group(str(copy), mode="r+")["obs/cell_type/codes"]
    before = codes[:]
    cats = list(ad.read_zarr(data).obs.cell_type.cat.categories)
    known = np.flatnonzero(np.asarray(cats)[before] != "undefined")
    rng = np.random.default_rng(0)
    moved = rng.choice(known, len(known) // 20, replace=False)
    after = before.copy()
    defined = [i for i, c in enumerate(cats) if c != "undefined"]
    after[moved] = [rng.choice([d for d in defined if d != before[m]]) for m in moved]
    codes[:] = after
    names = ad.read_zarr(copy).obs_names.to_numpy()
    r = evaluate(emb, label_key="cell_type", batch_key="dataset_id", data=str(copy), out=tmp_path / "r",
                 umap_cells=300, baseline=False, log=lambda *_: None)  # fmt: skip
    review = r["label_review"]
    assert review["cells"] == len(known) and review["trained_on_labels"] is True
    listed = pd.read_csv(tmp_path / "r" / "label_review.csv", index_col="cell")
    assert len(listed) == review["flagged"] and list(listed.columns) == [
        "row",
        "label",
        "dataset_id",
        "suggested",
        "agreement",
    ]
    hit = np.isin(listed.index.astype(str), names[moved])
    assert hit.sum() >= 0.8 * len(moved) and hit.mean() >= 0.8, (hit.sum(), len(moved), len(listed))
    old = dict(zip(names[moved], np.asarray(cats)[before[moved]]))
    assert np.mean([listed.suggested[c] == old[c] for c in listed.index[hit]]) >= 0.9
    assert (listed.agreement.diff().dropna() >= 0).all() and (listed.agreement < 0.2).all()
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## Label review" in text and "trained on `cell_type`" in text
    off = evaluate(emb, label_key="cell_type", batch_key="dataset_id", data=str(copy), out=tmp_path / "off",
                   umap_cells=300, baseline=False, review_min_agreement=0, log=lambda *_: None)  # fmt: skip
    assert "label_review" not in off and not (tmp_path / "off" / "label_review.csv").exists()

    # `bigatlas review` reviews every labelled cell (here all of them, as evaluate did): the same cells flagged,
    # in a list that --drop-labels matches back to exactly those cells
    out = tmp_path / "rev" / "review.csv"
    assert main(["review", "--emb", str(emb), "--label-key", "cell_type", "--data", str(copy), "--out", str(out)]) == 0
    whole = json.loads(out.with_suffix(".json").read_text())
    every = pd.read_csv(out)
    assert whole["cells"] == len(known) and whole["flagged"] == len(every) == len(listed)
    assert set(every.cell) == set(listed.index) and whole["trained_on_labels"] is True
    assert list(every.columns) == ["cell", "row", "label", "suggested", "agreement"]
    position = {n: i for i, n in enumerate(names)}  # the whole store, unfiltered: a cell's id is its position
    assert every.row.tolist() == [position[c] for c in every.cell]
    assert (every.agreement.diff().dropna() >= 0).all()
    matched = listed_cells(open_store(str(copy)), read_cells(out), out)
    assert sorted(names[matched]) == sorted(every.cell)
    bad = tmp_path / "bad" / "review.csv"
    argv = ["review", "--emb", str(emb), "--label-key", "cell_type", "--out", str(bad)]
    assert main([*argv, "--obs-filter", "dataset_id == 'study_0'"]) == 2 and not bad.exists()


def test_a_second_evaluation_into_one_report_is_refused_and_leaves_the_firsts_partial_alone(embedded, tmp_path, capsys):
    """Two evaluations into one OUT would share <OUT>.partial: the second deleted the first's folder."""
    from bigatlas.lock import OutputLock

    data, run, emb = embedded
    out = tmp_path / "report"
    first = tmp_path / "report.partial"
    first.mkdir()
    (first / "being_written").write_text("the first evaluation's")
    args = ["evaluate", "--emb", str(emb), "--label-key", "cell_type", "--batch-key", "dataset_id"]
    with OutputLock(tmp_path / "report.lock", "held by this test"):
        assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output {out} is in use by process" in err and len(err.strip().splitlines()) == 1, err
    assert (first / "being_written").exists() and not out.exists()


def test_the_pca_baseline_reads_the_counts_the_run_was_trained_on(embedded, tmp_path):
    """A run trained on a layer of counts (X normalized): the baseline reads that layer, not X, so it equals the
    baseline of the same cells stored as counts in X; told to read X, it is refused, naming the fix."""
    import anndata as ad

    data, _, _ = embedded
    counts = ad.read_zarr(data)[::8].copy()
    counts.write_zarr(tmp_path / "counts.zarr")
    norm = counts.copy()
    norm.layers["counts"] = counts.X.copy()
    norm.X = norm.X.multiply(1e4 / np.asarray(norm.X.sum(1))).tocsr().log1p()
    norm.write_h5ad(tmp_path / "norm.h5ad")
    run = tmp_path / "run"
    AtlasVAE(str(tmp_path / "norm.h5ad"), batch_key="dataset_id", layer="counts", train={"max_epochs": 1}).fit(run)
    emb = embed(run, str(tmp_path / "norm.h5ad"), tmp_path / "emb.zarr", progress=False)
    kw = dict(label_key="cell_type", batch_key="dataset_id", n_cells=400, umap_cells=100, review_min_agreement=0)
    base = evaluate(emb, out=tmp_path / "r1", log=lambda *_: None, **kw)["scores"]["pca_baseline"]
    other = evaluate(emb, data=str(tmp_path / "counts.zarr"), out=tmp_path / "r2", log=lambda *_: None, **kw)
    assert base == other["scores"]["pca_baseline"]
    with pytest.raises(EmbeddingError, match=r"non-integer value .*--layer \(layer=\) names .*also has counts"):
        evaluate(emb, layer="X", out=tmp_path / "r3", log=lambda *_: None, **kw)
    assert not (tmp_path / "r3").exists()
