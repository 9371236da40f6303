"""Minimal CSR rows container and the few row/column operations the stream needs.

scipy.sparse would copy and upcast on every slice; these helpers keep the store's narrow index
dtype until the batch is handed to torch and touch each nonzero at most once per operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # scipy's C++ row gather: one pass, ~4x the numpy repeat/arange/fancy-index formulation
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
except ImportError:  # private API; the numpy path below gives the same result
    _csr_row_index = None


@dataclass(frozen=True)
class CSR:
    indptr: np.ndarray  # int64 (int32 after compact()), len n_rows + 1, starts at 0
    indices: np.ndarray  # int16/int32/int64 column ids
    data: np.ndarray  # float32 counts
    n_cols: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def rows(self, start: int, stop: int) -> CSR:
        """Rows start:stop as a view-based CSR (indptr rebased to 0)."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return CSR(self.indptr[start : stop + 1] - lo, self.indices[lo:hi], self.data[lo:hi], self.n_cols)

    def to_torch(self):
        """torch.sparse_csr float32 tensor with int32 indices (no copy when they already are int32)."""
        import torch

        return torch.sparse_csr_tensor(
            torch.from_numpy(self.indptr.astype(np.int32, copy=False)),
            torch.from_numpy(self.indices.astype(np.int32, copy=False)),
            torch.from_numpy(self.data),
            size=(self.n_rows, self.n_cols),
            check_invariants=False,
        )

    def to_scipy(self):
        import scipy.sparse as sp

        return sp.csr_matrix(
            (self.data, self.indices.astype(np.int32, copy=False), self.indptr), shape=(self.n_rows, self.n_cols)
        )


def from_dense(block: np.ndarray) -> CSR:
    """The CSR rows of a dense row block (float32 values, int32 column ids)."""
    r, c = np.nonzero(block)
    indptr = np.zeros(block.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=block.shape[0]), out=indptr[1:])
    data = block[r, c]
    return CSR(
        indptr, c.astype(np.int32), data if data.dtype == np.float32 else data.astype(np.float32), block.shape[1]
    )


def empty(n_cols: int, index_dtype=np.int32) -> CSR:
    return CSR(np.zeros(1, np.int64), np.zeros(0, index_dtype), np.zeros(0, np.float32), n_cols)


def element_index(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in data/indices of the given rows, concatenated in row order, and the new indptr."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    new_indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    total = int(new_indptr[-1])
    # element k of output row i sits at starts[i] + (k - new_indptr[i])
    offsets = np.repeat(starts - new_indptr[:-1], lengths)
    offsets += np.arange(total, dtype=np.int64)
    return offsets, new_indptr


def row_ranges(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ascending `rows` of a CSR with `indptr`: the new indptr of those rows, and the element
    ranges [start, end) to read, one per run of rows whose elements continue each other."""
    starts, ends = indptr[rows], indptr[rows + 1]
    new_indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(ends - starts, out=new_indptr[1:])
    if not len(rows):
        return new_indptr, np.zeros((0, 2), np.int64)
    first = np.flatnonzero(np.concatenate([[True], starts[1:] != ends[:-1]]))
    last = np.concatenate([first[1:] - 1, [len(rows) - 1]])
    return new_indptr, np.stack([starts[first], ends[last]], axis=1).astype(np.int64)


def merge_ranges(ranges: np.ndarray, gap: int) -> np.ndarray:
    """Ranges closer than `gap` elements joined into one (what lies between is read and dropped)."""
    if len(ranges) < 2:
        return ranges
    split = np.flatnonzero(ranges[1:, 0] - ranges[:-1, 1] >= gap) + 1
    starts = ranges[np.concatenate([[0], split]), 0]
    ends = ranges[np.concatenate([split - 1, [len(ranges) - 1]]), 1]
    return np.stack([starts, ends], axis=1)


def compact(m: CSR) -> CSR:
    """int32 indptr and indices (when nnz allows): the layout take_rows gathers fastest and torch takes."""
    if m.nnz >= np.iinfo(np.int32).max:
        return m
    return CSR(m.indptr.astype(np.int32), m.indices.astype(np.int32, copy=False), m.data, m.n_cols)


def take_rows(m: CSR, rows: np.ndarray) -> CSR:
    """Rows `rows` (any order, repeats allowed) as a new CSR with m's index dtypes."""
    rows = np.asarray(rows, dtype=m.indptr.dtype)
    lengths = m.indptr[rows + 1] - m.indptr[rows]
    indptr = np.zeros(len(rows) + 1, m.indptr.dtype)
    np.cumsum(lengths, out=indptr[1:])
    if _csr_row_index is not None and m.indptr.dtype == m.indices.dtype:
        indices = np.empty(int(indptr[-1]), m.indices.dtype)
        data = np.empty(int(indptr[-1]), m.data.dtype)
        _csr_row_index(len(rows), rows, m.indptr, m.indices, m.data, indices, data)
        return CSR(indptr, indices, data, m.n_cols)
    elem, _ = element_index(m.indptr.astype(np.int64), rows.astype(np.int64))
    return CSR(indptr, m.indices[elem], m.data[elem], m.n_cols)


def concat(parts: list[CSR]) -> CSR:
    if len(parts) == 1:
        return parts[0]
    n_cols = parts[0].n_cols
    indptr = [np.zeros(1, parts[0].indptr.dtype)]
    offset = 0
    for p in parts:
        indptr.append(p.indptr[1:] + offset)
        offset += p.nnz
    return CSR(
        np.concatenate(indptr),
        np.concatenate([p.indices for p in parts]),
        np.concatenate([p.data for p in parts]),
        n_cols,
    )


def select_columns(m: CSR, colmap: np.ndarray, n_out: int) -> CSR:
    """Keep columns with colmap[col] >= 0, renumbered to colmap[col]; row order kept.

    Output columns within a row follow the store's column order, not sorted by new id: torch and
    scipy accept unsorted indices, and sorting would cost a pass per row.
    """
    new_cols = colmap.astype(np.int32, copy=False)[m.indices]
    keep = new_cols >= 0
    kept_before = np.zeros(len(keep) + 1, np.int64)
    np.cumsum(keep, out=kept_before[1:])
    indptr = kept_before[m.indptr]
    return CSR(indptr, new_cols[keep], m.data[keep], n_out)


@dataclass(frozen=True)
class NonCount:
    """The first stored value of a read that is not a raw count, where it lies, and its store's other matrices."""

    where: str  # the store holding it (a collection's member)
    kind: str  # NaN/inf, negative or non-integer
    value: float
    position: int  # the cell's position in that store
    n_bad: int  # such values among the read's cells
    other_layers: tuple

    def __str__(self) -> str:
        return (
            f"{self.where}: {self.kind} value {self.value!r} in the cell at position {self.position} ({self.n_bad} "
            "such values among these cells)"
        )


def non_count(m: CSR, store, integer: bool = True, positions: np.ndarray | None = None) -> NonCount | None:
    """The first stored value that is not finite, >= 0 and (if integer) whole, None when all are raw counts. `m` was
    read from `store`; positions[row] is the store position of each row (default: row). Where it lies is what
    store.locate gives: the store holding the value (a collection's member), the cell's position there, and that
    store's other matrices."""
    d = m.data
    if not len(d):
        return None
    # fast path: three reductions (~20 ms per 20M values); NaN fails the first comparison
    if d.min() >= 0 and np.isfinite(d).all() and (not integer or (np.floor(d) == d).all()):
        return None
    bad = ~np.isfinite(d) | (d < 0)
    if integer:
        bad |= np.floor(d) != d
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(m.indptr, i, side="right") - 1)
    v = d[i]
    kind = "NaN/inf" if not np.isfinite(v) else "negative" if v < 0 else "non-integer"
    where, pos, other_layers = store.locate(int(positions[row]) if positions is not None else row)
    return NonCount(where, kind, float(v), pos, int(bad.sum()), tuple(other_layers))


def check_counts(m: CSR, store, integer: bool = True, positions: np.ndarray | None = None) -> None:
    """Raise ValueError at the first value that is not a raw count (non_count), with the options that read such
    data."""
    bad = non_count(m, store, integer, positions)
    if bad is None:
        return
    hints = ["--allow-non-integer (allow_non_integer=True) for normalized or ambient-corrected values"] * (
        bad.kind == "non-integer"
    )
    if bad.other_layers:
        others = ", ".join(bad.other_layers)
        hints.append(f"--layer (layer=) naming the one of raw counts; this store also has {others}")
    hint = f" (pass {', or '.join(hints)})" if hints else ""
    raise ValueError(f"{bad}; the model needs raw counts{hint}")
