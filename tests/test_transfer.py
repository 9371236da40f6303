"""Label transfer: the kNN search, the stratified reference sample, calibration, novel-type detection,
the reference index (rebuild, UMAP placement) and labelled query mapping."""

import json

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import cli
from scipy.stats import mannwhitneyu

from bigatlas import AtlasVAE
from bigatlas.calibration import calibrate, ece, fit_calibration
from bigatlas.infer import embed
from bigatlas.knn import EXACT_MAX, LatentIndex
from bigatlas.reference import read_reference, stratified_sample
from bigatlas.synth import synth

NOVEL = "type_2"  # coarse type left out of the reference


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    u = mannwhitneyu(score[positive], score[~positive]).statistic
    return float(u / (positive.sum() * (~positive).sum()))


def test_knn_exact_is_brute_force_and_inverted_file_recall(tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(30, 10, generator=g) * 4
    n = EXACT_MAX + 10_000
    low_dim = torch.randn(n, 3, generator=g) @ torch.randn(3, 10, generator=g)  # latents are not isotropic
    z = centres[torch.randint(0, 30, (n,), generator=g)] + low_dim + 0.1 * torch.randn(n, 10, generator=g)
    q = z[:300] + 0.05 * torch.randn(300, 10, generator=g)
    brute = torch.cdist(q.double(), z.double())
    want_d, want_i = brute.topk(15, largest=False)
    d, i = LatentIndex(z, exact=True).search(q, 15)
    assert torch.equal(i, want_i) and torch.allclose(d.double(), want_d, atol=1e-3)
    ivf = LatentIndex(z, *LatentIndex.partition(z, seed=0))
    assert not ivf.exact
    d2, i2 = ivf.search(q, 15)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 15 for a, b in zip(i2, want_i)])
    assert recall >= 0.9, recall
    assert (d2[:, 1:] >= d2[:, :-1]).all()  # nearest first
    assert torch.allclose(d2.double(), brute.gather(1, i2), atol=1e-3)  # distances are those of the indices
    d3, i3 = ivf._inverted_file_torch(q, 15)  # the compiled scan finds what the torch formulation finds
    _, i4 = ivf._inverted_file(q, 15)
    assert (i4 == i3).float().mean() >= 0.999


def test_a_knn_search_leaves_torch_on_the_thread_count_it_had():
    """numba's parallel scan runs on torch's OpenMP runtime and would leave torch on numba's count (every CPU): a
    process limited to one thread went on training on two after a reference build."""
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here: its count and torch's cannot differ")
    z = torch.randn(3000, 8, generator=torch.Generator().manual_seed(1))
    ivf = LatentIndex(z, *LatentIndex.partition(z, cell_size=64, seed=0), exact=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ivf.search(z[:100], 5)
        assert torch.get_num_threads() == 1
        assert numba.get_num_threads() == 1  # the scan ran within torch's limit
    finally:
        torch.set_num_threads(before)


def test_stratified_sample_keeps_rare_classes_and_weights_restore_proportions():
    rng = np.random.default_rng(0)
    codes = rng.choice([0, 1, 2, -1], size=50_000, p=[0.897, 0.08, 0.003, 0.02])
    eligible = rng.random(50_000) > 0.05
    pos, w = stratified_sample(codes, eligible, 2_000, seed=3)
    assert len(pos) <= 2_000 and np.all(np.diff(pos) > 0) and eligible[pos].all()
    rare = (codes[eligible] == 2).sum()
    assert (codes[pos] == 2).sum() == min(rare, 2_000 // 8)  # every class keeps its floor
    for c in (0, 1, 2, -1):  # the weighted sample has the eligible cells' class shares
        assert np.isclose(w[codes[pos] == c].sum() / w.sum(), (codes[eligible] == c).mean(), atol=2e-3)
    again, _ = stratified_sample(codes, eligible, 2_000, seed=3)
    assert np.array_equal(pos, again)
    small, ws = stratified_sample(codes[:1000], eligible[:1000], 2_000)
    assert np.array_equal(small, np.flatnonzero(eligible[:1000])) and (ws == 1).all()


def test_calibration_recovers_temperature_and_prior_shift():
    rng = np.random.default_rng(1)
    n, k = 20_000, 5
    counts = np.array([5000, 2000, 500, 100, 20], float)
    true = rng.normal(0, 2, (n, k)) + np.log(counts)  # logits of the true posterior
    p = np.exp(true - true.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = torch.as_tensor((p.cumsum(1) > rng.random((n, 1))).argmax(1))
    seen = torch.as_tensor(3.0 * (true - np.log(counts)))  # overconfident, class prior flattened
    fit = fit_calibration(seen, y, torch.as_tensor(np.log(counts)))
    assert fit["temperature"] == pytest.approx(3.0, rel=0.1)
    assert fit["prior_shift"] == pytest.approx(1.0, abs=0.1)  # what inverse-frequency weighting took away
    before = torch.softmax(seen, 1).numpy()
    after = torch.softmax(calibrate(seen, torch.as_tensor(np.log(counts)), fit["temperature"], fit["prior_shift"]), 1)
    assert ece(after.numpy(), y.numpy()) < 0.02 < ece(before, y.numpy())


def test_calibration_on_validation_cells_all_right_keeps_a_finite_temperature():
    """A few hundred validation cells the head gets all right: the likelihood alone drives the temperature to 0
    (every later cell called certain); the prior keeps it near the raw logits'."""
    rng = np.random.default_rng(2)
    n, k = 250, 6
    y = torch.as_tensor(rng.integers(0, k, n))
    logits = torch.as_tensor(rng.normal(0, 1, (n, k)))
    logits[torch.arange(n), y] += 4.0  # every cell right, none by much more than its neighbours
    counts = torch.as_tensor(np.log(rng.integers(20, 2000, k).astype(float)))
    fit = fit_calibration(logits, y, counts)
    assert 0.2 < fit["temperature"] <= 1.0 and abs(fit["prior_shift"]) < 0.5  # the likelihood alone: 0.018
    p = torch.softmax(calibrate(logits, counts, fit["temperature"], fit["prior_shift"]), 1)
    assert p.max(1).values.min() < 0.999  # not every cell called certain


@pytest.fixture(scope="module")
def novel(tmp_path_factory):
    """A model trained on an atlas without one coarse type; every cell embedded."""
    root = tmp_path_factory.mktemp("novel")
    synth(root / "atlas.zarr", 5000, 400, seed=2)
    atlas = ad.read_zarr(root / "atlas.zarr")
    truth = atlas.obs["true_cell_type"].astype(str).to_numpy()
    held = np.char.startswith(truth.astype(str), NOVEL + ".")
    model = AtlasVAE(atlas[~held].copy(), batch_key="dataset_id", label_keys=["cell_type"], train={"max_epochs": 20})
    model.fit(root / "run")
    out = embed(root / "run", root / "atlas.zarr", root / "emb.zarr", progress=False)
    return root, atlas, truth, held, ad.read_zarr(out).obs


def test_novel_type_is_flagged_not_mislabelled(novel):
    _, _, truth, held, obs = novel
    u = obs["cell_type_uncertainty"].to_numpy()
    assert auroc(held, u) >= 0.9
    assert obs["cell_type_unknown"].to_numpy()[held].mean() >= 0.8
    assert (obs["cell_type_pred_filtered"].astype(str).to_numpy()[held] == "Unknown").mean() >= 0.8
    known = ~held
    assert (obs["cell_type_pred"].astype(str).to_numpy()[known] == truth[known]).mean() >= 0.95
    assert obs["cell_type_unknown"].to_numpy()[known].mean() <= 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_label_transfer_on_a_gpu_predicts_as_on_the_cpu(novel, tmp_path):
    """A model on a GPU (load's default there) searches its reference where the latents are and reads the labels
    on the CPU: the same calls as the CPU's, and embed's columns are the readers'."""
    root, atlas, _, _, obs = novel
    gpu, cpu = AtlasVAE.load(root / "run", adata=atlas), AtlasVAE.load(root / "run", adata=atlas, device="cpu")
    assert gpu.device.type == "cuda" and cpu.device.type == "cpu"
    on_gpu, on_cpu = gpu.predict(), cpu.predict()
    assert (on_gpu.cell_type_pred == on_cpu.cell_type_pred).mean() >= 0.999
    np.testing.assert_allclose(on_gpu.cell_type_prob, on_cpu.cell_type_prob, atol=1e-3)
    assert (on_gpu.cell_type_pred.astype(str).to_numpy() == obs.cell_type_pred.astype(str).to_numpy()).mean() >= 0.999


def test_evaluate_reports_transfer_and_unseen_class_detection(novel, tmp_path):
    from bigatlas.evaluate import evaluate

    root, _, _, _, _ = novel
    keys = {"label_key": "cell_type", "batch_key": "dataset_id", "truth_keys": ["true_cell_type"]}
    r = evaluate(root / "emb.zarr", **keys, out=tmp_path / "report", n_cells=2000, umap_cells=1000, baseline=False,
                 log=lambda *_: None)  # fmt: skip
    t = r["label_transfer"]["cell_type_pred vs true_cell_type"]
    assert t["unseen_classes"] == [f"{NOVEL}.{i}" for i in range(3)]
    assert t["unseen_auroc"] >= 0.9 and t["unknown_fraction_unseen"] >= 0.8 and t["unknown_fraction_seen"] <= 0.05
    for p in ("chosen", "head", "knn"):
        assert t[p]["accuracy"] >= 0.95  # on cells of classes the run knows
    assert 0 <= t["ece"] <= 0.1 and min(t["recall_per_class"].values()) >= 0.8
    # the uncertainty ranks the known cells' errors: those kept are at least as accurate, and the risk-coverage area
    # is at most the error rate (what an uncertainty that ranks nothing gives; both rounded to 4 decimals)
    assert t["accuracy_not_unknown"] >= t["chosen"]["accuracy"] and t["aurc"] <= 1 - t["chosen"]["accuracy"] + 1e-4
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert "reliability_cell_type_pred_vs_true_cell_type.png" in files
    assert "Label transfer" in (tmp_path / "report" / "report.md").read_text()


def test_risk_coverage_area_is_the_error_rate_without_ranking_and_least_when_errors_are_the_least_certain():
    from bigatlas.transfer_report import risk_coverage_area

    rng = np.random.default_rng(0)
    n, e = 200, 30
    correct = np.ones(n, bool)
    correct[rng.choice(n, e, replace=False)] = False
    assert risk_coverage_area(np.full(n, 0.3), correct) == pytest.approx(e / n)  # all tied: no ranking
    best = risk_coverage_area(np.where(correct, 0.1, 0.9) + rng.random(n) * 0.01, correct)
    kept = np.arange(1, n + 1)  # the most certain first: no error among the first n - e
    assert best == pytest.approx(np.mean(np.clip(kept - (n - e), 0, None) / kept))
    worst = risk_coverage_area(np.where(correct, 0.9, 0.1), correct)
    noisy = risk_coverage_area(np.where(correct, 0.1, 0.9) + rng.normal(0, 0.5, n), correct)
    assert best < noisy < e / n < worst
    assert risk_coverage_area(np.zeros(0), np.zeros(0, bool)) is None


def test_reference_rebuilds_identically_and_reports_calibration(novel):
    root, _, _, _, _ = novel
    first = read_reference(root / "run")
    info = first.info
    assert info["n_cells"] == len(first.arrays["latent"]) and first.arrays["labels"].shape[1] == 1
    v = info["validation"]["cell_type"]
    assert v["head"]["ece"] <= v["head_uncalibrated"]["ece"] + 1e-9  # fitted on these cells: never worse
    assert info["novelty"]["scale"] > 0
    positions = first.arrays["position"]
    assert np.all(np.diff(positions) > 0)  # sorted, unique store positions of training cells
    # the run was trained in memory: rebuilding needs that AnnData; a store path rebuilds from the CLI
    atlas = ad.read_zarr(root / "atlas.zarr")
    held = atlas.obs["true_cell_type"].astype(str).str.startswith(NOVEL + ".").to_numpy()
    # the head's accuracy on its labelled training cells: the reference holds every training cell (weights 1), and
    # predict(), which streams the cells through the encoder again, names as many of them right
    train = atlas[~held].copy()
    assert np.all(first.arrays["weight"] == 1)
    pred = AtlasVAE.load(root / "run").predict(train)["cell_type_pred"].astype(str).to_numpy()[positions]
    given = train.obs["cell_type"].astype(str).to_numpy()[positions]
    labelled = first.arrays["labels"][:, 0] >= 0
    assert labelled.sum() > 100 and np.all(given[labelled] != "undefined")
    assert info["training_accuracy"]["cell_type"] == round(float((pred == given)[labelled].mean()), 4)
    from bigatlas.reference_build import build_reference

    build_reference(root / "run", train, umap=False, log=lambda *_: None)
    second = read_reference(root / "run")
    assert second.id == first.id
    assert all(np.array_equal(first.arrays[k], second.arrays[k]) for k in first.arrays)


def test_training_accuracy_weighs_each_cell_by_its_sample_weight_and_skips_a_key_with_no_labelled_cell():
    from types import SimpleNamespace

    from bigatlas.reference_build import _training_accuracy

    # two label keys: 'a' has 4 labelled cells of 5 (the first two named right), 'b' none
    probs = {"a": np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.5, 0.5]]), "b": np.full((5, 3), 1 / 3)}
    transfer = SimpleNamespace(
        keys=["a", "b"], module=torch.nn.Linear(1, 1), head_probs=lambda z: {k: v[: len(z)] for k, v in probs.items()}
    )
    labels = np.array([[0, -1], [1, -1], [1, -1], [1, -1], [-1, -1]])
    weight = np.array([1.0, 3.0, 2.0, 1.0, 100.0])  # unweighted 0.5; the unlabelled cell must not count
    ref = SimpleNamespace(arrays={"latent": np.zeros((5, 2), np.float32), "labels": labels, "weight": weight})
    assert _training_accuracy(transfer, ref, {"a", "b"}) == {"a": round(4 / 7, 4)}
    assert _training_accuracy(transfer, ref, {"b"}) == {}  # 'a' was not calibrated: no number for it


def test_reference_cli_umap_and_query_placement(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGATLAS_REFERENCE_UMAP", "1")
    synth(tmp_path / "a.zarr", 2500, 200, seed=5)
    args = ["--data", str(tmp_path / "a.zarr"), "--batch-key", "dataset_id", "--label-keys", "cell_type"]
    cli(["train", *args, "--out", str(tmp_path / "run"), "--max-epochs", "8", "--reference-cells", "0"])
    assert read_reference(tmp_path / "run") is None
    emb = embed(tmp_path / "run", tmp_path / "a.zarr", tmp_path / "head.zarr", progress=False)
    assert "cell_type_pred_knn" not in ad.read_zarr(emb).obs  # no reference: the head alone
    cli(["reference", "--run", str(tmp_path / "run"), "--max-cells", "1500"])
    ref = read_reference(tmp_path / "run")
    assert 1400 <= ref.n_cells <= 1500 and ref.arrays["umap"].shape == (ref.n_cells, 2)
    out = ad.read_zarr(embed(tmp_path / "run", tmp_path / "a.zarr", tmp_path / "emb.zarr", progress=False))
    placed = out.obsm["X_umap_ref"]
    pred = out.obs["cell_type_pred_knn"].astype(str).to_numpy()  # the vote of the neighbours that place the cell
    classes = np.asarray(AtlasVAE.load(tmp_path / "run").vocab.label_classes["cell_type"])
    ref_labels = classes[ref.arrays["labels"][:, 0]]
    # each cell lands among reference cells of its type: most of its 15 nearest reference cells on the UMAP
    d = np.linalg.norm(placed[:, None] - ref.arrays["umap"][None], axis=2)
    near = ref_labels[np.argsort(d, axis=1)[:, :15]]
    assert ((near == pred[:, None]).mean(1) > 0.5).mean() >= 0.9


def test_labelled_query_mapping_learns_a_new_class(novel, tmp_path):
    root, atlas, truth, held, _ = novel
    study = atlas.obs["dataset_id"].astype(str).to_numpy()
    query_study = study == "study_5"
    rng = np.random.default_rng(0)
    half = rng.random(len(atlas)) < 0.5
    query = atlas[query_study & half].copy()  # labelled, with the novel type; the other half is for scoring
    query.obs["dataset_id"] = ("q_" + query.obs["dataset_id"].astype(str)).astype("category")
    labels = query.obs["cell_type"].astype(str)
    query.obs["cell_type"] = labels.where(~labels.str.startswith(NOVEL + "."), NOVEL).astype("category")
    scoring = atlas[query_study & ~half].copy()
    scoring.obs["dataset_id"] = ("q_" + scoring.obs["dataset_id"].astype(str)).astype("category")
    reference = AtlasVAE.load(root / "run")
    mapped = reference.map_query(query, tmp_path / "mapped", epochs=15)
    # the reference, trained with label keys, averaged its weights over ~3,300 steps; the query inherits that
    decay = [
        json.loads((d / "config.json").read_text())["config"]["train"]["ema_decay"]
        for d in (root / "run", tmp_path / "mapped")
    ]
    assert decay == [0.9997, 0.9997]
    classes = mapped.vocab.label_classes["cell_type"]
    old = reference.vocab.label_classes["cell_type"]
    assert classes[: len(old)] == old and classes[len(old) :] == [NOVEL]  # one new class
    new = np.char.startswith(scoring.obs["true_cell_type"].astype(str).to_numpy().astype(str), NOVEL + ".")
    assert new.sum() >= 20
    pred = mapped.predict(scoring)["cell_type_pred"].astype(str).to_numpy()
    assert (pred[new] == NOVEL).mean() >= 0.9
    ref_cells = atlas[~held].copy()
    before = reference.predict(ref_cells)["cell_type_pred"].astype(str).to_numpy()
    after = mapped.predict(ref_cells)["cell_type_pred"].astype(str).to_numpy()
    assert (before == after).mean() >= 0.99
    # the new class's head rows are fitted against the reference index's cells as well as the query's: fitted on
    # the query alone they claimed 3% of the reference's cells (the head's own answer, not the default's)
    head_before = reference.predict(ref_cells, predictor="head")["cell_type_pred"].astype(str).to_numpy()
    head_after = mapped.predict(ref_cells, predictor="head")["cell_type_pred"].astype(str).to_numpy()
    assert (head_before == head_after).mean() >= 0.99
    # and the mapped reference answers that key with head + kNN vote (none of those cells changed)
    assert read_reference(tmp_path / "mapped").info["predictors"]["cell_type"] == "both"
    assert np.array_equal(mapped.get_latent_representation(ref_cells), reference.get_latent_representation(ref_cells))
