"""AnnData-Zarr (format v2 or v3) reader: CSR X (or a layer), obs columns, var.

Rows are read as element ranges of X/data and X/indices. All ranges of one request are fetched in
one asyncio gather, so the codec pipeline (zarrs when installed) decodes their chunks in parallel.
Ranges closer than one storage chunk are merged: the chunk between them is decoded anyway.
"""
from __future__ import annotations

import asyncio

import numpy as np
import zarr
from zarr.core.sync import sync

from .csr import CSR
from .store import Store, StoreError, filter_columns


def _read_elem(node):
    from anndata.io import read_elem

    return read_elem(node)


class ZarrStore(Store):
    def __init__(self, uri: str, *, obs_filter: str | None = None, layer: str | None = None):
        self.uri = str(uri)
        try:
            root = zarr.open_group(self.uri, mode="r")
        except Exception as e:  # zarr raises several types for "not a group here"
            raise StoreError(f"{self.uri} is not a Zarr group ({type(e).__name__}: {e})") from None
        self._root = root
        if "obs" not in root or "var" not in root:
            raise StoreError(f"{self.uri} is a Zarr group but not an AnnData store (no obs/var)")
        x_path = "X" if layer in (None, "X") else f"layers/{layer}"
        if x_path not in root:
            have = list(root["layers"].keys()) if "layers" in root else []
            raise StoreError(f"{self.uri} has no {x_path} (layers: {have or 'none'})")
        x = root[x_path]
        enc = x.attrs.get("encoding-type") if isinstance(x, zarr.Group) else "dense array"
        if enc != "csr_matrix":
            raise StoreError(f"{self.uri}:{x_path} is {enc}, not csr_matrix; rows cannot be streamed "
                             "(rewrite it as CSR with `bigatlas prepare`)")
        self._data, self._indices = x["data"], x["indices"]
        self._indptr = np.asarray(x["indptr"][:], dtype=np.int64)
        self.n_vars = int(x.attrs["shape"][1])
        if not np.issubdtype(self._data.dtype, np.number):
            raise StoreError(f"{self.uri}:{x_path}/data has dtype {self._data.dtype}, not numeric counts")
        self._x_path = x_path
        self._obs = root["obs"]
        self._obs_cols = [c for c in self._obs.attrs.get("column-order", []) if c in self._obs]
        super().__init__(_read_elem(root["var"]))
        if len(self.var_names) != self.n_vars:
            raise StoreError(f"{self.uri}: var has {len(self.var_names)} rows but X has {self.n_vars} columns")
        n_rows = len(self._indptr) - 1
        self._rows = None  # None = identity map from positions to store rows
        if obs_filter:
            cols = filter_columns(obs_filter, self._obs_cols)
            import pandas as pd

            frame = pd.DataFrame({c: _read_elem(self._obs[c]) for c in cols})
            try:
                mask = np.asarray(frame.eval(obs_filter), dtype=bool)
            except Exception as e:
                raise StoreError(f"obs_filter {obs_filter!r} failed on {self.uri}: {e}") from None
            self._rows = np.flatnonzero(mask).astype(np.int64)
            if len(self._rows) == 0:
                raise StoreError(f"obs_filter {obs_filter!r} matches 0 of {n_rows} cells in {self.uri}")
        self.n_obs = n_rows if self._rows is None else len(self._rows)
        self._chunk_elems = int(self._data.chunks[0])
        mean_nnz = max(self._indptr[-1] / max(n_rows, 1), 1.0)
        self.chunk_rows = int(max(1, round(self._chunk_elems / mean_nnz)))

    @property
    def obs_columns(self) -> list[str]:
        return list(self._obs_cols)

    def _read_obs(self, column):
        values = _read_elem(self._obs[column])
        return values if self._rows is None else values[self._rows]

    def store_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self._rows is None else self._rows[rows]

    def read(self, rows: np.ndarray) -> CSR:
        rows = self.store_rows(np.asarray(rows, dtype=np.int64))
        starts, ends = self._indptr[rows], self._indptr[rows + 1]
        lengths = ends - starts
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # contiguous element runs, then runs merged across gaps shorter than a chunk
        breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        run_first = np.concatenate([[0], breaks]).astype(np.int64) if len(rows) else breaks
        run_len = np.diff(np.concatenate([run_first, [len(rows)]]))
        r_start, r_end = starts[run_first], ends[run_first + run_len - 1]
        gap_break = np.flatnonzero(r_start[1:] - r_end[:-1] >= self._chunk_elems) + 1
        m_first = np.concatenate([[0], gap_break]).astype(np.int64)
        m_last = np.concatenate([gap_break - 1, [len(r_start) - 1]]).astype(np.int64)
        ranges = list(zip(r_start[m_first].tolist(), r_end[m_last].tolist()))
        data_parts, index_parts = self._fetch(ranges)
        if len(ranges) == len(r_start):  # no gaps inside any merged range: concatenation is the answer
            data = np.concatenate(data_parts) if data_parts else np.zeros(0, self._data.dtype)
            indices = np.concatenate(index_parts) if index_parts else np.zeros(0, self._indices.dtype)
        else:
            data = np.empty(int(indptr[-1]), self._data.dtype)
            indices = np.empty(int(indptr[-1]), self._indices.dtype)
            row_range = np.repeat(np.arange(len(ranges)), m_last - m_first + 1)
            row_range = np.repeat(row_range, run_len)
            for k, (lo, _) in enumerate(ranges):
                sel = np.flatnonzero(row_range == k)
                local = np.concatenate([[0], np.cumsum(lengths[sel])])
                src = np.repeat(starts[sel] - lo - local[:-1], lengths[sel]) + np.arange(local[-1])
                dst = slice(int(indptr[sel[0]]), int(indptr[sel[0]] + local[-1]))
                data[dst] = data_parts[k][src]
                indices[dst] = index_parts[k][src]
        if data.dtype != np.float32:
            data = data.astype(np.float32)
        return CSR(indptr, indices, data, self.n_vars)

    def _fetch(self, ranges):
        async def gather():
            calls = [a._async_array.getitem((slice(lo, hi),))
                     for a in (self._data, self._indices) for lo, hi in ranges]
            return await asyncio.gather(*calls)

        try:
            parts = sync(gather())
        except Exception as e:
            raise StoreError(f"{self.uri}:{self._x_path}: reading element ranges {ranges[:3]}… failed: "
                             f"{type(e).__name__}: {e}") from e
        parts = [np.asarray(p) for p in parts]
        return parts[: len(ranges)], parts[len(ranges):]
