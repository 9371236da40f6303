"""Tiny real stores for property tests: rows whose values encode their own position."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bigatlas.write_store import SomaWriter, ZarrWriter

warnings.filterwarnings("ignore", message=".*autosharding.*")
# numba compiles UMAP for ~16 s in every process that trains: the reference UMAP is tested on its own
# (tests/test_transfer.py clears this); every other training here skips the layout
os.environ.setdefault("BIGATLAS_REFERENCE_UMAP", "0")
# under pytest -n N (pytest-xdist; `make test`), each worker and the runs it launches compute on one thread:
# N workers share the cores instead of oversubscribing them (BIGATLAS_TEST_THREADS overrides)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ.get("BIGATLAS_TEST_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# a test process compiles the fused loss for many variants (dispersions, gates, dtypes), a training run for one:
# past torch's limit of 8 recompilations the later variants would run uncompiled (decoder_nll's fallback), untested
torch._dynamo.config.recompile_limit = 64

# pandas 3 makes str the default string dtype, which anndata 0.12 writes only once opted in: the stores the tests
# write with anndata itself are then what a pandas-3 user's anndata writes (bigatlas's own writers need no opt-in)
if int(pd.__version__.split(".")[0]) >= 3:
    import anndata

    anndata.settings.allow_write_nullable_strings = True

# the longest files (minutes of launches, kills and resumes) start first: under pytest -n --dist loadfile
# a file runs on one worker, and a long file handed out last is the whole suite's tail
LONG_FILES = ("test_train.py", "test_multinode.py", "test_transfer.py", "test_reliability.py", "test_preemption.py",
              "test_evaluate.py", "test_anndata.py", "test_elastic.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: each file's order kept


N_OBS = 1009  # prime: no block or batch size divides it
N_VARS = 40
N_LABELS = 8


def position_rows(lo: int, hi: int, n_vars: int = N_VARS):
    """Row i holds 1 + i % 4 nonzeros at columns (i + 11 j) % n_vars with value 10 i + j + 1."""
    indptr, indices, data = [0], [], []
    for i in range(lo, hi):
        k = 1 + i % 4
        cols = sorted((i + 11 * j) % n_vars for j in range(k))
        indices += cols
        data += [10 * i + cols.index((i + 11 * j) % n_vars) + 1 for j in range(k)]
        indptr.append(len(indices))
    return np.array(indptr, np.int64), np.array(indices, np.int64), np.array(data, np.float32)


def decode_positions(x_dense: np.ndarray) -> np.ndarray:
    """Position of each row from its smallest nonzero value (10 i + 1)."""
    vals = np.where(x_dense > 0, x_dense, np.inf).min(axis=1)
    return ((vals - 1) // 10).astype(np.int64)


def position_frames(n_obs: int = N_OBS, n_vars: int = N_VARS):
    i = np.arange(n_obs)
    obs = pd.DataFrame(
        {
            # sorted by label: the hard case for shuffling
            "cell_type": pd.Categorical([f"t{v}" for v in i * N_LABELS // n_obs]),
            "donor_id": pd.Categorical([f"d{v % 5}" for v in i]),
            "tissue_general": pd.Categorical(np.where(i % 3 == 0, "blood", "lung")),
            "is_primary_data": i % 7 != 0,
        },
        index=[f"c{v}" for v in i],
    )
    var = pd.DataFrame(
        {"feature_id": [f"ENSG{v:05d}" for v in range(n_vars)], "feature_name": [f"G{v}" for v in range(n_vars)]},
        index=[f"ENSG{v:05d}" for v in range(n_vars)],
    )
    return obs, var


def write_position_store(path, fmt: str, n_obs: int = N_OBS, n_vars: int = N_VARS, chunk_rows: int = 100):
    if fmt == "zarr":
        writer = ZarrWriter(path, n_vars, chunk_elems=64)
    else:
        writer = SomaWriter(path, n_obs, n_vars, fragment_rows=300)
    with writer:
        for lo in range(0, n_obs, chunk_rows):
            writer.append(*position_rows(lo, min(lo + chunk_rows, n_obs), n_vars))
        writer.finish(*position_frames(n_obs, n_vars))
    return str(path)


@pytest.fixture(scope="session")
def position_stores(tmp_path_factory):
    """The same cells as an AnnData-Zarr store (and one with a dense X), a SOMA experiment, an .h5ad as anndata
    writes it (sparse; and gzip-compressed, dense), an AnnData in memory and a backed one."""
    import anndata as ad

    root = tmp_path_factory.mktemp("stores")
    stores = {fmt: write_position_store(root / f"pos.{fmt}", fmt) for fmt in ("zarr", "soma")}
    adata = ad.read_zarr(stores["zarr"])
    stores["memory"] = adata
    adata.write_h5ad(root / "pos.h5ad")
    stores["h5ad"] = str(root / "pos.h5ad")
    dense = adata.copy()
    dense.X = dense.X.toarray()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense.write_h5ad(root / "pos_dense.h5ad", compression="gzip")
    stores["h5ad_dense"] = str(root / "pos_dense.h5ad")
    dense.write_zarr(root / "pos_dense.zarr", chunks=(128, N_VARS))  # anndata writes a numpy X as a dense array
    stores["zarr_dense"] = str(root / "pos_dense.zarr")
    stores["backed"] = ad.read_h5ad(root / "pos.h5ad", backed="r")
    return stores


@pytest.fixture(params=["zarr", "soma", "h5ad", "memory"])
def fmt(request):
    return request.param


ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, args, env_extra=None, launcher=(), check=True, timeout=600):
    """Run scripts/<script> (under `launcher`, e.g. accelerate launch, or this Python) in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("WORLD_SIZE", None)
    cmd = [*(launcher or [sys.executable]), str(ROOT / "scripts" / script), *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{script} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-5000:]}")
    return res


def cli(args, env_extra=None, timeout=600, launcher=None):
    """`python -m bigatlas.cli ARGS` (or under `launcher`) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env.update({"PYTHONPATH": str(ROOT), **(env_extra or {})})
    cmd = launcher or [sys.executable, "-m", "bigatlas.cli"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launcher(processes: int) -> list:
    """`accelerate launch` of `processes` processes on this machine, on a free port: its default (29500) is
    taken while another test's run holds it (pytest -n)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]  # fmt: skip
