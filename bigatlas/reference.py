"""The reference index in RUN_DIR/reference/: what label transfer and the reference UMAP read.

    index.safetensors  latent (cells × n_latent posterior means), position (store position of each
                       cell), weight (undoes the label-stratified sampling in kNN votes), labels
                       (cells × label keys, -1 unlabelled), batch (cells × batch keys), radius (each
                       cell's mean distance to its k nearest reference cells), cluster + centroids (the
                       kNN search's partition, when it has one), umap (cells × 2, when computed)
    reference.json     format version, label keys, k, per key the calibration (temperature, prior
                       shift) and validation scores, the novelty threshold, an id of the arrays

Arrays only (no pickle); the directory is built beside its final place and renamed into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
DIR_NAME = "reference"


@dataclass
class Reference:
    arrays: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.arrays["latent"])

    @property
    def id(self) -> str:
        return self.info["id"]


def reference_dir(run_dir) -> Path:
    return Path(run_dir) / DIR_NAME


def write_reference(run_dir, ref: Reference) -> Path:
    """Write RUN_DIR/reference/ atomically (a crash leaves the old index or none, never half of one)."""
    from safetensors.numpy import save_file

    final = reference_dir(run_dir)
    tmp = final.with_name(DIR_NAME + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in ref.arrays.items()}
    digest = hashlib.sha1()
    for k in sorted(arrays):
        digest.update(k.encode())
        digest.update(arrays[k].tobytes())
    ref.info = {**ref.info, "format_version": FORMAT_VERSION, "id": digest.hexdigest()[:16]}
    save_file(arrays, str(tmp / "index.safetensors"))
    (tmp / "reference.json").write_text(json.dumps(ref.info, indent=1) + "\n")
    old = final.with_name(DIR_NAME + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_reference(run_dir) -> Reference | None:
    """The run's reference index, or None when it has none (built with --reference-cells 0, or an older
    run: `bigatlas reference --run RUN_DIR` builds one)."""
    from safetensors.numpy import load_file

    path = reference_dir(run_dir)
    if not (path / "reference.json").exists():
        return None
    info = json.loads((path / "reference.json").read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {info.get('format_version')!r}; this bigatlas reads version "
            f"{FORMAT_VERSION}: rebuild it with `bigatlas reference --run {run_dir}`"
        )
    return Reference(load_file(str(path / "index.safetensors")), info)


def stratified_sample(codes: np.ndarray, eligible: np.ndarray, max_cells: int, seed: int = 0):
    """(sorted positions, weights) of at most max_cells eligible cells, stratified by `codes` (class
    per cell, -1 = unlabelled, its own stratum). Every stratum first gets min(its size, max_cells / (2 ×
    strata)) cells, so rare classes are kept; the rest of the budget is shared in proportion to what
    is left of each stratum. weight = stratum size / cells drawn from it, scaled to a mean of 1: a
    weighted vote over the sample then has the classes' true proportions."""
    positions = np.flatnonzero(eligible)
    if len(positions) <= max_cells:
        return positions, np.ones(len(positions), np.float32)
    strata = np.asarray(codes)[positions]
    values, sizes = np.unique(strata, return_counts=True)
    floor = np.minimum(sizes, max_cells // (2 * len(values)))
    rest = sizes - floor
    extra = np.floor((max_cells - floor.sum()) * rest / max(rest.sum(), 1)).astype(np.int64)
    take = floor + extra
    rng = np.random.default_rng([seed, 0x4EF])
    chosen, weights = [], []
    for v, size, n in zip(values, sizes, take):
        members = positions[strata == v]
        chosen.append(rng.choice(members, size=int(n), replace=False))
        weights.append(np.full(int(n), size / max(n, 1), np.float64))
    chosen, weights = np.concatenate(chosen), np.concatenate(weights)
    order = np.argsort(chosen)
    weights = weights[order]
    return chosen[order], (weights / weights.mean()).astype(np.float32)
