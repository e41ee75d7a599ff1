"""Flash attention over a tfk plan's block schedule, in Triton.

Each sub-pass runs in its own token layout, gathered by the host so that the
kernels read contiguous tiles (original positions serve masks and dropout
only); the host scatters the results back and merges sub-passes by
log-sum-exp. Forward: one program per (query block, batch * head) walks the
key blocks its schedule lists, with an online softmax in the log2 domain.
Backward: a dK/dV
program per (key block, batch * key head) walks the transposed schedule over
every query head of its group (no atomics, no repeated K/V for GQA); a dQ
program per query block walks the forward schedule. Both recompute the tile
probabilities from the merged lse, and take delta = rowsum(dO * O) - dlse.

Masks: a tile listed as partial loads its bit mask from the plan; a user
attn_mask (bool or additive float) is read tile by tile through broadcast
strides, never expanded. Dropout regenerates its keep bits from
(seed, b, h, i, j) with the hash of tfk/dropout.py.

Score modifiers (tfk.scores.Fused, see engine.run_modified): a softcap
(SOFTCAP) and the distance bias (HAS_BIAS, one (H, Lq + Lk - 1) vector read
at the original positions) enter every kernel's scores before the masks.
The bias's gradient: the dK/dV kernel writes each tile's dS summed per
diagonal (natural order) or per element (reordered layouts) with its flat
distance index into per-tile slots; the host sums them in a fixed order.
Transformer-XL's relative term is not fused here (the backend refuses it).

File grammar: configs -> kernels -> host forward/backward.
"""
from __future__ import annotations

import functools
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from tfk import backends
from tfk import dropout as drop
from tfk.ops.attention.engine import backward_over_plan, delta_of, forward_over_plan, sum_by_index

LOG2E = 1.4426950408889634
# Reformer's self logit -1e5 in the log2 domain as float32 holds it. It
# stands for -1e5·log2 e exactly: a self-only row (lse near -1e5) measures
# from it (see _probs), so its probabilities and lse are exact.
SELF_LOGIT2 = tl.constexpr(-144269.5)

# -----------------------------------------------------------------------------
# Configs
# -----------------------------------------------------------------------------

MAX_HEAD_DIM = 256
# Score modifiers (tfk.scores) up to this head dim: at 256 the dK/dV kernel with them spills.
MODS_MAX_HEAD_DIM = 128
KERNELS = ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")


def dot_precision(dtype):
    """fp32 inputs use tf32 tensor-core dots (about 1e-3 relative error), as
    torch does under ``torch.backends.cuda.matmul.allow_tf32``: exact fp32
    dots do not fit in registers (the compile report shows them spilling).
    Triton's interpreter computes them exactly."""
    return "tf32" if dtype == torch.float32 else "ieee"


def tile_config(head_dim, dtype, predicates=0):
    """(BLOCK_M, BLOCK_N): the plan's tiles, shared by the forward and backward
    kernels of a call. ``head_dim`` is the larger of D and Dv. Plans whose
    sub-passes have position predicates (LSH) take 32-row tiles in 16 bits:
    with 64 rows their kernels spill (the compile report)."""
    if dtype == torch.float32:
        return (32, 32) if head_dim <= 128 else (16, 32)
    if predicates:
        return (32, 64) if head_dim <= 128 else (32, 32)
    return (64, 64) if head_dim <= 128 else (64, 32)


def launch_config(kernel, head_dim, dtype, heavy, block_n=None, mods=False):
    """Launch options of one kernel: num_warps, num_stages, and for the
    backward kernels SPLIT_N, the column slices a key tile is taken in.
    ``heavy``: a user mask or dropout is on (more live registers); ``block_n``
    the plan's key tile when it is not ``tile_config``'s (LSH plans take
    tiles that divide their chunk). ``mods``: score modifiers (a softcap or a
    distance bias) are on. Chosen with the compile report (python
    -m bench.compile_report) so that no shipped config spills on sm_80 or
    sm_90."""
    block_n = block_n or tile_config(head_dim, dtype)[1]
    if kernel == "_attn_fwd":
        if head_dim <= 64:
            return dict(num_warps=8, num_stages=1) if heavy and mods else dict(num_warps=4, num_stages=3)
        # every feature and the modifiers spill 4 bytes at two stages on sm_80;
        # fp32's 32-row tiles with both, 8 bytes with 8 warps on sm_90
        if heavy and mods:
            return dict(num_warps=4 if dtype == torch.float32 else 8, num_stages=1)
        return dict(num_warps=8, num_stages=2)
    if kernel == "_attn_bwd_dq":
        if head_dim <= 64 and heavy:
            return dict(num_warps=8, num_stages=1, SPLIT_N=min(2, block_n // 16))
        if head_dim <= 128 and heavy and mods:
            return dict(num_warps=8, num_stages=1, SPLIT_N=1)
        # fp32 beyond 128 runs 16-row tiles: four warps suffice
        return dict(num_warps=4 if tile_config(head_dim, dtype)[0] == 16 else 8, num_stages=2, SPLIT_N=1)
    # dK/dV: the accumulators grow with the head dim; slices of >= 16 keys
    # (with modifiers, whose diagonal sums gather a BLOCK_W x slice tile, 16-key slices)
    split = 2 if head_dim <= 64 and not mods else 4
    # (known: head dims > 128 with modifiers still spill 16-104 bytes; 16 warps spill more)
    return dict(num_warps=8, num_stages=1 if head_dim > 128 else 2, SPLIT_N=min(split, block_n // 16))


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
def _keep(drop_key, drop_threshold, b, h, q_pos, k_pos, H):
    """Dropout keep bits for tile (q_pos x k_pos), as tfk.dropout.keep: one
    hash per row, then one mix per element."""
    row = _mix32(q_pos.to(tl.uint32) ^ _mix32((b * H + h).to(tl.uint32) ^ drop_key.to(tl.uint32)))
    bits = _mix32(k_pos.to(tl.uint32)[None, :] ^ row[:, None])
    return bits >= drop_threshold.to(tl.uint32)


@triton.jit
def _tile_scores(q, kT, partial_id, PMasks, Mask, b, h, q_pos, k_pos, row_ok, col_ok,
                 smb, smh, smm, smn, qk_scale, c0, Bias, sbias, lq_full, cap_scale, cap2,
                 MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 COLS: tl.constexpr, PRECISION: tl.constexpr, PREDICATES: tl.constexpr,
                 SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Scores of a BLOCK_M x COLS tile (columns c0.. of a plan tile BLOCK_N
    wide) in the log2 domain, -inf where not allowed, and under SOFTCAP
    tanh(scale * raw / cap) (the backward's 1 - t^2; else the raw scores).
    PREDICATES (a sub-pass's position predicates): 0 none; 1 the query's own
    position gets the logit -1e5 (Reformer's self mask, over any other mask);
    2 that and keys past the query's original position masked (causal by
    position). Score modifiers (tfk.scores), before the masks: SOFTCAP
    s = cap tanh(scale raw / cap) (cap_scale = scale / cap, cap2 = cap log2 e);
    HAS_BIAS adds Bias[h, k_pos - q_pos + lq_full - 1] (base 2, original
    positions)."""
    raw = tl.dot(q, kT, input_precision=PRECISION)
    if SOFTCAP:
        # tanh by exp2, odd and stable: (1 - e) / (1 + e), e = exp(-2|x|)
        x = raw * cap_scale
        e = tl.exp2(tl.abs(x) * -2.8853900817779268)
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        s = t * cap2
    else:
        t = raw
        s = raw * qk_scale
    in_range = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        # int32 distances (positions < 2**31): fewer registers than int64 per element
        dist = k_pos.to(tl.int32)[None, :] - (q_pos.to(tl.int32) - (lq_full - 1))[:, None]
        s += tl.load(Bias + h * sbias + dist, mask=in_range, other=0.0)
    allowed = in_range
    if PREDICATES == 2:
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
    if PREDICATES == 0:
        # a partial tile's bit mask (partial_id: its row of the plan's partial
        # masks); full tiles (partial_id < 0) skip the load. Sub-passes with
        # predicates have no tile masks.
        tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + (c0 + tl.arange(0, COLS))[None, :]
        bits = tl.load(PMasks + partial_id.to(tl.int64) * (BLOCK_M * BLOCK_N) + tile,
                       mask=(partial_id >= 0) & allowed, other=1)
        allowed = allowed & (bits != 0)
    if MASK_KIND != 0:
        # the user mask is indexed by original positions
        m = tl.load(Mask + b * smb + h * smh + q_pos[:, None] * smm + k_pos[None, :] * smn,
                    mask=allowed, other=0)
        if MASK_KIND == 1:
            allowed = allowed & (m != 0)
        else:
            s = s + m.to(tl.float32) * 1.4426950408889634
    s = tl.where(allowed, s, float("-inf"))
    if PREDICATES != 0:
        s = tl.where(in_range & (k_pos[None, :] == q_pos[:, None]), SELF_LOGIT2, s)
    return s, t


@triton.jit
def _store_dbias(ds, DBias, DBiasIdx, slot, h, q_pos, k_pos, in_range, q0, k0, lq_full, nbias,
                 BLOCK_M: tl.constexpr, COLS: tl.constexpr, DBIAS: tl.constexpr, BLOCK_W: tl.constexpr):
    """The distance bias's gradient shares of a BLOCK_M x COLS tile of dS (in
    slot ``slot`` of the share buffers): values and their flat indices
    h * nbias + (j - i + lq_full - 1) into the (H, nbias) gradient, summed by
    the host in a fixed order (no float atomics). DBIAS 1 (natural order:
    positions q0 + a, k0 + c): one sum per diagonal, BLOCK_M + COLS - 1 of
    them (BLOCK_W slots); 2 (a reordered layout, whose diagonals need not
    keep one distance): every element."""
    ds = tl.where(in_range, ds, 0.0)
    if DBIAS == 1:
        # diagonal u holds a - c = u - (COLS - 1): E[u, c] = ds[u + c - (COLS - 1), c]
        u = tl.arange(0, BLOCK_W)
        a = u[:, None] + tl.arange(0, COLS)[None, :] - (COLS - 1)
        on = (a >= 0) & (a < BLOCK_M)
        diag = tl.sum(tl.where(on, tl.gather(ds, tl.where(on, a, 0), axis=0), 0.0), 1)
        dist = (k0 - q0) - u + (COLS - 1) + (lq_full - 1)
        ok = (u < BLOCK_M + COLS - 1) & (dist >= 0) & (dist < nbias)
        at = slot * BLOCK_W + u
        tl.store(DBias + at, tl.where(ok, diag, 0.0))
        tl.store(DBiasIdx + at, tl.where(ok, h * nbias + dist, 0).to(tl.int32))
    else:
        at = tl.arange(0, BLOCK_M)[:, None] * COLS + tl.arange(0, COLS)[None, :]
        dist = k_pos.to(tl.int32)[None, :] - (q_pos.to(tl.int32) - (h * nbias + lq_full - 1).to(tl.int32))[:, None]
        tl.store(DBias + slot * (BLOCK_M * COLS) + at, ds)
        tl.store(DBiasIdx + slot * (BLOCK_M * COLS) + at, tl.where(in_range, dist, 0))


@triton.jit
def _self_constant(ds, q_pos, k_pos, PREDICATES: tl.constexpr):
    """dS with the self-logit entries zeroed: a constant logit has no gradient."""
    if PREDICATES != 0:
        ds = tl.where(k_pos[None, :] == q_pos[:, None], 0.0, ds)
    return ds


@triton.jit
def _positions(Idx, pair, stride, start, n, BLOCK: tl.constexpr, HAS_IDX: tl.constexpr):
    """Layout positions start..start+BLOCK (where the tensors are read), their
    validity, and their original positions (for masks and dropout). HAS_IDX:
    0 the identity; 1 one index table; 2 a table per (batch, head) pair,
    ``pair`` (b·heads + h) times ``stride`` elements into Idx."""
    lay = start + tl.arange(0, BLOCK)
    ok = lay < n
    if HAS_IDX == 2:
        Idx += pair * stride
    if HAS_IDX != 0:
        pos = tl.load(Idx + lay, mask=ok, other=0).to(tl.int64)
    else:
        pos = lay.to(tl.int64)
    return lay, ok, pos


@triton.jit
def _load_rows(Ptr, b, h, sb, sh, sr, pos, ok, d, D):
    """Rows ``pos`` (valid where ``ok``) of a (B, heads, L, D) tensor, columns
    ``d`` < D: a (rows, d) tile, zeros outside."""
    return tl.load(Ptr + b * sb + h * sh + pos[:, None] * sr + d[None, :],
                   mask=ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _load_rows_t(Ptr, b, h, sb, sh, sr, pos, ok, d, D):
    """The transpose of _load_rows: a (d, rows) tile."""
    return tl.load(Ptr + b * sb + h * sh + pos[None, :] * sr + d[:, None],
                   mask=ok[None, :] & (d[:, None] < D), other=0.0)


@triton.jit
def _row_stats(Lse, Delta, b, h, slb, slh, rows, row_ok, PREDICATES: tl.constexpr):
    """The merged lse (log2 domain), delta and score origin of rows, for the
    backward (probabilities exp2((s - origin) - lse2), _probs). Rows that saw
    no key get lse +inf, so every probability is 0. Under PREDICATES, a row
    that saw only its self logit has lse near -1e5, where float32 steps by
    0.008: its lse2 and scores count from -1e5 (origin SELF_LOGIT2), in small
    numbers (else a 1% error in its probabilities); others' origin is 0."""
    lse = tl.load(Lse + b * slb + h * slh + rows, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    origin = 0.0
    if PREDICATES != 0:
        self_only = (lse < -5e4) & (lse != float("-inf"))
        lse2 = tl.where(self_only, (lse + 1e5) * 1.4426950408889634, lse2)
        origin = tl.where(self_only, SELF_LOGIT2, 0.0)
    delta = tl.load(Delta + b * slb + h * slh + rows, mask=row_ok, other=0.0)
    return lse2, delta, origin


@triton.jit
def _probs(s, lse2, origin, PREDICATES: tl.constexpr):
    """exp2((s - origin) - lse2) of scores s (log2 domain), _row_stats' rows."""
    if PREDICATES != 0:
        s = s - origin[:, None]
    return tl.exp2(s - lse2[:, None])


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, Mask, QIdx, KIdx, Count, Blocks, Partial, PMasks, Tiles,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    smb, smh, smm, smn, sch, scm, sbh, sbm, sqi, ski,
    H, G, lq2, lk2, D, DV, qk_scale, drop_key, drop_threshold, drop_scale, rounds, rnd,
    drop_h0, drop_heads, drop_q0, drop_k0, Bias, sbias, lq_full, cap_scale, cap2,
    HAS_QIDX: tl.constexpr, HAS_KIDX: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr, PREDICATES: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Out, Lse of one query block of a sub-pass. Q, Out, Lse are in the
    sub-pass's query layout, K, V in its key layout (gathered by the host)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    rows, row_ok, q_pos = _positions(QIdx, bh, sqi, qb * BLOCK_M, lq2, BLOCK_M, HAS_QIDX)
    rows = rows.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, b, h, sqb, sqh, sqm, rows, row_ok, d, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    count = tl.load(Count + h * sch + qb * scm)
    sched = h * sbh + qb * sbm
    for n in range(0, count):
        kb = tl.load(Blocks + sched + n)
        partial_id = tl.load(Partial + sched + n)
        if COUNT_TILES:
            tl.atomic_add(Tiles + 0, 1)
        cols, col_ok, k_pos = _positions(KIdx, b * (H // G) + hk, ski, kb * BLOCK_N, lk2, BLOCK_N, HAS_KIDX)
        cols = cols.to(tl.int64)
        kT = _load_rows_t(K, b, hk, skb, skh, skn, cols, col_ok, d, D)
        s, _ = _tile_scores(q, kT, partial_id, PMasks, Mask, b, h, q_pos, k_pos, row_ok, col_ok,
                            smb, smh, smm, smn, qk_scale, 0, Bias, sbias, lq_full, cap_scale, cap2,
                            MASK_KIND, BLOCK_M, BLOCK_N, BLOCK_N, PRECISION, PREDICATES, SOFTCAP, HAS_BIAS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with nothing allowed yet keep m = -inf: subtract 0 instead
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep(drop_key, drop_threshold, b, (h + drop_h0) * rounds + rnd, q_pos + drop_q0,
                         k_pos + drop_k0, drop_heads * rounds)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = _load_rows(V, b, hk, svb, svh, svn, cols, col_ok, dv, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    if PREDICATES != 0:
        # a row that saw only its self logit: from -1e5 in small numbers (_probs)
        lse_self = ((m_i - SELF_LOGIT2) + tl.log2(l_safe)) * 0.6931471805599453 - 1e5
        lse = tl.where(m_i < -5e4 * 1.4426950408889634, lse_self, lse)
    lse = tl.where(empty, float("-inf"), lse)
    tl.store(Out + b * sob + h * soh + rows[:, None] * som + dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(Lse + b * slb + h * slh + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, Mask, QIdx, KIdx, Count, Blocks, Partial, PMasks, Tiles,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    smb, smh, smm, smn, sch, scm, sbh, sbm, sqi, ski,
    H, G, lq2, lk2, D, DV, qk_scale, scale, drop_key, drop_threshold, drop_scale, rounds, rnd,
    drop_h0, drop_heads, drop_q0, drop_k0, Bias, sbias, lq_full, cap_scale, cap2,
    HAS_QIDX: tl.constexpr, HAS_KIDX: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr, SPLIT_N: tl.constexpr, PREDICATES: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """dQ = scale * dS @ K for one query block of a sub-pass, in its layout;
    each key tile is taken in SPLIT_N column slices (fewer live registers).
    DO shares Out's strides, DQ (float32) Q's, Delta Lse's."""
    SUB_N: tl.constexpr = BLOCK_N // SPLIT_N
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    rows, row_ok, q_pos = _positions(QIdx, bh, sqi, qb * BLOCK_M, lq2, BLOCK_M, HAS_QIDX)
    rows = rows.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, b, h, sqb, sqh, sqm, rows, row_ok, d, D)
    do = _load_rows(DO, b, h, sob, soh, som, rows, row_ok, dv, DV)
    lse2, delta, origin = _row_stats(Lse, Delta, b, h, slb, slh, rows, row_ok, PREDICATES)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    count = tl.load(Count + h * sch + qb * scm)
    sched = h * sbh + qb * sbm
    for n in range(0, count):
        kb = tl.load(Blocks + sched + n)
        partial_id = tl.load(Partial + sched + n)
        if COUNT_TILES:
            tl.atomic_add(Tiles + 1, 1)
        for c0 in tl.static_range(0, BLOCK_N, SUB_N):
            cols, col_ok, k_pos = _positions(KIdx, b * (H // G) + hk, ski, kb * BLOCK_N + c0, lk2,
                                             SUB_N, HAS_KIDX)
            cols = cols.to(tl.int64)
            kT = _load_rows_t(K, b, hk, skb, skh, skn, cols, col_ok, d, D)
            vT = _load_rows_t(V, b, hk, svb, svh, svn, cols, col_ok, dv, DV)
            s, t = _tile_scores(q, kT, partial_id, PMasks, Mask, b, h, q_pos, k_pos, row_ok, col_ok,
                                smb, smh, smm, smn, qk_scale, c0, Bias, sbias, lq_full, cap_scale, cap2,
                                MASK_KIND, BLOCK_M, BLOCK_N, SUB_N, PRECISION, PREDICATES, SOFTCAP, HAS_BIAS)
            p = _probs(s, lse2, origin, PREDICATES)
            dp = tl.dot(do, vT, input_precision=PRECISION)
            if DROPOUT:
                keep = _keep(drop_key, drop_threshold, b, (h + drop_h0) * rounds + rnd, q_pos + drop_q0,
                         k_pos + drop_k0, drop_heads * rounds)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = _self_constant(p * (dp - delta[:, None]), q_pos, k_pos, PREDICATES)
            if SOFTCAP:   # d s / d raw = scale (1 - t^2); scale applied at the end
                ds = ds * (1.0 - t * t)
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    tl.store(DQ + b * sqb + h * sqh + rows[:, None] * sqm + d[None, :], dq * scale,
             mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV_, Mask, QIdx, KIdx, Count, Blocks, Partial, PMasks, Tiles,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
    smb, smh, smm, smn, sch, scm, sbh, sbm, sqi, ski,
    H, Hkv, G, lq2, lk2, D, DV, qk_scale, scale, drop_key, drop_threshold, drop_scale, rounds, rnd,
    drop_h0, drop_heads, drop_q0, drop_k0, Bias, sbias, lq_full, cap_scale, cap2, DBias, DBiasIdx, dslots,
    nbias,
    HAS_QIDX: tl.constexpr, HAS_KIDX: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr, SPLIT_N: tl.constexpr, PREDICATES: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, DBIAS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """dK, dV of one key block of key head hk, summed over the G query heads of
    its group, walking the transposed schedule (Count/Blocks/Partial). Each
    plan tile's keys are split over SPLIT_N programs, which keeps the dK/dV
    accumulators in registers. DK and DV_ (float32) share K's and V's strides.
    DBIAS: the distance bias's gradient shares of each tile slice
    (_store_dbias), slot ((b·H + h)·programs + program) · dslots + n."""
    SUB_N: tl.constexpr = BLOCK_N // SPLIT_N
    kb = tl.program_id(0) // SPLIT_N
    c0 = (tl.program_id(0) % SPLIT_N) * SUB_N
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    cols, col_ok, k_pos = _positions(KIdx, bhk, ski, kb * BLOCK_N + c0, lk2, SUB_N, HAS_KIDX)
    cols = cols.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kT = _load_rows_t(K, b, hk, skb, skh, skn, cols, col_ok, d, D)
    vT = _load_rows_t(V, b, hk, svb, svh, svn, cols, col_ok, dv, DV)
    dkT = tl.zeros([BLOCK_D, SUB_N], tl.float32)
    dvT = tl.zeros([BLOCK_DV, SUB_N], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        count = tl.load(Count + h * sch + kb * scm)
        sched = h * sbh + kb * sbm
        for n in range(0, count):
            qb = tl.load(Blocks + sched + n)
            partial_id = tl.load(Partial + sched + n)
            if COUNT_TILES:
                if c0 == 0:
                    tl.atomic_add(Tiles + 2, 1)
            rows, row_ok, q_pos = _positions(QIdx, b * H + h, sqi, qb * BLOCK_M, lq2, BLOCK_M, HAS_QIDX)
            rows = rows.to(tl.int64)
            q = _load_rows(Q, b, h, sqb, sqh, sqm, rows, row_ok, d, D)
            do = _load_rows(DO, b, h, sob, soh, som, rows, row_ok, dv, DV)
            lse2, delta, origin = _row_stats(Lse, Delta, b, h, slb, slh, rows, row_ok, PREDICATES)
            s, t = _tile_scores(q, kT, partial_id, PMasks, Mask, b, h, q_pos, k_pos, row_ok, col_ok,
                                smb, smh, smm, smn, qk_scale, c0, Bias, sbias, lq_full, cap_scale, cap2,
                                MASK_KIND, BLOCK_M, BLOCK_N, SUB_N, PRECISION, PREDICATES, SOFTCAP, HAS_BIAS)
            p = _probs(s, lse2, origin, PREDICATES)
            dp = tl.dot(do, vT, input_precision=PRECISION)
            if DROPOUT:
                keep = _keep(drop_key, drop_threshold, b, (h + drop_h0) * rounds + rnd, q_pos + drop_q0,
                         k_pos + drop_k0, drop_heads * rounds)
                pd = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                pd = p
            dvT += tl.dot(tl.trans(do), pd.to(do.dtype), input_precision=PRECISION)
            ds = _self_constant(p * (dp - delta[:, None]), q_pos, k_pos, PREDICATES)
            if DBIAS != 0:
                _store_dbias(ds, DBias, DBiasIdx, ((b * H + h) * tl.num_programs(0) + tl.program_id(0)) * dslots + n,
                             h, q_pos, k_pos, row_ok[:, None] & col_ok[None, :], qb * BLOCK_M, kb * BLOCK_N + c0,
                             lq_full, nbias, BLOCK_M, SUB_N, DBIAS, BLOCK_W)
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dkT += tl.dot(tl.trans(q), ds.to(q.dtype), input_precision=PRECISION)
    tl.store(DK + b * skb + hk * skh + cols[None, :] * skn + d[:, None], dkT * scale,
             mask=col_ok[None, :] & (d[:, None] < D))
    tl.store(DV_ + b * svb + hk * svh + cols[None, :] * svn + dv[:, None], dvT,
             mask=col_ok[None, :] & (dv[:, None] < DV))


# -----------------------------------------------------------------------------
# Host side
# -----------------------------------------------------------------------------

_NO_DROPOUT = drop.kernel_args(0, 0.0)  # threshold 0: the kernels skip dropout


def dbias_mode(has_bias, has_q, has_k):
    """_attn_bwd_dkdv's DBIAS: 0 no distance bias; 1 per-diagonal sums (natural
    order); 2 per element (a reordered layout)."""
    return 0 if not has_bias else (1 if has_q == 0 and has_k == 0 else 2)


def mods_meta(name, has_bias, softcap, has_q, has_k, block_m, block_n, split_n):
    """The score modifiers' constexprs of one kernel (see _tile_scores and
    _store_dbias)."""
    extra = dict(SOFTCAP=softcap, HAS_BIAS=has_bias)
    if name == "_attn_bwd_dkdv":
        cols = block_n // split_n
        extra.update(DBIAS=dbias_mode(has_bias, has_q, has_k), BLOCK_W=triton.next_power_of_2(block_m + cols - 1))
    return extra


@functools.lru_cache(maxsize=256)
def _kernel_meta(D, DV, dtype, mask_kind, dropout, count_tiles, block_m, block_n, softcap=False, has_bias=False):
    """Per kernel name, HAS_QIDX, HAS_KIDX (_index_kind) and PREDICATES, the constexprs
    and launch options of a call with these head dims, dtype, options,
    score modifiers and tiles: a function of them alone (no tensor data), so
    cached; read-only."""
    head_dim = max(D, DV)
    common = dict(MASK_KIND=mask_kind, DROPOUT=dropout, BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
                  PRECISION=dot_precision(dtype), COUNT_TILES=count_tiles)
    meta = {}
    for predicates in (0, 1, 2):
        heavy = mask_kind != 0 or dropout or predicates != 0
        for name in KERNELS:
            options = launch_config(name, head_dim, dtype, heavy, block_n, has_bias or softcap)
            for has_q in (0, 1, 2):
                for has_k in (0, 1, 2):
                    extra = mods_meta(name, has_bias, softcap, has_q, has_k, block_m, block_n,
                                      options.get("SPLIT_N", 1))
                    meta[name, has_q, has_k, predicates] = MappingProxyType(
                        dict(common, HAS_QIDX=has_q, HAS_KIDX=has_k, PREDICATES=predicates, **extra, **options))
    return meta


class _Launch:
    """What the kernels of one call share: sizes, tiles, dropout, the mask."""

    def __init__(self, q, k, v, plan, mask, scale, dropout_p, seed, window=drop.WHOLE, mods=None):
        self.B, self.H, self.Lq, self.D = q.shape
        self.Hkv, self.Lk, self.DV = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.H // self.Hkv
        self.scale, self.qk_scale = scale, scale * LOG2E
        # dropout: the hash key of tfk.dropout.keep, its threshold, and where
        # this call's scores sit in the grid whose mask it draws (tfk.dropout.Window)
        self.dropout = _NO_DROPOUT if dropout_p == 0 else drop.kernel_args(seed, dropout_p)
        self.window = (window.head_offset, window.heads or self.H, window.q_offset, window.k_offset)
        # a user mask is read through broadcast strides: a stride of 0 repeats
        if mask is None:
            self.mask, self.mask_strides, mask_kind = q, (0, 0, 0, 0), 0
        else:
            m = mask.expand(self.B, self.H, self.Lq, self.Lk)
            mask_kind = 1 if m.dtype == torch.bool else 2
            self.mask = m.view(torch.uint8) if mask_kind == 1 else m
            self.mask_strides = self.mask.stride()
        # tiles the kernels visit (forward, dQ, dK/dV), counted by the kernels
        # themselves while a tfk.backends.count_tiles() block is open
        self.count_tiles = backends.counting_tiles()
        self.tiles = torch.zeros(3, dtype=torch.int32, device=q.device) if self.count_tiles else None
        # score modifiers (tfk.scores.Fused): the softcap's factors, the
        # distance bias in base 2 (H, Lq + Lk - 1) float32
        cap = 0.0 if mods is None else float(mods.softcap)
        self.softcap = cap != 0.0
        self.cap_args = (scale / cap, cap * LOG2E) if self.softcap else (1.0, 1.0)
        self.bias = None if mods is None or mods.bias is None else (mods.bias.float() * LOG2E).contiguous()
        self.nbias = self.Lq + self.Lk - 1
        self.mod_args = (q if self.bias is None else self.bias, self.nbias, self.Lq, *self.cap_args)
        self.meta = _kernel_meta(self.D, self.DV, q.dtype, mask_kind, dropout_p > 0, self.count_tiles,
                                 plan.block_q, plan.block_k, self.softcap, self.bias is not None)

    def subpass(self, sp, kernel):
        """Plan arguments of one sub-pass: indices, schedule, tile masks,
        schedule strides (0 across heads for a shared schedule), index strides
        per (batch, head) (0 for a shared index), the dropout's rounds, and
        the kernel's constexprs and launch options."""
        # dK/dV kernels walk the transposed schedule
        count, blocks, partial = ((sp.q_count, sp.q_blocks, sp.q_partial) if kernel == "_attn_bwd_dkdv"
                                  else (sp.kv_count, sp.kv_blocks, sp.kv_partial))
        # kernels never read an absent index or mask table, nor the tile
        # counters while not counting: any tensor fills the slot
        fill = sp.kv_count
        per_head = count.shape[0] > 1
        args = (sp.q_index if sp.q_index is not None else fill,
                sp.kv_index if sp.kv_index is not None else fill,
                count, blocks, partial,
                sp.partial_masks.view(torch.uint8) if sp.num_partial else fill,
                self.tiles if self.count_tiles else fill)
        strides = (count.stride(0) if per_head else 0, count.stride(1),
                   blocks.stride(0) if per_head else 0, blocks.stride(1),
                   _index_stride(sp.q_index), _index_stride(sp.kv_index))
        meta = self.meta[kernel, _index_kind(sp.q_index), _index_kind(sp.kv_index), sp.predicates]
        return args, strides, (sp.rounds, sp.round), meta

    def finish(self):
        if self.count_tiles:
            backends.add_kernel_tiles(self.tiles)


def _index_kind(index):
    """HAS_QIDX / HAS_KIDX of an index table (see _positions)."""
    return 0 if index is None else (1 if index.dim() == 1 else 2)


def _index_stride(index):
    """Elements between the index rows of consecutive (batch, head) pairs: 0
    for a shared (1-D) index or none; a per-(batch, head) index (B, heads, n)
    must be laid out so one stride steps over both."""
    if index is None or index.dim() == 1:
        return 0
    assert index.stride(-1) == 1 and index.stride(0) == index.shape[1] * index.stride(1), "index layout"
    return index.stride(1)


def attention_forward(q, k, v, plan, mask, scale, dropout_p, seed, window=drop.WHOLE, mods=None):
    """out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32 over ``plan``.

    q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), contiguous;
    mask None, or bool/float broadcastable to (B, H, Lq, Lk). Each sub-pass
    gathers its layout (NATTEN's way: the kernels then read contiguous tiles),
    and sub-passes merge by log-sum-exp.
    """
    a = _Launch(q, k, v, plan, mask, scale, dropout_p, seed, window, mods)

    def run(sp, q_l, k_l, v_l, o, l):
        args, strides, rounds, meta = a.subpass(sp, "_attn_fwd")
        _attn_fwd[(sp.kv_count.shape[1], a.B * a.H)](
            q_l, k_l, v_l, o, l, a.mask, *args,
            *q_l.stride()[:3], *k_l.stride()[:3], *v_l.stride()[:3], *o.stride()[:3], *l.stride()[:2],
            *a.mask_strides, *strides,
            a.H, a.G, sp.lq, sp.lk, a.D, a.DV, a.qk_scale, *a.dropout, *rounds, *a.window, *a.mod_args, **meta)

    result = forward_over_plan(plan, q, k, v, a.DV, run)
    a.finish()
    return result


def attention_backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p, seed, window=drop.WHOLE,
                       mods=None):
    """dq, dk, dv for ``attention_forward``'s result, given dout and lse's
    gradient dlse. Every sub-pass recomputes its tiles with the merged lse.
    With score modifiers (``mods``, tfk.scores.Fused; not Transformer-XL)
    also their gradients (d qv, d r, d bias), None where absent: d bias
    (H, Lq + Lk - 1) float32 sums the dK/dV kernel's per-tile shares on the host
    in a fixed order (tfk.ops.attention.engine.sum_by_index)."""
    if mods is not None and mods.qv is not None:
        raise NotImplementedError("triton: Transformer-XL's relative term is not fused in these kernels")
    a = _Launch(q, k, v, plan, mask, scale, dropout_p, seed, window, mods)
    dout = dout.contiguous()
    shares = []   # (values, flat indices) of the distance bias's gradient, per sub-pass

    def run(sp, q_l, k_l, v_l, do_l, lse_l, delta_l, dq_l, dk_l, dv_l):
        strides = (*q_l.stride()[:3], *k_l.stride()[:3], *v_l.stride()[:3], *do_l.stride()[:3],
                   *lse_l.stride()[:2], *a.mask_strides)
        args, sched, rounds, meta = a.subpass(sp, "_attn_bwd_dq")
        _attn_bwd_dq[(sp.kv_count.shape[1], a.B * a.H)](
            q_l, k_l, v_l, do_l, lse_l, delta_l, dq_l, a.mask, *args, *strides, *sched,
            a.H, a.G, sp.lq, sp.lk, a.D, a.DV, a.qk_scale, scale, *a.dropout, *rounds, *a.window, *a.mod_args,
            **meta)
        args, sched, rounds, meta = a.subpass(sp, "_attn_bwd_dkdv")
        programs, slots = sp.q_count.shape[1] * meta["SPLIT_N"], sp.q_blocks.shape[-1]
        dbias = dbias_idx = q_l
        if meta["DBIAS"]:
            # one share per diagonal of each tile slice, or per element; unvisited slots add 0 at index 0
            cols = plan.block_k // meta["SPLIT_N"]
            per_slot = meta["BLOCK_W"] if meta["DBIAS"] == 1 else plan.block_q * cols
            n = a.B * a.H * programs * slots * per_slot
            dbias = torch.zeros(n, dtype=torch.float32, device=q.device)
            dbias_idx = torch.zeros(n, dtype=torch.int32, device=q.device)
            shares.append((dbias, dbias_idx))
        _attn_bwd_dkdv[(programs, a.B * a.Hkv)](
            q_l, k_l, v_l, do_l, lse_l, delta_l, dk_l, dv_l, a.mask, *args, *strides, *sched,
            a.H, a.Hkv, a.G, sp.lq, sp.lk, a.D, a.DV, a.qk_scale, scale, *a.dropout, *rounds, *a.window,
            *a.mod_args, dbias, dbias_idx, slots, a.nbias, **meta)

    dq, dk, dv = backward_over_plan(plan, q, k, v, dout, lse, delta_of(out, dout, dlse), run)
    a.finish()
    grads = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if mods is None:
        return grads
    dbias = None
    if a.bias is not None:
        if shares:
            values = torch.cat([v_ for v_, _ in shares])
            index = torch.cat([i_ for _, i_ in shares]).long()
            dbias = sum_by_index(values, index, a.H * a.nbias).view(a.H, a.nbias)
        else:   # nothing visited
            dbias = torch.zeros(a.H, a.nbias, dtype=torch.float32, device=q.device)
    return grads + ((None, None, dbias),)
