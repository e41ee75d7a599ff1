"""The KV-cache decoding oracle: a loop over sequences, each one's keys
0..n-1 gathered (through the block table when paged), dense masked attention
from ``pattern.mask`` at absolute positions, in the inputs' dtype (the tests
and the "reference" backend call it in float64). It shares nothing with the
other backends: they are checked against it.

Sequence b with s = cache_seqlens[b] and n = s + Lq: query t (at absolute
position s + t) of head h scores key j < n when
pattern.mask(h, s + t, j, n, n); lse = log Σ exp(scale · q·k) over those keys
(-inf, and out 0, when there is none).
"""
import torch


def gather_sequence(cache, b, n, block_table=None):
    """Cache positions 0..n-1 of sequence b: (Hkv, n, D). ``cache`` is
    (B, Hkv, Lmax, D), or paged (num_blocks, Hkv, page, D) with position j at
    row j % page of block block_table[b, j // page]."""
    if block_table is None:
        return cache[b, :, :n]
    page = cache.shape[2]
    j = torch.arange(n, device=cache.device)
    blocks = block_table[b].long()[j // page]
    return cache[blocks, :, j % page].transpose(0, 1)        # (n, Hkv, D) -> (Hkv, n, D)


def kvcache_reference(q, k_cache, v_cache, cache_seqlens, pattern, scale, block_table=None):
    """out (B, H, Lq, Dv) and lse (B, H, Lq) in q's dtype (float64 for the oracle).

    q (B, H, Lq, D); k_cache / v_cache (B, Hkv, Lmax, D / Dv), or paged
    (num_blocks, Hkv, page, D / Dv) with block_table (B, max_pages);
    cache_seqlens (B,); ``pattern`` a tfk pattern (causal for decoding),
    evaluated at absolute positions."""
    B, H, Lq, _ = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[-1]
    G = H // Hkv
    out = torch.zeros(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=q.dtype, device=q.device)
    for b in range(B):
        s = int(cache_seqlens[b])
        n = s + Lq
        k = gather_sequence(k_cache, b, n, block_table).to(q.dtype).repeat_interleave(G, 0)   # (H, n, D)
        v = gather_sequence(v_cache, b, n, block_table).to(q.dtype).repeat_interleave(G, 0)
        i = (s + torch.arange(Lq, device=q.device)).view(1, Lq, 1)
        j = torch.arange(n, device=q.device).view(1, 1, n)
        h = torch.arange(H, device=q.device).view(H, 1, 1)      # a pattern of one head ignores h
        allowed = pattern.mask(h, i, j, n, n).expand(H, Lq, n)
        scores = (q[b] @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        lse_b = torch.logsumexp(scores, -1)                                  # -inf for a row with no key
        p = torch.exp(scores - lse_b.unsqueeze(-1)).nan_to_num(0.0)          # such a row: NaN -> 0
        out[b] = p @ v
        lse[b] = lse_b
    return out, lse
