"""SOMA open-and-read stress: many stores opened again and again, each read by its own reader threads,
in child processes, with TileDB contexts shared (the loader's way) or made per open and per handle (how
the loader made them before). A child that dies by a signal (glibc's heap checks abort) is a crash.

Each run is one child process looping for --seconds: open --stores stores, read each from its own
thread --reads times (random rows), drop them, again. One child of each mode runs at a time, side by
side, so both see the same machine. Reports per mode: runs, crashes (with their signals), rounds.

`--modes streams streams-ungated` runs the stream stress instead: each child opens one store again and again and
reads it through two CellStreams at once (two reader threads each, two TileDB sub-reads per read), with the
loader's TileDB gate (loaders.tiledb_gate: set-up alone, reads together) or with set-up one at a time but beside
other threads' reads, as before the gate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.common import ensure_store, main, write_results

CHILD = """
import sys, threading, time
import numpy as np
from loaders import open_store, soma_store

uri, mode, seconds, n_stores, reads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if mode == "per-open":  # the loader before shared contexts: a fresh context for every open and handle
    soma_store.soma_context = lambda tiledb_config=None: soma_store._soma().SOMATileDBContext(
        tiledb_config=dict(tiledb_config or {})
    )


if mode.startswith("streams"):  # two streams over one store, as the loader's tests use them
    from loaders import CellStream

    if mode == "streams-ungated":  # set-up one at a time but beside other threads' reads (before the gate)
        import contextlib

        lock = threading.RLock()
        soma_store.alone, soma_store.together = (lambda: lock), contextlib.nullcontext
    t0, rounds = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        store = open_store(uri)
        kw = dict(batch_size=32, seed=5, block_size=16, blocks_per_request=4, num_workers=2)
        sum(len(b.index) for b in CellStream(store, epoch=rounds, **kw))
        it = iter(CellStream(store, epoch=3, **kw))  # a second stream, left after 5 minibatches
        for _ in range(5):
            next(it)
        it.close()
        rounds += 1
    print("ROUNDS", rounds, flush=True)
    sys.exit(0)


def work(store, seed):
    rng = np.random.default_rng(seed)
    for _ in range(reads):
        store.read(np.sort(rng.choice(store.n_obs, min(300, store.n_obs), replace=False)))


t0, rounds = time.perf_counter(), 0
while time.perf_counter() - t0 < seconds:
    stores = [open_store(uri) for _ in range(n_stores)]
    threads = [threading.Thread(target=work, args=(s, rounds * n_stores + i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rounds += 1
print("ROUNDS", rounds, flush=True)
"""

MODES = ("shared", "per-open", "streams", "streams-ungated")


def add_arguments(p) -> None:
    p.add_argument("--data-dir", default="bench/data", help="where the store is built or reused")
    p.add_argument("--cells", type=int, default=1000, help="cells in the stress store")
    p.add_argument("--genes", type=int, default=50, help="genes in the stress store")
    p.add_argument("--runs", type=int, default=4, help="child processes per mode")
    p.add_argument("--seconds", type=float, default=240, help="how long each child loops")
    p.add_argument("--stores", type=int, default=6, help="stores opened (and read at once) per round")
    p.add_argument("--reads", type=int, default=5, help="reads per store per round")
    p.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES[:2]),
        help="context modes (shared, per-open), or streams: two streams of two reader threads over one store "
        "again and again, with the loader's TileDB gate or with set-up one at a time but beside other threads' reads "
        "(streams-ungated)",
    )  # fmt: skip
    p.add_argument("--out", default="bench/results/soma_stress.json")


def _start(script, uri, mode, a, env) -> subprocess.Popen:
    argv = [sys.executable, "-c", script, uri, mode, str(a.seconds), str(a.stores), str(a.reads)]
    return subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(a) -> dict:
    uri = ensure_store(a.data_dir, a.cells, a.genes, "soma", prefix="stress")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    res = {m: {"runs": 0, "crashes": 0, "signals": [], "rounds": []} for m in a.modes}
    t0 = time.perf_counter()
    for i in range(a.runs):
        procs = {m: _start(CHILD, uri, m, a, env) for m in a.modes}
        for m, p in procs.items():
            out, err = p.communicate(timeout=a.seconds + 300)
            r = res[m]
            r["runs"] += 1
            if p.returncode < 0:  # killed by a signal: 6 is glibc's abort on a corrupted heap
                r["crashes"] += 1
                r["signals"].append(-p.returncode)
            elif p.returncode != 0:
                raise SystemExit(f"stress child ({m}) failed without a signal:\n{err[-3000:]}")
            rounds = [int(line.split()[1]) for line in out.splitlines() if line.startswith("ROUNDS")]
            r["rounds"].append(rounds[0] if rounds else None)
        print(f"run {i + 1}/{a.runs}: " + ", ".join(f"{m} {res[m]['crashes']} crashed" for m in a.modes), flush=True)
    meta = {k: getattr(a, k) for k in ("cells", "genes", "runs", "seconds", "stores", "reads")}
    command = "python -m bench.soma_stress " + " ".join(sys.argv[1:])
    wall = round(time.perf_counter() - t0, 1)
    return write_results({"command": command, "config": meta, "wall_s": wall, **res}, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
