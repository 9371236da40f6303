"""Notebook API: AtlasVAE.setup(...).fit(...), get_latent, predict_labels, reconstruction, save/load.

Top of the import graph: it sits on train, infer, query and rundir, and nothing imports it back.
Inference streams the store in order (no shuffle) and returns arrays in store order; weights load
from safetensors only (no pickle is ever unpickled).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loaders import CellStream, open_store

from .batches import ToModelInput
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .infer import embed
from .model import VAEModule
from .query import map_query
from .rundir import load_run, save_run
from .train import make_accelerator, train
from .vocab import Vocab


class AtlasVAE:
    def __init__(self, config: RunConfig, vocab: Vocab | None = None, module: VAEModule | None = None, run_dir=None):
        self.config, self.vocab, self.module, self.run_dir = config, vocab, module, run_dir

    @classmethod
    def setup(
        cls,
        data: str,
        *,
        batch_key: str,
        label_keys=(),
        covariate_keys=(),
        obs_filter=None,
        layer=None,
        genes=None,
        model: dict | None = None,
        train: dict | None = None,
    ) -> AtlasVAE:
        cfg = RunConfig(
            model=ModelConfig(**(model or {})),
            train=TrainConfig(**(train or {})),
            data=DataConfig(
                data=str(data),
                batch_key=batch_key,
                label_keys=tuple(label_keys),
                covariate_keys=tuple(covariate_keys),
                obs_filter=obs_filter,
                layer=layer,
                genes=None if genes is None else tuple(genes),
            ),
        )
        return cls(cfg)

    # -- training / persistence -------------------------------------------------------------------
    def fit(self, run_dir, *, max_epochs: int | None = None, resume: bool = False) -> AtlasVAE:
        """Train in this process (streaming) into run_dir, then hold the trained weights."""
        cfg = self.config.override("train", max_epochs=max_epochs)
        train(cfg, run_dir, resume=resume, accelerator=make_accelerator(cfg))
        fitted = AtlasVAE.load(run_dir)
        self.config, self.vocab, self.module, self.run_dir = fitted.config, fitted.vocab, fitted.module, run_dir
        return self

    @classmethod
    def load(cls, run_dir) -> AtlasVAE:
        run = load_run(run_dir)
        return cls(run.config, run.vocab, run.module, run.path)

    def save(self, run_dir) -> Path:
        self._need_fit()
        self.run_dir = save_run(run_dir, self.config, self.vocab, self.module)
        return self.run_dir

    # -- inference --------------------------------------------------------------------------------
    def _need_fit(self):
        if self.module is None:
            raise RuntimeError("model is not trained: call fit() or AtlasVAE.load(run_dir)")

    def _batches(self, data, obs_filter, batch_size, with_batch_codes=False):
        """ModelInputs in store order; genes the store lacks are zero-filled (with a warning), as in
        `embed`."""
        self._need_fit()
        d = self.config.data
        store = open_store(
            data or d.data, obs_filter=obs_filter if data else (obs_filter or d.obs_filter), layer=d.layer
        )
        keys = d.batch_keys if with_batch_codes else ()
        colmap = store.gene_map(self.vocab.genes, missing="zero-fill", what="model's")
        stream = CellStream(
            store,
            batch_size=batch_size,
            seed=0,
            shuffle=False,
            genes=self.vocab.genes,
            colmap=colmap,
            obs_keys=keys,
            prefetch_next_epoch=False,
            validate="counts",
        )
        device = next(self.module.parameters()).device
        yield from map(ToModelInput(self.vocab, store, device, batch_keys=keys), stream)

    def embed(self, data: str, out, **kwargs):
        """Embed a (query) store to an AnnData-Zarr store on disk: see bigatlas.infer.embed. Needs a
        saved run dir (fit() or load())."""
        if self.run_dir is None:
            raise RuntimeError("embed() streams from a saved run dir: fit(run_dir) or AtlasVAE.load(run_dir)")
        return embed(self.run_dir, data, out, **kwargs)

    def map_query(self, query: str, out, **kwargs) -> AtlasVAE:
        """Architecture surgery on `query` (see bigatlas.query.map_query); returns the new model."""
        if self.run_dir is None:
            raise RuntimeError("map_query() starts from a saved run dir: fit(run_dir) or AtlasVAE.load(run_dir)")
        map_query(self.run_dir, query, out, **kwargs)
        return AtlasVAE.load(out)

    @torch.no_grad()
    def get_latent(self, data: str | None = None, *, obs_filter=None, batch_size: int = 4096) -> np.ndarray:
        """Posterior means (cells × n_latent), in store order."""
        self._need_fit()
        self.module.eval()
        out = []
        for inp in self._batches(data, obs_filter, batch_size):
            out.append(self.module.latent(inp.counts).cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def predict_labels(self, data: str | None = None, *, obs_filter=None, batch_size: int = 4096) -> dict:
        """Per label key: {'label': predicted class names, 'probability': max probability,
        'probabilities': cells × classes}, in store order."""
        self._need_fit()
        self.module.eval()
        keys = list(self.vocab.label_classes)
        probs = {k: [] for k in keys}
        for inp in self._batches(data, obs_filter, batch_size):
            for k, p in zip(keys, self.module.label_probs(self.module.latent(inp.counts))):
                probs[k].append(p.cpu().numpy())
        out = {}
        for k in keys:
            p = np.concatenate(probs[k])
            classes = np.asarray(self.vocab.label_classes[k])
            out[k] = {"label": classes[p.argmax(1)], "probability": p.max(1), "probabilities": p}
        return out

    @torch.no_grad()
    def get_reconstructed_expression(
        self, data: str | None = None, *, obs_filter=None, library_size=None, batch_size: int = 1024
    ) -> np.ndarray:
        """Decoded NB/ZINB means (cells × genes) from the posterior mean, each cell decoded with its own
        batch; library_size=None uses the observed total counts, a number rescales every cell to it."""
        self._need_fit()
        self.module.eval()
        out = []
        for inp in self._batches(data, obs_filter, batch_size, with_batch_codes=True):
            lib = inp.counts.library
            if library_size is not None:
                lib = torch.full_like(lib, float(library_size))
            mu, _, _ = self.module.decode(self.module.latent(inp.counts), inp.codes, lib)
            out.append(mu.cpu().numpy())
        return np.concatenate(out)
