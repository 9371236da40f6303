"""What lies at a uri (AnnData-Zarr store, .h5ad file, SOMA experiment, Census release, several of them or
a collection manifest) or what an object is (an AnnData in memory or backed), and opening it as a Store."""

from __future__ import annotations

import os

from .census import is_census
from .collection import CollectionStore, is_manifest, member_filter, members_of, read_manifest
from .store import Store, StoreError


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_anndata(data) -> bool:
    """An AnnData object (in memory or backed), told apart from a path without importing anndata."""
    return all(hasattr(data, a) for a in ("obs", "var", "X", "isbacked"))


def _is_hdf5(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def detect_format(uri) -> str:
    """'zarr', 'soma', 'h5ad', 'anndata' (an object) or 'collection' (several uris, or a manifest) from
    what lies at `uri`; StoreError when it is none of them."""
    if isinstance(uri, list | tuple) and len(uri) == 1:
        uri = uri[0]
    if is_anndata(uri):
        return "anndata"
    if _several(uri) or is_manifest(uri):
        return "collection"
    uri = str(uri)
    if is_census(uri):
        return "soma"
    if _is_remote(uri):
        return "soma" if uri.startswith("tiledb://") else "zarr"
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    if not os.path.exists(path):
        raise StoreError(f"store {uri} does not exist")
    if os.path.exists(os.path.join(path, "zarr.json")) or os.path.exists(os.path.join(path, ".zgroup")):
        return "zarr"
    if os.path.exists(os.path.join(path, "__group")) or os.path.exists(os.path.join(path, "__tiledb_group.tdb")):
        return "soma"
    if os.path.isfile(path) and _is_hdf5(path):
        return "h5ad"
    raise StoreError(f"{uri} is neither an AnnData-Zarr store, an .h5ad file nor a TileDB-SOMA experiment")


def _several(data) -> bool:
    return isinstance(data, list | tuple) and len(data) > 1


def open_store(
    uri,
    *,
    obs_filter: str | None = None,
    layer: str | None = None,
    genes=None,
    gene_join: str | None = None,
    min_gene_overlap: float | None = None,
    gene_names=None,
    **kwargs,
) -> Store:
    """Open an AnnData `.zarr` store, an `.h5ad` file, an AnnData object (in memory or backed) or a SOMA
    experiment (detected), keeping cells matching obs_filter.

    obs_filter uses SOMA value_filter syntax (e.g. "tissue_general == 'blood' and is_primary_data == True"),
    evaluated by TileDB for SOMA and by loaders.filter_eval, with TileDB's logic, for the other formats; layer
    is the Zarr layer (default X) or the SOMA X layer (default 'raw', or the only one). kwargs: `measurement`
    for SOMA (default 'RNA', or the only one). A `census:<version>[/<organism>]` uri opens that CELLxGENE
    Census release (see loaders.census).
    Several uris, or a manifest (.toml/.json), open as one CollectionStore (see loaders.collection),
    whose genes are `genes` or, by `gene_join`, the stores' intersection or union (a store sharing
    less than `min_gene_overlap` of them is refused); `gene_names` (each of `genes`' feature name, a model's
    recorded ones) finds a gene in a store that lacks its id, as Store.gene_map's `names`; single stores ignore
    these four.
    """
    if isinstance(uri, Store):  # already open (a store of one's own making); its filter is its own
        if obs_filter or layer:
            raise StoreError(f"{uri.uri} is already open: obs_filter and layer apply when a store is opened")
        return uri
    if isinstance(uri, list | tuple) and len(uri) == 1:
        uri = uri[0]
    if _several(uri) or is_manifest(uri):
        return _collection(uri, obs_filter, layer, genes, gene_join, min_gene_overlap, gene_names, kwargs)
    # each backend is imported when its format is opened: tiledbsoma alone takes ~1 s to import
    if is_anndata(uri):
        from .anndata_store import AnnDataStore, H5adStore

        if not uri.isbacked:
            return AnnDataStore(uri, obs_filter=obs_filter, layer=layer)
        if uri.is_view:
            raise StoreError("a view of a backed AnnData cannot be streamed; open the file and pass obs_filter")
        return H5adStore(uri.filename, obs_filter=obs_filter, layer=layer)
    uri = str(uri)
    if is_census(uri):
        from .census import resolve
        from .soma_store import SomaStore

        exp_uri, config = resolve(uri)
        return SomaStore(exp_uri, obs_filter=obs_filter, layer=layer, tiledb_config=config, **kwargs)
    fmt = detect_format(uri)
    if fmt == "zarr":
        from .zarr_store import ZarrStore

        return ZarrStore(uri, obs_filter=obs_filter, layer=layer)
    if fmt == "h5ad":
        from .anndata_store import H5adStore

        return H5adStore(uri, obs_filter=obs_filter, layer=layer)
    from .soma_store import SomaStore

    return SomaStore(uri, obs_filter=obs_filter, layer=layer, **kwargs)


def _collection(data, obs_filter, layer, genes, gene_join, min_gene_overlap, gene_names, kwargs) -> CollectionStore:
    options = {}
    if is_manifest(data):
        members, options = read_manifest(data)
    elif any(is_anndata(d) or _several(d) or is_manifest(d) for d in data):
        raise StoreError("a collection is a list of store paths (or one manifest), not of objects or manifests")
    else:
        members = members_of(data)
    stores = [
        open_store(m.data, obs_filter=member_filter(m, obs_filter), layer=m.layer or layer, **kwargs) for m in members
    ]
    return CollectionStore(
        members, stores, uri=str(data) if is_manifest(data) else None,
        genes=genes if genes is not None else options.get("genes"),
        gene_names=gene_names if genes is not None else None,
        gene_join=gene_join or options.get("gene_join", "inner"),
        min_gene_overlap=min_gene_overlap or options.get("min_gene_overlap", 0.5),
    )  # fmt: skip


def data_name(data):
    """What a run or an output records as its data: the path given, made absolute so that the record reopens
    from any working directory (URIs and Census specs as given; a list of them for a collection), a backed
    AnnData's file, or a description of an AnnData in memory (which has no path to reopen)."""
    if isinstance(data, list | tuple):
        return [data_name(d) for d in data] if len(data) > 1 else data_name(data[0])
    if not is_anndata(data):
        return _absolute(str(data))
    from .anndata_store import memory_name

    return _absolute(str(data.filename)) if data.isbacked else memory_name(data)


def _absolute(uri: str) -> str:
    return os.path.abspath(uri) if is_local_path(uri) else uri


def is_local_path(uri) -> bool:
    """A path on this machine's file system, as opposed to a URI, a Census spec or an AnnData in memory's name."""
    uri = str(uri)
    return bool(uri) and not is_census(uri) and "://" not in uri and not in_memory_names(uri)


def in_memory_names(recorded) -> list[str]:
    """The names among data_name()'s value (one name, or a collection's list) that describe an AnnData in memory:
    data a run recorded but cannot reopen."""
    from .anndata_store import MEMORY_PREFIX

    names = list(recorded) if isinstance(recorded, list | tuple) else [recorded]
    return [name for name in names if isinstance(name, str) and name.startswith(MEMORY_PREFIX)]
