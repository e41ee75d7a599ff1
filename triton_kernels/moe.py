"""Mixture-of-Experts dispatch in Triton: routing, grouped GEMMs, the
activation's backward and the combine.

Five kernels cover the forward, the backward and grouped_mm:

- ``_moe_route``: softmax or sigmoid scores, a bias for the choice only,
  group-limited choice and top-k by iterated argmax, one program per tile of
  token rows (E <= 256, k <= 8); weights, expert ids and per-expert counts.
- ``_moe_grouped_gemm``: C = act(A[gather] @ B[g]) * row_scale over row
  groups given by cumulative offsets; a program per (row tile, N tile) reads
  its tile's group and rows from a tile map built on the host with torch ops
  (no synchronisation: the grid is an upper bound, spare programs store
  nothing). A rows come through ``gather`` (no permuted copy of the tokens);
  the epilogue applies act(gate) * up and the routing weight. Rows past the
  last offset are written 0. Forward (gate_up, down), dX, and grouped_mm.
- ``_moe_grouped_gemm_tn``: per group, A[rows]^T @ B[rows], one program per
  (group, K tile, N tile) walking the group's rows in a fixed order: the
  weight gradients, deterministic, zeros for empty groups.
- ``_moe_act_bwd``: the gradient of act(gate) * up, elementwise.
- ``_moe_combine``: out[t] = sum over slots of y[index[t * k + s]], in slot
  order (fixed, no atomics); index -1 adds nothing.
- ``_moe_histogram``, ``_moe_scan``, ``_moe_scatter`` (``permute``): the
  stable sort of the (token, slot) pairs by expert, with the expert offsets
  and the inverse map, without atomics. ``sort_by_expert`` computes the same
  with torch ops (a stable sort, bincount, cumsum) and is its oracle.

Every offset that a product of sizes can push past 2^31 (a row index times a
row stride, a group index times a weight stride) is computed in int64.

Tensors are CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (Triton's
interpreter, where fp32 and fp16 are exact enough to test; its bf16 is not).
Value checks that would synchronise with a GPU (offsets non-decreasing and in
range, gathered row ids in range) are done only for CPU tensors; on CUDA they
are the caller's (tfk.moe validates its inputs before it launches).

File grammar: configs -> kernels -> host side.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tfk import backends
from tfk.ops.moe.launch_checks import ALIGN, DTYPES  # noqa: F401 (part of the module's API)
from tfk.ops.moe.launch_checks import ROUTE_MAX_EXPERTS as MAX_EXPERTS
from tfk.ops.moe.launch_checks import ROUTE_MAX_TOP_K as MAX_TOP_K  # noqa: F401 (part of the module's API)
from tfk.ops.moe.launch_checks import check_float as _check_float
from tfk.ops.moe.launch_checks import check_index as _check_index
from tfk.ops.moe.launch_checks import check_grouped_gemm, check_grouped_gemm_tn, check_route

# -----------------------------------------------------------------------------
# Configs
# -----------------------------------------------------------------------------

KERNELS = ("_moe_route", "_moe_grouped_gemm", "_moe_grouped_gemm_tn", "_moe_act_bwd", "_moe_combine",
           "_moe_histogram", "_moe_scan", "_moe_scatter")
ACTIVATIONS = {None: 0, "silu": 1, "gelu_tanh": 2, "relu": 3}
SCORES = {"softmax": 0, "sigmoid": 1}
PERMUTE_BLOCK = 64  # ids per program of the permutation kernels
# DTYPES, ALIGN (K and N multiples of 8), MAX_EXPERTS and MAX_TOP_K (routing)
# and the launchers' argument checks: tfk/ops/moe/launch_checks.py, shared
# with the CUDA launchers.


def dot_precision(dtype):
    """fp32 inputs use tf32 tensor-core dots, as the attention kernels do
    (triton_kernels/attention.py); the interpreter computes them exactly."""
    return "tf32" if dtype == torch.float32 else "ieee"


def gemm_tiles(dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K) upper bounds of the grouped GEMMs; the N and
    K tiles shrink to the problem (not below 16, tl.dot's least)."""
    return (32, 64, 32) if dtype == torch.float32 else (64, 64, 32)


def launch_config(kernel, dtype):
    """num_warps and num_stages of a kernel. Not yet tuned on a GPU; the
    compile report (bench/compile_report.py) checks every config for spills
    (route on 4 warps spilled a few bytes with groups on sm_90a: 8 spill none)."""
    if kernel in ("_moe_grouped_gemm", "_moe_grouped_gemm_tn"):
        return dict(num_warps=4, num_stages=2 if dtype == torch.float32 else 3)
    if kernel == "_moe_route":
        return dict(num_warps=8, num_stages=1)
    return dict(num_warps=4, num_stages=1)


def _block(n, cap):
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


# -----------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    # exp of -|x| only: no overflow at either end
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _tanh(x):
    # sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no overflow
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _act(x, ACT: tl.constexpr):
    """silu (1), gelu with the tanh approximation (2), relu (3); fp32."""
    if ACT == 1:
        return x * _sigmoid(x)
    elif ACT == 2:
        return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx for _act's activations; fp32."""
    if ACT == 1:
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    else:
        return tl.where(x > 0.0, 1.0, 0.0)


@triton.jit
def _argmax_lowest(v, avail, ids, NONE: tl.constexpr):
    """Per row of ``v`` (rows, n), the lowest column id among the available
    columns holding the row's greatest available value (NONE if none is
    available)."""
    vv = tl.where(avail, v, float("-inf"))
    m = tl.max(vv, 1)
    return tl.min(tl.where(avail & (vv == m[:, None]), ids[None, :], NONE), 1)


@triton.jit
def _moe_route(
    Logits, Bias, W, Experts, Counts,
    T, E, slt, sle, group_size, scaling,
    TOP_K: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Routing of BLOCK_T token rows: W (T, TOP_K) float32, Experts (T, TOP_K)
    int64, both contiguous, and the rows' choices added to Counts (E,) int64.
    N_GROUP == 0: no group limit."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(Logits + rows[:, None] * slt + cols[None, :] * sle, mask=ok, other=float("-inf")).to(tl.float32)
    if SCORE == 0:
        m = tl.max(x, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp(x - m[:, None])
        den = tl.sum(p, 1)
        s = p / tl.where(den == 0.0, 1.0, den)[:, None]
    else:
        s = tl.where(ok, _sigmoid(x), 0.0)
    choice = s
    if HAS_BIAS:
        choice = choice + tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    avail = ok
    if N_GROUP > 0:
        # a group's score: the sum of its two best choice scores
        grp = cols // group_size
        gids = tl.arange(0, BLOCK_G)
        gscore = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
        for g in range(N_GROUP):
            in_g = ok & (grp == g)[None, :]
            i1 = _argmax_lowest(choice, in_g, cols, BLOCK_E)
            first = cols[None, :] == i1[:, None]
            top1 = tl.max(tl.where(in_g, choice, float("-inf")), 1)
            top2 = tl.max(tl.where(in_g & ~first, choice, float("-inf")), 1)
            gscore = tl.where(gids[None, :] == g, (top1 + top2)[:, None], gscore)
        # keep the TOPK_GROUP best groups (ties: the lower group)
        g_avail = (gids < N_GROUP)[None, :] & row_ok[:, None]
        keep = tl.zeros([BLOCK_T, BLOCK_G], tl.int32)
        for _ in range(TOPK_GROUP):
            ig = _argmax_lowest(gscore, g_avail, gids, BLOCK_G)
            hit = gids[None, :] == ig[:, None]
            keep = tl.where(hit, 1, keep)
            g_avail = g_avail & ~hit
        allowed = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
        for g in range(N_GROUP):
            kept = tl.sum(tl.where(gids[None, :] == g, keep, 0), 1)
            allowed = tl.where((grp == g)[None, :] & (kept > 0)[:, None], 1, allowed)
        avail = avail & (allowed > 0)
    # top-k by iterated argmax, descending by choice score, ties to the lower id
    kids = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int64)
    counts = tl.zeros([BLOCK_E], tl.int64)
    for i in range(TOP_K):
        idx = _argmax_lowest(choice, avail, cols, BLOCK_E)
        hit = cols[None, :] == idx[:, None]
        wi = tl.sum(tl.where(hit, s, 0.0), 1)
        w = tl.where(kids[None, :] == i, wi[:, None], w)
        ids = tl.where(kids[None, :] == i, idx.to(tl.int64)[:, None], ids)
        counts += tl.sum(tl.where(hit & row_ok[:, None], 1, 0), 0).to(tl.int64)
        avail = avail & ~hit
    if NORMALIZE:
        den = tl.sum(w, 1)
        if SCORE == 1:
            den = den + 1e-20
        w = w / tl.where(den == 0.0, 1.0, den)[:, None]
    w = w * scaling
    out_ok = row_ok[:, None] & (kids < TOP_K)[None, :]
    tl.store(W + rows[:, None] * TOP_K + kids[None, :], w, mask=out_ok)
    tl.store(Experts + rows[:, None] * TOP_K + kids[None, :], ids, mask=out_ok)
    # integer sums: the same in any order
    tl.atomic_add(Counts + cols, counts, mask=col_ok)


@triton.jit
def _moe_grouped_gemm(
    A, B, C, Gather, RowScale, TileMap,
    n_tiles, K, N_OUT, sam, sak, sbg, sbk, sbn, scm, scn,
    ACT: tl.constexpr, HAS_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (row tile, column tile) of C. TileMap (3, n_tiles) int64 gives the
    tile's first row, its group's end and its group (-1: rows past the last
    offset, written 0). Row r reads A[Gather[r]] (A[r] without Gather), group
    g's B[g] as (K, N) through strides. ACT > 0: C's N_OUT columns are
    act(A @ B[:, :N_OUT]) * (A @ B[:, N_OUT:]). HAS_SCALE: row r times
    RowScale[r] (float32)."""
    t = tl.program_id(0)
    start = tl.load(TileMap + t)
    end = tl.load(TileMap + n_tiles + t)
    g = tl.load(TileMap + 2 * n_tiles + t)
    rows = start + tl.arange(0, BLOCK_M)  # int64
    row_ok = rows < end
    n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = n < N_OUT
    kk = tl.arange(0, BLOCK_K).to(tl.int64)
    if HAS_GATHER:
        src = tl.load(Gather + rows, mask=row_ok & (g >= 0), other=0).to(tl.int64)
    else:
        src = rows
    a_ptr = A + src[:, None] * sam + kk[None, :] * sak
    b_ptr = B + tl.maximum(g, 0) * sbg + kk[:, None] * sbk + n[None, :] * sbn
    bu_ptr = B + tl.maximum(g, 0) * sbg + kk[:, None] * sbk + (n + N_OUT)[None, :] * sbn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # the zero tail and spare programs take no K steps
    k_end = tl.where((g >= 0) & (start < end), K, 0)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = kk < K - k0
        a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if ACT > 0:
            bu = tl.load(bu_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            up += tl.dot(a, bu, input_precision=PRECISION)
            bu_ptr += BLOCK_K * sbk
        a_ptr += BLOCK_K * sak
        b_ptr += BLOCK_K * sbk
    if ACT > 0:
        acc = _act(acc, ACT) * up
    if HAS_SCALE:
        acc = acc * tl.load(RowScale + rows, mask=row_ok & (g >= 0), other=0.0)[:, None]
    tl.store(C + rows[:, None] * scm + n[None, :] * scn, acc.to(C.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_grouped_gemm_tn(
    A, B, C, Gather, Starts, Ends,
    K, N, sam, sak, sbm, sbn, scg, sck, scn,
    HAS_GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """C[g] (K, N) = A[rows]^T @ B[rows] over group g's rows Starts[g] <=
    r < Ends[g] (int64), A's rows through Gather; one (K tile, N tile) of
    one group per program, rows in ascending order."""
    g = tl.program_id(0).to(tl.int64)
    kk = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n = (tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_ok = kk < K
    n_ok = n < N
    start = tl.load(Starts + g)
    end = tl.load(Ends + g)
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        r_ok = rows < end
        if HAS_GATHER:
            src = tl.load(Gather + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            src = rows
        aT = tl.load(A + src[None, :] * sam + kk[:, None] * sak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(B + rows[:, None] * sbm + n[None, :] * sbn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(aT, b, input_precision=PRECISION)
    tl.store(C + g * scg + kk[:, None] * sck + n[None, :] * scn, acc.to(C.dtype.element_ty),
             mask=k_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_act_bwd(
    GateUp, GradH, GradGateUp, M, I, sgm, sgn, shm, shn, sdm, sdn,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For h = act(gate) * up with GateUp = [gate | up] (M, 2I): d gate =
    dh * up * act'(gate), d up = dh * act(gate); fp32 math."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ok = (rows < M)[:, None] & (n < I)[None, :]
    gate = tl.load(GateUp + rows[:, None] * sgm + n[None, :] * sgn, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GateUp + rows[:, None] * sgm + (n + I)[None, :] * sgn, mask=ok, other=0.0).to(tl.float32)
    dh = tl.load(GradH + rows[:, None] * shm + n[None, :] * shn, mask=ok, other=0.0).to(tl.float32)
    d_gate = dh * up * _act_grad(gate, ACT)
    d_up = dh * _act(gate, ACT)
    ty = GradGateUp.dtype.element_ty
    tl.store(GradGateUp + rows[:, None] * sdm + n[None, :] * sdn, d_gate.to(ty), mask=ok)
    tl.store(GradGateUp + rows[:, None] * sdm + (n + I)[None, :] * sdn, d_up.to(ty), mask=ok)


@triton.jit
def _moe_combine(
    Y, Index, Out, T, H, sym, syh, som, soh,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Out[t] = sum over s < TOP_K of Y[Index[t * TOP_K + s]] in slot order,
    fp32; Index < 0 adds nothing."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    h_ok = h < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for s in range(TOP_K):
        idx = tl.load(Index + rows * TOP_K + s, mask=row_ok, other=-1).to(tl.int64)
        ok = (idx >= 0)[:, None] & h_ok[None, :]
        acc += tl.load(Y + idx[:, None] * sym + h[None, :] * syh, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + rows[:, None] * som + h[None, :] * soh, acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & h_ok[None, :])


@triton.jit
def _moe_histogram(Ids, Hist, n, num_experts, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Hist[c, e] (int32, (chunks, E + 1)): how many of chunk c's BLOCK ids
    equal e; ids outside [0, E) count in bucket E (sentinels)."""
    c = tl.program_id(0).to(tl.int64)
    j = c * BLOCK + tl.arange(0, BLOCK)
    ok = j < n
    ids = tl.load(Ids + j, mask=ok, other=0).to(tl.int64)
    ids = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    cols = tl.arange(0, BLOCK_E)
    hot = (ids[:, None] == cols[None, :]) & ok[:, None]
    tl.store(Hist + c * (num_experts + 1) + cols, tl.sum(hot.to(tl.int32), 0), mask=cols <= num_experts)


@triton.jit
def _moe_scan(Hist, Base, Starts, Offs, n_chunks, num_experts, BLOCK_E: tl.constexpr):
    """One program: Base[c, e] = the rows of bucket e in chunks before c
    (int64); Starts (E + 1,) each bucket's first row; Offs (E,) the
    cumulative row ends of the E experts."""
    cols = tl.arange(0, BLOCK_E)
    ok = cols <= num_experts
    run = tl.zeros([BLOCK_E], tl.int64)
    for c in range(n_chunks):
        h = tl.load(Hist + c * (num_experts + 1) + cols, mask=ok, other=0)
        tl.store(Base + c * (num_experts + 1) + cols, run, mask=ok)
        run += h.to(tl.int64)
    ends = tl.cumsum(run, 0)
    tl.store(Starts + cols, ends - run, mask=ok)
    tl.store(Offs + cols, ends, mask=cols < num_experts)


@triton.jit
def _moe_scatter(Ids, Base, Starts, Order, Inverse, n, num_experts, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each id's row in the stable sort by bucket: Starts[e] + Base[c, e] +
    its rank among the equal ids before it in its chunk. Order[row] = the
    flat index; Inverse[flat] = row, -1 for a sentinel."""
    c = tl.program_id(0).to(tl.int64)
    j = c * BLOCK + tl.arange(0, BLOCK)
    ok = j < n
    ids = tl.load(Ids + j, mask=ok, other=0).to(tl.int64)
    valid = (ids >= 0) & (ids < num_experts)
    ids = tl.where(valid, ids, num_experts)
    cols = tl.arange(0, BLOCK_E)
    hot = ((ids[:, None] == cols[None, :]) & ok[:, None]).to(tl.int32)
    rank = tl.sum(tl.where(hot > 0, tl.cumsum(hot, 0) - 1, 0), 1).to(tl.int64)
    base = tl.load(Base + c * (num_experts + 1) + ids, mask=ok, other=0) + tl.load(Starts + ids, mask=ok, other=0)
    row = base + rank
    tl.store(Order + row, j, mask=ok)
    tl.store(Inverse + j, tl.where(valid, row, -1), mask=ok)


# -----------------------------------------------------------------------------
# Host side
# -----------------------------------------------------------------------------

def tile_map(offs, num_rows, block_m):
    """(3, n_tiles) int64 on offs's device: for each program of
    ``_moe_grouped_gemm``, its first row, the end of its group's rows and its
    group (-1: a tile of the rows offs[-1] <= r < num_rows, written 0).

    Group g's rows offs[g-1] <= r < offs[g] take ceil(count / block_m) tiles,
    the tail ceil((num_rows - offs[-1]) / block_m); n_tiles is an upper bound
    of their total, num_rows // block_m + G + 1 at most, known without reading
    offs (no synchronisation), and spare tiles are empty (start == end).
    Offsets are clamped to [0, num_rows] and computed in int64.
    """
    G = offs.numel()
    dev = offs.device
    ends = offs.to(torch.int64).clamp(0, num_rows)
    ends = torch.cat([ends, torch.full((1,), num_rows, dtype=torch.int64, device=dev)])  # + the tail
    starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), ends[:-1]])
    counts = (ends - starts).clamp_min(0)
    tiles = (counts + block_m - 1) // block_m
    last = torch.cumsum(tiles, 0)  # one past each part's last tile
    n_tiles = (num_rows + (G + 1) * (block_m - 1)) // block_m
    t = torch.arange(n_tiles, dtype=torch.int64, device=dev)
    part = torch.searchsorted(last, t, right=True)
    used = part <= G
    p = part.clamp(max=G)
    first = starts[p] + (t - (last[p] - tiles[p])) * block_m
    end = ends[p]
    group = torch.where(p == G, -1, p)
    zero = torch.zeros_like(t)
    return torch.stack([torch.where(used, first, zero), torch.where(used, end, zero),
                        torch.where(used, group, zero - 1)])


def grouped_gemm(a, b, offs, *, gather=None, trans_b=False, act=None, row_scale=None):
    """c = act(A_g @ b[g]) * row_scale, over row groups, in a's dtype.

    a (Ma, K); b (G, K, N), or (G, N, K) with ``trans_b`` (then row g is
    used transposed, e.g. HF's gate_up_proj (E, 2I, H)); offs (G,) int32 or
    int64 cumulative row ends: output row r < offs[-1] belongs to group g with
    offs[g-1] <= r < offs[g] (empty groups allowed). Row r of A is
    a[gather[r]] when ``gather`` (M,) int32/int64 is given, else a[r]; M is
    len(gather), or Ma. Rows offs[-1] <= r < M are written 0 (their gather
    ids are not read: sentinels may sit there).

    act: None, "silu", "gelu_tanh" or "relu": b's N columns are [gate | up]
    halves and c = act(gate) * up has N/2 columns. row_scale (M,) float32
    multiplies row r of the result (the routing weights). fp32 accumulation
    (tf32 dots for fp32 inputs on a GPU). Returns c (M, N or N/2).
    """
    M, K, n_out = check_grouped_gemm(a, b, offs, trans_b, act, gather, row_scale)

    c = backends.new_output((M, n_out), a.dtype, a.device)
    if c.numel() == 0:
        return c
    block_m, cap_n, cap_k = gemm_tiles(a.dtype)
    block_n, block_k = _block(n_out, cap_n), _block(K, cap_k)
    tmap = tile_map(offs, M, block_m)
    n_tiles = tmap.shape[1]
    sbg, sbk, sbn = (b.stride(0), b.stride(2), b.stride(1)) if trans_b else b.stride()
    _moe_grouped_gemm[(n_tiles, triton.cdiv(n_out, block_n))](
        a, b, c, gather if gather is not None else tmap, row_scale if row_scale is not None else tmap, tmap,
        n_tiles, K, n_out, a.stride(0), a.stride(1), sbg, sbk, sbn, c.stride(0), c.stride(1),
        ACT=ACTIVATIONS[act], HAS_GATHER=gather is not None, HAS_SCALE=row_scale is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(a.dtype),
        **launch_config("_moe_grouped_gemm", a.dtype))
    return c


def grouped_gemm_tn(a, b, offs, *, gather_a=None):
    """c[g] = A[rows_g]^T @ b[rows_g] for each group g: (G, K, N) in a's dtype.

    a (Ma, K), b (M, N); offs (G,) int32/int64 cumulative row ends over b's
    rows (rows_g: offs[g-1] <= r < offs[g]; rows past offs[-1] are not read).
    Row r of A is a[gather_a[r]] when ``gather_a`` (M,) is given, else a[r]
    (then Ma == M). fp32 accumulation in a fixed row order (deterministic);
    empty groups give zeros. The weight gradients of grouped_gemm.
    """
    G, M, K, N = check_grouped_gemm_tn(a, b, offs, gather_a)

    c = backends.new_output((G, K, N), a.dtype, a.device)
    if c.numel() == 0:
        return c
    ends = offs.to(torch.int64).clamp(0, M)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    block_m, cap_n, cap_k = gemm_tiles(a.dtype)
    block_n, block_k = _block(N, cap_n), _block(K, cap_k)
    _moe_grouped_gemm_tn[(G, triton.cdiv(K, block_k), triton.cdiv(N, block_n))](
        a, b, c, gather_a if gather_a is not None else ends, starts, ends,
        K, N, a.stride(0), a.stride(1), b.stride(0), b.stride(1), *c.stride(),
        HAS_GATHER=gather_a is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(a.dtype),
        **launch_config("_moe_grouped_gemm_tn", a.dtype))
    return c


def route(logits, top_k, *, score="softmax", normalize=True, bias=None, n_group=None, topk_group=None,
          scaling=1.0):
    """Top-k routing of T tokens over E experts, in one kernel.

    logits (T, E), taken in float32. Scores: softmax or sigmoid of the
    logits; the choice score is score + bias ((E,), DeepSeek-V3's correction
    bias; for the choice only). n_group/topk_group (DeepSeek-V3): experts
    split in n_group equal groups, a group scored by the sum of its two best
    choice scores, only the topk_group best groups' experts chosen. The k
    experts of a token are taken by iterated argmax of the choice score:
    descending, ties broken toward the lower expert (or group) index.
    Weights: the unbiased scores of the chosen experts, divided by their sum
    when ``normalize`` (sigmoid: sum + 1e-20), times ``scaling``.

    Returns (weights (T, k) float32, experts (T, k) int64, counts (E,) int64:
    the (token, slot) assignments of each expert). E <= 256, k <= 8.
    """
    n_group, topk_group = check_route(logits, top_k, score, bias, n_group, topk_group)
    T, E = logits.shape
    dev = logits.device
    weights = backends.new_output((T, top_k), torch.float32, dev)
    experts = torch.full((T, top_k), -1, dtype=torch.int64, device=dev) if backends.POISON_OUTPUTS \
        else torch.empty((T, top_k), dtype=torch.int64, device=dev)
    counts = torch.zeros(E, dtype=torch.int64, device=dev)
    if T == 0:
        return weights, experts, counts
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(16, 2048 // block_e))
    _moe_route[(triton.cdiv(T, block_t),)](
        logits, bias if bias is not None else logits, weights, experts, counts,
        T, E, logits.stride(0), logits.stride(1), E // max(n_group, 1), float(scaling),
        TOP_K=top_k, SCORE=SCORES[score], HAS_BIAS=bias is not None, NORMALIZE=bool(normalize),
        N_GROUP=n_group, TOPK_GROUP=topk_group,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_G=triton.next_power_of_2(max(n_group, 1)),
        BLOCK_K=triton.next_power_of_2(top_k), **launch_config("_moe_route", logits.dtype))
    return weights, experts, counts


def act_backward(gate_up, grad_h, act):
    """The gradient of h = act(gate) * up w.r.t. gate_up = [gate | up].

    gate_up (M, 2I), grad_h (M, I), same dtype; act "silu", "gelu_tanh" or
    "relu". Returns (M, 2I) in gate_up's dtype: [dh * up * act'(gate) |
    dh * act(gate)], computed in fp32.
    """
    _check_float("gate_up", gate_up, 2)
    _check_float("grad_h", grad_h, 2)
    if grad_h.dtype != gate_up.dtype:
        raise TypeError(f"grad_h: dtype {grad_h.dtype} differs from gate_up's {gate_up.dtype}")
    if act not in ACTIVATIONS or act is None:
        raise ValueError(f"act: {act!r} is not one of {[a for a in ACTIVATIONS if a]}")
    M, N = gate_up.shape
    if N % 2 or grad_h.shape != (M, N // 2):
        raise ValueError(f"grad_h: shape {tuple(grad_h.shape)} does not match gate_up {tuple(gate_up.shape)} "
                         f"(expected ({M}, {N // 2}) and an even width)")
    if grad_h.device != gate_up.device:
        raise ValueError(f"grad_h: on {grad_h.device}, gate_up on {gate_up.device}")
    I = N // 2
    out = backends.new_output((M, N), gate_up.dtype, gate_up.device)
    if out.numel() == 0:
        return out
    block_m, block_n = 32, _block(I, 64)
    _moe_act_bwd[(triton.cdiv(M, block_m), triton.cdiv(I, block_n))](
        gate_up, grad_h, out, M, I, *gate_up.stride(), *grad_h.stride(), *out.stride(),
        ACT=ACTIVATIONS[act], BLOCK_M=block_m, BLOCK_N=block_n, **launch_config("_moe_act_bwd", gate_up.dtype))
    return out


def combine(y, index, k):
    """out[t] = sum over s < k of y[index[t * k + s]], in slot order.

    y (My, H); index (T * k,) int32/int64 rows of y, -1 for a slot that adds
    nothing (dropped by capacity, or an expert-parallel sentinel). fp32
    accumulation in a fixed order (deterministic, no atomics). Returns
    out (T, H) in y's dtype.
    """
    _check_float("y", y, 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: {k!r} must be a positive int")
    _check_index("index", index, None, y.device)
    if index.shape[0] % k:
        raise ValueError(f"index: length {index.shape[0]} is not a multiple of k = {k}")
    if index.device.type == "cpu" and index.numel() and (bool((index < -1).any()) or
                                                          bool((index >= y.shape[0]).any())):
        raise ValueError(f"index: entries must be -1 or lie in [0, {y.shape[0]})")
    T, H = index.shape[0] // k, y.shape[1]
    out = backends.new_output((T, H), y.dtype, y.device)
    if out.numel() == 0:
        return out
    block_t, block_h = 16, _block(H, 128)
    _moe_combine[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        y, index, out, T, H, *y.stride(), *out.stride(),
        TOP_K=k, BLOCK_T=block_t, BLOCK_H=block_h, **launch_config("_moe_combine", y.dtype))
    return out


def sort_by_expert(experts, num_experts):
    """The permutation of (token, slot) pairs by expert, with torch ops.

    experts (T, k) int ids; ids outside [0, num_experts) (E or -1: sentinels)
    sort last and belong to no group. Returns (order, offs, inverse): order
    (T*k,) int64 the flat (token, slot) index of each sorted row (stable:
    by expert, then token, then slot), so row r reads token order[r] // k;
    offs (E,) int64 cumulative row ends; inverse (T*k,) int64 the sorted row
    of each (token, slot), -1 for a sentinel (for ``combine``).
    """
    flat = experts.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offs = torch.cumsum(counts, 0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), dtype=torch.int64, device=order.device)
    return order, offs, torch.where(valid, inverse, -1)


def permute(experts, num_experts):
    """``sort_by_expert`` in three kernels (histogram, scan, scatter): the
    same (order, offs, inverse), deterministic, no atomics, no sort.

    experts (T, k) int32/int64, ids outside [0, num_experts) sentinels
    (sorted last, inverse -1); num_experts <= 256. Chunks of PERMUTE_BLOCK
    ids are counted per expert, one program scans the counts (running sums
    over the chunks, then across experts) and each chunk places its ids at
    its experts' starts plus their rank within the chunk.
    """
    if not isinstance(experts, torch.Tensor) or experts.dtype not in (torch.int32, torch.int64):
        raise TypeError("experts: must be an int32 or int64 tensor")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts: {num_experts!r} must be an int in [1, {MAX_EXPERTS}]")
    ids = experts.reshape(-1)
    n, dev = ids.numel(), ids.device
    order = torch.empty(n, dtype=torch.int64, device=dev)
    inverse = torch.empty(n, dtype=torch.int64, device=dev)
    offs = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    if n == 0:
        return order, offs, inverse
    block, block_e = PERMUTE_BLOCK, triton.next_power_of_2(num_experts + 1)
    chunks = triton.cdiv(n, block)
    hist = torch.empty(chunks, num_experts + 1, dtype=torch.int32, device=dev)
    base = torch.empty(chunks, num_experts + 1, dtype=torch.int64, device=dev)
    starts = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
    _moe_histogram[(chunks,)](ids, hist, n, num_experts, BLOCK=block, BLOCK_E=block_e)
    _moe_scan[(1,)](hist, base, starts, offs, chunks, num_experts, BLOCK_E=block_e)
    _moe_scatter[(chunks,)](ids, base, starts, order, inverse, n, num_experts, BLOCK=block, BLOCK_E=block_e)
    return order, offs, inverse
