"""Reading what `bigatlas embed` wrote (AnnData-Zarr group or SOMA experiment), by position.

Positions are those of the store the embedding was made from (0..n_obs-1 after its obs_filter);
the embedding's own metadata names that store, filter and run, so readers need only the path.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import zarr


class EmbeddingError(ValueError):
    """An embedding output that is missing, incomplete or from another store."""


class Embedding:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise EmbeddingError(f"embedding {self.path} does not exist")
        self.format = "zarr" if (self.path / "zarr.json").exists() else "soma"
        self.meta = self._read_meta()
        if not self.meta.get("complete"):
            raise EmbeddingError(
                f"embedding {self.path} is incomplete (interrupted?); rerun `bigatlas embed` "
                "with the same flags to finish it"
            )
        self.n_obs = int(self.meta["n_obs"])

    def _soma_experiment(self):
        """The SOMA output, opened on the process's TileDB context."""
        from loaders.soma_store import open_experiment

        return open_experiment(self.path)

    def _read_meta(self) -> dict:
        try:
            if self.format == "zarr":
                return dict(zarr.open_group(str(self.path), mode="r").attrs["bigatlas"])
            with self._soma_experiment() as exp:
                return json.loads(exp.metadata["bigatlas"])
        except Exception as e:
            raise EmbeddingError(f"{self.path} is not a bigatlas embedding ({type(e).__name__}: {e})") from None

    def has_obsm(self, name: str) -> bool:
        if self.format == "zarr":
            return name in zarr.open_group(str(self.path), mode="r")["obsm"]
        with self._soma_experiment() as exp:
            return name in exp.ms["RNA"].obsm

    @property
    def label_keys(self) -> list[str]:
        """Label keys with predictions (`<key>_pred` columns)."""
        if self.format == "zarr":
            cols = zarr.open_group(str(self.path), mode="r")["obs"].attrs["column-order"]
        else:
            with self._soma_experiment() as exp:
                cols = [f.name for f in exp.obs.schema]
        return [c[: -len("_pred")] for c in cols if c.endswith("_pred")]

    def latents(self, positions: np.ndarray, row_ids: np.ndarray, name: str = "X_bigatlas") -> np.ndarray:
        """Rows of obsm `name` (latent vectors by default) of ascending `positions` (Zarr) / store row ids
        `row_ids` (SOMA)."""
        if self.format == "zarr":
            arr = zarr.open_group(str(self.path), mode="r")[f"obsm/{name}"]
            return np.asarray(arr.get_orthogonal_selection((np.asarray(positions), slice(None))), np.float32)
        with self._soma_experiment() as exp:
            x = exp.ms["RNA"].obsm[name]
            t = x.read(coords=(np.asarray(row_ids, np.int64),)).tables().concat()
            d = int(x.shape[1])
        out = np.full((len(row_ids), d), np.nan, np.float32)
        rows = np.searchsorted(row_ids, t["soma_dim_0"].to_numpy())
        out[rows, t["soma_dim_1"].to_numpy()] = t["soma_data"].to_numpy()
        return out

    def row_ids(self, positions: np.ndarray) -> np.ndarray:
        """The source store's row ids recorded for `positions` (Zarr outputs; checks alignment)."""
        obs = zarr.open_group(str(self.path), mode="r")["obs"]
        ids = obs["bigatlas_row"] if "bigatlas_row" in obs else obs["row"]  # "row" in outputs of version 1
        return np.asarray(ids.get_orthogonal_selection(np.asarray(positions)), np.int64)

    def predictions(self, key: str, row_ids: np.ndarray | None = None) -> pd.Categorical:
        """Predicted labels of every cell in position order (SOMA: ordered by `row_ids`)."""
        return self.column(f"{key}_pred", row_ids)

    def has_column(self, name: str) -> bool:
        if self.format == "zarr":
            return name in zarr.open_group(str(self.path), mode="r")["obs"].attrs["column-order"]
        with self._soma_experiment() as exp:
            return name in [f.name for f in exp.obs.schema]

    def column(self, name: str, row_ids: np.ndarray | None = None):
        """An obs column of every cell in position order (SOMA: ordered by `row_ids`): a Categorical for
        labels, a numpy array for numbers and flags."""
        if self.format == "zarr":
            from anndata.io import read_elem

            value = read_elem(zarr.open_group(str(self.path), mode="r")[f"obs/{name}"])
            return pd.Categorical(value) if isinstance(value, pd.Categorical) else np.asarray(value)
        import pyarrow as pa

        with self._soma_experiment() as exp:
            t = exp.obs.read(column_names=["soma_joinid", name]).concat()
        joinids = t["soma_joinid"].to_numpy()
        order = np.argsort(joinids)
        at = np.searchsorted(joinids, row_ids, sorter=order)
        found = order[np.minimum(at, len(order) - 1)]
        hit = joinids[found] == row_ids
        col = t[name].combine_chunks()
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            # dictionary-encoded in Arrow: integer codes, never one Python string per cell
            col = col.dictionary_encode()
            codes = col.indices.fill_null(-1).to_numpy().astype(np.int64)
            codes = np.where(hit, codes[found], -1)
            return pd.Categorical.from_codes(codes, categories=pd.Index(col.dictionary.to_pylist()).astype(str))
        values = col.to_numpy(zero_copy_only=False)
        return np.where(hit, values[found], np.zeros(1, values.dtype))


def recorded_data(value):
    """The data an embedding's metadata names: a path, or a collection's list of paths (recorded as the list's
    text before 2026-12, read back as the list)."""
    if isinstance(value, str) and value.startswith("['"):
        return ast.literal_eval(value)
    return value


def open_embedded(emb_path, data=None, obs_filter=None):
    """(Embedding, the store it was made from, data, obs_filter): data and obs_filter default to those the
    embedding records; a store with another number of cells is refused."""
    from loaders import in_memory_names, open_store

    emb = Embedding(emb_path)
    data = data or recorded_data(emb.meta["data"])
    in_memory = in_memory_names(data)
    if in_memory:  # embedded from an object in memory: nothing to reopen
        raise EmbeddingError(f"{emb.path} was embedded from an {' and an '.join(in_memory)}; pass its file with --data")
    obs_filter = obs_filter if obs_filter is not None else emb.meta.get("obs_filter")
    store = open_store(data, obs_filter=obs_filter)
    if store.n_obs != emb.n_obs:
        raise EmbeddingError(
            f"embedding {emb.path} has {emb.n_obs} cells but {data} "
            f"(obs_filter {obs_filter!r}) has {store.n_obs}; pass the data and filter it was made from"
        )
    return emb, store, data, obs_filter


def latents_of(emb: Embedding, store, positions: np.ndarray, what: str) -> np.ndarray:
    """Latents of ascending `positions` of `store` (the one open_embedded gave), refused where the embedding's
    rows are other cells or a latent is missing; `what` names the cells in that error."""
    rows = store.store_rows(positions)
    if emb.format == "zarr" and not np.array_equal(emb.row_ids(positions), rows):
        raise EmbeddingError(f"embedding {emb.path} rows do not match {store.uri}: it was made from other cells")
    z = emb.latents(positions, rows)
    if not np.isfinite(z).all():
        raise EmbeddingError(f"embedding {emb.path} has missing or non-finite latents for {what}")
    return z
