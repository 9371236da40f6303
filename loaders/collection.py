"""Several stores as one data set, nothing copied: rows are the stores' rows in order, genes are
aligned by the one gene rule (Store.gene_map: feature id, then name), obs keys are harmonised (mapped
to another column per store, or filled with a constant), and a `source` column names each cell's store.

The epoch plan cuts blocks at store boundaries (`segments`), so a block is one range of one store;
a read request asks each store it touches once. A collection is given as several data arguments
(`--data a.zarr b.h5ad census:…`) or as a manifest (TOML or JSON) with per-store settings:

    gene_join = "inner"                 # or "outer": the union, zero-filled where a store lacks a gene
    [[store]]
    data = "a.zarr"                     # relative to the manifest's folder
    name = "atlas_a"                    # the cell's `source` (default: the file name)
    obs_filter = "is_primary_data == True"
    columns = { batch = "study_id" }    # collection key = this store's column
    [[store]]
    data = "b.zarr"
    constants = { batch = "atlas_b" }   # collection key = one value for all of this store's cells
"""

from __future__ import annotations

import copy
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .csr import CSR, concat, empty, select_columns
from .store import Store, StoreError, _names_list, columns_like, compact_codes, stable_id

SOURCE = "source"
JOINS = ("inner", "outer")
MANIFEST_SUFFIXES = (".toml", ".json")


@dataclass(frozen=True)
class Member:
    data: str  # what open_store takes
    name: str  # the cells' `source`
    obs_filter: str | None = None
    layer: str | None = None
    columns: dict = field(default_factory=dict)  # collection key → this store's column
    constants: dict = field(default_factory=dict)  # collection key → one value for every cell


def is_manifest(data) -> bool:
    return isinstance(data, str | Path) and str(data).endswith(MANIFEST_SUFFIXES) and Path(data).is_file()


def _name(uri: str) -> str:
    p = Path(uri.rstrip("/"))
    return p.name.split(".")[0] if "://" not in uri and not uri.startswith("census:") else uri


def members_of(uris) -> list[Member]:
    """Members for plain data arguments, named by file (a repeated name gets #2, #3, …)."""
    out, seen = [], {}
    for uri in map(str, uris):
        name = _name(uri)
        seen[name] = seen.get(name, 0) + 1
        out.append(Member(uri, name if seen[name] == 1 else f"{name}#{seen[name]}"))
    return out


def read_manifest(path) -> tuple[list[Member], dict]:
    """(members, options) of a manifest: options gene_join, genes, min_gene_overlap when given."""
    path = Path(path)
    try:
        text = path.read_text()
        spec = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:
        raise StoreError(f"collection manifest {path} cannot be read: {e}") from None
    stores = spec.pop("store", None) or spec.pop("stores", None)
    if not stores:
        raise StoreError(f"collection manifest {path} lists no [[store]]")
    options = {k: spec.pop(k) for k in ("gene_join", "genes", "min_gene_overlap") if k in spec}
    if spec:
        raise StoreError(f"collection manifest {path}: unknown setting(s) {sorted(spec)}")
    members = []
    for i, s in enumerate(stores):
        s = dict(s)
        if "data" not in s:
            raise StoreError(f"collection manifest {path}: store {i + 1} has no data")
        data = str(s.pop("data"))
        if "://" not in data and not data.startswith("census:") and not Path(data).is_absolute():
            data = str(path.parent / data)
        name = str(s.pop("name", "")) or members_of([data])[0].name
        fields_ = {k: s.pop(k) for k in ("obs_filter", "layer") if k in s}
        m = Member(data, name, columns=dict(s.pop("columns", {})), constants=dict(s.pop("constants", {})), **fields_)
        if s:
            raise StoreError(f"collection manifest {path}: store {name!r} has unknown setting(s) {sorted(s)}")
        members.append(m)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise StoreError(f"collection manifest {path}: store names repeat ({_names_list(names)})")
    return members, options


def member_filter(member: Member, obs_filter: str | None) -> str | None:
    """The member's own filter and the collection's (which applies to every store, on its own columns)."""
    a, b = member.obs_filter, obs_filter
    return f"({a}) and ({b})" if a and b else (a or b)


class CollectionStore(Store):
    def __init__(
        self,
        members: list[Member],
        stores: list[Store],
        *,
        genes=None,
        gene_join: str = "inner",
        min_gene_overlap: float = 0.5,
        uri: str | None = None,
        gene_names=None,
    ):
        """`stores[i]` is members[i] opened (formats.open_store does it, with member_filter)."""
        if gene_join not in JOINS:
            raise StoreError(f"gene_join must be one of {', '.join(JOINS)}, not {gene_join!r}")
        if not members:
            raise StoreError("a collection needs at least one store")
        self.members = list(members)
        self.uri = uri or " + ".join(m.data for m in self.members)
        self.stores = list(stores)
        self.gene_join = gene_join
        ids, names = self._genes(genes, gene_names, gene_join, min_gene_overlap)
        missing = "error" if gene_join == "inner" else "zero-fill"
        self._colmaps = [
            self._member_colmap(s, ids, names, missing, min_gene_overlap, m.name)
            for s, m in zip(self.stores, self.members)
        ]
        self.n_vars = len(ids)
        # a store whose columns already are the collection's genes, in order, needs no column pass
        self._identity = [
            s.n_vars == len(ids) and np.array_equal(cm, np.arange(len(ids)))
            for s, cm in zip(self.stores, self._colmaps)
        ]
        super().__init__(pd.DataFrame({"feature_id": ids, "feature_name": names}, index=pd.Index(ids)))
        self.segments = [int(s.n_obs) for s in self.stores]
        self._offsets = np.concatenate([[0], np.cumsum(self.segments)]).astype(np.int64)
        self.n_obs = int(self._offsets[-1])
        self.block_rows = min(s.block_rows for s in self.stores)
        self.blocks_per_request = min(s.blocks_per_request for s in self.stores)
        self._check_names()

    # -- genes ------------------------------------------------------------------------------------
    def _genes(self, genes, gene_names, join: str, min_overlap: float) -> tuple[list[str], list[str]]:
        if genes is not None:  # a model's: its ids, and the feature names it recorded ("" where none)
            genes = [str(g) for g in genes]
            names = [str(n) or g for g, n in zip(genes, gene_names, strict=True)] if gene_names else genes
            return genes, names
        first = self.stores[0]
        ids, names = list(first.var_ids), list(first.var_names)
        if join == "outer":  # the first store's genes, then each later store's new ones
            known = {stable_id(i) for i in ids} | set(names)
            for s in self.stores[1:]:
                for i, n in zip(s.var_ids, s.var_names):
                    if stable_id(i) not in known and n not in known:
                        ids.append(str(i))
                        names.append(str(n))
                        known.update((stable_id(i), n))
            return ids, names
        keep = np.ones(len(ids), bool)
        stable = [stable_id(i) for i in ids]  # a feature id meets its other Ensembl versions, as in Store.gene_map
        for s, m in zip(self.stores[1:], self.members[1:]):
            has = np.isin(stable, [stable_id(i) for i in s.var_ids]) | np.isin(names, s.var_names)
            if has.sum() < min_overlap * len(ids):  # the intersection would lose most genes
                raise StoreError(
                    f"store {m.name} ({m.data}) shares {int(has.sum())} genes with {self.members[0].name} "
                    f"({len(ids)} genes; it has {s.n_vars}), below the minimum overlap {min_overlap:.0%}; "
                    "pass --genes, or gene_join 'outer' to zero-fill"
                )
            keep &= has
        if not keep.any():
            raise StoreError(f"the stores of {self.uri} share no gene")
        return [ids[i] for i in np.flatnonzero(keep)], [names[i] for i in np.flatnonzero(keep)]

    @staticmethod
    def _member_colmap(store: Store, ids, names, missing, min_overlap, name) -> np.ndarray:
        aliases = [n if n != i else "" for i, n in zip(ids, names)]  # by feature id, else by name (gene_map's rule)
        try:
            return store.gene_map(ids, missing=missing, min_overlap=min_overlap, what="collection's", names=aliases)
        except StoreError as e:
            raise StoreError(f"store {name}: {e}") from None

    def summary(self) -> list[str]:
        """Lines for the start of a run: cells and genes per store."""
        lines = [f"collection of {len(self.stores)} stores, {self.n_vars} genes ({self.gene_join} join):"]
        for m, s, cm in zip(self.members, self.stores, self._colmaps):
            lines.append(
                f"  {m.name}: {s.n_obs:,} cells, {int((cm >= 0).sum()):,} of the {self.n_vars:,} genes "
                f"(of its {s.n_vars:,}) — {m.data}"
            )
        return lines

    # -- obs --------------------------------------------------------------------------------------
    def _available(self, i: int) -> set[str]:
        m = self.members[i]
        return set(self.stores[i].obs_columns) | set(m.columns) | set(m.constants)

    def _check_names(self) -> None:
        for m, s in zip(self.members, self.stores):
            for key, col in m.columns.items():
                if col not in s.obs_columns:
                    raise StoreError(
                        f"store {m.name}: column {col!r} (mapped to {key!r}) not in {m.data} "
                        f"({columns_like(col, s.obs_columns)})"
                    )

    @property
    def obs_columns(self) -> list[str]:
        common = set.intersection(*(self._available(i) for i in range(len(self.stores))))
        first = [c for c in self.stores[0].obs_columns if c in common]
        return [*first, *sorted(common - set(first) - {SOURCE}), SOURCE]

    def _check_column(self, column: str) -> None:
        if column == SOURCE:
            return
        for i, m in enumerate(self.members):
            if column not in self._available(i):
                raise StoreError(
                    f"obs column {column!r} not in store {m.name} ({m.data}; "
                    f"{columns_like(column, self.stores[i].obs_columns)}); map it to one of its columns or fill it "
                    "with a constant in a collection manifest (columns = {...} / constants = {...})"
                )

    def _member_codes(self, i: int, column: str) -> tuple[np.ndarray, np.ndarray]:
        m, s = self.members[i], self.stores[i]
        if column in m.constants:
            return np.zeros(s.n_obs, np.int8), np.asarray([str(m.constants[column])])
        return s.obs_codes(m.columns.get(column, column))

    def obs_codes(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """Codes over the union of the stores' categories (sorted), without a string per cell."""
        self._check_column(column)
        if column not in self._codes_cache:
            if column == SOURCE:
                cats = np.asarray([m.name for m in self.members])
                codes = compact_codes(np.repeat(np.arange(len(cats)), self.segments), len(cats))
            else:
                parts = [self._member_codes(i, column) for i in range(len(self.stores))]
                cats = np.unique(np.concatenate([c.astype(str) for _, c in parts]))
                codes = compact_codes(
                    np.concatenate(
                        [np.where(c >= 0, np.searchsorted(cats, k.astype(str))[np.maximum(c, 0)], -1) for c, k in parts]
                    ),
                    len(cats),
                )
            self._codes_cache[column] = (codes, cats)
        return self._codes_cache[column]

    def _read_obs(self, column):
        if column == SOURCE or any(column in m.constants for m in self.members):
            codes, cats = self.obs_codes(column)
            return pd.Categorical.from_codes(codes, categories=cats)
        parts = [
            self.stores[i].obs_values(self.members[i].columns.get(column, column)) for i in range(len(self.stores))
        ]
        if all(np.issubdtype(np.asarray(p).dtype, np.number) or np.asarray(p).dtype == bool for p in parts):
            return np.concatenate([np.asarray(p) for p in parts])
        codes, cats = self.obs_codes(column)
        return pd.Categorical.from_codes(codes, categories=cats)

    # -- rows -------------------------------------------------------------------------------------
    def _split(self, rows: np.ndarray):
        """(store index, that store's positions, slice of `rows`) for each store `rows` touch."""
        rows = np.asarray(rows, dtype=np.int64)
        cuts = np.searchsorted(rows, self._offsets)
        for i in range(len(self.stores)):
            lo, hi = cuts[i], cuts[i + 1]
            if hi > lo:
                yield i, rows[lo:hi] - self._offsets[i], slice(lo, hi)

    def gene_panels(self) -> np.ndarray | None:
        panels = np.zeros((len(self.stores), self.n_vars), dtype=bool)
        for panel, cm in zip(panels, self._colmaps):
            panel[cm[cm >= 0]] = True
        return None if panels.all() else panels

    def panel_codes(self, rows: np.ndarray) -> np.ndarray:
        return self.source_codes(rows).astype(np.int64)

    def locate(self, position: int) -> tuple[str, int, tuple[str, ...]]:
        i = int(self.source_codes(np.array([position]))[0])
        return self.stores[i].locate(int(position) - int(self._offsets[i]))

    def source_codes(self, rows: np.ndarray) -> np.ndarray:
        """Index of each position's store (its `source` code)."""
        return np.searchsorted(self._offsets, np.asarray(rows, dtype=np.int64), side="right") - 1

    def read(self, rows: np.ndarray) -> CSR:
        touched = list(self._split(rows))
        if len(touched) > 1 and all(self._identity[i] for i, _, _ in touched):
            first = self.stores[touched[0][0]]
            if all(getattr(first, "same_layout", lambda _: False)(self.stores[i]) for i, _, _ in touched):
                from .zarr_store import read_many  # one decode call for every store the request touches

                return read_many([(self.stores[i], local) for i, local, _ in touched])
        parts = []
        for i, local, _ in touched:
            m = self.stores[i].read(local)
            parts.append(m if self._identity[i] else select_columns(m, self._colmaps[i], self.n_vars))
        if not parts:
            return empty(self.n_vars)
        return concat(parts) if len(parts) > 1 else parts[0]

    def cell_ids(self, rows: np.ndarray) -> np.ndarray:
        """Each position's row id in its own store, and that store's index above bit 40."""
        return self.store_rows(rows) + (self.source_codes(rows).astype(np.int64) << 40)

    def store_rows(self, rows: np.ndarray) -> np.ndarray:
        """Each position's row id in its own store (see source_codes for which store)."""
        out = np.empty(len(rows), np.int64)
        for i, local, where in self._split(rows):
            out[where] = self.stores[i].store_rows(local)
        return out

    def obs_names(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), object)
        for i, local, where in self._split(rows):
            out[where] = self.stores[i].obs_names(local)
        return out

    def restrict_columns(self, columns: np.ndarray) -> None:
        wanted = np.zeros(self.n_vars, bool)
        wanted[np.asarray(columns, dtype=np.int64)] = True
        for s, cm in zip(self.stores, self._colmaps):
            s.restrict_columns(np.flatnonzero((cm >= 0) & wanted[np.maximum(cm, 0)]))

    def reader(self) -> CollectionStore:
        view = copy.copy(self)
        view.stores = [s.reader() for s in self.stores]
        return view
