"""AnnData behind the Store interface: an `.h5ad` file read through h5py in row blocks (never loaded
whole), and an AnnData object in memory (sparse or dense X, a layer, or raw; a lazy one's dask X in slices of
consecutive rows). A backed AnnData (`read_h5ad(..., backed="r")`) is read as its file.

Both give the stream what the Zarr and SOMA stores give: positions after an obs_filter, obs codes,
genes by feature id or name, CSR rows by ascending position.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .csr import CSR, from_dense, merge_ranges, row_ranges, take_rows
from .store import (
    GroupObsStore,
    Store,
    StoreError,
    as_csr_recipe,
    filtered_positions,
    layer_names,
    layer_path,
    obs_index,
    read_elem,
    text,
)

# An .h5ad whose X is compressed (write_h5ad(compression="gzip")) or dense decodes shuffled blocks
# several times slower than the layout `bigatlas prepare --convert` writes; an uncompressed sparse
# .h5ad streams as fast as the Zarr store. CONVERTED_FACTOR: the measured cells/s of the converted
# store ÷ the gzip .h5ad's (bench/results/loader.json, H2).
CONVERTED_FACTOR = 4.5
_WARNED: set[str] = set()


MEMORY_PREFIX = "AnnData ("


def memory_name(adata) -> str:
    """How an AnnData in memory is named in messages and in what a run records as its data."""
    return f"{MEMORY_PREFIX}{adata.n_obs} cells x {adata.n_vars} genes, in memory)"


def _as_csr(indptr, indices, data, n_cols) -> CSR:
    return CSR(indptr, indices, data if data.dtype == np.float32 else data.astype(np.float32), n_cols)


class H5adStore(GroupObsStore):
    """An .h5ad file: CSR (sparse group) or dense X through h5py; obs columns read one at a time."""

    def __init__(self, path, *, obs_filter: str | None = None, layer: str | None = None):
        import h5py

        self.uri = str(path)
        try:
            self._file = f = h5py.File(self.uri, "r")
        except OSError as e:
            raise StoreError(f"{self.uri} is not a readable .h5ad (HDF5) file: {e}") from None
        if "obs" not in f or "var" not in f:
            raise StoreError(f"{self.uri} is an HDF5 file but not an AnnData .h5ad (no obs/var)")
        key = self._x_path = layer_path(layer)
        have = layer_names(f)
        if key not in f:
            raise StoreError(f"{self.uri} has no {key} (have: {', '.join(have)})")
        self.other_layers = tuple(name for name in have if layer_path(name) != key)
        node = f[key]
        enc = node.attrs.get("encoding-type", "array")
        enc = text(enc)
        if enc == "csc_matrix":
            raise StoreError(
                f"{self.uri}:{key} is CSC: its rows cannot be read in blocks without loading it whole. Rewrite it "
                f"as CSR once, in memory: {as_csr_recipe(key, 'read_h5ad')}"
            )
        if enc == "csr_matrix":
            self._dense = None
            self._data, self._indices = node["data"], node["indices"]
            self._indptr = np.asarray(node["indptr"][:], dtype=np.int64)
            n_rows, self.n_vars = (int(v) for v in node.attrs["shape"])
            chunk = self._data.chunks[0] if self._data.chunks else None
        elif isinstance(node, h5py.Dataset) and node.ndim == 2:
            self._dense, self._indptr = node, None
            n_rows, self.n_vars = node.shape
            chunk = node.chunks[0] * node.shape[1] if node.chunks else None
        else:
            raise StoreError(f"{self.uri}:{key} is {enc}, neither CSR nor a dense matrix")
        dtype = (self._data if self._dense is None else self._dense).dtype
        if not np.issubdtype(dtype, np.number):
            raise StoreError(f"{self.uri}:{key} has dtype {dtype}, not numeric counts")
        self._obs = f["obs"]
        order = [text(c) for c in np.atleast_1d(self._obs.attrs.get("column-order", [])).tolist()]
        self._obs_cols = [c for c in order if c in self._obs]
        super().__init__(read_elem(f["raw/var" if key == "raw/X" else "var"]))
        if len(self.var_names) != self.n_vars:
            raise StoreError(f"{self.uri}: var has {len(self.var_names)} rows but {key} has {self.n_vars} columns")
        self._rows = filtered_positions(obs_filter, self._obs_cols, lambda c: read_elem(self._obs[c]), self.uri, n_rows)
        self.n_obs = n_rows if self._rows is None else len(self._rows)
        if self.n_obs == 0:
            raise StoreError(f"store {self.uri} has 0 cells")
        mean_nnz = self.n_vars if self._dense is not None else max(self._indptr[-1] / max(n_rows, 1), 1.0)
        # a block covers at least one HDF5 chunk (a shorter read decodes the whole chunk anyway)
        self._chunk_elems = int(chunk) if chunk else 0
        self.block_rows = min(max(int(round(self._chunk_elems / mean_nnz)), 256), 4096)
        self.blocks_per_request = 128
        compressed = (self._data if self._dense is None else self._dense).compression is not None
        why = "dense" if self._dense is not None else "compressed" if compressed else None
        if why and self.uri not in _WARNED:  # once per file and process
            _WARNED.add(self.uri)
            warnings.warn(
                f"{self.uri}: {key} is stored {why}, slow to read in shuffled blocks; `bigatlas prepare --data "
                f"{self.uri} --convert OUT.zarr` writes the fast layout (~{CONVERTED_FACTOR:.1f}x the cells/s "
                "of a gzip .h5ad in our loader benchmark)",
                stacklevel=3,
            )

    def obs_names(self, rows: np.ndarray) -> np.ndarray:
        index = obs_index(self._obs).asstr()
        rows = self.store_rows(np.asarray(rows, dtype=np.int64))
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
            return np.asarray(index[int(rows[0]) : int(rows[-1]) + 1], dtype=object)
        if not len(rows):
            return np.zeros(0, object)
        unique, back = np.unique(rows, return_inverse=True)  # h5py selects increasing rows only
        return np.asarray(index[unique], dtype=object)[back]

    def read(self, rows: np.ndarray) -> CSR:
        rows = self.store_rows(np.asarray(rows, dtype=np.int64))
        try:
            return self._read_dense(rows) if self._dense is not None else self._read_csr(rows)
        except OSError as e:
            raise StoreError(f"{self.uri}:{self._x_path}: reading {len(rows)} rows failed: {e}") from e

    def _read_csr(self, rows: np.ndarray) -> CSR:
        indptr, ranges = row_ranges(self._indptr, rows)
        data = np.empty(int(indptr[-1]), self._data.dtype)
        indices = np.empty(int(indptr[-1]), self._indices.dtype)
        # ranges within one chunk of each other are read as one span: the chunk is decoded anyway
        spans = merge_ranges(ranges, max(self._chunk_elems, 4096))
        out, r = 0, 0
        for lo, hi in spans.tolist():
            d, i = self._data[lo:hi], self._indices[lo:hi]
            while r < len(ranges) and ranges[r, 1] <= hi:
                a, b = ranges[r] - lo
                data[out : out + b - a], indices[out : out + b - a] = d[a:b], i[a:b]
                out, r = out + b - a, r + 1
        return _as_csr(indptr, indices, data, self.n_vars)

    def _read_dense(self, rows: np.ndarray) -> CSR:
        parts = []
        for lo, hi in merge_ranges(np.stack([rows, rows + 1], axis=1), 64).tolist():
            a, b = np.searchsorted(rows, [lo, hi])  # the asked rows inside this span
            parts.append(self._dense[lo:hi][rows[a:b] - lo])
        return from_dense(np.concatenate(parts) if parts else np.zeros((0, self.n_vars), np.float32))


class AnnDataStore(Store):
    """An AnnData object in memory: X (or a layer, or raw.X) sparse or dense; CSC is converted once."""

    def __init__(self, adata, *, obs_filter: str | None = None, layer: str | None = None):
        import scipy.sparse as sp

        n = adata.n_obs
        self.uri = memory_name(adata)
        have = ["X"] * (adata.X is not None) + ["raw"] * (adata.raw is not None) + list(adata.layers)
        self.other_layers = tuple(name for name in have if name != (layer or "X"))
        if layer in (None, "X"):
            x, var = adata.X, adata.var
        elif layer == "raw":
            if adata.raw is None:
                raise StoreError(f"{self.uri} has no raw")
            x, var = adata.raw.X, adata.raw.var
        elif layer in adata.layers:
            x, var = adata.layers[layer], adata.var
        else:
            raise StoreError(f"{self.uri} has no layer {layer!r} (have: {', '.join(have) or 'no matrix'})")
        if x is None:
            raise StoreError(f"{self.uri} has no X; pass layer= ({', '.join(have) or 'no other matrix'})")
        self._lazy = None
        if sp.issparse(x):
            if x.format != "csr":
                warnings.warn(f"{self.uri}: {x.format.upper()} matrix converted to CSR for row reads", stacklevel=3)
            x = sp.csr_matrix(x)  # shares a CSR's arrays; column order within rows is kept as is
            idx = x.indices.astype(np.int64) if x.indptr.dtype == np.int64 else x.indices
            self._csr, self._dense = CSR(x.indptr.astype(idx.dtype), idx, x.data, x.shape[1]), None
        elif isinstance(x, np.ndarray) and x.ndim == 2:
            self._csr, self._dense = None, x
        elif _is_dask(x) and x.ndim == 2:  # a lazy AnnData (anndata.experimental.read_lazy): read in row slices
            self._csr, self._dense, self._lazy = None, None, x
        else:
            raise StoreError(f"{self.uri}: X of type {type(x).__name__} is not supported (scipy sparse, numpy or dask)")
        if not np.issubdtype(x.dtype, np.number):
            raise StoreError(f"{self.uri}: X has dtype {x.dtype}, not numeric counts")
        self.n_vars = x.shape[1]
        self._obs_frame = _frame(adata.obs)
        self._index = np.asarray(adata.obs_names, dtype=object)
        super().__init__(_frame(var))
        self._rows = filtered_positions(obs_filter, list(self._obs_frame.columns), self._column, self.uri, n)
        self.n_obs = n if self._rows is None else len(self._rows)
        if self.n_obs == 0:
            raise StoreError(f"store {self.uri} has 0 cells")
        self.block_rows, self.blocks_per_request = 256, 128

    def _column(self, column):
        return self._obs_frame[column].array

    @property
    def obs_columns(self) -> list[str]:
        return [str(c) for c in self._obs_frame.columns]

    def _read_obs(self, column):
        values = self._obs_frame[column].array
        values = values if self._rows is None else values[self._rows]
        if isinstance(values, pd.arrays.NumpyExtensionArray):
            return np.asarray(values)
        return values  # a Categorical or a nullable array (Int64 with <NA>) as a file's column reads: not floats

    def store_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self._rows is None else self._rows[rows]

    def obs_names(self, rows: np.ndarray) -> np.ndarray:
        return self._index[self.store_rows(np.asarray(rows, dtype=np.int64))]

    def read(self, rows: np.ndarray) -> CSR:
        rows = self.store_rows(np.asarray(rows, dtype=np.int64))
        if self._lazy is not None:
            return self._read_lazy(rows)
        if self._dense is not None:
            return from_dense(np.asarray(self._dense[rows]))
        m = take_rows(self._csr, rows)
        return _as_csr(m.indptr.astype(np.int64), m.indices, m.data, self.n_vars)

    def _read_lazy(self, rows: np.ndarray) -> CSR:
        """Rows of a dask X: each run of consecutive rows one slice, all of them computed at once."""
        import dask
        import scipy.sparse as sp

        if len(rows) == 0:
            return _as_csr(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), self.n_vars)
        rows_sorted = np.unique(rows)
        cut = np.flatnonzero(np.diff(rows_sorted) != 1) + 1
        starts = rows_sorted[np.r_[0, cut]]
        ends = rows_sorted[np.r_[cut - 1, len(rows_sorted) - 1]] + 1
        blocks = dask.compute(*(self._lazy[int(a) : int(b)] for a, b in zip(starts, ends, strict=True)))
        m = sp.vstack([sp.csr_matrix(b) for b in blocks], format="csr")
        whole = CSR(m.indptr.astype(np.int64), m.indices, m.data, self.n_vars)
        picked = take_rows(whole, np.searchsorted(rows_sorted, rows))  # int64 indptr, as whole's
        return _as_csr(picked.indptr, picked.indices, picked.data, self.n_vars)


def _is_dask(x) -> bool:
    import dask.array

    return isinstance(x, dask.array.Array)  # a lazy AnnData's views wrap it in a subclass


def _frame(table) -> pd.DataFrame:
    """obs / var as a DataFrame: a lazy AnnData's (an xarray-backed Dataset2D) loaded once."""
    return table if isinstance(table, pd.DataFrame) else table.to_memory()
