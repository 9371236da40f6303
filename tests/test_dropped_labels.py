"""`--drop-labels KEY=FILE`: the listed cells train without that label, everywhere the run reads labels (class
counts, minibatches, the reference's kNN voters), from the run's own copy of the list once it started; a
list naming cells the data lacks, or names the data repeats, is refused before training."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from bigatlas.batches import holdout_all
from bigatlas.config import DataConfig, RunConfig, TrainConfig
from bigatlas.dropped_labels import listed_cells, read_cells
from bigatlas.reference import read_reference
from bigatlas.rundir import RunDir
from bigatlas.synth import synth
from bigatlas.train import make_accelerator, train
from bigatlas.vocab import defined_labels
from loaders import CellStream, open_store


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("drop")
    data = root / "atlas.zarr"
    synth(data, 1500, 100, "zarr", seed=3, n_studies=3, donors_per_study=2)
    names = ad.read_zarr(data).obs_names.to_numpy().astype(str)
    listed = np.random.default_rng(0).choice(names, 200, replace=False)
    pd.DataFrame({"cell": listed, "label": "x"}).to_csv(root / "drop.csv", index=False)
    return data, root / "drop.csv", np.isin(names, listed)


def _config(data, drop, epochs=1):
    return RunConfig(
        train=TrainConfig(max_epochs=epochs, reference_umap=False, reference_cells=1000),
        data=DataConfig(data=str(data), batch_key="dataset_id", label_keys=("cell_type",),
                        drop_labels=(f"cell_type={drop}",)),
    )  # fmt: skip


def test_listed_cells_train_unlabelled_and_a_resume_reads_the_runs_copy(atlas, tmp_path):
    data, drop, dropped = atlas
    cfg = _config(data, drop)
    train(cfg, tmp_path / "run", accelerator=make_accelerator(cfg))
    run = RunDir(tmp_path / "run")
    labels = defined_labels(*open_store(str(data)).obs_codes("cell_type"))
    codes = np.asarray(labels.codes)
    kept = ~holdout_all(len(codes), cfg.train.val_fraction, cfg.train.seed) & ~dropped
    expected = np.bincount(codes[kept & (codes >= 0)], minlength=len(labels.categories))
    assert run.read_vocab().class_counts["cell_type"] == expected.tolist()
    assert (codes[dropped] >= 0).sum() > 100  # the list drops real labels, so the counts above differ
    ref = read_reference(tmp_path / "run")
    at_dropped = dropped[ref.arrays["position"]]
    assert at_dropped.any() and (ref.arrays["labels"][at_dropped, 0] == -1).all()
    assert (ref.arrays["labels"][~at_dropped & (codes[ref.arrays["position"]] >= 0), 0] >= 0).all()
    copy = pd.read_csv(run.dropped_labels / "cell_type.csv").cell.astype(str)
    assert sorted(copy) == sorted(read_cells(drop).cell)

    moved = drop.with_name("moved.csv")  # the user's file gone: the resumed run reads its own copy
    drop.rename(moved)
    try:
        longer = _config(data, drop, epochs=2)
        train(longer, tmp_path / "run", resume=True, accelerator=make_accelerator(longer))
    finally:
        moved.rename(drop)
    assert RunDir(tmp_path / "run").read_vocab().class_counts["cell_type"] == expected.tolist()


def test_dropping_is_training_on_a_copy_with_those_labels_unknown(atlas, tmp_path):
    """The same seed on a copy of the store whose listed labels were rewritten to 'undefined': the same weights,
    bit for bit (class counts, minibatch labels and the early-stopping validation alike)."""
    import shutil

    import zarr
    from safetensors.torch import load_file

    data, drop, dropped = atlas
    copy = tmp_path / "edited.zarr"
    shutil.copytree(data, copy)
    codes = zarr.open_group(str(copy), mode="r+")["obs/cell_type/codes"]
    cats = list(ad.read_zarr(data).obs.cell_type.cat.categories)
    edited = codes[:]
    edited[dropped] = cats.index("undefined")
    codes[:] = edited
    cfg = _config(data, drop, epochs=2)
    plain = RunConfig(
        train=cfg.train, data=DataConfig(data=str(copy), batch_key="dataset_id", label_keys=("cell_type",))
    )
    for c, out in ((cfg, "dropped"), (plain, "edited")):
        train(c, tmp_path / out, accelerator=make_accelerator(c))
    a, b = (load_file(str(RunDir(tmp_path / out).weights_file)) for out in ("dropped", "edited"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_masked_column_streams_as_missing_at_the_listed_cells_only(atlas):
    data, drop, dropped = atlas
    store = open_store(str(data))
    before = store.obs_codes("cell_type")[0].copy()
    store.mask_obs("cell_type", dropped)
    stream = CellStream(store, batch_size=256, seed=1, obs_keys=("cell_type",))
    seen = 0
    for batch in stream:
        pos, codes = batch.index.numpy(), batch.obs["cell_type"].numpy()
        assert (codes[dropped[pos]] == -1).all()
        assert (codes[~dropped[pos]] == before[pos[~dropped[pos]]]).all()
        seen += len(pos)
    assert seen == store.n_obs
    with pytest.raises(ValueError, match="a mask of"):
        store.mask_obs("cell_type", dropped[:-1])


def test_a_list_of_other_cells_or_repeated_names_is_refused(atlas, tmp_path):
    data, drop, _ = atlas
    store = open_store(str(data))
    listed = read_cells(drop)
    assert list(listed.columns) == ["cell"] and listed.cell.is_unique
    more = pd.concat([listed, pd.DataFrame({"cell": ["nobody_1", "nobody_2"]})], ignore_index=True)
    with pytest.raises(ValueError, match=r"lists 2 cells that are not in .*: nobody_1, nobody_2"):
        listed_cells(store, more, drop)
    adata = ad.read_zarr(data)
    adata.obs_names = np.where(np.arange(adata.n_obs) % 2, "same", adata.obs_names)
    with pytest.raises(ValueError, match="not unique.*'row' column"):
        listed_cells(open_store(adata), pd.DataFrame({"cell": ["same"]}), drop)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="no columns"):
        read_cells(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_cells(tmp_path / "missing.csv")
    bad = tmp_path / "bad_row.csv"
    pd.DataFrame({"cell": ["cell_1", "cell_2"], "row": ["1", "two"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="row 'two' that is not a cell id"):
        read_cells(bad)


def test_cell_ids_find_cells_whose_names_repeat_and_must_agree_with_the_names(atlas):
    """Barcodes repeat across samples: a list with a `row` column (Store.cell_ids) is matched by it, under
    any obs filter, and each row's name is checked against the store's."""
    data, _, _ = atlas
    adata = ad.read_zarr(data)
    adata.obs_names = [f"AAAC-{i % 7}" for i in range(adata.n_obs)]
    path = data.with_name("barcodes.zarr")
    adata.write_zarr(path)
    one = open_store(str(path), obs_filter="dataset_id == 'study_1'")
    ids = one.cell_ids(np.arange(one.n_obs))
    assert (ids == np.flatnonzero(adata.obs.dataset_id == "study_1")).all()  # the unfiltered row numbers
    pick = np.array([3, 10, 11, 50])
    listed = pd.DataFrame({"cell": one.obs_names(pick).astype(str), "row": ids[pick]})
    assert (np.flatnonzero(listed_cells(one, listed, "l.csv")) == pick).all()
    assert (np.flatnonzero(listed_cells(open_store(str(path)), listed, "l.csv")) == ids[pick]).all()
    with pytest.raises(ValueError, match=r"l.csv: row \d+ is cell 'nobody' there but 'AAAC-\d' in"):
        listed_cells(one, listed.assign(cell="nobody"), "l.csv")
    with pytest.raises(ValueError, match="lists 1 cells that are not in"):
        listed_cells(one, pd.DataFrame({"cell": ["AAAC-0"], "row": [ids[-1] + 1_000_000]}), "l.csv")


@pytest.mark.parametrize(
    "drop, keys, message",
    [
        (("cell_type",), ("cell_type",), "takes KEY=FILE"),
        (("cell_typo=x.csv",), ("cell_type",), "names label key 'cell_typo' but the label keys are: cell_type"),
        (("cell_type=x.csv",), (), "label keys are: none"),
        (("cell_type=x.csv", "cell_type=y.csv"), ("cell_type",), "twice"),
    ],
)
def test_a_malformed_drop_is_refused_with_the_config(drop, keys, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(data="x.zarr", batch_key="b", label_keys=keys, drop_labels=drop)
