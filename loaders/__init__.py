"""Store-agnostic streaming of sparse counts from AnnData-Zarr stores and TileDB-SOMA experiments."""

from __future__ import annotations

import zarr

from .census import census_spec
from .csr import CSR
from .formats import data_name, detect_format, is_anndata, open_store
from .store import Store, StoreError, measured_panels

try:  # Rust codec pipeline: decodes a request's chunks in parallel, 2-4x zarr-python's own
    import zarrs  # noqa: F401

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
except ImportError:  # still correct with zarr's default pipeline, only slower
    pass


from .stream import Batch, CellStream

__all__ = [
    "open_store",
    "detect_format",
    "data_name",
    "is_anndata",
    "census_spec",
    "CellStream",
    "Batch",
    "Store",
    "measured_panels",
    "StoreError",
    "CSR",
]
