"""bench.transfer's novel-type part: one coarse type left out of training, every cell predicted."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench.quality import LABELS, TRUTH

NOVEL = "type_1"
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def novel_row(adata, a, seed, fit, predictors, scores) -> dict:
    """The model trained without the novel type's cells and without the hidden known cells, so both are queries it
    never saw (out of training and of the reference index, as a new data set's cells are): AUROC of the default
    predictor's uncertainty (novel cells vs hidden known cells) and Unknown shares per threshold; under
    by_predictor, the AUROC and the shares at the default threshold of every predictor's own uncertainty (1 − its
    winner's probability × the in-distribution factor, as embed writes it), and on the known cells the accuracy of
    those it keeps at that threshold and the AURC of that uncertainty; under query, every predictor's scores on the
    known cells; under validation, each calibrated predictor's scores on the run's validation cells (what
    `--predictor auto` chooses by)."""
    from bigatlas.transfer import DEFAULT_UNKNOWN
    from bigatlas.transfer_report import auroc, risk_coverage_area

    truth = adata.obs[TRUTH].astype(str).to_numpy()
    novel = np.char.startswith(truth.astype(str), NOVEL + ".")
    known = adata.obs["bench_hidden"].to_numpy() & ~novel
    with tempfile.TemporaryDirectory() as tmp:
        model = fit(adata[~novel & ~known].copy(), a, seed, Path(tmp) / "run")
        z = model.get_latent_representation(adata)
        probs, in_dist, default, validation = predictors(model, z)
    uncertain = {name: 1.0 - p.max(1) * in_dist for name, p in probs.items()}
    uncertainty = uncertain[default]
    classes = np.asarray(model.vocab.label_classes[LABELS])
    pred = classes[probs[default].argmax(1)]
    sel = novel | known
    row = {"novel_type": NOVEL, "novel_cells": int(novel.sum()), "known_cells": "query"}
    row["auroc"] = round(auroc(novel[sel], uncertainty[sel]), 4)
    row["unknown_novel"] = {str(t): round(float((uncertainty[novel] > t).mean()), 4) for t in THRESHOLDS}
    row["unknown_known"] = {str(t): round(float((uncertainty[known] > t).mean()), 4) for t in THRESHOLDS}
    row["accuracy_known_not_unknown"] = {
        str(t): round(float((pred[known] == truth[known])[uncertainty[known] <= t].mean()), 4) for t in THRESHOLDS
    }
    at = str(DEFAULT_UNKNOWN)
    row["by_predictor"] = {}
    for name, u in uncertain.items():
        right = classes[probs[name].argmax(1)][known] == truth[known]
        kept = u[known] <= DEFAULT_UNKNOWN
        row["by_predictor"][name] = {
            "auroc": round(auroc(novel[sel], u[sel]), 4),
            f"unknown_novel_{at}": round(float((u[novel] > DEFAULT_UNKNOWN).mean()), 4),
            f"unknown_known_{at}": round(float((~kept).mean()), 4),
            f"accuracy_known_kept_{at}": round(float(right[kept].mean()), 4) if kept.any() else None,
            "aurc_known": round(risk_coverage_area(u[known], right), 4),
        }
    row["query"] = {name: scores(p[known], truth[known], classes) for name, p in probs.items()}
    row["validation"] = validation
    return row
