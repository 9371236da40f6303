"""Epoch plans are pure functions: coverage, balance and epoch-to-epoch variation without data."""

import numpy as np
import pytest

from loaders import sampling


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_plan_covers_every_row_once(world, workers):
    n, block, per_req, bs = 1009, 16, 5, 32
    C = world * workers
    rows = sampling.consumer_rows(n, block, 7, 3, C)
    sizes = sampling.batch_sizes(rows, bs, drop_last=False)
    seen = []
    for c in range(C):
        reqs = sampling.requests(n, block, per_req, 7, 3, c, C)
        got = np.concatenate([r.rows[r.order] for r in reqs])
        assert len(got) == rows[c] == sum(sizes[c])
        seen.append(got)
    allrows = np.concatenate(seen)
    assert np.array_equal(np.sort(allrows), np.arange(n))
    assert len({len(s) for s in sizes}) == 1  # same minibatch count for every consumer
    assert all(0 < s <= bs for ss in sizes for s in ss)


def test_balanced_within_two_blocks():
    rows = sampling.consumer_rows(100_003, 1024, 0, 0, 6)
    assert rows.sum() == 100_003 and rows.max() - rows.min() < 2 * 1024


def test_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        return np.concatenate([r.rows[r.order] for r in sampling.requests(5000, 64, 4, seed, epoch, 0, 1)])

    assert np.array_equal(order(1, 2), order(1, 2))
    assert not np.array_equal(order(1, 2), order(1, 3))
    assert not np.array_equal(order(1, 2), order(2, 2))


def test_request_rows_are_whole_blocks_ascending():
    for r in sampling.requests(1000, 64, 4, 0, 0, 0, 1):
        assert np.all(np.diff(r.rows) > 0)
        starts = np.unique(r.rows // 64)
        assert len(r.rows) == sum(min(64, 1000 - 64 * b) for b in starts)


@pytest.mark.parametrize("rows", [[1000, 990, 1024], [5, 3, 4], [512, 512]])
def test_batch_sizes_exactly_once_equal_counts(rows):
    sizes = sampling.batch_sizes(np.array(rows), 100, drop_last=False)
    assert [sum(s) for s in sizes] == rows
    assert len({len(s) for s in sizes}) == 1
    assert all(1 <= x <= 100 for s in sizes for x in s)


def test_batch_sizes_drop_last_full_batches():
    sizes = sampling.batch_sizes(np.array([1000, 990, 1024]), 100, drop_last=True)
    assert sizes == [[100] * 9] * 3


def test_batch_sizes_shrink_the_count_instead_of_emitting_empty_batches():
    sizes = sampling.batch_sizes(np.array([300, 2]), 100, drop_last=False)
    assert [sum(s) for s in sizes] == [300, 2] and len({len(s) for s in sizes}) == 1
    assert all(x >= 1 for s in sizes for x in s)


class _PlanOnly:
    """Just what CellStream's plan needs of a store: no data is read."""

    block_rows, blocks_per_request, n_vars = 1024, 64, 3

    def __init__(self, n_obs):
        self.n_obs, self.uri = n_obs, f"plan-only store of {n_obs} cells"


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2])
def test_training_never_gets_a_minibatch_below_two_cells(world, workers):
    """n_obs 1..600 × batch sizes × drop_last: every rank the same count, no minibatch below 2 cells,
    exactly once without drop_last; a store with fewer than 2 cells per rank is one clear error."""
    from loaders import CellStream

    for n in range(1, 601):
        for bs in (2, 7, 64, 128):
            for drop_last in (False, True):
                try:
                    streams = [
                        CellStream(
                            _PlanOnly(n),
                            batch_size=bs,
                            seed=n,
                            rank=r,
                            world_size=world,
                            num_workers=workers,
                            drop_last=drop_last,
                            min_batch=2,
                        )  # fmt: skip
                        for r in range(world)
                    ]
                except ValueError as e:  # exactly when some rank would hold fewer than 2 cells
                    assert n < 2 * world and "too few to train" in str(e), (n, world, workers, e)
                    continue
                assert n >= 2 * world
                s = streams[0]
                for epoch in (0, 1):
                    sizes = s._sizes(epoch)
                    assert len({len(x) for x in sizes}) == 1
                    assert all(2 <= b for x in sizes for b in x), (n, bs, world, workers, sizes)
                    if drop_last:
                        assert all(b == bs for x in sizes for b in x)
                        continue
                    seen = []
                    for c in range(s.n_consumers):
                        reqs = list(
                            sampling.requests(n, s.block_size, s.blocks_per_request, n, epoch, c, s.n_consumers)
                        )
                        rows = np.concatenate([q.rows for q in reqs]) if reqs else np.zeros(0, np.int64)
                        assert len(rows) == sum(sizes[c])
                        seen.append(rows)
                    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))


def test_batch_sizes_too_few_rows_is_an_error():
    with pytest.raises(ValueError, match="minibatches"):
        sampling.batch_sizes(np.array([300, 0]), 100, drop_last=False)
