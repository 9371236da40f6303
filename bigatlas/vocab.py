"""What a model was trained on: genes, category lists per batch/covariate key, classes per label key.

Saved as RUN_DIR/vocab.json (rundir.RunDir). Translating a store's obs codes into model codes goes through lookup
tables built by category name, so a query store with other category orders maps correctly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loaders.store import code_dtype, measured_panels

from .config import UNLABELED, DataConfig


@dataclass
class Vocab:
    genes: list[str]  # feature ids, in model column order
    batch_categories: dict[str, list[str]]  # per batch/covariate key, in embedding order
    label_classes: dict[str, list[str]]  # per label key, undefined labels excluded
    class_counts: dict[str, list[int]] = field(default_factory=dict)  # labelled training cells per class
    # genes some training cell's store did not measure (a collection's outer join); [] in older runs
    unmeasured_genes: list[str] = field(default_factory=list)
    # per batch/covariate key, how many of its first categories the model was trained on before any surgery
    # added a query's (the batch-average cell of VAEModule.unmeasured_fill); unset: all of them
    trained_categories: dict[str, int] = field(default_factory=dict)
    # each gene's feature name in the training data (its id where it had none); [] in older runs. A query whose var
    # has names only (gene symbols) is matched by these
    gene_names: list[str] = field(default_factory=list)

    @classmethod
    def from_store(cls, store, data: DataConfig, train_mask: np.ndarray | None = None) -> Vocab:
        genes = list(data.genes) if data.genes is not None else list(store.var_ids)
        dup = sorted(g for g, n in Counter(genes).items() if n > 1)
        if dup:
            names = f"{', '.join(dup[:8])}{' …' if len(dup) > 8 else ''}"
            if data.genes is not None:
                raise ValueError(f"gene ids repeat in the gene list: {names}; de-duplicate the --genes file")
            raise ValueError(
                f"gene ids repeat in {store.uri}: {names}; make the store's var ids unique (AnnData: "
                "var_names_make_unique()) or pass --genes (genes=) listing genes that occur once"
            )
        batch = {}
        for key in data.batch_keys:
            codes, cats = store.obs_codes(key)
            missing = int((codes < 0).sum())
            if missing:
                raise ValueError(
                    f"obs column {key!r} (a batch/covariate key) is missing for {missing} cells; "
                    "fill it (e.g. with 'unknown') or filter those cells out"
                )
            batch[key] = [str(c) for c in cats]
        labels, counts = {}, {}
        for key in data.label_keys:
            codes, cats = store.obs_codes(key)
            defined = defined_labels(codes, cats, data.unlabeled_categories)
            classes = list(defined.categories)
            if not classes:
                raise ValueError(
                    f"label key {key!r} has no labelled cell: its values ({', '.join(map(str, cats))}) all mean "
                    "'no label'; train without that key, or, where one of them is a class, name the values that mean "
                    "no label with --unlabeled-category (unlabeled_categories=)"
                )
            labels[key] = classes
            counts[key] = class_counts(np.asarray(defined.codes), train_mask, len(classes)).tolist()
        colmap = store.gene_map(genes)
        panels = measured_panels(store, colmap, len(genes)) if store.gene_panels() is not None else None
        unmeasured = [] if panels is None else [g for g, every in zip(genes, panels.all(0)) if not every]
        names = np.array(genes, dtype=object)
        names[colmap[colmap >= 0]] = np.asarray(store.var_names, dtype=object)[colmap >= 0]
        return cls(genes, batch, labels, counts, unmeasured, gene_names=[str(n) for n in names])

    def colmap(self, store, min_overlap: float = 0.5) -> np.ndarray:
        """Where the model's genes lie in `store` (Store.gene_map, by id and the recorded names): genes it lacks are
        zero-filled with a warning, and a store sharing less than `min_overlap` of them is refused."""
        return store.gene_map(
            self.genes, missing="zero-fill", min_overlap=min_overlap, what="model's", names=self.gene_names
        )

    def batch_luts(self, store, keys) -> dict[str, np.ndarray]:
        """Store code → model code per batch key in `keys` (only those columns are read); -1 where the
        store has a category the model lacks."""
        return {k: label_lut(store.obs_codes(k)[1], self.batch_categories[k]) for k in keys}

    def label_luts(self, store, keys=None) -> dict[str, np.ndarray]:
        """Store code → class index per label key (default: all); -1 for undefined or unknown labels."""
        keys = self.label_classes if keys is None else keys
        return {k: label_lut(store.obs_codes(k)[1], self.label_classes[k]) for k in keys}


def class_counts(codes: np.ndarray, mask: np.ndarray | None, n_classes: int) -> np.ndarray:
    """Cells per class (code >= 0) where mask, counted in slices (bincount makes an int64 copy)."""
    out = np.zeros(n_classes, np.int64)
    for lo in range(0, len(codes), 1 << 20):
        c = codes[lo : lo + (1 << 20)]
        keep = c >= 0 if mask is None else (c >= 0) & mask[lo : lo + (1 << 20)]
        out += np.bincount(c[keep], minlength=n_classes)
    return out


def defined_labels(codes: np.ndarray, categories, unlabeled=UNLABELED) -> pd.Categorical:
    """Labels as a categorical of the real classes (as strings, store order): cells whose label is one
    of `unlabeled` (exact match) or missing get code -1."""
    bad = set(unlabeled)
    classes = [str(c) for c in categories if str(c) not in bad]
    lut = label_lut(categories, classes)
    codes = apply_lut(lut, np.asarray(codes), dtype=code_dtype(len(classes)))
    return pd.Categorical.from_codes(codes, categories=classes)


# class names that usually mean "not annotated" (the Census's 'unknown', scANVI's 'Unknown', ...)
NOT_ANNOTATED = {"unknown", "unassigned", "unannotated", "unlabeled", "unlabelled", "na", "nan", "none", "n/a", "?"}


def unlabeled_report(store, data: DataConfig) -> list[str]:
    """One line per label key: classes, and how many cells count as unlabelled (said at start); and a line for
    each class whose name usually means "not annotated", which the model would learn and predict as a type."""
    lines = []
    for key in data.label_keys:
        labels = defined_labels(*store.obs_codes(key), data.unlabeled_categories)
        n = int((labels.codes < 0).sum())
        names = ", ".join(repr(u) for u in data.unlabeled_categories)
        lines.append(
            f"label key {key!r}: {len(labels.categories)} classes; {n:,} of {len(labels):,} cells unlabelled "
            f"({names} or missing)"
        )
        counts = np.bincount(labels.codes[labels.codes >= 0], minlength=len(labels.categories))
        for code, name in enumerate(labels.categories):
            if str(name).strip().lower() in NOT_ANNOTATED:
                lines.append(
                    f"note: label key {key!r} has a class {str(name)!r} ({counts[code]:,} cells), trained and "
                    f"predicted as a cell type; if it means unlabelled, pass --unlabeled-category {str(name)!r} "
                    f"(AtlasVAE(unlabeled_categories=[{str(name)!r}])): those cells are then trained without a label"
                )
    return lines


def label_lut(store_categories, model_categories) -> np.ndarray:
    index = {c: i for i, c in enumerate(model_categories)}
    return np.array([index.get(str(c), -1) for c in store_categories], dtype=np.int64)


def apply_lut(lut: np.ndarray, codes: np.ndarray, dtype=np.int64) -> np.ndarray:
    """Model codes for store codes (store code -1, i.e. missing, stays -1). For a whole column pass a
    compact `dtype`: at 10M cells every byte per cell is 10 MB, and no cells-sized temporary is made."""
    padded = np.append(np.asarray(lut, dtype=np.int64), -1).astype(dtype)  # code -1 indexes the appended -1
    return padded[np.asarray(codes)]
