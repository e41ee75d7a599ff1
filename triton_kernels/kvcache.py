"""Split-KV decoding over a KV cache, in Triton (backend "triton" of the
"kvcache" family).

Pass 1, grid (B * Hkv, splits, row blocks): a program takes one (batch b,
key head hk) and a block of the query rows of its group, the G = H / Hkv
query heads x Lq queries (rows r = g * Lq + t). Up to 64 rows (32 at head
dims over 128) are one block, so K/V are read once per key head; more rows
take more blocks, each reading the keys again. A program computes its
sequence's key range [lo, hi) from cache_seqlens in the kernel (no host sync
for it): hi = s + Lq, lo = s - left for a band with a bounded left side,
else 0. The range's BLOCK_N-key blocks (aligned to
absolute positions) are dealt out to the splits in contiguous runs; a
program walks its run with an online softmax (log2 domain) and masks each
element by the band and j < hi. It writes its partial out (float32,
normalised) and lse; a split with no block writes out 0 and lse -inf.

Pass 2, one program per (b, h, t) row: merges the splits' partials by
log-sum-exp (weights exp(lse_s - max); an all-empty row gives out 0, lse -inf).

Paged caches: column j reads block block_table[b, j // page], row j % page.
Tiles: while tfk.backends.counting_tiles(), each program counts the
(batch, key head, key block) tiles it computes (per row block) into an int32
counter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tfk import backends
from tfk.ops.kvcache.call import num_splits
from tfk.triton_kernels.attention import dot_precision

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def tile_config(rows, head_dim, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``rows`` = G * Lq query
    rows per key head and the larger head dim. Chosen with an ahead-of-time
    compile for sm_80 and sm_90 (ptxas -v): no spills, shared memory within
    both archs' limits; taller row blocks or longer key blocks spill."""
    block_m = min(max(16, triton.next_power_of_2(rows)), 64 if head_dim <= 128 else 32)
    block_n = 64 if head_dim <= 128 and block_m <= 16 else 32
    num_warps = 4 if block_m <= 16 else 8
    num_stages = 1 if head_dim > 128 and dtype == torch.float32 else 2
    return block_m, block_n, num_warps, num_stages


@triton.jit
def _kvcache_split(
    Q, K, V, Seqlens, Table, OutP, LseP, Tiles,
    skb, skh, skn, svb, svh, svn, stb, sos, sls,
    Hkv, Lq, R, D, DV, page, left, right, blocks_per_split, qk_scale,
    PAGED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    """Partial out (rows, DV) float32 and lse of split program_id(1) of
    (batch, key head) program_id(0), rows of row block program_id(2). Q is
    contiguous (B, H, Lq, D), so the group's rows are the flat rows
    bh * R + r; OutP (splits, B*H*Lq, DV)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    rb = tl.program_id(2)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    s = tl.load(Seqlens + b)
    n = s + Lq
    lo = 0
    if HAS_LEFT:
        lo = tl.maximum(s - left, 0)
    kb0 = lo // BLOCK_N + split * blocks_per_split
    kb1 = tl.minimum(kb0 + blocks_per_split, tl.cdiv(n, BLOCK_N))

    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < R
    rows = bh.to(tl.int64) * R + r
    p = s + r % Lq                                   # each row's absolute query position
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for kb in range(kb0, kb1):
        if COUNT_TILES:
            tl.atomic_add(Tiles, 1)
        cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        if PAGED:
            blk = tl.load(Table + b * stb + cols // page, mask=col_ok, other=0).to(tl.int64)
            k_off = blk * skb + (cols % page) * skn
            v_off = blk * svb + (cols % page) * svn
        else:
            k_off = b * skb + cols.to(tl.int64) * skn
            v_off = b * svb + cols.to(tl.int64) * svn
        kT = tl.load(K + hk * skh + k_off[None, :] + d[:, None], mask=col_ok[None, :] & (d[:, None] < D),
                     other=0.0)
        sc = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        allowed = row_ok[:, None] & col_ok[None, :]
        if HAS_LEFT:
            allowed = allowed & (cols[None, :] >= p[:, None] - left)
        if HAS_RIGHT:
            allowed = allowed & (cols[None, :] <= p[:, None] + right)
        sc = tl.where(allowed, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        # rows with nothing allowed yet keep m = -inf: subtract 0 instead
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        pr = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(V + hk * svh + v_off[:, None] + dv[None, :], mask=col_ok[:, None] & (dv[None, :] < DV),
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(OutP + split * sos + rows[:, None] * DV + dv[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LseP + split * sls + rows, lse, mask=row_ok)


@triton.jit
def _kvcache_merge(OutP, LseP, Out, Lse, sos, sls, S, DV,
                   BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Row program_id(0) of (B*H*Lq): the log-sum-exp merge of its S partials."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    s_ok = sp < S
    lse = tl.load(LseP + sp * sls + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)                     # an empty split (lse -inf) weighs 0
    total = tl.sum(w, 0)
    o = tl.load(OutP + sp[:, None] * sos + row * DV + dv[None, :], mask=s_ok[:, None] & (dv[None, :] < DV),
                other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + row * DV + dv, out.to(Out.dtype.element_ty), mask=dv < DV)
    tl.store(Lse + row, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total)))


def kvcache_forward(call, block_n=None, splits=None, block_m=None):
    """out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32 of a
    KVCacheCall with a band pattern and Lq <= SPLIT_KV_MAX_LQ.

    ``block_n`` keys per block and ``block_m`` rows per row block (default
    tile_config's); ``splits`` programs per (batch, key head) and row block
    (default num_splits over the longest key range, from call.max_seqlen: no
    device sync here)."""
    q = call.q.contiguous()
    B, H, Lq, D = q.shape
    k, v = call.k_cache, call.v_cache
    # the kernel reads rows with unit stride along the head dim
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    Hkv, Dv = k.shape[1], v.shape[-1]
    R = (H // Hkv) * Lq
    left, right = call.band
    bm, bn, num_warps, num_stages = tile_config(R, max(D, Dv), q.dtype)
    block_m, block_n = block_m or bm, block_n or bn
    # the longest key range, and its blocks (+1: a range need not start on a block)
    keys = call.max_seqlen + Lq if left is None else min(call.max_seqlen + Lq, left + Lq)
    blocks = triton.cdiv(keys, block_n) + 1
    S = max(1, min(splits or num_splits(B * Hkv, keys, block_n), blocks))
    per = triton.cdiv(blocks, S)

    out_p = backends.new_output((S, B * H * Lq, Dv), torch.float32, q.device)
    lse_p = backends.new_output((S, B * H * Lq), torch.float32, q.device)
    count = backends.counting_tiles()
    tiles = torch.zeros(1, dtype=torch.int32, device=q.device) if count else lse_p
    table = call.block_table if call.paged else call.cache_seqlens       # never read when not paged
    page = k.shape[2] if call.paged else 1
    _kvcache_split[(B * Hkv, S, triton.cdiv(R, block_m))](
        q, k, v, call.cache_seqlens, table, out_p, lse_p, tiles,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), table.stride(0),
        out_p.stride(0), lse_p.stride(0),
        Hkv, Lq, R, D, Dv, page, left or 0, right or 0, per, call.scale * LOG2E,
        PAGED=call.paged, HAS_LEFT=left is not None, HAS_RIGHT=right is not None,
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        PRECISION=dot_precision(q.dtype), COUNT_TILES=count, num_warps=num_warps, num_stages=num_stages)

    out = backends.new_output((B, H, Lq, Dv), q.dtype, q.device)
    lse = backends.new_output((B, H, Lq), torch.float32, q.device)
    _kvcache_merge[(B * H * Lq,)](out_p, lse_p, out, lse, out_p.stride(0), lse_p.stride(0), S, Dv,
                                  BLOCK_S=max(2, triton.next_power_of_2(S)),
                                  BLOCK_DV=max(16, triton.next_power_of_2(Dv)))
    if count:
        backends.add_tiles("forward", int(tiles.item()))
    return out, lse
