"""The pieces context parallelism is built from, in one process: patterns.Shifted
(a window of a pattern) against slicing the whole pattern's mask, and the
ring's schedule (which key rows each rank needs of each other) against the
rows the whole mask allows."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import PATTERN_IDS, patterns_for_tests  # noqa: E402

from tfk.distributed import layout as lay  # noqa: E402
from tfk.distributed import schedule as sched  # noqa: E402
from tfk.patterns import DENSE, Shifted  # noqa: E402
from tfk.plan import compile_plan, compile_plan_exhaustive  # noqa: E402

L = 240
WINDOWS = [(0, 0, 240, 240), (40, 0, 80, 240), (120, 37, 64, 90), (200, 160, 40, 80), (17, 150, 53, 71)]


@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
def test_shifted_is_a_window_of_the_pattern(pattern_id):
    pattern = patterns_for_tests(2, L, L)[pattern_id]
    whole = (pattern or DENSE).dense_mask(L, L)
    for qs, ks, lq, lk in WINDOWS:
        shifted = Shifted(pattern, qs, ks, L)
        assert torch.equal(shifted.dense_mask(lq, lk), whole[..., qs:qs + lq, ks:ks + lk]), (qs, ks)
        fast, exact = compile_plan(shifted, lq, lk, 32, 16), compile_plan_exhaustive(shifted, lq, lk, 32, 16)
        assert fast.num_tiles == exact.num_tiles, (qs, ks)
        cols = whole[..., qs:qs + lq, ks:ks + lk].reshape(-1, lk).any(0).nonzero()
        want = None if cols.numel() == 0 else (int(cols[0]), int(cols[-1]) + 1)
        assert sched.key_span(fast) == want, (qs, ks)


def test_shifted_refuses_a_window_outside_the_square():
    with pytest.raises(ValueError, match="does not fit"):
        Shifted(None, 200, 0, L).check_lengths(41, 10)


@pytest.mark.parametrize("layout", lay.LAYOUTS)
@pytest.mark.parametrize("pattern_id", ["causal", "window", "longformer", "window_dilated", "bigbird"])
def test_schedule_sends_exactly_the_rows_some_query_needs(layout, pattern_id):
    """For every (query rank, key rank): the rows sent are, per key run, the
    span of the key rows some query of rq may attend to; ranks with none
    send nothing; and every allowed pair lies in exactly one piece."""
    world, n = 4, L // 4
    pattern = patterns_for_tests(1, L, L)[pattern_id]
    whole = (pattern or DENSE).dense_mask(L, L)
    links = sched.build(pattern, L, world, layout, n)
    for rq in range(world):
        qpos = lay.positions(layout, rq, world, n)
        covered = torch.zeros(n, L, dtype=torch.int64)
        for rk in range(world):
            link = links[rq][rk]
            want = []
            for g, loc, m in lay.runs(layout, rk, world, n):
                cols = whole[qpos][:, g:g + m].any(0).nonzero()
                if cols.numel():
                    want.append((loc + int(cols[0]), loc + int(cols[-1]) + 1))
            assert list(link.ranges) == sorted(want), (rq, rk)
            for p in link.pieces:
                covered[p.q_local:p.q_local + p.q_len, p.k_global:p.k_global + p.k_len] += 1
        assert bool((covered[whole[qpos]] == 1).all()), f"rank {rq}: an allowed pair in no piece or in two"
