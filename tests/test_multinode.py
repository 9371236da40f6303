"""Two "nodes" on this machine: separate launcher invocations (torchrun with a c10d rendezvous, and
accelerate launch with --num_machines 2) that meet over TCP on localhost. Every cell exactly once
per epoch across nodes, RUN_DIR written by the main process only, the same weights as one node with
the same number of processes, resume after one node is killed, and embedding split over both nodes
identical to one process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import ROOT, accelerate_launcher, free_port
from safetensors.numpy import load_file

from bigatlas.batches import holdout_mask
from bigatlas.synth import synth

N = 2000


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("nodes") / "a.zarr"
    synth(path, N, 80, "zarr", seed=8, n_studies=3, donors_per_study=2)
    return str(path)


def launcher(kind: str, node: int, port: int) -> list:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", f"test{port}"]  # fmt: skip
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "2", "--machine_rank", str(node),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--multi_gpu", "--num_processes",
            "2", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def one_node(kind: str) -> list:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return accelerate_launcher(2)


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # the same threads under both launchers
    return e


def start(kind, port, args, cwd):
    return [
        subprocess.Popen(
            [*launcher(kind, node, port), *args],
            env=env(),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for node in (0, 1)
    ]


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def train_args(atlas, run, *extra, epochs=3):
    return ["-m", "bigatlas.train", "--data", atlas, "--batch-key", "dataset_id", "--label-keys", "cell_type",
            "--out", str(run), "--max-epochs", str(epochs), "--batch-size", "64", *extra]  # fmt: skip


@pytest.mark.parametrize("kind", ["torchrun", "accelerate"])
def test_two_nodes_cover_every_cell_once_and_match_one_node(atlas, tmp_path, kind):
    run = tmp_path / "nodes"
    finish(start(kind, free_port(), train_args(atlas, run, "--trace-cells"), tmp_path))
    train_cells = np.flatnonzero(~holdout_mask(np.arange(N), 0.05, 0))
    for epoch in range(3):
        parts = [np.load(run / "trace" / f"rank{r}_epoch{epoch}.npy") for r in range(2)]
        assert len(np.intersect1d(*parts)) == 0
        assert np.array_equal(np.sort(np.concatenate(parts)), train_cells)
    single = tmp_path / "single"
    res = subprocess.run([*one_node(kind), *train_args(atlas, single)], env=env(), capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(run / "model.safetensors")), load_file(str(single / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same world size, same partition, same model
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")) == []


EPOCHS_KILLED = 10  # ~150 steps: the kill lands at step 10-15, long before the end


def test_resume_after_one_node_is_killed(atlas, tmp_path):
    kind, run = "accelerate", tmp_path / "run"
    full = tmp_path / "full"
    args = ("--checkpoint-every-steps", "5")
    finish(start(kind, free_port(), train_args(atlas, full, *args, epochs=EPOCHS_KILLED), tmp_path))
    procs = start(kind, free_port(), train_args(atlas, run, *args, epochs=EPOCHS_KILLED), tmp_path)
    deadline = time.time() + 300
    while not any(p.name.startswith("step-") and int(p.name[5:]) >= 10 for p in _checkpoints(run)):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    kill_tree(procs[1])  # node 1 dies without warning (node 0 then waits on it)
    time.sleep(0.5)
    kill_tree(procs[0])  # the scheduler then ends the job

    assert not (run / "model.safetensors").exists()
    finish(start(kind, free_port(), train_args(atlas, run, *args, "--resume", epochs=EPOCHS_KILLED), tmp_path))
    a, b = load_file(str(run / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def kill_tree(proc) -> None:
    """SIGKILL a launcher and every process under it (workers may sit in sessions of their own), and
    wait until all are gone: a worker left alive would still hold RUN_DIR's lock."""
    import psutil

    root = psutil.Process(proc.pid)
    everyone = [root, *root.children(recursive=True)]
    for p in everyone:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(everyone, timeout=60)
    assert not alive, alive
    proc.wait(timeout=60)


def _checkpoints(run: Path):
    return list((run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else []


def test_embedding_split_over_two_nodes_equals_one_process(atlas, tmp_path):
    run = tmp_path / "run"
    finish(start("torchrun", free_port(), train_args(atlas, run), tmp_path))
    embed = ["-m", "bigatlas", "embed", "--run-dir", str(run), "--data", atlas, "--chunk-size", "300"]
    finish(start("torchrun", free_port(), [*embed, "--out", str(tmp_path / "two.zarr")], tmp_path))
    res = subprocess.run([sys.executable, *embed, "--out", str(tmp_path / "one.zarr")], env=env(),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    two, one = zarr.open_group(str(tmp_path / "two.zarr")), zarr.open_group(str(tmp_path / "one.zarr"))
    assert two.attrs["bigatlas"]["complete"]
    for name in ("obsm/X_bigatlas", "obs/bigatlas_row", "obs/cell_type_pred/codes", "obs/cell_type_prob"):
        assert np.array_equal(two[name][:], one[name][:]), name
