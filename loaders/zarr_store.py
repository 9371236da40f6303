"""AnnData-Zarr (format v2 or v3) reader: CSR X (or a layer), obs columns, var.

Rows are read as element ranges of X/data and X/indices. All ranges of one request are fetched in
one asyncio gather, so the codec pipeline (zarrs when installed) decodes their chunks in parallel.
Ranges closer than one storage chunk are merged: the chunk between them is decoded anyway.
"""

from __future__ import annotations

import asyncio
import os
import warnings

import numpy as np
import zarr
from zarr.core.sync import sync

from .csr import CSR, from_dense, row_ranges
from .store import (
    GroupObsStore,
    StoreError,
    as_csr_recipe,
    filtered_positions,
    layer_names,
    layer_path,
    leak,
    obs_index,
    read_elem,
)

_WARNED_DENSE: set[str] = set()


class ZarrStore(GroupObsStore):
    def __init__(self, uri: str, *, obs_filter: str | None = None, layer: str | None = None):
        self.uri = str(uri)
        try:
            root = zarr.open_group(self.uri, mode="r")
        except Exception as e:  # zarr raises several types for "not a group here"
            raise StoreError(f"{self.uri} is not a Zarr group ({type(e).__name__}: {e})") from None
        self._root = root
        if "obs" not in root or "var" not in root:
            raise StoreError(f"{self.uri} is a Zarr group but not an AnnData store (no obs/var)")
        x_path = layer_path(layer)
        have = layer_names(root)
        if x_path not in root:
            raise StoreError(f"{self.uri} has no {x_path} (have: {', '.join(have)})")
        self.other_layers = tuple(name for name in have if layer_path(name) != x_path)
        x = root[x_path]
        where = f"{self.uri}:{x_path}"
        self._pid = os.getpid()
        if isinstance(x, zarr.Array) and x.ndim == 2:  # dense, as anndata writes a numpy X
            self._arrays, self._indptr = (x,), None  # a chunk not written is zeros here: no check can tell
            n_rows, self.n_vars = (int(v) for v in x.shape)
            if self.uri not in _WARNED_DENSE:  # once per store and process
                _WARNED_DENSE.add(self.uri)
                warnings.warn(
                    f"{where} is stored dense, slower to stream than sparse (every zero is decoded; measured with "
                    "2,000 genes: 32k against 75-180k cells/s); `bigatlas prepare --data "
                    f"{self.uri} --convert OUT.zarr` writes the fast layout",
                    stacklevel=3,
                )
        else:
            enc = x.attrs.get("encoding-type") if isinstance(x, zarr.Group) else f"a {x.ndim}-D array"
            if enc != "csr_matrix":
                raise StoreError(
                    f"{where} is {enc}, neither csr_matrix nor a dense matrix: its rows cannot be streamed. Rewrite "
                    f"it as CSR once, in memory: {as_csr_recipe(x_path, 'read_zarr')}"
                )
            data, indices, indptr = x["data"], x["indices"], x["indptr"]  # each x[...] reads the array's metadata
            self._arrays = (data, indices)
            # a chunk every value of which is the fill value (0) need not be written: the indptr of a store without
            # values, indices that are all column 0 (no row has two of them); elsewhere a missing chunk was lost
            if data.shape[0]:
                _check_chunks_present(indptr, f"{where}/indptr")
            self._indptr = np.asarray(indptr[:], dtype=np.int64)
            _check_indptr(self._indptr, data.shape[0], indices.shape[0], where)
            _check_chunks_present(data, f"{where}/data")
            _check_chunks_present(indices, f"{where}/indices", lambda a, b: _at_most_one_per_row(self._indptr, a, b))
            n_rows, self.n_vars = len(self._indptr) - 1, int(x.attrs["shape"][1])
        dtype = self._arrays[0].dtype
        if not np.issubdtype(dtype, np.number):
            raise StoreError(f"{where}{'' if self.dense else '/data'} has dtype {dtype}, not numeric counts")
        self._x_path = x_path
        self._obs = root["obs"]
        self._obs_cols = [c for c in self._obs.attrs.get("column-order", []) if c in self._obs]
        super().__init__(read_elem(root["raw/var" if x_path == "raw/X" else "var"]))
        if len(self.var_names) != self.n_vars:
            raise StoreError(f"{self.uri}: var has {len(self.var_names)} rows but X has {self.n_vars} columns")
        # None = identity map from positions to store rows
        self._rows = filtered_positions(obs_filter, self._obs_cols, lambda c: read_elem(self._obs[c]), self.uri, n_rows)
        self.n_obs = n_rows if self._rows is None else len(self._rows)
        if self.n_obs == 0:
            raise StoreError(f"store {self.uri} has 0 cells")
        if self.dense:
            self._chunk_elems = int(x.chunks[0]) * self.n_vars
            mean_nnz = max(self.n_vars, 1)
        else:
            self._chunk_elems = int(self._data.chunks[0])  # inner chunks when sharded: the decode unit
            mean_nnz = max(self._indptr[-1] / max(n_rows, 1), 1.0)
        # whole chunks per block when chunks are large; blocks of 256 rows otherwise (a block
        # shorter than a chunk decodes the whole chunk anyway)
        chunk_rows = int(max(1, round(self._chunk_elems / mean_nnz)))
        self.block_rows = min(max(chunk_rows, 256), 4096)
        self.blocks_per_request = 128

    @property
    def dense(self) -> bool:
        """X is a dense array (read in row blocks, made CSR), not a CSR group."""
        return self._indptr is None

    @property
    def _data(self) -> zarr.Array:
        return self._x_arrays()[0]

    @property
    def _indices(self) -> zarr.Array:
        return self._x_arrays()[1]

    def _x_arrays(self) -> tuple[zarr.Array, zarr.Array]:
        """X's data and indices arrays, opened in this process: a store object inherited by a forked child
        (a multiprocessing pool, a DataLoader's workers) holds arrays bound to the parent's zarrs pipeline,
        whose thread pool the child does not have (its first read waited forever); the child leaks them and
        opens its own, which decode with zarr's own pipeline there."""
        if self._pid != os.getpid():
            leak(self._arrays)
            x = zarr.open_group(self.uri, mode="r")[self._x_path]
            self._arrays, self._pid = ((x,) if self.dense else (x["data"], x["indices"])), os.getpid()
        return self._arrays

    def obs_names(self, rows: np.ndarray) -> np.ndarray:
        index = obs_index(self._obs)
        rows = self.store_rows(np.asarray(rows, dtype=np.int64))
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1:  # contiguous: one slice
            return np.asarray(index[int(rows[0]) : int(rows[-1]) + 1]).astype(object)
        return np.asarray(index.get_orthogonal_selection(rows)).astype(object)

    def read(self, rows: np.ndarray) -> CSR:
        rows = self.store_rows(np.asarray(rows, dtype=np.int64))
        if self.dense:
            return self._read_dense(rows)
        indptr, ranges = row_ranges(self._indptr, rows)
        nnz = int(indptr[-1])
        data = np.empty(nnz, self._data.dtype)
        indices = np.empty(nnz, self._indices.dtype)
        if nnz:
            self._fetch(ranges, data, indices)
        if data.dtype != np.float32:
            data = data.astype(np.float32)
        return CSR(indptr, indices, data, self.n_vars)

    def _read_dense(self, rows: np.ndarray) -> CSR:
        """Rows of a dense X: one orthogonal selection (zarr decodes its chunks together), then made CSR."""
        x = self._x_arrays()[0]
        try:
            block = x.get_orthogonal_selection((rows, slice(None))) if len(rows) else np.zeros((0, self.n_vars))
        except Exception as e:
            raise StoreError(
                f"{self.uri}:{self._x_path}: reading {len(rows)} rows failed: {type(e).__name__}: {e}"
            ) from e
        return from_dense(np.asarray(block))

    def same_layout(self, other) -> bool:
        """Whether read_many can decode both stores' rows into one buffer (same dtypes and width)."""
        return (
            isinstance(other, ZarrStore)
            and not (self.dense or other.dense)
            and other.n_vars == self.n_vars
            and other._data.dtype == self._data.dtype
            and other._indices.dtype == self._indices.dtype
        )

    def _fetch(self, ranges: np.ndarray, data: np.ndarray, indices: np.ndarray) -> None:
        """Decode all element ranges of both arrays in ONE pipeline call each, straight into the
        output buffers: the codec pipeline then decodes every chunk of the request in parallel."""

        async def both():
            await asyncio.gather(
                *(_read_ranges(arr, ranges, out) for arr, out in ((self._data, data), (self._indices, indices)))
            )

        try:
            sync(both())
        except Exception as e:
            raise StoreError(self._locate_failure(ranges, e)) from e

    def _locate_failure(self, ranges: np.ndarray, error: Exception) -> str:
        """Name the array and chunk that fails to decode, reading the request's chunks one by one."""
        c = (self._data.shards or self._data.chunks)[0]
        chunks = sorted({k for lo, hi in ranges.tolist() for k in range(lo // c, (hi - 1) // c + 1)})
        for name, arr in (("data", self._data), ("indices", self._indices)):
            for k in chunks:
                try:
                    arr[k * c : min((k + 1) * c, arr.shape[0])]
                except Exception as e:
                    return (
                        f"{self.uri}:{self._x_path}/{name} chunk {k} (elements {k * c}:{(k + 1) * c}) "
                        f"is corrupt or missing: {type(e).__name__}: {e}"
                    )
        return (
            f"{self.uri}:{self._x_path}: reading {len(ranges)} element ranges failed: {type(error).__name__}: {error}"
        )


def missing_chunks(arr: zarr.Array) -> np.ndarray:
    """Numbers of the storage objects (chunks, or shards) of a 1-D array on a local disk that are not there. zarr
    reads a missing one as its fill value, so a store copied part way reads as zeros where it was cut. Arrays in
    other stores (object stores, zip files) are not listed: empty."""
    from zarr.storage import LocalStore

    store, n = arr.store_path.store, -(-arr.shape[0] // (arr.shards or arr.chunks)[0])
    if not isinstance(store, LocalStore) or n == 0:
        return np.zeros(0, np.int64)
    key = arr.metadata.encode_chunk_key((0,))  # 1-D: a fixed prefix and the number ("c/7" in v3, "7" in v2)
    prefix = key[:-1]
    if arr.metadata.encode_chunk_key((n - 1,)) != prefix + str(n - 1):
        return np.zeros(0, np.int64)  # a key layout this does not know
    folder = os.path.join(str(store.root), arr.store_path.path, os.path.dirname(prefix))
    stem = os.path.basename(prefix)
    try:
        names = [e.name[len(stem) :] for e in os.scandir(folder) if e.name.startswith(stem)]
    except FileNotFoundError:
        names = []
    present = np.array([int(v) for v in names if v.isdigit()], dtype=np.int64)
    return np.setdiff1d(np.arange(n, dtype=np.int64), present)


def _check_chunks_present(arr: zarr.Array, what: str, may_be_zeros=None) -> None:
    """Refuse the array if a chunk file is missing; may_be_zeros(lo, hi): whether elements lo:hi could all be 0,
    so that their chunk was left unwritten."""
    gone, c = missing_chunks(arr), (arr.shards or arr.chunks)[0]
    if may_be_zeros is not None:
        gone = np.array([k for k in gone.tolist() if not may_be_zeros(k * c, min((k + 1) * c, arr.shape[0]))])
    if len(gone):
        shown = ", ".join(f"{k} (elements {k * c}:{(k + 1) * c})" for k in gone[:3].tolist())
        raise StoreError(
            f"{what}: {len(gone)} of {-(-arr.shape[0] // c)} chunk files are missing ({shown}"
            f"{' …' if len(gone) > 3 else ''}), which zarr reads as zeros: a copy cut short? Copy the store again"
        )


def _at_most_one_per_row(indptr: np.ndarray, lo: int, hi: int) -> bool:
    """Whether no row holds two of the values lo:hi (a row's column indices differ, so only then can they all be
    column 0)."""
    first = int(np.searchsorted(indptr, lo, side="right")) - 1
    last = int(np.searchsorted(indptr, hi - 1, side="right")) - 1
    rows = indptr[max(first, 0) : last + 2]
    per_row = np.minimum(rows[1:], hi) - np.maximum(rows[:-1], lo)
    return bool(per_row.max(initial=0) <= 1)


def _check_indptr(indptr: np.ndarray, n_data: int, n_indices: int, what: str) -> None:
    """X's indptr starts at 0, never decreases and ends at the number of stored values."""
    bad = len(indptr) == 0 or indptr[0] != 0 or n_data != n_indices or indptr[-1] != n_data
    if not bad and len(indptr) > 1:
        bad = bool((indptr[1:] < indptr[:-1]).any())
    if bad:
        end = int(indptr[-1]) if len(indptr) else None
        raise StoreError(
            f"{what}/indptr is not a CSR row index of its {n_data} values (starts at "
            f"{int(indptr[0]) if len(indptr) else None}, ends at {end}, {n_indices} indices): the store is damaged"
        )


class _RangesIndexer:
    """zarr Indexer over a 1-D array: concatenation of element ranges, as chunk projections."""

    drop_axes = ()

    def __init__(self, ranges: np.ndarray, chunk: int):
        self.ranges, self.chunk = ranges, chunk
        self.shape = (int((ranges[:, 1] - ranges[:, 0]).sum()),)

    def __iter__(self):
        from zarr.core.indexing import ChunkProjection

        c, out = self.chunk, 0
        for lo, hi in self.ranges.tolist():
            for k in range(lo // c, (hi - 1) // c + 1):
                a, b = max(lo, k * c) - k * c, min(hi, (k + 1) * c) - k * c
                yield ChunkProjection((k,), (slice(a, b),), (slice(out, out + b - a),), a == 0 and b == c)
                out += b - a


async def _read_ranges(arr: zarr.Array, ranges: np.ndarray, out: np.ndarray) -> None:
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    # the indexer walks the array's chunk grid: shards when sharded (the pipeline decodes only the
    # inner chunks a range touches)
    await arr._async_array._get_selection(
        _RangesIndexer(ranges, (arr.shards or arr.chunks)[0]),
        prototype=proto,
        out=proto.nd_buffer.from_numpy_array(out),
    )


def read_many(parts: list[tuple[ZarrStore, np.ndarray]]) -> CSR:
    """Rows of several Zarr stores of the same layout (same_layout), concatenated in order: all element
    ranges of all stores decode in ONE pipeline call, straight into one output buffer (what a read
    request of a collection needs, without a read per store and a copy to concatenate)."""
    plans = []
    for store, rows in parts:
        indptr, ranges = row_ranges(store._indptr, store.store_rows(np.asarray(rows, dtype=np.int64)))
        plans.append((store, indptr, ranges))
    first = plans[0][0]
    sizes = [int(p[1][-1]) for p in plans]
    data = np.empty(sum(sizes), first._data.dtype)
    indices = np.empty(sum(sizes), first._indices.dtype)
    jobs, offset = [], 0
    for (store, _, ranges), n in zip(plans, sizes):
        if n:
            jobs += [
                _read_ranges(store._data, ranges, data[offset : offset + n]),
                _read_ranges(store._indices, ranges, indices[offset : offset + n]),
            ]
        offset += n

    async def everything():
        await asyncio.gather(*jobs)

    try:
        sync(everything())
    except Exception:  # name the store and chunk that fail: read each part on its own
        for store, rows in parts:
            store.read(rows)
        raise
    starts = np.cumsum([0, *sizes[:-1]])
    indptr = np.concatenate([[0], *(p[1][1:] + s for p, s in zip(plans, starts))]).astype(np.int64)
    if data.dtype != np.float32:
        data = data.astype(np.float32)
    return CSR(indptr, indices, data, first.n_vars)
