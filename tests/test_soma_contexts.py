"""TileDB contexts of SOMA stores: one per process and configuration, and none carried into a fork; and
reading in a forked child after the parent read (SOMA and Zarr)."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import ROOT

from loaders import open_store, soma_store


def test_stores_and_reader_threads_share_one_context_per_configuration(position_stores):
    """Every store opened and every reader thread uses the process's context for its configuration:
    making and freeing one per handle (with its thread pools) corrupted the heap under churn."""
    before = dict(soma_store._CONTEXTS)
    stores = [open_store(position_stores["soma"]) for _ in range(3)]
    handles, lock = [], threading.Lock()

    def read(store):
        store.read(np.arange(0, 200, 7))
        with lock:
            handles.append(store._x())

    threads = [threading.Thread(target=read, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(handles) == 6 and len({id(h) for h in handles}) == 6, "a handle per reader thread"
    assert len({id(h.context) for h in handles}) == 1
    assert len(set(soma_store._CONTEXTS) - set(before)) <= 2  # at most: the stores' opens, and their reads
    other = soma_store.SomaStore(position_stores["soma"], tiledb_config={"sm.memory_budget": str(1 << 30)})
    other.read(np.arange(5))
    assert other._x().context is not handles[0].context  # another configuration: its own context


def test_embedding_outputs_and_written_stores_open_on_the_shared_context(position_stores, tmp_path):
    from types import SimpleNamespace

    from bigatlas.embedding import Embedding
    from bigatlas.infer import SomaOutput
    from bigatlas.write_store import SomaWriter

    ctx, uri = soma_store.soma_context(), position_stores["soma"]
    with SomaOutput(uri)._exp() as exp:  # embed's SOMA output, opened for each chunk it writes
        assert exp.context is ctx
    with Embedding._soma_experiment(SimpleNamespace(path=uri)) as exp:  # reading an embedding back
        assert exp.context is ctx
    with SomaWriter(tmp_path / "written.soma", 4, 3) as w:  # synth, prepare
        assert w.exp.context is ctx


FORK_SCRIPT = """
import multiprocessing as mp, sys
import numpy as np
from loaders import open_store

rows = np.arange(0, 300, 3)
parent = open_store(sys.argv[1])

def child_read(uri):
    store = parent if uri == "inherited" else open_store(uri)
    return store.read(rows).to_scipy().toarray(), np.asarray(store.obs_names(rows[:5]))

mine = parent.read(rows).to_scipy().toarray()  # the parent has contexts and reader threads when it forks
with mp.get_context("fork").Pool(2) as pool:
    theirs = pool.map(child_read, [sys.argv[2]] * 2)
assert all(np.array_equal(t, mine) for t, _ in theirs)
assert all(np.array_equal(n, parent.obs_names(rows[:5])) for _, n in theirs)
assert np.array_equal(parent.read(rows).to_scipy().toarray(), mine)  # and the parent reads on
print("FORKED READS MATCH", flush=True)
"""


@pytest.mark.parametrize("fmt", ["soma", "zarr", "zarr_dense"])
@pytest.mark.parametrize("opened", ["in the child", "inherited"])
def test_fork_children_read_a_store_their_parent_has_read(position_stores, fmt, opened):
    """A fork (a multiprocessing pool, a DataLoader's workers) after the parent read, each child opening the
    store itself or reading the store object it inherited. SOMA: the children make their own contexts,
    handles and reader threads and never free the parent's, whose thread pools they do not have (freeing
    one waited on them forever). Zarr: the children decode with zarr's own pipeline, not zarrs', whose
    thread pool they do not have. Either child hung on its first read before."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    arg = position_stores[fmt] if opened == "in the child" else "inherited"
    res = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, position_stores[fmt], arg], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FORKED READS MATCH" in res.stdout
