"""The TileDB gate (loaders.tiledb_gate): reads run together, set-up runs alone and waits for running reads, a
waiting set-up holds new reads back, set-up is reentrant in its thread, and a fork starts the child a free gate."""

import os
import threading
import time

import pytest

from loaders import tiledb_gate
from loaders.tiledb_gate import Gate


def _started(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_reads_run_together_and_set_up_waits_for_them_and_holds_new_reads_back():
    gate, events = Gate(), []
    both_in, release = threading.Barrier(3), threading.Event()

    def read(name):
        with gate.together():
            events.append(f"{name} in")
            both_in.wait(timeout=10)  # both reads inside at once, or this times out
            release.wait(timeout=10)
            events.append(f"{name} out")

    readers = [_started(lambda n=n: read(n)) for n in ("r1", "r2")]
    both_in.wait(timeout=10)

    def set_up():
        with gate.alone():
            events.append("set-up")

    def read_late():
        with gate.together():
            events.append("late read")

    writer = _started(set_up)
    time.sleep(0.2)
    late = _started(read_late)
    time.sleep(0.2)
    assert "set-up" not in events and "late read" not in events  # the set-up waits, and so does a new read
    release.set()
    for t in (*readers, writer, late):
        t.join(timeout=10)
    assert events.index("set-up") > max(events.index("r1 out"), events.index("r2 out"))
    assert events.index("late read") > events.index("set-up")


def test_set_up_is_reentrant_and_a_read_inside_its_own_set_up_is_refused():
    gate = Gate()
    with gate.alone():
        with gate.alone():  # an open that fetches the shared context inside
            pass
        with pytest.raises(RuntimeError, match="inside this thread's own set-up"):
            with gate.together():
                pass
    done = []
    t = _started(lambda: done.append(gate.together().__enter__()))
    t.join(timeout=10)
    assert len(done) == 1  # released whole: another thread reads


def test_a_forked_child_gets_a_free_gate():
    """Another thread holds the gate at the fork; that thread is not in the child, whose set-up goes on (with the
    parent's gate it would wait forever: the child is killed after 20 s)."""
    holding, fork_done = threading.Event(), threading.Event()

    def hold():
        with tiledb_gate.alone():
            holding.set()
            fork_done.wait(timeout=30)

    holder = _started(hold)
    holding.wait(timeout=10)
    pid = os.fork()
    if pid == 0:
        with tiledb_gate.alone():
            pass
        os._exit(0)
    fork_done.set()
    holder.join(timeout=10)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the child waited on its parent's gate")
    assert os.waitstatus_to_exitcode(done[1]) == 0
