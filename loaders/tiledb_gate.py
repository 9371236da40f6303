"""The process's one gate for TileDB-SOMA calls: set-up runs alone, reads run together.

Set-up is everything that makes or inspects TileDB objects (contexts, opening an experiment or array, setting up
a query: its handle's schema, columns and coordinates); a read is a set-up query's next piece. Reads of several
threads run at once (that is where the time goes); set-up waits until no read is running and keeps new ones out
while it runs. Without the gate a reader thread setting up its query (reading its own handle's schema or columns)
while another thread's query ran crashed the process in native code: a SIGABRT in one CI run in six, and a
SIGSEGV in 2 of 56 one-minute runs of a stream stress (two streams over one SOMA store, two sub-reads each), when
set-ups also ran beside each other. With set-ups one at a time (a lock, beside reads: `python -m bench.soma_stress
--modes streams streams-ungated`) the stress ran 0 crashes in 78 runs, as with the gate in 40
(bench/results/soma_stress_streams.json); the gate also keeps set-up apart from reads, which the crashed threads
were beside, at no cost measured on reads of real size (a 100k x 2,000 store: 46.1k cells/s with it, 43.9k without).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager


class Gate:
    """Set-up alone (reentrant: an open may set up its context inside), reads together; set-up that waits keeps
    new reads out, so a stream of reads cannot starve it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._reads = 0
        self._owner: int | None = None  # the thread whose set-up runs
        self._depth = 0
        self._waiting = 0  # set-ups waiting for the reads to end

    @contextmanager
    def alone(self):
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                self._waiting += 1
                while self._owner is not None or self._reads:
                    self._cond.wait()
                self._waiting -= 1
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                    self._cond.notify_all()

    @contextmanager
    def together(self):
        with self._cond:
            if self._owner == threading.get_ident():
                raise RuntimeError("a TileDB read inside this thread's own set-up")
            while self._owner is not None or self._waiting:
                self._cond.wait()
            self._reads += 1
        try:
            yield
        finally:
            with self._cond:
                self._reads -= 1
                if self._reads == 0:
                    self._cond.notify_all()


_GATE = Gate()


def alone():
    """TileDB set-up: runs when no read runs, one at a time."""
    return _GATE.alone()


def together():
    """A TileDB read: runs beside other reads, never beside set-up."""
    return _GATE.together()


def _after_fork_in_child() -> None:
    """A fork copies the gate as it is (held by a thread the child does not have): the child starts a new one."""
    global _GATE
    _GATE = Gate()


os.register_at_fork(after_in_child=_after_fork_in_child)
