"""Query mapping: scArches-style architecture surgery on a trained model.

Zero-shot mapping needs nothing here: the encoder does not see the batch, so `bigatlas embed` maps a
query with new batches directly. Surgery fine-tunes for the query's batches: each batch/covariate
embedding table grows by the query's new categories (initialised at the mean of the reference rows),
and by default only those new rows train — encoder, decoder and label heads are frozen (their
BatchNorm layers stay in eval mode, so reference embeddings do not move). Weight decay is 0 during
surgery so that frozen rows receive exactly no update.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from loaders import data_name, is_anndata

from .config import RunConfig
from .rundir import Run, load_run
from .train import make_accelerator, train
from .vocab import Vocab

ENCODER = ("encoder", "z_mean", "z_logvar")
DECODER = ("decoder", "px_scale", "px_r", "gate")


@dataclass
class Surgery:
    reference: Run  # the trained reference model
    unfreeze_encoder: bool = False
    unfreeze_decoder: bool = False

    def vocab(self, store) -> Vocab:
        """Reference vocab with each batch key's categories extended by the query's new ones."""
        ref: Vocab = self.reference.vocab
        batch = {}
        for key, cats in ref.batch_categories.items():
            query_cats = [str(c) for c in store.obs_codes(key)[1]]
            known = set(cats)
            batch[key] = list(cats) + [c for c in query_cats if c not in known]
        return Vocab(list(ref.genes), batch, dict(ref.label_classes), dict(ref.class_counts))

    def apply(self, model, vocab: Vocab) -> None:
        """Copy reference weights into the grown model and freeze what stays fixed."""
        ref_state = self.reference.module.state_dict()
        own = model.state_dict()
        old_rows = {}
        for name, value in ref_state.items():
            if name.startswith("embeddings.") and own[name].shape[0] > value.shape[0]:
                grown = value.mean(0, keepdim=True).expand(own[name].shape[0], -1).clone()
                grown[: value.shape[0]] = value
                own[name] = grown
                old_rows[name] = value.shape[0]
            else:
                own[name] = value
        model.load_state_dict(own, strict=True)
        trainable = {"embeddings"}
        if self.unfreeze_encoder:
            trainable.update(ENCODER)
        if self.unfreeze_decoder:
            trainable.update(DECODER)
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in trainable)
        for name, n_old in old_rows.items():
            weight = dict(model.named_parameters())[name]
            weight.register_hook(_zero_rows(n_old))
        modules = dict(model.named_children())  # the per-gene gate may be a bare Parameter: skipped here
        model.frozen_modules = tuple(m for m in (*ENCODER, *DECODER, "heads") if m in modules and m not in trainable)
        model.train(model.training)


def _zero_rows(n: int):
    def hook(grad):
        grad = grad.clone()
        grad[:n] = 0
        return grad

    return hook


def map_query(
    run_dir,
    query,
    out,
    *,
    epochs: int = 10,
    obs_filter: str | None = None,
    unfreeze_encoder: bool = False,
    unfreeze_decoder: bool = False,
    batch_size: int | None = None,
    lr: float | None = None,
    accelerator=None,
) -> Path:
    """Fine-tune the model in run_dir on `query` (a store path, an .h5ad or an AnnData object) by
    surgery; writes a new RUN_DIR at `out`."""
    reference = load_run(run_dir)
    ref = reference.config
    cfg = RunConfig(
        model=ref.model,
        train=replace(
            ref.train,
            max_epochs=epochs,
            weight_decay=0.0,
            batch_size=batch_size or ref.train.batch_size,
            lr=lr or ref.train.lr,
        ),
        data=replace(ref.data, data=data_name(query), obs_filter=obs_filter, label_keys=()),
    )
    surgery = Surgery(reference, unfreeze_encoder, unfreeze_decoder)
    in_memory = query if is_anndata(query) else None
    return train(cfg, out, accelerator=accelerator or make_accelerator(cfg), surgery=surgery, data=in_memory)
