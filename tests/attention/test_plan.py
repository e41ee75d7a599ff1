"""Plans: every allowed pair covered exactly once, no tile without work, tile
counts as the pattern needs them (test_attention.py shows each backend visits
exactly those tiles), plans from block-level reasoning equal to the
exhaustive compiler's, and the caches that hold plans stay bounded."""
import gc
import random
import weakref

import pytest
import torch

from tfk import patterns as P
from tfk import plan as plans
from tfk import tile_facts
from tfk.plan import compile_plan, compile_plan_exhaustive, get_plan
from conftest import LONG
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


# ----------------------------------------------------------------------------
# Plans from block-level reasoning, against the exhaustive compiler
# ----------------------------------------------------------------------------

def random_pattern(rng, lq, lk, depth=2):
    """A built-in pattern, or a union or intersection of them, with random
    parameters for lengths lq, lk."""
    if depth and rng.random() < 0.5:
        a, b = random_pattern(rng, lq, lk, depth - 1), random_pattern(rng, lq, lk, depth - 1)
        if a.heads not in (None, 1) and b.heads not in (None, 1, a.heads):
            return a
        return a | b if rng.random() < 0.5 else a & b
    kind = rng.randrange(9)
    if kind == 0:
        return P.causal(bottom_right=rng.random() < 0.5)
    if kind == 1:
        return P.sliding_window(rng.randrange(0, 80), rng.randrange(0, 30), dilation=rng.choice([1, 1, 2, 3, 5]))
    if kind == 2:
        if rng.random() < 0.5:
            return P.global_tokens(rng.randrange(0, 9))
        return P.global_tokens(torch.tensor(rng.sample(range(max(lq, lk) + 5), rng.randrange(1, 7))))
    if kind == 3:
        return P.strided(rng.randrange(1, 40))
    if kind == 4:
        block = rng.randrange(1, 40)
        return P.fixed(block, rng.randrange(1, block + 1))
    if kind == 5:
        return P.bigbird(rng.randrange(1, 33), rng.choice([0, 1, 3, 5]), rng.randrange(0, 3), rng.randrange(0, 4),
                         seed=rng.randrange(100))
    if kind == 6:
        block = rng.randrange(1, 50)
        heads = rng.choice([1, 3])
        g = torch.Generator().manual_seed(rng.randrange(1000))
        shape = (heads, -(-lq // block), -(-lk // block))
        return P.block_layout(torch.rand(*shape, generator=g) < rng.random(), block)
    if kind == 7:
        return P.sliding_window(rng.randrange(0, 300), rng.randrange(0, 300))
    return P.causal() & P.sliding_window(rng.randrange(0, 100), 0)


FIELDS = ["q_index", "kv_index", "kv_count", "kv_blocks", "kv_partial", "q_count", "q_blocks", "q_partial",
          "partial_masks"]


def assert_same_plan(got, want):
    assert (got.heads, got.lq, got.lk, len(got.subpasses)) == (want.heads, want.lq, want.lk, len(want.subpasses))
    for g, w in zip(got.subpasses, want.subpasses):
        assert (g.lq, g.lk) == (w.lq, w.lk)
        for name in FIELDS:
            a, b = getattr(g, name), getattr(w, name)
            if a is None or b is None:
                assert a is None and b is None, name
            else:
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


CASES = 400 if LONG else 60


@pytest.mark.parametrize("seed", range(CASES))
def test_fast_plan_equals_exhaustive(seed):
    """Random patterns and compositions, lengths and tiles (non-multiples
    included): every tensor of the plan built from block-level reasoning
    equals the exhaustive compiler's, bit for bit."""
    rng = random.Random(seed)
    lq, lk = rng.randrange(1, 400), rng.randrange(1, 400)
    if rng.random() < 0.3:
        lk = lq
    pattern = random_pattern(rng, lq, lk)
    block = (rng.choice([4, 8, 16, 32, 64]), rng.choice([4, 8, 16, 32, 64]))
    assert_same_plan(compile_plan(pattern, lq, lk, *block), compile_plan_exhaustive(pattern, lq, lk, *block))


def test_fast_plan_counts_in_small_chunks(monkeypatch):
    """Counting the natural order's tiles stops as soon as it is sure they
    are too many; in chunks of 3 undecided tiles the plans stay equal."""
    monkeypatch.setattr(plans.refine, "COUNT_CHUNK", 3)
    for seed in range(CASES // 2):
        rng = random.Random(1000 + seed)
        lq, lk = rng.randrange(1, 300), rng.randrange(1, 300)
        pattern = random_pattern(rng, lq, lk)
        block = (rng.choice([4, 8, 16]), rng.choice([4, 8, 16]))
        assert_same_plan(compile_plan(pattern, lq, lk, *block), compile_plan_exhaustive(pattern, lq, lk, *block))


@pytest.mark.parametrize("threshold", [0, 1 << 40], ids=["tile_by_tile", "row_by_row"])
def test_fast_plan_writes_schedules_either_way(monkeypatch, threshold):
    """Schedules that are mostly padding get their tiles written one by one,
    the others row by row; forced either way, plans stay equal."""
    monkeypatch.setattr(plans.refine, "SPARSE_SCHEDULE", threshold)
    for seed in range(CASES // 2):
        rng = random.Random(2000 + seed)
        lq, lk = rng.randrange(1, 300), rng.randrange(1, 300)
        pattern = random_pattern(rng, lq, lk)
        block = (rng.choice([4, 8, 16]), rng.choice([4, 8, 16]))
        assert_same_plan(compile_plan(pattern, lq, lk, *block), compile_plan_exhaustive(pattern, lq, lk, *block))


@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
@pytest.mark.parametrize("lengths", [(97, 97), (63, 150), (200, 71), (1, 1), (640, 640)], ids=str)
def test_fast_plan_equals_exhaustive_for_every_pattern_kind(pattern_id, lengths):
    pattern = patterns_for_tests(4, *lengths)[pattern_id]
    for block in [(16, 32), (64, 64)]:
        assert_same_plan(compile_plan(pattern, *lengths, *block), compile_plan_exhaustive(pattern, *lengths, *block))


class Checkerboard(P.Pattern):
    """A user's pattern with a mask only: no block-level reasoning."""

    def mask(self, h, i, j, lq, lk):
        return (i + j) % 3 == 0

    @property
    def key(self):
        return ("checkerboard",)


def test_patterns_without_block_reasoning_take_the_exhaustive_path():
    for pattern in [Checkerboard(), Checkerboard() | P.sliding_window(5), P.global_tokens(2) & Checkerboard()]:
        assert_same_plan(compile_plan(pattern, 90, 70, 16, 16), compile_plan_exhaustive(pattern, 90, 70, 16, 16))


def random_block(rng, start, length):
    """Random positions below ``length`` from about ``start``: a run, a
    progression, a random subset, in any order."""
    start = min(max(start, 0), length - 1)
    kind = rng.randrange(4)
    if kind == 0:
        return list(range(start, min(length, start + rng.randrange(1, 20))))
    if kind == 1:
        return list(range(start, length, rng.randrange(1, 9)))[:rng.randrange(1, 12)]
    pos = rng.sample(range(start, min(length, start + 40)), rng.randrange(1, min(12, length - start) + 1))
    return sorted(pos) if kind == 2 else pos


@pytest.mark.parametrize("seed", range(40))
def test_tile_facts_are_true(seed):
    """Every fact a pattern states about a tile holds on its pairs, for blocks
    of any positions: full -> all allowed, none -> none, some -> one is,
    notall -> one is not."""
    rng = random.Random(seed)
    lq = lk = 120
    pattern = random_pattern(rng, lq, lk)
    heads = pattern.heads or 1
    qs = [random_block(rng, rng.randrange(lq), lq) for _ in range(300)]
    # key blocks near their query block: where facts are hardest
    ks = [random_block(rng, q[0] + rng.randrange(-45, 30), lk) for q in qs]

    def describe(blocks):
        cols = []
        for pos in blocks:
            d = tile_facts.describe(torch.tensor(pos), len(pos))
            cols.append(torch.stack([d.lo, d.hi, d.step, d.count]))
        return tile_facts.Blocks(*torch.cat(cols, 1))

    h = torch.tensor([rng.randrange(heads) for _ in qs])
    facts = pattern.tile_facts(h, describe(qs), describe(ks), lq, lk)
    assert facts is not None
    dense = pattern.dense_mask(lq, lk).view(-1, lq, lk)
    for n, (qp, kp) in enumerate(zip(qs, ks)):
        tile = dense[h[n] if dense.shape[0] > 1 else 0][torch.tensor(qp).view(-1, 1), torch.tensor(kp).view(1, -1)]
        assert not facts.full[n] or tile.all()
        assert not facts.none[n] or not tile.any()
        assert not facts.some[n] or tile.any()
        assert not facts.notall[n] or not tile.all()


def test_plans_at_scale_evaluate_only_undecided_tiles(monkeypatch):
    """At L = 131072 a Longformer plan is built from block-level reasoning:
    the mask is evaluated on a handful of distinct tiles, never on all
    pairs, and the tiles are what the pattern needs."""
    L, b = 131072, 64
    evaluated = []
    for cls in (P.SlidingWindow, P.GlobalTokens, P._GlobalKey, P.Dense):
        original = cls.mask

        def counting(self, h, i, j, lq, lk, original=original):
            out = original(self, h, i, j, lq, lk)
            evaluated.append(torch.broadcast_shapes(out.shape, i.shape, j.shape).numel())
            return out
        monkeypatch.setattr(cls, "mask", counting)
    plan = compile_plan(P.sliding_window(256) | P.global_tokens(16), L, L, b, b)
    n = L // b
    window = sum(min(r + 1, 5) for r in range(n))
    # the window's tiles; the global keys' block for every query block but
    # 1 to 3 (whose window holds all 16 global keys); every key block for
    # the global queries' block
    assert plan.num_tiles == window + (n - 3) + n
    assert sum(evaluated) <= 64 * b * b, f"mask evaluated on {sum(evaluated)} pairs"
    assert sum(sp.schedule_slots for sp in plan.subpasses) < 8 * plan.num_tiles


def test_plan_bench_table():
    """bench.plans times tfk's build against the exhaustive compiler's (and
    says whether their plans agree) and Flex's create_block_mask."""
    from bench import plans as bench_plans
    L = 512
    rows = [bench_plans.measure(name, pattern, L, repeat=1, peers=True)
            for name, pattern in bench_plans.patterns(L).items() if name in ("window_256|global_16", "fixed_128_8")]
    for row in rows:
        assert row["same"] is True and row["exhaustive_x"] > 0
        assert row["tiles"] == compile_plan(bench_plans.patterns(L)[row["pattern"]], L, L, 64, 64).num_tiles
        assert row["flex_x"] is None or row["flex_x"] > 0
    assert "window_256|global_16" in bench_plans.format_table(rows)
