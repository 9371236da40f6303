"""Census slices: `census:<version>` specs resolve through cellxgene_census (here pointed at a local
SOMA collection with the Census layout), offline fails in one line, and a filtered, gene-selected
training run sees exactly the matching cells and only the listed genes, in file order."""

import json

import numpy as np
import pandas as pd
import pytest

from bigatlas.batches import holdout_mask
from bigatlas.cli import main
from bigatlas.synth import synth
from loaders import StoreError, census_spec, open_store

FILTER = "tissue_general == 'blood' and is_primary_data == True"


@pytest.fixture(scope="module")
def local_census(tmp_path_factory):
    """A SOMA collection laid out like the Census: census_data/<organism> = experiment."""
    import tiledbsoma as soma

    root = tmp_path_factory.mktemp("census")
    exp = root / "homo_sapiens"
    synth(exp, 1500, 80, "soma", seed=6, n_studies=3, donors_per_study=2)
    with soma.Collection.create(str(root / "census")) as census:
        data = census.add_new_collection("census_data")
        with soma.Experiment.open(str(exp)) as e:
            data.set("homo_sapiens", e, use_relative_uri=False)
    return root / "census", exp


@pytest.fixture
def census_here(local_census, monkeypatch):
    import cellxgene_census
    import tiledbsoma as soma

    opened = []

    def open_soma(*, census_version="stable", **kw):
        opened.append(census_version)
        return soma.Collection.open(str(local_census[0]))

    monkeypatch.setattr(cellxgene_census, "open_soma", open_soma)
    return opened


def test_spec_folds_in_the_organism():
    assert census_spec("census:2025-01-30", "Mus musculus") == "census:2025-01-30/mus_musculus"
    assert census_spec("census:", None) == "census:stable/homo_sapiens"
    assert census_spec("data.zarr", None) == "data.zarr"
    with pytest.raises(StoreError, match="--organism applies to census"):
        census_spec("data.zarr", "homo_sapiens")


def test_offline_census_is_one_clear_error(monkeypatch, capsys):
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens: offline, whatever the machine
    monkeypatch.setenv("NO_PROXY", "")
    assert main(["stream", "census:2025-01-30", "--organism", "Homo sapiens"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "cannot open CELLxGENE Census version '2025-01-30'" in err


def test_unknown_organism_names_the_available_ones(census_here):
    with pytest.raises(StoreError, match=r"no organism 'danio_rerio' \(have: homo_sapiens\)"):
        open_store("census:2025-01-30/danio_rerio")
    assert census_here == ["2025-01-30"]


def test_soma_reads_only_the_requested_genes(local_census):
    store = open_store(str(local_census[1]))
    rows = np.arange(0, store.n_obs, 3)
    full = store.read(rows).to_scipy().toarray()
    keep = np.array([3, 70, 11, 40])
    store.restrict_columns(keep)
    part = store.read(rows).to_scipy().toarray()
    assert np.array_equal(part[:, keep], full[:, keep]) and full[:, keep].sum() > 0
    others = np.setdiff1d(np.arange(store.n_vars), keep)
    assert part[:, others].sum() == 0 and full[:, others].sum() > 0


def test_filtered_training_sees_exactly_the_filtered_cells_and_listed_genes(census_here, local_census, tmp_path):
    import tiledbsoma as soma

    with soma.Experiment.open(str(local_census[1])) as e:
        obs = e.obs.read().concat().to_pandas()
        var = e.ms["RNA"].var.read().concat().to_pandas()
    genes = list(var.feature_id.sample(25, random_state=0))  # not in store order
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "census:2025-01-30",
                "--organism",
                "Homo sapiens",
                "--obs-filter",
                FILTER,
                "--genes",
                str(tmp_path / "genes.txt"),
                "--batch-key",
                "dataset_id",
                "--label-keys",
                "cell_type",
                "--out",
                str(run),
                "--max-epochs",
                "2",
                "--batch-size",
                "64",
                "--trace-cells",
            ]
        )
        == 0
    )
    assert json.loads((run / "vocab.json").read_text())["genes"] == genes
    assert json.loads((run / "config.json").read_text())["config"]["data"]["data"] == "census:2025-01-30/homo_sapiens"
    expected = np.sort(obs.soma_joinid[(obs.tissue_general == "blood") & obs.is_primary_data].to_numpy())
    store = open_store("census:2025-01-30/homo_sapiens", obs_filter=FILTER)
    assert np.array_equal(store.store_rows(np.arange(store.n_obs)), expected)
    val = holdout_mask(np.arange(store.n_obs), 0.05, 0)
    for epoch in range(2):
        seen = np.load(run / "trace" / f"rank0_epoch{epoch}.npy")
        assert np.array_equal(np.sort(seen), np.flatnonzero(~val)), epoch  # each training cell once
    assert set(pd.unique(obs.set_index("soma_joinid").loc[expected, "tissue_general"])) == {"blood"}
