"""Where `bigatlas prepare` reads cells from: any store open_store takes (AnnData-Zarr, .h5ad through
h5py, an AnnData object, SOMA, a Census slice), as scipy CSR row blocks by position after an obs_filter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders import open_store
from loaders.csr import select_columns


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


# stores opened in this process by their recipe: a source shipped to a dask.distributed worker (as
# its recipe, see StoreSource.__getstate__) opens its store once per worker process, not per task
_OPENED: dict = {}


class StoreSource(Source):
    """A store's rows as scipy blocks. Pickles as its recipe (uri, filter, layer, genes), so a dask
    worker process reopens it (once) instead of receiving open handles."""

    def __init__(self, uri, obs_filter=None, layer=None, genes=None):
        self._recipe = (uri, obs_filter, layer, None if genes is None else tuple(genes))
        self._open()

    def __getstate__(self) -> dict:
        return {"recipe": self._recipe}

    def __setstate__(self, state: dict) -> None:
        self._recipe = state["recipe"]
        key = self._recipe if isinstance(self._recipe[0], str | tuple) else None
        if key is not None and key in _OPENED:
            self.__dict__.update(_OPENED[key].__dict__)
            return
        self._open()
        if key is not None:
            _OPENED[key] = self

    def _open(self) -> None:
        uri, obs_filter, layer, genes = self._recipe
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

    def batch_codes(self, column: str | None) -> np.ndarray:
        """Codes of the batch column (all 0 without one), read where the task runs (cached by the store)."""
        return np.zeros(self.n_obs, np.int64) if column is None else self.store.obs_codes(column)[0].astype(np.int64)

    def obs_frame(self):
        s = self.store
        frame = pd.DataFrame({c: s.obs_values(c) for c in s.obs_columns})
        return frame.set_axis(pd.Index(s.obs_names(np.arange(s.n_obs)).astype(str)))


def feature_ids(var: pd.DataFrame) -> np.ndarray:
    """Gene ids as `--genes` matches them: the feature_id column, else the var index."""
    return np.asarray((var["feature_id"] if "feature_id" in var else var.index).astype(str))


def open_source(data, obs_filter=None, layer=None, genes=None) -> Source:
    """Any data open_store takes (a store path, an .h5ad, an AnnData object) as a Source."""
    return StoreSource(data, obs_filter, layer, genes)
