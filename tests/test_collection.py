"""Several stores as one data set: exactly once and resume over a Zarr + SOMA collection, blocks that
never straddle two stores, genes aligned (intersection / union), obs columns mapped or filled per store,
training equal to training on a merged copy, embedding that records each cell's store and row."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import N_OBS, decode_positions

from bigatlas import AtlasVAE
from bigatlas.dropped_labels import listed_cells
from bigatlas.review_embedding import review_embedding
from bigatlas.synth import synth
from loaders import CellStream, StoreError, open_store, sampling

BLOCK = 16


def collection(position_stores, second="soma"):
    """The position store twice: Zarr + SOMA (read store by store), or Zarr + Zarr (one decode call)."""
    return open_store([position_stores["zarr"], position_stores[second]])


def stream(store, **kw):
    kw.setdefault("batch_size", 32)
    kw.setdefault("seed", 5)
    kw.setdefault("block_size", BLOCK)
    kw.setdefault("blocks_per_request", 4)
    return CellStream(store, **kw)


def test_blocks_are_cut_at_store_boundaries():
    start, length = sampling.blocks(100, 16, segments=[30, 45, 25])
    ends = start + length
    for lo, hi in zip([0, 30, 75], [30, 75, 100]):  # every block lies inside one store
        inside = (start >= lo) & (start < hi)
        assert (ends[inside] <= hi).all()
    assert length.sum() == 100 and np.array_equal(np.sort(start), start)
    assert np.array_equal(sampling.blocks(100, 16)[0], sampling.blocks(100, 16, [100])[0])  # one store: as before
    assert sampling.fewest_rows(100, 16, 3, [30, 45, 25]) == int(np.sort(length)[: len(length) // 3].sum())


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("second", ["soma", "zarr"])
def test_exactly_once_over_a_zarr_and_a_soma_store(position_stores, world, workers, second):
    store = collection(position_stores, second)
    assert store.n_obs == 2 * N_OBS and store.segments == [N_OBS, N_OBS]
    seen, lengths = [], []
    for rank in range(world):
        s = stream(store, rank=rank, world_size=world, num_workers=workers, obs_keys=["source"])
        batches = list(s)
        lengths.append(len(batches))
        for b in batches:
            index = b.index.numpy()
            # each row holds the values of its own store's row: position within the store decodes back
            assert np.array_equal(decode_positions(b.x.to_dense().numpy()), index % N_OBS)
            assert np.array_equal(b.obs["source"].numpy(), index // N_OBS)
            seen.append(index)
        for req in sampling.requests(store.n_obs, s.block_size, s.blocks_per_request, 5, 0, rank, world * workers,
                                     segments=store.segments):  # fmt: skip
            runs = np.split(req.rows, np.flatnonzero(np.diff(req.rows) != 1) + 1)
            assert all((r[0] < N_OBS) == (r[-1] < N_OBS) for r in runs if len(r) <= BLOCK)
    assert len(set(lengths)) == 1
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(2 * N_OBS))


@pytest.mark.parametrize("k", [0, 5, 40])
def test_resume_over_a_collection_equals_uninterrupted(position_stores, k):
    store = collection(position_stores)
    full = [(b.index.numpy(), b.x.to_dense().numpy()) for b in stream(store, num_workers=2, epoch=2)]
    first = stream(store, num_workers=2, epoch=2)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    it.close()
    resumed = stream(collection(position_stores), num_workers=2)
    resumed.load_state_dict(state)
    rest = [(b.index.numpy(), b.x.to_dense().numpy()) for b in resumed]
    assert len(rest) == len(full) - k
    for (i1, x1), (i2, x2) in zip(full[k:], rest, strict=True):
        assert np.array_equal(i1, i2) and np.array_equal(x1, x2)
    single = stream(open_store(position_stores["zarr"]), num_workers=2)
    with pytest.raises(ValueError, match="segments"):
        single.load_state_dict(state)


@pytest.fixture(scope="module")
def atlases(tmp_path_factory):
    """Two atlases with different gene panels and column names, and their merged copy."""
    root = tmp_path_factory.mktemp("coll")
    synth(root / "a.zarr", 640, 70, "zarr", seed=11, n_studies=2, donors_per_study=2)
    synth(root / "full_b.zarr", 640, 70, "zarr", seed=12, n_studies=3, donors_per_study=2)
    b = ad.read_zarr(root / "full_b.zarr")[:, 5:].copy()  # 65 of the 70 genes
    b.obs = b.obs.rename(columns={"dataset_id": "study", "cell_type": "annotation"})
    b.write_zarr(root / "b.zarr")
    manifest = root / "atlases.toml"
    manifest.write_text(
        '[[store]]\ndata = "a.zarr"\n\n[[store]]\ndata = "b.zarr"\nname = "second"\n'
        'columns = { dataset_id = "study", cell_type = "annotation" }\nconstants = { lab = "L2" }\n'
    )
    return root


def test_genes_intersection_union_and_mapped_columns(atlases):
    store = open_store(atlases / "atlases.toml")
    a = open_store(atlases / "a.zarr")
    assert store.n_vars == 65 and list(store.var_ids) == list(a.var_ids[5:])  # first store's order
    outer = open_store(atlases / "atlases.toml", gene_join="outer")
    assert outer.n_vars == 70
    x = outer.read(np.arange(640, 650)).to_scipy().toarray()
    assert x[:, :5].sum() == 0  # genes the second store lacks are zero-filled
    assert np.array_equal(x[:, 5:], open_store(atlases / "b.zarr").read(np.arange(10)).to_scipy().toarray())
    codes, cats = store.obs_codes("dataset_id")  # study_0..1 from a, study_0..2 from b: the union
    assert list(cats) == ["study_0", "study_1", "study_2"] and (codes >= 0).all()
    assert store.obs_codes("cell_type")[1].tolist() == sorted(
        set(a.obs_codes("cell_type")[1]) | set(open_store(atlases / "b.zarr").obs_codes("annotation")[1])
    )
    with pytest.raises(StoreError, match="obs column 'lab' not in store a"):
        store.obs_codes("lab")
    src = pd.Categorical.from_codes(*store.obs_codes("source"))
    assert src.value_counts().to_dict() == {"a": 640, "second": 640}


def test_an_outer_join_marks_each_cells_measured_genes_for_the_loss(atlases):
    """The second store lacks the first 5 of the 70 genes: its cells' rows of `measured` are False there
    (and there only), through a gene list in another order too; an inner join measures every gene."""
    from bigatlas.batches import ToModelInput
    from bigatlas.vocab import Vocab

    assert open_store(atlases / "atlases.toml").gene_panels() is None
    outer = open_store(atlases / "atlases.toml", gene_join="outer")
    panels = outer.gene_panels()
    assert panels.shape == (2, 70) and panels[0].all() and not panels[1, :5].any() and panels[1, 5:].all()
    genes = list(outer.var_ids[::-1][:40]) + list(outer.var_ids[:3])  # 40 the second store has, 3 it lacks
    s = stream(outer, genes=genes, obs_keys=())
    to_input = ToModelInput(Vocab(genes, {}, {}), outer, "cpu", panels=s.gene_panels())
    seen = 0
    for batch in s:
        inp = to_input(batch)
        second = outer.source_codes(inp.positions) == 1
        assert inp.measured.shape == (len(inp), 43) and inp.measured[:, :40].all()
        assert np.array_equal(inp.measured[:, 40:].numpy(), np.repeat(~second[:, None], 3, 1))
        seen += len(inp)
    assert seen == outer.n_obs
    assert stream(outer, genes=genes[:40], obs_keys=()).gene_panels() is None  # the second store has all 40


def test_a_model_trained_on_an_outer_join_reads_its_stores_missing_genes_as_zeros(atlases, tmp_path):
    """The 5 genes the second store lacks are the run's unmeasured genes: its cells were encoded with them at
    0 in training and are embedded so (no fill); a query without other genes has those filled."""
    import torch

    from bigatlas.distributions import Counts

    outer = open_store(atlases / "atlases.toml", gene_join="outer")
    model = AtlasVAE(str(atlases / "atlases.toml"), batch_key="dataset_id", gene_join="outer", train={"max_epochs": 1})
    model.fit(tmp_path / "run")
    assert model.vocab.unmeasured_genes == list(outer.var_ids[:5])
    assert AtlasVAE.load(tmp_path / "run").module.read_as_zero.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    x = torch.tensor(outer.read(np.arange(outer.n_obs)).to_scipy().toarray(), dtype=torch.float32)
    plain = model.module.eval().latent(Counts.from_dense(x)).numpy()
    assert np.allclose(model.get_latent_representation(), plain, atol=1e-5)
    measured = torch.ones(1, 70, dtype=torch.bool)
    measured[0, 10:20] = False
    filled = model.module.latent(Counts.from_dense(x * measured), measured=measured)
    assert not torch.allclose(filled, model.module.latent(Counts.from_dense(x * measured)))


def test_mismatched_stores_give_one_clear_error(atlases, tmp_path):
    with pytest.raises(StoreError, match=r"obs column 'dataset_id' not in store b \(.*b.zarr; have: study"):
        open_store([str(atlases / "a.zarr"), str(atlases / "b.zarr")]).obs_codes("dataset_id")
    few = ad.read_zarr(atlases / "a.zarr")[:, :20].copy()
    few.write_zarr(tmp_path / "few.zarr")
    with pytest.raises(StoreError, match="store few .* shares 20 genes with a .*below the minimum overlap"):
        open_store([str(atlases / "a.zarr"), str(tmp_path / "few.zarr")])
    bad = tmp_path / "bad.toml"
    bad.write_text('[[store]]\ndata = "x.zarr"\ncolums = { a = "b" }\n')
    with pytest.raises(StoreError, match="unknown setting.*colums"):
        open_store(bad)
    bad.write_text(f'[[store]]\ndata = "{atlases / "b.zarr"}"\ncolumns = {{ dataset_id = "studdy" }}\n')
    with pytest.raises(StoreError, match="column 'studdy' \\(mapped to 'dataset_id'\\) not in"):
        open_store(bad)


def test_a_value_that_is_not_a_count_names_the_member_store_and_its_position(atlases, tmp_path):
    """In a collection the check names the store that holds the value, the cell's position in that store and that
    store's other matrices, not the collection's joined name and position."""
    norm = ad.read_zarr(atlases / "a.zarr")
    norm.layers["counts"] = norm.X.copy()
    x = norm.X.astype(np.float32).tocsr()
    x.data[x.indptr[7] : x.indptr[8]] += 0.25  # cell 7 of this store: values that are not whole
    norm.X = x
    norm.write_zarr(tmp_path / "norm.zarr")
    store = open_store([str(atlases / "a.zarr"), str(tmp_path / "norm.zarr")])
    with pytest.raises(ValueError, match=r"norm.zarr: non-integer value .* at position 7 .*also has counts\)$"):
        list(stream(store, validate="counts"))
    assert store.locate(640 + 7) == (str(tmp_path / "norm.zarr"), 7, ("counts",))
    assert store.locate(3) == (str(atlases / "a.zarr"), 3, ())


def test_training_on_a_collection_equals_training_on_the_merged_copy(atlases, tmp_path):
    keys = {"batch_key": "dataset_id", "label_keys": ["cell_type"], "train": {"max_epochs": 2, "seed": 3}}
    merged = ad.concat([ad.read_zarr(atlases / "a.zarr")[:, 5:], ad.read_zarr(atlases / "full_b.zarr")[:, 5:]])
    merged.obs_names_make_unique()
    merged.write_zarr(tmp_path / "merged.zarr")
    a = open_store(atlases / "a.zarr")
    genes = list(a.var_ids[5:])
    twin = tmp_path / "twin.toml"  # the same cells as the merged copy, kept in two stores
    twin.write_text(f'[[store]]\ndata = "{atlases / "a.zarr"}"\n\n[[store]]\ndata = "{atlases / "full_b.zarr"}"\n')
    z_merged = AtlasVAE(str(tmp_path / "merged.zarr"), genes=genes, **keys).fit(tmp_path / "m").get_latent()
    model = AtlasVAE(str(twin), genes=genes, **keys).fit(tmp_path / "c")
    assert np.array_equal(model.get_latent(), z_merged)
    out = model.embed(str(twin), tmp_path / "c.emb", progress=False, chunk_size=500)
    emb = ad.read_zarr(out)
    assert np.allclose(emb.obsm["X_bigatlas"], z_merged, atol=1e-6)
    assert emb.obs.bigatlas_source.tolist() == ["a"] * 640 + ["full_b"] * 640
    assert np.array_equal(emb.obs.bigatlas_row, np.concatenate([np.arange(640), np.arange(640)]))
    assert zarr.open_group(str(out)).attrs["bigatlas"]["sources"] == ["a", "full_b"]

    # the stores given as two paths: the embedding records both, and review (or evaluate) reopens them from it
    paths = [str(atlases / "a.zarr"), str(atlases / "full_b.zarr")]
    listed = model.embed(paths, tmp_path / "l.emb", progress=False, chunk_size=500)
    assert zarr.open_group(str(listed)).attrs["bigatlas"]["data"] == paths
    summary = review_embedding(listed, label_key="cell_type", out=tmp_path / "review.csv", log=lambda *_: None)
    labelled = sum(int((ad.read_zarr(p).obs.cell_type.astype(str) != "undefined").sum()) for p in paths)
    assert summary["cells"] == labelled and summary["data"] == paths
    both = open_store(paths)
    assert np.array_equal(both.cell_ids(np.array([0, 639, 640, 1279])), [0, 639, 1 << 40, (1 << 40) + 639])
    names = both.obs_names(np.array([5, 645])).astype(str)
    assert names[0] == names[1]  # the two stores name their cells alike: --drop-labels finds them by row
    rows = pd.DataFrame({"cell": names, "row": [5, (1 << 40) + 5]})
    assert np.flatnonzero(listed_cells(both, rows, "l.csv")).tolist() == [5, 645]
    with pytest.raises(ValueError, match="not unique"):
        listed_cells(both, rows[["cell"]].iloc[:1], "l.csv")
    # trained on the two paths: the same model, and loaded it reads them again (its config lists both)
    train = {**keys["train"], "reference_umap": False}
    AtlasVAE(paths, genes=genes, **{**keys, "train": train}).fit(tmp_path / "p")
    assert np.array_equal(AtlasVAE.load(tmp_path / "p").get_latent_representation(), z_merged)


def test_two_atlases_with_other_panels_and_columns_train_embed_and_evaluate(atlases, tmp_path):
    from bigatlas.cli import main

    manifest = str(atlases / "atlases.toml")
    args = ["--data", manifest, "--batch-key", "dataset_id", "--covariate-keys", "lab", "--label-keys", "cell_type"]
    assert main(["train", *args[:4], "--label-keys", "cell_type", "--out", str(tmp_path / "r"),
                 "--max-epochs", "3", "--gene-join", "outer"]) == 0  # fmt: skip
    assert main(["train", *args, "--out", str(tmp_path / "r2"), "--max-epochs", "1"]) == 2  # 'lab' only in one
    assert main(["embed", "--run", str(tmp_path / "r"), "--data", manifest, "--out", str(tmp_path / "e.zarr")]) == 0
    assert main(["evaluate", "--emb", str(tmp_path / "e.zarr"), "--label-keys", "cell_type", "--batch-key",
                 "dataset_id", "--cells", "1000", "--no-baseline"]) == 0  # fmt: skip
    m = json.loads((tmp_path / "r" / "report" / "metrics.json").read_text())
    assert set(m["per_source"]) == {"a", "second"}
    assert all(v["cells"] == 640 and 0 <= v["label_accuracy"] <= 1 for v in m["per_source"].values())
    assert len(json.loads((tmp_path / "r" / "vocab.json").read_text())["genes"]) == 70  # the union


def test_a_query_collection_whose_stores_name_genes_otherwise_embeds_as_each_store_alone(atlases, tmp_path):
    """A model trained on feature ids meets a collection whose stores give symbols only (a 10x file read by scanpy)
    or versioned ids kept as tiledbsoma.io's var_id (an .h5ad made SOMA): each cell embeds as its store alone."""
    import pandas as pd
    import tiledbsoma.io

    from bigatlas import AtlasVAE

    model = AtlasVAE(str(atlases / "a.zarr"), batch_key="dataset_id", train={"max_epochs": 1, "reference_cells": 0})
    model.fit(tmp_path / "run")
    a = ad.read_zarr(atlases / "a.zarr")
    symbols = a.copy()
    symbols.var = pd.DataFrame(index=a.var["feature_name"].astype(str).to_numpy())
    symbols.write_h5ad(tmp_path / "symbols.h5ad")
    versioned = a.copy()
    versioned.var = pd.DataFrame(index=[f"{v}.7" for v in a.var["feature_id"]])
    tiledbsoma.io.from_anndata(str(tmp_path / "versioned.soma"), versioned, measurement_name="RNA")
    alone = model.get_latent_representation(str(atlases / "a.zarr"))
    together = model.get_latent_representation([str(tmp_path / "symbols.h5ad"), str(tmp_path / "versioned.soma")])
    np.testing.assert_allclose(together, np.concatenate([alone, alone]), rtol=0, atol=1e-6)
