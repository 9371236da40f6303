"""Preemption: SIGTERM to the launcher of a 2-process run (what SLURM / Kubernetes send before the
kill) at a random moment: every rank finishes its step, one checkpoint is written, the workers exit
with PREEMPTED_EXIT, and `--resume` ends bit-identical to an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, accelerate_launcher
from safetensors.numpy import load_file

from bigatlas.preempt import PREEMPTED_EXIT
from bigatlas.rundir import load_run
from bigatlas.synth import synth


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("preempt") / "a.zarr"
    synth(path, 2400, 100, "zarr", seed=4, n_studies=3, donors_per_study=2)
    return str(path)


def train_cmd(atlas, run, *extra):  # no reference UMAP: not what is tested here, and ~15 s of numba's JIT a run
    args = ["--data", atlas, "--batch-key", "dataset_id", "--label-keys", "cell_type", "--out", str(run),
            "--max-epochs", "8", "--batch-size", "64", "--no-reference-umap", *extra]  # fmt: skip
    return [*accelerate_launcher(2), "-m", "bigatlas.train", *args]


def env():
    e = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    e["PYTHONPATH"] = str(ROOT)
    return e


def weights(run):
    return load_file(str(Path(run) / "model.safetensors"))


def started(proc, run) -> float:
    """Wait until training has set up (vocab written, SIGTERM handler installed); the time then."""
    deadline = time.time() + 120
    while not (run / "vocab.json").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    return time.time()


@pytest.fixture(scope="module")
def uninterrupted(atlas, tmp_path_factory):
    """Weights of the uninterrupted run, and how long its training took."""
    run = tmp_path_factory.mktemp("full") / "run"
    proc = subprocess.Popen(train_cmd(atlas, run), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started(proc, run)
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    # the training part: from the vocabulary (written at set-up) to the weights (written after the last step)
    return weights(run), (run / "model.safetensors").stat().st_mtime - (run / "vocab.json").stat().st_mtime


@pytest.mark.parametrize("seed", [0, 1])
def test_sigterm_checkpoints_exits_and_resumes_bit_identically(atlas, uninterrupted, tmp_path, seed):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(atlas, run), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    full, seconds = uninterrupted
    started(proc, run)
    # a random moment of the training, early enough for a run up to 2.5x faster than the timed one (pytest -n)
    time.sleep(random.Random(seed).uniform(0.1, 0.4) * seconds)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stopped_in = time.time() - t0
    assert not (run / "model.safetensors").exists(), "the run ended before SIGTERM: the moment was too late"
    assert stopped_in < 60, stopped_in  # bounded: a step and a checkpoint, not the launcher's kill timeout
    assert "preempted: stopped on SIGTERM" in err, err[-3000:]
    assert err.count("preempted: stopped on SIGTERM") == 2  # each rank, after the same step
    steps = {line.split("after step ")[1].split(" ")[0] for line in err.splitlines() if "after step" in line}
    assert len(steps) == 1, steps
    assert (run / "checkpoints").exists()
    with pytest.raises(FileNotFoundError, match=r"has not finished .* resume it"):  # not "vocab.json is missing"
        load_run(run)
    res = subprocess.run(train_cmd(atlas, run, "--resume"), env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = weights(run)
    for k, v in full.items():
        assert np.array_equal(got[k], v), k


def test_sigterm_exit_code_of_one_process(atlas, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "bigatlas.train", "--data", atlas, "--batch-key", "dataset_id", "--out", str(run),
           "--max-epochs", "50", "--batch-size", "64"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), stderr=subprocess.PIPE, text=True)
    while not (run / "vocab.json").exists():
        assert proc.poll() is None
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
    assert len([line for line in err.splitlines() if "error" in line or "preempted" in line]) == 1
