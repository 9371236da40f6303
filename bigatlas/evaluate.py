"""`bigatlas evaluate`: how well an embedding integrates batches and keeps cell types.

scIB metrics run on a label-stratified subsample (default 50k cells: a 1M-cell embedding evaluates in
minutes), beside the same metrics on a PCA of log-normalised counts of the same cells, so the numbers
say what the model added. Label predictions are scored on every cell (accuracy, macro-F1, per-batch
accuracy, confusion) against each known label column. Output: metrics.json, UMAP and confusion
PNGs, the loss curves and report.md / report.html, written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from loaders import data_name, open_store
from loaders.census import is_census
from loaders.csr import concat, non_count

from .config import UNLABELED
from .embedding import EmbeddingError, latents_of, open_embedded, recorded_data
from .errors import require_extra
from .label_review import MIN_AGREEMENT, flagged_cells, review, summary
from .lock import OutputLock
from .metrics import K_LISI, confusion, knn, prediction_scores, scib_scores
from .rundir import RunDir
from .vocab import apply_lut, defined_labels, label_lut

BASELINE_GENES = 2000


def stratified_subsample(labels: np.ndarray, n: int, seed: int = 0, floor: int = 50) -> np.ndarray:
    """Ascending positions of about n cells with label code >= 0: every class in proportion to its
    size, and at least min(floor, class size) cells from each so rare classes are measured."""
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(labels >= 0)
    if len(pos) <= n:
        return pos
    counts = np.bincount(labels[pos])
    take = np.minimum(counts, np.maximum(np.round(counts * n / len(pos)).astype(np.int64), floor))
    order = pos[np.argsort(labels[pos], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen = [rng.choice(order[s : s + c], t, replace=False) for s, c, t in zip(starts, counts, take) if t]
    return np.sort(np.concatenate(chosen))


def read_counts(store, positions: np.ndarray, piece: int = 8192, integer: bool = True):
    """scipy CSR of the cells at ascending positions (all genes), refused unless they are counts (whole unless
    `integer` is False; finite and >= 0 always)."""
    parts = []
    for i in range(0, len(positions), piece):
        rows = positions[i : i + piece]
        parts.append(store.read(rows))
        bad = non_count(parts[-1], store, integer=integer, positions=rows)
        if bad is not None:
            also = f" (the data also has {', '.join(bad.other_layers)})" if bad.other_layers else ""
            raise EmbeddingError(
                f"the PCA baseline reads raw counts: {bad}; --layer (layer=) names the data's matrix of counts"
                f"{also}, --no-baseline (baseline=False) skips the baseline"
            )
    return concat(parts).to_scipy()


def counts_matrix(layer, emb, run_data: dict | None, data) -> tuple[str | None, bool]:
    """(the data's matrix of raw counts, whether values need not be whole) for the PCA baseline: `layer` when
    given; for the data the embedding records, the matrix it was embedded from (the embed call's, else the
    run's); X of other data."""
    run_data = run_data or {}
    allow = bool(run_data.get("allow_non_integer", False))
    if layer is not None:
        return layer, allow
    if "data" in emb.meta and _same_data(data, recorded_data(emb.meta["data"])):
        return emb.meta.get("layer") or run_data.get("layer"), allow
    return None, allow


def pca_baseline(counts, n_components: int, n_genes: int = BASELINE_GENES) -> np.ndarray:
    """PCA of log1p(counts per 10k) on the n_genes most variable genes: the unintegrated reference.

    Exact PCA from the genes × genes covariance, accumulated over dense slices of rows (BLAS; a
    sparse Gram product is 10x slower at single-cell densities), centring folded into the covariance
    and the projection: the whole cells × genes matrix is never dense."""
    import scipy.sparse as sp

    lib = np.asarray(counts.sum(1)).ravel()
    x = (sp.diags(1e4 / np.maximum(lib, 1)) @ counts).tocsr()
    x.data = np.log1p(x.data)
    n = x.shape[0]
    mean = np.asarray(x.mean(0)).ravel()
    var = np.asarray(x.multiply(x).mean(0)).ravel() - mean**2
    x = x[:, np.sort(np.argsort(-var)[:n_genes])].astype(np.float64)
    mean = np.asarray(x.mean(0)).ravel()
    gram = np.zeros((x.shape[1], x.shape[1]))
    for lo in range(0, n, 4096):
        rows = x[lo : lo + 4096].toarray()
        gram += rows.T @ rows
    cov = gram / n - np.outer(mean, mean)
    _, vecs = np.linalg.eigh(cov)
    top = vecs[:, ::-1][:, : min(n_components, x.shape[1])]
    return (x @ top - mean @ top).astype(np.float32)


def _umap(z: np.ndarray, seed: int) -> np.ndarray:
    import warnings

    import umap

    from .threads import torch_threads_kept

    warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # we never transform new data
    idx, dist = knn(z, 15, return_distances=True)
    n = len(z)
    idx = np.hstack([np.arange(n)[:, None], idx[:, :14]])  # umap's kNN lists each point first
    dist = np.hstack([np.zeros((n, 1), np.float32), dist[:, :14]])
    layout = umap.UMAP(n_neighbors=15, precomputed_knn=(idx, dist, None), random_state=seed, n_jobs=1)
    with torch_threads_kept():  # UMAP's numba code would leave torch on numba's thread count
        return layout.fit_transform(z)


def _same_data(a, b) -> bool:
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):  # collections: the same stores in order
        a, b = list(a) if isinstance(a, list | tuple) else [a], list(b) if isinstance(b, list | tuple) else [b]
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b))
    if is_census(a) or is_census(b):
        return str(a) == str(b)
    return Path(a).resolve() == Path(b).resolve()


def reference_mask(cfg: dict | None, data: str, store) -> np.ndarray | None:
    """Per position of `store`, whether the cell lies in the training slice of the run whose saved
    [data] section is `cfg` (same data, its obs_filter; validation cells included); None when the run
    trained on other data or is unknown."""
    if cfg is None or not _same_data(cfg["data"], data):
        return None
    ref = open_store(cfg["data"], obs_filter=cfg.get("obs_filter"))
    return np.isin(store.cell_ids(np.arange(store.n_obs)), ref.cell_ids(np.arange(ref.n_obs)))


def _prediction_report(
    predicted: dict, store, batch: pd.Categorical, label_key: str, truth_keys, reference: np.ndarray | None, unlabeled
) -> dict:
    """Per (predicted key, truth column): accuracy, macro-F1, per-batch accuracy and the confusion table;
    with a reference mask also accuracy on reference and on query cells (outside the training slice).
    Every predicted key is scored against the same-named column; label_key's also against truth_keys."""
    missing = [c for c in truth_keys if c not in store.obs_columns] if label_key in predicted else []
    if missing:
        raise EmbeddingError(f"truth column {missing[0]!r} not in {store.uri} (have: {', '.join(store.obs_columns)})")
    out = {}
    for key, pred in predicted.items():
        columns = [key, *truth_keys] if key == label_key else [key]
        for col in dict.fromkeys(c for c in columns if c in store.obs_columns):
            truth = _labels(store, col, unlabeled)
            conf = confusion(truth, pred)
            scores = prediction_scores(conf)
            known = truth.codes >= 0
            correct = (apply_lut(label_lut(pred.categories, truth.categories), pred.codes) == truth.codes) & known
            has = known & (np.asarray(batch.codes) >= 0)
            bcodes = np.asarray(batch.codes)[has]
            total = np.bincount(bcodes, minlength=len(batch.categories))
            right = np.bincount(bcodes, weights=correct[has], minlength=len(batch.categories))
            scores["per_batch_accuracy"] = {
                str(b): round(float(r / t), 4) for b, r, t in zip(batch.categories, right, total) if t
            }
            scores["unseen_classes"] = [c for c in truth.categories if c not in set(pred.categories.astype(str))]
            if reference is not None:
                for name, part in (("reference", reference), ("query", ~reference)):
                    sel = part & known
                    scores[f"{name}_accuracy"] = float(correct[sel].mean()) if sel.any() else None
                    scores[f"{name}_cells"] = int(sel.sum())
            out[f"{key}_pred vs {col}"] = {"scores": scores, "confusion": conf}
    return out


def _per_source(store, z, sample, lab_codes, bat_codes, labels, pred, seed) -> dict:
    """Per store of a collection: its cells, scIB scores of its evaluated cells (when they hold two
    classes and two batches), and the label accuracy of its labelled cells."""
    from loaders.collection import SOURCE

    codes, names = store.obs_codes(SOURCE)
    out = {}
    for i, name in enumerate(names):
        sel = codes[sample] == i
        entry = {"cells": int((codes == i).sum()), "evaluated": int(sel.sum())}
        if sel.sum() >= 20 and len(np.unique(lab_codes[sel])) > 1 and len(np.unique(bat_codes[sel])) > 1:
            entry["scores"] = scib_scores(z[sel], lab_codes[sel], bat_codes[sel], seed)
        if pred is not None:
            mine = (codes == i) & (labels.codes >= 0)
            right = np.asarray(pred.astype(str))[mine] == np.asarray(labels.astype(str))[mine]
            entry["label_accuracy"] = round(float(right.mean()), 4) if mine.any() else None
        out[str(name)] = entry
    return out


def _labels(store, column: str, unlabeled) -> pd.Categorical:
    return defined_labels(*store.obs_codes(column), unlabeled)


def evaluate(
    emb_path,
    *,
    label_key: str,
    batch_key: str,
    data=None,
    obs_filter=None,
    run=None,
    out=None,
    truth_keys=(),
    n_cells: int = 50_000,
    umap_cells: int = 20_000,
    seed: int = 0,
    baseline: bool = True,
    layer: str | None = None,
    unlabeled_categories=None,
    review_min_agreement: float = MIN_AGREEMENT,
    log=print,
) -> dict:
    """Score an embedding from `bigatlas embed`; returns metrics.json's content. `data`, `obs_filter`
    and `run` default to those recorded in the embedding; unlabeled_categories to the run's; layer (the data's
    matrix of raw counts, for the PCA baseline) to the one the recorded data was embedded from (counts_matrix).
    review_min_agreement: evaluated cells with fewer than this share of their 15 nearest evaluated cells
    under their own label are listed in label_review.csv (label_review.py; 0: no review)."""
    require_extra(
        "evaluate",
        {"scib_metrics": "scib-metrics"},
        "bigatlas evaluate",
    )
    t0 = time.perf_counter()
    emb, store, data, obs_filter = open_embedded(emb_path, data, obs_filter)
    run = Path(run or emb.meta.get("run", "")) if (run or emb.meta.get("run")) else None
    out = (
        Path(out)
        if out
        else (run / "report" if run and run.exists() else emb.path.with_name(emb.path.name + ".report"))
    )
    # one writer per report: two evaluations into one OUT would share <OUT>.partial
    with OutputLock(out.with_name(out.name + ".lock"), f"output {out}"):
        run_data = RunDir(run).data_config() if run is not None else None  # the run's [data] section
        if unlabeled_categories is None:
            unlabeled_categories = (run_data or {}).get("unlabeled_categories", UNLABELED)
        labels = _labels(store, label_key, unlabeled_categories)
        batch_codes, batch_cats = store.obs_codes(batch_key)
        batch = pd.Categorical.from_codes(batch_codes, categories=batch_cats)
        # cells with a defined label and a batch: every metric uses both
        sample = stratified_subsample(np.where(batch_codes >= 0, labels.codes, -1), n_cells, seed)
        if len(sample) < 20:
            raise EmbeddingError(
                f"only {len(sample)} cells of {data} have a defined {label_key!r} label; "
                "evaluation needs labelled cells"
            )
        z = latents_of(emb, store, sample, "the evaluated cells")
        counts = None  # the baseline's, read (and checked) before anything is scored
        if baseline:
            matrix, allow = counts_matrix(layer, emb, run_data, data)
            counts_store = store if matrix is None else open_store(data, obs_filter=obs_filter, layer=matrix)
            counts = read_counts(counts_store, sample, integer=not allow)
        lab = pd.Categorical(labels[sample]).remove_unused_categories()
        bat = pd.Categorical(batch[sample]).remove_unused_categories()
        lab_codes, bat_codes = np.asarray(lab.codes), np.asarray(bat.codes)
        log(
            f"evaluating {len(sample)} of {store.n_obs} cells ({len(lab.categories)} {label_key} classes, "
            f"{len(bat.categories)} {batch_key} batches)"
        )
        neighbours = knn(z, K_LISI, return_distances=True)  # the scIB metrics' and the label review's
        result = {
            "embedding": str(emb.path),
            "data": data_name(data),
            "obs_filter": obs_filter,
            "label_key": label_key,
            "batch_key": batch_key,
            "n_obs": int(store.n_obs),
            "n_evaluated": int(len(sample)),
            "seed": seed,
            "scores": {"bigatlas": scib_scores(z, lab_codes, bat_codes, seed, neighbours)},
        }
        flagged = None
        if review_min_agreement > 0:
            table = review(z, lab, min_agreement=review_min_agreement, neighbours=neighbours[0])
            result["label_review"] = summary(table, min_agreement=review_min_agreement)
            result["label_review"]["trained_on_labels"] = label_key in emb.label_keys
            table.insert(1, batch_key, bat)  # after the label
            flagged = flagged_cells(table, store, sample)
        if baseline:
            base = pca_baseline(counts, z.shape[1])
            result["scores"]["pca_baseline"] = scib_scores(base, lab_codes, bat_codes, seed)
        reference = reference_mask(run_data, data, store)
        if reference is not None:
            result["reference_query"] = {
                "reference_cells": int(reference.sum()),
                "query_cells": int((~reference).sum()),
            }
        row_ids = store.store_rows(np.arange(store.n_obs)) if emb.format == "soma" else None
        predicted = {key: emb.predictions(key, row_ids) for key in emb.label_keys}  # position order, every cell
        preds = _prediction_report(predicted, store, batch, label_key, truth_keys, reference, unlabeled_categories)
        result["predictions"] = {k: v["scores"] for k, v in preds.items()}
        transfer = _transfer_section(emb, store, predicted, label_key, truth_keys, row_ids, unlabeled_categories)
        if transfer:
            result["label_transfer"] = {name: scores for name, (scores, _) in transfer.items()}
        if store.segments is not None:  # a collection: the same scores within each store
            result["per_source"] = _per_source(
                store, z, sample, lab_codes, bat_codes, labels, predicted.get(label_key), seed
            )

        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        figures = _figures(
            tmp,
            z,
            sample,
            lab,
            bat,
            predicted.get(label_key),
            preds,
            run,
            label_key,
            batch_key,
            umap_cells,
            seed,
            None if reference is None else reference[sample],
        )
        figures.update(_transfer_figures(tmp, emb, store, transfer, label_key, run, row_ids, umap_cells, seed))
        result["figures"] = figures
        if flagged is not None:
            flagged.to_csv(tmp / "label_review.csv", index=False)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        from .report import write_report

        write_report(tmp, result, run)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        log(f"metrics: {out / 'metrics.json'}")
        log(f"report: {out / 'report.html'}")
        return result


def _transfer_section(emb, store, predicted, label_key, truth_keys, row_ids, unlabeled) -> dict:
    """{"<key>_pred vs <truth column>": (transfer_report scores, reliability table)} for every predicted key
    written with the transfer columns (uncertainty), against the truth columns _prediction_report uses."""
    from .transfer_report import PREDICTORS, transfer_scores

    out = {}
    for key, pred in predicted.items():
        if not emb.has_column(f"{key}_uncertainty"):
            continue  # an embedding of an older version: accuracy only (predictions section)
        columns = {"pred": pred}
        for suffix in [*PREDICTORS, "prob", "uncertainty", "unknown"]:
            if suffix != "pred" and emb.has_column(f"{key}_{suffix}"):
                columns[suffix] = emb.column(f"{key}_{suffix}", row_ids)
        truth_cols = [key, *truth_keys] if key == label_key else [key]
        for col in dict.fromkeys(c for c in truth_cols if c in store.obs_columns):
            truth = _labels(store, col, unlabeled)
            out[f"{key}_pred vs {col}"] = transfer_scores(columns, truth, list(pred.categories.astype(str)))
    return out


def _transfer_figures(folder, emb, store, transfer, label_key, run, row_ids, umap_cells, seed) -> dict:
    """Reliability diagrams, and the query on the reference UMAP when both have one."""
    from .plots import reference_map, reliability_diagram
    from .reference import read_reference

    figs = {}
    for name, (scores, table) in transfer.items():
        if table:
            file = f"reliability_{name.replace(' vs ', '_vs_')}.png"
            reliability_diagram(table, folder / file, f"{name}: ECE {scores['ece']:.3f}")
            figs[f"reliability {name}"] = file
    ref = read_reference(run) if run is not None and run.exists() else None
    if ref is None or "umap" not in ref.arrays or not emb.has_obsm("X_umap_ref") or label_key not in emb.label_keys:
        return figs
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(store.n_obs, min(umap_cells, store.n_obs), replace=False))
    rows = store.store_rows(pick)
    xy = emb.latents(pick, rows, name="X_umap_ref")
    pred = emb.predictions(label_key, row_ids)[pick]
    uncertainty = np.asarray(emb.column(f"{label_key}_uncertainty", row_ids))[pick]
    reference_map(ref.arrays["umap"], xy, pred, uncertainty, folder / "reference_umap.png",
                  f"{len(pick)} query cells on the reference UMAP ({ref.n_cells} reference cells)")  # fmt: skip
    figs["reference umap"] = "reference_umap.png"
    return figs


def _figures(folder, z, sample, lab, bat, pred, preds, run, label_key, batch_key, umap_cells, seed, reference) -> dict:
    from .plots import confusion_matrix, loss_curves, umap_panels

    figs = {}
    pick = np.sort(np.random.default_rng(seed).choice(len(sample), min(umap_cells, len(sample)), replace=False))
    xy = _umap(z[pick], seed)
    panels = {f"batch ({batch_key})": bat[pick], f"label ({label_key})": lab[pick]}
    if pred is not None:
        panels[f"predicted {label_key}"] = pred[sample[pick]]
    if reference is not None and not reference.all():
        panels["reference / query"] = pd.Categorical(
            np.where(reference[pick], "reference", "query"), categories=["reference", "query"]
        )
    figs["umap"] = umap_panels(xy, panels, folder / "umap.png", f"UMAP of {len(pick)} cells").name
    for name, p in preds.items():
        file = f"confusion_{name.replace(' vs ', '_vs_')}.png"
        s = p["scores"]
        confusion_matrix(
            p["confusion"], folder / file, f"{name}: accuracy {s['accuracy']:.3f}, macro-F1 {s['macro_f1']:.3f}"
        )
        figs[f"confusion {name}"] = file
    if run is not None and loss_curves(run / "metrics.csv", folder / "loss_curves.png"):
        figs["loss_curves"] = "loss_curves.png"
    return figs
