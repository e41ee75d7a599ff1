"""Linear attention in Triton: the chunked causal form and the non-causal
reductions of tfk/ops/linear/torch_backend.py (whose module doc states the
math), with the feature maps identity, elu1, relu and softmax fused in-kernel.

The normaliser column of V' = [v, 1] is carried as its own vector (z, den)
rather than as column Dv of a padded matrix, so a tile of value columns is a
power of two. phi_q below is phi(q) without the scale; the scale multiplies
O' (forward) and dO' (backward), as in the torch backend.

Four kernels, each program walking the chunks of one (batch, head) in order,
with its state in fp32 accumulators (never one state per chunk in memory),
and two small ones:

- ``_linear_fwd``: one program per (batch, query head, tile of Dv). The state
  tile S[:, tile] = [kv[:, tile], z] starts at the initial state; per chunk
  num = phi_q S + tril(phi_q phi_k^T) V, den = scale * (phi_q z + rowsum(tril)) + eps,
  out = scale * num / den (scale * num when not normalize), then
  S += phi_k^T V. A query head recomputes its KV head's state (G-fold, cheap
  next to the intra-chunk product); the first query head of a KV head writes
  the final state, the first Dv tile writes den and z. Non-causal: the state
  is summed over every key first, then out = phi_q S per query chunk.
- ``_linear_bwd_dq``: one program per (batch, query head, tile of D); carries
  S[tile, :] (all Dv) forward: dphi_q = dO' S_n^T + tril(dO' V'^T) phi_k.
- ``_linear_bwd_dk``: one program per (batch, KV head, tile of D); carries
  R[tile, :] = dS + sum_{m>n} sum_g phi_q_m^T dO'_m backward over chunks:
  dphi_k = tril(dO' V'^T)^T phi_q + V' R^T (the G query heads of the KV head
  looped inside); writes dS'_0 = R after the first chunk.
- ``_linear_bwd_dv``: one program per (batch, KV head, tile of Dv); carries
  R[:, tile]: dv = tril(phi_q phi_k^T)^T dO' + phi_k R.
- ``_linear_decode``: the forward when L and S are at most DECODE_LEN (decode
  steps): one program per (batch, KV head, tile of Dv), no chunk loop: reads
  the state tile once, adds phi_k^T [v, 1] of the one tile of keys, answers
  the KV head's G query heads (causal: state + tril(phi_q phi_k^T) [v, 1]),
  writes the new state. The backward of such calls is the general kernels'.
- ``_softmax_k_stats``: the "softmax" map's statistics (below).

dO' = scale * [dout / den, -(dout . out) / den] (normalize; scale * [dout, 0]
otherwise) is formed in the kernels from dout, den and delta = dout . out (B, H, L),
which the host computes with torch ops, from out recomputed in fp32 for half
inputs (the rounded out would reach dq and dk amplified by 1/den).

Padded channels and rows past L (or S) and masked keys get phi = 0 (elu1(0)
is 1, so the mask is applied after the map). Inputs fp16, bf16 (GPU only: the
interpreter's bf16 is wrong) or fp32, contiguous (B, heads, len, dim); head
dims up to MAX_HEAD_DIM, not necessarily powers of two. Offsets of a
(batch, head) base are int64. Dots take fp32 operands (tf32 on the GPU);
those reducing over a padded head dim wider than KBLOCK (phi_q S, phi_q phi_k^T,
dO' S^T, dO' V^T, ...) run as one batched dot over KBLOCK-wide blocks of that
dim, summed (_kdot), so a warp holds one block of each operand, not the whole
(16, 256) fp32 tile (~128 registers a thread, which spilled at D = 256).

The "softmax" map (FMAP 3; non-causal only): phi(k) is a softmax over the
unmasked S positions of each channel. _softmax_k_stats (one program per
(batch, KV head, tile of D)) makes an online max m and 1 / sum_s exp(k_s - m)
per channel, fp32 (B, Hkv, 2, D), forward and backward (_linear_decode makes
its own from its one tile of keys); the kernels map their key tiles with them on load (masked keys 0, and 0 everywhere for a batch row
with every key masked). phi(q) is a softmax over each row's D channels: from
the loaded tile where a program holds whole rows (forward, dv), else from a
whole-row max/sum (_row_stats) next to the tile (dq, dk). The Jacobians,
d x = phi (d phi - sum(d phi phi)) along the softmax axis:
- q (dq kernel): sum_d dphi_q phi_q = dO' . O' (O' = phi_q S'), which is
  delta eps / den normalised and delta = dout . out otherwise, so the host
  passes delta for this map unnormalised too, and the backward takes eps.
- k (dk kernel): c[d] = sum_s dphi_k[s, d] phi_k[s, d] = sum_e R[d, e] U[d, e],
  U = phi_k^T V' over the call's keys (non-causal: dphi_k = V' R^T): one more
  pass over the keys before the dk pass.

File grammar: configs -> kernels -> host side.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# -----------------------------------------------------------------------------
# Configs
# -----------------------------------------------------------------------------

KERNELS = ("_linear_fwd", "_linear_bwd_dq", "_linear_bwd_dk", "_linear_bwd_dv", "_softmax_k_stats",
           "_linear_decode")
FEATURE_MAPS = {"identity": 0, "elu1": 1, "relu": 2, "softmax": 3}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Positions per chunk: the intra-chunk product costs O(L * CHUNK * D); heads
# wider than 64 (padded) take CHUNK_WIDE so a chunk's tiles fit in registers
# (the softmax map's dk takes 16 at every width, in the kernel).
# From the compile report (python -m bench.compile_report --families linear,
# sm_80 and sm_90, default matrix: 756 configs, no spills): at head dims up to
# 64, 16-position chunks on 4 warps spilled 4-28 bytes in 10 dk configs; 32 on
# 8 warps (4 at head dims up to 32) do not, though the causal fwd / dq / dk at
# D = 40 and 64 use 250-255 registers (D = 40, not a multiple of 16, loads
# unvectorised). At D = 256 the kernels use at most 242 registers with _kdot.
CHUNK = 32
CHUNK_WIDE = 16
# Columns of the state a program carries along its tiled dim (Dv forward and
# in dv, D in dq and dk), at most; TILE_WIDE when a head dim exceeds 128.
STATE_TILE = 16
TILE_WIDE = 16
NUM_WARPS = 4   # 8 when a head dim exceeds 32 (16 caps ptxas at 128 registers: more spills)
DOT_PRECISION = "tf32"
# The widest reduction block of a dot (_kdot): 64 leaves no D = 256 spill (32 takes
# a few registers fewer there, e.g. the fp32 causal forward on sm_90: 200, not 216).
KBLOCK = tl.constexpr(64)
# Launch option maxnreg (.maxnreg in the PTX): without it ptxas capped some
# configs at 80 or 128 registers (3 or 2 blocks an SM) and spilled 4-40 bytes
# there; 255 lets it take what it needs.
MAXNREG = 255


def _pow2(n):
    return max(16, triton.next_power_of_2(n))   # tl.dot's least size is 16


def config(D, Dv):
    """(BLOCK_C, BLOCK_D, BLOCK_DV, TILE, num_warps) for head dims D, Dv: full
    D and Dv padded to powers of two, the carried state tiled by TILE columns."""
    BD, BDV = _pow2(D), _pow2(Dv)
    widest = max(BD, BDV)
    warps = NUM_WARPS if widest <= 32 else 2 * NUM_WARPS
    return (CHUNK if widest <= 64 else CHUNK_WIDE), BD, BDV, (TILE_WIDE if widest > 128 else STATE_TILE), warps


# -----------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------

@triton.jit
def _kdot(a, b, PREC: tl.constexpr):
    """tl.dot(a, b) with the reduction dim K split into blocks of at most KBLOCK, as
    one batched dot summed over the blocks: a warp holds one block of the operands
    instead of the whole (M, K) / (K, N) (which spills at K = 256 in fp32)."""
    M: tl.constexpr = a.shape[0]
    K: tl.constexpr = a.shape[1]
    N: tl.constexpr = b.shape[1]
    if K <= KBLOCK:
        c = tl.dot(a, b, input_precision=PREC)
    else:
        NB: tl.constexpr = K // KBLOCK
        a3 = tl.permute(tl.reshape(a, (M, NB, KBLOCK)), (1, 0, 2))
        b3 = tl.reshape(b, (NB, KBLOCK, N))
        c = tl.sum(tl.dot(a3, b3, input_precision=PREC), 0)
    return c


@triton.jit
def _phi(x, FMAP: tl.constexpr):
    """The feature map on fp32 x: 0 identity, 1 elu1, 2 relu."""
    if FMAP == 1:
        x = tl.where(x > 0, x + 1.0, tl.exp(x))
    elif FMAP == 2:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _dphi(x, phi, FMAP: tl.constexpr):
    """d phi / d x, given phi = _phi(x)."""
    if FMAP == 1:
        d = tl.where(x > 0, 1.0, phi)
    elif FMAP == 2:
        d = tl.where(x > 0, 1.0, 0.0)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def _load_phi(base, rows, rmask, cols, cmask, ncols, FMAP: tl.constexpr, KEEP, HAS_KEEP: tl.constexpr):
    """(x, phi) fp32 of the tile base[rows, cols] (row stride ncols); phi = 0 on
    padding and on masked rows (KEEP[rows] == 0)."""
    m = rmask[:, None] & cmask[None, :]
    x = tl.load(base + rows[:, None] * ncols + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_KEEP:
        m = m & (tl.load(KEEP + rows, mask=rmask, other=0) != 0)[:, None]
    return x, tl.where(m, _phi(x, FMAP), 0.0)


@triton.jit
def _softmax_rows(x, cmask):
    """phi(q) = softmax of each row of the fp32 tile x over its columns where cmask."""
    x = tl.where(cmask[None, :], x, float("-inf"))
    e = tl.exp(x - tl.max(x, 1)[:, None])
    return e / tl.sum(e, 1)[:, None]


@triton.jit
def _row_stats(base, rows, rmask, ncols, BLOCK_D: tl.constexpr):
    """(max, 1 / sum exp(x - max)) fp32 over each whole row of base[rows, :ncols]: the
    statistics of phi(q) for a program that holds a tile of the row's columns."""
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < ncols
    x = tl.load(base + rows[:, None] * ncols + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("-inf"))
    mx = tl.max(x, 1)
    return mx, 1.0 / tl.sum(tl.exp(x - mx[:, None]), 1)


@triton.jit
def _load_phi_q(base, rows, rmask, cols, cmask, ncols, FMAP: tl.constexpr, BLOCK_D: tl.constexpr,
                WHOLE: tl.constexpr):
    """(x, phi) fp32 of the query tile base[rows, cols]; softmax (FMAP 3) over each row's
    D channels, from the tile itself when WHOLE (cols = all of them), else from _row_stats."""
    if FMAP == 3:
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(base + rows[:, None] * ncols + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if WHOLE:
            phi = _softmax_rows(x, cmask)
        else:
            mx, inv = _row_stats(base, rows, rmask, ncols, BLOCK_D)
            phi = tl.exp(tl.where(m, x - mx[:, None], float("-inf"))) * inv[:, None]
        phi = tl.where(m, phi, 0.0)
    else:
        x, phi = _load_phi(base, rows, rmask, cols, cmask, ncols, FMAP, base, False)
    return x, phi


@triton.jit
def _load_phi_k(base, rows, rmask, cols, cmask, ncols, FMAP: tl.constexpr, KEEP, HAS_KEEP: tl.constexpr,
                smax, sinv):
    """(x, phi) fp32 of the key tile base[rows, cols]; softmax (FMAP 3) over the S positions
    from the per-channel statistics smax, sinv (len(cols),) of _k_stats (0 where masked)."""
    if FMAP == 3:
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(base + rows[:, None] * ncols + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_KEEP:
            m = m & (tl.load(KEEP + rows, mask=rmask, other=0) != 0)[:, None]
        phi = tl.exp(tl.where(m, x - smax[None, :], float("-inf"))) * sinv[None, :]
    else:
        x, phi = _load_phi(base, rows, rmask, cols, cmask, ncols, FMAP, KEEP, HAS_KEEP)
    return x, phi


@triton.jit
def _k_stats(STATS, srow0, cols, cmask, D, FMAP: tl.constexpr):
    """(max, 1 / sum) of phi(k)'s softmax over S for channels cols of one (batch, KV head),
    as _softmax_k_stats wrote them (zeros, unread, for the other maps)."""
    if FMAP == 3:
        smax = tl.load(STATS + 2 * srow0 + cols, mask=cmask, other=0.0)
        sinv = tl.load(STATS + 2 * srow0 + D + cols, mask=cmask, other=0.0)
    else:
        smax = tl.zeros_like(cols).to(tl.float32)
        sinv = smax
    return smax, sinv


@triton.jit
def _softmax_k_stats(K, KEEP, STATS, HKV, S, D, HAS_KEEP: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_TD: tl.constexpr):
    """One program per (batch, KV head, tile of D): the online max m and 1 / sum_s exp(k_s - m)
    over the unmasked positions of each channel into STATS (B, HKV, 2, D) fp32 (0 and 0 when
    every key is masked: phi(k) = 0 there)."""
    pid = tl.program_id(0)
    pd = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    hk = pid % HKV
    krow0 = (b * HKV + hk) * S
    srow0 = (b * HKV + hk) * D
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = pd * BLOCK_TD + tl.arange(0, BLOCK_TD)
    dmask = offs_d < D
    keep = KEEP + b * S
    mx = tl.full((BLOCK_TD,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK_TD,), tl.float32)
    for s0 in range(0, S, BLOCK_C):
        rows = s0 + offs_c
        rmask = rows < S
        m = rmask[:, None] & dmask[None, :]
        x = tl.load(K + (krow0 + rows)[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_KEEP:
            m = m & (tl.load(keep + rows, mask=rmask, other=0) != 0)[:, None]
        x = tl.where(m, x, float("-inf"))
        new = tl.maximum(mx, tl.max(x, 0))
        ref = tl.where(new == float("-inf"), 0.0, new)     # no key yet: any finite reference
        acc = acc * tl.exp(mx - ref) + tl.sum(tl.exp(x - ref[None, :]), 0)
        mx = new
    tl.store(STATS + 2 * srow0 + offs_d, tl.where(mx == float("-inf"), 0.0, mx), mask=dmask)
    tl.store(STATS + 2 * srow0 + D + offs_d, tl.where(acc > 0, 1.0 / tl.where(acc > 0, acc, 1.0), 0.0),
             mask=dmask)


@triton.jit
def _load_dO(DOUT, DEN, DELTA, row0, rows, rmask, cols, cmask, Dv, scale,
             NORMALIZE: tl.constexpr):
    """dO' of a chunk: (value part (C, len(cols)), normaliser part (C,)), fp32."""
    dout = tl.load(DOUT + (row0 + rows)[:, None] * Dv + cols[None, :],
                   mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if NORMALIZE:
        r = scale / tl.load(DEN + row0 + rows, mask=rmask, other=1.0)
        dz = -tl.load(DELTA + row0 + rows, mask=rmask, other=0.0) * r
        return dout * r[:, None], dz
    return dout * scale, tl.zeros_like(rows).to(tl.float32)


@triton.jit
def _linear_fwd(Q, K, V, KEEP, KV0, Z0, OUT, DEN, KV, Z, STATS, H, HKV, L, S, D, Dv, scale, eps,
                FMAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KEEP: tl.constexpr,
                HAS_S0: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                PREC: tl.constexpr):
    pid = tl.program_id(0)
    pv = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = pid % H
    G = H // HKV
    hk = h // G
    qrow0 = (b * H + h) * L          # int64 row offsets of this head's sequences
    krow0 = (b * HKV + hk) * S
    srow0 = (b * HKV + hk) * D
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dmask = offs_d < D
    vmask = offs_v < Dv
    smask = dmask[:, None] & vmask[None, :]
    keep = KEEP + b * S
    smax, sinv = _k_stats(STATS, srow0, offs_d, dmask, D, FMAP)
    kv = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    z = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_S0:
        kv += tl.load(KV0 + (srow0 + offs_d)[:, None] * Dv + offs_v[None, :], mask=smask, other=0.0)
        z += tl.load(Z0 + srow0 + offs_d, mask=dmask, other=0.0)
    if not CAUSAL:
        for s0 in range(0, S, BLOCK_C):
            rows = s0 + offs_c
            rmask = rows < S
            xk, pk = _load_phi_k(K + krow0 * D, rows, rmask, offs_d, dmask, D, FMAP, keep, HAS_KEEP, smax, sinv)
            v = tl.load(V + (krow0 + rows)[:, None] * Dv + offs_v[None, :],
                        mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            kv += _kdot(tl.trans(pk), v, PREC)
            z += tl.sum(pk, 0)
    for l0 in range(0, L, BLOCK_C):
        rows = l0 + offs_c
        rmask = rows < L
        xq, pq = _load_phi_q(Q + qrow0 * D, rows, rmask, offs_d, dmask, D, FMAP, BLOCK_D, True)
        num = _kdot(pq, kv, PREC)
        den = tl.sum(pq * z[None, :], 1)
        if CAUSAL:   # L == S: the keys of this chunk are the same rows
            xk, pk = _load_phi_k(K + krow0 * D, rows, rmask, offs_d, dmask, D, FMAP, keep, HAS_KEEP, smax, sinv)
            v = tl.load(V + (krow0 + rows)[:, None] * Dv + offs_v[None, :],
                        mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            a = _kdot(pq, tl.trans(pk), PREC)
            a = tl.where(offs_c[:, None] >= offs_c[None, :], a, 0.0)
            num += _kdot(a, v, PREC)
            den += tl.sum(a, 1)
            kv += _kdot(tl.trans(pk), v, PREC)
            z += tl.sum(pk, 0)
        den = den * scale + eps
        if NORMALIZE:
            o = num * (scale / den)[:, None]
        else:
            o = num * scale
        tl.store(OUT + (qrow0 + rows)[:, None] * Dv + offs_v[None, :], o.to(OUT.dtype.element_ty),
                 mask=rmask[:, None] & vmask[None, :])
        tl.store(DEN + qrow0 + rows, den, mask=rmask & (pv == 0))
    first = (h % G) == 0    # one query head of the KV head writes its state
    tl.store(KV + (srow0 + offs_d)[:, None] * Dv + offs_v[None, :], kv, mask=smask & first)
    tl.store(Z + srow0 + offs_d, z, mask=dmask & first & (pv == 0))


@triton.jit
def _linear_bwd_dq(Q, K, V, KEEP, KV0, Z0, DOUT, DEN, DELTA, DQ, STATS, H, HKV, L, S, D, Dv, scale, eps,
                   FMAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KEEP: tl.constexpr,
                   HAS_S0: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TD: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    pd = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = pid % H
    hk = h // (H // HKV)
    qrow0 = (b * H + h) * L
    krow0 = (b * HKV + hk) * S
    srow0 = (b * HKV + hk) * D
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = pd * BLOCK_TD + tl.arange(0, BLOCK_TD)
    offs_v = tl.arange(0, BLOCK_DV)
    dmask = offs_d < D
    vmask = offs_v < Dv
    keep = KEEP + b * S
    smax, sinv = _k_stats(STATS, srow0, offs_d, dmask, D, FMAP)
    kv = tl.zeros((BLOCK_TD, BLOCK_DV), tl.float32)    # S[tile, :Dv]
    z = tl.zeros((BLOCK_TD,), tl.float32)              # S[tile, Dv]
    if HAS_S0:
        kv += tl.load(KV0 + (srow0 + offs_d)[:, None] * Dv + offs_v[None, :],
                      mask=dmask[:, None] & vmask[None, :], other=0.0)
        z += tl.load(Z0 + srow0 + offs_d, mask=dmask, other=0.0)
    if not CAUSAL:
        for s0 in range(0, S, BLOCK_C):
            rows = s0 + offs_c
            rmask = rows < S
            xk, pk = _load_phi_k(K + krow0 * D, rows, rmask, offs_d, dmask, D, FMAP, keep, HAS_KEEP, smax, sinv)
            v = tl.load(V + (krow0 + rows)[:, None] * Dv + offs_v[None, :],
                        mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            kv += _kdot(tl.trans(pk), v, PREC)
            z += tl.sum(pk, 0)
    for l0 in range(0, L, BLOCK_C):
        rows = l0 + offs_c
        rmask = rows < L
        dov, doz = _load_dO(DOUT, DEN, DELTA, qrow0, rows, rmask, offs_v, vmask, Dv, scale, NORMALIZE)
        dpq = _kdot(dov, tl.trans(kv), PREC) + doz[:, None] * z[None, :]
        if CAUSAL:
            xk, pk = _load_phi_k(K + krow0 * D, rows, rmask, offs_d, dmask, D, FMAP, keep, HAS_KEEP, smax, sinv)
            v = tl.load(V + (krow0 + rows)[:, None] * Dv + offs_v[None, :],
                        mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            bm = _kdot(dov, tl.trans(v), PREC) + doz[:, None]    # dO'_i . V'_j
            bm = tl.where(offs_c[:, None] >= offs_c[None, :], bm, 0.0)
            dpq += _kdot(bm, pk, PREC)
            kv += _kdot(tl.trans(pk), v, PREC)
            z += tl.sum(pk, 0)
        x, pq = _load_phi_q(Q + qrow0 * D, rows, rmask, offs_d, dmask, D, FMAP, BLOCK_D, False)
        if FMAP == 3:
            # softmax over D: dq = phi (dphi - sum_d dphi phi), and sum_d dphi phi = dO' . O'
            # (O' = phi_q S'), which is delta eps / den normalised, delta = dout . out otherwise
            c = tl.load(DELTA + qrow0 + rows, mask=rmask, other=0.0)
            if NORMALIZE:
                c = c * (eps / tl.load(DEN + qrow0 + rows, mask=rmask, other=1.0))
            dq = pq * (dpq - c[:, None])
        else:
            dq = dpq * _dphi(x, pq, FMAP)
        tl.store(DQ + (qrow0 + rows)[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _linear_bwd_dk(Q, K, V, KEEP, DOUT, DEN, DELTA, DKV, DZ, DK, DKV0, DZ0, STATS, H, HKV, L, S, D, Dv, scale,
                   FMAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KEEP: tl.constexpr,
                   HAS_DS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TD: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    pd = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    hk = pid % HKV
    G = H // HKV
    krow0 = (b * HKV + hk) * S
    srow0 = (b * HKV + hk) * D
    if FMAP == 3:   # non-causal only: 16-position chunks (32 spilled 40-48 B at fp32 D = 40 on sm_90)
        BC: tl.constexpr = 16
    else:
        BC: tl.constexpr = BLOCK_C
    offs_c = tl.arange(0, BC)
    offs_d = pd * BLOCK_TD + tl.arange(0, BLOCK_TD)
    offs_v = tl.arange(0, BLOCK_DV)
    dmask = offs_d < D
    vmask = offs_v < Dv
    smask = dmask[:, None] & vmask[None, :]
    keep = KEEP + b * S
    smax, sinv = _k_stats(STATS, srow0, offs_d, dmask, D, FMAP)
    rv = tl.zeros((BLOCK_TD, BLOCK_DV), tl.float32)    # R[tile, :Dv]
    rz = tl.zeros((BLOCK_TD,), tl.float32)             # R[tile, Dv]
    if HAS_DS:
        rv += tl.load(DKV + (srow0 + offs_d)[:, None] * Dv + offs_v[None, :], mask=smask, other=0.0)
        rz += tl.load(DZ + srow0 + offs_d, mask=dmask, other=0.0)
    if not CAUSAL:
        for g in range(0, G):
            qrow0 = (b * H + hk * G + g) * L
            for l0 in range(0, L, BC):
                rows = l0 + offs_c
                rmask = rows < L
                xq, pq = _load_phi_q(Q + qrow0 * D, rows, rmask, offs_d, dmask, D, FMAP, BLOCK_D, False)
                dov, doz = _load_dO(DOUT, DEN, DELTA, qrow0, rows, rmask, offs_v, vmask, Dv, scale, NORMALIZE)
                rv += _kdot(tl.trans(pq), dov, PREC)
                rz += tl.sum(pq * doz[:, None], 0)
    ck = tl.zeros((BLOCK_TD,), tl.float32)
    if FMAP == 3:
        # softmax over S: dk = phi (dphi - c), c[d] = sum_s dphi[s, d] phi[s, d] = sum_e R[d, e] U[d, e]
        # with U = phi_k^T V' (non-causal: dphi_k = V' R^T), one more pass over the keys
        uv = tl.zeros((BLOCK_TD, BLOCK_DV), tl.float32)
        uz = tl.zeros((BLOCK_TD,), tl.float32)
        for s0 in range(0, S, BC):
            rows = s0 + offs_c
            rmask = rows < S
            xk, pk = _load_phi_k(K + krow0 * D, rows, rmask, offs_d, dmask, D, FMAP, keep, HAS_KEEP, smax, sinv)
            v = tl.load(V + (krow0 + rows)[:, None] * Dv + offs_v[None, :],
                        mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            uv += _kdot(tl.trans(pk), v, PREC)
            uz += tl.sum(pk, 0)
        ck = tl.sum(rv * uv, 1) + rz * uz
    n_chunks = tl.cdiv(S, BC)
    for i in range(0, n_chunks):
        rows = (n_chunks - 1 - i) * BC + offs_c     # last chunk first
        rmask = rows < S
        x, pk = _load_phi_k(K + krow0 * D, rows, rmask, offs_d, dmask, D, FMAP, keep, HAS_KEEP, smax, sinv)
        v = tl.load(V + (krow0 + rows)[:, None] * Dv + offs_v[None, :],
                    mask=rmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
        dpk = _kdot(v, tl.trans(rv), PREC) + rz[None, :]     # V'_n R_n^T
        if CAUSAL:
            for g in range(0, G):
                qrow0 = (b * H + hk * G + g) * L
                xq, pq = _load_phi_q(Q + qrow0 * D, rows, rmask, offs_d, dmask, D, FMAP, BLOCK_D, False)
                dov, doz = _load_dO(DOUT, DEN, DELTA, qrow0, rows, rmask, offs_v, vmask, Dv, scale, NORMALIZE)
                bm = _kdot(dov, tl.trans(v), PREC) + doz[:, None]
                bm = tl.where(offs_c[:, None] >= offs_c[None, :], bm, 0.0)
                dpk += _kdot(tl.trans(bm), pq, PREC)
                rv += _kdot(tl.trans(pq), dov, PREC)
                rz += tl.sum(pq * doz[:, None], 0)
        if FMAP == 3:
            dk = pk * (dpk - ck[None, :])
        else:
            dk = dpk * _dphi(x, pk, FMAP)
        if HAS_KEEP:
            dk = tl.where((tl.load(keep + rows, mask=rmask, other=0) != 0)[:, None], dk, 0.0)
        tl.store(DK + (krow0 + rows)[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])
    tl.store(DKV0 + (srow0 + offs_d)[:, None] * Dv + offs_v[None, :], rv, mask=smask)
    tl.store(DZ0 + srow0 + offs_d, rz, mask=dmask)


@triton.jit
def _linear_bwd_dv(Q, K, V, KEEP, DOUT, DEN, DELTA, DKV, DV, STATS, H, HKV, L, S, D, Dv, scale,
                   FMAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KEEP: tl.constexpr,
                   HAS_DS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TV: tl.constexpr,
                   PREC: tl.constexpr):
    pid = tl.program_id(0)
    pv = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    hk = pid % HKV
    G = H // HKV
    krow0 = (b * HKV + hk) * S
    srow0 = (b * HKV + hk) * D
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pv * BLOCK_TV + tl.arange(0, BLOCK_TV)
    dmask = offs_d < D
    vmask = offs_v < Dv
    keep = KEEP + b * S
    smax, sinv = _k_stats(STATS, srow0, offs_d, dmask, D, FMAP)
    rv = tl.zeros((BLOCK_D, BLOCK_TV), tl.float32)     # R[:, tile]
    if HAS_DS:
        rv += tl.load(DKV + (srow0 + offs_d)[:, None] * Dv + offs_v[None, :],
                      mask=dmask[:, None] & vmask[None, :], other=0.0)
    if not CAUSAL:
        for g in range(0, G):
            qrow0 = (b * H + hk * G + g) * L
            for l0 in range(0, L, BLOCK_C):
                rows = l0 + offs_c
                rmask = rows < L
                xq, pq = _load_phi_q(Q + qrow0 * D, rows, rmask, offs_d, dmask, D, FMAP, BLOCK_D, True)
                dov, doz = _load_dO(DOUT, DEN, DELTA, qrow0, rows, rmask, offs_v, vmask, Dv, scale, NORMALIZE)
                rv += _kdot(tl.trans(pq), dov, PREC)
    n_chunks = tl.cdiv(S, BLOCK_C)
    for i in range(0, n_chunks):
        rows = (n_chunks - 1 - i) * BLOCK_C + offs_c
        rmask = rows < S
        xk, pk = _load_phi_k(K + krow0 * D, rows, rmask, offs_d, dmask, D, FMAP, keep, HAS_KEEP, smax, sinv)
        dv = _kdot(pk, rv, PREC)                            # phi_k R_n
        if CAUSAL:
            for g in range(0, G):
                qrow0 = (b * H + hk * G + g) * L
                xq, pq = _load_phi_q(Q + qrow0 * D, rows, rmask, offs_d, dmask, D, FMAP, BLOCK_D, True)
                dov, doz = _load_dO(DOUT, DEN, DELTA, qrow0, rows, rmask, offs_v, vmask, Dv, scale, NORMALIZE)
                a = _kdot(pq, tl.trans(pk), PREC)
                a = tl.where(offs_c[:, None] >= offs_c[None, :], a, 0.0)
                dv += _kdot(tl.trans(a), dov, PREC)
                rv += _kdot(tl.trans(pq), dov, PREC)
        tl.store(DV + (krow0 + rows)[:, None] * Dv + offs_v[None, :], dv.to(DV.dtype.element_ty),
                 mask=rmask[:, None] & vmask[None, :])


@triton.jit
def _linear_decode(Q, K, V, KEEP, KV0, Z0, OUT, DEN, KV, Z, H, HKV, L, S, D, Dv, scale, eps,
                   FMAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KEEP: tl.constexpr,
                   HAS_S0: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   PREC: tl.constexpr):
    """The forward of a short call (L, S <= BLOCK_L: decode steps), no chunk loop: one
    program per (batch, KV head, tile of Dv) reads the state tile once, adds the keys'
    phi_k^T [v, 1], and answers the G query heads of the KV head (causal: each query
    sees the initial state plus the keys up to its own position); the softmax map's
    statistics over S come from the one tile of keys."""
    pid = tl.program_id(0)
    pv = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    hk = pid % HKV
    G = H // HKV
    krow0 = (b * HKV + hk) * S
    srow0 = (b * HKV + hk) * D
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dmask = offs_d < D
    vmask = offs_v < Dv
    smask = dmask[:, None] & vmask[None, :]
    keep = KEEP + b * S
    kv0 = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    z0 = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_S0:
        kv0 += tl.load(KV0 + (srow0 + offs_d)[:, None] * Dv + offs_v[None, :], mask=smask, other=0.0)
        z0 += tl.load(Z0 + srow0 + offs_d, mask=dmask, other=0.0)
    kmask = offs_l < S
    if FMAP == 3:   # softmax over the S positions of each channel, masked keys left out
        m = kmask[:, None] & dmask[None, :]
        xk = tl.load(K + (krow0 + offs_l)[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_KEEP:
            m = m & (tl.load(keep + offs_l, mask=kmask, other=0) != 0)[:, None]
        xk = tl.where(m, xk, float("-inf"))
        mx = tl.max(xk, 0)
        e = tl.exp(xk - tl.where(mx == float("-inf"), 0.0, mx)[None, :])
        tot = tl.sum(e, 0)
        pk = e * tl.where(tot > 0, 1.0 / tl.where(tot > 0, tot, 1.0), 0.0)[None, :]
    else:
        xk, pk = _load_phi(K + krow0 * D, offs_l, kmask, offs_d, dmask, D, FMAP, keep, HAS_KEEP)
    v = tl.load(V + (krow0 + offs_l)[:, None] * Dv + offs_v[None, :],
                mask=kmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
    kv = kv0 + _kdot(tl.trans(pk), v, PREC)
    z = z0 + tl.sum(pk, 0)
    lmask = offs_l < L
    for g in range(0, G):
        qrow0 = (b * H + hk * G + g) * L
        xq, pq = _load_phi_q(Q + qrow0 * D, offs_l, lmask, offs_d, dmask, D, FMAP, BLOCK_D, True)
        if CAUSAL:   # L == S
            num = _kdot(pq, kv0, PREC)
            den = tl.sum(pq * z0[None, :], 1)
            a = _kdot(pq, tl.trans(pk), PREC)
            a = tl.where(offs_l[:, None] >= offs_l[None, :], a, 0.0)
            num += _kdot(a, v, PREC)
            den += tl.sum(a, 1)
        else:
            num = _kdot(pq, kv, PREC)
            den = tl.sum(pq * z[None, :], 1)
        den = den * scale + eps
        if NORMALIZE:
            o = num * (scale / den)[:, None]
        else:
            o = num * scale
        tl.store(OUT + (qrow0 + offs_l)[:, None] * Dv + offs_v[None, :], o.to(OUT.dtype.element_ty),
                 mask=lmask[:, None] & vmask[None, :])
        tl.store(DEN + qrow0 + offs_l, den, mask=lmask & (pv == 0))
    tl.store(KV + (srow0 + offs_d)[:, None] * Dv + offs_v[None, :], kv, mask=smask)
    tl.store(Z + srow0 + offs_d, z, mask=dmask & (pv == 0))


# -----------------------------------------------------------------------------
# Host side
# -----------------------------------------------------------------------------

# Calls with L and S at most this take _linear_decode (one tile of positions, no chunk loop).
DECODE_LEN = 16


def _check(q, k, v, feature_map, causal):
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)} in the Triton kernels, "
                         f"got {feature_map!r}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    (B, H, L, D), (Hkv, S, Dv) = q.shape, (k.shape[1], k.shape[2], v.shape[3])
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"head dims D = {D}, Dv = {Dv}: the Triton kernels take at most {MAX_HEAD_DIM}")
    if causal and L != S:
        raise ValueError(f"causal needs L == S, got L = {L}, S = {S}")
    if causal and feature_map == "softmax":
        raise ValueError("feature_map='softmax' needs causal=False (phi(k) is a softmax over all S positions)")


def _softmax_stats(k, keep, has_keep, feature_map):
    """(B, Hkv, 2, D) fp32: per channel, the max and 1 / sum exp over the unmasked keys of
    phi(k)'s softmax over S (a dummy when the map is not softmax)."""
    B, Hkv, S, D = k.shape
    if feature_map != "softmax":
        return k.new_empty(1, dtype=torch.float32)
    stats = torch.empty(B, Hkv, 2, D, dtype=torch.float32, device=k.device)
    C, BD, _, tile, warps = config(D, 16)
    td = min(tile, BD)
    _softmax_k_stats[(B * Hkv, triton.cdiv(D, td))](k, keep, stats, Hkv, S, D, HAS_KEEP=has_keep, BLOCK_C=C,
                                                     BLOCK_TD=td, num_warps=warps)
    return stats


def _keep(key_padding_mask, q):
    """The mask as uint8 (B, S) (a dummy pointer when None)."""
    if key_padding_mask is None:
        return q.new_empty(1, dtype=torch.uint8), False
    return key_padding_mask.contiguous().view(torch.uint8), True


def forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale, out, den, kv, z):
    """Writes out (B, H, L, Dv) (any float dtype), den (B, H, L), kv (B, Hkv, D, Dv),
    z (B, Hkv, D) (fp32) for q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv),
    key_padding_mask (B, S) bool or None, kv0/z0 fp32 or None; all contiguous."""
    _check(q, k, v, feature_map, causal)
    B, H, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    C, BD, BDV, tile, warps = config(D, Dv)
    tile = min(tile, BDV)
    keep, has_keep = _keep(key_padding_mask, q)
    has_s0 = kv0 is not None
    common = dict(FMAP=FEATURE_MAPS[feature_map], CAUSAL=causal, NORMALIZE=normalize, HAS_KEEP=has_keep,
                  HAS_S0=has_s0, BLOCK_D=BD, BLOCK_DV=tile, PREC=DOT_PRECISION, num_warps=warps, maxnreg=MAXNREG)
    if max(L, S) <= DECODE_LEN:
        _linear_decode[(B * Hkv, triton.cdiv(Dv, tile))](
            q, k, v, keep, kv0 if has_s0 else kv, z0 if has_s0 else z, out, den, kv, z, H, Hkv, L, S, D, Dv,
            float(scale), float(eps), BLOCK_L=DECODE_LEN, **common)
        return
    stats = _softmax_stats(k, keep, has_keep, feature_map)
    _linear_fwd[(B * H, triton.cdiv(Dv, tile))](
        q, k, v, keep, kv0 if has_s0 else kv, z0 if has_s0 else z, out, den, kv, z, stats, H, Hkv, L, S, D, Dv,
        float(scale), float(eps), BLOCK_C=C, **common)


def backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, den, delta, feature_map, causal, normalize, scale,
             dq, dk, dv, dkv0, dz0, eps=None):
    """Writes dq, dk, dv (the inputs' shapes) and dkv0 (B, Hkv, D, Dv), dz0 (B, Hkv, D)
    (fp32) from dout (B, H, L, Dv), dkv/dz (fp32, both or neither) or None,
    den and delta = dout . out (B, H, L) fp32 (read when normalize, and for the softmax
    map always, from out in fp32); all contiguous. eps: the forward's, needed by the
    softmax map when normalize (its dq is phi_q (dphi_q - delta eps / den))."""
    _check(q, k, v, feature_map, causal)
    B, H, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    C, BD, BDV, tile, warps = config(D, Dv)
    keep, has_keep = _keep(key_padding_mask, q)
    has_s0, has_ds = kv0 is not None, dkv is not None
    if feature_map == "softmax" and normalize and eps is None:
        raise ValueError("the softmax map's backward needs the forward's eps when normalize")
    stats = _softmax_stats(k, keep, has_keep, feature_map)
    common = dict(FMAP=FEATURE_MAPS[feature_map], CAUSAL=causal, NORMALIZE=normalize, HAS_KEEP=has_keep,
                  BLOCK_C=C, PREC=DOT_PRECISION, num_warps=warps, maxnreg=MAXNREG)
    td, tv = min(tile, BD), min(tile, BDV)
    _linear_bwd_dq[(B * H, triton.cdiv(D, td))](
        q, k, v, keep, kv0 if has_s0 else dkv0, z0 if has_s0 else dz0, dout, den, delta, dq, stats, H, Hkv, L, S,
        D, Dv, float(scale), float(eps or 0.0), HAS_S0=has_s0, BLOCK_TD=td, BLOCK_DV=BDV, BLOCK_D=BD, **common)
    _linear_bwd_dk[(B * Hkv, triton.cdiv(D, td))](
        q, k, v, keep, dout, den, delta, dkv if has_ds else dkv0, dz if has_ds else dz0, dk, dkv0, dz0, stats,
        H, Hkv, L, S, D, Dv, float(scale), HAS_DS=has_ds, BLOCK_TD=td, BLOCK_DV=BDV, BLOCK_D=BD, **common)
    _linear_bwd_dv[(B * Hkv, triton.cdiv(Dv, tv))](
        q, k, v, keep, dout, den, delta, dkv if has_ds else dkv0, dv, stats, H, Hkv, L, S, D, Dv, float(scale),
        HAS_DS=has_ds, BLOCK_D=BD, BLOCK_TV=tv, **common)
