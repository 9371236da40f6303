"""SOMA open-and-read stress: many stores opened again and again, each read by its own reader threads,
in child processes, with TileDB contexts shared (the loader's way) or made per open and per handle (how
the loader made them before). A child that dies by a signal (glibc's heap checks abort) is a crash.

Each run is one child process looping for --seconds: open --stores stores, read each from its own
thread --reads times (random rows), drop them, again. One child of each mode runs at a time, side by
side, so both see the same machine. Reports per mode: runs, crashes (with their signals), rounds.
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

MODES = ("shared", "per-open")


def add_arguments(p) -> None:
    p.add_argument("--data-dir", default="bench/data", help="where the store is built or reused")
    p.add_argument("--cells", type=int, default=1000, help="cells in the stress store")
    p.add_argument("--genes", type=int, default=50, help="genes in the stress store")
    p.add_argument("--runs", type=int, default=4, help="child processes per mode")
    p.add_argument("--seconds", type=float, default=240, help="how long each child loops")
    p.add_argument("--stores", type=int, default=6, help="stores opened (and read at once) per round")
    p.add_argument("--reads", type=int, default=5, help="reads per store per round")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="context modes to run")
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
