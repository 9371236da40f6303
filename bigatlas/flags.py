"""Command-line flags from where their defaults live: train's from the config dataclasses (help text next
to each field), the other commands' from their library function's signature. Shared by the `bigatlas`
command (cli.py) and `python -m bigatlas.train`; imports nothing heavy (no torch), so `--help` is fast.
"""

from __future__ import annotations

import argparse
import inspect
import typing
from dataclasses import fields
from pathlib import Path

from loaders import data_name

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
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
    if not path:
        return None
    genes = tuple(g.strip() for g in Path(path).read_text().splitlines() if g.strip())
    table = next((g for g in genes if "," in g or "\t" in g), None)
    if table is not None:  # e.g. pandas' Series.to_csv: an index column and a header
        raise ValueError(
            f"gene list {path} holds a table (line {table!r}); write one feature id or name per line and nothing "
            "else, e.g. pandas: pd.Series(genes).to_csv(path, index=False, header=False)"
        )
    return genes


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
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in RUN_DIR (its weights, checkpoints, "
        "metrics and reference) instead of refusing the folder",
    )  # fmt: skip
    add_organism(p)
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
    cfg = cfg.override("data", data=data_name(cfg.data.data))  # recorded absolute: the run reopens it from anywhere
    for name, missing in (("data", not cfg.data.data), ("batch-key", not cfg.data.batch_key)):
        if missing:
            raise ValueError(f"--{name} is required (on the command line or in the --config file's [data])")
    return cfg.override("train", **config_values(a, TrainConfig)).override("model", **config_values(a, ModelConfig))


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


DATA_HELP = "AnnData-Zarr store, .h5ad file, SOMA experiment or census:<version>"


def add_organism(p) -> None:
    p.add_argument(
        "--organism", default=None, help="Census organism for census:<version> data, e.g. 'Mus musculus' "
        "(unset: homo_sapiens)"
    )  # fmt: skip


def add_data(p, help: str, required: bool = True) -> None:
    """--data (and --organism), the one way every command is given its data; a bare first argument is
    still taken for commands that used to take one (stream, prepare)."""
    p.add_argument(
        "--data", nargs="+", default=None, metavar="DATA",
        help=help + "; several (or a collection manifest) are one data set" + ("" if required else " (optional)"),
    )  # fmt: skip
    p.add_argument("data_positional", nargs="?", default=None, help=argparse.SUPPRESS)
    p.set_defaults(data_required=required)
    add_organism(p)


def add_unlabeled(p, default: str) -> None:
    """train's --unlabeled-category (DataConfig.unlabeled_categories: one flag, one help), for the
    commands whose other flags come from a signature."""
    meta = {f.name: f.metadata for f in fields(DataConfig)}["unlabeled_categories"]
    p.add_argument(
        meta["flag"], action=meta["action"], dest="unlabeled_categories", metavar=meta["metavar"],
        help=f"{meta['help']} (default: {default})",
    )  # fmt: skip


def unlabeled_given(a) -> tuple[str, ...] | None:
    """The --unlabeled-category values given, None for the library's default."""
    return tuple(a.unlabeled_categories) if a.unlabeled_categories else None


def census_spec(data, organism: str | None):
    """`data` (one uri or several) with --organism applied to census:<version> uris; one uri as a
    string, several as a tuple (a collection)."""
    from loaders.census import census_spec, is_census  # `loaders` imports torch: not for `bigatlas --help`

    uris = [data] if isinstance(data, str) else list(data)
    if len(uris) > 1:  # --organism names the Census member's organism; plain paths ignore it
        out = tuple(census_spec(u, organism) if is_census(u) else u for u in uris)
        return out
    return census_spec(uris[0], organism)


def data_arg(a) -> str | None:
    """The data given (--data or the bare argument), as a Census uri with --organism applied."""
    given = [tuple(d) if isinstance(d, list) else (d,) for d in (a.data, getattr(a, "data_positional", None)) if d]
    if len(set(given)) > 1:
        raise ValueError(f"two data given ({' '.join(given[0])} and {' '.join(given[1])}); pass them with --data")
    if not given and getattr(a, "data_required", False):
        raise ValueError("--data is required")
    return census_spec(given[0], a.organism) if given else None
