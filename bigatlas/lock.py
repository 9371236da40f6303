"""One writer per output: `train` holds RUN_DIR/.lock, `embed` holds <OUT>.lock, for as long as the
process runs (main process only; the other ranks belong to the same run); a store writer (`synth`,
`prepare --convert`) and `evaluate` hold <OUT>.lock while they write, and `reference` holds
RUN_DIR/.lock. The lock is an flock on the file, so the kernel drops it when its holder dies: a stale
lock from a killed process is simply taken over. flock needs a file system that supports it (local
disks do; some network file systems and object stores do not, and there a second writer is not
detected)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class OutputLock:
    def __init__(self, path, what: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise FileExistsError(
                f"{what} is in use by process {holder} (lock {self.path}); wait for it to finish or stop it"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.release()
        return False
