"""The synthetic atlas: valid stores in both formats, the promised structure, bounded memory."""

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from bigatlas.cli import main
from bigatlas.synth import synth
from loaders import open_store


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    z, s = root / "a.zarr", root / "a.soma"
    synth(z, 6000, 300, "zarr", seed=3)
    synth(s, 6000, 300, "soma", seed=3)
    return str(z), str(s)


def test_census_like_columns_and_labels(atlas):
    adata = ad.read_zarr(atlas[0])
    obs = adata.obs
    for col in [
        "dataset_id",
        "donor_id",
        "assay",
        "cell_type",
        "cell_type_coarse",
        "tissue_general",
        "is_primary_data",
        "soma_joinid",
        "true_cell_type",
    ]:
        assert col in obs
    assert {"feature_id", "feature_name"} <= set(adata.var.columns)
    undefined = (obs.cell_type == "undefined").mean()
    assert 0.04 < undefined < 0.11
    assert (obs.true_cell_type != "undefined").all()
    labelled = obs[obs.cell_type != "undefined"]
    assert (labelled.cell_type.astype(str) == labelled.true_cell_type.astype(str)).all()
    fine_parent = labelled.cell_type.astype(str).str.split(".").str[0]
    assert (fine_parent == labelled.cell_type_coarse.astype(str)).all()
    donors_per_study = obs.groupby("dataset_id", observed=True).donor_id.nunique()
    assert (donors_per_study > 1).all()
    assert np.all(adata.X.data == np.round(adata.X.data)) and adata.X.data.min() > 0


def test_zarr_and_soma_hold_the_same_atlas(atlas):
    z, s = (open_store(u) for u in atlas)
    rows = np.arange(0, 6000, 37)
    assert (z.read(rows).to_scipy() != s.read(rows).to_scipy()).nnz == 0
    assert np.array_equal(z.obs_codes("cell_type")[0], s.obs_codes("cell_type")[0])


def test_study_effects_exceed_donor_effects(atlas):
    adata = ad.read_zarr(atlas[0])
    x = np.log1p(adata.X.toarray() / adata.X.sum(1).A * 1e4)
    obs = adata.obs.reset_index(drop=True)
    t = obs.true_cell_type.value_counts().index[0]

    def profile(mask):
        return x[mask.to_numpy()].mean(0)

    sel = obs.true_cell_type == t
    studies = obs[sel].dataset_id.value_counts().index[:2]
    s0, s1 = (sel & (obs.dataset_id == st) for st in studies)
    d = obs[s0].donor_id.value_counts().index[:2]
    d0, d1 = (s0 & (obs.donor_id == dd) for dd in d)
    between_studies = np.abs(profile(s0) - profile(s1)).mean()
    between_donors = np.abs(profile(d0) - profile(d1)).mean()
    assert between_studies > 1.3 * between_donors


def test_cell_type_order_is_sorted(tmp_path):
    synth(tmp_path / "sorted.zarr", 3000, 100, "zarr", order="cell_type")
    codes = open_store(tmp_path / "sorted.zarr").obs_codes("true_cell_type")[0]
    assert np.all(np.diff(codes) >= 0)


def _peak_rss_mb(out, cells):
    code = (
        "import resource, sys; from bigatlas.cli import main; "
        f"main(['synth', {str(out)!r}, '--cells', '{cells}', '--genes', '500']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def test_generation_memory_is_bounded_by_the_chunk(tmp_path):
    small = _peak_rss_mb(tmp_path / "s.zarr", 10_000)
    large = _peak_rss_mb(tmp_path / "l.zarr", 80_000)
    assert large < 1.25 * small, json.dumps({"small_mb": small, "large_mb": large})


def test_cli_synth_refuses_to_overwrite_and_reports(tmp_path, capsys):
    out = str(tmp_path / "c.zarr")
    assert main(["synth", out, "--cells", "500", "--genes", "50"]) == 0
    assert main(["synth", out, "--cells", "500", "--genes", "50"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["stream", out, "--batch-size", "64", "--obs-keys", "cell_type"]) == 0
    assert "epoch 0: 500 cells" in capsys.readouterr().out
    assert main(["stream", str(tmp_path / "missing.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
