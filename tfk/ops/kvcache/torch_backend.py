"""Backend "torch" of the "kvcache" family (the CPU default; any device):
per sequence, only the cache positions its queries can reach (``key_range``:
a windowed decode over a 128k cache reads the window only), then one
matmul-softmax over them with the pattern's mask on those keys. Paged caches
gather only the pages in range. The G query heads of a key head are rows of
one attention over its keys (no repeated K/V). On CPU (fp16, bf16, fp32)
torch's flash-attention kernel computes it, out and lse in one pass; else a
matmul-softmax in float32 (float64 for float64 inputs).

Forward only.
"""
from __future__ import annotations

import torch

from ...backends import new_output
from .call import KVCacheBackend, KVCacheCall

# Score elements (rows x keys) computed at once: long query blocks over long
# caches go in row chunks, so memory stays O(SCORE_BUDGET) per sequence.
SCORE_BUDGET = 1 << 24


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def pattern_heads(pattern, H, device=None):
    """The head index to evaluate ``pattern.mask`` at for each of H query heads:
    (H, 1, 1) for a per-head pattern of H heads, else (1, 1, 1) zeros (one
    mask for every head)."""
    if pattern.heads not in (None, 1):
        return torch.arange(H, device=device).view(H, 1, 1)
    return torch.zeros(1, 1, 1, dtype=torch.int64, device=device)


def chunk_range(s, t0, t1, band):
    """[lo, hi): the cache positions queries t0..t1-1 of a sequence with s
    cached keys may read (hi None: up to n = s + Lq, which the caller
    applies). ``band`` None (any pattern) reads from 0."""
    if band is None:
        return 0, None
    left, right = band
    lo = 0 if left is None else max(0, s + t0 - left)
    hi = None if right is None else s + t1 + right
    return lo, hi


def read_keys(cache, b, lo, hi, block_table):
    """Positions lo..hi-1 of sequence b as (Hkv, hi - lo, D): a view of a
    contiguous cache; for a paged one, a gather of the pages in range only."""
    if block_table is None:
        return cache[b, :, lo:hi]
    page = cache.shape[2]
    p0, p1 = lo // page, -(-hi // page)
    blocks = block_table[b, p0:p1].long()
    pages = cache.index_select(0, blocks)                                # (p1 - p0, Hkv, page, D)
    rows = pages.transpose(0, 1).reshape(cache.shape[1], (p1 - p0) * page, cache.shape[3])
    return rows[:, lo - p0 * page:hi - p0 * page]


# torch's CPU flash-attention kernel, which also returns the lse: the fast
# path on CPU (one pass over K and V, as SDPA; the matmul form reads them in
# two passes and is about 1.3x slower on a decode step here). It needs D == Dv.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _attend(q, k, v, allowed, scale):
    """(out (Hkv, R, Dv), lse (Hkv, R)) of q (Hkv, R, D) over k (Hkv, nk, D),
    v (Hkv, nk, Dv); ``allowed`` None (every key) or bool broadcastable to
    (Hkv, R, nk). Rows with no allowed key: out 0, lse -inf."""
    if _CPU_FLASH is not None and q.is_cpu and q.dtype in _FLASH_DTYPES and q.shape[-1] == v.shape[-1]:
        mask = None
        if allowed is not None:
            mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))[None]
        out, lse = _CPU_FLASH(q[None], k[None], v[None], 0.0, False, attn_mask=mask, scale=scale)
        out, lse = out[0], lse[0]
        if allowed is not None:         # the kernel gives a keyless row lse 0: make it -inf
            lse = lse.masked_fill(~allowed.any(-1).expand(lse.shape), float("-inf"))
        return out, lse
    # matmul-softmax in float32 (float64 for float64): other devices, float64
    acc = acc_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)     # (Hkv, R, nk)
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)                   # a keyless row: subtract 0
    p = torch.exp(scores.sub_(m_safe))
    total = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.to(acc)) / torch.where(total == 0, torch.ones_like(total), total)
    return out, (m_safe + total.log()).squeeze(-1)


def kvcache_forward(call: KVCacheCall, seqlens=None):
    """out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32 (float64 for
    float64 inputs) of ``call``. ``seqlens``: cache_seqlens as a list of ints
    (read from the device when None: one sync)."""
    q = call.q
    B, H, Lq, D = q.shape
    Hkv, Dv = call.k_cache.shape[1], call.v_cache.shape[-1]
    G = H // Hkv
    out = new_output((B, H, Lq, Dv), q.dtype, q.device)
    lse = new_output((B, H, Lq), acc_dtype(q.dtype), q.device)
    if seqlens is None:
        seqlens = call.cache_seqlens.tolist()
    heads = pattern_heads(call.pattern, H, q.device)
    # rows per chunk: every query when the scores fit the budget
    longest = max(seqlens, default=0) + Lq
    step = max(1, min(Lq, SCORE_BUDGET // max(1, H * longest))) if Lq else 1
    for b, s in enumerate(seqlens):
        n = s + Lq
        for t0 in range(0, Lq, step):
            t1 = min(Lq, t0 + step)
            rows = t1 - t0
            lo, hi = chunk_range(s, t0, t1, call.band)
            hi = n if hi is None else min(hi, n)
            k = read_keys(call.k_cache, b, lo, hi, call.block_table)                 # (Hkv, hi - lo, D)
            v = read_keys(call.v_cache, b, lo, hi, call.block_table)
            # the pattern on these keys; G query heads of a key head are its rows g * rows + t
            i = torch.arange(s + t0, s + t1, device=q.device).view(1, -1, 1)
            j = torch.arange(lo, hi, device=q.device).view(1, 1, -1)
            allowed = call.pattern.mask(heads, i, j, n, n)
            if bool(allowed.all()):          # e.g. a causal decode: every key in range, no mask
                allowed = None
            else:
                allowed = allowed.expand(heads.shape[0], rows, hi - lo)
                allowed = allowed.reshape(Hkv, G * rows, hi - lo) if heads.shape[0] == H else \
                    allowed.expand(G, rows, hi - lo).reshape(1, G * rows, hi - lo)
            o, l = _attend(q[b, :, t0:t1].reshape(Hkv, G * rows, D), k, v, allowed, call.scale)
            out[b, :, t0:t1] = o.reshape(H, rows, Dv).to(q.dtype)
            lse[b, :, t0:t1] = l.reshape(H, rows)
    return out, lse


class TorchBackend(KVCacheBackend):
    """Torch ops per sequence over the keys its queries can reach: any call,
    any device. The CPU default."""
    name = "torch"
    priority = 10

    def run(self, call):
        return kvcache_forward(call)
