"""Each pattern's dense_mask against its definition, written out by hand."""

import pytest
import torch

import tfk
from tfk import patterns as P

SIZES = [(37, 37), (45, 29), (23, 64)]


def brute(Lq, Lk, rule):
    return torch.tensor([[bool(rule(i, j)) for j in range(Lk)] for i in range(Lq)])


DEFINITIONS = {
    "causal": (P.causal(), lambda i, j, Lq, Lk: j <= i),
    "causal_bottom_right": (P.causal(bottom_right=True), lambda i, j, Lq, Lk: j <= i + Lk - Lq),
    "window": (P.sliding_window(5), lambda i, j, Lq, Lk: 0 <= i - j <= 5),
    "window_two_sided": (P.sliding_window(4, 3), lambda i, j, Lq, Lk: -3 <= i - j <= 4),
    "window_dilated": (P.sliding_window(9, 6, dilation=3),
                       lambda i, j, Lq, Lk: -6 <= i - j <= 9 and (i - j) % 3 == 0),
    "global_n": (P.global_tokens(3), lambda i, j, Lq, Lk: i < 3 or j < 3),
    "global_idx": (P.global_tokens(torch.tensor([2, 11, 30, 99])),
                   lambda i, j, Lq, Lk: i in (2, 11, 30, 99) or j in (2, 11, 30, 99)),
    "strided": (P.strided(4), lambda i, j, Lq, Lk: j <= i and (i - j < 4 or (i - j) % 4 == 0)),
    "fixed": (P.fixed(8, 2), lambda i, j, Lq, Lk: j <= i and (j // 8 == i // 8 or j % 8 >= 6)),
}


@pytest.mark.parametrize("Lq,Lk", SIZES)
@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_dense_mask_matches_definition(name, Lq, Lk):
    pattern, rule = DEFINITIONS[name]
    got = pattern.dense_mask(Lq, Lk)
    assert got.dtype == torch.bool and got.shape == (Lq, Lk)
    assert torch.equal(got, brute(Lq, Lk, lambda i, j: rule(i, j, Lq, Lk)))


@pytest.mark.parametrize("Lq,Lk", SIZES)
def test_composition_is_union_and_intersection(Lq, Lk):
    a, b, c = P.sliding_window(6, 2), P.global_tokens(2), P.strided(5)
    ma, mb, mc = (p.dense_mask(Lq, Lk) for p in (a, b, c))
    assert torch.equal((a | b).dense_mask(Lq, Lk), ma | mb)
    assert torch.equal((a & c).dense_mask(Lq, Lk), ma & mc)
    assert torch.equal(((a | b) & c).dense_mask(Lq, Lk), (ma | mb) & mc)


def test_block_layout_per_head():
    layout = torch.tensor([[[1, 0, 1], [0, 1, 0]], [[0, 0, 1], [1, 1, 1]]], dtype=torch.bool)
    pattern = P.block_layout(layout, 4)
    m = pattern.dense_mask(7, 10)  # ceil(7/4) = 2, ceil(10/4) = 3
    assert m.shape == (2, 7, 10)
    want = torch.stack([brute(7, 10, lambda i, j: layout[h, i // 4, j // 4]) for h in range(2)])
    assert torch.equal(m, want)
    assert pattern.heads == 2


def test_bigbird_layout():
    block, nb = 8, 6
    pattern = P.bigbird(block, window_blocks=3, global_blocks=1, random_blocks=2, seed=5)
    L = block * nb - 3
    m = pattern.dense_mask(L, L)
    blocks = torch.zeros(nb, nb, dtype=torch.long)
    for qb in range(nb):
        for kb in range(nb):
            tile = m[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
            assert tile.all() or not tile.any(), "BigBird allows whole blocks"
            blocks[qb, kb] = int(tile.any())
    for qb in range(nb):
        for kb in range(nb):
            if abs(qb - kb) <= 1 or qb == 0 or kb == 0:
                assert blocks[qb, kb] == 1, (qb, kb)
        if qb > 0:
            fixed = sum(1 for kb in range(nb) if abs(qb - kb) <= 1 or kb == 0)
            assert blocks[qb].sum() == min(nb, fixed + 2), "two random blocks per row, where room"
    # deterministic in the seed, different across seeds
    assert torch.equal(m, P.bigbird(block, 3, 1, 2, seed=5).dense_mask(L, L))
    assert not torch.equal(m, P.bigbird(block, 3, 1, 2, seed=6).dense_mask(L, L))


def test_global_positions_past_the_end_do_not_occur():
    m = P.global_tokens(torch.tensor([1, 500])).dense_mask(10, 12)
    assert torch.equal(m, brute(10, 12, lambda i, j: i == 1 or j == 1))


def test_patterns_hash_and_compare_by_value():
    assert P.sliding_window(4, 1) == P.sliding_window(4, 1)
    assert P.sliding_window(4, 1) != P.sliding_window(4, 2)
    assert hash(P.global_tokens(torch.tensor([1, 5]))) == hash(P.global_tokens(torch.tensor([5, 1])))
    assert (P.causal() | P.global_tokens(2)) == (P.causal() | P.global_tokens(2))


@pytest.mark.parametrize("make,match", [
    (lambda: P.sliding_window(-1), "left"),
    (lambda: P.sliding_window(3, -2), "right"),
    (lambda: P.sliding_window(3, dilation=0), "dilation"),
    (lambda: P.sliding_window(2.5), "left"),
    (lambda: P.strided(0), "stride"),
    (lambda: P.fixed(4, 5), "summary"),
    (lambda: P.fixed(0, 1), "block"),
    (lambda: P.bigbird(16, 2, 1, 1), "odd"),
    (lambda: P.global_tokens(torch.tensor([0.5])), "integer"),
    (lambda: P.global_tokens(torch.tensor([-1])), ">= 0"),
    (lambda: P.block_layout(torch.ones(2, 2), 4), "bool"),
    (lambda: P.block_layout(torch.ones(1, 1, 2, 2, dtype=torch.bool), 4), "shape"),
    (lambda: P.causal() | "causal", "compose"),
])
def test_bad_pattern_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_block_layout_of_the_wrong_shape():
    pattern = P.block_layout(torch.ones(1, 3, 3, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match=r"ceil\(Lq/block\)=4"):
        pattern.dense_mask(64, 40)
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match="block_layout"):
        tfk.attention(q, q, q, pattern)


def test_heads_must_match():
    pattern = P.block_layout(torch.ones(3, 1, 1, dtype=torch.bool), 16)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="pattern has 3 heads"):
        tfk.attention(q, q, q, pattern)
    with pytest.raises(ValueError, match="heads"):
        pattern | P.block_layout(torch.ones(2, 1, 1, dtype=torch.bool), 16)
