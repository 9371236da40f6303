"""Training: resume after SIGKILL equals an uninterrupted run, 2-process runs agree with the partition,
the model learns an integrated latent space, and bad launches fail loudly."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import accelerate_launcher, run_script
from safetensors.numpy import load_file

from bigatlas.batches import holdout_mask
from bigatlas.reference import read_reference
from bigatlas.reference_build import build_reference
from bigatlas.synth import synth


@pytest.fixture(scope="module")
def small_atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "small.zarr"
    synth(path, 2400, 120, "zarr", seed=1, n_studies=3, donors_per_study=2)
    return str(path)


def run_train(args, env_extra=None, launcher=(), check=True):
    return run_script("train.py", args, env_extra, launcher, check)


def base_args(data, out, epochs=2):
    return [
        "--data",
        data,
        "--batch-key",
        "donor_id",
        "--label-keys",
        "cell_type",
        "--out",
        str(out),
        "--max-epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--checkpoint-every-steps",
        "7",
    ]


def weights(run):
    return load_file(str(Path(run) / "model.safetensors"))


@pytest.mark.parametrize("fault", ["after_step:40", "checkpoint_written:35"])
def test_resume_after_sigkill_is_bit_identical(small_atlas, tmp_path, fault):
    ref = tmp_path / "ref"
    run_train(base_args(small_atlas, ref))
    cut = tmp_path / "cut"
    res = run_train(base_args(small_atlas, cut), {"BIGATLAS_FAULT": fault}, check=False)
    assert res.returncode == -9, res.stderr[-2000:]
    assert not (cut / "model.safetensors").exists()
    latest = (cut / "checkpoints" / "latest").read_text().strip()
    latest_step, step = int(latest.split("-")[1]), int(fault.split(":")[1])
    if fault.startswith("checkpoint_written"):  # killed while writing: that checkpoint is never 'latest'
        assert (cut / "checkpoints" / f".tmp-step-{step:09d}").is_dir() and latest_step < step
    else:
        assert latest_step <= step
    resumed = run_train([*base_args(small_atlas, cut), "--resume"])
    assert f"resumed from {latest}" in resumed.stdout
    a, b = weights(ref), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert read_reference(ref).id == read_reference(cut).id  # the resumed run's reference index is the same
    rows_ref = (ref / "metrics.csv").read_text().splitlines()
    rows_cut = (cut / "metrics.csv").read_text().splitlines()
    assert len(rows_ref) == len(rows_cut) == 3


def test_resume_with_other_settings_is_refused(small_atlas, tmp_path):
    run = tmp_path / "r"
    run_train(base_args(small_atlas, run, epochs=1))
    res = run_train([*base_args(small_atlas, run, epochs=1), "--lr", "0.5", "--resume"], check=False)
    assert res.returncode == 2 and "differs from this run's settings (train.lr)" in res.stderr


def test_two_processes_partition_the_cells_and_agree(small_atlas, tmp_path):
    run = tmp_path / "ddp"
    run_train([*base_args(small_atlas, run), "--trace-cells"], launcher=accelerate_launcher(2))
    n = 2400
    train_cells = np.flatnonzero(~holdout_mask(np.arange(n), 0.05, 0))
    for epoch in range(2):
        parts = [np.load(run / "trace" / f"rank{r}_epoch{epoch}.npy") for r in range(2)]
        assert len(parts[0]) > 0 and len(parts[1]) > 0
        assert len(np.intersect1d(parts[0], parts[1])) == 0
        assert np.array_equal(np.sort(np.concatenate(parts)), train_cells)
    p0, p1 = (np.load(run / "trace" / f"rank{r}_params.npy") for r in range(2))
    assert np.array_equal(p0, p1)
    written = read_reference(run)  # built once, on the main process, from the final weights
    build_reference(run, umap=False, log=lambda *_: None)
    assert written is not None and read_reference(run).id == written.id
    one = tmp_path / "one"
    run_train([*base_args(small_atlas, one), "--trace-cells"])
    single = np.load(one / "trace" / "rank0_epoch0.npy")
    assert np.array_equal(np.sort(single), train_cells)


def test_world_size_mismatch_is_an_error(monkeypatch):
    from bigatlas.train import check_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="started 1 process"):
        check_world(1)
    check_world(2)


def test_learns_an_integrated_latent_space(tmp_path):
    import anndata as ad

    from bigatlas import AtlasVAE
    from bigatlas.metrics import embedding_scores, log1p_normalized, pca

    data = tmp_path / "atlas.zarr"
    synth(data, 6000, 300, "zarr", seed=2)
    model = AtlasVAE.setup(
        str(data),
        batch_key="dataset_id",
        covariate_keys=["donor_id"],
        label_keys=["cell_type"],
        train={"max_epochs": 40},
    ).fit(tmp_path / "run")
    adata = ad.read_zarr(data)
    truth = adata.obs.true_cell_type.cat.codes.to_numpy()
    z = model.get_latent()
    assert z.shape == (6000, 10) and np.isfinite(z).all()
    base_emb = pca(log1p_normalized(adata.X.toarray()), 10)
    for key in ("donor_id", "dataset_id"):  # donors within studies, and the strong study effect
        batches = adata.obs[key].cat.codes.to_numpy()
        vae, base = embedding_scores(z, truth, batches), embedding_scores(base_emb, truth, batches)
        assert vae["knn_label_accuracy"] > base["knn_label_accuracy"] + 0.05, (key, vae, base)
        assert vae["batch_mixing"] > base["batch_mixing"] + 0.1, (key, vae, base)
    pred = model.predict_labels()["cell_type"]
    val = holdout_mask(np.arange(6000), 0.05, 0)
    labelled = (adata.obs.cell_type.astype(str) != "undefined").to_numpy()
    held = val & labelled
    acc = (pred["label"][held] == adata.obs.cell_type.astype(str).to_numpy()[held]).mean()
    assert acc >= 0.9, acc
    assert np.allclose(pred["probabilities"].sum(1), 1, atol=1e-5)
    loaded = AtlasVAE.load(tmp_path / "run")
    assert np.array_equal(loaded.get_latent(), z)
    assert (tmp_path / "run" / "loss_curves.png").exists()
    assert json.loads((tmp_path / "run" / "vocab.json").read_text())["genes"][0].startswith("ENSSYN")
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 41 and "val_loss" in rows[0]
