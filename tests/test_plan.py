"""Plans: every allowed pair covered exactly once, no tile without work, tile
counts as the pattern needs them (test_attention.py shows each backend visits
exactly those tiles), and the caches that hold plans stay bounded."""
import gc
import weakref

import pytest
import torch

from tfk import patterns as P
from tfk import plan as plans
from tfk.plan import compile_plan, get_plan
from helpers import PATTERN_IDS, patterns_for_tests


def coverage(plan, H):
    """How many sub-pass tiles claim each (head, query, key) pair."""
    cover = torch.zeros(plan.heads, plan.lq, plan.lk, dtype=torch.long)
    bq, bk = plan.block_q, plan.block_k
    for sp in plan.subpasses:
        qi = torch.arange(plan.lq) if sp.q_index is None else sp.q_index
        ki = torch.arange(plan.lk) if sp.kv_index is None else sp.kv_index
        for h in range(sp.kv_count.shape[0]):
            for qb in range(sp.kv_count.shape[1]):
                rows = qi[qb * bq:(qb + 1) * bq]
                for slot in range(int(sp.kv_count[h, qb])):
                    kb, pid = int(sp.kv_blocks[h, qb, slot]), int(sp.kv_partial[h, qb, slot])
                    cols = ki[kb * bk:(kb + 1) * bk]
                    if pid >= 0:
                        tile = sp.partial_masks[pid]
                        assert tile.any(), "a listed partial tile must hold an allowed pair"
                        assert not tile[len(rows):].any() and not tile[:, len(cols):].any(), \
                            "tile masks are False outside the sequence"
                        tile = tile[:len(rows), :len(cols)]
                    else:
                        tile = torch.ones(len(rows), len(cols), dtype=torch.bool)
                    cover[h, rows.view(-1, 1), cols.view(1, -1)] += tile.long()
    return cover


@pytest.mark.parametrize("lengths", [(97, 97), (63, 150), (200, 71)], ids=str)
@pytest.mark.parametrize("block", [(16, 32), (64, 64)], ids=str)
@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
def test_plan_covers_each_allowed_pair_once(pattern_id, block, lengths):
    Lq, Lk = lengths
    pattern = patterns_for_tests(4, Lq, Lk)[pattern_id]
    plan = compile_plan(pattern, Lq, Lk, *block)
    want = torch.ones(1, Lq, Lk, dtype=torch.bool) if pattern is None else pattern.dense_mask(Lq, Lk)
    want = want.view(-1, Lq, Lk)
    assert torch.equal(coverage(plan, 4), want.long().expand(plan.heads, -1, -1))


def test_tile_counts_match_the_pattern():
    L, b = 1024, 64
    n = L // b
    assert get_plan(None, L, L, b, b).num_tiles == n * n
    assert get_plan(P.causal(), L, L, b, b).num_tiles == n * (n + 1) // 2
    # a 256-key window touches the diagonal block and the 4 before it
    assert get_plan(P.sliding_window(256), L, L, b, b).num_tiles == sum(min(i + 1, 5) for i in range(n))
    layout = torch.rand(2, n, n, generator=torch.Generator().manual_seed(0)) < 0.2
    plan = get_plan(P.block_layout(layout, b), L, L, b, b)
    assert plan.num_tiles == int(layout.sum())
    assert all(sp.num_partial == 0 for sp in plan.subpasses), "aligned block layouts have only full tiles"


def test_dilation_and_stride_cost_what_they_allow():
    """Grouping residues makes a dilated window as cheap as an undilated one
    of 1/dilation the keys, instead of touching every tile of the band."""
    L, b, d = 2048, 64, 4
    dilated = get_plan(P.sliding_window(256, dilation=d), L, L, b, b)
    per_class = get_plan(P.sliding_window(256 // d), L // d, L // d, b, b)
    assert dilated.num_tiles == d * per_class.num_tiles
    # strided(64): a local band plus one strided sub-pass, far below causal's tiles
    strided = get_plan(P.strided(64), L, L, b, b)
    assert len(strided.subpasses) == 2
    assert strided.num_tiles < get_plan(P.causal(), L, L, b, b).num_tiles / 2


def test_plans_are_cached():
    a = get_plan(P.sliding_window(8), 100, 100, 32, 32)
    assert get_plan(P.sliding_window(8), 100, 100, 32, 32) is a
    assert get_plan(P.sliding_window(8), 101, 100, 32, 32) is not a
    assert get_plan(P.sliding_window(9), 100, 100, 32, 32) is not a


def test_empty_pattern_and_empty_sequence():
    nothing = P.causal() & P.causal(bottom_right=True) & P.sliding_window(0, 0) & P.global_tokens(0)
    plan = compile_plan(nothing & P.strided(1000), 10, 10, 4, 4)
    assert plan.num_tiles == 0
    assert compile_plan(None, 0, 5, 4, 4).num_tiles == 0


def test_plan_ids_are_bounded_and_release_their_patterns(monkeypatch):
    """The id registry forgets the least recently used ids past its capacity,
    lets their patterns go, never reuses an id, and says so when a forgotten
    id is asked for."""
    monkeypatch.setattr(plans, "PLAN_ID_CAPACITY", 4)
    monkeypatch.setattr(plans, "_PLAN_IDS", type(plans._PLAN_IDS)())
    monkeypatch.setattr(plans, "_PLAN_ARGS", {})
    first = P.block_layout(torch.ones(1, 2, 2, dtype=torch.bool), 8)
    alive = weakref.ref(first)
    old = plans.plan_id(first, 16, 16, 8, 8, "cpu")
    kept = plans.plan_id(P.sliding_window(1), 16, 16, 8, 8, "cpu")
    ids = [plans.plan_id(P.sliding_window(n), 16, 16, 8, 8, "cpu") for n in range(2, 5)]
    assert plans.plan_by_id(kept).num_tiles > 0        # used: now the most recent
    ids.append(plans.plan_id(P.sliding_window(5), 16, 16, 8, 8, "cpu"))
    assert len(plans._PLAN_IDS) == len(plans._PLAN_ARGS) == 4
    assert len(set([old, kept] + ids)) == 6, "ids are never reused"
    plans.clear_plan_cache()
    del first
    gc.collect()
    assert alive() is None, "a forgotten id keeps no pattern alive"
    with pytest.raises(RuntimeError, match=f"plan id {old} is no longer registered"):
        plans.plan_by_id(old)
    with pytest.raises(RuntimeError, match=f"plan id {ids[0]} is no longer registered"):
        plans.plan_by_id(ids[0])
    assert plans.plan_by_id(kept).num_tiles > 0
