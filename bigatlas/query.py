"""Query mapping: scArches-style architecture surgery on a trained model.

Zero-shot mapping needs nothing here: the encoder does not see the batch, so `bigatlas embed` maps a
query with new batches directly. Surgery fine-tunes for the query's batches: each batch/covariate
embedding table grows by the query's new categories (initialised at the mean of the reference rows),
and by default only those new rows train — encoder, decoder and label heads are frozen (their
BatchNorm layers stay in eval mode, so reference embeddings do not move). Weight decay is 0 during
surgery so that frozen rows receive exactly no update.

A query that has the reference's label keys is mapped with its labels (cells labelled with an
unlabelled category excluded): each label head grows by the query's new classes the same way, and only
the new rows train, on the label loss of the query's labelled cells; the reference's classes keep
their weights. The new run's reference index is the old one plus the query's cells
(reference_build.extend_reference).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from loaders import data_name, is_anndata, open_store
from loaders.csr import select_columns

from .batches import Measured, holdout_all
from .config import RunConfig
from .reference import read_reference
from .rundir import Run, load_run
from .train import make_accelerator, train
from .vocab import Vocab, apply_lut, class_counts, defined_labels

ENCODER = ("encoder", "z_mean", "z_logvar")
DECODER = ("decoder", "px_scale", "px_r", "gate", "interaction")


@dataclass
class Surgery:
    reference: Run  # the trained reference model
    unfreeze_encoder: bool = False
    unfreeze_decoder: bool = False
    labelled: bool = False  # the query has every label key: its new classes grow the heads

    def vocab(self, store) -> Vocab:
        """Reference vocab with each batch key's categories, and (labelled) each label key's classes,
        extended by the query's new ones; a new class counts the query's cells, the reference's keep theirs."""
        ref: Vocab = self.reference.vocab
        batch = {}
        for key, cats in ref.batch_categories.items():
            query_cats = [str(c) for c in store.obs_codes(key)[1]]
            known = set(cats)
            batch[key] = list(cats) + [c for c in query_cats if c not in known]
        classes, counts = dict(ref.label_classes), dict(ref.class_counts)
        if self.labelled:
            unlabeled = self.reference.config.data.unlabeled_categories
            for key, cats in ref.label_classes.items():
                query = defined_labels(*store.obs_codes(key), unlabeled)
                known = set(cats)
                classes[key] = list(cats) + [str(c) for c in query.categories if str(c) not in known]
                n = class_counts(np.asarray(pd.Categorical(query, categories=classes[key]).codes), None,
                                 len(classes[key]))  # fmt: skip
                counts[key] = list(ref.class_counts.get(key, [0] * len(cats))) + [int(c) for c in n[len(cats) :]]
        trained = {k: ref.trained_categories.get(k, len(cats)) for k, cats in ref.batch_categories.items()}
        return Vocab(list(ref.genes), batch, classes, counts, list(ref.unmeasured_genes), trained, list(ref.gene_names))

    def apply(self, model, vocab: Vocab, store=None) -> None:
        """Copy reference weights into the grown model and freeze what stays fixed; with a labelled
        query (`store`), fit the new classes' head rows first (fit_new_classes)."""
        ref_state = self.reference.module.state_dict()
        own = model.state_dict()
        old_rows = {}
        for name, value in ref_state.items():
            if name.startswith(("adversary.", "align_")):
                continue  # the query's model has neither (map_query): they only shaped the reference's training
            if name.startswith("class_weight_") and own[name].shape != value.shape:
                continue  # a grown head: recomputed from the grown vocab's class counts
            if name.startswith(("embeddings.", "heads.")) and own[name].shape[0] > value.shape[0]:
                grown = value.mean(0, keepdim=True).expand(own[name].shape).clone()
                grown[: value.shape[0]] = value
                own[name] = grown
                old_rows[name] = value.shape[0]
            else:
                own[name] = value
        model.load_state_dict(own, strict=True)
        grown = {int(n.split(".")[1]): rows for n, rows in old_rows.items() if n.startswith("heads.") and "weight" in n}
        if grown and store is not None:
            t = self.reference.config.train
            negatives = reference_cells(self.reference.path, list(vocab.label_classes), t.seed)
            fit_new_classes(model, store, vocab, grown, t, negatives)
        trainable = {"embeddings"}
        if any(name.startswith("heads.") for name in old_rows):
            trainable.add("heads")  # their old rows are held by the hooks below
        if self.unfreeze_encoder:
            trainable.update(ENCODER)
        if self.unfreeze_decoder:
            trainable.update(DECODER)
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in trainable)
            if name.startswith("heads.") and name not in old_rows:
                p.requires_grad_(False)  # a head without new classes stays as it was
        for name, n_old in old_rows.items():
            weight = dict(model.named_parameters())[name]
            weight.register_hook(_zero_rows(n_old))
        modules = dict(model.named_children())  # the per-gene gate may be a bare Parameter: skipped here
        model.frozen_modules = tuple(m for m in (*ENCODER, *DECODER, "heads") if m in modules and m not in trainable)
        model.train(model.training)


MAX_FIT_CELLS = 50_000


@torch.no_grad()
def _latents(model, store, vocab, positions) -> torch.Tensor:
    colmap = vocab.colmap(store)
    measured = Measured.of_store(store, colmap, len(vocab.genes), "cpu")
    was = model.training
    model.eval()
    parts = []
    for lo in range(0, len(positions), 16384):
        m = store.read(positions[lo : lo + 16384])
        x = select_columns(m, colmap, len(vocab.genes)).to_torch()
        parts.append(model.latent(x, measured=measured.of(positions[lo : lo + 16384])))
    model.train(was)
    return torch.cat(parts)


def reference_cells(run_path, keys: list[str], seed: int) -> tuple[torch.Tensor, np.ndarray] | None:
    """Latents and labels (per key of `keys`; -1 where none) of the reference run's index cells, at most
    MAX_FIT_CELLS of them; None without an index. Their latents hold in the mapped model (frozen encoder)."""
    ref = read_reference(run_path)
    if ref is None:
        return None
    z, codes, have = ref.arrays["latent"], ref.arrays["labels"], list(ref.info.get("label_keys", []))
    labels = np.stack([codes[:, have.index(k)] if k in have else np.full(len(z), -1) for k in keys], 1)
    pick = np.arange(len(z))
    if len(pick) > MAX_FIT_CELLS:
        pick = np.sort(np.random.default_rng([seed, 0x9E8]).choice(pick, MAX_FIT_CELLS, False))
    return torch.from_numpy(np.asarray(z[pick])).double(), labels[pick]


def fit_new_classes(model, store, vocab: Vocab, grown: dict[int, int], train_cfg, reference=None) -> None:
    """The new rows of each grown label head, fitted by class-weighted maximum likelihood on the
    query's labelled training cells (at most MAX_FIT_CELLS) with the reference rows fixed. With the
    encoder frozen this is a convex problem on fixed latents (solved by L-BFGS); a few epochs of SGD
    from the mean of the old rows moved them too little (~lr per step) to ever win a cell.
    `reference` (reference_cells) adds the reference index's labelled cells: fitted on the query alone, the
    new rows never saw a reference study's cells and claimed 3.0% of them (test_transfer.py's labelled
    mapping, the head's own answer); with them 0.3%, the new class's query cells still 98% found."""
    keys = list(vocab.label_classes)
    luts = vocab.label_luts(store, keys)
    labels = np.stack([apply_lut(luts[k], store.obs_codes(k)[0]) for k in keys], 1)
    train = ~holdout_all(store.n_obs, train_cfg.val_fraction, train_cfg.seed)
    positions = np.flatnonzero(train & (labels >= 0).any(1))
    if len(positions) > MAX_FIT_CELLS:
        positions = np.sort(np.random.default_rng([train_cfg.seed, 0x9E7]).choice(positions, MAX_FIT_CELLS, False))
    if len(positions) == 0:
        return
    z = _latents(model, store, vocab, positions).double()
    ys = labels[positions]
    if reference is not None:
        z, ys = torch.cat([z, reference[0]]), np.concatenate([ys, reference[1]])
    for i, n_old in grown.items():
        y = torch.as_tensor(ys[:, i])
        keep = y >= 0
        if not bool((y[keep] >= n_old).any()):
            continue
        head = model.heads[i]
        w, b = _fit_rows(z[keep], y[keep], head.weight.detach().double(), head.bias.detach().double(), n_old,
                         getattr(model, f"class_weight_{i}").double())  # fmt: skip
        with torch.no_grad():
            head.weight[n_old:] = w.float()
            head.bias[n_old:] = b.float()


def _fit_rows(z, y, weight, bias, n_old, class_weight):
    """Rows n_old: of a linear softmax head by weighted cross-entropy (+ a little L2), rows :n_old fixed."""
    w_new = weight[n_old:].clone().requires_grad_(True)
    b_new = bias[n_old:].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w_new, b_new], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.cat([z @ weight[:n_old].T + bias[:n_old], z @ w_new.T + b_new], 1)
        loss = torch.nn.functional.cross_entropy(logits, y, weight=class_weight) + 1e-4 * (w_new**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w_new.detach(), b_new.detach()


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
    layer: str | None = None,
    unfreeze_encoder: bool = False,
    unfreeze_decoder: bool = False,
    batch_size: int | None = None,
    lr: float | None = None,
    overwrite: bool = False,
    accelerator=None,
) -> Path:
    """Fine-tune the model in run_dir on `query` (a store path, an .h5ad or an AnnData object) by
    surgery; writes a new RUN_DIR at `out` (one that holds an earlier run only with `overwrite`; never
    run_dir itself). `layer`: the query's matrix of raw counts ("X", "raw" or a layer), where it is not the one
    the reference was trained on."""
    if Path(out).resolve() == Path(run_dir).resolve():
        raise ValueError(f"the query's RUN_DIR {out} is the reference's: map into a new folder")
    reference = load_run(run_dir)
    ref = reference.config
    layer, _ = ref.data.read_as(layer)  # the query's matrix of raw counts: unset, the reference's
    keys = list(reference.vocab.label_classes)
    have = set(open_store(query, obs_filter=obs_filter, layer=layer).obs_columns) if keys else set()
    labelled = bool(keys) and all(k in have for k in keys)
    if keys and not labelled and have & set(keys):
        print(
            f"the query has label key(s) {sorted(have & set(keys))} but not {sorted(set(keys) - have)}: "
            "mapping without labels",
            flush=True,
        )
    cfg = RunConfig(
        # only the new batches' rows train: nothing to hide or to align
        model=replace(ref.model, batch_adversary=0.0, batch_adversary_by_label=False, batch_align=0.0),
        train=replace(
            ref.train,
            max_epochs=epochs,
            weight_decay=0.0,
            batch_size=batch_size or ref.train.batch_size,
            lr=lr or ref.train.lr,
        ),
        data=replace(
            ref.data,
            data=data_name(query),
            obs_filter=obs_filter,
            layer=layer,
            label_keys=tuple(keys) if labelled else (),
            drop_labels=(),
        ),
    )
    surgery = Surgery(reference, unfreeze_encoder, unfreeze_decoder, labelled)
    in_memory = query if is_anndata(query) else None
    acc = accelerator or make_accelerator(cfg)
    return train(cfg, out, overwrite=overwrite, accelerator=acc, surgery=surgery, data=in_memory)


# what a query model's fit() takes (TrainConfig names): the surgery's other settings are the reference's
QUERY_FIT_OPTIONS = ("batch_size", "lr", "weight_decay")


@dataclass
class PendingMapping:
    """A query set up for surgery and not yet trained (the notebook API's load_query_data): the reference's
    run dir and how the surgery is to run on the model's data."""

    reference: Path
    unfreeze_encoder: bool = False
    unfreeze_decoder: bool = False
    obs_filter: str | None = None
    layer: str | None = None

    def run(self, query, out, *, max_epochs=None, resume=False, overwrite=False, accelerator=None, **options):
        """map_query of `query` into `out`; fit()'s keywords that have no meaning for a surgery are refused
        (weight decay is 0 there, so that the frozen rows do not move)."""
        if resume:
            raise ValueError("a query mapping starts over: fit(run_dir, overwrite=True) replaces an earlier one")
        unknown = sorted(set(options) - set(QUERY_FIT_OPTIONS))
        if unknown:
            raise TypeError(
                f"a query model's fit() takes max_epochs, {', '.join(QUERY_FIT_OPTIONS)}, not {', '.join(unknown)} "
                "(the surgery's other settings are the reference's)"
            )
        if options.pop("weight_decay", 0.0) != 0.0:
            raise ValueError("surgery trains with weight_decay 0, so that the frozen weights do not move")
        epochs = {} if max_epochs is None else {"epochs": max_epochs}
        return map_query(
            self.reference, query, out, obs_filter=self.obs_filter, layer=self.layer, overwrite=overwrite,
            unfreeze_encoder=self.unfreeze_encoder, unfreeze_decoder=self.unfreeze_decoder, accelerator=accelerator,
            **epochs, **options,
        )  # fmt: skip
