"""`bigatlas prepare`: statistics equal numpy / scanpy on an in-memory copy, the same from SOMA and
from a backed .h5ad, conversion round-trips (sharded too), memory stays flat as the store grows,
bad input fails without leaving output."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bigatlas.prepare import convert, prepare
from bigatlas.sources import open_source
from bigatlas.synth import synth
from bigatlas.write_store import ZarrWriter
from loaders import CellStream, StoreError, open_store

quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    synth(root / "a.zarr", 3000, 300, "zarr", seed=3, n_studies=4)
    synth(root / "a.soma", 3000, 300, "soma", seed=3, n_studies=4)
    adata = ad.read_zarr(root / "a.zarr")
    adata.write_h5ad(root / "a.h5ad")
    return root, adata


def test_statistics_equal_numpy_and_scanpy(atlas, tmp_path):
    import scanpy as sc

    root, adata = atlas
    st = prepare(
        root / "a.zarr",
        tmp_path,
        batch_key="dataset_id",
        label_keys=["cell_type"],
        n_top_genes=100,
        block_cells=257,
        workers=2,
        **quiet,
    )  # many blocks, several dask partitions
    table = pd.read_csv(tmp_path / "genes.csv", index_col="feature_id")
    x = adata.X.toarray().astype(np.float64)
    assert list(table.index) == list(adata.var.feature_id)
    np.testing.assert_allclose(table["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["variance"], x.var(0, ddof=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["detection_rate"], (x > 0).mean(0), rtol=0, atol=1e-12)
    lib = x.sum(1)
    assert st["library_size"]["min"] == lib.min() and st["library_size"]["max"] == lib.max()
    assert st["library_size"]["mean"] == pytest.approx(lib.mean(), rel=1e-12)
    assert st["cells_per_batch"] == adata.obs.dataset_id.value_counts().astype(int).to_dict()
    truth = adata.obs.cell_type.astype(str).value_counts()
    assert st["class_counts"]["cell_type"]["classes"] == truth.drop("undefined").to_dict()
    assert st["class_counts"]["cell_type"]["unlabelled"] == truth["undefined"]
    ref = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=100, batch_key="dataset_id", inplace=False)
    ours = (tmp_path / "hvg.txt").read_text().split()
    theirs = set(adata.var.feature_id[ref.highly_variable.to_numpy()])
    assert len(ours) == 100 and len(set(ours) & theirs) / 100 >= 0.95
    np.testing.assert_allclose(table["variance_norm"], ref["variances_norm"], rtol=1e-6)


def test_soma_and_h5ad_sources_give_the_same_statistics(atlas, tmp_path):
    root, _ = atlas
    tables = []
    for name in ("a.zarr", "a.soma", "a.h5ad"):
        prepare(root / name, tmp_path / name, batch_key="donor_id", n_top_genes=50, block_cells=500, **quiet)
        tables.append(pd.read_csv(tmp_path / name / "genes.csv", index_col="feature_id"))
    for t in tables[1:]:
        pd.testing.assert_frame_equal(t, tables[0], rtol=1e-9)


@pytest.mark.parametrize("shard", [None, 4 * 32768])
def test_h5ad_conversion_round_trips_filtered_cells(atlas, tmp_path, shard):
    root, adata = atlas
    expr = "tissue_general == 'blood' and is_primary_data == True"
    out = tmp_path / "conv.zarr"
    st = prepare(
        root / "a.h5ad",
        tmp_path / "p",
        obs_filter=expr,
        convert_to=out,
        shard_elems=shard,
        batch_key="dataset_id",
        n_top_genes=30,
        block_cells=333,
        **quiet,
    )
    want = adata[(adata.obs.tissue_general == "blood") & adata.obs.is_primary_data]
    got = ad.read_zarr(out)
    assert st["n_obs"] == want.n_obs == got.n_obs
    assert (got.X != want.X).nnz == 0
    assert list(got.obs_names) == list(want.obs_names)
    for col in want.obs.columns:
        assert (got.obs[col].astype(str).to_numpy() == want.obs[col].astype(str).to_numpy()).all(), col
    pd.testing.assert_frame_equal(got.var, adata.var)
    store = open_store(out)
    assert (store._data.shards is not None) == (shard is not None)
    seen = np.concatenate([b.index.numpy() for b in CellStream(store, batch_size=100, seed=1)])
    assert np.array_equal(np.sort(seen), np.arange(want.n_obs))


def test_written_stores_read_by_anndata_work_in_scipy_and_scikit_learn(atlas, tmp_path):
    """A store synth or prepare --convert writes, read whole by anndata, is a matrix scipy and scikit-learn take
    (scanpy's PCA, a reversed column slice): indices and indptr of one dtype, int32 or int64."""
    from sklearn.utils.sparsefuncs import mean_variance_axis

    root, adata = atlas
    convert(open_source(str(root / "a.soma")), tmp_path / "c.zarr", block=700, workers=1, **quiet)
    dense = adata.X.toarray()
    for path in (root / "a.zarr", tmp_path / "c.zarr"):
        x = ad.read_zarr(path).X
        assert x.indices.dtype == x.indptr.dtype and x.indices.dtype in (np.int32, np.int64), path
        mean, var = mean_variance_axis(x, axis=0)
        np.testing.assert_allclose(mean, dense.mean(0), rtol=1e-5)
        np.testing.assert_allclose(var, dense.var(0), rtol=1e-4)
        assert np.array_equal(x[:50, ::-1].toarray(), dense[:50, ::-1])


def test_soma_slice_converts_with_listed_genes_only(atlas, tmp_path):
    root, adata = atlas
    genes = list(adata.var.feature_id.to_numpy()[[17, 3, 250, 99]])
    out = tmp_path / "slice.zarr"
    prepare(
        root / "a.soma",
        tmp_path / "p",
        genes=genes,
        obs_filter="dataset_id == 'study_2'",
        convert_to=out,
        n_top_genes=0,
        **quiet,
    )
    got = ad.read_zarr(out)
    want = adata[adata.obs.dataset_id == "study_2"]
    assert list(got.var.feature_id) == genes
    assert (got.X != want.X[:, [17, 3, 250, 99]]).nnz == 0
    assert got.obs.soma_joinid.tolist() == want.obs.soma_joinid.tolist()


def test_tiny_batches_are_left_out_of_the_hvg_ranking(atlas, tmp_path):
    from bigatlas.prepare import seurat_v3_fit

    root, adata = atlas
    lone = int(adata.obs.soma_joinid[adata.obs.dataset_id == "study_2"].iloc[0])
    st = prepare(
        root / "a.zarr",
        tmp_path,
        batch_key="dataset_id",
        n_top_genes=40,
        obs_filter=f"dataset_id == 'study_1' or soma_joinid == {lone}",
        **quiet,
    )
    assert st["cells_per_batch"]["study_2"] == 1
    assert st["hvg"]["batches_skipped"] == ["study_0", "study_2", "study_3"]  # no cells / one cell
    assert len((tmp_path / "hvg.txt").read_text().split()) == 40
    assert seurat_v3_fit(np.ones(50), np.r_[np.ones(9), np.zeros(41)]) is None  # 9 variable genes: no fit


def test_genes_that_share_a_feature_id_are_left_out_of_hvg_txt_with_a_warning(atlas, tmp_path):
    """A 10x file read without var_names_make_unique(): training refuses such ids, so hvg.txt must not list them."""
    root, adata = atlas
    first = prepare(root / "a.h5ad", tmp_path / "unique", batch_key="dataset_id", n_top_genes=50, **quiet)
    top = (tmp_path / "unique" / "hvg.txt").read_text().split()
    ids = list(adata.var.feature_id)
    twin = ids.index(top[0])
    other = twin + 1 if twin + 1 < len(ids) else twin - 1
    lost, ids[other] = ids[other], top[0]  # the most variable gene's id, twice
    dup = adata.copy()
    dup.var_names = ids
    dup.var = dup.var.drop(columns=["feature_id"])
    dup.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.warns(UserWarning, match=f"2 genes of .*dup.h5ad share a feature id \\({top[0]}\\); they are left out"):
        st = prepare(tmp_path / "dup.h5ad", tmp_path / "p", batch_key="dataset_id", n_top_genes=50, **quiet)
    hvg = (tmp_path / "p" / "hvg.txt").read_text().split()
    table, before = (pd.read_csv(tmp_path / d / "genes.csv") for d in ("p", "unique"))
    np.testing.assert_allclose(table.variance_norm, before.variance_norm)  # the repeated genes' own, not -inf
    assert len(hvg) == 50 and top[0] not in hvg and len(set(hvg)) == 50 and st["hvg"]["n_top_genes"] == 50
    assert first["hvg"]["n_top_genes"] == 50 and set(top[1:]) - {lost} <= set(hvg)  # the next in line takes its place


def peak_rss(data, out):
    code = (
        "from bigatlas.prepare import prepare; import json, sys; "
        f"s = prepare({str(data)!r}, {str(out)!r}, batch_key='dataset_id', label_keys=['cell_type'], "
        "block_cells=2048, log=lambda *_: None); print(json.dumps(s['peak_rss_mb']))"
    )
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def test_memory_is_flat_in_the_number_of_cells(tmp_path):
    small, large = tmp_path / "s.zarr", tmp_path / "l.zarr"
    synth(small, 30_000, 300, "zarr", seed=0)
    synth(large, 150_000, 300, "zarr", seed=0)
    x = open_store(large)
    x_mb = x._indptr[-1] * 8 / 2**20  # float32 values + int32 indices, had it been loaded
    assert x_mb > 150
    grow = peak_rss(large, tmp_path / "pl") - peak_rss(small, tmp_path / "ps")
    assert grow < 60, f"peak RSS grew {grow:.0f} MB from 30k to 150k cells (X alone is {x_mb:.0f} MB)"


def test_bad_input_fails_clearly_and_leaves_no_output(atlas, tmp_path):
    root, adata = atlas
    with pytest.raises(StoreError, match="obs column 'studyy' not in store"):
        prepare(root / "a.zarr", tmp_path / "p", batch_key="studyy", **quiet)
    bad = tmp_path / "neg.zarr"
    with ZarrWriter(bad, 3) as w:
        w.append(np.array([0, 2, 3]), np.array([0, 2, 1]), np.array([1.0, -2.0, 4.0]))
        w.finish(pd.DataFrame(index=["c0", "c1"]), pd.DataFrame(index=["g0", "g1", "g2"]))
    with pytest.raises(StoreError, match="1 negative values"):
        prepare(bad, tmp_path / "p2", n_top_genes=0, **quiet)
    scaled = adata[:200].copy()  # X scaled (sc.pp.scale), the counts kept in a layer: named as the fix
    scaled.layers["counts"] = scaled.X.copy()
    x = scaled.X.toarray()
    scaled.X = sp.csr_matrix((x - x.mean(0)) / (x.std(0) + 1))
    scaled.write_h5ad(tmp_path / "scaled.h5ad")
    with pytest.raises(StoreError, match=r"negative values; raw counts are required \(--layer .*also has counts\)"):
        prepare(tmp_path / "scaled.h5ad", tmp_path / "p3", n_top_genes=0, **quiet)
    assert not (tmp_path / "p3" / "stats.json").exists()
    source = open_source(str(root / "a.zarr"))
    calls = []

    def failing(lo, hi, read=source.read):
        calls.append(lo)
        if len(calls) == 3:
            raise OSError("disk went away")
        return read(lo, hi)

    source.read = failing
    with pytest.raises(OSError, match="disk went away"):
        convert(source, tmp_path / "half.zarr", block=500, workers=1, **quiet)
    assert not (tmp_path / "half.zarr").exists() and not (tmp_path / "half.zarr.partial").exists()


def test_distributed_scheduler_gives_the_threaded_results(atlas, tmp_path):
    """prepare --scheduler on a LocalCluster of 2 worker processes: the sources travel as recipes and
    reopen on the workers; statistics, HVGs and the converted store equal the threaded run's."""
    import zarr
    from distributed import LocalCluster

    root, _ = atlas
    kw = dict(batch_key="dataset_id", label_keys=["cell_type"], n_top_genes=100, block_cells=500, **quiet)
    local = prepare(root / "a.h5ad", tmp_path / "t", convert_to=tmp_path / "t.zarr", **kw)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = prepare(root / "a.h5ad", tmp_path / "d", convert_to=tmp_path / "d.zarr",
                         scheduler=cluster.scheduler_address, **kw)  # fmt: skip
    for key in ("n_obs", "cells_per_batch", "library_size", "class_counts"):
        assert remote[key] == local[key], key
    assert (tmp_path / "t" / "hvg.txt").read_text() == (tmp_path / "d" / "hvg.txt").read_text()
    a, b = pd.read_csv(tmp_path / "t" / "genes.csv"), pd.read_csv(tmp_path / "d" / "genes.csv")
    pd.testing.assert_frame_equal(a, b, rtol=1e-12)
    za, zb = zarr.open_group(str(tmp_path / "t.zarr")), zarr.open_group(str(tmp_path / "d.zarr"))
    for name in ("X/data", "X/indices", "X/indptr"):
        assert np.array_equal(za[name][:], zb[name][:]), name
