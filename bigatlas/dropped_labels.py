"""`--drop-labels KEY=FILE`: train as if the cells FILE lists had no KEY label.

FILE is a CSV with a `cell` column of obs names and, optionally, a `row` column of cell ids (Store.cell_ids:
the store's own row, the same under any obs filter; matched by it where obs names repeat, as 10x barcodes
across samples do): what `bigatlas review` and `evaluate`'s label_review.csv list, or any list of cells whose
labels are in doubt. The cells stay in training (their counts, batch and other keys); only that key's label
is dropped, as if it were "unknown". At the start of a run the lists are copied into RUN_DIR/dropped_labels/
and from then on (a resumed run, the reference built after training, `bigatlas reference`) the copy is what
counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

NAMES_PER_READ = 1 << 20  # obs names read at once when matching a list against the store


def parse(spec: str) -> tuple[str, Path]:
    """("KEY", Path("FILE")) of one KEY=FILE (DataConfig has checked its form and key)."""
    key, _, file = str(spec).partition("=")
    return key, Path(file)


def read_cells(path) -> pd.DataFrame:
    """The cells a list names, once each: `cell` (obs names; the first column where none is named so) and,
    where the list has it, `row` (Store.cell_ids, which `bigatlas review` writes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--drop-labels: {path} does not exist")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    if table.shape[1] == 0:
        raise ValueError(f"--drop-labels: {path} has no columns; it needs a 'cell' column of obs names")
    out = pd.DataFrame({"cell": (table["cell"] if "cell" in table.columns else table.iloc[:, 0]).astype(str)})
    if "row" in table.columns:
        rows = pd.to_numeric(table["row"], errors="coerce")
        if rows.isna().any() or (rows < 0).any() or (rows != rows.round()).any():
            bad = table["row"][rows.isna() | (rows < 0) | (rows != rows.round())].iloc[0]
            raise ValueError(f"--drop-labels: {path} has a row {bad!r} that is not a cell id (a whole number >= 0)")
        out["row"] = rows.astype(np.int64)
    return out.drop_duplicates(ignore_index=True)


def listed_cells(store, listed: pd.DataFrame, source) -> np.ndarray:
    """Boolean mask over the store's cells, True at the cells `listed` (read_cells) names: by `row` where
    it has one (repeated obs names allowed; each row's name must still match), else by obs name, each of
    which must name exactly one cell. `source` names the list in errors."""
    if "row" in listed.columns:
        return _by_row(store, listed, source)
    names = listed.cell.to_numpy(str)
    mask = np.zeros(store.n_obs, bool)
    for lo in range(0, store.n_obs, NAMES_PER_READ):
        rows = np.arange(lo, min(lo + NAMES_PER_READ, store.n_obs))
        mask[rows] = np.isin(store.obs_names(rows).astype(str), names)
    hits = store.obs_names(np.flatnonzero(mask)).astype(str)
    _refuse_absent(np.setdiff1d(names, hits), store, source)
    if len(hits) != len(names):
        twice = pd.Index(hits)[pd.Index(hits).duplicated()].unique()
        raise ValueError(
            f"{source} names cells whose obs name is not unique in {store.uri} ({', '.join(twice[:5])}); "
            "give each cell's id in a 'row' column, as `bigatlas review` writes"
        )
    return mask


def _by_row(store, listed: pd.DataFrame, source) -> np.ndarray:
    ids = store.cell_ids(np.arange(store.n_obs))
    order = np.argsort(ids, kind="stable")
    rows = listed.row.to_numpy(np.int64)
    at = np.minimum(np.searchsorted(ids, rows, sorter=order), max(store.n_obs - 1, 0))
    found = (ids[order[at]] == rows) if store.n_obs else np.zeros(len(rows), bool)
    _refuse_absent(listed.cell.to_numpy(str)[~found], store, source)
    positions = order[at]
    sort = np.argsort(positions)
    names = store.obs_names(positions[sort]).astype(str)
    given = listed.cell.to_numpy(str)[sort]
    if (names != given).any():
        i = int(np.argmax(names != given))
        raise ValueError(
            f"{source}: row {rows[sort][i]} is cell {str(given[i])!r} there but {str(names[i])!r} in {store.uri} "
            "(a list made from other data, or stores in another order?)"
        )
    mask = np.zeros(store.n_obs, bool)
    mask[positions] = True
    return mask


def _refuse_absent(absent: np.ndarray, store, source) -> None:
    if len(absent):
        raise ValueError(
            f"{source} lists {len(absent)} cells that are not in {store.uri}: {', '.join(absent[:5])}"
            f"{' …' if len(absent) > 5 else ''} (a review of other data, or another obs filter?)"
        )


def apply(store, run, data_cfg, *, fresh: bool, main: bool) -> list[str]:
    """Drop the listed labels on `store` (Store.mask_obs); one line per key for the log. fresh: read the
    user's files (the main process copies them into the RunDir `run`); else the run dir's copies."""
    lines = []
    for spec in data_cfg.drop_labels:
        key, given = parse(spec)
        copy = run.dropped_labels_of(key)
        source = given if fresh or not copy.exists() else copy
        listed = read_cells(source)
        store.mask_obs(key, listed_cells(store, listed, source))
        if fresh and main:
            run.dropped_labels.mkdir(parents=True, exist_ok=True)
            tmp = copy.with_name(copy.name + ".tmp")
            listed.to_csv(tmp, index=False)
            os.replace(tmp, copy)
        lines.append(f"label key {key!r}: {len(listed):,} cells' labels dropped ({given})")
    return lines
