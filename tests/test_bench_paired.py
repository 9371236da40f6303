"""bench.paired: the new tag's metrics minus the base's on the atlases and seeds both ran, pooled over files."""

import json
import math

import pytest

from bench.paired import pooled_rows, run


def _row(preset, seed, tag, bio, batch, method="bigatlas_labels", **more):
    return {"preset": preset, "seed": seed, "method": method, "tag": tag, "bio_k10": bio, "batch_correction": batch,
            **more}  # fmt: skip


def test_pairs_the_same_atlas_and_seed_across_files_and_summarises_the_differences(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": [
        _row("subtle", 5, "default", 0.80, 0.50), _row("subtle", 6, "default", 0.70, 0.60),
        _row("rare", 5, "default", 0.90, 0.40, state_r2=0.3), _row("rare", 7, "default", 0.1, 0.1),  # no partner
        _row("subtle", 5, "new", 0.0, 0.0),  # replaced by b's row
        _row("subtle", 5, "new", 0.0, 0.0, method="bigatlas"),  # another method
    ]}))  # fmt: skip
    b.write_text(json.dumps({"rows": [
        _row("subtle", 5, "new", 0.81, 0.55), _row("subtle", 6, "new", 0.68, 0.62),
        _row("rare", 5, "new", 0.93, 0.43, state_r2=float("nan")), _row("hard", 5, "new", 0.5, 0.5),  # no base
    ]}))  # fmt: skip
    out = run(type("A", (), dict(out=[a, b], method="bigatlas_labels", base="default", new="new",
                                  metrics=["bio_k10", "batch_correction", "state_r2"], presets=None)))  # fmt: skip
    assert [(p["preset"], p["seed"]) for p in out["pairs"]] == [("rare", 5), ("subtle", 5), ("subtle", 6)]
    assert out["pairs"][1]["bio_k10"] == [0.80, 0.81]
    bio = [0.03, 0.01, -0.02]
    mean = sum(bio) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in bio) / 2 / 3)
    s = out["summary"]
    assert s["bio_k10"]["mean"] == pytest.approx(mean, abs=1e-4) and s["bio_k10"]["se"] == pytest.approx(se, abs=1e-4)
    assert (s["bio_k10"]["up"], s["bio_k10"]["down"], s["bio_k10"]["n"]) == (2, 1, 3)
    assert s["batch_correction"]["up"] == 3 and s["batch_correction"]["mean"] == pytest.approx(0.1 / 3, abs=1e-4)
    assert "state_r2" not in s  # its one pair has a NaN: nothing to pair
    only = run(type("A", (), dict(out=[a, b], method="bigatlas_labels", base="default", new="new",
                                   metrics=["bio_k10"], presets=["rare"])))  # fmt: skip
    assert only["summary"]["bio_k10"]["n"] == 1 and only["summary"]["bio_k10"]["se"] is None


def test_a_tag_without_partners_or_a_missing_file_is_named(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"rows": [_row("subtle", 5, "default", 0.8, 0.5)]}))
    args = dict(out=[a], method="bigatlas_labels", base="default", new="ewarm", metrics=["bio_k10"], presets=None)
    with pytest.raises(ValueError, match=r"'default' and 'ewarm'.*\['default'\]"):
        run(type("A", (), args))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        pooled_rows([tmp_path / "missing.json"])
