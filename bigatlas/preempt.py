"""Preemption: SLURM and Kubernetes send SIGTERM before they kill. The handler only records it; the
trainer folds the record into the per-step all-ranks check it already makes (the NaN check), so
every rank stops after the same step, one checkpoint is written, and the run exits with
PREEMPTED_EXIT. `--resume` then continues bit-identically.
"""

from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a temporary failure; rerun with --resume


class Preempted(Exception):
    """The run stopped on SIGTERM after writing a checkpoint."""


class Preemption:
    """Records SIGTERM while installed (a `with` block); `requested` is this process's own view,
    `agreed` what all ranks decided at the last step."""

    def __init__(self):
        self.requested = False
        self.agreed = False
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
