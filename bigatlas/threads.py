"""torch's thread count, kept across numba's parallel code (the kNN scan, UMAP).

numba's OpenMP threading layer runs on the OpenMP runtime torch loaded, and each of its parallel regions sets
that runtime's default team size for the calling thread to numba's own count (every logical CPU unless set).
torch's next parallel region then uses that count: after a reference build, a process that had
`torch.set_num_threads(1)` trained on 2 threads, and two such processes on 2 cores spun on each other's OpenMP
barriers at 1/30 of their speed. Every call into numba's parallel code runs inside `torch_threads_kept()`, which
also caps numba at torch's count (a thread limit the user set holds for the kNN search and the UMAP too).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads_kept():
    n = torch.get_num_threads()
    try:
        import numba

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    except ImportError:  # pragma: no cover - numba comes with umap-learn
        pass
    try:
        yield
    finally:
        torch.set_num_threads(n)
