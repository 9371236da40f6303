"""What lies at a uri (AnnData-Zarr store, SOMA experiment, Census release) and opening it as a Store."""

from __future__ import annotations

import os

from .census import is_census
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
    """'zarr', 'soma', 'h5ad' or 'anndata' (an object in memory) from what lies at `uri`;
    StoreError when it is none of them."""
    if is_anndata(uri):
        return "anndata"
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


def open_store(uri, *, obs_filter: str | None = None, layer: str | None = None, **kwargs) -> Store:
    """Open an AnnData `.zarr` store, an `.h5ad` file, an AnnData object (in memory or backed) or a SOMA
    experiment (detected), keeping cells matching obs_filter.

    obs_filter uses SOMA value_filter syntax (e.g. "tissue_general == 'blood' and is_primary_data == True"),
    evaluated by TileDB for SOMA and by pandas for Zarr; layer is the Zarr layer (default X) or the
    SOMA X layer (default 'raw'). kwargs: `measurement` for SOMA (default 'RNA'). A
    `census:<version>[/<organism>]` uri opens that CELLxGENE Census release (see loaders.census).
    """
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


def data_name(data) -> str:
    """What a run or an output records as its data: the path given, a backed AnnData's file, or a
    description of an AnnData in memory (which has no path to reopen)."""
    if not is_anndata(data):
        return str(data)
    from .anndata_store import memory_name

    return str(data.filename) if data.isbacked else memory_name(data)
