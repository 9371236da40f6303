"""What lies at a uri (AnnData-Zarr store, SOMA experiment, Census release) and opening it as a Store."""

from __future__ import annotations

import os

from .census import is_census
from .store import Store, StoreError


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def detect_format(uri: str) -> str:
    """'zarr' or 'soma' from what lies at `uri`; StoreError when it is neither."""
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
    if path.endswith(".h5ad"):
        raise StoreError(f"{uri} is an .h5ad file; convert it to a chunked Zarr store with `bigatlas prepare`")
    raise StoreError(f"{uri} is neither an AnnData-Zarr store nor a TileDB-SOMA experiment")


def open_store(uri, *, obs_filter: str | None = None, layer: str | None = None, **kwargs) -> Store:
    """Open an AnnData `.zarr` store or a SOMA experiment (detected), keeping cells matching obs_filter.

    obs_filter uses SOMA value_filter syntax (e.g. "tissue_general == 'blood' and is_primary_data == True"),
    evaluated by TileDB for SOMA and by pandas for Zarr; layer is the Zarr layer (default X) or the
    SOMA X layer (default 'raw'). kwargs: `measurement` for SOMA (default 'RNA'). A
    `census:<version>[/<organism>]` uri opens that CELLxGENE Census release (see loaders.census).
    """
    # each backend is imported when its format is opened: tiledbsoma alone takes ~1 s to import
    uri = str(uri)
    if is_census(uri):
        from .census import resolve
        from .soma_store import SomaStore

        exp_uri, config = resolve(uri)
        return SomaStore(exp_uri, obs_filter=obs_filter, layer=layer, tiledb_config=config, **kwargs)
    if detect_format(uri) == "zarr":
        from .zarr_store import ZarrStore

        return ZarrStore(uri, obs_filter=obs_filter, layer=layer)
    from .soma_store import SomaStore

    return SomaStore(uri, obs_filter=obs_filter, layer=layer, **kwargs)
