"""From a loader Batch to what the model takes: counts on the device, model codes of the batch keys,
class indices of the label keys, and which cells are validation cells. One conversion for training,
the notebook API and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loaders import measured_panels

from .device_copy import to_device
from .distributions import Counts
from .vocab import Vocab, apply_lut


def holdout_mask(positions: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """True for validation cells: splitmix64 of (position, seed) below `fraction` of 2**64."""
    if fraction <= 0:
        return np.zeros(len(positions), dtype=bool)
    with np.errstate(over="ignore"):
        z = np.asarray(positions, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def holdout_all(n_obs: int, fraction: float, seed: int = 0) -> np.ndarray:
    """holdout_mask of positions 0..n_obs-1, in 1M-cell slices: the hash's uint64 temporaries for 50M
    cells at once would be gigabytes."""
    step = 1 << 20
    parts = [holdout_mask(np.arange(lo, min(lo + step, n_obs)), fraction, seed) for lo in range(0, n_obs, step)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


class Measured:
    """Which of the model's genes each cell measured, from a store and its gene map: the panels of
    loaders.measured_panels on the device, a cell's row chosen by the store's panel_codes. `of(positions)`
    is None when every cell measured every gene, else (cells or 1, genes) bool."""

    def __init__(self, panels, store, device):
        self.store, self.device = store, device
        self.panels = None if panels is None else to_device(torch.from_numpy(np.asarray(panels, bool)), device)

    @classmethod
    def of_store(cls, store, colmap: np.ndarray | None, n_genes: int, device) -> Measured:
        """The panels of `store` through its gene map to the model's `n_genes` genes (loaders.measured_panels)."""
        return cls(measured_panels(store, colmap, n_genes), store, device)

    def of(self, positions: np.ndarray) -> torch.Tensor | None:
        if self.panels is None or len(self.panels) == 1:
            return self.panels
        return self.panels[to_device(torch.from_numpy(self.store.panel_codes(positions)), self.device)]


@dataclass
class ModelInput:
    counts: Counts
    codes: torch.Tensor | None  # (cells, batch keys) model codes; None when not asked for
    labels: torch.Tensor | None  # (cells, label keys) class index, -1 = unlabelled
    positions: np.ndarray  # each cell's position in the (filtered) store
    val: np.ndarray  # validation cells (all False without a validation fraction)
    # (cells or 1, genes) bool on the device: the genes each cell's store measured; None: all of them
    measured: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.counts)


class ToModelInput:
    """Translates a store's obs codes into the model's through lookup tables built by category name,
    so a store with other category orders maps correctly; a batch category the model never saw is an
    error that names the column. `panels` (CellStream.gene_panels) marks, per cell, the genes its store
    measured, for a loss that leaves the zero-filled ones out."""

    def __init__(
        self, vocab: Vocab, store, device, *, batch_keys=(), label_keys=(), val_fraction=0.0, seed=0, panels=None
    ):
        self.batch_keys, self.label_keys = tuple(batch_keys), tuple(label_keys)
        self.batch_luts = vocab.batch_luts(store, self.batch_keys)
        self.batch_names = {k: store.obs_codes(k)[1] for k in self.batch_keys}  # for the message of an unseen one
        self.label_luts = vocab.label_luts(store, self.label_keys)
        self.device, self.val_fraction, self.seed = device, val_fraction, seed
        self.measured = Measured(panels, store, device)

    def __call__(self, batch) -> ModelInput:
        positions = batch.index.numpy()
        codes = labels = None
        if self.batch_keys:
            model_codes = np.stack([apply_lut(self.batch_luts[k], batch.obs[k].numpy()) for k in self.batch_keys], 1)
            unseen = (model_codes < 0).any(0)
            if unseen.any():
                j = int(np.argmax(unseen))
                raise ValueError(
                    self._unseen(self.batch_keys[j], batch.obs[self.batch_keys[j]].numpy(), model_codes[:, j])
                )
            codes = to_device(torch.from_numpy(model_codes), self.device)
        if self.label_keys:
            labels = torch.stack(
                [torch.from_numpy(apply_lut(self.label_luts[k], batch.obs[k].numpy())) for k in self.label_keys], 1
            )
            labels = to_device(labels, self.device)
        val = holdout_mask(positions, self.val_fraction, self.seed)
        counts = Counts.from_sparse_csr(batch.x, self.device)
        return ModelInput(counts, codes, labels, positions, val, self.measured.of(positions))

    def _unseen(self, key: str, store_codes, model_codes) -> str:
        """The message for cells whose `key` the model has no code for: values it was not trained on (named), or
        missing ones."""
        bad = store_codes[model_codes < 0]
        names = [str(self.batch_names[key][c]) for c in np.unique(bad[bad >= 0])]
        if not names:
            return f"obs column {key!r} is missing for some cells; fill it with one of the model's {key} values"
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return (
            f"obs column {key!r} has categories the model was not trained on ({shown}); use map_query to extend the "
            "model (get_normalized_expression(transform_batch=...) decodes cells as a batch the model knows)"
        )
