"""bench.quality on a user's own AnnData (--data): the same comparison, scored against its labels."""

import argparse
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bench.common import main
from bench.quality import LABELS, TRUTH, add_arguments, atlas, overrides, run, score, user_data
from bigatlas.synth import synth


@pytest.fixture(autouse=True)
def two_kmeans_draws(monkeypatch):
    """Rows here score with 2 k-means draws, not 10: the same code path, and each draw is ~1 s of the
    tests' time (test_evaluate.py checks the draws' average itself)."""
    import bench.quality

    monkeypatch.setattr(bench.quality, "KMEANS_SEEDS", 2)


@pytest.fixture(scope="module")
def user_h5ad(tmp_path_factory):
    """A small atlas as a user would hand it over: counts in a layer, log-normalised X, their own column names."""
    d = tmp_path_factory.mktemp("user")
    synth(d / "s.zarr", 600, 150, "zarr", seed=3, preset_name="subtle")
    src = ad.read_zarr(d / "s.zarr")
    x = sp.csr_matrix(src.X, dtype=np.float32)
    counts = sp.csr_matrix((x.data, x.indices.astype(np.int64), x.indptr.astype(np.int64)), shape=x.shape)
    norm = (sp.diags(1e4 / np.maximum(np.asarray(counts.sum(1)).ravel(), 1)) @ counts).tocsr()
    norm.data = np.log1p(norm.data)
    obs = pd.DataFrame(
        {"study": src.obs.dataset_id.astype(str).to_numpy(), "celltype": src.obs.true_cell_type.astype(str).to_numpy()},
        index=src.obs_names,
    )
    path = d / "pbmc_like.h5ad"
    ad.AnnData(norm, obs=obs, var=pd.DataFrame(index=src.var_names), layers={"counts": counts}).write_h5ad(path)
    return path


def test_user_data_is_the_truth_and_hides_a_fifth_of_the_labels(user_h5ad):
    import argparse

    a = argparse.Namespace(data=str(user_h5ad), batch_key="study", label_key="celltype", layer="counts")
    a.hidden_fraction, theirs = 0.2, ad.read_h5ad(user_h5ad)
    adata = atlas(a, "pbmc_like", seed=0)
    assert (adata.obs[TRUTH].astype(str).to_numpy() == theirs.obs.celltype.to_numpy()).all()
    assert (adata.X != theirs.layers["counts"]).nnz == 0  # the counts, not the normalised X
    hidden = adata.obs["bench_hidden"].to_numpy()
    assert 0.15 < hidden.mean() < 0.25
    assert (adata.obs[LABELS].astype(str).to_numpy()[hidden] == "undefined").all()
    assert (adata.obs[LABELS].astype(str).to_numpy()[~hidden] == theirs.obs.celltype.to_numpy()[~hidden]).all()
    other = atlas(a, "pbmc_like", seed=1).obs["bench_hidden"].to_numpy()
    assert (other != hidden).any()  # each seed hides its own draw


def test_quality_rows_on_user_data(user_h5ad, tmp_path):
    out = tmp_path / "q.json"
    argv = ["--data", str(user_h5ad), "--batch-key", "study", "--label-key", "celltype", "--layer", "counts"]
    argv += ["--only", "bigatlas", "bigatlas_labels", "--seeds", "0", "--epochs", "2", "--threads", "1"]
    main("", add_arguments, run, argv + ["--out", str(out), "--data-dir", str(tmp_path)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["method"]) for r in rows] == [("pbmc_like", "bigatlas"), ("pbmc_like", "bigatlas_labels")]
    for r in rows:
        assert 0 <= r["bio_conservation"] <= 1 and 0 <= r["batch_correction"] <= 1
    assert "heldout_accuracy" in rows[1] and "heldout_accuracy" not in rows[0]
    assert json.loads(out.read_text())["setup"]["label_key"] == "celltype"


def test_visible_accuracy_scores_the_cells_whose_label_was_visible_and_heldout_the_hidden_ones(user_h5ad):
    a = argparse.Namespace(
        data=str(user_h5ad), batch_key="study", label_key="celltype", layer="counts", hidden_fraction=0.2
    )
    adata = atlas(a, "", 0)
    hidden = adata.obs["bench_hidden"].to_numpy()
    truth = adata.obs[TRUTH].astype(str).to_numpy()
    other = np.roll(adata.obs[TRUTH].cat.categories.to_numpy(), 1)
    wrong = other[adata.obs[TRUTH].cat.codes.to_numpy()]  # every cell named another type
    z = np.random.default_rng(0).normal(size=(adata.n_obs, 4)).astype(np.float32)
    row = score(adata, z, np.where(hidden, wrong, truth))  # right on every visible cell, wrong on every hidden one
    assert (row["visible_accuracy"], row["heldout_accuracy"]) == (1.0, 0.0)
    row = score(adata, z, np.where(hidden, truth, wrong))
    assert (row["visible_accuracy"], row["heldout_accuracy"]) == (0.0, 1.0)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"batch_key": "donor"}, "no obs column 'donor' \\(--batch-key\\)"),
        ({"layer": "raw"}, "no layer 'raw'"),
        ({"layer": None}, "X holds .* values that are not counts"),
        ({"unlabelled": True}, "'celltype' \\(--label-key\\) has 3 cells without a label"),
        ({"no_batch": True}, "'study' \\(--batch-key\\) is missing for 2 cells"),
    ],
)
def test_user_data_errors_name_the_problem(user_h5ad, tmp_path, change, match):
    path = user_h5ad
    if change.pop("unlabelled", False):
        a = ad.read_h5ad(user_h5ad)
        a.obs["celltype"] = a.obs.celltype.astype(object)
        a.obs.iloc[[1, 5, 9], a.obs.columns.get_loc("celltype")] = [np.nan, "undefined", np.nan]
        path = tmp_path / "unlabelled.h5ad"
        a.write_h5ad(path)
    if change.pop("no_batch", False):
        a = ad.read_h5ad(user_h5ad)
        a.obs["study"] = a.obs.study.astype(object)
        a.obs.iloc[[2, 4], a.obs.columns.get_loc("study")] = [np.nan, np.nan]
        path = tmp_path / "no_batch.h5ad"
        a.write_h5ad(path)
    kwargs = {"batch_key": "study", "label_key": "celltype", "layer": "counts", **change}
    with pytest.raises(ValueError, match=match) as e:
        user_data(str(path), **kwargs)
    assert path.name in str(e.value)


def test_the_transfer_bench_reads_its_atlases_and_model_overrides_as_quality_does(tmp_path):
    """bench.transfer's flags (no --data) build the preset atlas through atlas(); --model's true / false are
    booleans, not strings (a string 'false' would turn a flag on); --train's values are numbers."""
    import argparse

    from bench.transfer import add_arguments as transfer_arguments

    p = argparse.ArgumentParser()
    transfer_arguments(p)
    a = p.parse_args(
        ["--data-dir", str(tmp_path), "--cells", "600", "--genes", "50", "--model", "batch_interaction=false"]
        + ["--train", "ema_decay=0.999"]
    )
    adata = atlas(a, "rare", seed=0)
    assert adata.n_obs == 600 and adata.obs["bench_hidden"].any()
    assert overrides(a.model) == {"batch_interaction": False} and overrides(a.train) == {"ema_decay": 0.999}
    assert overrides(["a=TRUE", "b=0.5", "c=(64,)", "d=layer"]) == {"a": True, "b": 0.5, "c": (64,), "d": "layer"}


def test_the_transfer_table_of_a_tag_is_the_mean_of_that_tags_rows_only():
    """bench.transfer --table --tag T: the means over T's rows (every seed), not the file's summary nor another tag's
    rows; a tag the file lacks is one error naming the tags it has."""
    from bench.transfer import summary, table
    from bench.transfer_novel import THRESHOLDS

    def row(tag, seed, acc, auroc):
        scores = {"accuracy": acc, "macro_f1": acc - 0.1, "ece": 0.01}
        novel = {"auroc": auroc, "unknown_novel": {}, "unknown_known": {}, "accuracy_known_not_unknown": {}}
        for key in ("unknown_novel", "unknown_known", "accuracy_known_not_unknown"):
            novel[key] = {str(t): 0.5 for t in THRESHOLDS}
        names = ("head_uncalibrated", "head", "knn", "both", "default_scores")
        return {"preset": "subtle", "seed": seed, "tag": tag, "novel": novel, **{n: dict(scores) for n in names}}

    rows = [row("on", 0, 0.80, 0.90), row("on", 5, 0.70, 0.96), row("off", 0, 0.20, 0.10)]
    result = {"rows": rows, "summary": summary(rows)}
    on = table(result, "on")
    assert "| subtle | kNN vote | 0.750 | 0.650 |" in on and "| subtle | 0.930 |" in on
    assert "0.200" not in on and "| subtle | kNN vote | 0.567 |" in table(result)  # untagged: the file's summary
    with pytest.raises(SystemExit, match="no rows tagged 'x'.*off, on"):
        table(result, "x")


def test_the_novel_type_run_never_sees_its_test_cells_and_scores_the_known_ones_as_queries():
    """bench.transfer's novel-type run trains without the novel type's cells and without the hidden known cells
    (both are then queries, out of training and of the reference), and scores every predictor on the known ones."""
    from types import SimpleNamespace

    import anndata as ad
    import numpy as np
    import pandas as pd

    from bench.transfer import predictor_scores, summary, table
    from bench.transfer_novel import NOVEL, novel_row

    rng = np.random.default_rng(0)
    truth = rng.choice([f"{NOVEL}.a", "type_0.a", "type_0.b", "type_2.a"], 400)
    obs = pd.DataFrame({TRUTH: truth, "bench_hidden": rng.random(400) < 0.3}, index=[f"c{i}" for i in range(400)])
    adata = ad.AnnData(np.zeros((400, 3), np.float32), obs=obs)
    seen = {}

    def fit(cells, a, seed, run_dir):
        seen["cells"] = set(cells.obs_names)
        vocab = SimpleNamespace(label_classes={LABELS: ["type_0.a", "type_0.b", "type_2.a"]})
        return SimpleNamespace(vocab=vocab, get_latent_representation=lambda data: np.zeros((data.n_obs, 2)))

    def predictors(model, z):
        right = pd.Categorical(truth, categories=model.vocab.label_classes[LABELS]).codes
        sure = np.eye(3)[np.clip(right, 0, None)] * 0.9 + 0.1 / 3  # right on the known cells, 0.93 sure
        sure[right < 0] = 1 / 3  # the novel cells: unsure
        return {"head": sure, "both": sure}, np.ones(len(z)), "both", {"head": {"nll": 0.1}, "both": {"ece": 0.2}}

    row = novel_row(adata, SimpleNamespace(), 0, fit, predictors, predictor_scores)
    novel = np.char.startswith(truth.astype(str), NOVEL + ".")
    known = obs["bench_hidden"].to_numpy() & ~novel
    assert seen["cells"] == set(obs.index[~novel & ~known]) and row["known_cells"] == "query"
    assert row["auroc"] == 1.0 and row["unknown_novel"]["0.5"] == 1.0 and row["unknown_known"]["0.5"] == 0.0
    assert set(row["query"]) == {"head", "both"} and row["query"]["head"]["accuracy"] == 1.0
    assert row["query"]["head"]["nll"] == round(-np.log(0.9 + 0.1 / 3), 4) and row["query"]["head"]["aurc"] == 0.0
    head = row["by_predictor"]["head"]
    assert head["auroc"] == 1.0 and head["accuracy_known_kept_0.5"] == 1.0 and head["aurc_known"] == 0.0
    assert row["validation"]["head"] == {"nll": 0.1}  # the query run's reference's, what --predictor auto reads
    scores = {"accuracy": 0.5, "macro_f1": 0.4, "ece": 0.1}
    names = ("head_uncalibrated", "head", "knn", "both", "default_scores")
    result = {"rows": [{"preset": "p", "seed": 0, "novel": row, **{n: dict(scores) for n in names}}]}
    printed = table({"summary": summary(result["rows"])})
    assert "| atlas | query cells, out of training: predictor |" in printed
    assert "| p | head, calibrated | 1.000 |" in printed  # the query table's row (the main table's is 0.500)
    assert "| p | head, calibrated | 1.000 | 1.000 | 0.000 | 1.000 | 0.0000 | 0.100 |" in printed  # by predictor
    assert "| p | both (mean) | 1.000 | 1.000 | 0.000 | 1.000 | 0.0000 | – |" in printed  # no validation NLL


def test_mislabels_are_the_stated_fraction_of_visible_labels_and_a_sibling_subtype(tmp_path):
    import argparse

    a = argparse.Namespace(data=None, data_dir=str(tmp_path), cells=3000, genes=100, hidden_fraction=0.2)
    a.mislabel_fraction = 0.0
    clean = atlas(a, "rare", seed=2)
    a.mislabel_fraction = 0.1
    noisy = atlas(a, "rare", seed=2)
    hidden = noisy.obs["bench_hidden"].to_numpy()
    assert (hidden == clean.obs["bench_hidden"].to_numpy()).all()  # the hidden draw is the seed's either way
    given = noisy.obs[LABELS].astype(str).to_numpy()
    truth = noisy.obs.cell_type.astype(str).to_numpy()
    wrong = noisy.obs["bench_mislabelled"].to_numpy()
    visible = (truth != "undefined") & ~hidden
    assert not (wrong & ~visible).any() and 0.08 < wrong[visible].mean() < 0.12
    assert (given[wrong] != truth[wrong]).all() and (
        given[~wrong] == clean.obs[LABELS].astype(str).to_numpy()[~wrong]
    ).all()
    sibling = (
        np.char.partition(given[wrong].astype(str), ".")[:, 0] == np.char.partition(truth[wrong].astype(str), ".")[:, 0]
    )
    assert sibling.all()  # every synthetic type has subtypes: a wrong label stays within the coarse type
    assert len(set(given[wrong])) > 3  # into many types, not one
    with pytest.raises(ValueError, match="mislabel-fraction must be in"):
        a.mislabel_fraction = 1.0
        atlas(a, "rare", seed=2)


def test_mislabelled_rows_are_their_own_atlas_and_score_the_wrong_labels(user_h5ad, tmp_path):
    out = tmp_path / "q.json"
    argv = ["--data", str(user_h5ad), "--batch-key", "study", "--label-key", "celltype", "--layer", "counts"]
    argv += ["--only", "bigatlas_labels", "--seeds", "0", "--epochs", "2", "--threads", "1", "--out", str(out)]
    main("", add_arguments, run, argv + ["--data-dir", str(tmp_path)])
    main("", add_arguments, run, argv + ["--data-dir", str(tmp_path), "--mislabel-fraction", "0.2"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["preset"] for r in rows] == ["pbmc_like", "pbmc_like+mislabel0.2"]  # the clean row is kept
    assert "mislabelled_corrected" not in rows[0]
    corrected, kept = rows[1]["mislabelled_corrected"], rows[1]["mislabelled_kept"]
    assert 0 <= corrected <= 1 and 0 <= kept <= 1 and corrected + kept <= 1  # a wrong label is never the truth
    assert "review_recall" not in rows[0] and 0 <= rows[1]["review_recall"] <= 1
    assert 0 <= rows[1]["review_precision"] <= 1
    # the recipe for noisy labels: the unlabelled row's latent reviews the labels the labelled row trains on
    argv += ["--data-dir", str(tmp_path), "--mislabel-fraction", "0.2", "--tag", "rev", "--review-with", "rev"]
    argv[argv.index("bigatlas_labels")] = "bigatlas"
    argv.insert(argv.index("bigatlas") + 1, "bigatlas_labels")
    main("", add_arguments, run, argv)
    rev = [r for r in json.loads(out.read_text())["rows"] if r["tag"] == "rev"]
    assert [r["method"] for r in rev] == ["bigatlas", "bigatlas_labels"]
    assert "review_hidden" not in rev[0] and rev[1]["review_hidden"] >= 1


def test_reviewed_hides_the_flagged_visible_labels_only(tmp_path):
    """bench.quality --review-with: the visible labels that disagree with their neighbours in the given
    latent become 'undefined'; hidden cells and every other label stay; a missing latent is named."""
    from bench.quality import reviewed

    rng = np.random.default_rng(0)
    truth = np.repeat(np.array(["A", "B", "C"], dtype=object), 100)
    z = np.array([[0, 0], [20, 0], [0, 20]], np.float32)[np.repeat(np.arange(3), 100)] + rng.normal(size=(300, 2))
    given = truth.copy()
    given[[5, 150, 250]] = ["B", "C", "A"]
    given[[10, 110]] = "undefined"
    obs = pd.DataFrame({LABELS: pd.Categorical(given)}, index=[f"c{i}" for i in range(300)])
    adata = ad.AnnData(np.zeros((300, 1), np.float32), obs=obs)
    np.save(tmp_path / "z.npy", z.astype(np.float32))
    out, n = reviewed(adata, tmp_path / "z.npy")
    after = out.obs[LABELS].astype(str).to_numpy()
    assert n == 3 and (after[[5, 150, 250]] == "undefined").all()
    keep = np.setdiff1d(np.arange(300), [5, 150, 250])
    assert (after[keep] == given[keep]).all() and (adata.obs[LABELS].astype(str).to_numpy() == given).all()
    with pytest.raises(FileNotFoundError, match="--review-with: no latent"):
        reviewed(adata, tmp_path / "missing.npy")


def test_own_rule_table_pairs_the_peers_own_rule_rows_with_bigatlas_on_the_same_seeds():
    from bench.quality import table

    def row(method, seed, tag, **kw):
        return {"preset": "rare", "seed": seed, "method": method, "tag": tag, "bio_conservation": seed / 10, **kw}

    rows = [row("scvi", 0, "peer", max_epochs=60), row("scvi", 1, "peer", max_epochs=0), row("scvi", 2, "peer")]
    rows += [row("bigatlas", s, "default") for s in (0, 1, 2)]
    rows += [row("bigatlas_labels", 1, "default"), row("scanvi", 0, "peer", max_epochs=0)]
    own = table(rows, ["default"], own_rule=True).splitlines()[2:]
    lines = {c[2]: c[3:5] for c in ([x.strip() for x in line.split("|")] for line in own)}
    assert lines == {"scvi": ["1", "0.100"], "bigatlas (default)": ["1", "0.100"], "scanvi": ["1", "0.000"]}
    everything = table(rows, ["default"]).splitlines()[2:]
    assert len(everything) == 4 and "| rare | scvi | 3 |" in "\n".join(everything)
    order = [line.split("|")[2].strip() for line in everything]  # each bigatlas method, then its peer
    assert order == ["bigatlas (default)", "scvi", "bigatlas_labels (default)", "scanvi"]
    labelled = table(rows, ["default"], methods=["bigatlas_labels", "scanvi"]).splitlines()[2:]
    assert sorted(line.split("|")[2].strip() for line in labelled) == ["bigatlas_labels (default)", "scanvi"]


def test_covariate_rows_are_their_own_atlas_and_every_method_gets_the_covariate(user_h5ad, tmp_path, monkeypatch):
    """--covariate-keys: bigatlas trains with them as covariate keys (scVI as categorical covariates), the rows
    name the atlas <name>+cov_<key>, the clean rows stay; a column the data lacks is named before any training."""
    import argparse

    import bigatlas.api

    theirs = ad.read_h5ad(user_h5ad)
    theirs.obs["donor"] = theirs.obs.study.astype(str) + np.where(np.arange(theirs.n_obs) % 2, "_a", "_b")
    path = tmp_path / "pbmc_like.h5ad"
    theirs.write_h5ad(path)
    given = []
    init = bigatlas.api.AtlasVAE.__init__

    def recording(self, *args, **kwargs):
        given.append(tuple(kwargs.get("covariate_keys") or ()))
        init(self, *args, **kwargs)

    monkeypatch.setattr(bigatlas.api.AtlasVAE, "__init__", recording)
    out = tmp_path / "q.json"
    argv = ["--data", str(path), "--batch-key", "study", "--label-key", "celltype", "--layer", "counts"]
    argv += ["--only", "bigatlas", "--seeds", "0", "--epochs", "2", "--threads", "1", "--out", str(out)]
    argv += ["--data-dir", str(tmp_path)]
    main("", add_arguments, run, argv)
    main("", add_arguments, run, argv + ["--covariate-keys", "donor"])
    assert given == [(), ("donor",)]
    assert [r["preset"] for r in json.loads(out.read_text())["rows"]] == ["pbmc_like", "pbmc_like+cov_donor"]
    a = argparse.Namespace(data=str(path), batch_key="study", label_key="celltype", layer="counts", hidden_fraction=0.2)
    a.covariate_keys = ["donor"]
    cov = atlas(a, "pbmc_like", seed=0)
    assert (cov.obs["donor"].astype(str).to_numpy() == theirs.obs.donor.to_numpy()).all()
    with pytest.raises(ValueError, match="no obs column 'sample' \\(--covariate-keys\\)"):
        main("", add_arguments, run, argv + ["--covariate-keys", "sample"])
    small = ["--presets", "subtle", "--cells", "600", "--genes", "100", "--covariate-keys", "sample"]
    with pytest.raises(ValueError, match="the subtle atlas has no obs column 'sample'"):
        main("", add_arguments, run, argv[argv.index("--only") :] + small)


def test_condition_kept_sees_the_treatment_whether_the_latent_mixes_donors_or_keeps_them_apart():
    from bench.quality import condition_kept

    rng = np.random.default_rng(0)
    fine = np.repeat(["a.0", "a.1", "b.0", "b.1"], 480)
    donor = np.tile(np.repeat(np.arange(16), 30), 4)
    treated, affected = donor % 2 == 1, np.char.startswith(fine, "a")
    for spread in (0.5, 2.0):  # donors mixed, or each donor apart from the next
        base = rng.normal(0, spread, (16, 4))[donor] + rng.normal(0, 1, (len(fine), 4))
        shifted = base + np.where((treated & affected)[:, None], [5.0, 0, 0, 0], 0.0)
        assert condition_kept(shifted, treated, donor, fine, affected) > 0.2
        assert abs(condition_kept(base, treated, donor, fine, affected)) < 0.05
        everywhere = base + np.where(treated[:, None], [5.0, 0, 0, 0], 0.0)  # an arm effect in every type: no biology
        assert abs(condition_kept(everywhere, treated, donor, fine, affected)) < 0.05


def test_runs_started_side_by_side_build_the_preset_atlas_once(tmp_path, monkeypatch):
    """Two threads asking for the same atlas at once: one builds it, the other waits and reads the same cells (two
    builders shared one .partial folder and one of them failed)."""
    import threading

    import bigatlas.synth
    from bench.quality import preset_atlas

    built, real = [], bigatlas.synth.synth

    def counted(*args, **kw):
        built.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(bigatlas.synth, "synth", counted)
    got, errors = [], []

    def ask():
        try:
            got.append(preset_atlas(tmp_path, "subtle", 0, 300, 50))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(built) == 1 and len(got) == 2
    assert (got[0].X != got[1].X).nnz == 0 and got[0].n_obs == 300


def test_the_pbmc_atlas_holds_the_shipped_cells_raw_counts_thinned_by_each_studys_capture(tmp_path):
    """bench.pbmc's claims: a cell's smallest value in scanpy's sample is one count (so the counts times the cell's
    normalisation give back the shipped values, with the cell total the sample records), and each study's counts
    are the cells' counts kept at that study's capture of each gene."""
    from bench.pbmc import sample, shipped, thinned
    from bench.quality import preset_atlas

    counts, labels, genes = shipped()
    logged, obs, _ = sample()
    normalised = counts * (1e4 / obs["n_counts"].to_numpy())[:, None]
    np.testing.assert_allclose(np.log1p(normalised), logged, rtol=2e-3, atol=2e-3)
    assert (counts > 0).sum() == (logged > 0).sum() and len(set(labels)) == 10

    study, x, capture = thinned(counts, seed=0)
    assert (x <= counts).all() and x.sum() < counts.sum()
    for s in range(capture.shape[0]):  # each (study, gene) with enough counts keeps its capture's share
        before, after = counts[study == s].sum(0), x[study == s].sum(0)
        enough = before >= 200
        p = capture[s, enough]
        z = (after[enough] - p * before[enough]) / np.sqrt(before[enough] * p * (1 - p) + 1e-9)
        assert enough.sum() > 50 and np.abs(z).max() < 5.5, (s, np.abs(z).max())

    atlas = preset_atlas(tmp_path, "pbmc", 1, 8000, 1000)
    again = preset_atlas(tmp_path / "again", "pbmc", 1, 8000, 1000)  # built once more from the same seed
    other = preset_atlas(tmp_path, "pbmc", 2, 8000, 1000)
    assert atlas.shape == (len(labels), len(genes)) and list(atlas.var_names) == list(genes)
    assert (atlas.obs["true_cell_type"].astype(str).to_numpy() == labels).all()
    assert (atlas.X != again.X).nnz == 0 and (atlas.X != other.X).nnz > 0
    assert atlas.obs["dataset_id"].nunique() == capture.shape[0]
    _, _, capture = thinned(counts, seed=1)
    np.testing.assert_allclose(atlas.var[[f"capture_study_{s}" for s in range(3)]].to_numpy().T, capture, rtol=1e-6)


def test_the_skewed_pbmc_atlas_gives_each_study_its_own_type_composition_with_pbmcs_capture(tmp_path):
    """pbmc_skewed: the same cells and the same seed's capture as pbmc, but the study a cell lands in depends on its
    type (each study its own composition), where pbmc's random split does not; an unknown preset is refused."""
    from scipy.stats import chi2_contingency

    from bench.pbmc import pbmc_atlas
    from bench.quality import preset_atlas

    plain = preset_atlas(tmp_path, "pbmc", 3, 8000, 1000)
    skewed = preset_atlas(tmp_path, "pbmc_skewed", 3, 8000, 1000)
    assert skewed.shape == plain.shape and (skewed.obs["true_cell_type"] == plain.obs["true_cell_type"]).all()
    columns = [f"capture_study_{s}" for s in range(3)]
    np.testing.assert_array_equal(skewed.var[columns].to_numpy(), plain.var[columns].to_numpy())
    p = {}
    for name, a in (("pbmc", plain), ("pbmc_skewed", skewed)):
        table = pd.crosstab(a.obs["true_cell_type"], a.obs["dataset_id"])
        assert table.shape == (10, 3), name
        p[name] = chi2_contingency(table.to_numpy())[1]
    assert p["pbmc_skewed"] < 1e-12 and p["pbmc"] > 1e-3, p
    with pytest.raises(ValueError, match="no preset 'pbmc_tilted'"):
        pbmc_atlas(tmp_path / "x.zarr", 0, "pbmc_tilted")
    assert not (tmp_path / "x.zarr").exists()
