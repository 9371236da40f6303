"""`bigatlas` console entry point: synth | stream | prepare | train | embed | map-query | evaluate.

Flags come from where their defaults live: `train`'s from the config dataclasses (help text next to
each field), the other commands' from their library function's signature. Only the chosen command's
parser is built, so its modules (torch, scanpy, …) are imported only when it runs.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
import warnings
from dataclasses import fields

from .config import UNLABELED, DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import LaunchError


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except unset ones (None, False, [], SUPPRESS) and those the help text states."""

    def _get_help_string(self, action):
        d = action.default
        unset = d is None or d is False or d == [] or d == () or d == argparse.SUPPRESS
        unset |= isinstance(action, argparse._StoreFalseAction)  # a --no-x flag's default says nothing
        if unset or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def read_gene_list(path) -> tuple[str, ...] | None:
    """A --genes file: one feature id (or name) per line, blank lines ignored; None without a file."""
    return tuple(g.strip() for g in open(path) if g.strip()) if path else None


def _flag_kwargs(hint, default) -> dict:
    """argparse type/nargs/action for a field or parameter of type `hint` (None in a union ignored)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) else []
    if args and typing.get_origin(hint) is not tuple:  # X | None
        hint = args[0]
        args = list(typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return {"nargs": "+" if args[0] is int else "*", "type": args[0]}
    if hint is bool or isinstance(default, bool):
        return {"action": argparse.BooleanOptionalAction if default else "store_true"}
    return {"type": hint if hint in (int, float, str) else type(default)}


# -- train: flags generated from the config dataclasses ---------------------------------------------
def add_config_flags(p, cls, title: str) -> None:
    """One flag per field of config dataclass `cls`; unset flags keep the config file's value."""
    g = p.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        shown = None if meta.pop("required", False) else f.default
        if meta.pop("from_file", False) or "action" in meta:
            kwargs = {"type": str}
        else:
            kwargs = _flag_kwargs(hints[f.name], f.default)
        if kwargs.get("action") == "store_true":
            kwargs["action"] = argparse.BooleanOptionalAction
        help_ = meta.pop("help")
        if shown not in (None, "", ()):
            help_ += f" (default: {shown})"
        if "action" not in kwargs and "choices" not in meta and "metavar" not in meta:
            meta.setdefault("metavar", f.name.upper())
        g.add_argument(flag, dest=f"{cls.__name__}.{f.name}", default=None, help=help_, **kwargs, **meta)


def config_values(a, cls) -> dict:
    """The flags of `cls` that were given, by field name."""
    values = {}
    for f in fields(cls):
        v = getattr(a, f"{cls.__name__}.{f.name}")
        if v is not None:
            values[f.name] = read_gene_list(v) if f.metadata.get("from_file") else v
    return values


def add_train_arguments(p) -> None:
    """Flags of `bigatlas train` and scripts/train.py."""
    p.add_argument("--out", required=True, help="RUN_DIR to write")
    p.add_argument("--config", default=None, help="TOML/JSON with [model], [train], [data] sections")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/latest")
    _add_organism(p)
    add_config_flags(p, DataConfig, "data")
    add_config_flags(p, TrainConfig, "training")
    add_config_flags(p, ModelConfig, "model")
    p.add_argument("--trace-cells", action="store_true", help=argparse.SUPPRESS)


def config_from_args(a):
    cfg = RunConfig.from_file(a.config) if a.config else RunConfig()
    data = config_values(a, DataConfig)
    if "data" in data:
        data["data"] = census_spec(data["data"], a.organism)
    cfg = cfg.override("data", **data)
    for name, missing in (("data", not cfg.data.data), ("batch-key", not cfg.data.batch_key)):
        if missing:
            raise ValueError(f"--{name} is required (on the command line or in the --config file's [data])")
    return cfg.override("train", **config_values(a, TrainConfig)).override("model", **config_values(a, ModelConfig))


def _train(p):
    add_train_arguments(p)

    def run(a):
        from .train import train

        train(config_from_args(a), a.out, resume=a.resume, trace_cells=a.trace_cells)

    return run


# -- the other commands: flags from the library function's signature --------------------------------
def add_signature_flags(p, fn, helps: dict) -> None:
    """`--name` per keyword parameter of `fn` named in `helps` (name → help, or (help, type) where the
    default is None); default, type, list-ness and bool-ness come from the signature's default."""
    params = inspect.signature(fn).parameters
    for name, spec in helps.items():
        help_, type_ = spec if isinstance(spec, tuple) else (spec, None)
        default = params[name].default
        if type_ is not None:
            kwargs = {"type": type_}
        elif isinstance(default, (tuple, list)):
            kwargs, default = {"nargs": "*", "type": str}, list(default)
        else:
            kwargs = _flag_kwargs(type(default), default)
        p.add_argument("--" + name.replace("_", "-"), default=default, help=help_, **kwargs)


def signature_values(a, helps: dict) -> dict:
    return {name: getattr(a, name) for name in helps}


def _add_organism(p) -> None:
    p.add_argument(
        "--organism", default=None, help="Census organism for census:<version> data, e.g. 'Mus musculus' "
        "(unset: homo_sapiens)"
    )  # fmt: skip


def _add_unlabeled(p, default: str) -> None:
    """train's --unlabeled-category (DataConfig.unlabeled_categories: one flag, one help), for the
    commands whose other flags come from a signature."""
    meta = {f.name: f.metadata for f in fields(DataConfig)}["unlabeled_categories"]
    p.add_argument(
        meta["flag"], action=meta["action"], dest="unlabeled_categories", metavar=meta["metavar"],
        help=f"{meta['help']} (default: {default})",
    )  # fmt: skip


def _unlabeled(a) -> tuple[str, ...] | None:
    """The --unlabeled-category values given, None for the library's default."""
    return tuple(a.unlabeled_categories) if a.unlabeled_categories else None


def census_spec(data: str, organism: str | None) -> str:
    from loaders.census import census_spec  # `loaders` imports torch: not for `bigatlas --help`

    return census_spec(data, organism)


def _data(a) -> str | None:
    return census_spec(a.data, a.organism) if a.data else None


def _synth(p):
    from .synth import SynthSpec, synth

    p.add_argument("out", help="output path (.zarr directory or SOMA experiment directory)")
    p.add_argument("--cells", type=int, required=True, help="number of cells")
    p.add_argument("--genes", type=int, default=2000, help="number of genes")
    p.add_argument("--format", choices=["zarr", "soma"], default="zarr", help="store format")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--order", choices=["study", "cell_type", "random"], default=SynthSpec.order,
        help="storage order of cells (cell_type = sorted by type, the hard case for shuffling)",
    )  # fmt: skip
    p.add_argument("--studies", type=int, default=SynthSpec.n_studies, help="number of studies (dataset_id)")
    p.add_argument("--donors-per-study", type=int, default=SynthSpec.donors_per_study, help="donors per study")
    p.add_argument("--mean-library", type=float, default=SynthSpec.mean_library, help="mean counts per cell")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    def run(a):
        import time

        t = time.perf_counter()
        spec = synth(
            a.out, a.cells, a.genes, a.format, seed=a.seed, overwrite=a.overwrite, order=a.order,
            n_studies=a.studies, donors_per_study=a.donors_per_study, mean_library=a.mean_library,
        )  # fmt: skip
        print(
            f"wrote {spec.n_cells} cells x {spec.n_genes} genes ({a.format}) to {a.out} "
            f"in {time.perf_counter() - t:.1f}s"
        )

    return run


def _stream(p):
    from .stream_report import stream_report

    p.add_argument("data", help="AnnData-Zarr store, SOMA experiment or census:<version>")
    _add_organism(p)
    helps = {
        "batch_size": "cells per minibatch",
        "epochs": "epochs to stream",
        "seed": "shuffle seed",
        "workers": "reader threads",
        "obs_filter": ("SOMA value_filter, e.g. \"tissue_general == 'blood'\"", str),
        "obs_keys": "obs columns delivered as codes",
    }
    add_signature_flags(p, stream_report, helps)
    return lambda a: stream_report(_data(a), **signature_values(a, helps))


def _embed(p):
    from .infer import embed

    p.add_argument("--run", required=True, help="trained RUN_DIR")
    p.add_argument("--data", required=True, help="query store (AnnData-Zarr, SOMA or census:<version>)")
    _add_organism(p)
    p.add_argument("--out", required=True, help="output AnnData-Zarr store (obsm/X_bigatlas, obs/<key>_pred …)")
    helps = {
        "chunk_size": "cells per output chunk (resume unit)",
        "batch_size": "cells per forward pass",
        "obs_filter": ("SOMA value_filter on the query cells", str),
        "full_probabilities": "also write obsm/<key>_probabilities",
        "unknown_threshold": "flag <key>_unknown when the top probability is below this",
        "min_gene_overlap": "refuse a query sharing fewer of the model's genes than this fraction",
        "overwrite": "recompute a complete or different output",
        "allow_non_integer": "accept non-integer values",
    }
    add_signature_flags(p, embed, helps)
    return lambda a: embed(a.run, _data(a), a.out, **signature_values(a, helps))


def _map_query(p):
    from .query import map_query

    p.add_argument("--run", required=True, help="reference RUN_DIR")
    p.add_argument("--data", required=True, help="query store")
    _add_organism(p)
    p.add_argument("--out", required=True, help="new RUN_DIR")
    helps = {
        "epochs": "fine-tuning epochs",
        "obs_filter": ("SOMA value_filter on the query cells", str),
        "unfreeze_encoder": "also train the encoder",
        "unfreeze_decoder": "also train the decoder",
        "batch_size": ("cells per minibatch (unset: the reference run's)", int),
        "lr": ("learning rate (unset: the reference run's)", float),
    }
    add_signature_flags(p, map_query, helps)
    return lambda a: map_query(a.run, _data(a), a.out, **signature_values(a, helps))


def _prepare(p):
    from .prepare import prepare

    p.add_argument("data", help=".h5ad file, AnnData-Zarr store, SOMA experiment or census:<version>")
    p.add_argument("--out", required=True, help="folder for stats.json, genes.csv, hvg.txt, library_size.png")
    _add_organism(p)
    p.add_argument("--genes", default=None, help="file of feature ids: only these genes, in this order")
    p.add_argument(
        "--convert", default=None, metavar="OUT.zarr", help="also write the (filtered) cells as a chunked "
        "AnnData-Zarr v3 store; stats are then computed from it",
    )  # fmt: skip
    helps = {
        "obs_filter": ("SOMA value_filter selecting cells", str),
        "layer": ("layer of raw counts (.h5ad: a layers/ name or 'raw')", str),
        "batch_key": ("obs column of batches for batch-aware HVG selection", str),
        "label_keys": "obs columns to count classes of",
        "n_top_genes": "highly variable genes to select (0: skip)",
        "span": "loess span of the seurat_v3 mean-variance fit",
        "shard_elems": ("shard the converted X arrays (elements per shard, a multiple of 32768)", int),
        "block_cells": "cells per dask task",
        "workers": "dask threads",
        "overwrite": "replace an existing --convert output",
    }
    _add_unlabeled(p, ", ".join(UNLABELED))
    add_signature_flags(p, prepare, helps)

    def run(a):
        prepare(
            _data(a), a.out, genes=read_gene_list(a.genes), convert_to=a.convert,
            unlabeled_categories=_unlabeled(a), **signature_values(a, helps)
        )  # fmt: skip

    return run


def _evaluate(p):
    from .evaluate import evaluate

    p.add_argument("--emb", required=True, help="output of `bigatlas embed`")
    p.add_argument("--label-key", required=True, help="obs column of cell-type labels")
    p.add_argument("--batch-key", required=True, help="obs column of batches")
    p.add_argument("--data", default=None, help="store the embedding was made from (default: the one it records)")
    _add_organism(p)
    p.add_argument("--truth-keys", nargs="*", default=[], help="further obs columns to score predictions against")
    p.add_argument("--cells", type=int, default=50_000, dest="n_cells", help="stratified subsample for scIB metrics")
    p.add_argument("--no-baseline", action="store_false", dest="baseline", help="skip the PCA baseline (no counts)")
    helps = {
        "obs_filter": ("filter the embedding was made with (default: recorded)", str),
        "run": ("RUN_DIR of the model (default: recorded); the report goes there", str),
        "out": ("report folder (default RUN_DIR/report)", str),
        "umap_cells": "cells drawn in the UMAP",
        "seed": "subsample / UMAP seed",
    }
    add_signature_flags(p, evaluate, helps)
    _add_unlabeled(p, "the run's")

    def run(a):
        evaluate(
            a.emb, label_key=a.label_key, batch_key=a.batch_key, data=_data(a), truth_keys=a.truth_keys,
            n_cells=a.n_cells, baseline=a.baseline, unlabeled_categories=_unlabeled(a),
            **signature_values(a, helps),
        )  # fmt: skip

    return run


COMMANDS = {  # name: (help, builder(parser) -> run(args))
    "synth": ("write a synthetic atlas (ZINB counts, batch effects, label hierarchy)", _synth),
    "stream": ("stream a store in shuffled minibatches and report throughput", _stream),
    "train": ("train scAtlasVAE on a store (scripts/train.py under accelerate launch for several processes)", _train),
    "embed": (
        "write latents and label predictions of a store to disk, in chunks "
        "(scripts/embed.py under accelerate launch for several processes)",
        _embed,
    ),
    "map-query": (
        "scArches-style surgery: extend batch embeddings with a query's new categories and fine-tune them "
        "(everything else frozen by default)",
        _map_query,
    ),
    "prepare": (
        "out-of-core passes (dask): gene statistics, batch-aware seurat_v3 HVGs (hvg.txt for --genes), "
        "class counts; .h5ad / SOMA / Census → chunked Zarr",
        _prepare,
    ),
    "evaluate": (
        "scIB metrics of an embedding (vs a PCA baseline), label-prediction accuracy / macro-F1, UMAP and "
        "confusion plots, report.html",
        _evaluate,
    ),
}


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*autosharding.*")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="bigatlas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, build) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=_Help)
        if argv and argv[0] == name:
            p.set_defaults(func=build(p))
    a = parser.parse_args(argv)
    try:
        a.func(a)
    except USER_ERRORS as e:  # what the user can fix: one line, no traceback (bugs keep theirs)
        print(f"bigatlas {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bigatlas {a.command}: interrupted", file=sys.stderr)
        return 130
    return 0


# StoreError and EmbeddingError are ValueErrors; OSError covers a full disk, an I/O error or a missing
# permission, each naming its path
USER_ERRORS = (ValueError, OSError, FloatingPointError, LaunchError)


if __name__ == "__main__":
    sys.exit(main())
