"""`evaluate`'s label-transfer section: how far each predictor's labels and the uncertainty can be trusted.

For a predicted key against a truth column: accuracy and macro-F1 of the chosen answer (`_pred`), the
calibrated head (`_pred_head`) and the kNN vote (`_pred_knn`); ECE of `_prob` with a reliability
diagram; recall per class; the share of cells called Unknown; and when the truth has classes the run
never saw, how well `_uncertainty` separates their cells from the rest (AUROC) and how many of them are
called Unknown. How well `_uncertainty` ranks the known-class cells' errors: the accuracy of the cells not
called Unknown, and the area under the risk-coverage curve (AURC: the error rate of the most certain cells,
averaged over every coverage; lower is better, the error rate itself when uncertainty ranks nothing). With a
reference UMAP the query is drawn on it (reference in grey).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .calibration import reliability
from .metrics import confusion, prediction_scores

PREDICTORS = {"pred": "chosen", "pred_head": "head", "pred_knn": "knn"}


def auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of `score` for `positive` (rank formula, ties averaged)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def risk_coverage_area(uncertainty: np.ndarray, correct: np.ndarray) -> float | None:
    """AURC: cells sorted from the most to the least certain, the mean over n = 1..N of the error rate among
    the first n (ties in uncertainty share their errors evenly)."""
    n = len(correct)
    if n == 0:
        return None
    u = np.asarray(uncertainty, float)
    wrong = (~np.asarray(correct, bool)).astype(float)
    order = np.argsort(u, kind="stable")
    u, wrong = u[order], wrong[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])  # ties: each cell of a group gets the group's mean
    sizes = np.diff(np.r_[starts, n])
    wrong = np.repeat(np.add.reduceat(wrong, starts) / sizes, sizes)
    return float((np.cumsum(wrong) / np.arange(1, n + 1)).mean())


def transfer_scores(columns: dict, truth: pd.Categorical, run_classes) -> tuple[dict, list]:
    """(scores, reliability table) for one key; `columns` maps suffix (pred, pred_head, pred_knn, prob,
    uncertainty, unknown) to that column of every cell; truth: defined labels (code -1 = none)."""
    t = np.asarray(truth.astype(str))
    defined = np.asarray(truth.codes) >= 0
    known_class = defined & np.isin(t, list(run_classes))
    novel = defined & ~known_class
    out = {"cells_with_truth": int(defined.sum()), "cells_of_unseen_classes": int(novel.sum())}
    for suffix, name in PREDICTORS.items():
        if suffix not in columns:
            continue
        pred = pd.Categorical(columns[suffix])
        scores = prediction_scores(confusion(_subset(truth, known_class), pred))
        out[name] = {"accuracy": round(scores["accuracy"], 4), "macro_f1": round(scores["macro_f1"], 4)}
    pred = np.asarray(pd.Categorical(columns["pred"]).astype(str))
    correct = pred == t
    table = []
    if "prob" in columns and known_class.any():
        prob = np.asarray(columns["prob"], float)
        table = reliability(prob[known_class], correct[known_class])
        out["ece"] = round(sum(abs(a - c) * n for c, a, n in table) / int(known_class.sum()), 4)
    out["recall_per_class"] = {
        c: round(float(correct[known_class & (t == c)].mean()), 4)
        for c in run_classes
        if (known_class & (t == c)).any()
    }
    if "uncertainty" in columns and known_class.any():
        a = risk_coverage_area(np.asarray(columns["uncertainty"], float)[known_class], correct[known_class])
        out["aurc"] = round(a, 4)
    if "unknown" in columns:
        unknown = np.asarray(columns["unknown"], bool)
        kept = known_class & ~unknown
        out["accuracy_not_unknown"] = round(float(correct[kept].mean()), 4) if kept.any() else None
        out["unknown_fraction"] = round(float(unknown[defined].mean()), 4) if defined.any() else None
        if novel.any():
            out["unseen_classes"] = sorted(set(t[novel]))
            out["unknown_fraction_unseen"] = round(float(unknown[novel].mean()), 4)
            out["unknown_fraction_seen"] = round(float(unknown[known_class].mean()), 4) if known_class.any() else None
            if "uncertainty" in columns:
                a = auroc(novel[defined], np.asarray(columns["uncertainty"], float)[defined])
                out["unseen_auroc"] = None if a is None else round(a, 4)
    return out, table


def _subset(truth: pd.Categorical, keep: np.ndarray) -> pd.Categorical:
    codes = np.where(keep, np.asarray(truth.codes), -1)
    return pd.Categorical.from_codes(codes, categories=truth.categories)
