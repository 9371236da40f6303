"""Epoch plans: pure numpy functions of (n_obs, block_size, seed, epoch) and the consumer's place.

`segments` (the row counts of the stores of a collection, in order) cut the blocks at store
boundaries, so no block straddles two stores; without it the rows are one segment and the plan is
what it always was.

An epoch shuffles chunk-aligned blocks of rows, deals them round-robin to the consumers
(rank × worker; shuffle first, then partition, so every consumer gets an unbiased sample and row
counts differ by at most one block), groups each consumer's blocks into read requests, and shuffles
rows inside each request. Nothing here reads data, so a resumed stream can skip work for free.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Distinct streams for the block order and the in-request row orders of one (seed, epoch).
_BLOCKS, _ROWS = 0x626C6B, 0x726F77


@dataclass(frozen=True)
class Request:
    """One pooled read: store positions (ascending) and the order to emit them in."""

    rows: np.ndarray  # int64 ascending positions in the (filtered) store
    order: np.ndarray  # permutation of range(len(rows)): emit rows[order[0]], rows[order[1]], ...

    def __len__(self) -> int:
        return len(self.rows)


def default_block_size(n_obs: int, block_rows: int, n_consumers: int) -> int:
    """The store's preferred block, shrunk for small stores so every consumer receives several.
    Per-minibatch label mixing depends on the number of blocks per request, memory on their size."""
    return max(1, min(block_rows, n_obs // (4 * n_consumers)))


def blocks(n_obs: int, block_size: int, segments=None) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every block: block_size rows each, the last of each segment shorter."""
    sizes = [n_obs] if segments is None else [int(x) for x in segments]
    if sum(sizes) != n_obs:
        raise ValueError(f"segments {sizes} do not add up to n_obs {n_obs}")
    starts, offset = [], 0
    for size in sizes:
        starts.append(np.arange(offset, offset + size, block_size, dtype=np.int64))
        offset += size
    start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    ends = np.minimum(start + block_size, np.repeat(np.cumsum(sizes), [len(x) for x in starts]))
    return start, ends - start


def n_blocks(n_obs: int, block_size: int, segments=None) -> int:
    if segments is None:
        return -(-n_obs // block_size)
    return sum(-(-int(x) // block_size) for x in segments)


def block_order(
    n_obs: int, block_size: int, seed: int, epoch: int, shuffle: bool = True, segments=None, salt: int = 0
) -> np.ndarray:
    nb = n_blocks(n_obs, block_size, segments)
    if not shuffle:
        return np.arange(nb, dtype=np.int64)
    return np.random.default_rng([seed, epoch, _BLOCKS, *([salt] if salt else [])]).permutation(nb).astype(np.int64)


def consumer_blocks(order: np.ndarray, consumer: int, n_consumers: int) -> np.ndarray:
    return order[consumer::n_consumers]


def consumer_rows(
    n_obs: int,
    block_size: int,
    seed: int,
    epoch: int,
    n_consumers: int,
    shuffle: bool = True,
    segments=None,
    salt: int = 0,
) -> np.ndarray:
    """Rows each consumer receives in this epoch (computed from the plan, no data read)."""
    order = block_order(n_obs, block_size, seed, epoch, shuffle, segments, salt)
    lengths = blocks(n_obs, block_size, segments)[1][order]
    return np.array([lengths[c::n_consumers].sum() for c in range(n_consumers)], dtype=np.int64)


def requests(
    n_obs: int,
    block_size: int,
    blocks_per_request: int,
    seed: int,
    epoch: int,
    consumer: int,
    n_consumers: int,
    shuffle: bool = True,
    segments=None,
    salt: int = 0,
) -> Iterator[Request]:
    """The consumer's read requests for one epoch, in the order they are consumed (made lazily). `salt` (the depth
    of an elastic resume) gives a remainder plan its own shuffle."""
    order = block_order(n_obs, block_size, seed, epoch, shuffle, segments, salt)
    mine = consumer_blocks(order, consumer, n_consumers)
    start, length = blocks(n_obs, block_size, segments)
    for i in range(0, len(mine), blocks_per_request):
        group = np.sort(mine[i : i + blocks_per_request])
        lengths = length[group]
        rows = np.repeat(start[group] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        rows += np.arange(len(rows), dtype=np.int64)
        if shuffle:
            rng = np.random.default_rng([seed, epoch, _ROWS, consumer, n_consumers, i, *([salt] if salt else [])])
            order = rng.permutation(len(rows))
        else:
            order = np.arange(len(rows))
        yield Request(rows, order)  # one at a time: an epoch's requests hold every row of the consumer


def fewest_rows(n_obs: int, block_size: int, n_consumers: int, segments=None) -> int:
    """The fewest rows any consumer can receive in any epoch: blocks are dealt round-robin, so a
    consumer holds floor or ceil(n_blocks / n_consumers) of them, at worst the shortest ones (the
    tail of each segment)."""
    nb = n_blocks(n_obs, block_size, segments)
    per = nb // n_consumers
    if per == 0:
        return 0
    if segments is None:  # one short block at most: no need to list them all
        short = block_size - (n_obs - (nb - 1) * block_size)
        return per * block_size - short
    return int(np.sort(blocks(n_obs, block_size, segments)[1])[:per].sum())


def batch_sizes(rows_per_consumer: np.ndarray, batch_size: int, drop_last: bool, min_batch: int = 1) -> list[list[int]]:
    """Minibatch sizes for each consumer, with the same count for every consumer, none below min_batch
    (training passes 2: BatchNorm cannot normalise one cell).

    drop_last: full batches only; each consumer drops its tail (random rows, since rows are shuffled).
    Otherwise every row is emitted exactly once: L = the largest consumer's ceil(n / batch_size), and a
    consumer with fewer rows spreads its remainder over its last slots, so no padding is needed and a
    tail is never cut into a batch below min_batch (129 rows in batches of 128 → 65 + 64). Where a
    consumer holds fewer than min_batch × L rows (tiny stores only), L shrinks to what it can fill and
    the other consumers' batches grow past batch_size instead.
    """
    rows_per_consumer = np.asarray(rows_per_consumer, dtype=np.int64)
    if batch_size < min_batch:
        raise ValueError(f"batch_size {batch_size} is below the smallest minibatch allowed here ({min_batch})")
    if drop_last:
        n_batches = int(rows_per_consumer.min()) // batch_size
        return [[batch_size] * n_batches for _ in rows_per_consumer]
    if rows_per_consumer.max(initial=0) == 0:
        return [[] for _ in rows_per_consumer]
    fewest = int(rows_per_consumer.min())
    if fewest < min_batch:
        raise ValueError(
            f"a consumer receives {fewest} cells, fewer than the smallest of its minibatches ({min_batch}); "
            "use fewer processes/workers or a smaller block_size"
        )
    n_batches = min(int(-(-rows_per_consumer.max() // batch_size)), fewest // min_batch)
    out = []
    for n in rows_per_consumer.tolist():
        if n > batch_size * n_batches:  # the count shrank below this consumer's need: spread evenly
            full = 0
        else:  # as many full batches as leave at least min_batch rows for each remaining slot
            full = min(n // batch_size, n_batches)
            if batch_size > min_batch:
                full = min(full, (n - min_batch * n_batches) // (batch_size - min_batch))
        rest, slots = n - full * batch_size, n_batches - full
        sizes = [batch_size] * full
        if slots:
            q, r = divmod(rest, slots)
            sizes += [q + 1] * r + [q] * (slots - r)
        out.append(sizes)
    return out


# -- elastic resume: the rest of an epoch on another number of consumers -------------------------------
def depth(state: dict) -> int:
    """How many elastic resumes the state's epoch went through (0: its plan is the normal one)."""
    return 0 if not state.get("elastic") else 1 + depth(state["elastic"])


def segment_counts(positions: np.ndarray, segments) -> list[int] | None:
    """How many of the sorted `positions` fall in each segment (None without segments)."""
    if segments is None:
        return None
    edges = np.concatenate([[0], np.cumsum(segments)])
    return np.diff(np.searchsorted(positions, edges)).astype(int).tolist()


def plan_positions(state: dict) -> np.ndarray | None:
    """The positions the plan of the state's epoch runs over: None for all of them (the normal plan),
    else the rest of the epoch left by the resume the state records (sorted)."""
    return remaining_positions(state["elastic"]) if state.get("elastic") else None


def remaining_positions(state: dict) -> np.ndarray:
    """Positions of the state's epoch not yet emitted by its consumers (sorted): what an elastic resume
    deals to the new ones. Pure: recomputes the plan of the state (a CellStream.state_dict())."""
    base = plan_positions(state)
    n_obs, segments = int(state["n_obs"]), state.get("segments")
    n = n_obs if base is None else len(base)
    segs = segments if base is None else segment_counts(base, segments)
    W, C = int(state["num_workers"]), int(state["world_size"]) * int(state["num_workers"])
    bs = int(state.get("plan_block_size", state["block_size"]))  # a remainder plan's own (smaller) blocks
    seed, epoch, salt = int(state["seed"]), int(state["epoch"]), depth(state)
    rows = consumer_rows(n, bs, seed, epoch, C, state["shuffle"], segs, salt)
    sizes = batch_sizes(rows, int(state["batch_size"]), state["drop_last"], int(state.get("min_batch", 1)))
    k = int(state["consumed"])
    taken = []
    for c in range(C):
        emitted = sum(sizes[c][: len(range(c % W, k, W))])  # this worker's share of the first k batches
        parts = []
        for r in requests(n, bs, int(state["blocks_per_request"]), seed, epoch, c, C, state["shuffle"], segs, salt):
            if emitted <= 0:
                break
            parts.append(r.rows[r.order][:emitted])
            emitted -= len(r)
        taken += parts
    done = np.concatenate(taken) if taken else np.zeros(0, np.int64)
    left = np.setdiff1d(np.arange(n, dtype=np.int64), done, assume_unique=True)
    return left if base is None else base[left]
