"""Grid patterns (tfk.grid_patterns: axial, NATTEN neighbourhoods, Image
Transformer local blocks): masks against oracles written from the
definitions, plans from tile facts against the exhaustive compiler, the
facts' soundness on random blocks, the tiles the grid-tiled layout saves, and
every backend against the float64 reference."""
import itertools
import math
import random

import pytest
import torch

import tfk
from tfk import patterns as P
from tfk import plan as plans
from tfk import tile_facts as tf
from tfk.plan import compile_plan, compile_plan_exhaustive
from conftest import LONG
from helpers import backend_params, check_against_reference, make_qkv, pattern_mask
from test_plan import assert_same_plan


# ----------------------------------------------------------------------------
# Oracles: per-dimension tables from the definitions, in plain Python
# ----------------------------------------------------------------------------

def na_table(n, k, dil, causal):
    t = [[False] * n for _ in range(n)]
    for i in range(n):
        r = i % dil
        for j in range(n):
            if j % dil != r:
                continue
            if causal:
                t[i][j] = 0 <= (i - j) // dil <= k - 1
            else:
                n_r = math.ceil((n - r) / dil)
                start = min(max(i // dil - k // 2, 0), n_r - k)
                t[i][j] = start <= j // dil <= start + k - 1
    return t


def axial_table(n, along, causal):
    return [[(j <= i if causal else True) if along else i == j for j in range(n)] for i in range(n)]


def local_table(n, qb, margin):
    return [[qb * (i // qb) - margin <= j <= qb * (i // qb) + qb - 1 + margin for j in range(n)] for i in range(n)]


def product_mask(shape, tables):
    """mask[i, j]: every dimension's table allows (i_d, j_d)."""
    coords = list(itertools.product(*(range(n) for n in shape)))   # row-major order
    L = len(coords)
    m = torch.ones(L, L, dtype=torch.bool)
    for d, t in enumerate(tables):
        c = torch.tensor([x[d] for x in coords])
        m &= torch.tensor(t)[c.view(-1, 1), c.view(1, -1)]
    return m


def per_dim(v, nd):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def oracle(kind, shape, **kw):
    nd = len(shape)
    if kind == "neighborhood":
        ks, ds, cs = (per_dim(kw.get(a, dflt), nd) for a, dflt in
                      (("kernel_size", None), ("dilation", 1), ("causal", False)))
        return product_mask(shape, [na_table(n, k, d, c) for n, k, d, c in zip(shape, ks, ds, cs)])
    if kind == "axial":
        axis = kw["axis"] % nd
        return product_mask(shape, [axial_table(n, d == axis, kw.get("causal", False)) for d, n in enumerate(shape)])
    qbs, ms = per_dim(kw["query_block"], nd), per_dim(kw["memory_margin"], nd)
    return product_mask(shape, [local_table(n, b, m) for n, b, m in zip(shape, qbs, ms)])


CASES = {
    "na_13x17_k5": ("neighborhood", (13, 17), dict(kernel_size=5)),
    "na_13x17_k3x7": ("neighborhood", (13, 17), dict(kernel_size=(3, 7))),
    "na_13x17_dil": ("neighborhood", (13, 17), dict(kernel_size=(3, 5), dilation=(2, 3))),
    "na_13x17_causal": ("neighborhood", (13, 17), dict(kernel_size=(4, 5), causal=(True, False))),
    "na_13x17_causal_dil": ("neighborhood", (13, 17), dict(kernel_size=(3, 2), dilation=(4, 3), causal=True)),
    "na_13x17_k1": ("neighborhood", (13, 17), dict(kernel_size=(1, 17))),
    "na_5x6x7_k3": ("neighborhood", (5, 6, 7), dict(kernel_size=3)),
    "na_5x6x7_mixed": ("neighborhood", (5, 6, 7), dict(kernel_size=(5, 3, 3), dilation=(1, 2, 2),
                                                       causal=(True, False, True))),
    "na_5x6x7_k5": ("neighborhood", (5, 6, 7), dict(kernel_size=(5, 5, 7))),
    "axial_13x17_a0": ("axial", (13, 17), dict(axis=0)),
    "axial_13x17_a1_causal": ("axial", (13, 17), dict(axis=1, causal=True)),
    "axial_13x17_a-2_causal": ("axial", (13, 17), dict(axis=-2, causal=True)),
    "axial_5x6x7_a1": ("axial", (5, 6, 7), dict(axis=1)),
    "axial_5x6x7_a2_causal": ("axial", (5, 6, 7), dict(axis=2, causal=True)),
    "axial_5x6x7_a-3_causal": ("axial", (5, 6, 7), dict(axis=-3, causal=True)),
    "local_13x17": ("local_blocks", (13, 17), dict(query_block=(4, 8), memory_margin=(2, 3))),
    "local_13x17_sq": ("local_blocks", (13, 17), dict(query_block=5, memory_margin=0)),
    "local_5x6x7": ("local_blocks", (5, 6, 7), dict(query_block=2, memory_margin=(1, 0, 2))),
}


def make(kind, shape, kw):
    return getattr(P, kind)(shape, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_mask_matches_the_definition(case):
    kind, shape, kw = CASES[case]
    pattern = make(kind, shape, kw)
    L = math.prod(shape)
    want = oracle(kind, shape, **kw)
    assert torch.equal(pattern.dense_mask(L, L), want)
    if kind == "neighborhood" and not any(per_dim(kw.get("causal", False), len(shape))):
        # non-causal: every query sees exactly prod(kernel_size) keys
        assert (want.sum(1) == math.prod(per_dim(kw["kernel_size"], len(shape)))).all()
    assert pattern.heads is None and hash(pattern.key) == hash(make(kind, shape, kw).key)
    assert kind in repr(pattern)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="axis"):
        P.axial((4, 5), 2)
    with pytest.raises(ValueError, match="axis"):
        P.axial((4, 5), -3)
    with pytest.raises(ValueError, match=r"kernel_size.*dimension 1"):
        P.neighborhood((13, 17), (3, 4))
    with pytest.raises(ValueError, match=r"dilation.*dimension 0"):
        P.neighborhood((13, 17), 5, dilation=3)
    with pytest.raises(ValueError, match="kernel_size"):
        P.neighborhood((13, 17), 0, causal=True)
    with pytest.raises(ValueError, match=r"shape \(13, 17\)"):
        P.neighborhood((13, 17), 3).dense_mask(220, 220)
    with pytest.raises(ValueError, match=r"shape \(4, 5\)"):
        compile_plan(P.axial((4, 5), 1), 20, 21, 16, 16)
    with pytest.raises(ValueError, match="query_block"):
        P.local_blocks((4, 5), 0, 1)
    assert P.neighborhood((13, 17), 4, causal=True).dense_mask(221, 221).any()   # even k: fine when causal


def test_grid_tiled_layout_orders_tile_by_tile():
    for shape, tile, offset in [((13, 17), (8, 8), (0, 0)), ((5, 6, 7), (4, 4, 4), (0, 0, 0)),
                                ((13, 17), (8, 8), (3, 5)), ((5, 6, 7), (4, 4, 4), (1, 2, 3))]:
        got = P.GridTiled(shape, tile, offset).indices(math.prod(shape), "cpu")
        assert got.tolist() == tiled_order(shape, tile, offset)
    assert P.GridTiled((13, 17)).tile == (8, 8) and P.GridTiled((5, 6, 7)).tile == (4, 4, 4)


# ----------------------------------------------------------------------------
# Plans from tile facts equal the exhaustive compiler's
# ----------------------------------------------------------------------------

def compositions():
    return {
        "na_and_causal": (P.neighborhood((13, 17), 5) & P.causal(), 221),
        "na3d_and_causal": (P.neighborhood((5, 6, 7), 3, dilation=(1, 2, 1)) & P.causal(), 210),
        "axial_or_window": (P.axial((13, 17), 0) | P.sliding_window(20), 221),
        "axial_causal_or_window": (P.axial((5, 6, 7), -1, causal=True) | P.sliding_window(9, 3), 210),
        "local_and_causal": (P.local_blocks((13, 17), (4, 8), (2, 3)) & P.causal(), 221),
        "local3d_and_causal": (P.local_blocks((5, 6, 7), 2, 1) & P.causal(), 210),
        "na_or_axial": (P.neighborhood((13, 17), 3) | P.axial((13, 17), 1, causal=True), 221),
    }


PLAN_BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 64)]


@pytest.mark.parametrize("case", list(CASES) + list(compositions()))
def test_fast_plan_equals_exhaustive(case):
    if case in CASES:
        kind, shape, kw = CASES[case]
        pattern, L = make(kind, shape, kw), math.prod(shape)
    else:
        pattern, L = compositions()[case]
    for block in PLAN_BLOCKS:
        assert_same_plan(compile_plan(pattern, L, L, *block), compile_plan_exhaustive(pattern, L, L, *block))


def test_fast_plan_equals_exhaustive_at_larger_grids():
    """Grids with an interior, where tiles share kinds (tile_kind) and one
    tile's mask stands for many."""
    for pattern, L, block in [
            (P.neighborhood((32, 40), 7), 1280, (64, 64)),
            (P.neighborhood((40, 36), (5, 3), dilation=(2, 3)), 1440, (64, 64)),
            (P.neighborhood((40, 36), (5, 3), dilation=(3, 2), causal=(True, False)), 1440, (32, 64)),
            (P.neighborhood((12, 10, 11), (3, 5, 3)), 1320, (64, 64)),
            (P.axial((32, 40), 0, causal=True), 1280, (64, 64)),
            (P.local_blocks((32, 40), (6, 8), 4), 1280, (32, 32))]:
        assert_same_plan(compile_plan(pattern, L, L, *block), compile_plan_exhaustive(pattern, L, L, *block))


# ----------------------------------------------------------------------------
# Tile facts are sound on random blocks
# ----------------------------------------------------------------------------

def random_grid_pattern(rng, shape):
    nd = len(shape)
    kind = rng.randrange(3)
    if kind == 0:
        return P.axial(shape, rng.randrange(-nd, nd), causal=rng.random() < 0.5)
    if kind == 1:
        ks, ds, cs = [], [], []
        for n in shape:
            c = rng.random() < 0.3
            d = rng.choice([1, 1, 2, 3])
            d = min(d, n)
            kmax = n // d
            k = rng.randrange(1, kmax + 1)
            if not c and k % 2 == 0:
                k -= 1
            ks.append(k), ds.append(d), cs.append(c)
        return P.neighborhood(shape, tuple(ks), tuple(ds), tuple(cs))
    return P.local_blocks(shape, tuple(rng.randrange(1, n + 1) for n in shape),
                          tuple(rng.randrange(0, 3) for _ in shape))


def random_grid_block(rng, shape):
    """Positions of a random box (whole, or with cells missing), or a random
    run or subset of positions."""
    L = math.prod(shape)
    kind = rng.randrange(4)
    if kind <= 1:
        lo = [rng.randrange(n) for n in shape]
        hi = [rng.randrange(a, min(n, a + 4)) for a, n in zip(lo, shape)]
        cells = list(itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi))))
        if kind == 1 and len(cells) > 1:
            cells = rng.sample(cells, rng.randrange(1, len(cells)))
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        pos = [sum(x * s for x, s in zip(c, strides)) for c in cells]
    elif kind == 2:
        start = rng.randrange(L)
        pos = list(range(start, min(L, start + rng.randrange(1, 30))))
    else:
        pos = rng.sample(range(L), rng.randrange(1, min(12, L + 1)))
    rng.shuffle(pos)
    return pos


def stack_blocks(blocks, grid):
    parts = [tf.describe(torch.tensor(p), len(p), grid) for p in blocks]
    box = () if grid is None else (grid, torch.cat([p.box_lo for p in parts]), torch.cat([p.box_hi for p in parts]))
    return tf.Blocks(*(torch.cat([getattr(p, f) for p in parts]) for f in ("lo", "hi", "step", "count")), *box)


def check_facts(pattern, shape, seed, n=200, with_grid=True):
    """Wrong facts found by brute force on random tiles (empty: sound)."""
    rng = random.Random(seed)
    L = math.prod(shape)
    qs = [random_grid_block(rng, shape) for _ in range(n)]
    ks = [random_grid_block(rng, shape) for _ in range(n)]
    grid = shape if with_grid else None
    facts = pattern.tile_facts(torch.zeros(n, dtype=torch.int64), stack_blocks(qs, grid), stack_blocks(ks, grid), L, L)
    dense = pattern.dense_mask(L, L)
    wrong = []
    for t, (qp, kp) in enumerate(zip(qs, ks)):
        tile = dense[torch.tensor(qp).view(-1, 1), torch.tensor(kp).view(1, -1)]
        for name, ok in [("full", tile.all()), ("none", ~tile.any()), ("some", tile.any()), ("notall", ~tile.all())]:
            if bool(getattr(facts, name)[t]) and not bool(ok):
                wrong.append((name, qp, kp))
    return wrong, facts


@pytest.mark.parametrize("seed", range(24 if not LONG else 200))
def test_tile_facts_are_sound(seed):
    rng = random.Random(seed)
    shape = rng.choice([(5, 7), (6, 9), (3, 4, 5), (4, 3, 6), (9,)])
    pattern = random_grid_pattern(rng, shape)
    if rng.random() < 0.25:
        pattern = pattern & P.causal() if rng.random() < 0.5 else pattern | P.sliding_window(3, 1)
    for with_grid in (True, False):
        wrong, _ = check_facts(pattern, shape, seed, with_grid=with_grid)
        assert not wrong, f"{pattern!r}: {wrong[:3]}"


def test_tile_facts_decide_whole_boxes():
    """On exact boxes the facts of a dilation-1 pattern decide every tile:
    some or none, and full or notall."""
    rng = random.Random(5)
    for shape in [(6, 9), (3, 4, 5)]:
        for pattern in [P.neighborhood(shape, 3), P.axial(shape, 0, causal=True), P.local_blocks(shape, 2, 1)]:
            L = math.prod(shape)
            boxes = []
            for _ in range(100):
                lo = [rng.randrange(n) for n in shape]
                hi = [rng.randrange(a, n) for a, n in zip(lo, shape)]
                strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
                boxes.append([sum(x * s for x, s in zip(c, strides))
                              for c in itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi)))])
            qs, ks = boxes[:50], boxes[50:]
            f = pattern.tile_facts(torch.zeros(50, dtype=torch.int64), stack_blocks(qs, shape),
                                   stack_blocks(ks, shape), L, L)
            assert bool((f.some | f.none).all()) and bool((f.full | f.notall).all())


def test_a_planted_wrong_fact_is_caught(monkeypatch):
    """The soundness check fails when a fact is flipped (none claimed where
    the window test says "full")."""
    from tfk import grid_patterns as G
    original = G._Window.facts

    def planted(self, a0, a1, b0, b1):
        full, none, some, notall = original(self, a0, a1, b0, b1)
        return full, none | full, some, notall
    monkeypatch.setattr(G._Window, "facts", planted)
    wrong, _ = check_facts(P.neighborhood((6, 9), 3), (6, 9), 0, n=300)
    assert any(name == "none" for name, *_ in wrong)
    shape, L = (13, 17), 221
    with pytest.raises(AssertionError):   # and the plans then differ from the exhaustive compiler's
        pattern = P.neighborhood(shape, 5)
        assert_same_plan(compile_plan(pattern, L, L, 16, 16), compile_plan_exhaustive(pattern, L, L, 16, 16))


# ----------------------------------------------------------------------------
# Tiles: the grid-tiled layouts against the natural order
# ----------------------------------------------------------------------------

class NaturalOrder(P.Pattern):
    """A pattern through one Region with IDENTITY layouts."""

    def __init__(self, pattern):
        self.pattern = pattern

    def mask(self, h, i, j, lq, lk):
        return self.pattern.mask(h, i, j, lq, lk)

    def tile_facts(self, h, q, k, lq, lk):
        return self.pattern.tile_facts(h, q, k, lq, lk)

    def check_lengths(self, lq, lk):
        self.pattern.check_lengths(lq, lk)

    @property
    def key(self):
        return ("natural order", self.pattern.key)


def tiles_with_a_pair(mask, q_order, k_order, block=64):
    m = mask[torch.tensor(q_order).view(-1, 1), torch.tensor(k_order).view(1, -1)]
    nq, nk = -(-m.shape[0] // block), -(-m.shape[1] // block)
    m = torch.nn.functional.pad(m, (0, nk * block - m.shape[1], 0, nq * block - m.shape[0]))
    return int(m.view(nq, block, nk, block).any(3).any(1).sum())


def tiled_order(shape, tile, offset):
    coords = list(itertools.product(*(range(n) for n in shape)))
    flat = {c: n for n, c in enumerate(coords)}
    key = lambda c: (tuple((x + o) // t for x, t, o in zip(c, tile, offset)),
                     tuple((x + o) % t for x, t, o in zip(c, tile, offset)))
    return [flat[c] for c in sorted(coords, key=key)]


def test_neighborhood_visits_the_tiles_of_the_grid_tiled_layout():
    shape, L = (32, 32), 1024
    pattern = P.neighborhood(shape, 7)
    mask = pattern.dense_mask(L, L)
    # query tiles of 8 x 8; key tiles of 8 x 8 starting half a window (3) before
    grid_tiles = tiles_with_a_pair(mask, tiled_order(shape, (8, 8), (0, 0)), tiled_order(shape, (8, 8), (3, 3)))
    aligned_tiles = tiles_with_a_pair(mask, tiled_order(shape, (8, 8), (0, 0)), tiled_order(shape, (8, 8), (0, 0)))
    natural_tiles = tiles_with_a_pair(mask, list(range(L)), list(range(L)))
    q, k, v, _ = make_qkv(1, 1, 1, L, L, 16)
    with tfk.backends.count_tiles() as counts:
        tfk.attention(q.float(), k.float(), v.float(), pattern, backend="torch")
    visited = counts["forward"]
    natural_plan = compile_plan(NaturalOrder(pattern), L, L, 64, 64).num_tiles
    assert natural_plan == natural_tiles
    assert visited <= 1.3 * grid_tiles
    assert visited < natural_plan
    assert grid_tiles < aligned_tiles


@pytest.mark.parametrize("pattern,shape", [
    (P.neighborhood((64, 64), 7), (64, 64)),
    (P.local_blocks((16, 32), 8, 4), (16, 32)),
    (P.axial((24, 40), 0), (24, 40)),
], ids=["na2d", "local", "axial_columns"])
def test_grid_layouts_need_fewer_tiles_than_the_natural_order(pattern, shape):
    L = math.prod(shape)
    plan = compile_plan(pattern, L, L, 64, 64)
    assert plan.subpasses[0].q_index is not None, "the grid-tiled region was chosen"
    assert plan.num_tiles < compile_plan(NaturalOrder(pattern), L, L, 64, 64).num_tiles


# ----------------------------------------------------------------------------
# Every backend against the float64 reference
# ----------------------------------------------------------------------------

BACKEND_CASES = {
    "na_13x17_k5": (P.neighborhood((13, 17), 5), 221),
    "na_5x6x7_k3": (P.neighborhood((5, 6, 7), 3, dilation=(1, 2, 1), causal=(True, False, False)), 210),
    "axial_13x17_causal": (P.axial((13, 17), 0, causal=True), 221),
    "local_13x17_and_causal": (P.local_blocks((13, 17), (4, 8), 2) & P.causal(), 221),
}


@pytest.fixture
def grid_layouts_only(monkeypatch):
    """Plans keep the patterns' grid-tiled regions even where the natural
    order would need fewer tiles (small grids), so the kernels run them."""
    def regions_only(pattern, lq, lk, bq, bk, device, region_plan, plain_cost):
        pattern.check_lengths(lq, lk)
        return tuple(sp for sp in (region_plan(r) for r in pattern.regions()) if sp is not None)
    plans.clear_plan_cache()
    monkeypatch.setattr(plans, "_choose", regions_only)
    yield
    plans.clear_plan_cache()


def _backend_case(backend, dtype, case):
    pattern, L = BACKEND_CASES[case]
    q, k, v, dout = make_qkv(1, 2, 1, L, L, 16, seed=len(case))
    fn = lambda q_, k_, v_: tfk.attention(q_, k_, v_, pattern, backend=backend, return_lse=True)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=pattern_mask(pattern, L, L))


def _cases(long_triton):
    """(backend, dtype, case) params; the interpreted Triton ones that
    ``long_triton`` names are in the long tier (deselected by default)."""
    out = []
    for p in backend_params():
        backend, dtype = p.values
        for case in BACKEND_CASES:
            slow = backend == "triton" and long_triton(dtype, case)
            out.append(pytest.param(backend, dtype, case, id=f"{p.id}-{case}",
                                    marks=[pytest.mark.slow] if slow else []))
    return out


# interpreted Triton: natural-order plans run in test_attention; here the long tier
@pytest.mark.parametrize("backend,dtype,case", _cases(lambda dtype, case: True))
def test_backends_match_the_reference(backend, dtype, case):
    """The plans compile_plan chooses (on these small grids mostly the natural order)."""
    _backend_case(backend, dtype, case)


# interpreted Triton: two cases by default, the rest in the long tier
@pytest.mark.parametrize("backend,dtype,case", _cases(
    lambda dtype, case: case.startswith(("local", "axial")) or (dtype == torch.float16 and case != "na_13x17_k5")))
def test_backends_match_the_reference_in_grid_tiled_layouts(backend, dtype, case, grid_layouts_only):
    """The grid-tiled regions themselves (partial edge tiles on 13 x 17 and 5 x 6 x 7)."""
    pattern, L = BACKEND_CASES[case]
    from helpers import plan_tiles
    plan = plans.get_plan(pattern, L, L, *plan_tiles(backend, 16, dtype))
    assert all(sp.q_index is not None and sp.kv_index is not None for sp in plan.subpasses)
    _backend_case(backend, dtype, case)


def test_blocks_carry_coordinate_boxes():
    """describe(grid=...) gives each block its coordinates' bounding box;
    coarser merges boxes and take selects them; without a grid there is none."""
    shape = (5, 6, 7)
    order = P.GridTiled(shape, (4, 4, 4), (1, 2, 3)).indices(210, "cpu")
    b = tf.describe(order, 16, shape)
    assert tf.describe(order, 16).box_lo is None and tf.coarser(tf.describe(order, 16)).box_lo is None
    for level in range(4):
        block = 16 << level
        coords = tf.grid_coords(order, shape)
        for n in range(b.lo.numel()):
            c = coords[n * block:(n + 1) * block]
            assert b.box_lo[n].tolist() == c.amin(0).tolist() and b.box_hi[n].tolist() == c.amax(0).tolist()
        picked = b.take(torch.tensor([b.lo.numel() - 1, 0]))
        assert picked.grid == shape and torch.equal(picked.box_hi[1], b.box_hi[0])
        b = tf.coarser(b)
