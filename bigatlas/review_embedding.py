"""`bigatlas review`: the label review (label_review.py) of every labelled cell of an embedding.

`evaluate` reviews the cells it scores (a subsample); this reviews them all, out of the embedding on disk,
and writes the flagged cells as a CSV that `bigatlas train --drop-labels KEY=FILE` reads:

    bigatlas train --data atlas.zarr --batch-key dataset_id --out run0            # without the label key
    bigatlas embed --run run0 --data atlas.zarr --out run0/emb.zarr
    bigatlas review --emb run0/emb.zarr --label-key cell_type --out review.csv
    bigatlas train --data atlas.zarr --batch-key dataset_id --label-keys cell_type \\
        --drop-labels cell_type=review.csv --out run1
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from loaders import data_name

from .config import UNLABELED
from .embedding import latents_of, open_embedded
from .label_review import MIN_AGREEMENT, flagged_cells, review, summary
from .rundir import RunDir
from .vocab import defined_labels

SHOWN_CLASSES = 5  # classes named in the log, most flagged first


def review_embedding(
    emb_path, *, label_key: str, out, data=None, obs_filter=None, min_agreement: float = MIN_AGREEMENT,
    min_class_agreement: float | None = None, unlabeled_categories=None, progress: bool = True, log=print,
) -> dict:  # fmt: skip
    """Review every cell of the embedding with a `label_key` label; write `out` (CSV: cell, row (Store.cell_ids),
    label, suggested, agreement of the flagged cells, most doubtful first) and beside it `out` with suffix .json
    (the summary, as evaluate's label_review section). data / obs_filter default to those the embedding records,
    unlabeled_categories to its run's. Returns the summary."""
    out = Path(out)
    if out.suffix == ".json":
        raise ValueError(f"--out {out}: name the CSV of flagged cells (the .json summary is written beside it)")
    emb, store, data, obs_filter = open_embedded(emb_path, data, obs_filter)
    if unlabeled_categories is None:
        run_data = RunDir(emb.meta["run"]).data_config() if emb.meta.get("run") else None
        unlabeled_categories = (run_data or {}).get("unlabeled_categories", UNLABELED)
    labels = defined_labels(*store.obs_codes(label_key), unlabeled_categories)
    positions = np.flatnonzero(np.asarray(labels.codes) >= 0)
    if len(positions) < 2:
        raise ValueError(f"{len(positions)} cells of {data} have a {label_key!r} label; a review needs two or more")
    z = latents_of(emb, store, positions, f"the cells labelled by {label_key!r}")
    log(f"reviewing the {label_key!r} labels of {len(positions):,} of {store.n_obs:,} cells")
    table = review(z, labels[positions], min_agreement=min_agreement, min_class_agreement=min_class_agreement,
                   progress=progress)  # fmt: skip
    result = summary(table, min_agreement=min_agreement, min_class_agreement=min_class_agreement)
    result.update(
        embedding=str(emb.path), data=data_name(data), obs_filter=obs_filter, label_key=label_key,
        trained_on_labels=label_key in emb.label_keys,
    )  # fmt: skip
    flagged = flagged_cells(table, store, positions)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary_file = out.with_suffix(".json")
    for path, write in ((out, lambda p: flagged.to_csv(p, index=False)),
                        (summary_file, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))):  # fmt: skip
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")  # each writer its own: never a torn file
        write(tmp)
        os.replace(tmp, path)
    for line in _lines(result, out):
        log(line)
    return result


def _lines(result: dict, out: Path) -> list[str]:
    """The log's account of a review: counts, the most flagged classes, unresolved ones, and a warning when
    the embedding's run was trained on the reviewed labels."""
    lines = [
        f"{result['flagged']:,} of {result['cells']:,} labels flagged ({result['flagged_share']:.1%}): fewer than "
        f"{result['min_agreement']:.0%} of their {result['k']} nearest cells share them -> {out}"
    ]
    shown = [(c, v) for c, v in result["per_class"].items() if v["flagged"]][:SHOWN_CLASSES]
    for cls, v in shown:
        lines.append(f"  {cls}: {v['flagged']:,} of {v['cells']:,} flagged, mostly as {v['suggested']}")
    if result["unresolved_classes"]:
        lines.append(
            f"  not flagged, the latent does not separate them (median agreement below "
            f"{result['min_class_agreement']:.0%}): {', '.join(result['unresolved_classes'])}"
        )
    if result["trained_on_labels"]:
        lines.append(
            f"warning: the embedding's run was trained on {result['label_key']!r}, so its latent has learned the "
            "labels under review, wrong ones too; review the embedding of a run trained without that key"
        )
    return lines
