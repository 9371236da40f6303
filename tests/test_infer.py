"""Embedding to disk: equals in-memory inference, same output for 1-3 processes, survives SIGKILL,
aligns genes of a differently ordered or incomplete query."""

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import zarr
from conftest import accelerate_launcher, run_script

from bigatlas import AtlasVAE
from bigatlas.distributions import Counts
from bigatlas.infer import embed
from bigatlas.synth import synth
from bigatlas.write_store import ZarrWriter

N = 1500


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    data = root / "ref.zarr"
    synth(data, N, 100, "zarr", seed=4, n_studies=3, donors_per_study=2)
    run = root / "run"
    AtlasVAE.setup(
        str(data), batch_key="dataset_id", label_keys=["cell_type", "cell_type_coarse"], train={"max_epochs": 3}
    ).fit(run)
    return str(data), str(run)


def embed_cli(args, launcher=(), env_extra=None, check=True):
    return run_script("embed.py", args, env_extra, launcher, check)


def arrays(out):
    g = zarr.open_group(str(out), mode="r")
    return {
        "z": g["obsm/X_bigatlas"][:],
        "row": g["obs/bigatlas_row"][:],
        "pred": g["obs/cell_type_pred/codes"][:],
        "prob": g["obs/cell_type_prob"][:],
        "names": g["obs/_index"][:].astype(object),
    }


def test_output_equals_in_memory_inference(trained, tmp_path):
    data, run = trained
    out = embed(run, data, tmp_path / "emb.zarr", chunk_size=256, progress=False)
    adata = ad.read_zarr(out)
    model = AtlasVAE.load(run)
    assert np.array_equal(adata.obsm["X_bigatlas"], model.get_latent())
    for key, pred in model.predict_labels().items():
        assert np.array_equal(adata.obs[f"{key}_pred"].astype(str).to_numpy(), pred["label"])
        assert np.array_equal(adata.obs[f"{key}_prob"].to_numpy(), pred["probability"].astype(np.float32))
        assert np.array_equal(adata.obs[f"{key}_uncertainty"].to_numpy(), pred["uncertainty"])
        assert np.array_equal(adata.obs[f"{key}_unknown"].to_numpy(), pred["uncertainty"] > 0.5)
        filtered = adata.obs[f"{key}_pred_filtered"].astype(str).to_numpy()
        assert np.array_equal(filtered == "Unknown", pred["uncertainty"] > 0.5)
        assert np.array_equal(filtered[filtered != "Unknown"], pred["label"][filtered != "Unknown"])
    assert list(adata.obs_names[:3]) == ["cell_0", "cell_1", "cell_2"]
    assert zarr.open_group(str(out)).attrs["bigatlas"]["complete"] is True


@pytest.mark.parametrize("procs", [2, 3])
def test_processes_write_the_same_output_in_store_order(trained, tmp_path, procs):
    data, run = trained
    single = embed(run, data, tmp_path / "one.zarr", chunk_size=200, progress=False)
    multi = tmp_path / "multi.zarr"
    embed_cli(
        ["--run", run, "--data", data, "--out", str(multi), "--chunk-size", "200"], launcher=accelerate_launcher(procs)
    )
    a, b = arrays(single), arrays(multi)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert np.array_equal(a["row"], np.arange(N))


def test_killed_run_resumes_to_the_same_output_and_is_never_complete_early(trained, tmp_path):
    data, run = trained
    ref = embed(run, data, tmp_path / "ref.zarr", chunk_size=200, progress=False)
    out = tmp_path / "cut.zarr"
    args = ["--run", run, "--data", data, "--out", str(out), "--chunk-size", "200"]
    res = embed_cli(args, env_extra={"BIGATLAS_FAULT": "after_chunk:3"}, check=False)
    assert res.returncode == -9
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["bigatlas"]["complete"] is False
    assert g["uns/bigatlas_done"][:].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    again = embed_cli(args)
    assert "4/8 chunks" not in again.stdout and "complete" in again.stdout
    a, b = arrays(ref), arrays(out)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    noop = embed_cli(args)
    assert "nothing to do" in noop.stdout
    other = embed_cli([*args[:-1], "300"], check=False)
    assert other.returncode == 2 and "other settings" in other.stderr


def write_query(src, out, keep_genes):
    """A copy of `src` with only `keep_genes` (store column indices), in that order."""
    store = ad.read_zarr(src)
    x = sp.csr_matrix(store.X[:, keep_genes])
    with ZarrWriter(out, len(keep_genes)) as w:
        w.append(x.indptr, x.indices, x.data)
        w.finish(store.obs, store.var.iloc[keep_genes])
    return str(out)


def renamed_studies(src, out) -> str:
    """A copy of `src` whose studies are new to the model (q_study_*)."""
    store = ad.read_zarr(src)
    store.obs["dataset_id"] = ("q_" + store.obs["dataset_id"].astype(str)).astype("category")
    with ZarrWriter(out, store.n_vars) as w:
        w.append(store.X.indptr, store.X.indices, store.X.data)
        w.finish(store.obs, store.var)
    return str(out)


def test_query_genes_are_aligned_by_id(trained, tmp_path):
    data, run = trained
    g = 100
    perm = np.random.default_rng(0).permutation(g)
    shuffled = write_query(data, tmp_path / "shuffled.zarr", perm)
    base = arrays(embed(run, data, tmp_path / "base.zarr", progress=False))
    assert np.array_equal(arrays(embed(run, shuffled, tmp_path / "s.zarr", progress=False))["z"], base["z"])
    kept = np.sort(perm[:80])  # 20% of the genes missing
    partial = write_query(data, tmp_path / "partial.zarr", kept)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = arrays(embed(run, partial, tmp_path / "p.zarr", progress=False))["z"]
    assert any("20 of the model's 100 genes (20.0%) are missing" in str(w.message) for w in caught)
    # reference: the full store with those genes zeroed, embedded as counted zeros, and by the model with the
    # missing genes marked: filled with the decoder's expected counts before the encoder (encode_measured)
    full = ad.read_zarr(data)
    zeroed = full.X.copy().tolil()
    zeroed[:, np.setdiff1d(np.arange(g), kept)] = 0
    zeroed = sp.csr_matrix(zeroed)
    zeroed.eliminate_zeros()
    ref_path = tmp_path / "zeroed.zarr"
    with ZarrWriter(ref_path, g) as w:
        w.append(zeroed.indptr, zeroed.indices, zeroed.data)
        w.finish(full.obs, full.var)
    as_zeros = arrays(embed(run, str(ref_path), tmp_path / "r.zarr", progress=False))["z"]
    measured = torch.zeros(1, g, dtype=torch.bool)
    measured[0, kept] = True
    module = AtlasVAE.load(run).module.eval()
    want = module.latent(Counts.from_dense(torch.tensor(zeroed.toarray(), dtype=torch.float32)), measured=measured)
    assert np.allclose(want.numpy(), got, atol=1e-5) and not np.allclose(as_zeros, got, atol=1e-3)
    tiny = write_query(data, tmp_path / "tiny.zarr", np.arange(30))
    with pytest.raises(ValueError, match="30 of the model's 100 genes .* below the minimum overlap 50%"):
        embed(run, tiny, tmp_path / "t.zarr", progress=False)
    # a query that names its genes by symbol only (var index = feature names, no feature columns, shuffled), as a
    # 10x file read by scanpy does: matched by the names the model recorded, it embeds as the full store
    model = AtlasVAE.load(run)
    symbols = full[:, perm].copy()
    symbols.var = pd.DataFrame(index=full.var["feature_name"].astype(str).to_numpy()[perm])
    np.testing.assert_array_equal(model.get_latent_representation(symbols), base["z"])
    versioned = full.copy()  # a GENCODE-versioned file: its feature ids with .5, matched without the version
    versioned.var = pd.DataFrame(index=[f"{v}.5" for v in full.var["feature_id"]])
    np.testing.assert_array_equal(model.get_latent_representation(versioned), base["z"])
    twice = symbols.copy()  # read without var_names_make_unique(): a symbol twice, and no feature ids
    names = list(twice.var_names)
    names[3] = names[4]
    twice.var_names = names
    with pytest.warns(UserWarning, match=f"1 of the model's genes appear more than once .*\\({names[4]}\\)"):
        got = model.get_latent_representation(twice)
    without = symbols[:, [i for i in range(g) if i not in (3, 4)]].copy()  # both genes read as missing
    np.testing.assert_array_equal(got, model.get_latent_representation(without))
    tenx = twice.copy()  # as scanpy's read_10x_h5 gives it: the Ensembl ids in gene_ids, symbols of another release
    tenx.var_names = [f"{v}_other_release" for v in tenx.var_names]
    tenx.var["gene_ids"] = full.var["feature_id"].astype(str).to_numpy()[perm]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(model.get_latent_representation(tenx), base["z"])
    assert not [w for w in caught if "missing" in str(w.message)]  # every gene found, by its id
    other = symbols.copy()
    other.var_names = [f"x{v}" for v in other.var_names]
    with pytest.raises(ValueError, match="shares 0 of the model's 100 genes .* the model's are ENS.*has xGENE"):
        model.get_latent_representation(other)


def test_surgery_extends_batches_and_keeps_the_reference_fixed(trained, tmp_path):
    from safetensors.numpy import load_file

    data, run = trained
    query = tmp_path / "query.zarr"
    synth(query, 600, 100, "zarr", seed=9, n_studies=2, donors_per_study=2)  # same genes, new studies' effects
    qpath = renamed_studies(query, tmp_path / "query_renamed.zarr")
    reference = AtlasVAE.load(run)
    before = reference.get_latent(data)
    mapped = reference.map_query(str(qpath), tmp_path / "mapped", epochs=2)
    assert mapped.vocab.batch_categories["dataset_id"][:3] == reference.vocab.batch_categories["dataset_id"]
    assert mapped.vocab.batch_categories["dataset_id"][3:] == ["q_study_0", "q_study_1"]
    assert np.array_equal(mapped.get_latent(data), before)  # frozen encoder: reference latents identical
    with pytest.raises(ValueError, match="is the reference's"):  # never over the reference itself
        reference.map_query(str(qpath), run, epochs=2, overwrite=True)
    with pytest.raises(ValueError, match="holds an earlier run"):  # nor over an earlier mapping, unless asked
        reference.map_query(str(qpath), tmp_path / "mapped", epochs=2)
    old, new = (
        load_file(str(Path(run) / "model.safetensors")),
        load_file(str(tmp_path / "mapped" / "model.safetensors")),
    )
    for k, v in old.items():
        if k.startswith("embeddings."):
            assert np.array_equal(new[k][: len(v)], v) and not np.array_equal(
                new[k][len(v) :], np.broadcast_to(v.mean(0), new[k][len(v) :].shape)
            )
        else:
            assert np.array_equal(new[k], v), k
    assert np.isfinite(mapped.get_reconstructed_expression(str(qpath))).all()


def test_surgery_on_a_batchnorm_reference_keeps_its_statistics(tmp_path):
    """A reference without label keys has BatchNorm layers; the mapped run's weight average gets statistics gathered
    anew only for layers it trains, so the frozen ones keep the reference's, and its latents stay identical."""
    from safetensors.numpy import load_file

    data, query = tmp_path / "ref.zarr", tmp_path / "query.zarr"
    synth(data, 600, 100, "zarr", seed=4, n_studies=3, donors_per_study=2)
    synth(query, 400, 100, "zarr", seed=9, n_studies=2, donors_per_study=2)
    reference = AtlasVAE.setup(str(data), batch_key="dataset_id", train={"max_epochs": 2})
    reference.fit(tmp_path / "run")
    old = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.endswith("running_mean") for k in old)
    before = reference.get_latent(str(data))
    mapped = reference.map_query(renamed_studies(query, tmp_path / "q.zarr"), tmp_path / "mapped", epochs=2)
    new = load_file(str(tmp_path / "mapped" / "model.safetensors"))
    for k, v in old.items():
        if not k.startswith("embeddings."):
            assert np.array_equal(new[k], v), k
    assert np.array_equal(mapped.get_latent(str(data)), before)


def test_a_query_without_some_genes_is_mapped_on_its_filled_latents(trained, tmp_path):
    """map-query on a query that lacks 20 of the 100 genes: the mapped model embeds it where the reference
    does (frozen encoder), with the missing genes filled in rather than read as zeros, and the mapped run
    reads no gene as zero that the reference measured everywhere."""
    data, run = trained
    partial = write_query(
        renamed_studies(data, tmp_path / "renamed.zarr"), tmp_path / "partial.zarr", np.arange(20, 100)
    )
    reference = AtlasVAE.load(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "20 of the model's 100 genes ... are zero-filled"
        mapped = reference.map_query(partial, tmp_path / "mapped", epochs=2)
        z = mapped.get_latent(partial)
        assert np.array_equal(z, reference.get_latent(partial))
    assert mapped.vocab.unmeasured_genes == [] and not mapped.module.read_as_zero.any()
    x = torch.tensor(ad.read_zarr(data).X[:, 20:].toarray(), dtype=torch.float32)
    zeros = reference.module.latent(Counts.from_dense(torch.cat([torch.zeros(len(x), 20), x], 1))).numpy()
    assert np.isfinite(z).all() and not np.allclose(z, zeros, atol=1e-3)


def test_soma_query_gets_a_soma_output_aligned_by_joinid_and_the_output_name_sets_the_format(trained, tmp_path):
    import tiledbsoma

    data, run = trained
    soma_path = tmp_path / "ref.soma"
    synth(soma_path, N, 100, "soma", seed=4, n_studies=3, donors_per_study=2)  # same atlas as the Zarr one
    expr = "dataset_id != 'study_1'"
    out = embed(run, str(soma_path), tmp_path / "emb.soma", chunk_size=256, obs_filter=expr, progress=False)
    zarr_out = arrays(embed(run, data, tmp_path / "emb.zarr", chunk_size=256, obs_filter=expr, progress=False))
    with tiledbsoma.Experiment.open(str(out)) as exp:
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
        x = exp.ms["RNA"].obsm["X_bigatlas"].read().tables().concat()
        assert '"complete": true' in exp.metadata["bigatlas"]
    assert np.array_equal(obs["soma_joinid"].to_numpy(), zarr_out["row"])  # joinids of the filtered cells
    z = np.zeros((N, 10), np.float32)
    z[x["soma_dim_0"].to_numpy(), x["soma_dim_1"].to_numpy()] = x["soma_data"].to_numpy()
    assert np.allclose(z[zarr_out["row"]], zarr_out["z"], atol=1e-5)
    assert np.array_equal(obs["cell_type_prob"].to_numpy(), zarr_out["prob"])
    again = embed(run, str(soma_path), out, chunk_size=256, obs_filter=expr, progress=False)
    assert again == out
    # the output's name, not the query's format, says what it is: .soma holds a SOMA experiment, .zarr an
    # AnnData-Zarr store, each with the same cells and latents; an unnamed one follows the query
    kw = dict(chunk_size=256, obs_filter=expr, progress=False)
    from_soma = arrays(embed(run, str(soma_path), tmp_path / "from_soma.zarr", **kw))
    assert np.array_equal(from_soma["row"], zarr_out["row"]) and np.allclose(from_soma["z"], zarr_out["z"], atol=1e-5)
    with tiledbsoma.Experiment.open(str(embed(run, data, tmp_path / "from_zarr.soma", **kw))) as exp:
        got = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
    assert got.reset_index(drop=True).equals(obs.reset_index(drop=True))
    assert tiledbsoma.Experiment.exists(str(embed(run, str(soma_path), tmp_path / "plain", **kw)))
    # an output written before the name decided (a SOMA experiment named .zarr) resumes as what it is
    old = embed(run, str(soma_path), tmp_path / "old.zarr", out_format="soma", **kw)
    assert tiledbsoma.Experiment.exists(str(old)) and embed(run, str(soma_path), old, **kw) == old
    with pytest.raises(ValueError, match="out_format 'h5ad': use one of zarr, soma"):
        embed(run, data, tmp_path / "x", out_format="h5ad", **kw)


def test_an_output_that_recorded_a_collection_as_text_resumes_and_reads_back_as_the_list():
    """Outputs started before 2026-12 recorded several stores as their list's text: resuming one with the same
    stores continues it, with other stores is refused, and readers open the list."""
    from bigatlas.embedding import recorded_data
    from bigatlas.infer import _check_meta
    from loaders import data_name

    meta = {"data": data_name(["a.zarr", "b.zarr"]), "n_obs": 3}  # as embed records it now: absolute paths
    assert _check_meta("out.zarr", {"data": "['a.zarr', 'b.zarr']", "n_obs": 3, "complete": False}, meta)
    with pytest.raises(ValueError, match="other settings"):
        _check_meta("out.zarr", {"data": "['a.zarr', 'c.zarr']", "n_obs": 3}, meta)
    assert recorded_data("['a.zarr', 'b.zarr']") == ["a.zarr", "b.zarr"] and recorded_data("a.zarr") == "a.zarr"
