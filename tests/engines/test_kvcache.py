"""The batch KV cache reshaped in place: every row's real keys/values stay exactly what
a rebuilt cache would hold, and steady-state reshaping copies no buffer."""

from __future__ import annotations

import random

import pytest
import torch

from server.engines.kvcache import BatchCache, compaction

H, D = 2, 4


@pytest.mark.parametrize(("keep", "rows", "order", "moves"), [
    ([0, 1, 2], 3, [0, 1, 2], []),  # nobody left
    ([0, 1], 3, [0, 1], []),  # the last row left: nothing moves
    ([0, 2], 3, [0, 2], [(1, 2)]),  # the middle row left: the last one takes its place
    ([1, 2], 3, [2, 1], [(0, 2)]),  # row 0 left: the tail row fills it
    ([0, 3, 4], 5, [0, 3, 4], [(1, 3), (2, 4)]),
    ([], 4, [], []),
])
def test_compaction_fills_holes_from_the_tail(keep, rows, order, moves):
    assert compaction(keep, rows) == (order, moves)


def _kv(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, H, cols, D, generator=gen)


class Reference:
    """Each row's real keys as a list of columns, what a rebuilt cache would hold."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []  # [H, n_i, D] per row

    def check(self, cache: BatchCache) -> None:
        keys = cache.layers[0].keys
        assert keys.shape[0] == len(self.rows)
        assert keys.shape[-2] >= max(r.shape[-2] for r in self.rows)
        for j, real in enumerate(self.rows):
            n = real.shape[-2]
            torch.testing.assert_close(keys[j, :, keys.shape[-2] - n:], real, rtol=0, atol=0)


def _prefill(lengths: list[int], gen: torch.Generator) -> tuple[BatchCache, list[torch.Tensor]]:
    """A group cache: rows left-padded to the longest, filled in one update."""
    cache = BatchCache()
    width = max(lengths)
    keys = _kv(len(lengths), width, gen)
    cache.update(keys, keys.clone(), 0)
    return cache, [keys[i, :, width - n:] for i, n in enumerate(lengths)]


def test_random_joins_leaves_and_steps_match_a_rebuilt_cache():
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    cache, rows = _prefill([5, 3], gen)
    ref = Reference()
    ref.rows = rows
    ref.check(cache)
    for _ in range(300):
        op = rng.random()
        if op < 0.55:  # a decode step: one new column for every row
            new = _kv(len(ref.rows), 1, gen)
            cache.update(new, new.clone(), 0)
            ref.rows = [torch.cat([r, new[j]], -2) for j, r in enumerate(ref.rows)]
        elif op < 0.75 and len(ref.rows) > 1:  # some rows leave
            keep = sorted(rng.sample(range(len(ref.rows)), rng.randint(1, len(ref.rows) - 1)))
            order = cache.keep_rows(keep, len(ref.rows))
            assert sorted(order) == keep
            ref.rows = [ref.rows[i] for i in order]
            longest = max(r.shape[-2] for r in ref.rows)
            spare = cache.get_seq_length() - longest
            if spare:  # the scheduler trims columns that are padding in every row
                cache.trim_left(spare)
        elif len(ref.rows) < 24:  # newcomers join, shorter or longer than the batch
            lengths = [rng.randint(1, cache.get_seq_length() + 6)
                       for _ in range(rng.randint(1, 3))]
            group, new_rows = _prefill(lengths, gen)
            cache.append(group)
            ref.rows += new_rows
        ref.check(cache)
        torch.testing.assert_close(cache.layers[0].values, cache.layers[0].keys, rtol=0, atol=0)


def test_leaving_trimming_and_joining_copy_no_buffer_when_room_is_left():
    gen = torch.Generator().manual_seed(1)
    cache, _ = _prefill([8, 8, 8, 8], gen)
    newcomers, _ = _prefill([4, 4], gen)
    cache.append(newcomers)  # grows rows once (4 -> 8 rows)
    layer = cache.layers[0]
    buffer = layer._kbuf.data_ptr()
    cache.keep_rows([1, 2, 3, 4, 5], 6)
    cache.trim_left(2)
    step = _kv(5, 1, gen)
    cache.update(step, step.clone(), 0)
    late, _ = _prefill([3, 5], gen)
    cache.append(late)  # fits the spare rows, and 5 columns <= the batch's 7
    assert layer._kbuf.data_ptr() == buffer
    assert cache.get_seq_length() == 7 and layer.keys.shape[0] == 7


def test_a_newcomer_longer_than_the_batch_widens_it_on_the_left():
    gen = torch.Generator().manual_seed(2)
    cache, rows = _prefill([3], gen)
    long, long_rows = _prefill([10], gen)
    cache.append(long)
    assert cache.get_seq_length() == 10
    ref = Reference()
    ref.rows = rows + long_rows
    ref.check(cache)
    assert torch.isfinite(cache.layers[0].keys).all()  # the padding is finite (zeros)
