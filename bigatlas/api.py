"""Notebook API: AtlasVAE.setup(...).fit(...), get_latent, predict_labels, reconstruction, save/load.

Inference streams the store in order (no shuffle) and returns arrays in store order; weights load
from safetensors only (no pickle is ever unpickled).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from loaders import CellStream, open_store

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .distributions import Counts
from .model import ScAtlasVAE
from .train import FORMAT_VERSION, build_model, make_accelerator, train
from .vocab import Vocab, align_genes, apply_lut


class AtlasVAE:
    def __init__(self, config: RunConfig, vocab: Vocab | None = None, module: ScAtlasVAE | None = None, run_dir=None):
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
        from safetensors.torch import load_file

        run = Path(run_dir)
        for name in ("config.json", "vocab.json", "model.safetensors"):
            if not (run / name).exists():
                raise FileNotFoundError(f"{run} is not a trained run dir: {name} is missing")
        saved = json.loads((run / "config.json").read_text())
        version = saved.get("format_version")
        if version != FORMAT_VERSION or "config" not in saved:
            raise ValueError(
                f"{run}/config.json has format_version {version!r}; this bigatlas reads "
                f"version {FORMAT_VERSION} run dirs"
            )
        cfg = RunConfig.from_dict(saved["config"])
        vocab = Vocab.load(run / "vocab.json")
        module = build_model(vocab, cfg)
        state = load_file(str(run / "model.safetensors"))
        module.load_state_dict(state, strict=True)
        module.eval()
        return cls(cfg, vocab, module, run)

    def save(self, run_dir) -> Path:
        from safetensors.torch import save_file

        self._need_fit()
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(
            json.dumps({"format_version": FORMAT_VERSION, "config": self.config.to_dict()}, indent=2) + "\n"
        )
        self.vocab.save(run / "vocab.json")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()},
            str(run / "model.safetensors"),
            metadata={"format_version": str(FORMAT_VERSION)},
        )
        self.run_dir = run
        return run

    # -- inference --------------------------------------------------------------------------------
    def _need_fit(self):
        if self.module is None:
            raise RuntimeError("model is not trained: call fit() or AtlasVAE.load(run_dir)")

    def _batches(self, data, obs_filter, batch_size, with_batch_codes=False):
        """(positions, Counts, model batch codes or None) in store order; genes the store lacks are
        zero-filled (with a warning), as in `embed`."""
        self._need_fit()
        d = self.config.data
        store = open_store(
            data or d.data, obs_filter=obs_filter if data else (obs_filter or d.obs_filter), layer=d.layer
        )
        keys = d.batch_keys if with_batch_codes else ()
        colmap, _ = align_genes(store, self.vocab.genes)
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
        luts = self.vocab.batch_luts(store) if keys else {}
        device = next(self.module.parameters()).device
        for batch in stream:
            codes = None
            if keys:
                codes = np.stack([apply_lut(luts[k], batch.obs[k].numpy()) for k in keys], 1)
                unseen = (codes < 0).any(1)
                if unseen.any():
                    k = keys[int(np.argmax((codes[unseen] < 0).any(0)))]
                    raise ValueError(
                        f"obs column {k!r} has categories the model was not trained on; "
                        "use map_query to extend the model"
                    )
                codes = torch.from_numpy(codes).to(device)
            yield batch.index.numpy(), Counts.from_sparse_csr(batch.x, device), codes

    def embed(self, data: str, out, **kwargs):
        """Embed a (query) store to an AnnData-Zarr store on disk: see bigatlas.infer.embed. Needs a
        saved run dir (fit() or load())."""
        from .infer import embed

        if self.run_dir is None:
            raise RuntimeError("embed() streams from a saved run dir: fit(run_dir) or AtlasVAE.load(run_dir)")
        return embed(self.run_dir, data, out, **kwargs)

    def map_query(self, query: str, out, **kwargs) -> AtlasVAE:
        """Architecture surgery on `query` (see bigatlas.query.map_query); returns the new model."""
        from .query import map_query

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
        for _, counts, _ in self._batches(data, obs_filter, batch_size):
            out.append(self.module.latent(counts).cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def predict_labels(self, data: str | None = None, *, obs_filter=None, batch_size: int = 4096) -> dict:
        """Per label key: {'label': predicted class names, 'probability': max probability,
        'probabilities': cells × classes}, in store order."""
        self._need_fit()
        self.module.eval()
        keys = list(self.vocab.label_classes)
        probs = {k: [] for k in keys}
        for _, counts, _ in self._batches(data, obs_filter, batch_size):
            for k, p in zip(keys, self.module.label_probs(self.module.latent(counts))):
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
        for _, counts, codes in self._batches(data, obs_filter, batch_size, with_batch_codes=True):
            lib = counts.library if library_size is None else torch.full_like(counts.library, float(library_size))
            mu, _, _ = self.module.decode(self.module.latent(counts), codes, lib)
            out.append(mu.cpu().numpy())
        return np.concatenate(out)
