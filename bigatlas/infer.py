"""Chunked, ordered, resumable embedding + label prediction, written straight to disk (Zarr or SOMA).

Rows are cut into output chunks of `chunk_size` cells; chunk k belongs to process k mod world and is
read sequentially, embedded and written into its own storage chunks of every output array, so no
process ever gathers latents and no two processes touch one storage object. Chunk k's done flag
(Zarr: `uns/bigatlas_done[k]`, one storage object per chunk; SOMA: `bigatlas_done`) is set only
after the chunk is fully written; a rerun computes only chunks not done; the output is marked
complete (`bigatlas.complete`) only when every chunk is done. On object stores the same holds:
each done flag is a separate key written after the chunk's data.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import zarr
from accelerate import PartialState

from loaders import StoreError, data_name, detect_format, open_store
from loaders.csr import check_counts, select_columns
from loaders.soma_store import create_experiment, open_experiment
from loaders.tiledb_gate import alone as tiledb_alone

from .batches import Measured
from .device_copy import csr_to_device
from .embedding import recorded_data
from .faults import Faults
from .lock import OutputLock
from .process_group import leave_at_exit
from .reference import read_reference
from .rundir import load_run
from .transfer import DEFAULT_UNKNOWN, LabelTransfer
from .write_store import check_folder_name

OUTPUT_VERSION = 3  # 2: obs/row renamed obs/bigatlas_row; 3: uncertainty, filtered, per-predictor columns
UNKNOWN = "Unknown"  # the category of <key>_pred_filtered for uncertain cells
# per label key: (column suffix, dtype) of the numeric columns and the categorical ones
NUMERIC = (("prob", np.float32), ("uncertainty", np.float32), ("entropy", np.float32), ("unknown", bool))
CATEGORICAL = ("pred", "pred_filtered", "pred_head", "pred_knn")
ROW_COLUMN = "bigatlas_row"  # each cell's row id in the source store
SOURCE_COLUMN = "bigatlas_source"  # a collection's store of each cell


def _attrs(kind: str) -> dict:
    versions = {
        "array": "0.2.0",
        "string-array": "0.2.0",
        "categorical": "0.2.0",
        "dataframe": "0.2.0",
        "dict": "0.1.0",
        "anndata": "0.1.0",
        "null": "0.1.0",
    }
    return {"encoding-type": kind, "encoding-version": versions[kind]}


def _array(group, name, shape, chunks, dtype, kind="array", fill_value=None):
    arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value)
    arr.attrs.update(_attrs(kind))
    return arr


def _meta(
    run_dir, data, obs_filter, n_obs, chunk_size, full_probs, threshold, transfer, sources=None, layer=None
) -> dict:
    extra = {"sources": list(sources)} if sources is not None else {}  # a collection's store names
    if layer is not None:  # another matrix than the run's; outputs started without one resume as before
        extra["layer"] = layer
    return {
        **extra,
        "version": OUTPUT_VERSION,
        "run": str(Path(run_dir).resolve()),
        "data": data,  # data_name's: a list of paths for a collection given as several
        "obs_filter": obs_filter,
        "n_obs": int(n_obs),
        "chunk_size": int(chunk_size),
        "full_probabilities": bool(full_probs),
        "unknown_threshold": float(threshold),
        "predictor": transfer.predictors,
        "k": transfer.k if transfer.index is not None else None,
        "reference": transfer.reference.id if transfer.reference is not None else None,
    }


def _categorical(obs, name: str, categories, n: int, c: int) -> None:
    cat = obs.create_group(name)
    cat.attrs.update({**_attrs("categorical"), "ordered": False})
    k = len(categories)
    _array(cat, "categories", (k,), (max(k, 1),), str, "string-array", fill_value="")[:] = np.asarray(
        categories, dtype=object
    )
    _array(cat, "codes", (n,), (c,), np.int16, fill_value=-1)


def _label_columns(classes: dict, has_knn: bool):
    """(key, column suffix, categories or dtype) of every per-key obs column, in column order."""
    for key, cats in classes.items():
        yield key, "pred", list(cats)
        yield key, "pred_filtered", [*cats, UNKNOWN] if UNKNOWN not in cats else list(cats)
        for suffix, dtype in NUMERIC:
            yield key, suffix, dtype
        yield key, "pred_head", list(cats)
        if has_knn:
            yield key, "pred_knn", list(cats)


def _create(out: Path, meta: dict, model, n_chunks: int) -> None:
    n, c = meta["n_obs"], meta["chunk_size"]
    root = zarr.open_group(str(out), mode="w", zarr_format=3)
    root.attrs.update({**_attrs("anndata"), "bigatlas": {**meta, "complete": False}})
    obs = root.create_group("obs")
    columns = [ROW_COLUMN]
    _array(obs, "_index", (n,), (c,), str, "string-array", fill_value="")
    _array(obs, ROW_COLUMN, (n,), (c,), np.int64)
    if meta.get("sources"):  # a collection: each cell's store, beside its row id in that store
        _categorical(obs, SOURCE_COLUMN, meta["sources"], n, c)
        columns.append(SOURCE_COLUMN)
    for key, suffix, kind in _label_columns(model.vocab.label_classes, meta["k"] is not None):
        if isinstance(kind, list):
            _categorical(obs, f"{key}_{suffix}", kind, n, c)
        else:
            _array(obs, f"{key}_{suffix}", (n,), (c,), kind)
        columns.append(f"{key}_{suffix}")
    obs.attrs.update({**_attrs("dataframe"), "_index": "_index", "column-order": columns})
    obsm = root.create_group("obsm")
    obsm.attrs.update(_attrs("dict"))
    _array(obsm, "X_bigatlas", (n, model.module.n_latent), (c, model.module.n_latent), np.float32)
    if meta.get("umap"):
        _array(obsm, "X_umap_ref", (n, 2), (c, 2), np.float32)
    if meta["full_probabilities"]:
        for key, classes in model.vocab.label_classes.items():
            _array(obsm, f"{key}_probabilities", (n, len(classes)), (c, len(classes)), np.float32)
    var = root.create_group("var")
    var.attrs.update({**_attrs("dataframe"), "_index": "_index", "column-order": []})
    _array(var, "_index", (0,), (1,), str, "string-array", fill_value="")
    for name in ("layers", "obsp", "varm", "varp"):
        root.create_group(name).attrs.update(_attrs("dict"))
    uns = root.create_group("uns")
    uns.attrs.update(_attrs("dict"))
    _array(uns, "bigatlas_done", (n_chunks,), (1,), np.uint8, fill_value=0)


class ZarrOutput:
    """AnnData-Zarr output (for Zarr input, or on request)."""

    def __init__(self, path):
        self.path = Path(path)
        self.root = None

    def prepare(self, meta: dict, model, n_chunks: int, overwrite: bool) -> bool:
        """Create or validate; False when already complete (nothing to do). Main process only."""
        if self.path.exists() and overwrite:
            shutil.rmtree(self.path)
        if self.path.exists():
            try:
                saved = dict(zarr.open_group(str(self.path), mode="r").attrs.get("bigatlas", {}))
            except Exception as e:
                raise ValueError(
                    f"{self.path} exists and is not a bigatlas embedding ({e}); pass --overwrite"
                ) from None
            return _check_meta(self.path, saved, meta)
        _atomically(self.path, lambda tmp: _create(tmp, meta, model, n_chunks))
        return True

    def open(self) -> None:
        self.root = zarr.open_group(str(self.path), mode="r+")
        self.arrays = {}

    def _array(self, name: str):
        """An array of the output, opened once (indexing the group reads its metadata from disk each
        time: ~20 arrays per chunk)."""
        if name not in self.arrays:
            self.arrays[name] = self.root[name]
        return self.arrays[name]

    def complete(self) -> bool:
        return bool(self.root.attrs["bigatlas"].get("complete", False))

    def done(self) -> np.ndarray:
        return self.root["uns/bigatlas_done"][:]

    def write(self, k, lo, hi, row_ids, names, z, results, probs, umap=None, sources=None) -> None:
        a = self._array
        a("obsm/X_bigatlas")[lo:hi] = z
        if umap is not None:
            a("obsm/X_umap_ref")[lo:hi] = umap
        a(f"obs/{ROW_COLUMN}")[lo:hi] = row_ids
        if sources is not None:
            a(f"obs/{SOURCE_COLUMN}/codes")[lo:hi] = sources.astype(np.int16)
        a("obs/_index")[lo:hi] = np.asarray(names, dtype=object)
        for key, r in results.items():
            for field, values in r.items():
                if field in CATEGORICAL:
                    a(f"obs/{key}_{field}/codes")[lo:hi] = values.astype(np.int16)
                elif field != "label":
                    a(f"obs/{key}_{field}")[lo:hi] = values
            if key in probs:
                a(f"obsm/{key}_probabilities")[lo:hi] = probs[key]
        a("uns/bigatlas_done")[k] = 1  # after the data: a killed write leaves the chunk not done

    def mark_complete(self) -> None:
        meta = dict(self.root.attrs["bigatlas"])
        meta["complete"] = True
        self.root.attrs["bigatlas"] = meta


class SomaOutput:
    """A SOMA experiment (for SOMA input): obs indexed by the query's soma_joinids, latents in
    ms/RNA/obsm/X_bigatlas (sparse, soma_joinid × latent dim), done flags in `bigatlas_done`,
    settings and completion in the experiment's metadata."""

    def __init__(self, path):
        self.path = Path(path)

    def prepare(self, meta: dict, model, n_chunks: int, overwrite: bool, n_rows: int = 0) -> bool:
        if self.path.exists() and overwrite:
            shutil.rmtree(self.path)
        if self.path.exists():
            try:
                with self._exp() as exp:
                    saved = json.loads(exp.metadata["bigatlas"])
            except Exception as e:
                raise ValueError(
                    f"{self.path} exists and is not a bigatlas embedding ({e}); pass --overwrite"
                ) from None
            return _check_meta(self.path, saved, meta)
        _atomically(self.path, lambda tmp: self._create(tmp, meta, model, n_chunks, n_rows))
        return True

    @staticmethod
    def _create(path, meta, model, n_chunks, n_rows) -> None:
        import pyarrow as pa
        import tiledbsoma as soma

        fields = [pa.field("soma_joinid", pa.int64(), nullable=False)]
        arrow = {np.float32: pa.float32(), bool: pa.bool_()}
        for key, suffix, kind in _label_columns(model.vocab.label_classes, meta["k"] is not None):
            fields.append(pa.field(f"{key}_{suffix}", pa.large_string() if isinstance(kind, list) else arrow[kind]))
        with create_experiment(path) as exp:
            exp.metadata["bigatlas"] = json.dumps({**meta, "complete": False})
            exp.add_new_dataframe(
                "obs", schema=pa.schema(fields), index_column_names=["soma_joinid"], domain=[(0, n_rows - 1)]
            )
            obsm = exp.add_new_collection("ms").add_new_collection("RNA", soma.Measurement).add_new_collection("obsm")
            obsm.add_new_sparse_ndarray("X_bigatlas", type=pa.float32(), shape=(n_rows, model.module.n_latent))
            if meta.get("umap"):
                obsm.add_new_sparse_ndarray("X_umap_ref", type=pa.float32(), shape=(n_rows, 2))
            if meta["full_probabilities"]:
                for key, classes in model.vocab.label_classes.items():
                    obsm.add_new_sparse_ndarray(f"{key}_probabilities", type=pa.float32(), shape=(n_rows, len(classes)))
            exp.add_new_sparse_ndarray("bigatlas_done", type=pa.uint8(), shape=(n_chunks,))

    def open(self) -> None:
        """Nothing to hold open: each write opens the experiment itself (TileDB handles per call)."""

    @contextmanager
    def _exp(self, mode="r"):
        """The experiment, opened for one call; its writes and reads run while the query's SOMA reads pause
        (loaders.tiledb_gate: TileDB set-up beside another thread's read crashed)."""
        with tiledb_alone(), open_experiment(self.path, mode) as exp:
            yield exp

    def complete(self) -> bool:
        with self._exp() as exp:
            return bool(json.loads(exp.metadata["bigatlas"]).get("complete", False))

    def done(self) -> np.ndarray:
        with self._exp() as exp:
            arr = exp["bigatlas_done"]
            flags = np.zeros(int(arr.shape[0]), dtype=np.uint8)
            t = arr.read().tables().concat()
            flags[t["soma_dim_0"].to_numpy()] = t["soma_data"].to_numpy()
        return flags

    def write(self, k, lo, hi, row_ids, names, z, results, probs, umap=None) -> None:
        import pyarrow as pa

        def matrix(values):
            n, d = values.shape
            return pa.table(
                {
                    "soma_dim_0": np.repeat(row_ids, d),
                    "soma_dim_1": np.tile(np.arange(d), n),
                    "soma_data": values.astype(np.float32).ravel(),
                }
            )

        cols = {"soma_joinid": row_ids.astype(np.int64)}
        for key, r in results.items():
            for field, values in r.items():
                if field in CATEGORICAL:
                    values = r["label"][field]
                if field != "label":
                    cols[f"{key}_{field}"] = values
        with self._exp("w") as exp:
            exp.obs.write(pa.table(cols))
            obsm = exp.ms["RNA"].obsm
            obsm["X_bigatlas"].write(matrix(z))
            if umap is not None:
                obsm["X_umap_ref"].write(matrix(umap))
            for key, p in probs.items():
                obsm[f"{key}_probabilities"].write(matrix(p))
        with self._exp("w") as exp:  # after the data, in its own write
            exp["bigatlas_done"].write(
                pa.table({"soma_dim_0": np.array([k], np.int64), "soma_data": np.array([1], np.uint8)})
            )

    def mark_complete(self) -> None:
        with self._exp() as exp:
            meta = json.loads(exp.metadata["bigatlas"])
        meta["complete"] = True
        with self._exp("w") as exp:
            exp.metadata["bigatlas"] = json.dumps(meta)


def _atomically(path: Path, create) -> None:
    """Build the empty output next to `path` and rename it into place: a kill during creation never
    leaves a half-made skeleton behind (object stores: the skeleton is small; rerun with --overwrite)."""
    tmp = path.with_name(path.name + ".creating")
    shutil.rmtree(tmp, ignore_errors=True)
    create(tmp)
    os.replace(tmp, path)


def _check_meta(path, saved: dict, meta: dict) -> bool:
    saved = dict(saved)
    complete = saved.pop("complete", False)
    if "data" in saved:  # an output started before 2026-12 resumes: its collection's list was recorded as text,
        saved["data"] = data_name(recorded_data(saved["data"]))  # and before paths were recorded absolute
    if saved != meta:
        diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
        raise ValueError(
            f"{path} was started with other settings {json.dumps(diff)}; "
            "rerun with the same ones to resume, or pass --overwrite"
        )
    return not complete


OUT_FORMATS = ("zarr", "soma")


def output_format(data, out: Path, out_format: str | None, overwrite: bool) -> str:
    """The embedding's format: `out_format`; else an existing output's (a rerun resumes it); else the one the
    output's name says (.zarr, .soma); else the query's (a SOMA experiment for SOMA, AnnData-Zarr otherwise)."""
    if out_format is not None:
        if out_format not in OUT_FORMATS:
            raise ValueError(f"out_format {out_format!r}: use one of {', '.join(OUT_FORMATS)}")
        return out_format
    if out.exists() and not overwrite:
        try:
            existing = detect_format(str(out))
        except StoreError:
            existing = None  # not a store: prepare() says so
        if existing in OUT_FORMATS:
            return existing
    if out.suffix in (".zarr", ".soma"):
        return out.suffix[1:]
    return "soma" if detect_format(data) == "soma" else "zarr"


def embed(
    run_dir,
    data,
    out,
    *,
    chunk_size: int = 16384,
    batch_size: int = 4096,
    obs_filter=None,
    layer: str | None = None,
    overwrite: bool = False,
    full_probabilities: bool = False,
    unknown_threshold: float = DEFAULT_UNKNOWN,
    predictor: str | None = None,
    k: int | None = None,
    min_gene_overlap: float = 0.5,
    progress: bool = True,
    out_format: str | None = None,
    allow_non_integer: bool = False,
) -> Path:
    """Embed `data` (a store path, an .h5ad or an AnnData object) with the model in `run_dir` into `out`: an
    AnnData-Zarr store or a SOMA experiment, as output_format chooses (an output named as a single file, .h5ad or
    another, is refused). See the module doc."""
    check_folder_name(out, "the embedding")
    state = PartialState(cpu=not torch.cuda.is_available())
    leave_at_exit()
    faults = Faults()
    model = load_run(run_dir)
    # as the model was trained, unless the call says otherwise (the output's settings keep the call's own layer)
    read_layer, allow_non_integer = model.config.data.read_as(layer, allow_non_integer)
    device = state.device if torch.cuda.is_available() else torch.device("cpu")
    module = model.module.to(device).eval()
    transfer = LabelTransfer(module, model.vocab, read_reference(run_dir), predictor=predictor, k=k)
    if transfer.index is not None:
        transfer.index.to(device)
    genes = model.vocab.genes  # a collection aligns each store to the model's genes (zero-filling)
    store = open_store(
        data, obs_filter=obs_filter, layer=read_layer, genes=genes, gene_join="outer",
        min_gene_overlap=min_gene_overlap, gene_names=model.vocab.gene_names,
    )  # fmt: skip
    with warnings.catch_warnings():
        if not state.is_main_process:
            warnings.simplefilter("ignore")
        colmap = model.vocab.colmap(store, min_gene_overlap)
    identity = np.array_equal(colmap, np.arange(store.n_vars)) and store.n_vars == len(model.vocab.genes)
    measured = Measured.of_store(store, colmap, len(model.vocab.genes), device)
    out = Path(out)
    n, c = store.n_obs, int(chunk_size)
    n_chunks = -(-n // c)
    sources = [m.name for m in store.members] if store.segments is not None else None
    meta = _meta(
        run_dir, data_name(data), obs_filter, n, c, full_probabilities, unknown_threshold, transfer, sources, layer
    )
    meta["umap"] = transfer.has_umap
    fmt = output_format(data, out, out_format, overwrite)
    if fmt == "soma" and sources is not None:
        raise ValueError(
            f"a collection embeds to AnnData-Zarr (its cells have no common soma_joinid): name the output .zarr "
            f"(not {out.name}) or pass out_format='zarr'"
        )
    output = SomaOutput(out) if fmt == "soma" else ZarrOutput(out)
    lock = OutputLock(out.with_name(out.name + ".lock"), f"output {out}") if state.is_main_process else nullcontext()
    with lock:  # one writer per output; released when this returns or the process dies
        if state.is_main_process:
            extra = {"n_rows": int(store.store_rows(np.array([n - 1]))[0]) + 1} if fmt == "soma" else {}
            output.prepare(meta, model, n_chunks, overwrite, **extra)
        state.wait_for_everyone()
        output.open()
        if output.complete():
            if state.is_main_process:
                print(f"{out} is complete; nothing to do (pass --overwrite to recompute)", flush=True)
            return out
        done = output.done()
        mine = [k for k in range(state.process_index, n_chunks, state.num_processes) if not done[k]]
        classes = model.vocab.label_classes

        def read(k):
            lo, hi = k * c, min(n, (k + 1) * c)
            m = store.read(np.arange(lo, hi))
            check_counts(m, store, integer=not allow_non_integer, positions=np.arange(lo, hi))
            if not identity:
                m = select_columns(m, colmap, len(model.vocab.genes))
            return k, lo, hi, m

        bar = None
        if progress and state.is_main_process:
            from tqdm import tqdm

            bar = tqdm(total=sum(min(n, (k + 1) * c) - k * c for k in mine), unit="cell", unit_scale=True,
                       desc="embed", mininterval=1.0)  # fmt: skip
        t0, cells = time.perf_counter(), 0

        def write(k, lo, hi, *columns, **named) -> int:
            _write_chunk(output, faults, k, lo, hi, *columns, **named)
            faults.kill("after_chunk", k)
            if bar is not None:
                bar.update(hi - lo)
            return hi - lo

        try:
            # one thread reads the next chunk and one writes the last while this one is embedded; at
            # most one chunk waits to be written, and its error surfaces before the next is handed over
            with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(1) as writer:
                pending = pool.submit(read, mine[0]) if mine else None
                written = None
                for i in range(len(mine)):
                    k, lo, hi, m = pending.result()
                    pending = pool.submit(read, mine[i + 1]) if i + 1 < len(mine) else None
                    z = _latent(module, m, batch_size, device, measured, lo)
                    results, umap = transfer(z)
                    positions = np.arange(lo, hi)
                    columns = (
                        store.store_rows(positions), store.obs_names(positions), z.cpu().numpy(),
                        _columns(results, classes, unknown_threshold),
                        {key: r.probs for key, r in results.items()} if full_probabilities else {}, umap,
                    )  # fmt: skip
                    named = {"sources": store.source_codes(positions)} if sources is not None else {}
                    cells += written.result() if written is not None else 0
                    written = writer.submit(write, k, lo, hi, *columns, **named)
                cells += written.result() if written is not None else 0
        finally:  # also on an error: the bar's line ends before the message
            if bar is not None:
                bar.close()
        state.wait_for_everyone()
        if state.is_main_process:
            flags = output.done()
            if flags.all():
                output.mark_complete()
            dt = time.perf_counter() - t0
            print(
                f"embedded {cells} cells on this process in {dt:.1f}s ({cells / max(dt, 1e-9):,.0f} cells/s); "
                f"{int(flags.sum())}/{n_chunks} chunks done; {'complete' if flags.all() else 'INCOMPLETE'}: {out}",
                flush=True,
            )
        return out


def _write_chunk(output, faults: Faults, k: int, lo: int, hi: int, *columns, **named) -> None:
    """output.write(k, lo, hi, …), where a failing write (a full disk, an I/O error) is one error naming
    the chunk; its done flag is never set, so a rerun writes it again."""
    try:
        faults.io("chunk_write", k, output.path)
        output.write(k, lo, hi, *columns, **named)
    except OSError as e:
        raise OSError(
            e.errno,
            f"writing chunk {k} (cells {lo}-{hi}) of {output.path} failed ({e.strerror or e}); "
            "the output is not complete: rerun the same command to finish it",
        ) from None


@torch.no_grad()
def _latent(module, m, batch_size, device, measured: Measured, lo: int) -> torch.Tensor:
    """Posterior means of a chunk (store positions lo, lo + 1, …), from sparse CSR sub-batches; genes a cell's
    store lacks are filled in by the model (VAEModule.encode_measured)."""
    parts = []
    for b in range(0, m.n_rows, batch_size):
        e = min(b + batch_size, m.n_rows)
        x = csr_to_device(m.rows(b, e).to_torch(), device)
        parts.append(module.latent(x, measured=measured.of(np.arange(lo + b, lo + e))))
    return torch.cat(parts) if parts else torch.zeros(0, module.n_latent, device=device)


def _columns(results: dict, classes: dict, threshold: float) -> dict:
    """Per label key the output columns (transfer.KeyResult → arrays; categorical ones as class codes,
    with their names under 'label' for SOMA)."""
    out = {}
    for key, r in results.items():
        cats = list(classes[key])
        unknown_code = cats.index(UNKNOWN) if UNKNOWN in cats else len(cats)
        names = np.asarray(cats + [UNKNOWN], dtype=object)
        uncertainty = r.uncertainty
        unknown = uncertainty > threshold
        code = r.code
        cols = {
            "pred": code,
            "pred_filtered": np.where(unknown, unknown_code, code),
            "prob": r.prob,
            "uncertainty": uncertainty,
            "entropy": r.entropy,
            "unknown": unknown,
            "pred_head": r.head,
        }
        if r.knn is not None:
            cols["pred_knn"] = r.knn
        cols["label"] = {f: names[cols[f]] for f in CATEGORICAL if f in cols}
        out[key] = cols
    return out
