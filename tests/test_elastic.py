"""Elastic resume: a run interrupted mid-epoch continues on another number of processes or reader
threads. Property over world sizes, workers and kill points: the positions emitted before the stop
and after it cover the epoch exactly once; the next epoch is a normal full epoch on the new world;
a second resize inside the same epoch still holds; the same world continues the exact plan.
Bit-identical results across world sizes are impossible (the gradient sums run over other
minibatches); the partition property is what holds."""

import json
import math

import numpy as np
import pytest
from conftest import N_OBS, accelerate_launcher, run_script

from bigatlas.batches import holdout_mask
from bigatlas.rundir import RunDir
from bigatlas.synth import synth
from loaders import CellStream, open_store, sampling


def streams(store, world, workers, **kw):
    return [
        CellStream(store, batch_size=24, seed=3, rank=r, world_size=world, num_workers=workers, **kw)
        for r in range(world)
    ]


def run_until(ss, k: int | None):
    """Step every rank's stream k minibatches (None: to the epoch's end); positions emitted, last state."""
    seen = []
    for s in ss:
        if k is None:  # to the end, as the training loop does (the stream then moves to the next epoch)
            seen += [b.index.numpy() for b in s]
        else:
            it = iter(s)
            seen += [next(it).index.numpy() for _ in range(k)]
        state = json.loads(json.dumps(s.state_dict()))  # as the checkpoint stores it
        if k is not None:
            it.close()
    return (np.concatenate(seen) if seen else np.zeros(0, np.int64)), state


@pytest.mark.parametrize(("old", "new"), [((2, 1), (3, 1)), ((3, 1), (1, 1)), ((1, 2), (2, 1)), ((2, 2), (1, 3))])
@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_rest_of_the_epoch_is_dealt_once_to_the_new_world(position_stores, old, new, k):
    store = open_store(position_stores["zarr"])
    before, state = run_until(streams(store, *old, epoch=2), k)
    assert state["epoch"] == 2 and state["consumed"] == k
    new_streams = streams(store, *new)
    for s in new_streams:
        s.load_state_dict(state)
    lengths = {len(s) for s in new_streams}
    assert len(lengths) == 1  # every new rank yields the same number of minibatches
    after, _ = run_until(new_streams, None)
    both = np.concatenate([before, after])
    assert np.array_equal(np.sort(both), np.arange(N_OBS))  # each cell of the epoch exactly once
    assert np.array_equal(np.sort(after), sampling.remaining_positions(state))
    nxt = []
    for s in new_streams:  # the next epoch: the normal plan of the new world, every cell once
        assert s.epoch == 3 and "elastic" not in s.state_dict()
        nxt += [b.index.numpy() for b in s]
    assert np.array_equal(np.sort(np.concatenate(nxt)), np.arange(N_OBS))


@pytest.mark.parametrize("fmt_", ["zarr", "soma"])
def test_two_resizes_in_one_epoch_and_the_same_world_continues_exactly(position_stores, fmt_):
    store = open_store(position_stores[fmt_])
    first, state1 = run_until(streams(store, 2, 1, epoch=1), 3)
    middle_streams = streams(store, 3, 1)
    for s in middle_streams:
        s.load_state_dict(state1)
    second, state2 = run_until(middle_streams, 2)
    assert sampling.depth(state2) == 1
    # the same world continues the remainder plan exactly: what it emits equals an uninterrupted continuation
    same = streams(store, 3, 1)
    for s in same:
        s.load_state_dict(state1)
    _, _ = run_until(same, 2)
    cont = streams(store, 3, 1)
    for s in cont:
        s.load_state_dict(state2)
    rest_same, _ = run_until(cont, None)
    ref = streams(store, 3, 1)
    for s in ref:
        s.load_state_dict(state1)
    full_rest = [[b.index.numpy() for b in s] for s in ref]
    expected = np.concatenate([np.concatenate(batches[2:]) for batches in full_rest if len(batches) > 2])
    assert np.array_equal(np.sort(rest_same), np.sort(expected))
    last = streams(store, 1, 2)  # and a second resize, inside the same epoch
    for s in last:
        s.load_state_dict(state2)
    third, _ = run_until(last, None)
    assert np.array_equal(np.sort(np.concatenate([first, second, third])), np.arange(N_OBS))


def test_other_settings_still_refuse(position_stores):
    store = open_store(position_stores["zarr"])
    _, state = run_until(streams(store, 2, 1), 2)
    other = CellStream(store, batch_size=48, seed=3, world_size=3, rank=0)
    with pytest.raises(ValueError, match="batch_size: saved 24 vs now 48"):
        other.load_state_dict(state)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("elastic") / "a.zarr"
    synth(path, 2400, 80, "zarr", seed=9, n_studies=3, donors_per_study=2)
    return str(path)


@pytest.mark.parametrize("new_world", [1, 3])
def test_training_killed_on_two_processes_resumes_on_another_number(atlas, tmp_path, new_world):
    # no reference UMAP: not what is tested here, and ~15 s of numba's JIT a run
    args = ["--data", atlas, "--batch-key", "dataset_id", "--out", str(tmp_path / "run"), "--max-epochs", "2",
            "--batch-size", "64", "--checkpoint-every-steps", "5", "--trace-cells",
            "--ema-start", "warmup", "--no-reference-umap"]  # fmt: skip
    res = run_script("train.py", args, {"BIGATLAS_FAULT": "after_step:12"}, accelerate_launcher(2), check=False)
    assert res.returncode != 0 and not (tmp_path / "run" / "model.safetensors").exists()
    ckpt = RunDir(tmp_path / "run").latest()
    state = json.loads((ckpt / "bigatlas_rank0.json").read_text())["stream"]
    began = _average_start(ckpt)  # read now: the resumed run keeps the latest checkpoints only
    assert state["consumed"] > 0 and state["world_size"] == 2  # killed mid-epoch
    launcher = accelerate_launcher(new_world) if new_world > 1 else ()
    out = run_script("train.py", [*args, "--resume"], launcher=launcher)
    assert f"elastic resume: {new_world} process(es), the checkpoint had 2" in out.stdout
    train_cells = np.flatnonzero(~holdout_mask(np.arange(2400), 0.05, 0))
    epoch = state["epoch"]
    after = np.concatenate(
        [np.load(tmp_path / "run" / "trace" / f"rank{r}_epoch{epoch}.npy") for r in range(new_world)]
    )
    expected = np.intersect1d(sampling.remaining_positions(state), train_cells)
    assert np.array_equal(np.sort(after), expected)  # the rest of the epoch, each training cell once
    nxt = np.concatenate(
        [np.load(tmp_path / "run" / "trace" / f"rank{r}_epoch{epoch + 1}.npy") for r in range(new_world)]
    )
    assert np.array_equal(np.sort(nxt), train_cells)  # then full epochs on the new world
    assert (tmp_path / "run" / "model.safetensors").exists()
    # the weight average keeps the start it began with (the warm-up's end in 2 processes' steps), not the new world's
    kept = _average_start(RunDir(tmp_path / "run").latest())
    assert began == kept == math.ceil(2400 / 2 / 64)  # one epoch of warm-up (half of 2), of 2 processes' steps
    assert kept != math.ceil(2400 / new_world / 64)


def _average_start(checkpoint) -> int:
    from safetensors import safe_open

    from bigatlas.ema import FILE

    with safe_open(str(checkpoint / FILE), "pt") as f:
        return int(f.metadata()["start"])


def test_a_small_remainder_reaches_every_new_rank(position_stores):
    """Near the end of an epoch a few cells remain; big blocks would leave new ranks without any, so the
    remainder plan shrinks its blocks (each rank still needs two cells per minibatch in training)."""
    store = open_store(position_stores["zarr"])
    old = streams(store, 1, 1, block_size=256, min_batch=2)
    before, state = run_until(old, len(old[0]) - 2)
    new = streams(store, 3, 1, block_size=256, min_batch=2)
    for s in new:
        s.load_state_dict(state)
    assert 0 < new[0].elastic_cells < 64 and len({len(s) for s in new}) == 1 and len(new[0]) >= 1
    after, _ = run_until(new, None)
    assert np.array_equal(np.sort(np.concatenate([before, after])), np.arange(N_OBS))
