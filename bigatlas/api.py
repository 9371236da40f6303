"""Notebook API, scvi-tools style: AnnData in, arrays and DataFrames in AnnData order out.

    model = AtlasVAE(adata, batch_key="sample", label_keys=["cell_type"])   # or a store path / .h5ad
    model.fit("run/")                                                       # streams; RUN_DIR on disk
    adata.obsm["X_bigatlas"] = model.get_latent_representation()
    adata.obs = adata.obs.join(model.predict())

Top of the import graph: it sits on train, infer, query and rundir, and nothing imports it back.
Training streams through the same CellStream as the command line (an AnnData in memory or backed is a
Store like any other), so exactly-once, resume and multi-process hold. Weights load from safetensors
only (no pickle is ever unpickled).
"""

from __future__ import annotations

import functools
import inspect
import shutil
import weakref
from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from loaders import CellStream, data_name, in_memory_names, is_anndata, open_store
from loaders.store import closest

from .api_files import (
    check_recorded_data,
    copy_run_files,
    drop_spec,
    drops_named_in,
    scratch_run_dir,
    write_h5ad_atomically,
)
from .batches import ToModelInput
from .config import UNLABELED, DataConfig, ModelConfig, RunConfig, TrainConfig
from .infer import UNKNOWN, embed
from .label_review import MIN_AGREEMENT, review
from .model import VAEModule, draw
from .process_group import at_exit_after_peers
from .query import PendingMapping, map_query
from .reference import read_reference
from .rundir import RunDir, load_run, save_run
from .train import make_accelerator, train
from .transfer import DEFAULT_UNKNOWN, LabelTransfer
from .vocab import Vocab, defined_labels

# scvi-tools' TrainingPlan keywords (train(plan_kwargs=...)) → TrainConfig fields
PLAN_KWARGS = {"lr": "lr", "weight_decay": "weight_decay", "eps": "adam_eps", "n_epochs_kl_warmup": "kl_warmup_epochs"}


class AtlasVAE:
    """scAtlasVAE on `data`: an AnnData (in memory, or backed with read_h5ad(..., backed="r")), an
    .h5ad path, an AnnData-Zarr store, a SOMA experiment or census:<version>. `model` and `train`
    are dicts of ModelConfig / TrainConfig fields (e.g. model={"n_latent": 20}). `data` may be a list of
    stores, trained as one on their common genes (`gene_join="outer"`: their union, each store's missing genes
    left out of its cells' likelihood). `drop_labels` {label key: cells} trains as if those cells had no such
    label (the command line's --drop-labels): a CSV's path, or review_labels()'s flagged rows, a DataFrame
    with a `cell` column, or a list of cell names. `unlabeled_categories`: the label values that mean "no
    label" (default 'undefined'; missing values always do), e.g. ["unknown"] for a Census slice.
    `allow_non_integer` accepts values that are not whole (normalized or ambient-corrected; still finite and
    >= 0), in training and in what the model reads later. scvi-tools' setup_anndata keywords are taken too:
    `labels_key` (one label key), `categorical_covariate_keys` and `unlabeled_category`, each in place of this
    class's name for it."""

    def __init__(
        self, data=None, *, batch_key: str | None = None, label_keys=(), covariate_keys=(), obs_filter=None,
        layer=None, genes=None, gene_join: str = "inner", drop_labels: dict | None = None,
        unlabeled_categories=UNLABELED, allow_non_integer: bool = False, model: dict | None = None,
        train: dict | None = None, labels_key: str | None = None, categorical_covariate_keys=None,
        unlabeled_category: str | None = None,
    ):  # fmt: skip
        label_keys = _scvi_keyword("labels_key", labels_key, "label_keys", label_keys, ())
        covariate_keys = _scvi_keyword(
            "categorical_covariate_keys", categorical_covariate_keys, "covariate_keys", covariate_keys, ()
        )
        unlabeled_categories = _scvi_keyword(
            "unlabeled_category", unlabeled_category, "unlabeled_categories", unlabeled_categories, UNLABELED
        )
        self.data = data
        drops = {key: drop_spec(key, cells) for key, cells in (drop_labels or {}).items()}
        self._drop_files = {key: written for key, (_, written) in drops.items() if written is not None}
        self.vocab: Vocab | None = None
        self.module: VAEModule | None = None
        self.run_dir: Path | None = None
        self._scratch = None  # removes the temporary run dir of a fit() given none (weakref.finalize)
        self._pending: PendingMapping | None = None  # load_query_data(): the surgery fit() runs
        self._reference: AtlasVAE | None = None  # load_query_data()'s reference, kept while its run dir is needed
        if data is not None and not batch_key:
            raise ValueError("batch_key is required: the obs column of the batch (e.g. 'sample')")
        self.config = RunConfig(
            model=ModelConfig(**(model or {})),
            train=TrainConfig(**(train or {})),
            data=DataConfig(
                data="" if data is None else data_name(data),
                batch_key=batch_key or "",
                label_keys=_names(label_keys),
                covariate_keys=_names(covariate_keys),
                obs_filter=obs_filter,
                layer=layer,
                genes=None if genes is None else tuple(genes),
                gene_join=gene_join,
                drop_labels=tuple(spec for spec, _ in drops.values()),
                unlabeled_categories=_names(unlabeled_categories),
                allow_non_integer=allow_non_integer,
            ),
        )

    def __repr__(self) -> str:
        """What the model is: its data and keys, and once trained its size, classes and run dir."""
        d, vocab = self.config.data, self.vocab
        data = d.data if isinstance(d.data, str) else " + ".join(d.data)
        keys = ", ".join(f"{k} ({len(vocab.batch_categories[k])})" if vocab else k for k in d.batch_keys)
        labels = ", ".join(f"{k} ({len(vocab.label_classes[k])} classes)" if vocab else k for k in d.label_keys)
        lines = [f"AtlasVAE on {data or 'no data'}", f"  batch/covariate keys: {keys or '-'}",
                 f"  label keys: {labels or '- (no label prediction)'}"]  # fmt: skip
        if self.module is None:
            return "\n".join([*lines, "  not trained: fit(run_dir)"])
        metrics = RunDir(self.run_dir).metrics
        epochs = f", {len(self.history)} epochs" if metrics.exists() else ""
        lines.append(f"  {len(vocab.genes):,} genes, {self.module.z_mean.out_features}-d latent{epochs}")
        if self._pending is not None:
            lines.append(f"  a query set up for mapping onto {self._pending.reference}: train() runs the surgery")
        return "\n".join([*lines, f"  run dir: {self.run_dir}"])

    @classmethod
    def setup(cls, data, **kwargs) -> AtlasVAE:
        """Same as AtlasVAE(data, **kwargs) (the name the first API had)."""
        return cls(data, **kwargs)

    @classmethod
    def _from_run(cls, run, device=None) -> AtlasVAE:
        model = cls()
        model.config, model.vocab, model.module, model.run_dir = run.config, run.vocab, run.module, run.path
        return model.to_device(device)

    @property
    def device(self) -> torch.device:
        """Where the readers compute: the model's weights' device."""
        self._need_fit()
        return next(self.module.parameters()).device

    def to_device(self, device=None) -> AtlasVAE:
        """Move the model to `device` (e.g. "cuda:1", "cpu"); unset: this process's GPU where there is one (under
        `accelerate launch`, its own), else the CPU. fit() and load() place the model so."""
        self._need_fit()
        if device is None:
            from accelerate import PartialState

            device = PartialState(cpu=not torch.cuda.is_available()).device
        self.module.to(device)
        return self

    # -- training / persistence -------------------------------------------------------------------
    def fit(
        self, run_dir=None, *, max_epochs: int | None = None, resume: bool = False, overwrite: bool = False,
        **options,
    ) -> AtlasVAE:  # fmt: skip
        """Train (streaming, in this process or on every process of an `accelerate launch`) into
        run_dir, then hold the trained weights. A run_dir that holds an earlier run is refused: `resume=True`
        continues it, `overwrite=True` replaces it. Without run_dir: a new temporary folder, the same on every
        process, removed with this object or by the next fit() (under a launch: when every process has ended);
        `save()` keeps the model. Other keywords set training options for this fit (the fields of `train={...}`,
        e.g. batch_size=256, lr=1e-3)."""
        if not self.config.data.data and self.data is None:
            raise ValueError("no data to fit: AtlasVAE(adata_or_path, batch_key=...)")
        if resume and run_dir is None:
            raise ValueError("resume=True needs the run_dir of the run to resume")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"fit(): unknown training option(s) {', '.join(unknown)} (have: {', '.join(sorted(known))})"
            )
        cfg = self.config.override("train", max_epochs=max_epochs, **options)
        if self.data is not None:  # load(run_dir, adata=...): that data, not the one the run was trained on
            cfg = cfg.override("data", data=data_name(self.data))
        acc = make_accelerator(cfg)
        scratch = run_dir is None
        run_dir = scratch_run_dir(acc) if scratch else run_dir
        in_memory = self.data if is_anndata(self.data) else None
        try:
            if self._pending is not None:
                self._pending.run(self.data, run_dir, max_epochs=max_epochs, resume=resume, overwrite=overwrite,
                                  accelerator=acc, **options)  # fmt: skip
            else:
                train(cfg, run_dir, resume=resume, overwrite=overwrite, accelerator=acc, data=in_memory)
        except BaseException:
            if scratch and acc.is_main_process:  # a temporary folder nobody can name again
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        run = load_run(run_dir)
        self._remove_scratch()
        self._pending = self._reference = None
        self.config, self.vocab, self.module, self.run_dir = run.config, run.vocab, run.module, run.path
        self.to_device(acc.device)
        if scratch and acc.num_processes > 1:  # the others may still read it when this model goes
            remove = functools.partial(shutil.rmtree, run.path, ignore_errors=True)
            at_exit_after_peers(remove if acc.is_main_process else lambda: None)
        elif scratch:
            self._scratch = weakref.finalize(self, shutil.rmtree, str(run.path), ignore_errors=True)
        self._point_drops_at(RunDir(run.path))
        return self

    def _remove_scratch(self, keep: Path | None = None):
        """Remove the temporary run dir of an earlier fit() (self.run_dir while there is one), unless it is
        `keep`, which then stays."""
        if self._scratch is None:
            return
        if keep is not None and self.run_dir.resolve() == keep.resolve():
            self._scratch.detach()
        else:
            self._scratch()
        self._scratch = None

    def _point_drops_at(self, run: RunDir):
        """After a fit: the cells drop_labels gave as a table name the run's copy of them, not the temporary
        file written for the fit, which goes (a later fit reads the copy)."""
        if not self._drop_files:
            return
        self.config = drops_named_in(self.config, run)
        for written in self._drop_files.values():
            shutil.rmtree(written.parent, ignore_errors=True)
        self._drop_files = {}

    def train(
        self, max_epochs: int | None = None, run_dir=None, *, train_size: float | None = None,
        early_stopping: bool | None = None, plan_kwargs: dict | None = None, **kwargs,
    ) -> AtlasVAE:  # fmt: skip
        """scvi-tools' name for fit(), with its keywords: `train_size` (the share of cells trained on, the rest
        validate), `early_stopping=False` (train every epoch; early stopping is on by default here), `plan_kwargs`
        with lr, weight_decay, eps or n_epochs_kl_warmup; anything else as fit() takes it."""
        if train_size is not None:
            if not 0 < train_size <= 1:
                raise ValueError(f"train_size must be in (0, 1], not {train_size}")
            kwargs["val_fraction"] = 1.0 - train_size
        if early_stopping is False:
            kwargs["early_stopping_patience"] = 0
        for name, value in (plan_kwargs or {}).items():
            if name not in PLAN_KWARGS:
                raise TypeError(f"train(): plan_kwargs {name!r} is not one of {', '.join(PLAN_KWARGS)}")
            kwargs[PLAN_KWARGS[name]] = value
        return self.fit(run_dir, max_epochs=max_epochs, **kwargs)

    @classmethod
    def load_query_data(
        cls, adata, reference_model, *, unfrozen: bool = False, unfreeze_encoder: bool = False,
        unfreeze_decoder: bool = False, obs_filter: str | None = None, layer: str | None = None,
    ) -> AtlasVAE:  # fmt: skip
        """scvi-tools' and scArches' way into query mapping: a model that holds the reference's weights with `adata`
        (an AnnData or a store path) as its data. Until it is trained it maps the query zero-shot (the encoder does
        not see the batch); train() / fit(run_dir) then runs map_query()'s surgery into a run dir of its own (a
        temporary one when given none): the rows of the query's new batches train, and where the query has the
        reference's label keys, the rows of its new classes, while the reference's weights stay as they are.
        `reference_model`: a trained AtlasVAE or its run dir. `unfrozen=True` trains every weight as well
        (`unfreeze_encoder` / `unfreeze_decoder`: one part). `layer`: the query's matrix of raw counts where it
        is not the one the reference was trained on."""
        if isinstance(reference_model, AtlasVAE):
            reference_model._need_fit()
            model = cls._from_run(load_run(reference_model.run_dir))
            model._reference = reference_model  # a reference fit() without run dir keeps its folder meanwhile
        else:  # a run dir: the model loaded from it is the query's
            model = cls.load(reference_model, adata)  # (not the reference's saved AnnData)
        data = replace(model.config.data, data=data_name(adata), obs_filter=obs_filter, drop_labels=())
        model.config = replace(model.config, data=data).override("data", layer=layer)
        model.data = adata
        model._pending = PendingMapping(
            model.run_dir, unfrozen or unfreeze_encoder, unfrozen or unfreeze_decoder, obs_filter, layer
        )
        return model

    @staticmethod
    def prepare_query_anndata(adata, reference_model, return_reference_var_names: bool = False, inplace: bool = True):
        """scvi-tools' step before load_query_data, for its scripts. Nothing needs preparing here: every reader
        matches the model's genes as it reads (by feature id, else by name; in the model's order; a gene the query
        lacks reads as zeros, with a warning), so this checks that the query shares enough of them (half; fewer is
        refused) and leaves it as it is: returns None, or `adata` with inplace=False, or the model's genes with
        return_reference_var_names=True."""
        reference = reference_model if isinstance(reference_model, AtlasVAE) else AtlasVAE.load(reference_model)
        reference._need_fit()
        if return_reference_var_names:
            return pd.Index(reference.vocab.genes)
        reference.vocab.colmap(open_store(adata))
        return None if inplace else adata

    @classmethod
    def load(cls, run_dir, adata=None, *, device=None) -> AtlasVAE:
        """The model saved in run_dir; `adata` (an AnnData or a store path, scvi-tools' keyword) becomes the data
        the readers take when given none, as the data a model was set up with. `device`: where the readers
        compute (unset: this process's GPU where there is one, else the CPU; to_device() moves it later)."""
        model = cls._from_run(load_run(run_dir), device)
        saved = RunDir(run_dir).adata
        if adata is None and saved.exists():  # save(save_anndata=True)
            import anndata

            adata = anndata.read_h5ad(saved)
        model.data = adata
        return model

    @property
    def adata(self):
        """The AnnData the model was set up or loaded with (scvi-tools' attribute); None for a store path."""
        return self.data if is_anndata(self.data) else None

    @property
    def is_trained(self) -> bool:
        """Whether the model holds trained weights (scvi-tools' attribute)."""
        return self.module is not None and self._pending is None

    def save(self, run_dir, *, overwrite: bool = False, save_anndata: bool = False) -> Path:
        """Write the model to run_dir with what label transfer reads beside the weights (the reference, the
        run's copies of the cells trained without labels), so that `AtlasVAE.load(run_dir)` predicts as this
        model does, and the training's epoch rows (`history`); checkpoints stay behind. A run_dir that holds
        another run is refused unless `overwrite` (its checkpoints, reference and report go first). The
        temporary run dir of a fit() given none is then removed. Under `accelerate launch` the main process
        writes. `save_anndata=True` (scvi-tools' keyword) writes the AnnData the model was given beside it, as
        adata.h5ad, which `AtlasVAE.load(run_dir)` then takes as its data (a model given a path records it)."""
        from accelerate import PartialState

        self._need_fit()
        if save_anndata and not is_anndata(self.data):
            raise ValueError(
                f"save_anndata=True writes the AnnData the model was given, and it was given {self.config.data.data}, "
                "which the run records: AtlasVAE.load(run_dir) reads it from there"
            )
        target, state = RunDir(run_dir), PartialState(cpu=not torch.cuda.is_available())
        elsewhere = self.run_dir.resolve() != target.path.resolve()
        other = target.outputs() if elsewhere else []
        if other and not overwrite:
            raise ValueError(f"{target.path} holds another run ({', '.join(other)}): overwrite=True replaces it")
        state.wait_for_everyone()  # every process has looked before the main one writes
        if state.is_main_process:
            config = self.config
            if elsewhere:
                target.remove_outputs()
                config = copy_run_files(RunDir(self.run_dir), target, config)
            save_run(target.path, config, self.vocab, self.module)
            if save_anndata:
                write_h5ad_atomically(self.data, target.adata)
        state.wait_for_everyone()
        self.config = target.read_config()
        self._remove_scratch(keep=target.path)
        self.run_dir = target.path
        return self.run_dir

    @property
    def history(self) -> pd.DataFrame:
        """The training's epoch rows (metrics.csv), indexed by epoch: the loss and its terms per training cell
        (`loss`, `recon`, `kl`, `label`, …), the same on the validation cells (`val_…`), `kl_weight`, `lr`,
        `step`, `cells_per_s`. scvi-tools' `history` by columns of one table instead of a dict of tables."""
        self._need_fit()
        path = RunDir(self.run_dir).metrics
        if not path.exists():
            raise ValueError(f"{self.run_dir} has no metrics.csv: the model was saved without its training history")
        return pd.read_csv(path, index_col="epoch")

    # -- inference --------------------------------------------------------------------------------
    def _need_fit(self):
        if self.module is None:
            raise RuntimeError("model is not trained: call fit() or AtlasVAE.load(run_dir)")

    def _need_labels(self):
        self._need_fit()
        if not self.vocab.label_classes:
            raise ValueError(
                "the model was trained without label keys: it has no labels to predict (AtlasVAE(..., "
                "label_keys=['cell_type']); review_labels() checks a column's labels against this model's latent)"
            )

    def _source(self, data, obs_filter):
        """(what to open, its obs_filter): `data` as given, else the data the model was set up with."""
        if data is not None:
            return data, obs_filter
        d = self.config.data
        in_memory = in_memory_names(d.data)
        if self.data is None and in_memory:
            raise ValueError(
                f"the model was trained on an {' and an '.join(in_memory)}; pass that data (adata=..., or "
                "AtlasVAE.load(run_dir, adata=...) once)"
            )
        if self.data is None:
            check_recorded_data(d.data, self.run_dir)
        return (d.data if self.data is None else self.data), (obs_filter or d.obs_filter)

    def _cells(self, data, indices):
        """`data` (default: the AnnData the model was set up with) cut to the cells `indices` (positions or a boolean
        mask; scvi-tools' keyword), as a view of that AnnData (of a backed one: read into memory); unchanged without
        indices."""
        if indices is None:
            return data
        source = data if data is not None else self.data
        if not is_anndata(source):
            raise ValueError(
                "indices= selects cells of an AnnData (adata=..., or the one the model was set up with); for a store "
                "path select them with obs_filter=..."
            )
        return _subset(source, np.asarray(indices))

    def _batches(self, data, obs_filter, batch_size, layer=None, allow_non_integer=False, keys=()):
        """(store, ModelInputs in store order, with the model's codes of the batch/covariate `keys`) of `layer`
        (default: the one the model was trained on; "X" for X); genes the data lacks are zero-filled (with a
        warning), as in `embed`."""
        self._need_fit()
        d = self.config.data
        source, obs_filter = self._source(data, obs_filter)
        layer, allow_non_integer = d.read_as(layer, allow_non_integer)
        store = open_store(
            source, obs_filter=obs_filter, layer=layer, genes=self.vocab.genes, gene_join="outer",
            gene_names=self.vocab.gene_names,
        )  # fmt: skip
        colmap = self.vocab.colmap(store)
        stream = CellStream(
            store,
            batch_size=batch_size,
            seed=0,
            shuffle=False,
            genes=self.vocab.genes,
            colmap=colmap,
            obs_keys=keys,
            prefetch_next_epoch=False,
            validate="finite" if allow_non_integer else "counts",
        )
        to_input = ToModelInput(self.vocab, store, self.device, batch_keys=keys, panels=stream.gene_panels())
        return store, map(to_input, stream)

    def embed(self, data, out, **kwargs):
        """Embed `data` (a store, an .h5ad or an AnnData) to disk in chunks: see bigatlas.infer.embed.
        Needs a saved run dir (fit() or load())."""
        if self.run_dir is None:
            raise RuntimeError("embed() streams from a saved run dir: fit(run_dir) or AtlasVAE.load(run_dir)")
        return embed(self.run_dir, data, out, **kwargs)

    def map_query(self, query, out, *, max_epochs: int | None = None, **kwargs) -> AtlasVAE:
        """Architecture surgery on `query` (see bigatlas.query.map_query: epochs, obs_filter, layer,
        unfreeze_encoder, unfreeze_decoder, batch_size, lr, overwrite); returns the new model. `max_epochs` is
        `epochs` by fit()'s and scvi-tools' name."""
        if self.run_dir is None:
            raise RuntimeError("map_query() starts from a saved run dir: fit(run_dir) or AtlasVAE.load(run_dir)")
        if max_epochs is not None:
            if "epochs" in kwargs:
                raise TypeError("map_query(): give epochs or max_epochs, not both")
            kwargs["epochs"] = max_epochs
        known = set(inspect.signature(map_query).parameters) - {"run_dir", "query", "out"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            shown = ", ".join(sorted(known - {"accelerator"}))
            raise TypeError(f"map_query(): unknown option(s) {', '.join(unknown)} (have: {shown})")
        map_query(self.run_dir, query, out, **kwargs)
        return AtlasVAE.load(out)

    @torch.no_grad()
    def _latent(self, data, obs_filter, batch_size, layer=None, allow_non_integer=False, sample=False) -> tuple:
        """(store, posterior means, or one draw each with `sample`, as a numpy array in the store's cell order)."""
        self._need_fit()
        self.module.eval()
        store, batches = self._batches(data, obs_filter, batch_size, layer, allow_non_integer)
        return store, np.concatenate(
            [self.module.latent(inp.counts, sample, measured=inp.measured).cpu().numpy() for inp in batches]
        )

    @torch.no_grad()
    def _posterior(self, data, obs_filter, batch_size, layer=None, allow_non_integer=False) -> tuple:
        """(store, posterior means, posterior variances), numpy arrays in the store's cell order."""
        self._need_fit()
        self.module.eval()
        store, batches = self._batches(data, obs_filter, batch_size, layer, allow_non_integer)
        means, variances = [], []
        for inp in batches:
            q_mu, q_var = self.module.posterior(inp.counts, measured=inp.measured)
            means.append(q_mu.cpu().numpy())
            variances.append(q_var.cpu().numpy())
        return store, np.concatenate(means), np.concatenate(variances)

    def get_latent_representation(
        self, adata=None, indices=None, *, obs_filter=None, layer: str | None = None, allow_non_integer: bool = False,
        batch_size: int = 4096, give_mean: bool = True, return_dist: bool = False,
    ):  # fmt: skip
        """Posterior means (cells × n_latent) of `adata` (an AnnData or a store path; default: the data
        the model was set up with), in its cell order: `adata.obsm["X_bigatlas"] = ...`. `layer` names the
        matrix of raw counts where it is not the one the model was trained on ("X", "raw" or a layer);
        `allow_non_integer=True` reads values that are not whole (normalized or ambient-corrected; still finite and
        >= 0) where the model was trained on counts. Every reader of this class takes both. give_mean=False
        (scvi-tools' keyword): one draw from each cell's posterior instead of its mean (torch's random stream).
        indices (scvi-tools' keyword; also in predict and get_normalized_expression): only those cells of the
        AnnData (positions or a boolean mask), in that order. return_dist=True (scvi-tools' keyword): (means,
        variances) of the posteriors."""
        adata = self._cells(adata, indices)
        if return_dist:
            return self._posterior(adata, obs_filter, batch_size, layer, allow_non_integer)[1:]
        return self._latent(adata, obs_filter, batch_size, layer, allow_non_integer, not give_mean)[1]

    def review_labels(
        self, label_key: str, adata=None, *, obs_filter=None, layer: str | None = None, allow_non_integer: bool = False,
        min_agreement: float = MIN_AGREEMENT, batch_size: int = 4096,
    ) -> pd.DataFrame:  # fmt: skip
        """Label review (bigatlas.label_review) of the obs column `label_key` of `adata` (default: the data
        the model was set up with): per labelled cell, in the data's order and indexed by cell name, its label,
        the share of its 15 nearest other cells in the latent with that label (`agreement`), their most common
        label (`suggested`), `unresolved` (its class is not told apart by the latent), `flagged` (agreement <
        min_agreement in a resolved class) and `row` (Store.cell_ids: its row in the data, which finds it where
        cell names repeat). `AtlasVAE(..., drop_labels={label_key: table[table.flagged]})` trains without the
        flagged labels. Most telling with a model trained without `label_key`: one trained
        on it pulls each cell toward its given label, wrong ones too."""
        store, z = self._latent(adata, obs_filter, batch_size, layer, allow_non_integer)
        labels = defined_labels(*store.obs_codes(label_key), self.config.data.unlabeled_categories)
        keep = np.asarray(labels.codes) >= 0
        if keep.sum() < 2:
            raise ValueError(f"{int(keep.sum())} cells of {store.uri} have a {label_key!r} label; a review needs two")
        table = review(z[keep], pd.Categorical(labels[keep]).remove_unused_categories(), min_agreement=min_agreement)
        table.index = _cell_names(store)[keep]
        table.insert(0, "row", store.cell_ids(np.flatnonzero(keep)))  # drop_labels finds cells by it
        return table

    def get_latent(
        self, data=None, *, obs_filter=None, layer: str | None = None, allow_non_integer: bool = False,
        batch_size: int = 4096,
    ) -> np.ndarray:  # fmt: skip
        """The first API's name for get_latent_representation()."""
        return self.get_latent_representation(
            data, obs_filter=obs_filter, layer=layer, allow_non_integer=allow_non_integer, batch_size=batch_size
        )

    @torch.no_grad()
    def _transfer(self, data, obs_filter, batch_size, layer=None, allow_non_integer=False, predictor=None):
        """(store, {label key: transfer.KeyResult}, reference-UMAP coordinates or None)."""
        self._need_fit()
        self.module.eval()
        reference = read_reference(self.run_dir) if self.run_dir is not None else None
        transfer = LabelTransfer(self.module, self.vocab, reference, predictor=predictor)
        if transfer.index is not None:
            transfer.index.to(self.device)  # the kNN search where the latents are, as embed does
        store, batches = self._batches(data, obs_filter, batch_size, layer, allow_non_integer)
        z = torch.cat([self.module.latent(inp.counts, measured=inp.measured) for inp in batches])
        results, umap = transfer(z)
        return store, results, umap

    def predict_labels(
        self, data=None, *, obs_filter=None, layer: str | None = None, allow_non_integer: bool = False,
        batch_size: int = 4096, predictor=None,
    ) -> dict:  # fmt: skip
        """Per label key: {'label': predicted class names, 'probability': its probability,
        'probabilities': cells × classes, 'uncertainty'}, in the data's cell order."""
        self._need_labels()
        _, results, _ = self._transfer(data, obs_filter, batch_size, layer, allow_non_integer, predictor)
        out = {}
        for k, r in results.items():
            classes = np.asarray(self.vocab.label_classes[k])
            out[k] = {"label": classes[r.code], "probability": r.prob, "probabilities": r.probs,
                      "uncertainty": r.uncertainty}  # fmt: skip
        return out

    def predict(
        self, adata=None, indices=None, *, obs_filter=None, layer: str | None = None, allow_non_integer: bool = False,
        unknown_threshold: float = DEFAULT_UNKNOWN, batch_size: int = 4096, predictor: str | None = None,
        soft: bool = False,
    ):  # fmt: skip
        """A DataFrame indexed by cell name, in the data's cell order, with the columns `embed` writes per
        label key: `<key>_pred`, `_prob`, `_uncertainty`, `_unknown` (uncertainty above unknown_threshold)
        and `_pred_filtered` ('Unknown' there): `adata.obs = adata.obs.join(model.predict())`. Labels come
        from the run's reference (calibrated head + kNN vote) when it has one, else the calibrated head.
        soft=True (scvi-tools' keyword): each class's probability instead, cells × classes (a dict of them by
        label key for a model with several)."""
        self._need_labels()
        adata = self._cells(adata, indices)
        store, results, _ = self._transfer(adata, obs_filter, batch_size, layer, allow_non_integer, predictor)
        if soft:
            tables = {k: pd.DataFrame(r.probs, index=_cell_names(store), columns=list(self.vocab.label_classes[k]))
                      for k, r in results.items()}  # fmt: skip
            return next(iter(tables.values())) if len(tables) == 1 else tables
        columns = {}
        for k, r in results.items():
            classes = list(self.vocab.label_classes[k])
            columns[f"{k}_pred"] = pd.Categorical.from_codes(r.code, categories=classes)
            columns[f"{k}_prob"] = r.prob
            columns[f"{k}_uncertainty"] = r.uncertainty
            columns[f"{k}_unknown"] = r.uncertainty > unknown_threshold
            filtered = pd.Series(columns[f"{k}_pred"]).cat.add_categories([UNKNOWN]) if UNKNOWN not in classes else (
                pd.Series(columns[f"{k}_pred"]))  # fmt: skip
            filtered[columns[f"{k}_unknown"]] = UNKNOWN
            columns[f"{k}_pred_filtered"] = filtered.values
        return pd.DataFrame(columns, index=_cell_names(store))

    def get_reference_umap(
        self, adata=None, *, obs_filter=None, layer: str | None = None, allow_non_integer: bool = False,
        batch_size: int = 4096,
    ) -> np.ndarray:  # fmt: skip
        """Each cell placed on the reference's UMAP by its reference neighbours (cells × 2), as embed's
        `obsm/X_umap_ref`; needs a reference with a UMAP layout."""
        _, _, umap = self._transfer(adata, obs_filter, batch_size, layer, allow_non_integer)
        if umap is None:
            raise ValueError(f"{self.run_dir} has no reference UMAP: `bigatlas reference --run {self.run_dir}`")
        return umap

    @torch.no_grad()
    def _decoded(self, data, obs_filter, library_size, batch_size, layer=None, allow_non_integer=False,
                 transform_batch=None, gene_list=None, n_samples: int = 1):  # fmt: skip
        """(store, decoded means cells × genes, the genes' names): each cell decoded with its own batch, or with
        each batch of `transform_batch` in turn and averaged (its covariates its own either way); only the genes
        of `gene_list` kept, in its order, where given. Decoded from the posterior mean, or averaged over
        `n_samples` draws from the posterior where it is more than 1."""
        self._need_fit()
        self.module.eval()
        genes, columns = self._gene_columns(gene_list)
        keys = self.config.data.batch_keys
        as_batches = None if transform_batch is None else self._batch_codes(transform_batch)
        read = keys if as_batches is None else keys[1:]  # the data's own batches are not read (a query's new ones)
        store, batches = self._batches(data, obs_filter, batch_size, layer, allow_non_integer, keys=read)
        out = []
        for inp in batches:
            lib = inp.counts.library
            if library_size is not None:
                lib = torch.full_like(lib, float(library_size))
            q_mu, q_var = self.module.posterior(inp.counts, measured=inp.measured)
            draws = [q_mu] if n_samples == 1 else [draw(q_mu, q_var) for _ in range(n_samples)]
            codes = [inp.codes] if as_batches is None else [_with_batch(c, inp.codes, q_mu) for c in as_batches]
            mu = sum(self.module.decode(z, c, lib)[0] for z in draws for c in codes) / (len(draws) * len(codes))
            if library_size is None and inp.measured is not None:  # its observed total is its measured genes'
                mu = mu * (lib / (mu * inp.measured).sum(1).clamp_min(1e-30)).unsqueeze(1)
            out.append((mu if columns is None else mu[:, columns.to(mu.device)]).cpu().numpy())
        return store, np.concatenate(out), genes

    def _gene_columns(self, gene_list) -> tuple[list[str], torch.Tensor | None]:
        """(the genes' names, their columns among the model's, None for all of them) of `gene_list` (one gene or
        several, each the model's gene id or the feature name the training data gave it, e.g. a symbol where the
        model is on Census ids; None: every gene of the model)."""
        genes = self.vocab.genes
        if gene_list is None:
            return list(genes), None
        names = _names(gene_list)
        by_id = {g: i for i, g in enumerate(genes)}
        by_name = {}
        for i, n in enumerate(self.vocab.gene_names):
            by_name.setdefault(n, []).append(i)
        repeated = [n for n in names if n not in by_id and len(by_name.get(n, ())) > 1]
        if repeated:
            raise ValueError(f"gene_list: {', '.join(repeated[:8])} names several of the model's genes; give their ids")
        unknown = [n for n in names if n not in by_id and n not in by_name]
        if unknown or not names:
            shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            guess = closest(unknown[0], [*genes, *self.vocab.gene_names]) if unknown else []
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise ValueError(
                f"gene_list: {shown or 'no gene'} not among the model's {len(genes)} genes (ids or names){hint}"
            )
        return list(names), torch.tensor([by_id[n] if n in by_id else by_name[n][0] for n in names])

    def _batch_codes(self, names) -> list[int]:
        """The model's codes of the batch key's categories `names` (one name or several)."""
        key = self.config.data.batch_keys[0]
        known = self.vocab.batch_categories[key]
        names = _names(names)
        codes, unknown = _positions(names, known)
        if unknown or not names:
            shown = ", ".join(known[:8]) + (" …" if len(known) > 8 else "")
            raise ValueError(f"transform_batch {unknown or names!r}: not a {key!r} the model was trained on ({shown})")
        return codes

    def differential_expression(
        self, adata=None, groupby: str | None = None, group1=None, group2=None, idx1=None, idx2=None, *,
        delta: float = 0.25, batch_correction: bool = False, n_draws: int = 5000, n_pairs: int = 10_000,
        pseudocounts: float = 1e-5, fdr_target: float = 0.05, seed: int = 0, layer: str | None = None,
        allow_non_integer: bool = False, batch_size: int = 1024,
    ) -> pd.DataFrame:  # fmt: skip
        """Differential expression between groups of the cells of `adata` (an AnnData; default: the one the
        model was set up with) by the obs column `groupby`, in scvi-tools' "change" mode and with its columns
        (bigatlas.differential): every group against the rest (group1 unset), group1 against the rest, or group1
        against group2 (each a value or a list of them); or, as scvi-tools takes them, the cells `idx1` against
        `idx2` (or the rest), each a boolean mask or positions of the AnnData's cells. One row per model gene and
        comparison, the most probably changed first: proba_de (P(|log2 fold change| >= delta) of the decoded
        expression), bayes_factor, lfc_mean / _median / _std / _min / _max, scale1 / scale2 (mean expression at
        library size 1), is_de_fdr_<fdr_target>, the groups' raw counts (raw_mean, raw_normalized_mean per
        10,000, non_zeros_proportion of the cells decoded) and `gene_name` where the training data named its
        genes. Each group: up to `n_draws` decoded vectors, from all its cells or n_draws of them; `n_pairs` pairs
        of vectors make each gene's distribution of change. batch_correction=True decodes every cell under each of
        the two groups' batches (those the model knows) and averages, so that the groups are compared without
        their batches' effects."""
        from .differential import decode_draws, differential_table, groups_of_cells

        data = adata if adata is not None else self.data
        if not is_anndata(data):
            raise ValueError(
                "differential_expression compares cells of an AnnData (adata=..., or the one the model was set up "
                "with); open a store as one: anndata.read_h5ad(path, backed='r') or anndata.read_zarr(path)"
            )
        store = open_store(data)  # obs through the store, so that a lazy AnnData's reads as an in-memory one's
        if idx1 is not None:
            if groupby is not None or group1 is not None or group2 is not None:
                raise ValueError(
                    "differential_expression: give groupby (with group1 / group2) or idx1 / idx2, not both"
                )
            groups, group1, group2 = groups_of_cells(idx1, idx2, data.n_obs)
        elif idx2 is not None:
            raise ValueError("idx2 needs idx1: the cells compared with it")
        elif groupby is None:
            raise ValueError("differential_expression needs groupby (an obs column) or idx1")
        else:
            groups = _obs_values(store, groupby)
        self._need_fit()
        self.module.eval()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        keys = self.config.data.batch_keys
        batch = _obs_values(store, keys[0]) if batch_correction else None  # read once, for every comparison

        def decode_sides(sides):  # [(positions, draws per cell)] of the two groups -> [(decoded draws, RawStats)]
            as_batches = None
            if batch is not None:  # the batches of both groups' cells that the model knows, for every cell
                seen = {str(b) for cells, _ in sides for b in batch.iloc[cells].dropna().unique()}
                as_batches = self._batch_codes([b for b in self.vocab.batch_categories[keys[0]] if b in seen])

            def codes_of(inp, z):
                return [inp.codes] if as_batches is None else [_with_batch(c, inp.codes, z) for c in as_batches]

            read = keys if as_batches is None else keys[1:]
            out = []
            for cells, per_cell in sides:
                _, batches = self._batches(_subset(data, cells), None, batch_size, layer, allow_non_integer, keys=read)
                out.append(decode_draws(self.module, batches, per_cell, codes_of, len(self.vocab.genes), generator))
            return out

        return differential_table(
            groups, group1, group2, decode_sides, self.vocab.genes, self.vocab.gene_names, n_draws=n_draws,
            delta=delta, pseudocounts=pseudocounts, n_pairs=n_pairs, fdr_target=fdr_target, seed=seed,
        )  # fmt: skip

    def get_reconstructed_expression(
        self, data=None, *, obs_filter=None, layer: str | None = None, allow_non_integer: bool = False,
        library_size=None, batch_size: int = 1024, transform_batch=None, gene_list=None,
    ) -> np.ndarray:  # fmt: skip
        """Decoded NB/ZINB means (cells × genes) from the posterior mean, each cell decoded with its own
        batch; library_size=None uses the observed total counts, a number rescales every cell to it. Genes a
        cell's store did not measure (a query's, or a store's in an outer join) get the model's prediction: with
        the observed total, the means of its measured genes sum to it. transform_batch, gene_list: as in
        get_normalized_expression."""
        return self._decoded(data, obs_filter, library_size, batch_size, layer, allow_non_integer, transform_batch,
                             gene_list)[1]  # fmt: skip

    def get_normalized_expression(
        self, adata=None, indices=None, *, obs_filter=None, layer: str | None = None, allow_non_integer: bool = False,
        library_size: float = 1.0, batch_size: int = 1024, transform_batch=None, gene_list=None, n_samples: int = 1,
        return_numpy: bool = False,
    ):  # fmt: skip
        """Denoised expression (cells × the model's genes) at a common library size (1.0: fractions;
        1e4 for counts per 10k), as a DataFrame indexed by cell name in the data's cell order.
        transform_batch: a category of the batch key (or a list of them, averaged) every cell is decoded as, for
        expression without the batch effect (scvi-tools' name); the data's own batches are then not read, so a
        query from batches the model has not seen needs no map_query. Unset: each cell's own batch.
        gene_list: only these of the model's genes, in this order, by id or by the training data's feature name
        (a symbol, where the model is on Census ids); a million cells × 2,000 genes is 8 GB, a few markers are not.
        n_samples (scvi-tools' keyword): more than 1 averages the decoded expression of that many draws from each
        cell's posterior (1: decoded from its mean); return_numpy=True gives the array without the DataFrame."""
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be at least 1, not {n_samples}")
        store, mu, genes = self._decoded(self._cells(adata, indices), obs_filter, library_size, batch_size, layer,
                                         allow_non_integer, transform_batch, gene_list, int(n_samples))  # fmt: skip
        return mu if return_numpy else pd.DataFrame(mu, index=_cell_names(store), columns=pd.Index(genes))


def _obs_values(store, column: str) -> pd.Series:
    """A store's obs column as a categorical Series by position (missing values NaN); a missing column is named,
    with a guess."""
    codes, categories = store.obs_codes(column)
    return pd.Series(pd.Categorical.from_codes(codes, [str(c) for c in categories]))


def _subset(adata, cells):
    """The AnnData's `cells` (positions or a mask): a view, or for a backed AnnData (whose views do not stream)
    those cells read into memory."""
    view = adata[cells]
    return view.to_memory() if getattr(adata, "isbacked", False) else view


def _with_batch(code: int, covariates, z: torch.Tensor) -> torch.Tensor:
    """Codes of the cells of latent `z` with `code` as the batch key's (first column) beside their covariates'
    codes (int64, as ToModelInput makes them), on z's device."""
    column = torch.full((len(z), 1), code, dtype=torch.int64, device=z.device)
    return column if covariates is None else torch.cat([column, covariates], 1)


def _positions(names, known) -> tuple[list[int], list[str]]:
    """(the positions in `known` of `names` that are in it, in their order; the names that are not)."""
    at = {name: i for i, name in enumerate(known)}
    return [at[n] for n in names if n in at], [n for n in names if n not in at]


def _scvi_keyword(scvi_name: str, scvi_value, name: str, value, default):
    """The value of a keyword given by its scvi-tools name or by this class's, refused when given by both."""
    if scvi_value is None:
        return value
    if _names(value) != _names(default):
        raise TypeError(f"AtlasVAE(): give {name} or scvi-tools' {scvi_name}, not both")
    return scvi_value


def _names(value) -> tuple[str, ...]:
    """A keyword that takes one name or several, as a tuple of strings, as the model keeps its categories and
    genes (a batch column of integers or booleans: transform_batch=3 or True)."""
    one = isinstance(value, str) or not isinstance(value, Iterable)
    return (str(value),) if one else tuple(str(v) for v in value)


def _cell_names(store) -> pd.Index:
    return pd.Index(store.obs_names(np.arange(store.n_obs)).astype(str))
