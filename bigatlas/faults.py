"""Fault injection for tests, behind one object: BIGATLAS_FAULT="<point>:<step>[=<ERRNO>][@<rank>]"
names the point (after_step, checkpoint_written, after_chunk, nan_loss; checkpoint_write,
chunk_write, store_write for I/O errors) and step where a fault happens, on every rank or only the
given one; with =ENOSPC or =EIO the fault is that OSError instead of a kill. Unset, every question
answers "no" at the cost of a comparison."""

from __future__ import annotations

import errno
import os
import signal


class Faults:
    def __init__(self, spec: str | None = None):
        spec = os.environ.get("BIGATLAS_FAULT", "") if spec is None else spec
        where, _, rank = spec.partition("@")
        where, _, err = where.partition("=")
        mine = not rank or rank == os.environ.get("RANK", "0")
        self.point = where if (where and mine) else None
        self.errno = getattr(errno, err) if err else None

    def at(self, point: str, step: int) -> bool:
        """Whether the fault is due here."""
        return self.point is not None and self.point == f"{point}:{step}"

    def kill(self, point: str, step: int) -> None:
        """SIGKILL this process when the fault is due here (no clean-up runs: a real crash)."""
        if self.at(point, step):
            os.kill(os.getpid(), signal.SIGKILL)

    def io(self, point: str, step: int, path) -> None:
        """Raise the injected OSError (ENOSPC, EIO, …) when it is due here, as a failing write of path."""
        if self.errno is not None and self.at(point, step):
            raise OSError(self.errno, os.strerror(self.errno), str(path))
