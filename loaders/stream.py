"""CellStream: epoch plan → pooled reads on threads → shuffled minibatches, exactly once per epoch.

Each rank runs `num_workers` reader threads; each thread is one consumer of the plan (consumer id
rank * num_workers + worker) and decodes its read requests up to `prefetch` ahead. The iterating
thread cuts each consumer's requests into minibatches, carrying leftover rows into the next
request, so only the per-consumer sizes from `sampling.batch_sizes` decide where minibatches end.
The rank yields the consumers' batches round-robin; every rank yields the same count.
`validate="counts"` (what training uses) checks every decoded request for NaN/inf, negative and
non-integer values (~20 ms per 20M values; 2-3% of a training epoch's time on 2 cores) until the stream
has read one whole epoch: the same cells come back every epoch. The bare loader leaves it off.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from . import sampling
from .csr import CSR, check_counts, compact, concat, select_columns, take_rows
from .formats import is_anndata, open_store
from .store import Store, measured_panels

# torch's notice that sparse CSR is "beta" would print once per process for every user
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

_ELASTIC_KEYS = {"world_size", "num_workers", "block_size"}  # may differ on resume (see load_state_dict)
_STATE_KEYS = (
    "seed",
    "world_size",
    "num_workers",
    "batch_size",
    "block_size",
    "blocks_per_request",
    "n_obs",
    "drop_last",
    "shuffle",
    "min_batch",
    "segments",
)


@dataclass
class Batch:
    x: torch.Tensor  # torch.sparse_csr float32, cells × selected genes
    index: torch.Tensor  # int64 positions of the rows in the (filtered) store
    obs: dict[str, torch.Tensor]  # obs key → int64 category codes (-1 = missing)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def dense(self, device=None) -> torch.Tensor:
        """Counts as a dense float32 tensor, densified on `device` (move sparse, densify there)."""
        return self.x.to(device).to_dense() if device is not None else self.x.to_dense()


def _to_batch(m: CSR, index: np.ndarray, codes: dict[str, np.ndarray]) -> Batch:
    obs = {k: torch.from_numpy(v[index].astype(np.int64)) for k, v in codes.items()}  # stored compact
    return Batch(m.to_torch(), torch.from_numpy(index), obs)


class _Stop(Exception):
    pass


# Every reader thread started, with its stop flag: at interpreter exit they are stopped and joined before
# Python finalizes. A daemon thread still inside a native read then (zarrs, TileDB; the next epoch's
# readers start ahead, an abandoned iteration's keep going) is killed by CPython when it takes the GIL
# back from inside the library's frames, and that unwinding aborts the whole process.
_STARTED: list[tuple[threading.Thread, threading.Event]] = []
_STARTED_LOCK = threading.Lock()
EXIT_JOIN_SECONDS = 10.0


def _track(thread: threading.Thread, stop: threading.Event) -> None:
    with _STARTED_LOCK:
        _STARTED[:] = [(t, e) for t, e in _STARTED if t.is_alive()]
        _STARTED.append((thread, stop))


def stop_all_readers(timeout: float = EXIT_JOIN_SECONDS) -> None:
    """Stop every reader thread of this process and wait up to `timeout` seconds in all for them to
    finish the read they are in (run at interpreter exit)."""
    with _STARTED_LOCK:
        started = list(_STARTED)
    for _, stop in started:
        stop.set()
    deadline = time.monotonic() + timeout
    for t, _ in started:
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))


atexit.register(stop_all_readers)


class _Readers:
    """One epoch's reader threads and their queues of decoded requests."""

    def __init__(self, queues):
        self.queues, self.threads, self.stop = queues, [], threading.Event()

    def close(self, join: bool = True) -> None:
        self.stop.set()
        for q in self.queues:  # unblock readers waiting on a full queue
            while not q.empty():
                q.get_nowait()
        for t in self.threads if join else ():
            if t is not threading.current_thread():
                t.join(timeout=5)


class CellStream(torch.utils.data.IterableDataset):
    def __init__(
        self,
        store,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        genes=None,
        obs_keys=(),
        drop_last: bool = False,
        block_size: int | None = None,
        blocks_per_request: int | None = None,
        prefetch: int = 1,
        shuffle: bool = True,
        epoch: int = 0,
        colmap: np.ndarray | None = None,
        validate: str | None = None,
        prefetch_next_epoch: bool = True,
        min_batch: int = 1,
    ):
        if isinstance(store, str | os.PathLike) or is_anndata(store):
            store = open_store(store)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        blocks_per_request = blocks_per_request or store.blocks_per_request
        if batch_size < 1 or num_workers < 1 or blocks_per_request < 1:
            raise ValueError("batch_size, num_workers and blocks_per_request must be >= 1")
        self.store = store
        self.batch_size, self.seed, self.min_batch = int(batch_size), int(seed), int(min_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.block_size = self._fit_plan(store, int(num_workers), block_size)
        self.blocks_per_request, self.prefetch = int(blocks_per_request), int(prefetch)
        self.drop_last, self.shuffle = bool(drop_last), bool(shuffle)
        self.n_obs = store.n_obs
        self.obs_keys = tuple(obs_keys)
        self._codes = {k: store.obs_codes(k)[0] for k in self.obs_keys}
        self._colmap, self.n_genes = None, store.n_vars
        if genes is not None or colmap is not None:
            # colmap (store column → output column, -1 = dropped) lets a caller zero-fill genes the
            # store lacks; `genes` requires every gene to be present
            if colmap is None:
                colmap, n_out = store.gene_map(genes), len(genes)
            else:
                n_out = len(genes) if genes is not None else int(colmap.max()) + 1
            if not (n_out == store.n_vars and np.array_equal(colmap, np.arange(store.n_vars))):
                self._colmap, self.n_genes = np.asarray(colmap), n_out  # identity needs no pass over nonzeros
                store.restrict_columns(np.flatnonzero(self._colmap >= 0))
        self.epoch, self.consumed = int(epoch), 0
        self._elastic, self._elastic_rows = None, None  # an elastic resume's interrupted plan (its epoch only)
        self._next = None  # (epoch, _Readers) started ahead at the end of the previous epoch
        self.prefetch_next_epoch = prefetch_next_epoch
        if validate not in ("counts", "finite", None):
            raise ValueError(f"validate must be 'counts', 'finite' or None, not {validate!r}")
        self.validate = validate
        self._validated = False  # a whole epoch of this stream's reads has been checked (validate)

    def gene_panels(self) -> np.ndarray | None:
        """(panels, output genes) bool: the output columns each gene panel of the store measured (the rows
        of Store.gene_panels; Store.panel_codes gives a cell's), where an output gene the store lacks
        (zero-filled through the caller's colmap) is measured by no panel. None when every cell measured
        every output gene: then nothing the stream yields is a zero that was never counted."""
        return measured_panels(self.store, self._colmap, self.n_genes)

    # -- plan -------------------------------------------------------------------------------------
    def _fit_plan(self, store: Store, workers: int, block_size: int | None) -> tuple[int, int]:
        """(reader threads, block size) such that no consumer of any epoch holds fewer than min_batch
        cells: on a tiny store the threads per process shrink (a pure function of the store size, so
        resume and every rank agree); a store too small for the processes is one clear error."""
        n, world = store.n_obs, self.world_size
        self.segments = getattr(store, "segments", None)  # a collection's store sizes: blocks never straddle two stores

        def block(w):
            return int(block_size or sampling.default_block_size(n, store.block_rows, world * w))

        while (
            workers > 1
            and n
            and sampling.fewest_rows(n, block(workers), world * workers, self.segments) < self.min_batch
        ):
            workers -= 1
        fewest = sampling.fewest_rows(n, block(workers), world * workers, self.segments) if n else 0
        if n and self.min_batch > 1 and fewest < self.min_batch:
            raise ValueError(
                f"{store.uri} has {n} cells: too few to train on {world} process(es), which needs at least "
                f"{self.min_batch} cells in every minibatch of every process; use fewer processes or more cells"
            )
        return workers, block(workers)

    @property
    def n_consumers(self) -> int:
        return self.world_size * self.num_workers

    def _plan(self, epoch: int) -> tuple[int, list | None, np.ndarray | None, int, int]:
        """(rows, segments, positions, salt, block size) the epoch's plan runs over: every position
        (positions None), or, in the epoch of an elastic resume, the positions the interrupted run had
        not emitted, in blocks shrunk so that a small remainder still reaches every consumer."""
        if self._elastic is not None and int(self._elastic["epoch"]) == epoch:
            rows = self._elastic_rows
            segments, salt = sampling.segment_counts(rows, self.segments), 1 + sampling.depth(self._elastic)
            return (
                len(rows),
                segments,
                rows,
                salt,
                sampling.default_block_size(len(rows), self.block_size, self.n_consumers),
            )
        return self.n_obs, self.segments, None, 0, self.block_size

    @property
    def elastic_cells(self) -> int | None:
        """Cells of this epoch an elastic resume deals to this run's consumers (None: the normal plan)."""
        n, _, positions, _, _ = self._plan(self.epoch)
        return None if positions is None else n

    def _sizes(self, epoch: int) -> list[list[int]]:
        n, segments, _, salt, block = self._plan(epoch)
        rows = sampling.consumer_rows(n, block, self.seed, epoch, self.n_consumers, self.shuffle, segments, salt)
        return sampling.batch_sizes(rows, self.batch_size, self.drop_last, self.min_batch)

    def __len__(self) -> int:
        return len(self._sizes(self.epoch)[0]) * self.num_workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = int(epoch), 0

    def state_dict(self) -> dict:
        state = {k: getattr(self, k) for k in _STATE_KEYS}
        state.update(epoch=self.epoch, consumed=self.consumed)
        if self._elastic is not None and int(self._elastic["epoch"]) == self.epoch:
            state["elastic"] = self._elastic  # the interrupted plan this epoch's plan continues
            state["plan_block_size"] = self._plan(self.epoch)[4]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stood. With another number of processes or reader threads (an elastic
        resume) mid-epoch, the positions the interrupted run had not emitted are dealt anew to this
        run's consumers: each once, none of the epoch's emitted ones again; later epochs follow the
        normal plan. The same world continues the same plan exactly."""
        mismatch = {k: (state.get(k), getattr(self, k)) for k in _STATE_KEYS if state.get(k) != getattr(self, k)}
        if set(mismatch) - _ELASTIC_KEYS:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in mismatch.items())
            raise ValueError(f"stream state does not match this stream ({detail})")
        self.epoch = int(state["epoch"])
        if not mismatch:
            self._elastic, self.consumed = state.get("elastic"), int(state["consumed"])
        elif int(state["consumed"]) == 0 and not state.get("elastic"):
            self._elastic, self.consumed = None, 0  # at an epoch boundary the new plan simply starts
        else:
            self._elastic, self.consumed = state, 0
        self._elastic_rows = sampling.remaining_positions(self._elastic) if self._elastic is not None else None

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "CellStream reads on its own threads (num_workers=…); use it with "
                "DataLoader(num_workers=0, batch_size=None) or iterate it directly"
            )
        epoch, start = self.epoch, self.consumed
        whole = start == 0 and self._elastic is None  # every cell of the epoch's plan (validate)
        sizes = self._sizes(epoch)
        W = self.num_workers
        total = len(sizes[0]) * W
        readers = self._take_next(epoch, start) or self._start_readers(epoch, start, sizes)
        cutters = []
        for w in range(W):
            consumer, skip = self._consumer_and_skip(w, start)
            cutters.append(self._cut(readers.queues[w], sizes[consumer][skip:]))
        try:
            for j in range(start, total):
                if j == total - 1 and self.prefetch_next_epoch:
                    # the next epoch's first requests decode while this epoch's last batch trains
                    self._next = (epoch + 1, self._start_readers(epoch + 1, 0, self._sizes(epoch + 1)))
                batch = next(cutters[j % W])
                self.consumed = j + 1
                yield batch
            self.epoch, self.consumed = epoch + 1, 0
            self._validated = self._validated or whole
            if self._elastic is not None and int(self._elastic["epoch"]) == epoch:
                self._elastic, self._elastic_rows = None, None  # the next epochs follow the normal plan
        finally:
            readers.close()

    def _consumer_and_skip(self, w: int, start: int) -> tuple[int, int]:
        """Worker w's consumer id, and how many of its minibatches are among the rank's first `start`
        (the rank yields its workers' batches round-robin)."""
        W = self.num_workers
        return self.rank * W + w, len(range(w, start, W))

    def _take_next(self, epoch: int, start: int):
        """The readers started ahead for this epoch, if they still fit; otherwise drop them."""
        nxt, self._next = self._next, None
        if nxt is None:
            return None
        if nxt[0] == epoch and start == 0:
            return nxt[1]
        nxt[1].close()
        return None

    def _start_readers(self, epoch: int, start: int, sizes) -> _Readers:
        W = self.num_workers
        readers = _Readers([queue.Queue(maxsize=self.prefetch) for _ in range(W)])
        for w in range(W):
            consumer, skip = self._consumer_and_skip(w, start)
            # the thread holds the stream weakly: a stream dropped with the next epoch's readers started
            # is collected, and its __del__ stops them (a bound method would keep both alive forever)
            t = threading.Thread(
                target=CellStream._read,
                daemon=True,
                name=f"cellstream-{consumer}",
                args=(weakref.proxy(self), epoch, consumer, sizes[consumer], skip, readers.queues[w], readers.stop),
            )
            t.start()
            _track(t, readers.stop)
            readers.threads.append(t)
        return readers

    def __del__(self):  # may run on any thread (garbage collection): signal, never join
        if getattr(self, "_next", None) is not None:
            self._next[1].close(join=False)

    def _read(self, epoch, consumer, sizes, skip, out: queue.Queue, stop: threading.Event):
        """Reader thread: decoded requests (GIL-free decode) → out; cutting happens on the consumer's
        thread, which keeps the two threads from trading the GIL once per minibatch."""

        def put(item):
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            raise _Stop

        try:
            n, segments, positions, salt, block = self._plan(epoch)
            reqs = sampling.requests(
                n, block, self.blocks_per_request, self.seed, epoch, consumer, self.n_consumers, self.shuffle,
                segments, salt,
            )  # fmt: skip
            if positions is not None:  # the plan numbers the remaining positions 0..n-1
                reqs = (sampling.Request(positions[r.rows], r.order) for r in reqs)
            offset = sum(sizes[:skip])  # rows already consumed: whole requests are skipped unread
            needed = sum(sizes[skip:])
            reader = self.store.reader()
            for req in reqs:
                if needed <= 0 or stop.is_set():  # done, or told to stop (close, exit)
                    break
                if offset >= len(req):
                    offset -= len(req)
                    continue
                m = reader.read(req.rows)
                if self.validate and not self._validated:
                    check_counts(m, self.store, integer=self.validate == "counts", positions=req.rows)
                if self._colmap is not None:
                    m = select_columns(m, self._colmap, self.n_genes)
                put((req, compact(m), offset))
                needed -= len(req) - offset
                offset = 0
        except _Stop:
            return
        except BaseException as e:  # handed to the consuming thread, which re-raises it
            try:
                put(e)
            except _Stop:
                return

    def _cut(self, requests: queue.Queue, sizes: list[int]):
        """Minibatches of the given sizes from the decoded requests, in each request's row order;
        rows left at the end of a request start the next minibatch."""
        b, parts, have = 0, [], 0
        while b < len(sizes):
            item = requests.get()
            if isinstance(item, BaseException):
                raise item
            req, m, offset = item
            order = req.order[offset:]
            pos = 0
            while pos < len(order) and b < len(sizes):
                take = order[pos : pos + sizes[b] - have]
                pos += len(take)
                have += len(take)
                parts.append((take_rows(m, take), req.rows[take]))
                if have == sizes[b]:
                    x = concat([p[0] for p in parts])
                    index = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
                    yield _to_batch(x, index, self._codes)
                    b, parts, have = b + 1, [], 0
