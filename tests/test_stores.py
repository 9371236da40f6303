"""Store opening: both AnnData-Zarr formats, SOMA, and one clear error per kind of bad input."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from conftest import N_OBS, N_VARS, position_frames, position_rows

from bigatlas.write_store import ZarrWriter
from loaders import StoreError, open_store


def reference():
    indptr, indices, data = position_rows(0, N_OBS)
    return sp.csr_matrix((data, indices, indptr), shape=(N_OBS, N_VARS))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_anndata_written_stores_of_both_formats(tmp_path, zarr_format):
    obs, var = position_frames()
    adata = ad.AnnData(reference(), obs=obs, var=var)
    path = str(tmp_path / f"v{zarr_format}.zarr")
    with ad.settings.override(zarr_write_format=zarr_format):
        adata.write_zarr(path)
    store = open_store(path)
    rows = np.array([0, 5, 6, 7, 500, N_OBS - 1])
    assert (store.read(rows).to_scipy() != reference()[rows]).nnz == 0
    assert store.n_obs == N_OBS and list(store.var_names[:2]) == ["G0", "G1"]
    codes, cats = store.obs_codes("cell_type")
    assert list(cats) == [f"t{i}" for i in range(8)] and codes[0] == 0 and codes[-1] == 7


@pytest.mark.parametrize("fmt", ["zarr", "h5ad"])
def test_stores_with_pandas_string_columns_as_anndata_writes_them(tmp_path, fmt):
    """pandas 3's default str dtype, as anndata writes it (its nullable-string encoding, once opted in)."""
    obs, var = position_frames()
    obs.index = pd.Index(obs.index, dtype="string")
    obs["sample"] = pd.array([f"s{v % 3}" for v in range(N_OBS)], dtype="string")
    var["feature_name"] = var["feature_name"].astype("string")
    path = tmp_path / f"strings.{fmt}"
    with ad.settings.override(allow_write_nullable_strings=True):
        getattr(ad.AnnData(reference(), obs=obs, var=var), f"write_{fmt}")(path)
    store = open_store(str(path), obs_filter="sample == 's1'")
    assert store._obs[store._obs.attrs["_index"]].attrs["encoding-type"] == "nullable-string-array"
    rows = np.array([0, 1, 2, 100])
    assert list(store.obs_names(rows)) == [f"c{3 * i + 1}" for i in rows]
    assert list(store.obs_names(np.array([5, 2]))) == ["c16", "c7"]
    codes, cats = store.obs_codes("sample")
    assert set(np.asarray(cats)[codes]) == {"s1"} and store.n_obs == len(range(1, N_OBS, 3))
    assert list(store.var_names[:2]) == ["G0", "G1"]  # feature_name, a nullable string column
    assert (store.read(rows).to_scipy() != reference()[3 * rows + 1]).nnz == 0


def test_our_writer_stores_pandas_strings_as_plain_string_arrays(tmp_path):
    obs, var = position_frames(n_obs=50)
    obs.index = pd.Index(obs.index, dtype="string")
    obs["sample"] = pd.array([f"s{v % 3}" for v in range(50)], dtype="string")
    obs["cell_type"] = obs["cell_type"].cat.rename_categories(pd.Index(obs["cell_type"].cat.categories, dtype="string"))
    writer = ZarrWriter(tmp_path / "w.zarr", N_VARS)
    writer.append(*position_rows(0, 50))
    path = writer.finish(obs, var)
    root = zarr.open_group(path, mode="r")
    assert root["obs/_index"].attrs["encoding-type"] == "string-array"
    assert root["obs/sample"].attrs["encoding-type"] == "string-array"
    assert root["obs/cell_type/categories"].attrs["encoding-type"] == "string-array"
    back = ad.read_zarr(path)
    assert list(back.obs_names[:2]) == ["c0", "c1"] and list(back.obs["sample"][:4]) == ["s0", "s1", "s2", "s0"]
    assert list(back.obs["cell_type"].cat.categories) == list(obs["cell_type"].cat.categories)


def test_our_zarr_is_anndata_readable(position_stores):
    adata = ad.read_zarr(position_stores["zarr"])
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert (adata.X != reference()).nnz == 0
    assert list(adata.obs.columns) == ["cell_type", "donor_id", "tissue_general", "is_primary_data"]


def test_our_soma_is_a_valid_experiment(position_stores):
    import tiledbsoma

    with tiledbsoma.Experiment.open(position_stores["soma"]) as exp:
        assert exp.obs.count == N_OBS
        x = exp.ms["RNA"].X["raw"].read().tables().concat()
        m = sp.csr_matrix(
            (x["soma_data"].to_numpy(), (x["soma_dim_0"].to_numpy(), x["soma_dim_1"].to_numpy())), shape=(N_OBS, N_VARS)
        )
        assert (m != reference()).nnz == 0


def test_unfiltered_reads_agree(position_stores):
    rows = np.array([1, 2, 3, 64, 65, 900])
    spread = np.sort(np.random.default_rng(0).choice(N_OBS, 300, replace=False))  # many ranges in one read
    for fmt in ("zarr", "zarr_dense", "soma", "h5ad", "h5ad_dense", "memory", "backed"):
        store = open_store(position_stores[fmt])
        for r in (rows, spread, np.arange(N_OBS), rows[:0]):
            assert (store.read(r).to_scipy() != reference()[r]).nnz == 0, fmt
        if fmt != "soma":  # SOMA names cells by soma_joinid
            assert list(store.obs_names(rows)) == [f"c{i}" for i in rows], fmt
        assert list(store.var_ids[:2]) == ["ENSG00000", "ENSG00001"], fmt


def test_anndata_in_memory_layers_and_formats():
    obs, var = position_frames()
    x = reference()
    adata = ad.AnnData(sp.csr_matrix(x.shape, dtype=np.float32), obs=obs, var=var, layers={"counts": x.tocsc()})
    adata.raw = ad.AnnData(x.astype(np.int32), obs=obs, var=var)
    rows = np.array([0, 3, 700, N_OBS - 1])
    with pytest.warns(UserWarning, match="CSC matrix converted to CSR"):
        assert (open_store(adata, layer="counts").read(rows).to_scipy() != x[rows]).nnz == 0
    assert (open_store(adata, layer="raw").read(rows).to_scipy() != x[rows]).nnz == 0
    assert open_store(adata).read(rows).nnz == 0
    with pytest.raises(StoreError, match=r"no layer 'spliced' \(have: X, raw, counts\)"):
        open_store(adata, layer="spliced")
    view = adata[adata.obs.donor_id == "d2"]  # a view in memory reads as its own cells
    store = open_store(view, layer="raw")
    assert store.n_obs == view.n_obs and (store.read(np.arange(3)).to_scipy() != x[[2, 7, 12]]).nnz == 0


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_raw_of_a_file_is_read_with_its_own_genes(tmp_path, fmt):
    """raw/X with raw/var (often all genes, X the selected ones) from an .h5ad and from AnnData-Zarr alike; each
    store names its other matrices (for the hint of a value that is not a count)."""
    obs, var = position_frames()
    x = reference()
    keep = np.arange(0, x.shape[1], 2)
    adata = ad.AnnData(x[:, keep].astype(np.float32) / 3, obs=obs, var=var.iloc[keep], layers={"c": x[:, keep]})
    adata.raw = ad.AnnData(x, obs=obs, var=var)
    path = tmp_path / f"a.{fmt}"
    adata.write_h5ad(path) if fmt == "h5ad" else adata.write_zarr(path)
    rows = np.array([0, 3, 700, N_OBS - 1])
    raw = open_store(path, layer="raw")
    assert raw.n_vars == x.shape[1] and list(raw.var_ids) == list(var.index)
    assert (raw.read(rows).to_scipy() != x[rows]).nnz == 0
    assert raw.other_layers == ("X", "c") and open_store(path).other_layers == ("raw", "c")
    assert open_store(path).n_vars == len(keep)
    with pytest.raises(StoreError, match=r"has no layers/d \(have: X, raw, c\)"):
        open_store(path, layer="d")


def test_h5ad_layouts_that_cannot_stream_are_named(tmp_path, position_stores):
    obs, var = position_frames()
    ad.AnnData(reference().tocsc(), obs=obs, var=var).write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(StoreError, match="csc.h5ad:X is CSC"):
        open_store(tmp_path / "csc.h5ad")
    (tmp_path / "text.h5ad").write_text("not hdf5")
    with pytest.raises(StoreError, match="text.h5ad is neither"):
        open_store(tmp_path / "text.h5ad")
    with pytest.raises(StoreError, match=r"pos.h5ad has no layers/counts \(have: X\)"):
        open_store(position_stores["h5ad"], layer="counts")
    backed = position_stores["backed"]
    with pytest.raises(StoreError, match="view of a backed AnnData"):
        open_store(backed[:10])


def test_slow_h5ad_layout_is_said_once_with_the_fix(position_stores):
    from loaders import anndata_store

    anndata_store._WARNED.discard(position_stores["h5ad_dense"])
    with pytest.warns(UserWarning, match=r"X is stored dense.*prepare .*pos_dense.h5ad --convert OUT.zarr"):
        open_store(position_stores["h5ad_dense"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_store(position_stores["h5ad_dense"])  # said once per file and process
        open_store(position_stores["h5ad"])  # the layout anndata writes by default streams fast: no notice


def test_filtered_read_with_gaps(position_stores, fmt):
    store = open_store(position_stores[fmt], obs_filter="donor_id in ['d1', 'd3']")
    expected = np.flatnonzero(np.isin(np.arange(N_OBS) % 5, [1, 3]))
    assert store.n_obs == len(expected)
    pos = np.arange(0, store.n_obs, 3)
    assert (store.read(pos).to_scipy() != reference()[expected[pos]]).nnz == 0
    codes, cats = store.obs_codes("donor_id")
    assert set(cats[np.unique(codes)]) == {"d1", "d3"}


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing", "does not exist"),
        ("not_a_store", "neither an AnnData-Zarr store, an .h5ad file nor a TileDB-SOMA"),
        ("bad_column", "obs column 'donr_id' not in store"),
        ("bad_filter_column", "column 'tisue_general', not in store .did you mean 'tissue_general'. have: tissue_g"),
        ("empty_filter", "matches 0 of"),
        ("csc_x", "csc.zarr:X is csc_matrix, neither csr_matrix nor a dense matrix: .*tocsr"),
    ],
)
def test_bad_input_gives_one_clear_error(tmp_path, position_stores, case, pattern):
    with pytest.raises(StoreError, match=pattern):
        if case == "missing":
            open_store(tmp_path / "nope.zarr")
        elif case == "not_a_store":
            (tmp_path / "plain").mkdir()
            open_store(tmp_path / "plain")
        elif case == "bad_column":
            open_store(position_stores["zarr"]).obs_codes("donr_id")
        elif case == "bad_filter_column":
            open_store(position_stores["soma"], obs_filter="tisue_general == 'blood'")
        elif case == "empty_filter":
            open_store(position_stores["zarr"], obs_filter="tissue_general == 'brain'")
        elif case == "csc_x":
            obs, var = position_frames()
            ad.AnnData(reference().tocsc(), obs=obs, var=var).write_zarr(tmp_path / "csc.zarr")
            open_store(tmp_path / "csc.zarr")


def test_unknown_and_repeated_genes_are_named(position_stores, fmt):
    store = open_store(position_stores[fmt])
    with pytest.raises(StoreError, match="1 requested genes not in store .*NOTAGENE"):
        store.gene_map(["G1", "NOTAGENE"])
    with pytest.raises(StoreError, match="repeats G1"):
        store.gene_map(["G1", "G2", "G1"])


def test_empty_filter_on_soma_is_an_error(position_stores):
    with pytest.raises(StoreError, match="matches 0 cells"):
        open_store(position_stores["soma"], obs_filter="tissue_general == 'brain'")


def test_coo_runs_out_of_row_order_become_csr():
    from loaders.soma_store import coo_rows_to_csr

    ids = np.array([3, 7, 8, 20])
    ref = reference()[ids]
    coo = ref.tocoo()
    dim0, dim1, data = ids[coo.row], coo.col, coo.data
    # two "fragments" returned in reverse order, each row-major inside
    split = np.searchsorted(dim0, 8)
    order = np.concatenate([np.arange(split, len(dim0)), np.arange(split)])
    m = coo_rows_to_csr(ids, dim0[order], dim1[order].astype(np.int32), data[order], N_VARS)
    assert (m.to_scipy() != ref).nnz == 0


def test_ensembl_ids_meet_across_versions_and_par_copies_stay_apart(tmp_path):
    """A GENCODE-versioned file (ENSG….17) meets a model or store of unversioned ids (the Census's) and the
    other way round, alone and in a collection; a PAR copy keeps its suffix, two versions of one gene are refused."""

    def store(ids, path=None):
        x = sp.csr_matrix(np.arange(2 * len(ids), dtype=np.float32).reshape(2, -1))
        obs = pd.DataFrame({"b": ["x", "y"]}, index=["c0", "c1"])
        adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=ids))
        if path is None:
            return open_store(adata)
        adata.write_h5ad(path)
        return str(path)

    versioned = store(["ENSG00000000003.15", "ENSG00000000005.6", "ENSG00000182378.14_PAR_Y", "OTHER"])
    colmap = versioned.gene_map(["ENSG00000000005", "OTHER", "ENSG00000000003"])
    np.testing.assert_array_equal(colmap, [2, 0, -1, 1])
    np.testing.assert_array_equal(store(["ENSG00000000005", "ENSG00000000003"]).gene_map(
        ["ENSG00000000003.15", "ENSG00000000005.6"]), [1, 0])  # fmt: skip
    with pytest.raises(StoreError, match="1 requested genes not in store .*ENSG00000182378$"):
        versioned.gene_map(["ENSG00000182378"])  # the Y copy is another gene than the X one
    with pytest.raises(
        StoreError, match="'ENSG00000000003' matches 2 genes of .*ENSG00000000003.15, ENSG00000000003.16"
    ):
        store(["ENSG00000000003.15", "ENSG00000000003.16"]).gene_map(["ENSG00000000003"])

    unversioned = store(["ENSG00000000005", "ONLYHERE", "ENSG00000000003"], tmp_path / "u.h5ad")
    both = open_store([unversioned, store(versioned.var_ids, tmp_path / "v.h5ad")])
    assert list(both.var_ids) == ["ENSG00000000005", "ENSG00000000003"]  # the intersection, not the empty set
    x = both.read(np.arange(4)).to_scipy().toarray()
    np.testing.assert_array_equal(x[:2], open_store(unversioned).read(np.arange(2)).to_scipy().toarray()[:, [0, 2]])
    np.testing.assert_array_equal(x[2:], versioned.read(np.arange(2)).to_scipy().toarray()[:, [1, 0]])
    outer = open_store([unversioned, str(tmp_path / "v.h5ad")], gene_join="outer")
    assert list(outer.var_ids) == [
        "ENSG00000000005",
        "ONLYHERE",
        "ENSG00000000003",
        "ENSG00000182378.14_PAR_Y",
        "OTHER",
    ]


def test_categorical_columns_as_anndata_before_0_8_wrote_them_read_as_categories(tmp_path, position_stores):
    """An anndata 0.7 .h5ad keeps a categorical obs column as integer codes whose `categories` attribute refers to
    obs/__categories/<column>: read as codes, batches and labels were numbers and a missing label class '-1'.
    Attributes written as fixed-length strings come back as bytes: the columns were not found at all."""
    import h5py

    adata = ad.read_h5ad(position_stores["h5ad"])
    adata.obs["label"] = pd.Categorical(np.where(np.arange(N_OBS) % 7 == 0, None, adata.obs.donor_id.astype(str)))
    adata.write_h5ad(tmp_path / "new.h5ad")
    adata.write_h5ad(tmp_path / "old.h5ad")
    with h5py.File(tmp_path / "old.h5ad", "a") as f:  # obs rewritten in the dataframe 0.1.0 encoding
        del f["obs"]
        g = f.create_group("obs")
        g.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.1.0", "_index": np.bytes_(b"_index")})
        g.attrs["column-order"] = np.array(list(adata.obs.columns), dtype="S")  # fixed-length, as R's writers do
        g.create_dataset("_index", data=list(adata.obs_names), dtype=h5py.string_dtype())
        for c, s in adata.obs.items():
            if isinstance(s.dtype, pd.CategoricalDtype):
                cats = g.create_dataset(f"__categories/{c}", data=list(s.cat.categories), dtype=h5py.string_dtype())
                g.create_dataset(c, data=s.cat.codes.to_numpy()).attrs["categories"] = cats.ref
            else:
                g.create_dataset(c, data=s.to_numpy())
    assert ad.read_h5ad(tmp_path / "old.h5ad").obs.label.isna().sum() == (np.arange(N_OBS) % 7 == 0).sum()
    where = "donor_id in ['d1', 'd3']"
    new, old = (open_store(tmp_path / f"{n}.h5ad", obs_filter=where) for n in ("new", "old"))
    assert old.n_obs == new.n_obs > 0
    for column in ("donor_id", "label"):
        (codes, cats), (want, want_cats) = old.obs_codes(column), new.obs_codes(column)
        assert list(cats) == list(want_cats) and np.array_equal(codes, want) and "-1" not in list(cats)
    assert (old.obs_codes("label")[0] < 0).sum() == (new.obs_codes("label")[0] < 0).sum() > 0


def test_a_soma_experiment_with_one_x_layer_not_named_raw_reads_it(tmp_path, position_stores):
    """tiledbsoma.io.from_anndata names X's layer "data": a store with that one layer is read without --layer;
    with several and none of them "raw" the choice is the user's, and the error lists them. Its cells are named
    by the AnnData's obs index, which it keeps as obs_id. A single measurement not named RNA is read likewise."""
    import tiledbsoma.io

    adata = ad.read_h5ad(position_stores["h5ad"])
    tiledbsoma.io.from_anndata(str(tmp_path / "one.soma"), adata, measurement_name="RNA")
    store = open_store(str(tmp_path / "one.soma"))
    assert store.layer == "data" and (store.read(np.arange(N_OBS)).to_scipy() != reference()).nnz == 0
    rows = np.array([9, 2, 700, 2])
    assert list(store.obs_names(rows)) == [f"c{i}" for i in rows]  # its obs_id: the AnnData's names
    filtered = open_store(str(tmp_path / "one.soma"), obs_filter="donor_id == 'd3'")
    assert list(filtered.obs_names(np.arange(3))) == [f"c{i}" for i in filtered.store_rows(np.arange(3))]
    adata.layers["counts"] = adata.X.copy()
    tiledbsoma.io.from_anndata(str(tmp_path / "two.soma"), adata, measurement_name="RNA")
    with pytest.raises(StoreError, match=r"has no X layer 'raw' \(have: (data, counts|counts, data)\)"):
        open_store(str(tmp_path / "two.soma"))
    assert open_store(str(tmp_path / "two.soma"), layer="counts").layer == "counts"
    tiledbsoma.io.from_anndata(str(tmp_path / "rna.soma"), adata, measurement_name="rna")  # its one measurement
    assert open_store(str(tmp_path / "rna.soma"), layer="data").measurement == "rna"
    with pytest.raises(StoreError, match=r"has no measurement 'RNA' \(have: rna\)"):
        open_store(str(tmp_path / "rna.soma"), measurement="RNA")  # asked for by name
