"""Flash attention over a tfk plan's block schedule, in Triton.

Forward: one program per (query block, batch * head) of a sub-pass walks the
key blocks its schedule lists, with an online softmax in the log2 domain, and
writes out and lse at the queries' original positions. Backward: a dK/dV
program per (key block, batch * key head) walks the transposed schedule over
every query head of its group (no atomics, no repeated K/V for GQA); a dQ
program per query block walks the forward schedule. Both recompute the tile
probabilities from the merged lse, and take delta = rowsum(dO * O) - dlse.

Masks: a tile listed as partial loads its bit mask from the plan; a user
attn_mask (bool or additive float) is read tile by tile through broadcast
strides, never expanded. Dropout regenerates its keep bits from
(seed, b, h, i, j) with the hash of tfk/dropout.py.

File grammar: configs -> kernels -> host forward/backward.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from tfk import dropout as drop
from tfk.backends import new_output
from tfk.ops.attention.merge import merge_partials

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# -----------------------------------------------------------------------------
# Configs
# -----------------------------------------------------------------------------

# fp32 dot precision: "ieee" (exact fp32, torch's default for matmul) or
# "tf32" (tensor cores, ~1e-3 relative error). A documented module setting.
FP32_PRECISION = "ieee"

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def block_config(head_dim):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim (the larger of D
    and Dv). One config serves forward and backward, so a call needs one plan."""
    if head_dim <= 64:
        return 64, 64, 4, 3
    if head_dim <= 128:
        return 64, 64, 4, 2
    return 64, 32, 8, 2


# -----------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------

@triton.jit
def _mix32(x):
    """tfk.dropout._mix32 on uint32 lanes (multiplication wraps mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _keep(drop_key, drop_threshold, b, h, q_pos, k_pos, H, Lq, Lk):
    """Dropout keep bits for tile (q_pos x k_pos), as tfk.dropout.keep."""
    counter = ((b * H + h) * Lq + q_pos[:, None]) * Lk + k_pos[None, :]
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    bits = _mix32(lo ^ _mix32(hi ^ drop_key.to(tl.uint32)))
    return bits.to(tl.int64) >= drop_threshold


@triton.jit
def _tile_scores(q, kT, pid, PMasks, Mask, b, h, q_pos, k_pos, row_ok, col_ok,
                 smb, smh, smm, smn, qk_scale,
                 MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Scores of one tile in the log2 domain, -inf where not allowed."""
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    allowed = row_ok[:, None] & col_ok[None, :]
    # a partial tile's bit mask; full tiles (pid < 0) skip the load
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    bits = tl.load(PMasks + pid.to(tl.int64) * (BLOCK_M * BLOCK_N) + tile, mask=(pid >= 0) & allowed, other=1)
    allowed = allowed & (bits != 0)
    if MASK_KIND != 0:
        m = tl.load(Mask + b * smb + h * smh + q_pos[:, None] * smm + k_pos[None, :] * smn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        if MASK_KIND == 1:
            allowed = allowed & (m != 0)
        else:
            s = s + m.to(tl.float32) * 1.4426950408889634
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _positions(Idx, start, n, BLOCK: tl.constexpr, HAS_IDX: tl.constexpr):
    """Layout positions start..start+BLOCK, their validity, and their original
    positions (int64)."""
    lay = start + tl.arange(0, BLOCK)
    ok = lay < n
    if HAS_IDX:
        pos = tl.load(Idx + lay, mask=ok, other=0).to(tl.int64)
    else:
        pos = lay.to(tl.int64)
    return pos, ok


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, Mask, QIdx, KIdx, Count, Blocks, Partial, PMasks, Tiles,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    smb, smh, smm, smn, sch, scm, sbh, sbm,
    H, G, Lq, Lk, lq2, lk2, D, DV, qk_scale, drop_key, drop_threshold, drop_scale,
    HAS_QIDX: tl.constexpr, HAS_KIDX: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    q_pos, row_ok = _positions(QIdx, qb * BLOCK_M, lq2, BLOCK_M, HAS_QIDX)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + q_pos[:, None] * sqm + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    count = tl.load(Count + h * sch + qb * scm)
    sched = h * sbh + qb * sbm
    for n in range(0, count):
        kb = tl.load(Blocks + sched + n)
        pid = tl.load(Partial + sched + n)
        if COUNT_TILES:
            tl.atomic_add(Tiles + 0, 1)
        k_pos, col_ok = _positions(KIdx, kb * BLOCK_N, lk2, BLOCK_N, HAS_KIDX)
        kT = tl.load(K + b * skb + hk * skh + k_pos[None, :] * skn + d[:, None],
                     mask=col_ok[None, :] & (d[:, None] < D), other=0.0)
        s = _tile_scores(q, kT, pid, PMasks, Mask, b, h, q_pos, k_pos, row_ok, col_ok,
                         smb, smh, smm, smn, qk_scale, MASK_KIND, BLOCK_M, BLOCK_N, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with nothing allowed yet keep m = -inf: subtract 0 instead
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep(drop_key, drop_threshold, b, h, q_pos, k_pos, H, Lq, Lk)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = tl.load(V + b * svb + hk * svh + k_pos[:, None] * svn + dv[None, :],
                    mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(Out + b * sob + h * soh + q_pos[:, None] * som + dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(Lse + b * slb + h * slh + q_pos, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, Mask, QIdx, KIdx, Count, Blocks, Partial, PMasks, Tiles,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    smb, smh, smm, smn, sch, scm, sbh, sbm,
    H, G, Lq, Lk, lq2, lk2, D, DV, qk_scale, scale, drop_key, drop_threshold, drop_scale,
    HAS_QIDX: tl.constexpr, HAS_KIDX: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    """dQ += scale * dS @ K over this sub-pass. DO shares Out's strides; DQ
    (float32) shares Q's; Delta shares Lse's."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    q_pos, row_ok = _positions(QIdx, qb * BLOCK_M, lq2, BLOCK_M, HAS_QIDX)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + q_pos[:, None] * sqm + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sob + h * soh + q_pos[:, None] * som + dv[None, :],
                 mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    lse = tl.load(Lse + b * slb + h * slh + q_pos, mask=row_ok, other=float("-inf"))
    # rows that saw no key: +inf makes every probability exp2(s - inf) = 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + b * slb + h * slh + q_pos, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    count = tl.load(Count + h * sch + qb * scm)
    sched = h * sbh + qb * sbm
    for n in range(0, count):
        kb = tl.load(Blocks + sched + n)
        pid = tl.load(Partial + sched + n)
        if COUNT_TILES:
            tl.atomic_add(Tiles + 1, 1)
        k_pos, col_ok = _positions(KIdx, kb * BLOCK_N, lk2, BLOCK_N, HAS_KIDX)
        kT = tl.load(K + b * skb + hk * skh + k_pos[None, :] * skn + d[:, None],
                     mask=col_ok[None, :] & (d[:, None] < D), other=0.0)
        vT = tl.load(V + b * svb + hk * svh + k_pos[None, :] * svn + dv[:, None],
                     mask=col_ok[None, :] & (dv[:, None] < DV), other=0.0)
        s = _tile_scores(q, kT, pid, PMasks, Mask, b, h, q_pos, k_pos, row_ok, col_ok,
                         smb, smh, smm, smn, qk_scale, MASK_KIND, BLOCK_M, BLOCK_N, PRECISION)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(drop_key, drop_threshold, b, h, q_pos, k_pos, H, Lq, Lk)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    ptrs = DQ + b * sqb + h * sqh + q_pos[:, None] * sqm + d[None, :]
    ok = row_ok[:, None] & (d[None, :] < D)
    # sub-passes run one after another: accumulate across them
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + dq * scale, mask=ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV_, Mask, QIdx, KIdx, Count, Blocks, Partial, PMasks, Tiles,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    smb, smh, smm, smn, sch, scm, sbh, sbm,
    H, Hkv, G, Lq, Lk, lq2, lk2, D, DV, qk_scale, scale, drop_key, drop_threshold, drop_scale,
    HAS_QIDX: tl.constexpr, HAS_KIDX: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    """dK, dV of one key block of key head hk, summed over the G query heads of
    its group. Count/Blocks/Partial are the transposed schedule. DK and DV_
    (float32) share K's and V's strides."""
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    k_pos, col_ok = _positions(KIdx, kb * BLOCK_N, lk2, BLOCK_N, HAS_KIDX)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kT = tl.load(K + b * skb + hk * skh + k_pos[None, :] * skn + d[:, None],
                 mask=col_ok[None, :] & (d[:, None] < D), other=0.0)
    vT = tl.load(V + b * svb + hk * svh + k_pos[None, :] * svn + dv[:, None],
                 mask=col_ok[None, :] & (dv[:, None] < DV), other=0.0)
    dkT = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dvT = tl.zeros([BLOCK_DV, BLOCK_N], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        count = tl.load(Count + h * sch + kb * scm)
        sched = h * sbh + kb * sbm
        for n in range(0, count):
            qb = tl.load(Blocks + sched + n)
            pid = tl.load(Partial + sched + n)
            if COUNT_TILES:
                tl.atomic_add(Tiles + 2, 1)
            q_pos, row_ok = _positions(QIdx, qb * BLOCK_M, lq2, BLOCK_M, HAS_QIDX)
            q = tl.load(Q + b * sqb + h * sqh + q_pos[:, None] * sqm + d[None, :],
                        mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
            do = tl.load(DO + b * sob + h * soh + q_pos[:, None] * som + dv[None, :],
                         mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
            lse = tl.load(Lse + b * slb + h * slh + q_pos, mask=row_ok, other=float("-inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(Delta + b * slb + h * slh + q_pos, mask=row_ok, other=0.0)
            s = _tile_scores(q, kT, pid, PMasks, Mask, b, h, q_pos, k_pos, row_ok, col_ok,
                             smb, smh, smm, smn, qk_scale, MASK_KIND, BLOCK_M, BLOCK_N, PRECISION)
            p = tl.exp2(s - lse2[:, None])
            dp = tl.dot(do, vT, input_precision=PRECISION)
            if DROPOUT:
                keep = _keep(drop_key, drop_threshold, b, h, q_pos, k_pos, H, Lq, Lk)
                pd = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                pd = p
            dvT += tl.dot(tl.trans(do), pd.to(do.dtype), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dkT += tl.dot(tl.trans(q), ds.to(q.dtype), input_precision=PRECISION)
    ok_k = col_ok[None, :] & (d[:, None] < D)
    ptrs = DK + b * skb + hk * skh + k_pos[None, :] * skn + d[:, None]
    tl.store(ptrs, tl.load(ptrs, mask=ok_k, other=0.0) + dkT * scale, mask=ok_k)
    ok_v = col_ok[None, :] & (dv[:, None] < DV)
    ptrs = DV_ + b * svb + hk * svh + k_pos[None, :] * svn + dv[:, None]
    tl.store(ptrs, tl.load(ptrs, mask=ok_v, other=0.0) + dvT, mask=ok_v)


# -----------------------------------------------------------------------------
# Host side
# -----------------------------------------------------------------------------

# Tiles visited by the kernels (forward, dQ, dK/dV), counted in the kernels
# themselves when COUNT_TILES is set: lets tests prove no tile outside the
# plan is touched. Off by default (an atomic per tile).
COUNT_TILES = False
tiles_visited = torch.zeros(3, dtype=torch.int64)


class _Launch:
    """What the kernels of one call share: sizes, tiles, dropout, the mask."""

    def __init__(self, q, k, v, plan, mask, scale, dropout_p, seed):
        self.B, self.H, self.Lq, self.D = q.shape
        self.Hkv, self.Lk, self.DV = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.H // self.Hkv
        self.scale, self.qk_scale = scale, scale * LOG2E
        block_m, block_n, num_warps, num_stages = block_config(max(self.D, self.DV))
        assert (plan.block_q, plan.block_k) == (block_m, block_n), "plan compiled for other tiles"
        self.tiles = torch.zeros(3, dtype=torch.int32, device=q.device)
        # dropout: the hash key of tfk.dropout.keep, and its threshold
        self.dropout = (drop.seed_key(seed), drop.threshold(dropout_p), 1.0 / (1.0 - dropout_p))
        # a user mask is read through broadcast strides: a stride of 0 repeats
        if mask is None:
            self.mask, self.mask_strides, mask_kind = q, (0, 0, 0, 0), 0
        else:
            m = mask.expand(self.B, self.H, self.Lq, self.Lk)
            mask_kind = 1 if m.dtype == torch.bool else 2
            self.mask = m.view(torch.uint8) if mask_kind == 1 else m
            self.mask_strides = self.mask.stride()
        self.meta = dict(MASK_KIND=mask_kind, DROPOUT=dropout_p > 0, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_D=max(16, triton.next_power_of_2(self.D)),
                         BLOCK_DV=max(16, triton.next_power_of_2(self.DV)),
                         PRECISION=FP32_PRECISION if q.dtype == torch.float32 else "ieee",
                         COUNT_TILES=COUNT_TILES, num_warps=num_warps, num_stages=num_stages)

    def subpass(self, sp, transposed):
        """Plan arguments of one sub-pass: indices, schedule, tile masks,
        schedule strides (0 across heads for a shared schedule)."""
        count, blocks, partial = ((sp.q_count, sp.q_blocks, sp.q_partial) if transposed
                                  else (sp.kv_count, sp.kv_blocks, sp.kv_partial))
        # kernels never read an absent index or mask table: any tensor fills the slot
        fill = sp.kv_count
        per_head = count.shape[0] > 1
        args = (sp.q_index if sp.q_index is not None else fill,
                sp.kv_index if sp.kv_index is not None else fill,
                count, blocks, partial,
                sp.partial_masks.view(torch.uint8) if sp.num_partial else fill, self.tiles)
        strides = (count.stride(0) if per_head else 0, count.stride(1),
                   blocks.stride(0) if per_head else 0, blocks.stride(1))
        meta = dict(self.meta, HAS_QIDX=sp.q_index is not None, HAS_KIDX=sp.kv_index is not None)
        return args, strides, meta

    def finish(self):
        if COUNT_TILES:
            tiles_visited.add_(self.tiles.cpu().long())


def attention_forward(q, k, v, plan, mask, scale, dropout_p, seed):
    """out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32 over ``plan``.

    q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), contiguous;
    mask None, or bool/float broadcastable to (B, H, Lq, Lk).
    """
    a = _Launch(q, k, v, plan, mask, scale, dropout_p, seed)
    shape = (a.B, a.H, a.Lq)
    out = lse = None
    for sp in plan.subpasses:
        if sp.q_index is None:  # the kernel writes every row
            single = len(plan.subpasses) == 1
            o = new_output(shape + (a.DV,), q.dtype if single else torch.float32, q.device)
            l = new_output(shape, torch.float32, q.device)
        else:  # rows outside the sub-pass saw none of its keys
            o = torch.zeros(shape + (a.DV,), dtype=torch.float32, device=q.device)
            l = torch.full(shape, float("-inf"), dtype=torch.float32, device=q.device)
        args, strides, meta = a.subpass(sp, transposed=False)
        _attn_fwd[(sp.kv_count.shape[1], a.B * a.H)](
            q, k, v, o, l, a.mask, *args,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *l.stride()[:2],
            *a.mask_strides, *strides,
            a.H, a.G, a.Lq, a.Lk, sp.lq, sp.lk, a.D, a.DV, a.qk_scale, *a.dropout, **meta)
        out, lse = (o, l) if out is None else merge_partials(out, lse, o.float(), l)
    a.finish()
    if out is None:  # nothing allowed anywhere
        return (torch.zeros(shape + (a.DV,), dtype=q.dtype, device=q.device),
                torch.full(shape, float("-inf"), device=q.device))
    return out.to(q.dtype), lse


def attention_backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p, seed):
    """dq, dk, dv for ``attention_forward``'s result, given dout and lse's
    gradient dlse."""
    a = _Launch(q, k, v, plan, mask, scale, dropout_p, seed)
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1) - dlse.float()
    # float32 accumulators sharing the inputs' strides (inputs are contiguous)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *lse.stride()[:2],
               *a.mask_strides)
    for sp in plan.subpasses:
        args, sched, meta = a.subpass(sp, transposed=False)
        _attn_bwd_dq[(sp.kv_count.shape[1], a.B * a.H)](
            q, k, v, dout, lse, delta, dq, a.mask, *args, *strides, *sched,
            a.H, a.G, a.Lq, a.Lk, sp.lq, sp.lk, a.D, a.DV, a.qk_scale, scale, *a.dropout, **meta)
        args, sched, meta = a.subpass(sp, transposed=True)
        _attn_bwd_dkdv[(sp.q_count.shape[1], a.B * a.Hkv)](
            q, k, v, dout, lse, delta, dk, dv, a.mask, *args, *strides, *sched,
            a.H, a.Hkv, a.G, a.Lq, a.Lk, sp.lq, sp.lk, a.D, a.DV, a.qk_scale, scale, *a.dropout, **meta)
    a.finish()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
