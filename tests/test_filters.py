"""One filter language: TileDB-SOMA value_filter syntax, evaluated by TileDB for SOMA and by pandas for
Zarr, selects the same cells of the same atlas in both formats, or fails with the same clear error."""

import numpy as np
import pytest

from bigatlas.synth import synth
from loaders import StoreError, open_store

SELECT = [
    "tissue_general == 'blood'",
    "tissue_general != 'blood'",
    "soma_joinid < 500",
    "soma_joinid >= 100 and soma_joinid < 300",
    "soma_joinid in [1, 5, 9, 1999]",
    "tissue_general in ['blood', 'lung']",
    "is_primary_data == True",
    "is_primary_data == False or tissue_general == 'kidney'",
    "(tissue_general == 'lung' or tissue_general == 'kidney') and is_primary_data == True",
    'assay == "10x 3\' v2"',  # a quoted string with spaces (and a quote inside)
    "cell_type == 'type_0.1' and dataset_id != 'study_1'",
    "dataset_id in ['study_0', 'study_2'] and (soma_joinid < 1500 or tissue_general == 'blood')",
    "not (tissue_general == 'blood' or soma_joinid < 500)",  # tiledbsoma crashed negating all three of these
    "not (tissue_general in ['blood', 'lung'])",
    "not not (is_primary_data == True and soma_joinid >= 1000)",
    "(tissue_general == 'blood') & (soma_joinid < 1500) | (dataset_id == 'study_2')",  # TileDB's & and |
    "not ((tissue_general == 'lung') | (soma_joinid < 300))",
]
FAIL = {
    "tissue_general == 'blood' & is_primary_data == True": "obs_filter \"tissue_general == 'blood' & is_primary_data "
    '== True" failed on',  # & binds tighter than ==: the message says so
    "tissue == 'blood'": "obs_filter \"tissue == 'blood'\" names obs column 'tissue', not in store",
    "tissue_general == ": "obs_filter 'tissue_general == ' failed on",
    "tissue_general === 'blood'": "obs_filter \"tissue_general === 'blood'\" failed on",
}


@pytest.fixture(scope="module")
def atlases(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    for fmt in ("zarr", "soma"):
        synth(root / f"a.{fmt}", 2000, 30, fmt, seed=6)  # the same cells in both formats
    return {fmt: str(root / f"a.{fmt}") for fmt in ("zarr", "soma")}


@pytest.mark.parametrize("expr", SELECT)
def test_same_cells_in_both_formats(atlases, expr):
    picked = {}
    for fmt, uri in atlases.items():
        store = open_store(uri, obs_filter=expr)
        picked[fmt] = store.store_rows(np.arange(store.n_obs))
    assert 0 < len(picked["zarr"]) < 2000, expr  # the expression selects something, not everything
    assert np.array_equal(np.sort(picked["zarr"]), np.sort(picked["soma"])), expr


@pytest.mark.parametrize("expr", FAIL)
def test_same_clear_error_in_both_formats(atlases, expr):
    for uri in atlases.values():
        with pytest.raises(StoreError) as e:
            open_store(uri, obs_filter=expr)
        assert str(e.value).startswith(FAIL[expr]), (uri, str(e.value))


def test_a_missing_value_of_a_nullable_column_matches_no_filter_as_in_tiledb(tmp_path):
    """Columns with missing values (Int64 and string with <NA>, a categorical with NaN) select the same cells in
    memory, in .h5ad / Zarr files and in SOMA, where TileDB leaves a null out of every comparison (`!=` and
    `not in` included); an integer column's categories agree too."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import tiledbsoma.io

    n = 40
    obs = pd.DataFrame(
        {
            "score": pd.array([None if i % 5 == 0 else i % 4 for i in range(n)], dtype="Int64"),
            "site": pd.array([None if i % 7 == 0 else "ab"[i % 2] for i in range(n)], dtype="string"),
            "label": pd.Categorical([None if i % 3 == 0 else "xy"[i % 2] for i in range(n)]),  # unlabelled: NaN
        },
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(sp.csr_matrix(np.ones((n, 3), np.float32)), obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2"]))
    adata.write_h5ad(tmp_path / "a.h5ad")
    adata.write_zarr(tmp_path / "a.zarr")
    tiledbsoma.io.from_anndata(str(tmp_path / "a.soma"), adata, measurement_name="RNA", X_layer_name="raw")
    sources = {"memory": adata, **{f: str(tmp_path / f"a.{f}") for f in ("h5ad", "zarr", "soma")}}
    for expr, want in (
        ("score > 1", [i for i in range(n) if i % 5 and i % 4 > 1]),
        ("site != 'b'", [i for i in range(n) if i % 7 and i % 2 == 0]),
        ("score == 3 or site == 'b'", [i for i in range(n) if (i % 5 and i % 4 == 3) or (i % 7 and i % 2)]),
        ("label != 'x'", [i for i in range(n) if i % 3 and i % 2]),
        ("label not in ['x'] and not score < 2", [i for i in range(n) if i % 3 and i % 2 and i % 5 and i % 4 >= 2]),
        ("not (site == 'a' or score == 1)", [i for i in range(n) if i % 7 and i % 2 and i % 5 and i % 4 != 1]),
        ("not (site == 'a' and score == 1)", [i for i in range(n) if (i % 7 and i % 2) or (i % 5 and i % 4 != 1)]),
    ):
        for name, data in sources.items():
            store = open_store(data, obs_filter=expr)
            assert list(store.store_rows(np.arange(store.n_obs))) == want, (name, expr)
    for name, data in sources.items():
        codes, cats = open_store(data).obs_codes("score")
        assert list(cats) == ["0", "1", "2", "3"] and np.array_equal(codes < 0, np.arange(n) % 5 == 0), name


def test_pushing_not_into_the_comparisons_selects_the_same_rows_under_three_valued_logic():
    """The rewrite SOMA filters get (tiledbsoma crashed negating more than one comparison) is exact, missing
    values included, and leaves no `not` in front of anything but a plain comparison."""
    import pandas as pd

    from loaders.filter_eval import evaluate, without_not

    rng = np.random.default_rng(0)
    n = 500
    columns = {
        "a": pd.array(np.where(rng.random(n) < 0.2, None, rng.integers(0, 5, n)), dtype="Int64"),
        "b": pd.Categorical(np.where(rng.random(n) < 0.2, None, rng.choice(["x", "y", "z"], n))),
        "c": np.where(rng.random(n) < 0.2, np.nan, rng.random(n)),
        "d": rng.random(n) < 0.5,
    }
    for expr in (
        "not (a == 1 or b == 'x')", "not (a < 3 and not (b in ['x', 'y'] or c > 0.5))", "not not (c <= 0.3)",
        "not (b not in ['z'])", "not (1 < a < 4)", "not d or not (a != 2)", "not (d and c >= 0.1)",
    ):  # fmt: skip
        rewritten = without_not(expr)
        assert "not (" not in rewritten and "not not" not in rewritten, rewritten
        assert np.array_equal(evaluate(rewritten, columns, n), evaluate(expr, columns, n)), (expr, rewritten)
    missing = np.asarray(pd.isna(columns["a"]))
    assert not evaluate("a != 1", columns, n)[missing].any() and not evaluate("not a == 1", columns, n)[missing].any()
    assert evaluate("a == 1 or d", columns, n)[missing & columns["d"]].all()  # unknown or true: true
