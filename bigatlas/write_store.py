"""Streamed writers for the two store formats bigatlas produces (synth, prepare).

Both take CSR row chunks in order and never hold more than one chunk plus one storage chunk.
Zarr output is an AnnData store (format v3) with the fast layout of docs/design.md ("Storage layout"): blosc-lz4 + byte
shuffle, int32 indices, element chunks sized to ~a few hundred cells. It is written under
`<path>.partial` and renamed into place only when complete, so a killed writer never leaves
something that looks like a finished store (on object stores, where rename is a copy, the absence
of `<path>/zarr.json` until the end plays that role).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from .faults import Faults
from .lock import OutputLock

# 2**15 elements ≈ 50 cells at 650 nonzeros; blocks of a few chunks waste < one chunk of decode.
DEFAULT_CHUNK_ELEMS = 1 << 15


def index_dtype_for(n_vars: int):
    """int32 column indices (int64 past 2**31 genes), as scipy makes them: anndata reads a store's index dtypes as
    they are, and scipy and scikit-learn take only int32 / int64 indices alike with the indptr (the int16 indices
    and int64 indptr that stores written here had made scanpy's PCA fail with "ambiguous argument types" and
    scipy's reversed column slice crash). Byte shuffle compresses the zero bytes away (the indices on disk 1.008x
    the int16 ones), and the loader widened them to int32 after each read anyway (python -m bench.index_dtype)."""
    return np.int32 if n_vars <= np.iinfo(np.int32).max else np.int64


def _compressor(dtype) -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle, typesize=np.dtype(dtype).itemsize)


def _prepare_target(path: Path, overwrite: bool) -> Path:
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    return partial


def _commit(partial: Path, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)


def _plain_strings(df: pd.DataFrame) -> pd.DataFrame:
    """obs/var with pandas' string dtype (the default from pandas 3) as object columns and categories: written
    as anndata's plain string arrays, which every anndata reads (anndata 0.12 refuses the nullable-string
    encoding unless a setting opts in, and versions before 0.11 cannot read it)."""

    def plain(col: pd.Series) -> pd.Series:
        if isinstance(col.dtype, pd.CategoricalDtype):
            cats = col.cat.categories
            return col.cat.rename_categories(pd.Index(cats, dtype=object)) if _is_str(cats.dtype) else col
        return col.astype(object) if _is_str(col.dtype) else col

    out = df.copy(deep=False)
    for col in out.columns:
        out[col] = plain(out[col])
    if _is_str(out.index.dtype):
        out.index = pd.Index(out.index, dtype=object, name=out.index.name)
    return out


def _is_str(dtype) -> bool:
    return isinstance(dtype, pd.StringDtype)


def _writes(method):
    """A write of the store failing with an OSError (a full disk, an I/O error) becomes one error naming
    the store; errors of whatever feeds the writer (a source's reads) pass through unchanged."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            raise OSError(e.errno, f"writing {self.path} failed ({e.strerror or e}); nothing was kept") from None

    return wrapper


# single-file formats: a store is a folder, and one named so is one their readers cannot open
FILE_SUFFIXES = (".h5ad", ".h5", ".hdf5", ".loom", ".csv", ".tsv", ".parquet", ".mtx", ".npz", ".npy", ".rds", ".gz")


def check_folder_name(path, what: str) -> None:
    """Refuse to write the store `what` (a folder) under a name that says it is a single file: read_h5ad(...) of an
    'out.h5ad' that is an AnnData-Zarr folder fails with h5py's message, not ours."""
    path = Path(path)
    if path.suffix.lower() in FILE_SUFFIXES:
        raise ValueError(
            f"{path}: {what} is a folder (AnnData-Zarr or SOMA, written in chunks), not a {path.suffix} file; name it "
            f"{path.with_suffix('.zarr').name} (anndata.read_zarr opens it, and its write_h5ad() makes an .h5ad)"
        )


class _PartialStore:
    """A store written under `<path>.partial`; finish() renames it into place, an exception inside
    the `with` block removes it. One writer per output: a second one (another `synth` or `prepare
    --convert` to the same path) is refused while the first holds `<path>.lock`; it would delete the
    first's `.partial` and both would write into one folder."""

    def __init__(self, path, overwrite: bool):
        self.path = Path(path)
        check_folder_name(self.path, "the store")
        self._lock = OutputLock(self.path.with_name(self.path.name + ".lock"), f"output {self.path}")
        try:
            self.partial = _prepare_target(self.path, overwrite)
        except BaseException:
            self._lock.release()
            raise
        self._faults, self._appends = Faults(), 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            if exc_type is not None and self.partial.exists():
                shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self._lock.release()
        return False

    def _count_append(self) -> None:
        """Each append is a step for injected write faults (tests)."""
        self._appends += 1
        self._faults.io("store_write", self._appends, self.partial)


class _Appender:
    """Appends to a 1-D zarr array, writing whole chunks only (no read-modify-write)."""

    def __init__(self, arr: zarr.Array):
        # sharded arrays: whole shards only (a partial shard would be rewritten on every append)
        self.arr, self.chunk = arr, (arr.shards or arr.chunks)[0]
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def push(self, values: np.ndarray) -> None:
        self.buf.append(values)
        self.buffered += len(values)
        if self.buffered >= self.chunk:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buffered:
            return
        data = np.concatenate(self.buf)
        n = len(data) if final else (len(data) // self.chunk) * self.chunk
        self.arr.resize((self.written + n,))
        self.arr[self.written : self.written + n] = data[:n]
        self.written += n
        rest = data[n:]
        self.buf, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        self._flush(final=True)


class ZarrWriter(_PartialStore):
    """`with ZarrWriter(path, n_vars) as w: w.append(indptr, indices, data) …; w.finish(obs, var)`."""

    def __init__(
        self,
        path,
        n_vars: int,
        *,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        shard_elems: int | None = None,
        overwrite: bool = False,
    ):
        """shard_elems: group chunks into shards of this many elements (a multiple of chunk_elems):
        far fewer files on object stores and file systems with per-file costs, same partial reads."""
        super().__init__(path, overwrite)
        if shard_elems is not None and (shard_elems < chunk_elems or shard_elems % chunk_elems):
            raise ValueError(f"shard_elems {shard_elems} must be a multiple of chunk_elems {chunk_elems}")
        shards = (shard_elems,) if shard_elems else None
        self.n_vars = n_vars
        self.root = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        x = self.root.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        self._x = x
        idx_dtype = index_dtype_for(n_vars)
        self._data = _Appender(
            x.create_array(
                "data",
                shape=(0,),
                chunks=(chunk_elems,),
                shards=shards,
                dtype=np.float32,
                compressors=_compressor(np.float32),
            )
        )
        self._indices = _Appender(
            x.create_array(
                "indices",
                shape=(0,),
                chunks=(chunk_elems,),
                shards=shards,
                dtype=idx_dtype,
                compressors=_compressor(idx_dtype),
            )
        )
        self._indptr = [np.zeros(1, np.int64)]
        self.n_obs = 0
        self.nnz = 0

    @_writes
    def append(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        self._count_append()
        self._data.push(np.asarray(data, dtype=np.float32))
        self._indices.push(np.asarray(indices).astype(self._indices.arr.dtype, copy=False))
        self._indptr.append(np.asarray(indptr[1:], dtype=np.int64) + self.nnz)
        self.nnz += int(indptr[-1])
        self.n_obs += len(indptr) - 1

    @_writes
    def finish(self, obs: pd.DataFrame, var: pd.DataFrame) -> Path:
        from anndata.io import write_elem

        if len(obs) != self.n_obs or len(var) != self.n_vars:
            raise ValueError(f"obs/var have {len(obs)}/{len(var)} rows, X is {self.n_obs} x {self.n_vars}")
        self._data.close()
        self._indices.close()
        # indptr in the indices' dtype while the nonzeros fit it, as scipy makes them: scikit-learn's sparse
        # functions (scanpy's PCA) refuse int32 indices beside an int64 indptr
        wide = self.nnz > np.iinfo(self._indices.arr.dtype).max
        indptr = np.concatenate(self._indptr).astype(np.int64 if wide else self._indices.arr.dtype)
        chunks = (min(max(len(indptr), 1), 1 << 20),)
        self._x.create_array(
            "indptr", shape=indptr.shape, chunks=chunks, dtype=indptr.dtype, compressors=_compressor(indptr.dtype)
        )[:] = indptr
        self._x.attrs["shape"] = [self.n_obs, self.n_vars]
        with warnings.catch_warnings():  # anndata announces a future sharding default on every write
            warnings.filterwarnings("ignore", message=".*autosharding.*")
            write_elem(self.root, "obs", _plain_strings(obs))
            write_elem(self.root, "var", _plain_strings(var))
        self.root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        _commit(self.partial, self.path)
        return self.path


# Data tiles of ~16k nonzeros (~25 cells) instead of TileDB-SOMA's 100k: a shuffled block of rows then
# decodes little beyond itself (measured on 128-row blocks, see bench/results/loader.json).
SOMA_X_CREATE = {"capacity": 16384}


class SomaWriter(_PartialStore):
    """TileDB-SOMA experiment with measurement `RNA`, X layer `raw`, Census-style obs/var.

    Appends are buffered into fragments of >= `fragment_rows` cells: reads slow down with the number
    of fragments, and TileDB-SOMA has no consolidation call of its own.
    """

    def __init__(
        self,
        path,
        n_obs: int,
        n_vars: int,
        *,
        measurement: str = "RNA",
        layer: str = "raw",
        fragment_rows: int = 131072,
        overwrite: bool = False,
        x_create: dict | None = None,
    ):
        import pyarrow as pa
        import tiledbsoma as soma

        from loaders.soma_store import create_experiment

        super().__init__(path, overwrite)
        self.n_obs, self.n_vars, self.measurement, self.layer = n_obs, n_vars, measurement, layer
        self.exp = create_experiment(self.partial)
        ms = self.exp.add_new_collection("ms")
        self.rna = ms.add_new_collection(measurement, soma.Measurement)
        xcoll = self.rna.add_new_collection("X")
        create = SOMA_X_CREATE if x_create is None else x_create
        self.X = xcoll.add_new_sparse_ndarray(
            layer, type=pa.float32(), shape=(n_obs, n_vars), platform_config={"tiledb": {"create": create}}
        )
        self.row = 0
        self.fragment_rows = fragment_rows
        self._pending: list = []
        self._pending_rows = 0
        self._pa = pa

    @_writes
    def append(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        self._count_append()
        n = len(indptr) - 1
        rows = np.repeat(np.arange(self.row, self.row + n, dtype=np.int64), np.diff(indptr))
        self._pending.append(
            self._pa.table(
                {
                    "soma_dim_0": rows,
                    "soma_dim_1": np.asarray(indices, dtype=np.int64),
                    "soma_data": np.asarray(data, dtype=np.float32),
                }
            )
        )
        self.row += n
        self._pending_rows += n
        if self._pending_rows >= self.fragment_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.X.write(self._pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    @_writes
    def finish(self, obs: pd.DataFrame, var: pd.DataFrame) -> Path:
        if self.row != self.n_obs:
            raise ValueError(f"wrote {self.row} rows, expected {self.n_obs}")
        self._flush()
        pa = self._pa
        for frame, parent, name in ((obs, self.exp, "obs"), (var, self.rna, "var")):
            frame = frame.reset_index(drop=True).copy()
            frame["soma_joinid"] = np.arange(len(frame), dtype=np.int64)
            # categoricals as plain strings: tiledbsoma 2.3 with pyarrow >= 2x writes dictionary
            # columns with empty enumerations (codes without values)
            for col in frame.columns:
                if isinstance(frame[col].dtype, pd.CategoricalDtype):
                    frame[col] = frame[col].astype(str)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            df = parent.add_new_dataframe(
                name, schema=table.schema, index_column_names=["soma_joinid"], domain=[(0, max(len(frame) - 1, 0))]
            )
            df.write(table)
        self.X.close()
        self.exp.close()
        _commit(self.partial, self.path)
        return self.path
