"""CellStream properties on real Zarr and SOMA stores whose values encode each row's position."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import N_LABELS, N_OBS, N_VARS, ROOT, decode_positions, position_rows

from loaders import CellStream, open_store

BLOCK = 16


def stream(uri, **kw):
    kw.setdefault("batch_size", 32)
    kw.setdefault("seed", 5)
    kw.setdefault("block_size", BLOCK)
    kw.setdefault("blocks_per_request", 4)
    return CellStream(open_store(uri) if isinstance(uri, str) else uri, **kw)


def indices(s):
    return [b.index.numpy() for b in s]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_exactly_once_across_ranks_and_workers(position_stores, fmt, world, workers):
    store = open_store(position_stores[fmt])
    seen, lengths = [], []
    for rank in range(world):
        s = stream(store, rank=rank, world_size=world, num_workers=workers)
        got = indices(s)
        assert len(got) == len(s)
        lengths.append(len(got))
        seen += got
    assert len(set(lengths)) == 1, "every rank must yield the same number of minibatches"
    allrows = np.concatenate(seen)
    assert np.array_equal(np.sort(allrows), np.arange(N_OBS))


def test_counts_match_store_at_index(position_stores, fmt):
    for b in stream(position_stores[fmt], obs_keys=["cell_type"]):
        x = b.x.to_dense().numpy()
        idx = b.index.numpy()
        assert np.array_equal(decode_positions(x), idx)
        ref = np.zeros_like(x)
        for r, i in enumerate(idx):
            p, c, v = position_rows(i, i + 1)
            ref[r, c] = v
        assert np.array_equal(x, ref)
        assert np.array_equal(b.obs["cell_type"].numpy(), idx * N_LABELS // N_OBS)


def test_order_is_a_function_of_seed_and_epoch(position_stores):
    uri = position_stores["zarr"]
    a = np.concatenate(indices(stream(uri, epoch=0)))
    assert np.array_equal(a, np.concatenate(indices(stream(uri, epoch=0))))
    assert not np.array_equal(a, np.concatenate(indices(stream(uri, epoch=1))))
    assert not np.array_equal(a, np.concatenate(indices(stream(uri, epoch=0, seed=6))))


def test_epochs_advance_and_differ(position_stores):
    s = stream(position_stores["zarr"])
    first, second = np.concatenate(indices(s)), np.concatenate(indices(s))
    assert s.epoch == 2
    assert np.array_equal(np.sort(first), np.sort(second)) and not np.array_equal(first, second)


@pytest.mark.parametrize("fmt", ["zarr", "soma"])
def test_a_dropped_stream_stops_the_readers_it_started_ahead(position_stores, fmt):
    """The last minibatch of an epoch starts the next epoch's readers; a stream dropped after that epoch
    is collected and stops them, with the store readers they hold (they used to wait forever)."""
    import gc
    import time

    s = stream(position_stores[fmt], num_workers=2)
    indices(s)
    ahead = list(s._next[1].threads)
    assert len(ahead) == 2 and all(t.is_alive() for t in ahead)  # waiting to hand over their first requests
    del s
    gc.collect()
    deadline = time.time() + 10
    while any(t.is_alive() for t in ahead) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in ahead)


EXIT_SCRIPT = """
import atexit, sys, threading

def readers_alive():
    return [t.name for t in threading.enumerate() if t.name.startswith("cellstream-") and t.is_alive()]

# registered before loaders is imported, so it runs after the loaders' own exit hook (atexit is LIFO)
atexit.register(lambda: print("AT EXIT", readers_alive(), flush=True))
from loaders import CellStream, open_store

keep = CellStream(open_store(sys.argv[1]), batch_size=32, seed=5, block_size=16, blocks_per_request=4, num_workers=2)
for _ in keep:  # one whole epoch: its last minibatch starts the next epoch's readers
    pass
iterating = iter(CellStream(open_store(sys.argv[1]), batch_size=32, seed=6, block_size=16, blocks_per_request=4))
next(iterating)  # an iteration abandoned midway, its generator still referenced at exit
print("BEFORE EXIT", readers_alive(), flush=True)
"""


@pytest.mark.parametrize("fmt", ["zarr", "soma"])
def test_reader_threads_are_stopped_before_the_interpreter_finalizes(position_stores, fmt):
    """A process that exits with readers still running (the next epoch's, started ahead; an abandoned
    iteration's) stops and joins them before Python finalizes: a daemon thread that comes back from a
    native read after that is killed inside the library and aborts the process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, position_stores[fmt]], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    before = next(line for line in res.stdout.splitlines() if line.startswith("BEFORE EXIT"))
    assert "cellstream-" in before, res.stdout  # the premise: readers were alive when the script ended
    assert "AT EXIT []" in res.stdout, res.stdout


def test_zarr_and_soma_give_identical_batches(position_stores):
    a = stream(position_stores["zarr"], num_workers=2)
    b = stream(position_stores["soma"], num_workers=2)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.index.numpy(), y.index.numpy())
        assert np.array_equal(x.x.to_dense().numpy(), y.x.to_dense().numpy())


class CountingStore:
    """Wraps a store and counts the rows it is asked to read."""

    def __init__(self, store):
        self.store, self.rows_read = store, 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def reader(self):
        return self

    def read(self, rows):
        self.rows_read += len(rows)
        return self.store.read(rows)


@pytest.mark.parametrize("k", [0, 1, 7, 20])
def test_resume_equals_uninterrupted(position_stores, fmt, k):
    store = open_store(position_stores[fmt])
    full = [(b.index.numpy(), b.x.to_dense().numpy()) for b in stream(store, num_workers=2, epoch=3)]
    first = stream(store, num_workers=2, epoch=3)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    it.close()
    counting = CountingStore(store)
    resumed = stream(counting, num_workers=2, prefetch_next_epoch=False)  # count this epoch's reads only
    resumed.load_state_dict(state)
    rest = [(b.index.numpy(), b.x.to_dense().numpy()) for b in resumed]
    assert len(rest) == len(full) - k
    for (i1, x1), (i2, x2) in zip(full[k:], rest, strict=True):
        assert np.array_equal(i1, i2) and np.array_equal(x1, x2)
    if k >= 20:  # whole requests before the resume point are skipped without reading
        assert counting.rows_read < N_OBS - 10 * 32


def test_state_mismatch_is_refused(position_stores):
    s = stream(position_stores["zarr"])
    other = stream(position_stores["zarr"], batch_size=64)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(s.state_dict())


def test_drop_last_gives_full_batches_without_repeats(position_stores):
    got = []
    lens = []
    for rank in range(2):
        s = stream(position_stores["zarr"], rank=rank, world_size=2, drop_last=True, batch_size=50)
        b = indices(s)
        lens.append(len(b))
        got += b
    assert len(set(lens)) == 1 and all(len(x) == 50 for x in got)
    allrows = np.concatenate(got)
    consumers = 2 * 2  # ranks x default reader threads; each drops its own short tail
    assert len(np.unique(allrows)) == len(allrows) > N_OBS - consumers * (50 + 2 * BLOCK)


def test_gene_subset_by_id_and_name(position_stores, fmt):
    genes = ["G7", "ENSG00003", "G30"]
    cols = [7, 3, 30]
    for b in stream(position_stores[fmt], genes=genes):
        x = b.x.to_dense().numpy()
        assert x.shape[1] == 3
        for r, i in enumerate(b.index.numpy()):
            _, c, v = position_rows(i, i + 1)
            dense = np.zeros(N_VARS, np.float32)
            dense[c] = v
            assert np.array_equal(x[r], dense[cols])


def test_obs_filter_selects_same_cells_in_both_formats(position_stores):
    expr = "tissue_general == 'blood' and is_primary_data == True"
    i = np.arange(N_OBS)
    expected = np.flatnonzero((i % 3 == 0) & (i % 7 != 0))
    for fmt in ("zarr", "soma"):
        store = open_store(position_stores[fmt], obs_filter=expr)
        assert store.n_obs == len(expected)
        got = np.concatenate([decode_positions(b.x.to_dense().numpy()) for b in stream(store)])
        assert np.array_equal(np.sort(got), expected)


def entropy_per_batch(labels_per_batch, n_labels):
    out = []
    for lab in labels_per_batch:
        p = np.bincount(lab, minlength=n_labels) / len(lab)
        p = p[p > 0]
        out.append(-(p * np.log(p)).sum())
    return float(np.mean(out))


def test_minibatches_mix_labels_like_a_random_permutation(tmp_path):
    from conftest import write_position_store

    n = 30_000
    uri = write_position_store(tmp_path / "sorted.zarr", "zarr", n_obs=n, chunk_rows=5000)
    s = CellStream(
        open_store(uri),
        batch_size=256,
        seed=0,
        block_size=64,
        blocks_per_request=64,
        obs_keys=["cell_type"],
        num_workers=2,
    )
    got = entropy_per_batch([b.obs["cell_type"].numpy() for b in s], N_LABELS)
    labels = np.arange(n) * N_LABELS // n
    perm = np.random.default_rng(0).permutation(labels)
    ref = entropy_per_batch([perm[i : i + 256] for i in range(0, n, 256)], N_LABELS)
    sequential = entropy_per_batch([labels[i : i + 256] for i in range(0, n, 256)], N_LABELS)
    assert sequential < 0.1 * ref  # the store really is sorted by label
    assert got >= 0.95 * ref, (got, ref)


def test_counts_are_validated_until_a_whole_epoch_has_been_read(position_stores, monkeypatch):
    """validate checks every request until the stream has read one whole epoch (a resumed, partial epoch
    does not count): every cell is checked at least once, and later epochs skip the check."""
    import loaders.stream as stream_module

    checked = []
    monkeypatch.setattr(stream_module, "check_counts", lambda m, store, integer, positions: checked.append(positions))
    first = stream(position_stores["zarr"], num_workers=2, epoch=3, validate="counts")
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    it.close()
    s = stream(position_stores["zarr"], num_workers=2, validate="counts", prefetch_next_epoch=False)
    s.load_state_dict(state)
    per_epoch = []
    for _ in range(3):  # the rest of epoch 3, then epochs 4 and 5
        checked.clear()
        indices(s)
        per_epoch.append(np.concatenate(checked) if checked else np.zeros(0, np.int64))
    assert 0 < len(per_epoch[0]) < N_OBS  # the resumed epoch's remaining reads only
    assert np.array_equal(np.unique(per_epoch[1]), np.arange(N_OBS))  # the first whole epoch: every cell
    assert len(per_epoch[2]) == 0  # then no more


def test_a_dense_anndata_zarr_streams_as_its_csr_copy(position_stores):
    """anndata writes a numpy X as a dense Zarr array: read in row blocks, it gives the CSR store's minibatches."""
    from loaders import zarr_store

    where = "donor_id != 'd2'"
    zarr_store._WARNED_DENSE.discard(position_stores["zarr_dense"])
    with pytest.warns(UserWarning, match=r"X is stored dense, slower .*prepare --data .*pos_dense.zarr --convert"):
        dense = open_store(position_stores["zarr_dense"], obs_filter=where)
    sparse = open_store(position_stores["zarr"], obs_filter=where)
    assert dense.dense and not sparse.dense and dense.n_obs == sparse.n_obs < N_OBS
    got, want = (list(stream(s, num_workers=2, obs_keys=["cell_type"])) for s in (dense, sparse))
    assert len(got) == len(want) and np.array_equal(np.sort(np.concatenate([b.index.numpy() for b in got])),
                                                    np.arange(dense.n_obs))  # fmt: skip
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a.index.numpy(), b.index.numpy())
        assert np.array_equal(a.x.to_dense().numpy(), b.x.to_dense().numpy())
        assert np.array_equal(a.obs["cell_type"].numpy(), b.obs["cell_type"].numpy())
