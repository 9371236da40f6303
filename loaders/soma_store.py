"""TileDB-SOMA experiment reader (the CELLxGENE Census format).

A read request's rows are fetched as ONE point-list read of their soma_joinids in row-major order;
the result arrives sorted by row, so indptr is built by counting rows, never by sorting COO.
Handles are opened lazily per reader thread (TileDB handles are not shared across threads); they share
the process's one TileDB context per configuration, which a forked child never uses or frees.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from .csr import CSR, compact, concat, empty, take_rows
from .filter_eval import FilterSyntaxError, evaluate, without_not
from .store import Store, StoreError, filter_columns, leak
from .tiledb_gate import alone, together


def _soma():
    import tiledbsoma

    return tiledbsoma


READ_CELLS = 8192
SUBREAD_THREADS = 2
# One TileDB context per process and configuration, shared by every store, handle and reader thread (a
# context is thread-safe; a handle is not). A fresh context per handle and per open made and freed a
# context with its thread pools for every store opened and every reader thread, and under that churn the
# heap was corrupted: `python -m bench.soma_stress` (6 stores opened again and again, each read from its
# own thread) aborted in glibc's malloc checks in 6 of 6 runs of 4 minutes that way, 0 of 6 shared.
_CONTEXTS: dict[tuple, object] = {}


def soma_context(tiledb_config: dict | None = None):
    """The process's TileDB context for this configuration, for every SOMA experiment bigatlas opens
    (stores, the embedding's output, written atlases): none is made and freed per open."""
    config = tiledb_config or {}
    key = tuple(sorted((str(k), str(v)) for k, v in config.items()))
    with alone():
        ctx = _CONTEXTS.get(key)
        if ctx is None:
            ctx = _CONTEXTS[key] = _soma().SOMATileDBContext(tiledb_config=dict(config))
        return ctx


def open_experiment(uri, mode: str = "r", tiledb_config: dict | None = None):
    """A SOMA experiment opened on the process's shared context, one open at a time."""
    with alone():
        return _soma().Experiment.open(str(uri), mode, context=soma_context(tiledb_config))


def create_experiment(uri):
    """A new SOMA experiment (bigatlas's outputs and written stores) on the process's shared context, made
    one at a time like every open."""
    with alone():
        return _soma().Experiment.create(str(uri), context=soma_context())


def _after_fork_in_child() -> None:
    """A fork copies the parent's contexts, whose thread pools the child does not have: freeing one would wait
    on those threads forever, so they are leaked (never freed) rather than dropped."""
    for ctx in _CONTEXTS.values():
        leak(ctx)
    _CONTEXTS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


OBS_ID = "obs_id"  # where tiledbsoma.io.from_anndata keeps an AnnData's cell names


class SomaStore(Store):
    def __init__(
        self,
        uri: str,
        *,
        obs_filter: str | None = None,
        layer: str | None = None,
        measurement: str | None = None,
        tiledb_config: dict | None = None,
    ):
        self.uri = str(uri)
        self.layer = layer or "raw"
        asked = measurement is not None
        self.measurement = measurement = measurement or "RNA"
        self._tiledb_config = dict(tiledb_config or {})  # e.g. anonymous S3 access for the Census
        self._var_coords = None  # all genes; restrict_columns narrows reads to the model's genes
        with alone():  # opened and read while no other thread's TileDB read runs (tiledb_gate)
            try:
                exp = open_experiment(self.uri, tiledb_config=self._tiledb_config)
            except Exception as e:
                raise StoreError(f"{self.uri} is not a SOMA experiment ({type(e).__name__}: {e})") from None
            with exp:
                names = list(exp.ms.keys())
                if not asked and measurement not in names and len(names) == 1:  # not RNA: the only one there is
                    self.measurement = measurement = names[0]
                if measurement not in names:
                    raise StoreError(f"{self.uri} has no measurement {measurement!r} (have: {', '.join(names)})")
                ms = exp.ms[measurement]
                layers = list(ms.X.keys()) if "X" in ms else []
                if layer is None and "raw" not in layers and len(layers) == 1:  # e.g. tiledbsoma.io's "data"
                    self.layer = layers[0]
                if self.layer not in layers:
                    have = ", ".join(layers) or "none"
                    raise StoreError(
                        f"{self.uri}: measurement {measurement!r} has no X layer {self.layer!r} (have: {have})"
                    )
                self.other_layers = tuple(name for name in ms.X.keys() if name != self.layer)
                x = ms.X[self.layer]
                if x.soma_type != "SOMASparseNDArray":
                    raise StoreError(f"{self.uri}: X layer {self.layer!r} is {x.soma_type}, not sparse")
                n_rows, self.n_vars = (int(s) for s in x.shape)
                var = ms.var.read().concat().to_pandas()
                self._obs_cols = [f.name for f in exp.obs.schema]
                value_filter = None
                if obs_filter:
                    used = filter_columns(obs_filter, self._obs_cols)
                    try:  # the syntax the other formats take, with their message: checked on no rows
                        evaluate(obs_filter, {c: pd.Series([], dtype=object) for c in used}, 0)
                    except FilterSyntaxError as e:
                        raise StoreError(f"obs_filter {obs_filter!r} failed on {self.uri}: {e}") from None
                    except Exception:  # a question of values, for TileDB to answer
                        pass
                    value_filter = without_not(obs_filter)  # TileDB crashed negating more than one comparison
                try:
                    ids = exp.obs.read(column_names=["soma_joinid"], value_filter=value_filter).concat()
                except Exception as e:
                    raise StoreError(f"obs_filter {obs_filter!r} failed on {self.uri}: {e}") from None
                self._joinids = np.sort(ids["soma_joinid"].to_numpy().astype(np.int64))
                # TileDB decodes whole data tiles: point reads of 128-row blocks ran at 40k cells/s,
                # 512-row blocks at 57-60k, 1024 at 66k (200k x 2000 atlas); 64 blocks of 512 keep the
                # per-minibatch label mix at ~0.96 of random with a 32k-cell request
                self.block_rows, self.blocks_per_request = 512, 64
        if len(self._joinids) == 0:
            what = f"obs_filter {obs_filter!r} matches" if obs_filter else "store has"
            raise StoreError(f"{what} 0 cells in {self.uri}")
        var_ids = var["soma_joinid"].to_numpy()
        if not np.array_equal(var_ids, np.arange(len(var_ids))) or len(var_ids) != self.n_vars:
            raise StoreError(f"{self.uri}: var soma_joinids are not 0..{self.n_vars - 1}")
        # gene ids: the Census's feature_id, else the AnnData var index tiledbsoma.io.from_anndata keeps as var_id
        ids = next((var[c] for c in ("feature_id", "var_id") if c in var), var.index)
        var = var.set_index(pd.Index(ids.astype(str), name=None))
        super().__init__(var)
        self.n_obs = len(self._joinids)
        self._n_store_rows = n_rows
        self._local = threading.local()
        self._executor = None
        self._pool_lock = threading.Lock()
        self._pid = os.getpid()  # the process whose reader threads and handles these are

    @property
    def obs_columns(self) -> list[str]:
        return list(self._obs_cols)

    def restrict_columns(self, columns: np.ndarray) -> None:
        """Read only these var columns (a point read on both dimensions): a Census slice of 2,000
        genes out of 60,000 moves a thirtieth of the data."""
        self._var_coords = np.unique(np.asarray(columns, dtype=np.int64))

    def _read_obs(self, column):
        if column == "soma_joinid":
            return self._joinids.copy()
        with alone(), open_experiment(self.uri, tiledb_config=self._tiledb_config) as exp:
            table = exp.obs.read(coords=(self._joinids,), column_names=["soma_joinid", column]).concat()
        nulls = table.column(column).null_count > 0  # an integer column with nulls reads as Int64, not float
        values = table.to_pandas(types_mapper=_nullable_int if nulls else None).set_index("soma_joinid")[column]
        return values.reindex(self._joinids).array

    def store_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._joinids[rows]

    def obs_names(self, rows: np.ndarray) -> np.ndarray:
        """The cell names tiledbsoma.io.from_anndata keeps in obs_id (the AnnData's obs index), else the
        soma_joinids as strings (the Census has no obs index of its own)."""
        ids = self.store_rows(np.asarray(rows, dtype=np.int64))
        if OBS_ID not in self._obs_cols or len(ids) == 0:
            return ids.astype(str).astype(object)
        unique, back = np.unique(ids, return_inverse=True)
        with alone(), open_experiment(self.uri, tiledb_config=self._tiledb_config) as exp:
            table = exp.obs.read(coords=(unique,), column_names=["soma_joinid", OBS_ID]).concat()
        order = np.argsort(table["soma_joinid"].to_numpy())  # TileDB returns them in its own order
        return np.asarray(table[OBS_ID].to_numpy(zero_copy_only=False)[order], dtype=object)[back]

    def _x(self):
        x = getattr(self._local, "x", None)
        if x is None:
            soma = _soma()
            with alone():
                # smaller result buffers than the 1 GiB default: a request arrives in a few pieces
                ctx = soma_context({**self._tiledb_config, "soma.init_buffer_bytes": 32 << 20})
                x = soma.SparseNDArray.open(f"{self.uri}/ms/{self.measurement}/X/{self.layer}", context=ctx)
            self._local.x = x
        return x

    def read(self, rows: np.ndarray) -> CSR:
        ids = self.store_rows(np.asarray(rows, dtype=np.int64))
        if len(ids) == 0:
            return empty(self.n_vars)
        # point reads of ~8k cells each: measured faster per cell than one large point list, and
        # the Arrow result (20 bytes per nonzero) stays small before it becomes CSR (8 bytes);
        # two run at once so one converts while the other is in TileDB
        pieces = [ids[i : i + READ_CELLS] for i in range(0, len(ids), READ_CELLS)]
        return concat(list(self._pool().map(self._read_ids, pieces)))

    def _pool(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():
            self._after_fork()
        with self._pool_lock:  # created on first read, once: two stream readers may read at once
            if self._executor is None:
                self._executor = ThreadPoolExecutor(SUBREAD_THREADS, thread_name_prefix="soma-read")
            return self._executor

    def _after_fork(self) -> None:
        """A store object inherited by a forked child (a multiprocessing pool, a DataLoader's workers): the
        parent's reader threads are not here (a read queued for them waited forever) and its handles are on
        the parent's contexts; both are leaked, and the child opens its own on its own context."""
        with alone():
            if self._pid != os.getpid():
                leak(self._local)
                if self._executor is not None:
                    leak(self._executor)
                self._local, self._executor, self._pid = threading.local(), None, os.getpid()
                self._pool_lock = threading.Lock()  # the parent's may have been held at the fork

    def _read_ids(self, ids: np.ndarray) -> CSR:
        try:
            # unordered: asking TileDB for row-major order costs 5-7x the read itself
            coords = (ids,) if self._var_coords is None else (ids, self._var_coords)
            x = self._x()
            with alone():  # the query's set-up (its handle's schema, columns, coordinates): see tiledb_gate
                pieces = x.read(coords=coords, result_order="auto").tables()
            tables = []
            while True:
                with together():  # reads of all threads at once
                    table = next(pieces, None)
                if table is None:
                    break
                tables.append(table)
        except Exception as e:
            raise StoreError(f"{self.uri}: reading X/{self.layer} rows {ids[0]}…{ids[-1]} failed: {e}") from e
        dim0 = _column(tables, "soma_dim_0", np.int64)
        dim1 = _column(tables, "soma_dim_1", np.int32)
        data = _column(tables, "soma_data", np.float32)
        del tables
        return coo_rows_to_csr(ids, dim0, dim1, data, self.n_vars)


def _column(tables, name, dtype) -> np.ndarray:
    parts = [t[name].to_numpy().astype(dtype, copy=False) for t in tables]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def coo_rows_to_csr(ids: np.ndarray, dim0: np.ndarray, dim1: np.ndarray, data: np.ndarray, n_cols: int) -> CSR:
    """CSR with rows in the order of sorted `ids` from entries that arrive in runs of equal rows.

    TileDB returns each fragment's entries in row-major order, so entries come as runs ("segments")
    of one row. Rows are located per segment (a searchsorted over ~rows, not over nonzeros), and only
    when segments are out of row order are they gathered — never a sort of the nonzeros.
    """
    n = len(ids)
    if len(dim0) == 0:
        return CSR(np.zeros(n + 1, np.int64), dim1, data, n_cols)
    change = np.flatnonzero(dim0[1:] != dim0[:-1]) + 1
    seg_start = np.concatenate([[0], change])
    seg_end = np.concatenate([change, [len(dim0)]])
    seg_row = np.searchsorted(ids, dim0[seg_start])
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(seg_row, weights=seg_end - seg_start, minlength=n).astype(np.int64), out=indptr[1:])
    if len(seg_row) > 1 and not np.all(seg_row[1:] > seg_row[:-1]):
        seg_indptr = np.concatenate([[0], seg_end])
        segments = compact(CSR(seg_indptr, dim1, data, n_cols))
        gathered = take_rows(segments, np.argsort(seg_row, kind="stable"))
        dim1, data = gathered.indices, gathered.data
    return CSR(indptr, dim1, data, n_cols)


def _nullable_int(arrow_type):
    """pandas' nullable integer dtype for an Arrow integer column: one with nulls stays integer (3, <NA>), as the
    same column reads from an .h5ad or Zarr store, instead of becoming float (3.0, NaN)."""
    import pyarrow as pa

    if pa.types.is_integer(arrow_type):
        return pd.api.types.pandas_dtype(str(arrow_type).replace("uint", "UInt").replace("int", "Int"))
    return None
