"""Building RUN_DIR/reference/ from a trained run (end of training, or `bigatlas reference --run R`).

One process reads a label-stratified sample of the training cells (never validation cells), encodes
them with the final weights, partitions them for the kNN search, measures each one's neighbourhood
radius, fits the label heads' calibration on the validation cells, takes the novelty threshold from
them, and lays the sample out with UMAP. The index depends only on the weights, the data and the seed,
so a resumed or a multi-process run gets the same index as its uninterrupted single-process twin.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from loaders import open_store
from loaders.csr import select_columns

from .batches import holdout_all
from .calibration import ece, fit_calibration
from .knn import EXACT_MAX, LatentIndex
from .reference import Reference, stratified_sample, write_reference
from .rundir import load_run
from .transfer import DEFAULT_K, DEFAULT_PREDICTOR, LabelTransfer
from .vocab import apply_lut

MAX_VAL_CELLS = 20_000  # validation cells used for calibration and the novelty threshold
READ_BLOCK = 16_384
# "0" skips the UMAP layout (numba compiles it for ~16 s per process: the test suite sets this)
UMAP_ENV = "BIGATLAS_REFERENCE_UMAP"


def build_reference(
    run_dir,
    data=None,
    *,
    max_cells: int = 200_000,
    umap: bool = True,
    k: int = DEFAULT_K,
    predictor: str = DEFAULT_PREDICTOR,
    log=print,
) -> Path:
    """Write RUN_DIR/reference/ for the run in run_dir (data: the AnnData it was trained on, when it
    was trained in memory; else the run's own data is opened)."""
    t0 = time.perf_counter()
    run = load_run(run_dir)
    cfg, vocab, module = run.config, run.vocab, run.module.cpu().eval()
    d, t = cfg.data, cfg.train
    source = d.data if data is None else data
    if data is None and isinstance(source, str) and source.startswith("AnnData ("):
        raise ValueError(f"{run_dir} was trained on an {source}; build its reference from that AnnData (data=...)")
    store = open_store(source, obs_filter=d.obs_filter, layer=d.layer, genes=d.genes, gene_join=d.gene_join)
    colmap = store.gene_map(vocab.genes, missing="zero-fill", what="model's")
    identity = np.array_equal(colmap, np.arange(store.n_vars)) and store.n_vars == len(vocab.genes)
    val = holdout_all(store.n_obs, t.val_fraction, t.seed)
    keys = list(vocab.label_classes)
    labels = np.stack([_codes(store, vocab.label_luts(store, [key])[key], key) for key in keys], 1) if keys else None
    first = labels[:, 0] if keys else np.zeros(store.n_obs, np.int8)
    positions, weight = stratified_sample(first, ~val, max_cells, t.seed)
    if len(positions) == 0:
        raise ValueError(f"{store.uri}: no training cells to build a reference from")

    def encode(pos):
        parts = []
        for lo in range(0, len(pos), READ_BLOCK):
            m = store.read(pos[lo : lo + READ_BLOCK])
            if not identity:
                m = select_columns(m, colmap, len(vocab.genes))
            parts.append(module.latent(m.to_torch()))
        return torch.cat(parts) if parts else torch.zeros(0, module.cfg.n_latent)

    with torch.no_grad():
        z = encode(positions)
    arrays = {
        "latent": z.numpy().astype(np.float32),
        "position": positions.astype(np.int64),
        "weight": weight,
        "labels": (labels[positions] if keys else np.zeros((len(positions), 0))).astype(np.int32),
        "batch": np.stack(
            [apply_lut(lut, store.obs_codes(key)[0][positions]) for key, lut in vocab.batch_luts(store, d.batch_keys).items()],
            1,
        ).astype(np.int32),
    }  # fmt: skip
    if len(z) > EXACT_MAX:
        cluster, centroids = LatentIndex.partition(z, seed=t.seed)
        arrays["cluster"], arrays["centroids"] = cluster.numpy().astype(np.int32), centroids.numpy()
    index = LatentIndex(arrays["latent"], arrays.get("cluster"), arrays.get("centroids"))
    dist, _ = index.search(z, k + 1)  # the first neighbour is the cell itself
    arrays["radius"] = dist[:, 1:].nan_to_num(posinf=0).mean(1).numpy().astype(np.float32)
    info = {"label_keys": keys, "k": int(k), "predictor": predictor, "n_cells": len(positions)}
    ref = Reference(arrays, info)
    val_pos = _validation_sample(val, labels, t.seed)
    with torch.no_grad():
        z_val = encode(val_pos)
    _calibrate(ref, module, vocab, z_val, labels[val_pos] if keys else None, log)
    if umap and os.environ.get(UMAP_ENV) == "0":
        log(f"{UMAP_ENV}=0: the reference has no UMAP layout (queries get no X_umap_ref)")
    elif umap and len(z) > 2:
        arrays["umap"] = _umap(arrays["latent"], t.seed)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    out = write_reference(run_dir, ref)
    log(f"wrote {out}: {len(positions):,} reference cells ({info['seconds']:.1f}s)")
    return out


def _codes(store, lut, key) -> np.ndarray:
    return apply_lut(lut, store.obs_codes(key)[0], dtype=np.int32)


def _validation_sample(val: np.ndarray, labels, seed: int) -> np.ndarray:
    """Validation cells (labelled in the first key when there are labels), at most MAX_VAL_CELLS."""
    keep = val if labels is None else val & (labels[:, 0] >= 0)
    pos = np.flatnonzero(keep)
    if len(pos) > MAX_VAL_CELLS:
        pos = np.sort(np.random.default_rng([seed, 0xCA1]).choice(pos, MAX_VAL_CELLS, replace=False))
    return pos


def _calibrate(ref: Reference, module, vocab, z_val, y_val, log) -> None:
    """Calibration per key, the novelty threshold and validation scores of each predictor, into ref.info."""
    info = ref.info
    transfer = LabelTransfer(module, vocab, ref, predictor="head")
    info["novelty_ratio"] = float("inf")
    info["n_validation_cells"] = len(z_val)
    if len(z_val) < 20:
        return
    dist, idx, _ = transfer.neighbours(z_val)
    info["novelty_ratio"] = float(np.quantile(transfer.outlier_ratio(dist, idx), 0.99))
    if y_val is None:
        return
    info["calibration"], info["validation"] = {}, {}
    with torch.no_grad():
        logits = [x.double() for x in module.label_logits(z_val)]
    for i, key in enumerate(transfer.keys):
        y = y_val[:, i]
        keep = y >= 0
        if keep.sum() < 20 or len(np.unique(y[keep])) < 2:
            continue
        yt = torch.as_tensor(y[keep], dtype=torch.long)
        raw = torch.softmax(logits[i][keep], 1).numpy()
        info["calibration"][key] = fit_calibration(logits[i][keep], yt, transfer.log_counts[key])
    transfer.calibration = info["calibration"]
    head = transfer.head_probs(z_val)
    _, idx, w = transfer.neighbours(z_val)
    knn = transfer.knn_probs(idx, w)
    for i, key in enumerate(transfer.keys):
        if key not in info["calibration"]:
            continue
        y = y_val[:, i]
        keep = y >= 0
        raw = torch.softmax(logits[i][keep], 1).numpy()
        scores = {"head_uncalibrated": raw, "head": head[key][keep], "knn": knn[key][keep],
                  "both": 0.5 * (head[key][keep] + knn[key][keep])}  # fmt: skip
        info["validation"][key] = {
            name: {"accuracy": round(float((p.argmax(1) == y[keep]).mean()), 4), "ece": round(ece(p, y[keep]), 4)}
            for name, p in scores.items()
        }
        v = info["validation"][key]
        log(
            f"label key {key!r} on {int(keep.sum()):,} validation cells: ECE {v['head_uncalibrated']['ece']:.3f} -> "
            f"{v['head']['ece']:.3f} (temperature {info['calibration'][key]['temperature']:.2f}, prior shift "
            f"{info['calibration'][key]['prior_shift']:.2f}); accuracy head {v['head']['accuracy']:.3f}, "
            f"kNN {v['knn']['accuracy']:.3f}, both {v['both']['accuracy']:.3f}"
        )


def _umap(latent: np.ndarray, seed: int) -> np.ndarray:
    import warnings

    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state; tbb/numba notices
        return umap.UMAP(n_neighbors=15, random_state=seed).fit_transform(latent).astype(np.float32)
