"""Where `bigatlas prepare` reads cells from: a store (AnnData-Zarr, SOMA, Census slice) or an `.h5ad`
opened through h5py, as scipy CSR row blocks by position after an obs_filter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders import StoreError, open_store
from loaders.csr import select_columns
from loaders.store import eval_filter


class Source:
    """Rows of a store or a backed .h5ad by position (after obs_filter), as scipy CSR blocks."""

    n_obs: int
    var: pd.DataFrame

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        raise NotImplementedError

    def obs(self, column: str) -> pd.Categorical:
        raise NotImplementedError

    def obs_frame(self) -> pd.DataFrame:
        raise NotImplementedError


class StoreSource(Source):
    def __init__(self, uri: str, obs_filter=None, layer=None, genes=None):
        self.store = s = open_store(uri, obs_filter=obs_filter, layer=layer)
        self._colmap = None
        self.var = s.var
        if genes is not None:  # only these genes, in this order; SOMA then reads only their columns
            self._colmap = s.gene_map(genes)
            kept = np.flatnonzero(self._colmap >= 0)
            s.restrict_columns(kept)
            self.var = s.var.iloc[kept[np.argsort(self._colmap[kept])]]
        self.n_obs = s.n_obs

    def read(self, lo, hi):
        m = self.store.read(np.arange(lo, hi))
        if self._colmap is not None:
            m = select_columns(m, self._colmap, len(self.var))
        return m.to_scipy()

    def obs(self, column):
        codes, cats = self.store.obs_codes(column)
        return pd.Categorical.from_codes(codes, categories=cats)

    def obs_frame(self):
        s = self.store
        frame = pd.DataFrame({c: s.obs_values(c) for c in s.obs_columns})
        return frame.set_axis(pd.Index(s.obs_names(np.arange(s.n_obs)).astype(str)))


class H5adSource(Source):
    """An .h5ad through h5py: obs/var in memory (small), X (or a layer, or raw/X) read by row block."""

    def __init__(self, path: str, obs_filter=None, layer=None):
        import h5py
        from anndata.io import read_elem, sparse_dataset

        self.path = str(path)
        self._file = h5py.File(self.path, "r")
        f = self._file
        key = {None: "X", "X": "X", "raw": "raw/X"}.get(layer, f"layers/{layer}")
        if key not in f:
            have = ["X"] + (["raw"] if "raw" in f else []) + list(f["layers"].keys() if "layers" in f else [])
            raise StoreError(f"{self.path} has no {key} (have: {', '.join(have)})")
        node = f[key]
        enc = node.attrs.get("encoding-type", "array")
        self._x = sparse_dataset(node) if enc in ("csr_matrix", "csc_matrix") else node
        if enc == "csc_matrix":
            raise StoreError(
                f"{self.path}:{key} is CSC; rows cannot be read in blocks without loading it "
                "(write it as CSR, e.g. adata.X = adata.X.tocsr())"
            )
        self._obs_all = read_elem(f["obs"])
        self.var = read_elem(f["raw/var" if key == "raw/X" else "var"])
        self._rows = None
        if obs_filter:
            self._rows = eval_filter(obs_filter, self._obs_all.columns, lambda c: self._obs_all[c].array, self.path)
        self.n_obs = len(self._obs_all) if self._rows is None else len(self._rows)
        if self.n_obs == 0:
            raise StoreError(f"{self.path}: 0 cells{' match obs_filter ' + repr(obs_filter) if obs_filter else ''}")

    def read(self, lo, hi):
        sel = slice(lo, hi) if self._rows is None else self._rows[lo:hi]
        if self._rows is not None and len(sel) and sel[-1] - sel[0] == len(sel) - 1:
            sel = slice(int(sel[0]), int(sel[-1]) + 1)  # contiguous: one slice, not a fancy index
        block = self._x[sel]
        return sp.csr_matrix(block, dtype=np.float32)

    def obs(self, column):
        if column not in self._obs_all.columns:
            raise StoreError(f"obs column {column!r} not in {self.path} (have: {', '.join(self._obs_all.columns)})")
        values = self._obs_all[column]
        values = values if self._rows is None else values.iloc[self._rows]
        return pd.Categorical(
            values.astype(str).where(values.notna(), None)
            if not isinstance(values.dtype, pd.CategoricalDtype)
            else values
        )

    def obs_frame(self):
        return self._obs_all if self._rows is None else self._obs_all.iloc[self._rows]


def feature_ids(var: pd.DataFrame) -> np.ndarray:
    """Gene ids as `--genes` matches them: the feature_id column, else the var index."""
    return np.asarray((var["feature_id"] if "feature_id" in var else var.index).astype(str))


def open_source(data: str, obs_filter=None, layer=None, genes=None) -> Source:
    if str(data).endswith(".h5ad"):
        if genes is not None:
            raise StoreError("--genes with an .h5ad input: convert first, then prepare the Zarr store with --genes")
        return H5adSource(data, obs_filter, layer)
    return StoreSource(str(data), obs_filter, layer, genes)
