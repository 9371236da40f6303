"""Unlabelled cells are named, not guessed: only the listed values (default 'undefined') and missing
labels are unlabelled; a real class called 'unknown' stays a class; training says the counts at start."""

import pandas as pd
import pytest
from conftest import write_position_store

from bigatlas.config import DataConfig
from bigatlas.vocab import Vocab, defined_labels, unlabeled_report
from loaders import open_store

LABELS = ["undefined", "unknown", "Undefined", "nan", "", "t1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = write_position_store(tmp_path_factory.mktemp("labels") / "s.zarr", "zarr", n_obs=60)
    return open_store(path)


def test_only_named_values_and_missing_are_unlabelled():
    codes = pd.Series([0, 1, 2, 3, 4, 5, -1])
    got = defined_labels(codes.to_numpy(), LABELS)
    assert list(got.categories) == ["unknown", "Undefined", "nan", "", "t1"]  # exact match: these are classes
    assert list(got.codes) == [-1, 0, 1, 2, 3, 4, -1]  # 'undefined' and the missing value are not
    named = defined_labels(codes.to_numpy(), LABELS, ("undefined", "unknown"))
    assert list(named.categories) == ["Undefined", "nan", "", "t1"]
    assert list(named.codes) == [-1, -1, 0, 1, 2, 3, -1]


def test_vocab_and_start_message_follow_the_named_categories(store):
    keep = DataConfig(data=store.uri, batch_key="donor_id", label_keys=("cell_type",))
    drop = DataConfig(data=store.uri, batch_key="donor_id", label_keys=("cell_type",), unlabeled_categories=("t0",))
    assert "t0" in Vocab.from_store(store, keep).label_classes["cell_type"]
    assert "t0" not in Vocab.from_store(store, drop).label_classes["cell_type"]
    n_t0 = int((store.obs_codes("cell_type")[0] == 0).sum())
    assert unlabeled_report(store, keep) == [
        "label key 'cell_type': 8 classes; 0 of 60 cells unlabelled ('undefined' or missing)"
    ]
    assert unlabeled_report(store, drop) == [
        f"label key 'cell_type': 7 classes; {n_t0} of 60 cells unlabelled ('t0' or missing)"
    ]


def test_the_flag_reaches_the_config():
    import argparse

    from bigatlas.flags import add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    a = p.parse_args(["--data", "x", "--batch-key", "b", "--out", "o", "--unlabeled-category", "unknown",
                      "--unlabeled-category", "n/a"])  # fmt: skip
    assert config_from_args(a).data.unlabeled_categories == ("unknown", "n/a")
    a = p.parse_args(["--data", "x", "--batch-key", "b", "--out", "o"])
    assert config_from_args(a).data.unlabeled_categories == ("undefined",)


def test_a_class_named_like_no_annotation_is_said_with_the_flag_that_makes_it_unlabelled():
    import anndata as ad
    import numpy as np

    from bigatlas import AtlasVAE

    labels = ["T cell"] * 5 + ["Unknown"] * 3 + ["B cell"] * 4
    adata = ad.AnnData(np.ones((12, 3), np.float32), obs=pd.DataFrame({"ct": labels, "b": ["x"] * 12}))
    adata.obs_names = [f"c{i}" for i in range(12)]
    store = open_store(adata)
    cfg = DataConfig(data="m", batch_key="b", label_keys=("ct",))
    lines = unlabeled_report(store, cfg)
    assert len(lines) == 2 and "class 'Unknown' (3 cells)" in lines[1] and "--unlabeled-category 'Unknown'" in lines[1]
    model = AtlasVAE(adata, batch_key="b", label_keys="ct", unlabeled_categories="Unknown")
    assert model.config.data.unlabeled_categories == ("Unknown",)
    assert unlabeled_report(store, model.config.data) == [
        "label key 'ct': 2 classes; 3 of 12 cells unlabelled ('Unknown' or missing)"
    ]
