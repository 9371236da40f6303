"""RUN_DIR, the one place that knows its layout:

    config.json        {"format_version": 1, "config": RunConfig as a dict}
    vocab.json         genes, batch categories, label classes, class counts (vocab.Vocab)
    model.safetensors  final weights (written last, atomically)
    checkpoints/       step-<n>/ Accelerate states + bigatlas_rank<r>.json, and `latest` naming one
    dropped_labels/    <key>.csv: the cells trained without that label (--drop-labels; dropped_labels.py)
    reference/         the reference index: latents, labels, UMAP of a sample of training cells
                       and the label heads' calibration (reference.py)
    metrics.csv, tb/, loss_curves.png, trace/ (tests), report/ (evaluate)

`load_run(path)` gives a trained model back (config, vocab, torch module) from safetensors only: no
pickle is ever unpickled. Writers here are main-process-only by contract (the caller decides).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loaders import data_name

from .config import RunConfig
from .model import VAEModule
from .reference import DIR_NAME as REFERENCE
from .vocab import Vocab

FORMAT_VERSION = 1
# how long to train may change on resume; nothing that shapes the run may
RESUMABLE_CHANGES = (
    "max_epochs", "max_steps", "early_stopping_patience", "early_stopping_min_delta", "min_epochs", "min_cells",
    "num_workers", "reference_cells", "reference_umap", "norm_refresh_cells",
)  # num_workers: elastic; the reference and the BatchNorm statistics are made after training  # fmt: skip


# [train] settings added after format version 1, with the value that reproduces what a run dir written
# before them did: such a run dir resumes (and loads) as what it was
ADDED_SETTINGS = {
    "adam_eps": 1e-8,  # torch's default
    "ema_decay": 0.0,  # the last step's weights
    "ema_every": 1,
    "ema_start": "run",
    "compile_loss": "off",
    "lr_plateau_patience": 0,
    "lr_plateau_factor": 0.5,
    "min_epochs": 0,  # early stopping from the warm-up's end
    "min_cells": 0,  # ... at any number of cells
    "norm_refresh_cells": 0,  # the written weights kept training's BatchNorm statistics
    "missing_genes": "zero",  # zero-filled genes counted as observed zeros
}
# [model] settings added since, likewise (a run dir written before them has the model they describe)
ADDED_MODEL_SETTINGS = {
    "batch_in_heads": False,  # the mean head read the hidden layer alone
    "norm": "batch",  # BatchNorm was the only normalisation
    "label_gce_q": 0.0,  # the label loss was the cross-entropy
    "label_smoothing": 0.0,  # ... without smoothing
    "batch_adversary": 0.0,  # no batch adversary
    "batch_adversary_by_label": False,  # (its target the whole minibatch's average; read only with an adversary)
    "batch_align": 0.0,  # no batch alignment
    "batch_interaction": False,  # no batch-by-state term
    "batch_interaction_penalty": 0.1,  # (its default; read only with the term)
    "batch_interaction_detach": False,  # the encoder learned through the term too
    "prior_components": 0,  # the standard normal prior
}

# [data] settings added since, likewise
ADDED_DATA_SETTINGS = {
    "drop_labels": [],  # every given label was trained on
}


# what a run writes beside config.json and vocab.json (which a new run rewrites) and its copies of the dropped
# labels (rewritten too; a --drop-labels may name them): a new run over an earlier one removes these first
# (train --overwrite), so that none of the earlier run's checkpoints, epoch rows or reference pass for the new one's
OUTPUTS = ("checkpoints", "model.safetensors", "metrics.csv", "tb", "loss_curves.png", REFERENCE, "report", "trace",
           "adata.h5ad")  # fmt: skip


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.ckpt = self.path / "checkpoints"
        self.config_file = self.path / "config.json"
        self.vocab_file = self.path / "vocab.json"
        self.weights_file = self.path / "model.safetensors"
        self.dropped_labels = self.path / "dropped_labels"
        self.metrics = self.path / "metrics.csv"
        self.adata = self.path / "adata.h5ad"  # save(save_anndata=True): the AnnData the model was given

    def dropped_labels_of(self, key: str) -> Path:
        """The run's copy of the cells trained without label `key` (--drop-labels)."""
        return self.dropped_labels / f"{key}.csv"

    def outputs(self) -> list[str]:
        """The names of what a run left here (OUTPUTS): empty for a folder that holds no run. Such names in a
        folder without config.json (which a run writes before any of them) are not a run's: refused."""
        found = [name for name in OUTPUTS if (self.path / name).exists()]
        if found and not self.config_file.exists():
            raise ValueError(
                f"{self.path} holds {', '.join(found)} but no config.json: not a bigatlas run dir, so nothing in it "
                "is replaced; choose another folder"
            )
        return found

    def remove_outputs(self) -> None:
        for name in self.outputs():
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()

    # -- config and vocab -------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format_version": FORMAT_VERSION, "config": cfg.to_dict()}, indent=2) + "\n"
        _write_atomically(self.config_file, text)

    def _saved(self) -> dict:
        """config.json as written, with keys of older versions under their current names and settings
        added since at the value that reproduces them."""
        saved = json.loads(self.config_file.read_text())
        data = saved.get("config", {}).get("data", {})
        if "undefined_labels" in data:  # run dirs written before --unlabeled-category kept the old name
            data["unlabeled_categories"] = data.pop("undefined_labels")
        for section, added in (
            ("train", ADDED_SETTINGS), ("model", ADDED_MODEL_SETTINGS), ("data", ADDED_DATA_SETTINGS)
        ):  # fmt: skip
            values = saved.get("config", {}).get(section)
            if values is not None:
                for key, before in added.items():
                    values.setdefault(key, before)
        return saved

    def read_config(self) -> RunConfig:
        saved = self._saved()
        version = saved.get("format_version")
        if version != FORMAT_VERSION or "config" not in saved:
            raise ValueError(
                f"{self.config_file} has format_version {version!r}; this bigatlas reads "
                f"version {FORMAT_VERSION} run dirs"
            )
        return RunConfig.from_dict(saved["config"])

    def data_config(self) -> dict | None:
        """The saved [data] section as plain values, None without a config (any format version)."""
        if not self.config_file.exists():
            return None
        return self._saved()["config"]["data"]

    def saved_setting(self, section: str, key: str):
        """A setting as config.json holds it (one added since at its reproducing value); None without one."""
        if not self.config_file.exists():
            return None
        return self._saved().get("config", {}).get(section, {}).get(key)

    def check_resumable(self, cfg: RunConfig) -> None:
        """Refuse to resume with settings that shape the run differently from the saved ones."""
        saved = self._saved().get("config", {})
        now = json.loads(json.dumps(cfg.to_dict()))
        for c in (saved, now):
            if c.get("data", {}).get("data"):  # a run from before paths were recorded absolute: relative to here
                c["data"]["data"] = data_name(c["data"]["data"])
            for key in RESUMABLE_CHANGES:
                c.get("train", {}).pop(key, None)
        if saved != now:
            diff = sorted(f"{sec}.{k}" for sec in now for k in now[sec] if saved.get(sec, {}).get(k) != now[sec][k])
            raise ValueError(
                f"{self.config_file} differs from this run's settings ({', '.join(diff)}); resume "
                "with the same configuration or start a new RUN_DIR"
            )

    def write_vocab(self, vocab: Vocab) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.vocab_file, json.dumps(vocab.__dict__, indent=1) + "\n")

    def read_vocab(self) -> Vocab:
        saved = json.loads(self.vocab_file.read_text())
        if "unmeasured_genes" not in saved and self.config_file.exists():
            # a run from before the list: an outer join's encoder read every missing gene as zero, so none is filled
            outer = self._saved().get("config", {}).get("data", {}).get("gene_join") == "outer"
            saved["unmeasured_genes"] = list(saved["genes"]) if outer else []
        return Vocab(**saved)

    # -- weights ----------------------------------------------------------------------------------
    def write_weights(self, module) -> Path:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        tmp = self.weights_file.with_name(self.weights_file.name + ".tmp")
        save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        os.replace(tmp, self.weights_file)
        return self.weights_file

    def read_weights(self, module) -> None:
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(self.weights_file)), strict=True)

    # -- checkpoints ------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        pointer = self.ckpt / "latest"
        if not pointer.exists():
            return None
        target = self.ckpt / pointer.read_text().strip()
        return target if target.is_dir() else None

    def checkpoint_tmp(self, step: int) -> tuple[Path, str]:
        name = f"step-{step:09d}"
        return self.ckpt / f".tmp-{name}", name

    def publish(self, tmp: Path, name: str, keep: int) -> None:
        """Rename a fully written checkpoint into place, then point `latest` at it (atomically)."""
        final = self.ckpt / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomically(self.ckpt / "latest", name + "\n")
        done = sorted(p for p in self.ckpt.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_model(vocab: Vocab, cfg: RunConfig) -> VAEModule:
    """A fresh torch module shaped by the vocab (genes, categories, classes, genes read as zeros) and the model
    config."""
    module = VAEModule(
        len(vocab.genes),
        [len(c) for c in vocab.batch_categories.values()],
        [len(c) for c in vocab.label_classes.values()],
        cfg.model,
        [vocab.class_counts[k] for k in vocab.label_classes],
    )
    module.read_as_zero[np.isin(vocab.genes, vocab.unmeasured_genes)] = True
    module.average_rows = [vocab.trained_categories.get(k, len(c)) for k, c in vocab.batch_categories.items()]
    return module


@dataclass
class Run:
    """A trained model as saved in a RUN_DIR."""

    path: Path
    config: RunConfig
    vocab: Vocab
    module: VAEModule


def load_run(path) -> Run:
    run = RunDir(path)
    latest = run.latest() if run.config_file.exists() and not run.weights_file.exists() else None
    if latest is not None:  # a training stopped before it wrote the weights, or one still running
        raise FileNotFoundError(
            f"{run.path} holds a training that has not finished (no {run.weights_file.name}; its latest checkpoint "
            f"is {latest.name}): resume it with the settings it started with (`bigatlas train --resume --out "
            f"{run.path} …`, or fit({str(run.path)!r}, resume=True)), or wait for it to end"
        )
    for f in (run.config_file, run.vocab_file, run.weights_file):
        if not f.exists():
            raise FileNotFoundError(f"{run.path} is not a trained run dir: {f.name} is missing")
    cfg = run.read_config()
    vocab = run.read_vocab()
    module = build_model(vocab, cfg)
    run.read_weights(module)
    module.eval()
    return Run(run.path, cfg, vocab, module)


def save_run(path, config: RunConfig, vocab: Vocab, module) -> Path:
    run = RunDir(path)
    run.write_config(config)
    run.write_vocab(vocab)
    run.write_weights(module)
    return run.path
