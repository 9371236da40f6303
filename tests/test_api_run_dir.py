"""AtlasVAE.fit() without a run dir trains into one temporary folder (the same on every process of a launch)
that goes with the model; save() writes what label transfer reads beside the weights, so a loaded copy
predicts as the model did."""

import gc
import json
import os
import subprocess
import tempfile

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, accelerate_launcher

from bigatlas import AtlasVAE
from bigatlas.synth import synth

TRAIN = {"max_epochs": 2, "batch_size": 64, "seed": 5}


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("api_run_dir") / "a.zarr"
    synth(path, 1100, 80, "zarr", seed=3, n_studies=3, donors_per_study=2)
    return str(path)


@pytest.fixture
def temp(tmp_path, monkeypatch):
    """Where tempfile makes folders in this test (fit()'s run dir, drop_labels' table)."""
    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_save_writes_what_label_transfer_reads_and_removes_the_temporary_run_dir(atlas, temp, tmp_path):
    dropped = [f"cell_{i}" for i in range(0, 1100, 9)]
    model = AtlasVAE(atlas, batch_key="dataset_id", label_keys=["cell_type"], drop_labels={"cell_type": dropped},
                     train=TRAIN)  # fmt: skip
    model.fit()
    scratch = model.run_dir
    assert scratch.parent == temp and (scratch / "reference" / "reference.json").exists()
    before, history = model.predict(), model.history
    assert list(history.index) == [0, 1] and np.isfinite(history[["loss", "val_loss", "kl_weight"]].to_numpy()).all()
    saved = model.save(tmp_path / "saved")
    assert not scratch.exists() and list(temp.iterdir()) == []
    assert (saved / "reference" / "reference.json").exists()
    (spec,) = model.config.data.drop_labels  # names the saved copy of the cells, which exists
    assert spec == f"cell_type={saved / 'dropped_labels' / 'cell_type.csv'}"
    assert (saved / "dropped_labels" / "cell_type.csv").exists()
    assert json.loads((saved / "config.json").read_text())["config"]["data"]["drop_labels"] == [spec]
    loaded = AtlasVAE.load(saved).predict()
    for after in (model.predict(), loaded):  # the reference's kNN vote is part of the prediction
        np.testing.assert_array_equal(after.cell_type_prob.to_numpy(), before.cell_type_prob.to_numpy())
        assert (after.cell_type_pred == before.cell_type_pred).all()
    pd.testing.assert_frame_equal(AtlasVAE.load(saved).history, history)
    (tmp_path / "kept.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    (saved / "report").mkdir()  # what `bigatlas evaluate` writes of this model
    (saved / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="holds an earlier run .*fit.overwrite=True"):  # its files stay as saved
        AtlasVAE.load(saved).fit(saved)
    np.testing.assert_array_equal(AtlasVAE.load(saved).predict().cell_type_prob.to_numpy(), before.cell_type_prob)
    again = AtlasVAE.load(saved).fit(tmp_path / "again")  # a later fit reads the saved copy of the cells
    assert again.vocab.class_counts == model.vocab.class_counts
    with pytest.raises(ValueError, match="holds another run .*: overwrite=True replaces it"):
        again.save(saved)
    assert (saved / "model.safetensors").read_bytes() == (tmp_path / "kept.safetensors").read_bytes()
    again.save(saved, overwrite=True)  # the other run's files go: none of its checkpoints or report stays
    assert not (saved / "report").exists() and not (saved / "checkpoints").exists()
    assert (saved / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


def test_the_temporary_run_dir_goes_with_the_model_the_next_fit_or_a_failed_one(atlas, temp):
    model = AtlasVAE(atlas, batch_key="dataset_id", train={**TRAIN, "max_epochs": 1}).fit()
    first = model.run_dir
    model.fit()
    assert not first.exists() and model.run_dir.exists() and model.run_dir != first
    second = model.run_dir
    model.save(second)  # saved where it is: kept
    del model
    gc.collect()
    assert (second / "model.safetensors").exists()
    model = AtlasVAE(atlas, batch_key="dataset_id", train={**TRAIN, "max_epochs": 1}).fit()
    third = model.run_dir
    del model
    gc.collect()
    assert not third.exists() and list(temp.iterdir()) == [second]
    with pytest.raises(Exception, match="no_such_label"):  # a fit that fails leaves no temporary folder
        AtlasVAE(atlas, batch_key="dataset_id", label_keys=["no_such_label"], train=TRAIN).fit()
    assert list(temp.iterdir()) == [second]
    with pytest.raises(ValueError, match="resume=True needs the run_dir"):
        AtlasVAE(atlas, batch_key="dataset_id").fit(resume=True)


SCRIPT = """
import json, os, sys, time
from pathlib import Path
from bigatlas import AtlasVAE
model = AtlasVAE(sys.argv[1], batch_key="dataset_id", train={"max_epochs": 1, "batch_size": 64})
model.fit()
if os.environ["RANK"] == "1":
    time.sleep(3)  # rank 0 reaches its end first: the folder must outlive it while rank 1 still reads it
seen = {"run_dir": str(model.run_dir), "trained": (model.run_dir / "model.safetensors").exists()}
Path(sys.argv[2], f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
"""


def test_fit_without_a_run_dir_on_two_processes_trains_one_run_in_one_temporary_folder(atlas, tmp_path):
    (tmp_path / "fit.py").write_text(SCRIPT)
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)}
    cmd = [*accelerate_launcher(2), str(tmp_path / "fit.py"), atlas, str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert len({line["run_dir"] for line in lines}) == 1 and all(line["trained"] for line in lines)
    assert lines[0]["run_dir"].startswith(str(temp))
    assert list(temp.glob("bigatlas-*")) == []  # removed when the script ended (the launcher keeps its own)


def test_the_constructor_takes_scvi_tools_setup_keywords_for_its_own(atlas):
    """labels_key, categorical_covariate_keys and unlabeled_category (scvi-tools' setup_anndata names) set the run's
    config as label_keys, covariate_keys and unlabeled_categories do; one given by both names is refused."""
    ours = AtlasVAE(atlas, batch_key="dataset_id", label_keys=["cell_type"], covariate_keys=["donor_id"],
                    unlabeled_categories=["unknown"])  # fmt: skip
    scvi = AtlasVAE(atlas, batch_key="dataset_id", labels_key="cell_type", categorical_covariate_keys=["donor_id"],
                    unlabeled_category="unknown")  # fmt: skip
    assert scvi.config == ours.config and scvi.config.data.label_keys == ("cell_type",)
    assert scvi.config.data.unlabeled_categories == ("unknown",)
    with pytest.raises(TypeError, match="label_keys or scvi-tools' labels_key, not both"):
        AtlasVAE(atlas, batch_key="dataset_id", label_keys=["cell_type"], labels_key="cell_type")
    with pytest.raises(TypeError, match="unlabeled_categories or scvi-tools' unlabeled_category"):
        AtlasVAE(atlas, batch_key="dataset_id", unlabeled_categories=["x"], unlabeled_category="unknown")


def test_train_takes_training_options_and_scvi_tools_keywords(atlas, temp):
    """fit()/train() keywords set training options for that fit: TrainConfig's names, and scvi-tools' train_size,
    early_stopping and plan_kwargs; an unknown one is refused by name before anything trains."""
    model = AtlasVAE(atlas, batch_key="dataset_id", train={**TRAIN, "reference_umap": False})
    model.train(1, batch_size=32, train_size=0.8, early_stopping=False, plan_kwargs={"lr": 1e-3, "eps": 1e-6})
    t = model.config.train
    assert (t.batch_size, t.lr, t.adam_eps, t.early_stopping_patience) == (32, 1e-3, 1e-6, 0)
    assert t.val_fraction == pytest.approx(0.2) and model.history.step.iloc[0] == -(-1100 // 32)
    with pytest.raises(TypeError, match="unknown training option.s. batch_szie"):
        model.fit(batch_szie=32)
    with pytest.raises(TypeError, match="plan_kwargs 'lr_scheduler'"):
        model.train(plan_kwargs={"lr_scheduler": "plateau"})


def test_a_run_and_an_embedding_given_a_relative_path_reopen_their_data_from_any_working_directory(
    atlas, tmp_path, monkeypatch
):
    import argparse

    from bigatlas.embedding import open_embedded
    from bigatlas.flags import add_train_arguments, config_from_args
    from bigatlas.rundir import RunDir

    folder, name = os.path.split(atlas)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(folder)
    model = AtlasVAE(name, batch_key="dataset_id", train={**TRAIN, "reference_cells": 0})
    model.fit(tmp_path / "run")
    before = model.get_latent_representation()
    config = tmp_path / "run" / "config.json"
    saved = json.loads(config.read_text())
    assert saved["config"]["data"]["data"] == atlas  # recorded absolute, though given relative
    cli = argparse.ArgumentParser()
    add_train_arguments(cli)
    for data, recorded in (
        ([name], atlas),
        ([name, name], [atlas, atlas]),
        (["census:stable"], "census:stable/homo_sapiens"),
    ):
        a = cli.parse_args(["--data", *data, "--batch-key", "dataset_id", "--out", "o"])
        assert json.loads(json.dumps(config_from_args(a).to_dict()))["data"]["data"] == recorded  # config.json
    model.embed(name, tmp_path / "emb.zarr")
    monkeypatch.chdir(elsewhere)
    np.testing.assert_array_equal(AtlasVAE.load(tmp_path / "run").get_latent_representation(), before)
    assert open_embedded(tmp_path / "emb.zarr")[1].n_obs == len(before)  # what `evaluate` reopens

    saved["config"]["data"]["data"] = name  # a run dir written before paths were recorded absolute
    config.write_text(json.dumps(saved))
    with pytest.raises(
        FileNotFoundError, match=f"'{name}' \\(recorded in .*config.json\\), is not there from .*elsewhere"
    ):
        AtlasVAE.load(tmp_path / "run").get_latent_representation()
    with pytest.raises(ValueError, match=r"differs from this run's settings \(data.data\)"):
        RunDir(tmp_path / "run").check_resumable(model.config)  # from here, its relative path is other data
    monkeypatch.chdir(folder)
    RunDir(tmp_path / "run").check_resumable(model.config)  # where it ran, it resumes as the same data
    np.testing.assert_array_equal(AtlasVAE.load(tmp_path / "run").get_latent_representation(), before)
