"""Chunked, ordered, resumable embedding + label prediction, written straight to an AnnData-Zarr store.

Rows are cut into output chunks of `chunk_size` cells; chunk k belongs to process k mod world and is
read sequentially, embedded and written into its own storage chunks of every output array, so no
process ever gathers latents and no two processes touch one storage object. `uns/bigatlas_done[k]`
(one storage object per chunk) is set only after chunk k is fully written; a rerun computes only
chunks not done; the root attribute `bigatlas.complete` becomes true only when every chunk is done.
On object stores the same holds: each done flag is a separate key written after the chunk's data.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from loaders import open_store
from loaders.csr import select_columns

from .distributions import Counts
from .train import fault_point
from .vocab import align_genes

OUTPUT_VERSION = 1


def _attrs(kind: str) -> dict:
    versions = {"array": "0.2.0", "string-array": "0.2.0", "categorical": "0.2.0", "dataframe": "0.2.0",
                "dict": "0.1.0", "anndata": "0.1.0", "null": "0.1.0"}
    return {"encoding-type": kind, "encoding-version": versions[kind]}


def _array(group, name, shape, chunks, dtype, kind="array", fill_value=None):
    arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value)
    arr.attrs.update(_attrs(kind))
    return arr


def _meta(run_dir, data, obs_filter, n_obs, chunk_size, full_probs, threshold) -> dict:
    return {"version": OUTPUT_VERSION, "run": str(Path(run_dir).resolve()), "data": str(data),
            "obs_filter": obs_filter, "n_obs": int(n_obs), "chunk_size": int(chunk_size),
            "full_probabilities": bool(full_probs), "unknown_threshold": float(threshold)}


def _create(out: Path, meta: dict, model, n_chunks: int) -> None:
    n, c = meta["n_obs"], meta["chunk_size"]
    root = zarr.open_group(str(out), mode="w", zarr_format=3)
    root.attrs.update({**_attrs("anndata"), "bigatlas": {**meta, "complete": False}})
    obs = root.create_group("obs")
    columns = ["row"]
    _array(obs, "_index", (n,), (c,), str, "string-array", fill_value="")
    _array(obs, "row", (n,), (c,), np.int64)
    for key, classes in model.vocab.label_classes.items():
        cat = obs.create_group(f"{key}_pred")
        cat.attrs.update({**_attrs("categorical"), "ordered": False})
        _array(cat, "categories", (len(classes),), (max(len(classes), 1),), str, "string-array",
               fill_value="")[:] = np.asarray(classes, dtype=object)
        _array(cat, "codes", (n,), (c,), np.int16, fill_value=-1)
        for suffix, dtype in (("prob", np.float32), ("entropy", np.float32), ("unknown", bool)):
            _array(obs, f"{key}_{suffix}", (n,), (c,), dtype)
        columns += [f"{key}_pred", f"{key}_prob", f"{key}_entropy", f"{key}_unknown"]
    obs.attrs.update({**_attrs("dataframe"), "_index": "_index", "column-order": columns})
    obsm = root.create_group("obsm")
    obsm.attrs.update(_attrs("dict"))
    _array(obsm, "X_bigatlas", (n, model.config.model.n_latent), (c, model.config.model.n_latent), np.float32)
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


def _prepare_output(out: Path, meta: dict, model, n_chunks: int, overwrite: bool) -> bool:
    """Create or validate OUT; False when it is already complete (nothing to do)."""
    if out.exists() and overwrite:
        shutil.rmtree(out)
    if out.exists():
        try:
            saved = dict(zarr.open_group(str(out), mode="r").attrs.get("bigatlas", {}))
        except Exception as e:
            raise ValueError(f"{out} exists and is not a bigatlas embedding ({e}); pass --overwrite") from None
        complete = saved.pop("complete", False)
        if saved != meta:
            diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
            raise ValueError(f"{out} was started with other settings {json.dumps(diff)}; "
                             "rerun with the same ones to resume, or pass --overwrite")
        return not complete
    _create(out, meta, model, n_chunks)
    return True


def embed(run_dir, data, out, *, chunk_size: int = 16384, batch_size: int = 4096, obs_filter=None,
          overwrite: bool = False, full_probabilities: bool = False, unknown_threshold: float = 0.5,
          min_gene_overlap: float = 0.5, progress: bool = True) -> Path:
    """Embed `data` with the model in `run_dir` into the Zarr store `out` (see module doc)."""
    from accelerate import PartialState

    from .api import AtlasVAE

    state = PartialState(cpu=not torch.cuda.is_available())
    model = AtlasVAE.load(run_dir)
    device = state.device if torch.cuda.is_available() else torch.device("cpu")
    module = model.module.to(device).eval()
    store = open_store(data, obs_filter=obs_filter, layer=model.config.data.layer)
    with warnings.catch_warnings():
        if not state.is_main_process:
            warnings.simplefilter("ignore")
        colmap, _ = align_genes(store, model.vocab.genes, min_gene_overlap)
    identity = np.array_equal(colmap, np.arange(store.n_vars)) and store.n_vars == len(model.vocab.genes)
    out = Path(out)
    n, c = store.n_obs, int(chunk_size)
    n_chunks = -(-n // c)
    meta = _meta(run_dir, data, obs_filter, n, c, full_probabilities, unknown_threshold)
    todo = _prepare_output(out, meta, model, n_chunks, overwrite) if state.is_main_process else None
    state.wait_for_everyone()
    root = zarr.open_group(str(out), mode="r+")
    if todo is None:
        todo = not root.attrs["bigatlas"].get("complete", False)
    if not todo:
        if state.is_main_process:
            print(f"{out} is complete; nothing to do (pass --overwrite to recompute)", flush=True)
        return out
    done = root["uns/bigatlas_done"]
    mine = [k for k in range(state.process_index, n_chunks, state.num_processes) if not done[k]]
    keys = list(model.vocab.label_classes)

    def read(k):
        lo, hi = k * c, min(n, (k + 1) * c)
        m = store.read(np.arange(lo, hi))
        if not identity:
            m = select_columns(m, colmap, len(model.vocab.genes))
        return k, lo, hi, m

    bar = None
    if progress and state.is_main_process:
        from tqdm import tqdm

        bar = tqdm(total=len(mine) * c, unit="cell", unit_scale=True, desc="embed", mininterval=1.0)
    t0, cells = time.perf_counter(), 0
    with ThreadPoolExecutor(1) as pool:  # reads the next chunk while this one is embedded
        pending = pool.submit(read, mine[0]) if mine else None
        for i in range(len(mine)):
            k, lo, hi, m = pending.result()
            pending = pool.submit(read, mine[i + 1]) if i + 1 < len(mine) else None
            _write_chunk(root, module, m, lo, hi, keys, model.vocab.label_classes, batch_size, device,
                         unknown_threshold, full_probabilities, store)
            done[k] = 1
            fault_point("after_chunk", k)
            cells += hi - lo
            if bar is not None:
                bar.update(hi - lo)
    if bar is not None:
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        flags = root["uns/bigatlas_done"][:]
        if flags.all():
            meta_done = dict(root.attrs["bigatlas"])
            meta_done["complete"] = True
            root.attrs["bigatlas"] = meta_done
        dt = time.perf_counter() - t0
        print(f"embedded {cells} cells on this process in {dt:.1f}s ({cells / max(dt, 1e-9):,.0f} cells/s); "
              f"{int(flags.sum())}/{n_chunks} chunks done; {'complete' if flags.all() else 'INCOMPLETE'}: {out}",
              flush=True)
    return out


@torch.no_grad()
def _write_chunk(root, module, m, lo, hi, keys, classes, batch_size, device, threshold, full_probs, store):
    z_parts, prob_parts = [], {k: [] for k in keys}
    for b in range(0, m.n_rows, batch_size):
        e = min(b + batch_size, m.n_rows)
        lo_nz, hi_nz = int(m.indptr[b]), int(m.indptr[e])
        x = torch.sparse_csr_tensor(torch.from_numpy((m.indptr[b : e + 1] - lo_nz).astype(np.int32)),
                                    torch.from_numpy(m.indices[lo_nz:hi_nz].astype(np.int32)),
                                    torch.from_numpy(m.data[lo_nz:hi_nz]), size=(e - b, m.n_cols),
                                    check_invariants=False)
        z = module.latent(x.to(device))
        z_parts.append(z.cpu().numpy())
        for k, p in zip(keys, module.label_probs(z)):
            prob_parts[k].append(p.cpu().numpy())
    z = np.concatenate(z_parts)
    root["obsm/X_bigatlas"][lo:hi] = z
    positions = np.arange(lo, hi)
    root["obs/row"][lo:hi] = store.store_rows(positions)
    root["obs/_index"][lo:hi] = np.asarray(store.obs_names(positions), dtype=object)
    for k in keys:
        p = np.concatenate(prob_parts[k])
        best = p.argmax(1)
        top = p[np.arange(len(p)), best]
        entropy = -(p * np.log(np.clip(p, 1e-12, 1))).sum(1)
        root[f"obs/{k}_pred/codes"][lo:hi] = best.astype(np.int16)
        root[f"obs/{k}_prob"][lo:hi] = top.astype(np.float32)
        root[f"obs/{k}_entropy"][lo:hi] = entropy.astype(np.float32)
        root[f"obs/{k}_unknown"][lo:hi] = top < threshold
        if full_probs:
            root[f"obsm/{k}_probabilities"][lo:hi] = p.astype(np.float32)
