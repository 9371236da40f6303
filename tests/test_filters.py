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
]
FAIL = {
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
