"""The batch-mixing options (batch_adversary, batch_align) in a whole run: training logs each one's term per
epoch, the weights or buffers it adds are in the model, surgery maps a query without it and leaves the
reference's latents as they were, and a negative weight is refused."""

import numpy as np
import pandas as pd
import pytest
from batch_toy import reference_and_query

from bigatlas import AtlasVAE
from bigatlas.config import ModelConfig


def run_and_map(tmp_path, model_settings: dict, label_keys=()):
    """A 2-epoch reference run with the model settings, its metrics.csv, and a query mapped by surgery (one
    epoch; only the new batches' rows train), checked to leave the reference's latents as they were."""
    data, query = reference_and_query(tmp_path)
    settings = {"model": model_settings, "train": {"max_epochs": 2}}
    model = AtlasVAE(str(data), batch_key="dataset_id", label_keys=list(label_keys), **settings).fit(tmp_path / "run")
    log = pd.read_csv(tmp_path / "run" / "metrics.csv")
    before = model.get_latent(str(data))
    mapped = model.map_query(query, tmp_path / "mapped", epochs=1)
    assert np.array_equal(mapped.get_latent(str(data)), before)
    return model, log, mapped


@pytest.mark.parametrize(
    "setting,weight,column,state,attribute",
    [
        ("batch_adversary", 5.0, "adversary", "adversary.0.weight", "adversary"),
        ("batch_align", 10.0, "align", "align_pool", "align_pool"),
    ],
)
def test_a_run_with_the_option_logs_it_and_maps_a_query_without_it(tmp_path, setting, weight, column, state, attribute):
    model, log, mapped = run_and_map(tmp_path, {setting: weight})
    assert log[column].notna().all() and (log[column] > 0).all()
    assert state in model.module.state_dict()
    assert getattr(mapped.config.model, setting) == 0.0 and not hasattr(mapped.module, attribute)
    with pytest.raises(ValueError, match=f"{setting} must be at least 0"):
        ModelConfig(**{setting: -1.0})


def test_a_labelled_run_with_the_adversarys_target_by_label_logs_it_and_maps_a_query_without_it(tmp_path):
    """batch_adversary_by_label in a whole labelled run: the adversary's terms are logged, and surgery maps a
    query with the adversary and its target both off (the config it writes is valid) and the reference as it was."""
    settings = {"batch_adversary": 5.0, "batch_adversary_by_label": True}
    model, log, mapped = run_and_map(tmp_path, settings, label_keys=["cell_type"])
    assert (log["adversary"] > 0).all() and (log["label"] > 0).all()
    assert model.config.model.batch_adversary_by_label and "adversary.0.weight" in model.module.state_dict()
    assert mapped.config.model.batch_adversary == 0.0 and not mapped.config.model.batch_adversary_by_label
