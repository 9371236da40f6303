"""TileDB-SOMA experiment reader (the CELLxGENE Census format).

A read request's rows are fetched as ONE point-list read of their soma_joinids in row-major order;
the result arrives sorted by row, so indptr is built by counting rows, never by sorting COO.
Handles are opened lazily per reader thread: TileDB handles are not shared across threads, and a
handle opened before a fork deadlocks the child.
"""
from __future__ import annotations

import threading

import numpy as np

from .csr import CSR
from .store import Store, StoreError, filter_columns


def _soma():
    import tiledbsoma

    return tiledbsoma


class SomaStore(Store):
    def __init__(self, uri: str, *, obs_filter: str | None = None, layer: str | None = None,
                 measurement: str = "RNA"):
        soma = _soma()
        self.uri = str(uri)
        self.layer = layer or "raw"
        self.measurement = measurement
        try:
            exp = soma.Experiment.open(self.uri)
        except Exception as e:
            raise StoreError(f"{self.uri} is not a SOMA experiment ({type(e).__name__}: {e})") from None
        with exp:
            if measurement not in exp.ms:
                raise StoreError(f"{self.uri} has no measurement {measurement!r} "
                                 f"(have: {', '.join(exp.ms.keys())})")
            ms = exp.ms[measurement]
            if "X" not in ms or self.layer not in ms.X:
                have = ", ".join(ms.X.keys()) if "X" in ms else "none"
                raise StoreError(f"{self.uri}: measurement {measurement!r} has no X layer {self.layer!r} "
                                 f"(have: {have})")
            x = ms.X[self.layer]
            if x.soma_type != "SOMASparseNDArray":
                raise StoreError(f"{self.uri}: X layer {self.layer!r} is {x.soma_type}, not sparse")
            n_rows, self.n_vars = (int(s) for s in x.shape)
            var = ms.var.read().concat().to_pandas()
            self._obs_cols = [f.name for f in exp.obs.schema]
            value_filter = None
            if obs_filter:
                filter_columns(obs_filter, self._obs_cols)
                value_filter = obs_filter
            try:
                ids = exp.obs.read(column_names=["soma_joinid"], value_filter=value_filter).concat()
            except Exception as e:
                raise StoreError(f"obs_filter {obs_filter!r} failed on {self.uri}: {e}") from None
            self._joinids = np.sort(ids["soma_joinid"].to_numpy().astype(np.int64))
            # point-list reads touch only the data tiles holding the rows: no chunk alignment to keep
            self.chunk_rows = 1
        if len(self._joinids) == 0:
            what = f"obs_filter {obs_filter!r} matches" if obs_filter else "store has"
            raise StoreError(f"{what} 0 cells in {self.uri}")
        var_ids = var["soma_joinid"].to_numpy()
        if not np.array_equal(var_ids, np.arange(len(var_ids))) or len(var_ids) != self.n_vars:
            raise StoreError(f"{self.uri}: var soma_joinids are not 0..{self.n_vars - 1}")
        var = var.set_index(var["feature_id"].astype(str) if "feature_id" in var else var.index.astype(str))
        super().__init__(var)
        self.n_obs = len(self._joinids)
        self._n_store_rows = n_rows
        self._local = threading.local()

    @property
    def obs_columns(self) -> list[str]:
        return list(self._obs_cols)

    def _read_obs(self, column):
        soma = _soma()
        with soma.Experiment.open(self.uri) as exp:
            table = exp.obs.read(coords=(self._joinids,), column_names=["soma_joinid", column]).concat()
        values = table.to_pandas().set_index("soma_joinid")[column]
        return values.reindex(self._joinids).array

    def store_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._joinids[rows]

    def _x(self):
        x = getattr(self._local, "x", None)
        if x is None:
            soma = _soma()
            x = soma.SparseNDArray.open(f"{self.uri}/ms/{self.measurement}/X/{self.layer}")
            self._local.x = x
        return x

    def read(self, rows: np.ndarray) -> CSR:
        ids = self.store_rows(np.asarray(rows, dtype=np.int64))
        n = len(ids)
        if n == 0:
            return CSR(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), self.n_vars)
        try:
            tables = self._x().read(coords=(ids,), result_order="row-major").tables().concat()
        except Exception as e:
            raise StoreError(f"{self.uri}: reading X/{self.layer} rows {ids[0]}…{ids[-1]} failed: {e}") from e
        dim0 = tables["soma_dim_0"].to_numpy()
        indptr = np.zeros(n + 1, np.int64)
        # rows arrive sorted: the position of each entry's row is found by one searchsorted
        np.cumsum(np.bincount(np.searchsorted(ids, dim0), minlength=n), out=indptr[1:])
        indices = tables["soma_dim_1"].to_numpy().astype(np.int32)
        data = tables["soma_data"].to_numpy()
        if data.dtype != np.float32:
            data = data.astype(np.float32)
        return CSR(indptr, indices, data, self.n_vars)
