"""A full disk or an I/O error while writing, and a second writer on the same output: one error
naming the path, nothing marked complete, the last good checkpoint kept; a lock from a killed
process is taken over."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from conftest import ROOT, cli

from bigatlas.synth import synth


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("disk") / "a.zarr"
    synth(path, 1200, 60, "zarr", seed=4, n_studies=2, donors_per_study=2)
    return str(path)


@pytest.fixture(scope="module")
def run(atlas, tmp_path_factory):
    out = tmp_path_factory.mktemp("diskrun") / "run"
    res = cli(["train", "--data", atlas, "--batch-key", "dataset_id", "--out", str(out), "--max-steps", "3"])
    assert res.returncode == 0, res.stderr[-2000:]
    return str(out)


def one_error(res, command):
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith(f"bigatlas {command}: error: ")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def test_full_disk_while_checkpointing_keeps_the_last_good_one(atlas, tmp_path):
    out = tmp_path / "r"
    args = ["train", "--data", atlas, "--batch-key", "dataset_id", "--out", str(out), "--max-epochs", "1",
            "--batch-size", "64", "--checkpoint-every-steps", "5"]  # fmt: skip
    line = one_error(cli(args, {"BIGATLAS_FAULT": "checkpoint_write:10=ENOSPC"}), "train")
    assert "No space left on device" in line and str(out / "checkpoints" / ".tmp-step-000000010") in line
    assert "the last good checkpoint stays" in line and "step-000000005" in line
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000000005"
    assert not (out / "checkpoints" / ".tmp-step-000000010").exists() and not (out / "model.safetensors").exists()
    assert cli([*args, "--resume"]).returncode == 0 and (out / "model.safetensors").exists()


def test_io_error_while_embedding_leaves_the_output_incomplete(atlas, run, tmp_path):
    out = tmp_path / "e.zarr"
    args = ["embed", "--run", run, "--data", atlas, "--out", str(out), "--chunk-size", "256"]
    line = one_error(cli(args, {"BIGATLAS_FAULT": "chunk_write:2=EIO"}), "embed")
    assert "Input/output error" in line and f"chunk 2 (cells 512-768) of {out}" in line
    assert zarr.open_group(str(out), mode="r").attrs["bigatlas"]["complete"] is False
    assert cli(args).returncode == 0
    assert zarr.open_group(str(out), mode="r").attrs["bigatlas"]["complete"] is True


@pytest.mark.parametrize("command", ["prepare", "synth"])
def test_full_disk_while_writing_a_store_keeps_nothing(atlas, tmp_path, command):
    out = tmp_path / "s.zarr"
    if command == "prepare":
        args = ["prepare", atlas, "--out", str(tmp_path / "p"), "--convert", str(out), "--n-top-genes", "0"]
    else:
        args = ["synth", str(out), "--cells", "5000", "--genes", "50"]
    line = one_error(cli(args, {"BIGATLAS_FAULT": "store_write:1=ENOSPC"}), command)
    assert "No space left on device" in line and f"writing {out} failed" in line
    assert not out.exists() and not (tmp_path / "s.zarr.partial").exists()


HOLD = (
    "import sys, time; from bigatlas.lock import OutputLock; lock = OutputLock(sys.argv[1], 'x'); "
    "print('held', flush=True); time.sleep(600)"
)


def hold(path):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(atlas, run, tmp_path):
    out = tmp_path / "e.zarr"
    args = ["embed", "--run", run, "--data", atlas, "--out", str(out)]
    holder = hold(tmp_path / "e.zarr.lock")
    try:
        line = one_error(cli(args), "embed")
        assert f"output {out} is in use by process {holder.pid}" in line and not out.exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
        holder.wait()
    assert (tmp_path / "e.zarr.lock").exists()
    assert cli(args).returncode == 0 and out.exists()


def test_rebuilding_the_reference_of_a_run_dir_in_use_is_refused(run):
    """`bigatlas reference` rewrites RUN_DIR/reference/ through one reference.tmp: not while training (or another
    rebuild) holds the run dir."""
    index = Path(run) / "reference" / "index.safetensors"
    before = index.stat().st_mtime_ns
    holder = hold(Path(run) / ".lock")
    try:
        line = one_error(cli(["reference", "--run", run]), "reference")
        assert f"RUN_DIR {run} is in use by process {holder.pid}" in line
        assert index.stat().st_mtime_ns == before and not (Path(run) / "reference.tmp").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_of_a_store_is_refused_and_leaves_the_firsts_partial_alone(tmp_path):
    """Two writers to one output would share `<out>.partial`: the second deleted the first's folder and
    both wrote into one, which the first then renamed into place as if complete. `synth` here; `prepare
    --convert` writes through the same writer class (write_store._PartialStore), which holds the lock."""
    out = tmp_path / "s.zarr"
    args, command = ["synth", str(out), "--cells", "500", "--genes", "50"], "synth"
    first = tmp_path / "s.zarr.partial"
    first.mkdir()
    (first / "being_written").write_text("the first writer's")
    holder = hold(tmp_path / "s.zarr.lock")
    try:
        line = one_error(cli(args), command)
        assert f"output {out} is in use by process {holder.pid}" in line
        assert (first / "being_written").exists() and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli(args).returncode == 0 and out.exists() and not first.exists()


def test_train_on_a_run_dir_in_use_is_refused(atlas, tmp_path):
    out = tmp_path / "r"
    holder = hold(out / ".lock")
    try:
        res = cli(["train", "--data", atlas, "--batch-key", "dataset_id", "--out", str(out), "--max-steps", "1"])
        line = one_error(res, "train")
        assert f"RUN_DIR {out} is in use by process {holder.pid}" in line
        assert not (out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
