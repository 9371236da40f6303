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

from loaders import in_memory_names, open_store
from loaders.csr import select_columns

from . import dropped_labels
from .batches import Measured, holdout_all
from .calibration import ece, fit_calibration, nll
from .knn import EXACT_MAX, LatentIndex
from .reference import Reference, read_reference, stratified_sample, write_reference
from .rundir import RunDir, load_run
from .threads import torch_threads_kept
from .transfer import DEFAULT_K, DEFAULT_PREDICTOR, PREDICTORS, LabelTransfer, fit_novelty
from .vocab import apply_lut

MAX_VAL_CELLS = 20_000  # validation cells used for calibration and the novelty threshold
READ_BLOCK = 16_384
# "0" skips the UMAP layout (numba compiles it for ~16 s per process: the test suite sets this)
UMAP_ENV = "BIGATLAS_REFERENCE_UMAP"


class _Cells:
    """One store seen through a run's model: label classes per cell (all of the model's keys; -1 where
    unlabelled or the store lacks the key), batch codes, latents of chosen positions."""

    def __init__(self, source, data_cfg, vocab, module, run_dir):
        d = data_cfg
        in_memory = in_memory_names(source)
        if in_memory:
            raise ValueError(
                f"the run was trained on an {' and an '.join(in_memory)}; build its reference from that data "
                "(--data, or data= in Python)"
            )
        self.store = open_store(source, obs_filter=d.obs_filter, layer=d.layer, genes=d.genes, gene_join=d.gene_join)
        dropped_labels.apply(self.store, RunDir(run_dir), d, fresh=False, main=False)  # the run's, not kNN voters
        self.vocab, self.module, self.batch_keys = vocab, module, d.batch_keys
        self.colmap = vocab.colmap(self.store)
        self.identity = np.array_equal(self.colmap, np.arange(self.store.n_vars)) and self.store.n_vars == len(
            vocab.genes
        )
        self.measured = Measured.of_store(self.store, self.colmap, len(vocab.genes), "cpu")
        have = set(self.store.obs_columns)
        self.labels = np.full((self.store.n_obs, len(vocab.label_classes)), -1, np.int32)
        for i, key in enumerate(vocab.label_classes):
            if key in have:
                lut = vocab.label_luts(self.store, [key])[key]
                self.labels[:, i] = apply_lut(lut, self.store.obs_codes(key)[0], dtype=np.int32)

    @torch.no_grad()
    def encode(self, pos: np.ndarray) -> torch.Tensor:
        parts = []
        for lo in range(0, len(pos), READ_BLOCK):
            m = self.store.read(pos[lo : lo + READ_BLOCK])
            if not self.identity:
                m = select_columns(m, self.colmap, len(self.vocab.genes))
            parts.append(self.module.latent(m.to_torch(), measured=self.measured.of(pos[lo : lo + READ_BLOCK])))
        return torch.cat(parts) if parts else torch.zeros(0, self.module.n_latent)

    def batch(self, pos: np.ndarray) -> np.ndarray:
        luts = self.vocab.batch_luts(self.store, self.batch_keys)
        return np.stack([apply_lut(lut, self.store.obs_codes(k)[0][pos]) for k, lut in luts.items()], 1).astype(
            np.int32
        )

    def sample(self, val: np.ndarray, max_cells: int, seed: int) -> dict:
        """Arrays of a label-stratified sample of the non-validation cells."""
        first = self.labels[:, 0] if self.labels.shape[1] else np.zeros(self.store.n_obs, np.int8)
        positions, weight = stratified_sample(first, ~val, max_cells, seed)
        if len(positions) == 0:
            raise ValueError(f"{self.store.uri}: no training cells to build a reference from")
        return {
            "latent": self.encode(positions).numpy().astype(np.float32),
            "position": positions.astype(np.int64),
            "weight": weight,
            "labels": self.labels[positions],
            "batch": self.batch(positions),
        }


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
    was trained in memory; else the run's own data is opened). predictor: the default of embed for
    every label key ("head", the calibrated head: on bench.transfer's atlases as accurate as the others and
    better calibrated, transfer.py), or "auto": per key the one with the lowest validation NLL (on the rare
    atlas it chose the mean, which loses rare types: their few validation cells barely move the NLL)."""
    if predictor not in ("auto", *PREDICTORS):
        raise ValueError(f"predictor must be auto or one of {', '.join(PREDICTORS)}, not {predictor!r}")
    t0 = time.perf_counter()
    run, t, cells, val = _open(run_dir, data)
    arrays = cells.sample(val, max_cells, t.seed)
    info = {"label_keys": list(run.vocab.label_classes), "k": int(k), "predictor": predictor,
            "n_cells": len(arrays["latent"]), "n_represented": int((~val).sum())}  # fmt: skip
    ref = Reference(arrays, info)
    _index(ref, t.seed)
    val_pos = _validation_sample(val, cells.labels, t.seed)
    _calibrate(ref, run.module, run.vocab, cells.encode(val_pos), cells.labels[val_pos], log)
    if _want_umap(umap, log):
        t_umap = time.perf_counter()
        arrays["umap"] = _umap(arrays["latent"], t.seed)
        info["seconds_umap"] = round(time.perf_counter() - t_umap, 2)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    out = write_reference(run_dir, ref)
    log(f"wrote {out}: {info['n_cells']:,} reference cells ({info['seconds']:.1f}s)")
    return out


def extend_reference(reference_run, run_dir, data=None, *, max_cells: int = 200_000, umap: bool = True, log=print):
    """RUN_DIR/reference/ of a query-mapped run: the reference run's index (its latents still hold: the
    encoder was frozen) plus a sample of the query's cells, labelled with the query's labels where it
    has them; query cells are placed on the reference UMAP by their reference neighbours (no refit).
    The reference's calibration and novelty tail are kept, so reference cells keep their head
    predictions; a label key whose classes the query grew answers with the mean of head and kNN vote
    (_vote_for_new_classes). Without a reference index the query's cells alone make one."""
    old = read_reference(reference_run)
    if old is None:
        return build_reference(run_dir, data, max_cells=max_cells, umap=umap, log=log)
    t0 = time.perf_counter()
    run, t, cells, val = _open(run_dir, data)
    new = cells.sample(val, max_cells, t.seed)
    n_old, n_new = len(old.arrays["latent"]), len(new["latent"])
    scale_old = old.info.get("n_represented", n_old) / n_old
    new["weight"] = new["weight"] * (int((~val).sum()) / n_new)
    old_w = old.arrays["weight"] * scale_old
    arrays = {key: np.concatenate([old.arrays[key], new[key]]) for key in ("latent", "position", "labels", "batch")}
    arrays["weight"] = np.concatenate([old_w, new["weight"]]).astype(np.float32)
    arrays["weight"] /= arrays["weight"].mean()
    arrays["source"] = np.repeat(np.array([0, 1], np.int8), [n_old, n_new])  # 0: reference data, 1: query
    info = {k: old.info[k] for k in ("k", "predictor") if k in old.info}
    info["label_keys"], info["n_cells"], info["extends"] = list(run.vocab.label_classes), n_old + n_new, old.id
    info["n_represented"] = old.info.get("n_represented", n_old) + int((~val).sum())
    old_transfer = LabelTransfer(run.module, run.vocab, old, predictor="head")
    ref = Reference(arrays, info)
    _index(ref, t.seed)
    keep = ("calibration", "vote_temperature", "predictors", "novelty", "validation")
    info.update({k: old.info[k] for k in keep if k in old.info})
    _vote_for_new_classes(info, RunDir(reference_run).read_vocab(), run.vocab, log)
    if old_transfer.has_umap:
        _, placed = old_transfer(torch.from_numpy(new["latent"]))
        arrays["umap"] = np.concatenate([old.arrays["umap"], placed])
    info["seconds"] = round(time.perf_counter() - t0, 2)
    out = write_reference(run_dir, ref)
    log(f"wrote {out}: {n_old:,} reference + {n_new:,} query cells ({info['seconds']:.1f}s)")
    return out


def _vote_for_new_classes(info: dict, old_vocab, vocab, log) -> None:
    """A label key whose classes the query grew answers with the mean of head and kNN vote where the head alone
    was chosen: the new classes' head rows are fitted on the query's cells and the reference index's
    (query.fit_new_classes), yet the head alone still moved 0.3% of the reference's own cells to a new class in
    test_transfer.py's labelled mapping (3% without the index's cells); the mean, whose voters are reference and
    query cells, moved none and found as many of the new class's cells (98%)."""
    for key, classes in vocab.label_classes.items():
        grown = len(classes) > len(old_vocab.label_classes.get(key, []))
        if grown and info.setdefault("predictors", {}).get(key, DEFAULT_PREDICTOR) == "head":
            info["predictors"][key] = "both"
            log(f"label key {key!r}: the query added classes; its predictor is the head + kNN mean (both)")


def _open(run_dir, data):
    """(run, its train config, its data seen through its model, the validation mask)."""
    run = load_run(run_dir)
    t = run.config.train
    source = run.config.data.data if data is None else data
    cells = _Cells(source, run.config.data, run.vocab, run.module.eval(), run_dir)
    return run, t, cells, holdout_all(cells.store.n_obs, t.val_fraction, t.seed)


def _index(ref: Reference, seed: int) -> None:
    """The kNN partition (large references) and each cell's neighbourhood radius, into ref.arrays."""
    arrays, k = ref.arrays, ref.info["k"]
    z = torch.from_numpy(arrays["latent"])
    if len(z) > EXACT_MAX:
        cluster, centroids = LatentIndex.partition(z, seed=seed)
        arrays["cluster"], arrays["centroids"] = cluster.numpy().astype(np.int32), centroids.numpy()
    index = LatentIndex(arrays["latent"], arrays.get("cluster"), arrays.get("centroids"))
    dist, _ = index.search(z, k + 1)  # the first neighbour is the cell itself
    arrays["radius"] = dist[:, 1:].nan_to_num(posinf=0).mean(1).numpy().astype(np.float32)


def _want_umap(umap: bool, log) -> bool:
    if umap and os.environ.get(UMAP_ENV) == "0":
        log(f"{UMAP_ENV}=0: the reference has no UMAP layout (queries get no X_umap_ref)")
        return False
    return umap


def _validation_sample(val: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Validation cells (labelled in the first key when there are label keys), at most MAX_VAL_CELLS."""
    keep = val & (labels[:, 0] >= 0) if labels.shape[1] else val
    pos = np.flatnonzero(keep)
    if len(pos) > MAX_VAL_CELLS:
        pos = np.sort(np.random.default_rng([seed, 0xCA1]).choice(pos, MAX_VAL_CELLS, replace=False))
    return pos


def _calibrate(ref: Reference, module, vocab, z_val, y_val, log) -> None:
    """Calibration per key, the novelty threshold and validation scores of each predictor, into ref.info."""
    info = ref.info
    transfer = LabelTransfer(module, vocab, ref, predictor="head")
    info["n_validation_cells"] = len(z_val)
    if len(z_val) < 20:
        return
    dist, idx, w = transfer.neighbours(z_val)  # the kernel weights do not depend on the calibration
    info["novelty"] = fit_novelty(transfer.outlier_ratio(dist, idx))
    if y_val.shape[1] == 0:
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
        info["calibration"][key] = fit_calibration(logits[i][keep], yt, transfer.log_counts[key])
    transfer.calibration = info["calibration"]
    head = transfer.head_probs(z_val)
    knn = transfer.knn_probs(idx, w)
    info["vote_temperature"], info["predictors"] = {}, {}
    for i, key in enumerate(transfer.keys):
        if key not in info["calibration"]:
            continue
        y = y_val[:, i]
        keep = y >= 0
        yt = torch.as_tensor(y[keep], dtype=torch.long)
        temps = {}
        for name in ("knn", "both"):
            logp = torch.log(
                torch.as_tensor(transfer.combine(key, head[key], knn[key], name)[keep]).double().clamp_min(1e-6)
            )
            temps[name] = fit_calibration(logp, yt, torch.zeros(logp.shape[1], dtype=torch.float64))["temperature"]
        info["vote_temperature"][key] = temps
    transfer.vote_temperature = info["vote_temperature"]
    info["training_accuracy"] = _training_accuracy(transfer, ref, info["calibration"])
    for i, key in enumerate(transfer.keys):
        if key not in info["calibration"]:
            continue
        y = y_val[:, i]
        keep = y >= 0
        raw = torch.softmax(logits[i][keep], 1).numpy()
        scores = {"head_uncalibrated": raw}
        scores.update(
            {name: transfer.combine(key, head[key], knn[key], name)[keep] for name in ("head", "knn", "both")}
        )
        info["validation"][key] = {
            name: {"accuracy": round(float((p.argmax(1) == y[keep]).mean()), 4), "ece": round(ece(p, y[keep]), 4)}
            for name, p in scores.items()
        }
        v = info["validation"][key]
        nll_of = {name: nll(scores[name], y[keep]) for name in PREDICTORS}
        for name in PREDICTORS:
            v[name]["nll"] = round(nll_of[name], 4)
        best = min(PREDICTORS, key=lambda n: (nll_of[n], n != DEFAULT_PREDICTOR))
        info["predictors"][key] = best if info["predictor"] == "auto" else info["predictor"]
        trained = info["training_accuracy"].get(key)  # None: no labelled training cell in the reference's sample
        log(
            f"label key {key!r} on {int(keep.sum()):,} validation cells: ECE {v['head_uncalibrated']['ece']:.3f} -> "
            f"{v['head']['ece']:.3f} (temperature {info['calibration'][key]['temperature']:.2f}, prior shift "
            f"{info['calibration'][key]['prior_shift']:.2f}); accuracy head {v['head']['accuracy']:.3f}"
            + (f" (on its training cells {trained:.3f})" if trained is not None else "")
            + f", kNN {v['knn']['accuracy']:.3f}, both {v['both']['accuracy']:.3f}; predictor {info['predictors'][key]}"
        )


def _training_accuracy(transfer: LabelTransfer, ref: Reference, keys) -> dict[str, float]:
    """Per label key in `keys`, the calibrated head's accuracy on the reference's labelled training cells, each
    weighted by its sample weight (so the store's cells count, not the label-stratified sample). Beside the
    validation cells' accuracy it shows how much of what the head learnt of its training cells carries over to
    cells it was not shown (docs/quality.md, "The head's generalisation gap")."""
    device = next(transfer.module.parameters()).device
    probs = transfer.head_probs(torch.from_numpy(ref.arrays["latent"]).to(device))
    out = {}
    for i, key in enumerate(transfer.keys):
        y = ref.arrays["labels"][:, i]
        keep = y >= 0
        if key in keys and keep.any():
            right = probs[key][keep].argmax(1) == y[keep]
            out[key] = round(float(np.average(right, weights=ref.arrays["weight"][keep])), 4)
    return out


def _umap(latent: np.ndarray, seed: int) -> np.ndarray:
    import warnings

    import umap

    with warnings.catch_warnings(), torch_threads_kept():  # numba would leave torch on its thread count
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state; tbb/numba notices
        return umap.UMAP(n_neighbors=15, random_state=seed).fit_transform(latent).astype(np.float32)
