"""AnnData-native use: an AnnData in memory, a backed one and an .h5ad train and embed exactly as their
Zarr copy does (same seed, same results); `-m bigatlas.train` runs from outside the checkout on two
processes and covers every cell once; the README's notebook example runs."""

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import ROOT, accelerate_launcher

from bigatlas import AtlasVAE
from bigatlas.batches import holdout_mask
from bigatlas.synth import synth

N = 1100  # small enough that every store's default block is the same (so is the epoch plan)


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("anndata")
    synth(root / "a.zarr", N, 80, "zarr", seed=3, n_studies=3, donors_per_study=2)
    adata = ad.read_zarr(root / "a.zarr")
    adata.write_h5ad(root / "a.h5ad")
    return {
        "zarr": str(root / "a.zarr"),
        "memory": adata,
        "h5ad": str(root / "a.h5ad"),
        "backed": ad.read_h5ad(root / "a.h5ad", backed="r"),
    }


def fit(data, run):
    return AtlasVAE(
        data, batch_key="dataset_id", covariate_keys=["donor_id"], label_keys=["cell_type"],
        train={"max_epochs": 2, "batch_size": 64, "seed": 5},
    ).fit(run)  # fmt: skip


def test_anndata_trains_and_embeds_like_its_zarr_copy(copies, tmp_path):
    ref = fit(copies["zarr"], tmp_path / "zarr")
    z_ref = ref.get_latent_representation()
    emb_ref = zarr.open_group(str(ref.embed(copies["zarr"], tmp_path / "zarr.emb", progress=False)))
    for name in ("memory", "h5ad", "backed"):
        model = fit(copies[name], tmp_path / name)
        z = model.get_latent_representation()
        assert np.array_equal(z, z_ref), name  # same cells, same plan, same seed: the same model
        assert np.array_equal(model.get_latent_representation(copies["zarr"]), z_ref), name
        emb = zarr.open_group(str(model.embed(copies[name], tmp_path / f"{name}.emb", progress=False)))
        assert np.array_equal(emb["obsm/X_bigatlas"][:], emb_ref["obsm/X_bigatlas"][:]), name
        assert np.array_equal(emb["obs/_index"][:], emb_ref["obs/_index"][:]), name
    assert "in memory" in AtlasVAE.load(tmp_path / "memory").config.data.data


def test_results_come_back_in_the_anndatas_order(copies, tmp_path):
    adata = copies["memory"]
    model = fit(adata, tmp_path / "run")
    shuffled = adata[np.random.default_rng(0).permutation(N)].copy()  # another order of the same cells
    z = model.get_latent_representation()
    assert np.allclose(model.get_latent_representation(shuffled), z[shuffled.obs_names.map(adata.obs_names.get_loc)])
    torch.manual_seed(0)
    draws = np.stack([model.get_latent_representation(give_mean=False) for _ in range(16)])  # one per cell a call
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[0], z)
    one, averaged = (np.sqrt(np.mean((d - z) ** 2)) for d in (draws[0], draws.mean(0)))
    assert averaged < 0.35 * one  # draws around the mean: 16 of them average to it at about a quarter the spread
    mean, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(mean, z)
    assert 0.8 < draws.var(0, ddof=1).mean() / var.mean() < 1.25  # variances (not scales) of what give_mean draws
    pred = model.predict(shuffled)
    assert list(pred.index) == list(shuffled.obs_names)
    cols = ["pred", "prob", "uncertainty", "unknown", "pred_filtered"]
    assert list(pred.columns) == [f"cell_type_{c}" for c in cols]
    assert list(pred.cell_type_pred.cat.categories) == list(model.vocab.label_classes["cell_type"])
    assert np.array_equal(pred.cell_type_unknown, pred.cell_type_uncertainty > 0.5)
    shown = repr(model)  # what print(model) tells: data, keys, classes, size, epochs, run dir
    classes = len(model.vocab.label_classes["cell_type"])
    for part in ("in memory", "dataset_id (", "donor_id (", f"cell_type ({classes} classes)", "-d latent, 2 epochs"):
        assert part in shown, shown
    assert str(tmp_path / "run") in shown and "not trained" in repr(AtlasVAE(adata, batch_key="dataset_id"))
    soft = model.predict(shuffled, soft=True)  # the probabilities behind the call: its class is the largest one
    assert list(soft.columns) == list(model.vocab.label_classes["cell_type"]) and list(soft.index) == list(pred.index)
    assert (soft.idxmax(1) == pred.cell_type_pred.astype(str)).all()
    np.testing.assert_allclose(soft.max(1), pred.cell_type_prob, rtol=1e-6)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    z_pred = model.predict(adata).loc[shuffled.obs_names]  # kNN votes of a cell do not depend on the others
    assert z_pred.astype(str).equals(pred.astype(str))
    expr = model.get_normalized_expression(shuffled, obs_filter="dataset_id == 'study_1'", library_size=1.0)
    in_study = shuffled.obs_names[shuffled.obs.dataset_id == "study_1"]
    assert list(expr.index) == list(in_study) and list(expr.columns) == list(model.vocab.genes)
    assert np.allclose(expr.sum(1), 1.0, atol=1e-4)  # fractions of a common library size
    some = np.random.default_rng(1).choice(N, 50, replace=False)  # indices= (scvi-tools'): those cells, that order
    assert np.allclose(model.get_latent_representation(indices=some), z[some])
    mask = np.zeros(N, bool)
    mask[some] = True
    assert np.allclose(model.get_latent_representation(adata, mask), z[np.sort(some)])
    assert list(model.predict(adata, some).index) == list(adata.obs_names[some])
    np.testing.assert_allclose(model.get_normalized_expression(shuffled, some).to_numpy(),
                               model.get_normalized_expression(shuffled).to_numpy()[some], rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="indices= selects cells of an AnnData.*obs_filter"):
        model.get_latent_representation(copies["zarr"], indices=some)
    as_1 = model.get_normalized_expression(shuffled, transform_batch="study_1")  # covariates stay each cell's own
    assert np.allclose(as_1.loc[in_study], model.get_normalized_expression(shuffled).loc[in_study], rtol=1e-5)
    old = AtlasVAE.load(tmp_path / "run")
    with pytest.raises(ValueError, match=r"trained on an AnnData .* AtlasVAE.load\(run_dir, adata="):
        old.get_latent_representation()
    assert np.array_equal(old.get_latent_representation(adata), z)
    assert np.array_equal(AtlasVAE.load(tmp_path / "run", adata=shuffled).predict().index, shuffled.obs_names)
    refit = AtlasVAE.load(tmp_path / "run", adata=shuffled[:300].copy()).fit(tmp_path / "refit", max_epochs=1)
    assert "(300 cells x" in refit.config.data.data  # trained on the data given to load(), not the run's


def test_module_entry_point_trains_on_two_processes_from_outside_the_checkout(copies, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "PYTHONPATH")}
    args = ["--data", copies["h5ad"], "--batch-key", "dataset_id", "--out", "run", "--max-epochs", "2",
            "--batch-size", "64", "--trace-cells"]  # fmt: skip
    res = subprocess.run([*accelerate_launcher(2), "-m", "bigatlas.train", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    train_cells = np.flatnonzero(~holdout_mask(np.arange(N), 0.05, 0))
    for epoch in range(2):
        parts = [np.load(tmp_path / "run" / "trace" / f"rank{r}_epoch{epoch}.npy") for r in range(2)]
        assert len(np.intersect1d(*parts)) == 0
        assert np.array_equal(np.sort(np.concatenate(parts)), train_cells)
    embed = ["embed", "--run", "run", "--data", copies["h5ad"], "--out", "e.zarr", "--chunk-size", "300"]
    res = subprocess.run([*accelerate_launcher(2), "-m", "bigatlas", *embed], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert zarr.open_group(str(tmp_path / "e.zarr")).attrs["bigatlas"]["complete"]


def test_readme_notebook_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- notebook-example -->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    adata = ns["adata"]
    k = ns["model"].config.model.n_latent
    assert adata.obsm["X_bigatlas"].shape == (3000, k)
    labelled = adata.obs.cell_type.astype(str) != "undefined"
    acc = (adata.obs.cell_type_pred.astype(str) == adata.obs.cell_type.astype(str))[labelled].mean()
    assert acc > 0.8, acc
    assert ns["expr"].shape == (3000, 300) and np.allclose(ns["expr"].sum(1), 1e4, rtol=1e-3)
    assert ns["query_latent"].shape == ((adata.obs.dataset_id == "study_1").sum(), k)
    assert Path("run/model.safetensors").exists()
    # a reference trained with label keys averages its weights over longer than other runs (config.TrainConfig)
    assert json.loads(Path("run/config.json").read_text())["config"]["train"]["ema_decay"] == 0.9997


def test_a_model_without_label_keys_keeps_its_16_latent_dimensions_through_embedding_and_mapping(copies, tmp_path):
    """The unlabelled default size reaches config.json, the latent, the embedding on disk and a query model
    mapped onto it (whose config then names the size, so the surgery's model matches its reference)."""
    import json

    adata = copies["memory"]
    model = AtlasVAE(adata, batch_key="dataset_id", train={"max_epochs": 1, "batch_size": 64, "seed": 5}).fit(
        tmp_path / "run"
    )
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    # a run without label keys averages as 0.999 does at 128 cells a step: at 64, over as many cells
    assert saved["train"]["ema_decay"] == round(0.999**0.5, 6)
    saved = saved["model"]
    assert saved["n_latent"] == 16 and model.module.n_latent == 16 and not model.vocab.label_classes
    assert model.get_latent_representation().shape == (N, 16)
    with pytest.raises(ValueError, match="trained without label keys: it has no labels to predict"):
        model.predict()  # not an empty table
    emb = zarr.open_group(str(model.embed(copies["zarr"], tmp_path / "e.zarr", progress=False)))
    assert emb["obsm/X_bigatlas"].shape == (N, 16)
    query = adata[adata.obs.dataset_id == "study_1"].copy()
    query.obs["dataset_id"] = query.obs["dataset_id"].cat.rename_categories({"study_1": "new_study"})
    with pytest.raises(TypeError, match=r"map_query\(\): unknown option\(s\) epoch \(have: batch_size, epochs, "):
        model.map_query(query, tmp_path / "mapped", epoch=2)
    mapped = model.map_query(query, tmp_path / "mapped", max_epochs=2)  # fit()'s and scvi-tools' name for epochs
    assert mapped.module.n_latent == 16 and mapped.get_latent_representation(query).shape == (query.n_obs, 16)
    assert mapped.config.train.max_epochs == 2


def test_load_query_data_maps_zero_shot_until_train_runs_the_same_surgery_as_map_query(copies, tmp_path):
    """scvi-tools' query flow: prepare_query_anndata checks the genes and leaves the AnnData as it is (refusing
    one that shares too few); load_query_data's model reads the query as the reference does until train(),
    which runs map_query's surgery (the same weights as map_query, the query's new study in the vocab) into a
    temporary folder; a weight decay, or an option the surgery has no use for, is refused."""
    adata = copies["memory"]
    train = {"max_epochs": 1, "batch_size": 64, "seed": 5}
    reference = adata[adata.obs.dataset_id != "study_1"].copy()
    model = AtlasVAE(reference, batch_key="dataset_id", label_keys=["cell_type"], train=train)
    model.fit(tmp_path / "run")
    query = adata[adata.obs.dataset_id == "study_1"].copy()
    query.obs["dataset_id"] = query.obs["dataset_id"].cat.rename_categories({"study_1": "new_study"})
    assert AtlasVAE.prepare_query_anndata(query, model) is None
    assert AtlasVAE.prepare_query_anndata(query, tmp_path / "run", inplace=False) is query
    genes = AtlasVAE.prepare_query_anndata(query, model, return_reference_var_names=True)
    assert list(genes) == model.vocab.genes
    with pytest.raises(ValueError, match="shares 30 of the model's 80 genes"):
        AtlasVAE.prepare_query_anndata(query[:, :30].copy(), model)

    mapping = AtlasVAE.load_query_data(query, tmp_path / "run")  # a run dir, or the model itself
    assert "train() runs the surgery" in repr(mapping)
    np.testing.assert_array_equal(mapping.get_latent_representation(), model.get_latent_representation(query))
    with pytest.raises(ValueError, match="weight_decay 0"):
        mapping.train(max_epochs=1, plan_kwargs={"weight_decay": 1e-3})
    with pytest.raises(TypeError, match="not early_stopping_patience"):
        mapping.train(max_epochs=1, early_stopping=False)
    mapping.train(max_epochs=1, plan_kwargs={"weight_decay": 0.0})
    assert mapping.vocab.batch_categories["dataset_id"][-1] == "new_study" and "surgery" not in repr(mapping)
    mapped = model.map_query(query, tmp_path / "mapped", epochs=1)
    ours, theirs = mapping.module.state_dict(), mapped.module.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)
    pd.testing.assert_frame_equal(mapping.predict(), mapped.predict(query))
    assert mapping.run_dir.parent == Path(tempfile.gettempdir()) and mapping.run_dir.exists()


def test_save_anndata_keeps_the_anndata_that_load_then_reads(copies, tmp_path):
    """scvi-tools' save(save_anndata=True): the AnnData goes beside the weights (a backed one copied from its file)
    and load() without adata reads it; a model given a path has nothing to save (refused before anything is
    written), and a save over the folder without it removes the old copy with the other run's files."""
    train = {"max_epochs": 1, "batch_size": 64, "seed": 5}
    model = AtlasVAE(copies["memory"], batch_key="dataset_id", train=train)
    assert not model.is_trained and model.adata is copies["memory"]
    model.fit(tmp_path / "run")
    assert model.is_trained
    with pytest.raises(ValueError, match="trained on an AnnData"):
        AtlasVAE.load(tmp_path / "run").get_latent_representation()  # nothing to read without it
    model.save(tmp_path / "kept", save_anndata=True)
    loaded = AtlasVAE.load(tmp_path / "kept")
    assert loaded.adata.n_obs == N and (loaded.adata.obs_names == copies["memory"].obs_names).all()
    z = model.get_latent_representation()
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    np.testing.assert_allclose(
        loaded.get_latent_representation(indices=[5, 2]), z[[5, 2]], atol=1e-5
    )  # 2 cells a batch
    picked = loaded.get_latent_representation(copies["backed"], indices=[5, 2])  # a backed AnnData's: read
    np.testing.assert_allclose(picked, z[[5, 2]], atol=1e-5)

    backed = AtlasVAE(copies["backed"], batch_key="dataset_id", train=train).fit(tmp_path / "b")
    backed.save(tmp_path / "b", save_anndata=True)  # its own folder: the file beside it
    assert (tmp_path / "b" / "adata.h5ad").read_bytes() == Path(copies["h5ad"]).read_bytes()
    np.testing.assert_array_equal(AtlasVAE.load(tmp_path / "b").get_latent_representation(), z)

    on_path = AtlasVAE(copies["zarr"], batch_key="dataset_id", train=train).fit(tmp_path / "p")
    with pytest.raises(ValueError, match=r"it was given .*a\.zarr, which the run records"):
        on_path.save(tmp_path / "p2", save_anndata=True)
    assert not (tmp_path / "p2").exists()
    on_path.save(tmp_path / "kept", overwrite=True)
    assert not (tmp_path / "kept" / "adata.h5ad").exists()


def test_review_labels_reviews_the_labelled_cells_of_an_anndata_in_its_order(copies, tmp_path, monkeypatch):
    """review_labels() = label_review.review of the latent's labelled cells, indexed by their names (the
    'undefined' ones left out); a missing column is named."""

    from bigatlas.label_review import review

    adata = copies["memory"].copy()
    model = AtlasVAE(adata, batch_key="dataset_id", train={"max_epochs": 1, "batch_size": 64, "seed": 5})
    model.fit(tmp_path / "run")
    adata.obs["annotation"] = adata.obs.cell_type.astype(str)
    adata.obs.loc[adata.obs_names[::7], "annotation"] = "undefined"
    table = model.review_labels("annotation", adata, min_agreement=0.5)
    keep = (adata.obs.annotation != "undefined").to_numpy()
    assert list(table.index) == list(adata.obs_names[keep])
    expected = review(model.get_latent_representation(adata)[keep], pd.Categorical(adata.obs.annotation[keep]),
                      min_agreement=0.5)  # fmt: skip
    assert (table.label.astype(str).to_numpy() == adata.obs.annotation[keep].to_numpy()).all()
    np.testing.assert_array_equal(table.agreement.to_numpy(), expected.agreement.to_numpy())
    assert (table.flagged.to_numpy() == expected.flagged.to_numpy()).all()
    assert (table.agreement[table.flagged] < 0.5).all()
    with pytest.raises(Exception, match="no_such_column"):
        model.review_labels("no_such_column", adata)

    # trained without the flagged labels (drop_labels), found by row where the cell names repeat
    assert (table.row.to_numpy() == np.flatnonzero(keep)).all()
    adata.obs_names = [f"AAAC-{i % 50}" for i in range(adata.n_obs)]
    table = model.review_labels("annotation", adata, min_agreement=0.5)
    flagged = table[table.flagged]
    assert len(flagged) > 20 and not flagged.index.is_unique
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))  # where drop_labels writes the table
    (tmp_path / "temp").mkdir()
    dropped = AtlasVAE(adata, batch_key="dataset_id", label_keys=["annotation"], drop_labels={"annotation": flagged},
                       train={"max_epochs": 1, "batch_size": 64, "seed": 5})  # fmt: skip
    assert len(list((tmp_path / "temp").glob("bigatlas-drop-*/annotation.csv"))) == 1
    dropped.fit(tmp_path / "dropped")
    given = pd.Categorical(adata.obs.annotation.where(adata.obs.annotation != "undefined"))
    trained = ~holdout_mask(np.arange(adata.n_obs), 0.05, 5) & ~np.isin(np.arange(adata.n_obs), flagged.row)
    codes = np.asarray(given.codes)
    expected = np.bincount(codes[trained & (codes >= 0)], minlength=len(given.categories))
    assert dropped.vocab.class_counts["annotation"] == expected.tolist()
    assert dropped.vocab.label_classes["annotation"] == list(given.categories)
    # the table went to a temporary file for the fit; after it the model names the run's copy, which a second
    # fit reads, and the temporary file is gone
    (spec,) = dropped.config.data.drop_labels
    assert spec == f"annotation={tmp_path / 'dropped' / 'dropped_labels' / 'annotation.csv'}"
    assert not list((tmp_path / "temp").iterdir())
    again = dropped.fit(tmp_path / "again")
    assert again.vocab.class_counts["annotation"] == expected.tolist()


def test_normalized_x_names_the_layers_and_allow_non_integer_holds_from_training_to_embedding(copies, tmp_path):
    """The usual mistake, X normalized and the counts in a layer: refused before any output, naming the other
    layers; `allow_non_integer=True` trains on it, and the model then reads such values in every later call."""
    adata = copies["memory"].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.raw = adata
    lib = np.asarray(adata.X.sum(1)).ravel()
    adata.X = (adata.X.multiply(1e4 / np.maximum(lib, 1)[:, None])).tocsr()
    train = {"max_epochs": 1, "batch_size": 64, "seed": 5}
    with pytest.raises(ValueError, match=r"non-integer value .*allow_non_integer=True.*also has raw, counts"):
        AtlasVAE(adata, batch_key="dataset_id", train=train).fit(tmp_path / "refused")
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    counts = AtlasVAE(adata, batch_key="dataset_id", layer="counts", train=train).fit(tmp_path / "counts")
    assert np.isfinite(counts.get_latent_representation()).all()
    model = AtlasVAE(adata, batch_key="dataset_id", allow_non_integer=True, train=train).fit(tmp_path / "norm")
    z = model.get_latent_representation()
    assert np.isfinite(z).all() and len(z) == adata.n_obs
    emb = zarr.open_group(str(model.embed(adata, tmp_path / "norm.emb", progress=False)))
    assert np.allclose(emb["obsm/X_bigatlas"][:], z, atol=1e-5)


def test_a_query_with_its_counts_in_another_matrix_is_read_with_layer(copies, tmp_path):
    """X normalized and the counts in a layer, on a model trained on X: refused, naming `layer=` and the layer;
    `layer=` gives every reader, embed and map-query the counts, read as the same cells with counts in X
    are; and a model trained on a layer reads a query's X with layer="X"."""
    adata = copies["memory"].copy()
    train = {"max_epochs": 1, "batch_size": 64, "seed": 5}
    model = AtlasVAE(adata, batch_key="dataset_id", train=train).fit(tmp_path / "run")
    z = model.get_latent_representation(adata)
    query = adata.copy()
    query.layers["umi"] = query.X.copy()
    lib = np.asarray(query.X.sum(1)).ravel()
    query.X = query.X.multiply(1e4 / np.maximum(lib, 1)[:, None]).tocsr()
    with pytest.raises(ValueError, match=r"non-integer value .*layer=.*also has umi"):
        model.get_latent_representation(query)
    np.testing.assert_array_equal(model.get_latent_representation(query, layer="umi"), z)
    np.testing.assert_array_equal(model.get_latent(query, layer="umi"), z)
    expr = model.get_normalized_expression(adata)
    pd.testing.assert_frame_equal(model.get_normalized_expression(query, layer="umi"), expr)
    emb = zarr.open_group(str(model.embed(query, tmp_path / "q.emb", layer="umi", progress=False)))
    np.testing.assert_allclose(emb["obsm/X_bigatlas"][:], z, atol=1e-5)
    model.embed(query, tmp_path / "q.emb", layer="umi", progress=False)  # complete: the same settings
    with pytest.raises(ValueError, match="other settings"):  # another matrix is not the same output
        model.embed(query, tmp_path / "q.emb", progress=False)
    mapped = model.map_query(query, tmp_path / "mapped", layer="umi", epochs=1)
    assert mapped.config.data.layer == "umi"
    assert np.isfinite(mapped.get_latent_representation(query)).all()  # the mapped run reads its query's layer

    in_layer = adata.copy()
    in_layer.layers["counts"] = in_layer.X.copy()
    in_layer.X = query.X
    on_layer = AtlasVAE(in_layer, batch_key="dataset_id", layer="counts", train=train).fit(tmp_path / "on_layer")
    np.testing.assert_array_equal(
        on_layer.get_latent_representation(adata, layer="X"), on_layer.get_latent_representation()
    )


def test_a_model_trained_on_counts_reads_non_integer_values_only_when_a_call_allows_them(copies, tmp_path):
    """Ambient-corrected values (not whole) on a model trained on counts: every reader refuses them, naming
    allow_non_integer=True; with it, each reads them as embed(allow_non_integer=True) does, and the next call
    without it refuses again (a call's switch is not the model's)."""
    adata = copies["memory"].copy()
    model = AtlasVAE(adata, batch_key="dataset_id", label_keys=["cell_type"],
                     train={"max_epochs": 1, "batch_size": 64, "seed": 5})  # fmt: skip
    model.fit(tmp_path / "run")
    corrected = adata.copy()
    corrected.X = (corrected.X * 0.9).tocsr()
    readers = {
        "latent": lambda **kw: model.get_latent_representation(corrected, **kw),
        "get_latent": lambda **kw: model.get_latent(corrected, **kw),
        "normalized": lambda **kw: model.get_normalized_expression(corrected, **kw).to_numpy(),
        "reconstructed": lambda **kw: model.get_reconstructed_expression(corrected, **kw),
        "predict_labels": lambda **kw: model.predict_labels(corrected, **kw),
    }
    for name, read in readers.items():
        with pytest.raises(ValueError, match=r"non-integer value .*allow_non_integer=True"):
            read()
        assert read(allow_non_integer=True) is not None, name
    with pytest.raises(ValueError, match="non-integer value"):
        model.get_latent_representation(corrected)  # the switch held for its call only
    z = model.get_latent_representation(corrected, allow_non_integer=True)
    assert not np.allclose(z, model.get_latent_representation(adata), atol=1e-3)  # read as they are, not rounded
    emb = zarr.open_group(str(model.embed(corrected, tmp_path / "c.emb", allow_non_integer=True, progress=False)))
    np.testing.assert_allclose(emb["obsm/X_bigatlas"][:], z, atol=1e-5)


def test_transform_batch_decodes_every_cell_as_the_named_batch(copies, tmp_path):
    """get_normalized_expression(transform_batch=): a cell of that batch is unchanged, the others move; a query
    from a batch the model has not seen is decoded as if it carried the named one (no map_query); a list
    averages; a name the model does not know is refused."""
    adata = copies["memory"]
    ref = adata[adata.obs.dataset_id != "study_2"].copy()
    model = AtlasVAE(ref, batch_key="dataset_id", train={"max_epochs": 1, "batch_size": 64, "seed": 5})
    model.fit(tmp_path / "run")
    own = model.get_normalized_expression(ref).to_numpy()
    as_0 = model.get_normalized_expression(ref, transform_batch="study_0").to_numpy()
    in_0 = (ref.obs.dataset_id == "study_0").to_numpy()
    np.testing.assert_allclose(as_0[in_0], own[in_0], rtol=1e-5)
    assert np.abs(np.log(as_0[~in_0] / own[~in_0])).mean() > 0.01  # the other study's effect is taken out
    as_1 = model.get_normalized_expression(ref, transform_batch="study_1").to_numpy()
    both = model.get_normalized_expression(ref, transform_batch=["study_0", "study_1"]).to_numpy()
    np.testing.assert_allclose(both, (as_0 + as_1) / 2, rtol=1e-5)
    genes = [model.vocab.genes[i] for i in (7, 2, 30)]  # gene_list: those columns, in its order
    some = model.get_normalized_expression(ref, transform_batch="study_0", gene_list=genes)
    assert list(some.columns) == genes
    np.testing.assert_allclose(some.to_numpy(), as_0[:, [7, 2, 30]], rtol=1e-6)
    full = model.get_reconstructed_expression(ref)
    np.testing.assert_allclose(model.get_reconstructed_expression(ref, gene_list=genes[0]), full[:, [7]], rtol=1e-6)
    with pytest.raises(ValueError, match="gene_list: not_a_gene not among the model's"):
        model.get_normalized_expression(ref, gene_list=[genes[0], "not_a_gene"])
    named = [model.vocab.gene_names[i] for i in (7, 2, 30)]  # the training data's feature names (symbols)
    assert named != genes
    by_name = model.get_normalized_expression(ref, transform_batch="study_0", gene_list=named)
    assert list(by_name.columns) == named
    np.testing.assert_allclose(by_name.to_numpy(), some.to_numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=f"{named[0].lower()} not among the model's .*did you mean {named[0]!r}"):
        model.get_normalized_expression(ref, gene_list=[named[0].lower()])

    query = adata[adata.obs.dataset_id == "study_2"].copy()
    with pytest.raises(ValueError, match="categories the model was not trained on"):
        model.get_normalized_expression(query)
    relabelled = query.copy()
    relabelled.obs["dataset_id"] = "study_0"
    expr = model.get_normalized_expression(query, transform_batch="study_0")
    assert list(expr.index) == list(query.obs_names)
    np.testing.assert_allclose(expr.to_numpy(), model.get_normalized_expression(relabelled).to_numpy(), rtol=1e-5)
    counts = model.get_reconstructed_expression(query, transform_batch="study_0")
    np.testing.assert_allclose(counts.sum(1), np.asarray(query.X.sum(1)).ravel(), rtol=1e-4)  # observed totals
    with pytest.raises(ValueError, match=r"\['study_9'\].*not a 'dataset_id' the model was trained on"):
        model.get_normalized_expression(ref, transform_batch="study_9")

    # n_samples (scvi-tools'): the average over posterior draws, which settles on the mean's decoding as they grow
    np.testing.assert_array_equal(model.get_normalized_expression(ref, return_numpy=True, n_samples=1), own)
    torch.manual_seed(0)
    few = [model.get_normalized_expression(ref, n_samples=2, return_numpy=True) for _ in range(2)]
    many = [model.get_normalized_expression(ref, n_samples=32, return_numpy=True) for _ in range(2)]
    np.testing.assert_allclose(many[0].sum(1), 1.0, rtol=1e-5)
    spread = [np.abs(np.log(a / b)).mean() for a, b in (few, many)]
    assert 0 < spread[1] < 0.4 * spread[0]  # 16 times the draws: a quarter of the spread
    with pytest.raises(ValueError, match="n_samples must be at least 1"):
        model.get_normalized_expression(ref, n_samples=0)


def test_transform_batch_takes_the_batch_column_own_values(copies, tmp_path):
    """A batch column of integers is named by its integers (transform_batch=1, a numpy one, a list of them), as by
    their text."""
    adata = copies["memory"][::4].copy()
    adata.obs["study"] = adata.obs.dataset_id.cat.codes.astype(np.int64)
    model = AtlasVAE(adata, batch_key="study", train={"max_epochs": 1, "batch_size": 64, "seed": 5})
    model.fit(tmp_path / "run")
    as_text = model.get_normalized_expression(adata, transform_batch="1").to_numpy()
    np.testing.assert_array_equal(model.get_normalized_expression(adata, transform_batch=1).to_numpy(), as_text)
    np.testing.assert_array_equal(
        model.get_normalized_expression(adata, transform_batch=np.int64(1)).to_numpy(), as_text
    )
    both = model.get_normalized_expression(adata, transform_batch=[0, 1]).to_numpy()
    np.testing.assert_array_equal(both, model.get_normalized_expression(adata, transform_batch=["0", "1"]).to_numpy())


def test_a_lazy_anndata_trains_and_reads_as_the_same_cells_in_memory(copies, tmp_path):
    """anndata.experimental.read_lazy (X a dask array, obs and var xarray-backed): read in row slices, it trains
    the same model as the AnnData in memory, to the last bit, and every reader gives the same values."""
    lazy = ad.experimental.read_lazy(copies["zarr"])
    memory = copies["memory"]
    kw = dict(batch_key="dataset_id", label_keys=["cell_type"], train={"max_epochs": 1, "batch_size": 64, "seed": 5})
    on_lazy = AtlasVAE(lazy, **kw).fit(tmp_path / "lazy")
    on_memory = AtlasVAE(memory, **kw).fit(tmp_path / "memory")
    z = on_memory.get_latent_representation(memory)
    np.testing.assert_array_equal(on_lazy.get_latent_representation(lazy), z)
    np.testing.assert_array_equal(on_memory.get_latent_representation(lazy), z)
    pd.testing.assert_frame_equal(on_lazy.predict(lazy), on_memory.predict(memory))
    query = lazy[lazy.obs_names[::7]]  # a lazy view: every 7th cell
    np.testing.assert_array_equal(on_memory.get_latent_representation(query), z[::7])
