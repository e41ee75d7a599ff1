"""The split-KV kernel itself (triton_kernels/kvcache.py): several splits,
splits with no key, paged reads, and the tiles it visits."""
import pytest
import torch

import tfk.ops.kvcache as kv
from tfk import backends
from tfk import patterns as P
from tfk.ops.kvcache.call import KVCacheCall, band_of
from tfk.triton_kernels import kvcache as kernels
from kvcache_cases import Case, expected, layout, make_inputs
from tolerances import FLOOR, max_err


def _call(c: Case, dtype=torch.float32):
    """A KVCacheCall of case c (no append: the caches already hold the keys)."""
    c = c.with_(append=False)
    inputs = make_inputs(c)
    q, kc, vc, seqlens, kw = layout(c, *inputs, dtype)
    pattern = c.pattern or P.causal()
    call = KVCacheCall(q, kc, vc, seqlens, kw.get("block_table"), pattern, band_of(pattern),
                       c.scale or c.D ** -0.5, True, max(c.seqlens))
    return call, expected(c, inputs)


SPLIT_CASES = {
    # seq 0 has one block of 16 keys, seq 1 ten: with 6 splits most of seq 0's are empty
    "causal_uneven": Case(Lq=2, Lmax=160, seqlens=(3, 150)),
    "window_paged": Case(Lq=3, Lmax=192, seqlens=(180, 40), pattern=P.sliding_window(50), page=32),
    "dense_gqa4": Case(H=4, Hkv=1, Lq=1, Lmax=128, seqlens=(0, 100), pattern=P.DENSE),
    "both_sides": Case(Lq=4, Lmax=128, seqlens=(60, 5), pattern=P.sliding_window(20, 3), D=32, Dv=16),
}


@pytest.mark.parametrize("splits", [1, 3, 6])
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_split_kv_against_reference(name, splits):
    call, (ref_out, ref_lse) = _call(SPLIT_CASES[name])
    out, lse = kernels.kvcache_forward(call, block_n=16, splits=splits)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # fp32 in the interpreter: exact dots, float32 rounding of the softmax only
    assert max_err(out, ref_out) <= 10 * FLOOR[torch.float32]["out"]
    assert max_err(lse, ref_lse) <= 10 * FLOOR[torch.float32]["lse"]


def test_a_split_with_no_key_weighs_nothing():
    """Splits past a short sequence's blocks have lse -inf and out 0: the
    merge gives the same result as one split (within rounding), no NaN."""
    call, _ = _call(SPLIT_CASES["causal_uneven"])
    one = kernels.kvcache_forward(call, block_n=16, splits=1)
    many = kernels.kvcache_forward(call, block_n=16, splits=10)
    for a, b in zip(one, many):
        assert not torch.isnan(b).any()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _expected_tiles(c: Case, block_n):
    """(batch, key head, key block) tiles of the key ranges: blocks lo // block_n .. ceil(hi / block_n)."""
    band = band_of(c.pattern or P.causal())
    total = 0
    for s in c.seqlens:
        lo, hi = kv.key_range(s, c.Lq, band)
        total += c.Hkv * (-(-hi // block_n) - lo // block_n)
    return total


@pytest.mark.parametrize("splits", [1, 4])
def test_windowed_decode_visits_only_the_window(splits):
    """Decode over a 200-key cache with a window of 20: the kernel scores only
    the blocks holding the last 21 keys, whatever the split count."""
    window = Case(Lq=1, Lmax=200, seqlens=(190, 199), pattern=P.sliding_window(20), append=False)
    full = window.with_(pattern=None)
    counts = {}
    for name, c in (("window", window), ("full", full)):
        call, _ = _call(c)
        with backends.count_tiles() as tiles:
            kernels.kvcache_forward(call, block_n=16, splits=splits)
        counts[name] = tiles["forward"]
        assert counts[name] == _expected_tiles(c, 16), (name, counts[name])
    # seq 0: blocks 10..11 (positions 170..190), seq 1: 11..12; x 2 key heads
    assert counts["window"] == 2 * (2 + 2) and counts["full"] == 2 * (12 + 13)


def test_tiles_through_the_api():
    """The backend reports its tiles to tfk.backends.count_tiles (default blocks of 64)."""
    c = Case(Lq=1, Lmax=200, seqlens=(190, 10), pattern=P.sliding_window(20))
    q, kc, vc, seqlens, kw = layout(c, *make_inputs(c), torch.float32)
    with backends.count_tiles() as tiles:
        kv.attention_with_kvcache(q, kc, vc, seqlens, backend="triton", **kw)
    # seq 0 reads 170..190: blocks 2 (128..191); seq 1 reads 0..10: block 0; x 2 key heads
    assert tiles["forward"] == 2 * (1 + 1) == _expected_tiles(c, 64)


def test_split_count_follows_num_splits():
    """Without an override the launch takes num_splits over the longest key
    range (from call.max_seqlen: no device sync), capped by its blocks."""
    assert kv.num_splits(2, 40000, 64) == 132
    assert kv.num_splits(1000, 40000, 64) == 1
    assert kv.num_splits(4, 100, 64) == 1


@pytest.mark.parametrize("splits", [1, 3])
def test_several_row_blocks(splits):
    """More query rows (G x Lq) than one row block: blocks of 16 rows, each
    walking the keys on its own, give the reference's result."""
    c = Case(H=4, Hkv=1, Lq=9, Lmax=96, seqlens=(70, 20), pattern=P.sliding_window(30))
    call, (ref_out, ref_lse) = _call(c)
    out, lse = kernels.kvcache_forward(call, block_n=16, splits=splits, block_m=16)    # 36 rows: 3 blocks
    assert max_err(out, ref_out) <= 10 * FLOOR[torch.float32]["out"]
    assert max_err(lse, ref_lse) <= 10 * FLOOR[torch.float32]["lse"]


def test_tile_config_stays_within_the_compiled_limits():
    """tile_config's rows per block: 64 up to head dim 128, 32 beyond (the
    ahead-of-time compile showed taller blocks spilling)."""
    assert kernels.tile_config(4, 128, torch.float16) == (16, 64, 4, 2)
    assert kernels.tile_config(128, 128, torch.float32)[0] == 64
    assert kernels.tile_config(128, 256, torch.float32) == (32, 32, 8, 1)
