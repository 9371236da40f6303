"""Store-agnostic streaming of sparse counts from AnnData-Zarr stores and TileDB-SOMA experiments."""

from __future__ import annotations

import os

import zarr

from .census import census_spec
from .csr import CSR
from .formats import data_name, detect_format, in_memory_names, is_anndata, is_local_path, open_store
from .store import Store, StoreError, measured_panels

try:  # Rust codec pipeline: decodes a request's chunks in parallel, 2-4x zarr-python's own
    import zarrs  # noqa: F401

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    # its thread pool does not survive a fork: a forked child's first read waited on it forever, so a child
    # (e.g. of a multiprocessing pool) opens stores with zarr's own pipeline
    os.register_at_fork(
        after_in_child=lambda: zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"})
    )
except ImportError:  # still correct with zarr's default pipeline, only slower
    pass


from .stream import Batch, CellStream

__all__ = [
    "open_store",
    "detect_format",
    "data_name",
    "is_local_path",
    "in_memory_names",
    "is_anndata",
    "census_spec",
    "CellStream",
    "Batch",
    "Store",
    "measured_panels",
    "StoreError",
    "CSR",
]
