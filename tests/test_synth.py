"""The synthetic atlas: valid stores in both formats, the promised structure, bounded memory."""

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
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


# -- the harder presets hold what they claim ---------------------------------------------------------


def _lognorm(adata):
    x = adata.X.toarray()
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)


def _within_study_difference(x, obs, a, b):
    """Mean profile of mask a minus mask b inside the study holding most of both (no study effect)."""
    both = obs[a | b].dataset_id.astype(str)
    counts = [(min((a & (obs.dataset_id == s)).sum(), (b & (obs.dataset_id == s)).sum()), s) for s in both.unique()]
    n, study = max(counts)
    assert n >= 20, (n, study)
    in_s = (obs.dataset_id == study).to_numpy()
    return x[a.to_numpy() & in_s].mean(0) - x[b.to_numpy() & in_s].mean(0)


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    from bigatlas.synth import preset, truth

    path = tmp_path_factory.mktemp("hard") / "h.zarr"
    spec = synth(path, 12000, 400, "zarr", seed=7, preset_name="hard")
    obs = ad.read_zarr(path).obs.reset_index(drop=True)
    assert spec == preset("hard", 12000, 400, seed=7)
    return ad.read_zarr(path), obs, spec, truth(spec)


def test_subtle_subtypes_differ_in_their_few_marker_genes(hard):
    adata, obs, spec, tr = hard
    x = _lognorm(adata)
    assert all(len(m) == spec.subtype_genes for m in tr.markers) and spec.subtype_genes <= 10
    truth_type = obs.true_cell_type.astype(str)
    names = spec.fine_names
    checked = 0
    for f in range(spec.n_fine):
        if f in tr.rare:
            continue
        sibs = [g for g in range(spec.n_fine) if g // spec.n_fine_per_coarse == f // spec.n_fine_per_coarse and g != f]
        mine, theirs = truth_type == names[f], truth_type.isin([names[g] for g in sibs])
        if min(mine.sum(), theirs.sum()) < 200:
            continue
        d = _within_study_difference(x, obs, mine, theirs)
        others = np.setdiff1d(np.arange(spec.n_genes), np.concatenate([tr.markers[g] for g in [f, *sibs]]))
        marker_shift = d[tr.markers[f]].mean()
        assert marker_shift > 0.3, (names[f], marker_shift)
        assert marker_shift > 4 * np.abs(d[others]).mean(), (names[f], marker_shift, np.abs(d[others]).mean())
        checked += 1
    assert checked >= 4


def test_rare_types_are_under_one_percent_in_every_study(hard):
    _, obs, spec, tr = hard
    frac = obs.true_cell_type.astype(str).value_counts(normalize=True)
    names = [spec.fine_names[f] for f in tr.rare]
    assert len(names) == spec.rare_types >= 2
    per_study = pd.crosstab(obs.dataset_id, obs.true_cell_type, normalize="index")
    for name in names:
        assert 0.002 < frac[name] < 0.01, (name, frac[name])
        assert (per_study[name] < 0.02).all()
    assert (frac.drop(names) > 0.01).all()


def test_condition_changes_only_the_stated_types(hard):
    adata, obs, spec, tr = hard
    x = _lognorm(adata)
    coarse = obs.true_cell_type.astype(str).str.split(".").str[0].str[5:].astype(int)
    treated = obs.condition == "treated"
    assert (obs.condition_affected == (treated & coarse.isin(tr.affected))).all()
    assert set(obs.groupby("dataset_id", observed=True).condition.nunique()) == {2}
    rest = np.setdiff1d(np.arange(spec.n_genes), tr.response)
    for c in range(spec.n_coarse):
        d = _within_study_difference(x, obs, treated & (coarse == c), ~treated & (coarse == c))
        response, background = np.abs(d[tr.response]).mean(), np.abs(d[rest]).mean()
        if c in tr.affected:
            assert np.corrcoef(d[tr.response], tr.response_lfc)[0, 1] > 0.7, c
            assert response > 2.5 * background, (c, response, background)
        else:
            assert response < 1.6 * background, (c, response, background)


def test_cli_preset_writes_the_preset_and_options_keep_the_cells(tmp_path):
    """`--preset` is the library's preset; options that add effects (condition, type-specific batch
    effects) draw from a stream of their own, so the same seed keeps the same cells and donors."""
    from bigatlas.synth import SynthSpec, preset

    assert preset("default", 100, 10) == SynthSpec(100, 10)
    a, b, c = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "c.zarr"
    synth(a, 1500, 60, "zarr", seed=2, preset_name="subtle")
    assert main(["synth", str(b), "--cells", "1500", "--genes", "60", "--seed", "2", "--preset", "subtle"]) == 0
    xa, xb = ad.read_zarr(a), ad.read_zarr(b)
    assert (xa.X != xb.X).nnz == 0 and xa.obs.equals(xb.obs)
    synth(c, 1500, 60, "zarr", seed=2, preset_name="subtle", condition_types=1, type_batch_effect=0.3)
    xc = ad.read_zarr(c)
    assert xc.obs.true_cell_type.equals(xa.obs.true_cell_type) and xc.obs.donor_id.equals(xa.obs.donor_id)
    assert (xa.X != xc.X).nnz > 0
    with pytest.raises(ValueError, match="unknown synth preset 'nope'"):
        preset("nope", 10)


# -- the continuous preset: graded identities and a graded state -------------------------------------


@pytest.fixture(scope="module")
def continuous(tmp_path_factory):
    from bigatlas.synth import truth

    path = tmp_path_factory.mktemp("continuous") / "c.zarr"
    spec = synth(path, 6000, 300, "zarr", seed=5, preset_name="continuous")
    adata = ad.read_zarr(path)
    return _lognorm(adata), adata.obs.reset_index(drop=True), spec, truth(spec)


def test_cells_on_a_subtype_boundary_are_half_one_subtype_half_the_next(continuous):
    x, obs, spec, tr = continuous
    F = spec.n_fine_per_coarse
    fine = obs.true_cell_type.astype(str).map({n: i for i, n in enumerate(spec.fine_names)}).to_numpy()
    pos = obs.true_pseudotime.to_numpy()
    assert ((pos >= fine % F) & (pos < fine % F + 1)).all()  # the subtype is the segment the cell sits in
    for c in range(spec.n_coarse):
        for k in range(F - 1):
            siblings = [tr.markers[c * F + j] for j in range(F) if j != k]
            own = np.setdiff1d(tr.markers[c * F + k], np.concatenate([*siblings, tr.state]))

            def level(lo, hi, c=c, own=own):
                return x[(fine // F == c) & (pos >= lo) & (pos < hi)][:, own].mean()

            full = level(k + 0.35, k + 0.65) - level(k + 1.35, k + 1.65)  # centre of k vs centre of k + 1
            half = level(k + 0.9, k + 1.1) - level(k + 1.35, k + 1.65)  # the boundary between them
            assert full > 0.5, (c, k, full)
            assert 0.3 < half / full < 0.75, (c, k, half, full)


def test_the_activation_state_is_graded_in_every_type_and_differs_between_studies(continuous):
    x, obs, spec, tr = continuous
    state = obs.true_state.to_numpy()
    assert len(tr.state) == spec.state_genes and (tr.state_lfc > 0).all()
    per_study = obs.groupby("dataset_id", observed=True).true_state.mean()
    assert per_study.max() - per_study.min() > 0.2
    coarse = obs.true_cell_type.astype(str).str.split(".").str[0]
    rest = np.setdiff1d(np.arange(spec.n_genes), tr.state)
    for c in coarse.unique():
        study = obs[coarse == c].dataset_id.value_counts().index[0]  # one study: no study effect
        cells = ((coarse == c) & (obs.dataset_id == study)).to_numpy()
        on = np.corrcoef(x[cells][:, tr.state].mean(1), state[cells])[0, 1]
        off = np.corrcoef(x[cells][:, rest].mean(1), state[cells])[0, 1]
        assert on > 0.4 and on > off + 0.5, (c, on, off)


def test_ambient_rna_carries_each_studys_common_markers_into_every_cell_by_the_studys_share(tmp_path):
    """The same cells with and without the soup (its draws are a stream of their own): with it, every cell
    holds more of the markers of types other than its own, most in the studies whose stated share is
    largest; and mean library sizes differ between studies as between assays."""
    from bigatlas.synth import truth

    spec = synth(tmp_path / "a.zarr", 6000, 300, "zarr", seed=3, preset_name="ambient")
    synth(tmp_path / "none.zarr", 6000, 300, "zarr", seed=3, preset_name="ambient", ambient=0.0)
    soup, clean = ad.read_zarr(tmp_path / "a.zarr"), ad.read_zarr(tmp_path / "none.zarr")
    assert soup.obs.equals(clean.obs)
    tr = truth(spec)
    assert tr.ambient.shape == (spec.n_studies,) and 0.02 < tr.ambient.mean() < 0.2
    fine = soup.obs.true_cell_type.astype(str).map({n: i for i, n in enumerate(spec.fine_names)}).to_numpy()
    foreign = np.zeros((spec.n_fine, spec.n_genes), bool)  # markers of every other type, not the cell's own
    for f in range(spec.n_fine):
        foreign[f, np.concatenate([tr.markers[g] for g in range(spec.n_fine) if g != f])] = True
        foreign[f, tr.markers[f]] = False

    def foreign_share(adata):
        x = adata.X.toarray()
        return (x * foreign[fine]).sum(1) / np.maximum(x.sum(1), 1)

    study = soup.obs.dataset_id.cat.codes.to_numpy()
    rise = np.array([(foreign_share(soup) - foreign_share(clean))[study == s].mean() for s in range(spec.n_studies)])
    assert (rise > 0).all(), rise
    assert np.corrcoef(rise, tr.ambient)[0, 1] > 0.8, (rise, tr.ambient)
    library = pd.Series(np.asarray(clean.X.sum(1)).ravel()).groupby(study).mean()
    assert library.max() / library.min() > 2, library


def test_tissue_resident_types_are_found_only_in_their_tissues_studies(tmp_path):
    """The tissues preset: each resident coarse type has cells in every study of its tissue and in no other
    study; every other type is found in every study; obs `tissue_resident` marks exactly those cells; and each
    resident type is its twin plus its own genes."""
    from bigatlas.synth import SynthSpec, truth

    spec = synth(tmp_path / "t.zarr", 6000, 300, "zarr", seed=4, preset_name="tissues")
    obs = ad.read_zarr(tmp_path / "t.zarr").obs
    present = truth(spec).present
    assert present.shape == (spec.n_studies, spec.n_coarse)
    assert (~present).any(0).sum() == spec.tissue_types  # that many types miss from some studies, no more
    coarse = obs.true_cell_type.astype(str).str.split(".").str[0].str[5:].astype(int).to_numpy()
    study = obs.dataset_id.astype(str).str[6:].astype(int).to_numpy()
    counts = np.zeros_like(present, dtype=int)
    np.add.at(counts, (study, coarse), 1)
    assert ((counts > 0) == present).all(), counts
    resident = (~present).any(0)
    assert (obs.tissue_resident.to_numpy() == resident[coarse]).all()
    for c in np.flatnonzero(resident):  # one tissue per resident type, the one its studies are from
        assert obs.tissue_general[coarse == c].nunique() == 1
    # in the same study a resident subtype differs from its twin's most in the resident type's own genes
    tr, x = truth(spec), ad.read_zarr(tmp_path / "t.zarr").X.toarray()
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    fine = obs.true_cell_type.astype(str).map({n: i for i, n in enumerate(spec.fine_names)}).to_numpy()
    F = spec.n_fine_per_coarse
    for r in np.flatnonzero(resident):
        assert tr.twin[r] >= 0 and not resident[tr.twin[r]]
        pairs = [(r * F + j, tr.twin[r] * F + j, s) for j in range(F) for s in range(spec.n_studies)]
        f, t, s = max(
            pairs, key=lambda p: min(((fine == p[0]) & (study == p[2])).sum(), ((fine == p[1]) & (study == p[2])).sum())
        )
        diff = x[(fine == f) & (study == s)].mean(0) - x[(fine == t) & (study == s)].mean(0)
        top = np.argsort(-diff)[: spec.resident_genes]
        assert np.isin(top, tr.resident_genes[r]).mean() >= 0.7, (r, np.isin(top, tr.resident_genes[r]).mean())
    with pytest.raises(ValueError, match="tissue_types"):
        SynthSpec(n_cells=10, n_coarse=4, rare_types=3, tissue_types=2)
