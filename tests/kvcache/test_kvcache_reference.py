"""The oracle (tfk.ops.kvcache.kvcache_reference) by other means: torch SDPA
per sequence over hand-built masks, and its paged gather."""
import torch
import torch.nn.functional as F

from tfk import patterns as P
from tfk.ops.kvcache import kvcache_reference
from tfk.ops.kvcache.reference import gather_sequence
from kvcache_cases import to_paged


def _sdpa_by_hand(q, kc, vc, seqlens, allowed_fn, scale):
    """Per sequence, SDPA (float64, GQA) over keys 0..n-1 with the mask
    allowed_fn(t, j, s) built by hand."""
    B, H, Lq, _ = q.shape
    outs = []
    for b in range(B):
        s = int(seqlens[b])
        n = s + Lq
        t = torch.arange(Lq).view(-1, 1)
        j = torch.arange(n).view(1, -1)
        mask = allowed_fn(t, j, s)
        outs.append(F.scaled_dot_product_attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n],
                                                   attn_mask=mask, scale=scale, enable_gqa=True))
    return torch.cat(outs)


def test_reference_matches_sdpa_per_sequence():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, Lq, D, L = 3, 4, 2, 3, 8, 40
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    kc = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    vc = torch.randn(B, Hkv, L, 5, generator=g, dtype=torch.float64)
    seqlens = torch.tensor([0, 11, 30], dtype=torch.int32)
    cases = [
        (P.causal(), lambda t, j, s: j <= s + t),
        (P.sliding_window(4), lambda t, j, s: (j <= s + t) & (j >= s + t - 4)),
        (P.DENSE, lambda t, j, s: torch.ones_like(j <= t)),
        (P.sliding_window(2, 1), lambda t, j, s: (j <= s + t + 1) & (j >= s + t - 2)),
    ]
    for pattern, fn in cases:
        out, lse = kvcache_reference(q, kc, vc, seqlens, pattern, 0.3)
        torch.testing.assert_close(out, _sdpa_by_hand(q, kc, vc, seqlens, fn, 0.3), rtol=1e-12, atol=1e-12)
        assert torch.isfinite(lse).all()


def test_reference_empty_row_is_zero_with_lse_minus_inf():
    """A query with no allowed key (here: global_tokens(0) intersected with
    nothing): out 0, lse -inf, no NaN."""
    q = torch.randn(1, 2, 2, 4, dtype=torch.float64)
    kc = torch.randn(1, 1, 16, 4, dtype=torch.float64)
    out, lse = kvcache_reference(q, kc, kc, torch.tensor([5], dtype=torch.int32), P.global_tokens(0), 1.0)
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_gather_sequence_through_shuffled_pages():
    cache = torch.randn(2, 3, 64, 4, dtype=torch.float64)
    paged, table = to_paged(cache, 16)
    for b in range(2):
        assert torch.equal(gather_sequence(paged, b, 50, table), cache[b, :, :50])
