"""What the notebook API (api.AtlasVAE) keeps on disk beside a run: the temporary run dir of a fit() given none,
a saved model's copies of its run's files, the AnnData saved with it, and the cells given to drop_labels."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from loaders import is_local_path

from .config import RunConfig
from .dropped_labels import parse as parse_drop
from .reference import reference_dir
from .rundir import RunDir


def write_h5ad_atomically(adata, path: Path) -> None:
    """adata as an .h5ad at path, under a temporary name until it is whole (backed: copied from its file)."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    if getattr(adata, "isbacked", False) and not adata.is_view:
        shutil.copyfile(adata.filename, partial)
    else:
        adata.write_h5ad(partial)
    partial.replace(path)


def scratch_run_dir(acc) -> Path:
    """A new temporary folder for a fit() given no run dir: the main process makes it and tells the others.
    A temporary folder is one machine's, so a launch over several machines needs a run dir they share."""
    if acc.num_processes > int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)):
        raise ValueError(
            "fit() on several machines needs run_dir=: a folder every machine sees (a temporary folder is one "
            "machine's)"
        )
    made = [tempfile.mkdtemp(prefix="bigatlas-run-") if acc.is_main_process else None]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(made)
    return Path(made[0])


def copy_run_files(source: RunDir, target: RunDir, config: RunConfig) -> RunConfig:
    """Copy the run dir `source`'s reference, epoch rows and copies of the cells trained without labels into
    target, whose outputs (RunDir.outputs) are gone; returns `config` with those cells named by target's copies."""
    shutil.rmtree(target.dropped_labels, ignore_errors=True)  # not an output: a drop_labels may name it
    folders = [(reference_dir(source.path), reference_dir(target.path)), (source.dropped_labels, target.dropped_labels)]
    for src, dst in folders:
        if src.exists():
            shutil.copytree(src, dst)
    if source.metrics.exists():
        shutil.copyfile(source.metrics, target.metrics)
    return drops_named_in(config, target)


def drops_named_in(config: RunConfig, run: RunDir) -> RunConfig:
    """`config` with each drop_labels entry naming run's copy of its cells, where the run has one."""
    specs = []
    for spec in config.data.drop_labels:
        key = parse_drop(spec)[0]
        copy = run.dropped_labels_of(key)
        specs.append(f"{key}={copy}" if copy.exists() else spec)
    return config.override("data", drop_labels=tuple(specs))


def check_recorded_data(recorded, run_dir) -> None:
    """A local path the run recorded as its data that is not there (moved, or written relative to another
    working directory by a run from before paths were recorded absolute): say so, and how to pass the data."""
    paths = recorded if isinstance(recorded, list | tuple) else [recorded]
    missing = [p for p in paths if is_local_path(p) and not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"the data this model was trained on, {', '.join(map(repr, missing))} (recorded in {run_dir}/config.json), "
            f"is not there from {os.getcwd()}; pass the data: model.predict(data) / get_latent_representation(data), "
            "or AtlasVAE.load(run_dir, adata=...) once"
        )


def drop_spec(key: str, cells) -> tuple[str, Path | None]:
    """DataConfig.drop_labels' KEY=FILE for `cells`: a CSV's path, or the cells themselves (review_labels()'s
    flagged rows, a DataFrame with a `cell` column or cell names as index, or a list of names) written to a
    temporary one, whose path comes second (None for a path given)."""
    if isinstance(cells, str | Path):
        return f"{key}={cells}", None
    table = cells if isinstance(cells, pd.DataFrame) else pd.DataFrame(index=pd.Index(list(cells), dtype=str))
    listed = pd.DataFrame({"cell": (table["cell"] if "cell" in table.columns else table.index).astype(str)})
    if "row" in table.columns:
        listed["row"] = table["row"].to_numpy()
    path = Path(tempfile.mkdtemp(prefix="bigatlas-drop-")) / f"{key}.csv"  # until fit(): the run keeps a copy
    listed.to_csv(path, index=False)
    return f"{key}={path}", path
