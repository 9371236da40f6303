"""What every store offers the stream: cell count, genes, obs codes and row reads by position.

Positions are 0..n_obs-1 over the cells that pass `obs_filter`, in storage order; subclasses map them
to their own row ids (Zarr row numbers, SOMA soma_joinids) and read CSR rows.
"""

from __future__ import annotations

import ctypes
import difflib
import re
import warnings

import numpy as np
import pandas as pd

from .csr import CSR
from .filter_eval import evaluate


def leak(obj) -> None:
    """Never free obj, not even at interpreter exit: what a forked child inherits of its parent's native
    readers (TileDB contexts and handles, zarrs pipelines, reader threads' executors) waits on thread pools
    the child does not have, so freeing it could hang the child; the child makes its own instead."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


class StoreError(ValueError):
    """A store, column, gene or filter problem, with the offending name in the message."""


def _names_list(names, limit=8) -> str:
    names = list(names)
    shown = ", ".join(map(str, names[:limit]))
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def closest(name: str, names) -> list[str]:
    """Those of `names` that look like `name` (a typo, another case, a prefix of it), closest first."""
    names = [str(n) for n in names]
    close = [n for n in names if n.lower() == name.lower()]
    close += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in close]
    return close + [n for n in names if name.lower() in n.lower() and n not in close]  # tissue: tissue_general


def columns_like(name: str, columns) -> str:
    """`columns` for a message about the missing column `name`: those that look like it first (a Census slice has
    dozens of obs columns, and the one meant may be past the first eight), with a guess where one is close."""
    close = closest(name, columns)
    listed = _names_list([*close, *(str(c) for c in columns if str(c) not in close)])
    return f"did you mean {close[0]!r}? have: {listed}" if close else f"have: {listed}"


def filter_columns(expr: str, columns) -> list[str]:
    """Obs columns an obs_filter expression refers to (identifiers outside string literals)."""
    without_strings = re.sub(r"'[^']*'|\"[^\"]*\"", " ", expr)
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", without_strings))
    keywords = {"and", "or", "not", "in", "True", "False", "None", "true", "false"}
    unknown = sorted(words - keywords - set(columns))
    if unknown:
        raise StoreError(
            f"obs_filter {expr!r} names obs column {unknown[0]!r}, not in store ({columns_like(unknown[0], columns)})"
        )
    return sorted(words & set(columns))


def eval_filter(expr: str, columns, read_column, uri: str, n_rows: int) -> np.ndarray:
    """Positions matching obs_filter `expr` (SOMA value_filter syntax and null semantics, filter_eval) on the
    columns it names (`read_column(name)` gives a column's values) — for stores without a query engine of their own."""
    values = {c: read_column(c) for c in filter_columns(expr, columns)}
    try:
        mask = evaluate(expr, values, n_rows)
    except Exception as e:
        raise StoreError(f"obs_filter {expr!r} failed on {uri}: {e}") from None
    return np.flatnonzero(mask).astype(np.int64)


def filtered_positions(obs_filter, columns, read_column, uri: str, n_rows: int) -> np.ndarray | None:
    """eval_filter for a store without a query engine: None without a filter (every row), else the
    matching rows; a filter matching no cell is an error naming it."""
    if not obs_filter:
        return None
    rows = eval_filter(obs_filter, columns, read_column, uri, n_rows)
    if len(rows) == 0:
        raise StoreError(f"obs_filter {obs_filter!r} matches 0 of {n_rows} cells in {uri}")
    return rows


def read_elem(node):
    """An AnnData element (obs column, var frame) of a Zarr or HDF5 group, read by anndata. A categorical column
    as anndata before 0.8 wrote it (integer codes whose `categories` attribute names the categories' array) is
    read as the Categorical it is; anndata reads such a column alone as its codes (a missing label as class -1)."""
    from anndata.io import read_elem as read

    if "categories" in node.attrs and not hasattr(node, "keys"):  # an array, not the group of today's encoding
        categories = _parent(node)[node.attrs["categories"]]
        codes = np.asarray(read(node))
        return pd.Categorical.from_codes(codes, read(categories), ordered=bool(categories.attrs.get("ordered", False)))
    return read(node)


def text(value) -> str:
    """An HDF5 attribute's string: a fixed-length one (as R's HDF5 writers make them) comes back as bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _parent(node):
    """The group that holds an HDF5 dataset or Zarr array."""
    if hasattr(node, "parent"):  # h5py
        return node.parent
    import zarr

    return zarr.open_group(node.store, path=node.path.rpartition("/")[0], mode="r")


def obs_index(obs):
    """The array of an AnnData obs group's names: the index itself, or the `values` of anndata's
    nullable-string encoding (a pandas-3 str index, as anndata writes it once opted in)."""
    node = obs[text(obs.attrs.get("_index", "_index"))]
    return node["values"] if node.attrs.get("encoding-type") == "nullable-string-array" else node


OTHER_IDS = "gene_ids"  # where scanpy's read_10x_h5 / read_10x_mtx keep the Ensembl ids (symbols in the index)
ENSEMBL_VERSION = re.compile(r"(ENS[A-Z]*\d+)\.\d+")


def stable_id(feature_id: str) -> str:
    """An Ensembl feature id without its version (ENSG00000141510.17 -> ENSG00000141510); other ids as they are
    (a GENCODE PAR copy such as ENSG00000182378.14_PAR_Y keeps its version: it is another gene)."""
    m = ENSEMBL_VERSION.fullmatch(str(feature_id))
    return m.group(1) if m else str(feature_id)


def _positions(names) -> dict[str, list[int]]:
    """Each name's column positions (usually one)."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        out.setdefault(str(name), []).append(i)
    return out


def code_dtype(n_categories: int):
    """The smallest signed integer type that holds codes 0..n_categories-1 and -1."""
    for dtype in (np.int8, np.int16, np.int32):
        if n_categories < np.iinfo(dtype).max:
            return dtype
    return np.int64


def compact_codes(codes: np.ndarray, n_categories: int) -> np.ndarray:
    """Codes in code_dtype: a column of 50M cells is 50-100 MB, not 400 (cast to int64 before
    arithmetic that can exceed it)."""
    return np.asarray(codes).astype(code_dtype(n_categories), copy=False)


def codes_of(values) -> tuple[np.ndarray, np.ndarray]:
    """Integer category codes (missing → -1; a compact integer type) and categories for any obs column."""
    if isinstance(values, pd.Categorical) or isinstance(getattr(values, "dtype", None), pd.CategoricalDtype):
        cat = pd.Categorical(values)
        return compact_codes(cat.codes, len(cat.categories)), np.asarray(cat.categories.astype(str))
    codes, cats = pd.factorize(pd.Series(values), sort=True)
    return compact_codes(codes, len(cats)), np.asarray(pd.Index(cats).astype(str))


def layer_path(layer: str | None) -> str:
    """Where an AnnData file keeps the matrix `layer=` names: X, raw/X or layers/<name>."""
    return {None: "X", "X": "X", "raw": "raw/X"}.get(layer, f"layers/{layer}")


def as_csr_recipe(path: str, reader: str) -> str:
    """The lines that rewrite the matrix at `path` (layer_path's) of an AnnData file as CSR, for a message."""
    m = "a.X" if path == "X" else f"a.layers[{path.split('/', 1)[-1]!r}]"
    fix = "r = a.raw.to_adata(); r.X = r.X.tocsr(); a.raw = r" if path == "raw/X" else f"{m} = {m}.tocsr()"
    return f"a = anndata.{reader}(PATH); {fix}; a.{reader.replace('read', 'write')}(NEW_PATH)"


def layer_names(root) -> list[str]:
    """The `layer=` names of the matrices in an AnnData file's root group (HDF5 or Zarr): X, raw, its layers."""
    return ["X"] + (["raw"] if "raw/X" in root else []) + list(root["layers"].keys() if "layers" in root else [])


class Store:
    """Base: subclasses set uri, n_obs, n_vars, var frame, and implement _read_obs / read."""

    uri: str
    n_obs: int
    n_vars: int
    block_rows: int  # preferred rows per shuffled block, from the storage layout
    blocks_per_request: int  # preferred blocks per pooled read
    segments: list[int] | None = None  # a collection's row count per store (blocks never straddle two)
    other_layers: tuple[str, ...] = ()  # the store's matrices besides the one read (layer= names), for hints

    def __init__(self, var: pd.DataFrame):
        self.var = var  # the var frame, one row per store column
        name_col = "feature_name" if "feature_name" in var.columns else None
        id_col = "feature_id" if "feature_id" in var.columns else None
        index = np.asarray(var.index.astype(str))
        self.var_names = np.asarray(var[name_col].astype(str)) if name_col else index
        self.var_ids = np.asarray(var[id_col].astype(str)) if id_col else index
        self._codes_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- obs --------------------------------------------------------------------------------------
    @property
    def obs_columns(self) -> list[str]:
        raise NotImplementedError

    def _read_obs(self, column: str) -> np.ndarray | pd.Categorical:
        """The column's values for the filtered cells, in position order."""
        raise NotImplementedError

    def _check_column(self, column: str) -> None:
        if column not in self.obs_columns:
            raise StoreError(
                f"obs column {column!r} not in store {self.uri} ({columns_like(column, self.obs_columns)})"
            )

    def obs_values(self, column: str):
        """The column's values (any dtype) for the filtered cells, in position order."""
        self._check_column(column)
        return self._read_obs(column)

    def obs_codes(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        self._check_column(column)
        if column not in self._codes_cache:
            self._codes_cache[column] = codes_of(self._read_obs(column))
        return self._codes_cache[column]

    def mask_obs(self, column: str, cells: np.ndarray) -> None:
        """From now on this handle gives `column` as missing (code -1) at the positions where the boolean
        `cells` (one per cell) is True: obs_codes, and the streams opened on it, see the masked column."""
        cells = np.asarray(cells, dtype=bool)
        if cells.shape != (self.n_obs,):
            raise ValueError(f"a mask of {cells.shape} for {self.n_obs} cells of {self.uri}")
        codes, cats = self.obs_codes(column)
        self._codes_cache[column] = (np.where(cells, np.array(-1, codes.dtype), codes), cats)

    # -- genes ------------------------------------------------------------------------------------
    def gene_map(
        self, genes, *, missing: str = "error", min_overlap: float = 0.5, what: str = "requested", names=None
    ) -> np.ndarray:
        """colmap[store column] = output column of each of `genes` (-1: a store column not asked for).

        The one rule that resolves genes everywhere (training, embedding, prepare): a gene is found by
        feature id, else by feature name, else in a 10x file's gene_ids column (scanpy puts the symbols in the
        index and the ids there), else by its other name (`names`), else by its Ensembl id without the version
        (stable_id); a name that appears more than once is ambiguous and refused (select it by id). Genes the
        store lacks are an error (missing="error") or left out of colmap, so that their output columns stay zero
        (missing="zero-fill", with a warning; refused below `min_overlap` of the genes; an ambiguous gene
        reads as missing there). `what` names the gene list in messages ("model's"). `names`: each gene's
        other name (a model's recorded feature names, "" where none), tried the same way where the gene is not
        found: a query whose var holds gene symbols only meets a model trained on feature ids."""
        if missing not in ("error", "zero-fill"):
            raise ValueError(f"missing must be 'error' or 'zero-fill', not {missing!r}")
        genes = [str(g) for g in genes]
        if len(set(genes)) != len(genes):
            dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
            raise StoreError(f"gene list repeats {_names_list(dup)}")
        by_id, by_name = _positions(self.var_ids), _positions(self.var_names)
        by_stable = by_other = None  # made where a gene is not found otherwise: ids without their Ensembl version
        colmap = np.full(self.n_vars, -1, dtype=np.int64)
        absent, ambiguous = [], []
        other = [str(v) for v in names] if names else [""] * len(genes)  # a run from before names: []
        for out, (g, alias) in enumerate(zip(genes, other, strict=True)):
            hits = by_id.get(g) or by_name.get(g) or []
            direct = bool(hits)
            if not hits and OTHER_IDS in self.var.columns:  # a 10x file read by scanpy: symbols, ids in gene_ids
                by_other = by_other or _positions(stable_id(v) for v in self.var[OTHER_IDS].astype(str))
                hits = by_other.get(stable_id(g)) or []
            found = (by_id.get(alias) or by_name.get(alias)) if not hits and alias and alias != g else None
            if found:
                g, hits, direct = alias, found, True
            if not hits:  # ENSG00000141510 meets ENSG00000141510.17 (a GENCODE-versioned file), either way round
                by_stable = by_stable or _positions(stable_id(v) for v in self.var_ids)
                hits = by_stable.get(stable_id(g)) or []
            problem = None
            if len(hits) > 1 and direct:
                kind = "feature id" if g in by_id else "gene name"
                hint = "; select it by feature id" if kind == "gene name" else ""
                problem = f"{kind} {g!r} appears {len(hits)} times in {self.uri}{hint}"
            elif len(hits) > 1:
                problem = (
                    f"feature id {g!r} matches {len(hits)} genes of {self.uri} ("
                    f"{_names_list(self.var_ids[i] for i in hits)}); select one with the gene list"
                )
            if problem and missing == "error":
                raise StoreError(problem)
            if problem:  # a query's (zero-fill): which of the copies is the gene is unknown, so it reads as missing
                ambiguous.append(g)
            elif not hits:
                absent.append(g)
            else:
                colmap[hits[0]] = out
        if ambiguous:
            warnings.warn(
                f"{len(ambiguous)} of the {what} genes appear more than once in {self.uri} "
                f"({_names_list(ambiguous)}); which copy is the gene is unknown, so they are read as missing. "
                "Give the data feature ids (a var column feature_id), or make its var names unique "
                "(AnnData: var_names_make_unique() keeps the first copy under the name)",
                stacklevel=2,
            )
            absent += ambiguous
        if absent and missing == "error":
            raise StoreError(f"{len(absent)} {what} genes not in store {self.uri}: {_names_list(absent)}")
        if absent:
            n, k = len(genes), len(absent)
            overlap = 1 - k / max(n, 1)
            if overlap < min_overlap:
                raise StoreError(
                    f"{self.uri} shares {n - k} of the {what} {n} genes ({overlap:.0%}); below the minimum overlap "
                    f"{min_overlap:.0%}. Genes are matched by feature id (var column feature_id, else the var index), "
                    f"then by name (var column feature_name, else the index), then by a {OTHER_IDS} column, each "
                    f"Ensembl id with or without its version: the {what} are "
                    f"{_names_list(genes[:3])}, {self.uri} has {_names_list(self.var_ids[:3])}"
                )
            warnings.warn(
                f"{k} of the {what} {n} genes ({k / n:.1%}) are missing from {self.uri}; they are zero-filled",
                stacklevel=2,
            )
        return colmap

    def gene_panels(self) -> np.ndarray | None:
        """(panels, n_vars) bool: the columns each gene panel of the store measured, where its cells were not
        all measured on the same genes (a collection of stores with different genes, outer join: a store's
        missing genes read as zeros that were never counted); None when every cell has every column."""
        return None

    def panel_codes(self, rows: np.ndarray) -> np.ndarray:
        """Each position's row of gene_panels()."""
        return np.zeros(len(rows), dtype=np.int64)

    def restrict_columns(self, columns: np.ndarray) -> None:
        """Hint that only these var columns are needed: stores that can skip the others on read do
        (SOMA); reads may then omit every other column. Default: read all."""

    # -- rows -------------------------------------------------------------------------------------
    def read(self, rows: np.ndarray) -> CSR:
        """CSR of the cells at ascending positions `rows`, in that order."""
        raise NotImplementedError

    def store_rows(self, rows: np.ndarray) -> np.ndarray:
        """The store's own row ids (Zarr row numbers, SOMA soma_joinids) of positions `rows`."""
        raise NotImplementedError

    def cell_ids(self, rows: np.ndarray) -> np.ndarray:
        """One int64 id per cell of positions `rows`, the same under any obs filter: its store row id (a
        collection adds its store's index above bit 40)."""
        return np.asarray(self.store_rows(np.asarray(rows, dtype=np.int64)), dtype=np.int64)

    def obs_names(self, rows: np.ndarray) -> np.ndarray:
        """Cell names (obs index) of positions `rows`."""
        raise NotImplementedError

    def locate(self, position: int) -> tuple[str, int, tuple[str, ...]]:
        """(the store holding `position`, its position there, that store's other matrices), for messages."""
        return str(self.uri), int(position), self.other_layers

    def reader(self) -> Store:
        """A handle for one reader thread (stores with thread-affine handles return a fresh one)."""
        return self


def measured_panels(store: Store, colmap: np.ndarray | None, n_out: int) -> np.ndarray | None:
    """(panels, n_out) bool: the output columns each gene panel of `store` measured, through colmap (store
    column → output column, -1 dropped; None: the store's own columns), where an output column no store
    column maps to was measured by no panel. None when every cell measured every output column."""
    panels = store.gene_panels()
    if panels is None:
        panels = np.ones((1, store.n_vars), dtype=bool)
    if colmap is not None:
        out = np.zeros((len(panels), n_out), dtype=bool)
        kept = np.flatnonzero(colmap >= 0)
        out[:, colmap[kept]] = panels[:, kept]
        panels = out
    return None if panels.all() else panels


class GroupObsStore(Store):
    """A store whose obs is an AnnData obs group (Zarr or HDF5): subclasses set _obs (the group),
    _obs_cols (its columns) and _rows (the store rows the obs filter keeps, None for all)."""

    _obs: object
    _obs_cols: list[str]
    _rows: np.ndarray | None

    @property
    def obs_columns(self) -> list[str]:
        return list(self._obs_cols)

    def _read_obs(self, column):
        values = read_elem(self._obs[column])
        return values if self._rows is None else values[self._rows]

    def store_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self._rows is None else self._rows[rows]
