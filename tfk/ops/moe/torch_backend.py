"""MoE with torch ops: the CPU default, and the host-side decomposition the
kernel backends share.

    1. permute:  sort the (token, slot) assignments by expert (stable, so rows
                 of an expert stay in (slot, token) order), drop sentinels and
                 what exceeds the capacity -> order (M,) int64 flat indices
                 t*k+s, offsets (E,) int64 row ends, inverse (T*k,) int64 row
                 of each assignment (M where none);
    2. gate_up:  grouped GEMM whose A rows are x[order // k], then act(gate) * up;
    3. down:     grouped GEMM, each row times its routing weight;
    4. combine:  out[t] = sum over s = 0..k-1, in that order, of row inverse[t*k+s]
                 (a zero row for none): a gather, never a scatter-add.

The forward on the CPU with a few rows per expert (decode: many experts, few
rows each) runs all four stages as one call of tfk._cpu's kernel
(csrc/moe/experts_cpu.cpp: the same permutation and combine; each expert's
weights streamed once per block of up to 4 rows, the activation between the
products, float32 sums and rows for float32, bfloat16 and float16; torch's
GEMMs spend longer packing an expert's weights than multiplying them at
these sizes, and one call saves the dozen small ops around them).
Otherwise, and in the backward, stages 2-3 run per group of rows: as one matmul
per non-empty expert when the groups are large, or, when they are small, as
one batched call: torch's grouped_mm (``torch._grouped_mm``: one
torch.mm per group inside one op, the weights read in place, no padding;
bitwise the per-group torch.mm, so deterministic) where it takes the dtype
and layout (float32/16, bfloat16 on CPU, rows of 16-byte multiples), else
one batched matmul over the non-empty experts with the groups padded to the
largest. The cost model picks loop or batch, whichever wastes less (a padded
row costs its flops, a loop iteration its dispatch). The backward recomputes the gate_up product rather than saving
it, so a training step keeps only its inputs between forward and backward:

    dA = dout[t] @ down[e]                      d weight = rowsum(dA * a)
    d down[e] = (w * dout[t])^T @ a             da = w * dA -> dgate, dup
    d gate_up[e] = [dgate, dup]^T @ x[t]        dx rows = [dgate, dup] @ gate_up[e]
and dx[t] sums its k rows in slot order. Every gradient of an empty expert is 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...backends import import_error, new_output

# A loop iteration over experts costs about this many flops of dispatch (tens
# of microseconds at tens of GFLOP/s): padding wins while it wastes fewer.
LOOP_COST_FLOPS = 3e6
# Batched groups run through torch._grouped_mm where it can (see _grouped_ok).
GROUPED_MM = True
# The CPU forward runs tfk._cpu's kernel while an expert would get at most
# this many rows were the T*k assignments spread evenly: faster than torch's
# grouped GEMM below about 16-32 rows (bench.moe's decode shapes; see
# _cpu_kernel_ok).
ROWS_KERNEL_MAX_ROWS = 16
_GROUPED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- 1. permute

def permute(experts: torch.Tensor, num_experts: int, capacity: int | None = None):
    """(order, offsets, inverse, counts) for experts (T, k) int ids; ids
    outside [0, E) are sentinels and get no row. ``counts`` is a host list."""
    T, k = experts.shape
    E = num_experts
    by_slot = experts.t().reshape(-1).long()                    # index s*T + t
    key = torch.where((by_slot >= 0) & (by_slot < E), by_slot, E)
    sorted_key, perm = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E]
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(key.numel(), device=key.device) - torch.cat([starts, starts.new_zeros(1)])[sorted_key]
        keep = (sorted_key < E) & (rank < capacity)
        counts = counts.clamp(max=capacity)
    else:
        keep = sorted_key < E
    perm = perm[keep]
    order = (perm % T) * k + perm // T                         # flat t*k + s
    offsets = torch.cumsum(counts, 0)
    M = order.numel()
    inverse = torch.full((T * k,), M, dtype=torch.long, device=experts.device)
    inverse[order] = torch.arange(M, device=experts.device)
    return order, offsets, inverse, counts.tolist()


# ------------------------------------------------------------- group layouts

class Groups:
    """How rows sorted by group run: ``padded`` (batched: with ``grouped``,
    one torch._grouped_mm; else one batched matmul over the non-empty groups,
    each padded to ``cap`` rows, ``slot`` mapping a row to its padded place and
    ``used`` listing the groups, None when all are) or a loop over the
    non-empty groups' row ranges."""

    def __init__(self, counts, flops_per_row, device, grouped=False):
        self.counts = counts
        self.M = sum(counts)
        self.cap = max(counts, default=0)
        self.ends = list(_cumsum(counts))
        used = [g for g, c in enumerate(counts) if c]
        self.G = len(used)
        waste = (self.G * self.cap - self.M) * flops_per_row
        self.padded = self.G > 1 and waste <= self.G * LOOP_COST_FLOPS
        # grouped: the batched groups run as torch._grouped_mm (no padding, no slots)
        self.grouped = self.padded and grouped
        self.used = None
        if self.padded and not self.grouped:
            self.used = None if self.G == len(counts) else torch.tensor(used, device=device)
            group = torch.repeat_interleave(torch.arange(self.G, device=device),
                                            torch.tensor([counts[g] for g in used], device=device))
            starts = torch.tensor([self.ends[g] - counts[g] for g in used], device=device)
            self.slot = group * self.cap + torch.arange(self.M, device=device) - starts[group]

    def weights(self, w):
        """The used groups' slices of a per-group tensor (G_all, ...)."""
        return w if self.used is None else w.index_select(0, self.used)

    def scatter(self, out, per_used):
        """Write per-used-group results into out (G_all, ...), zeros elsewhere."""
        if self.used is None:
            out.copy_(per_used)
        else:
            out.zero_()
            out.index_copy_(0, self.used, per_used)

    def loop(self):
        """(group, start, end) of each non-empty group."""
        start = 0
        for g, end in enumerate(self.ends):
            if end > start:
                yield g, start, end
            start = end

    def pad(self, rows):
        """(M, ...) rows -> (G, cap, ...) with zero padding."""
        out = rows.new_zeros((self.G * self.cap,) + tuple(rows.shape[1:]))
        out.index_copy_(0, self.slot, rows)
        return out.view((self.G, self.cap) + tuple(rows.shape[1:]))

    def unpad(self, padded):
        return padded.reshape((self.G * self.cap,) + tuple(padded.shape[2:])).index_select(0, self.slot)


def _grouped_ok(dtype, *tensors, rows=()):
    """Whether torch._grouped_mm runs these: CPU, float32/16 or bfloat16, and
    16-byte aligned rows (every given tensor's data and non-unit strides, and
    the lengths of ``rows``, the rows of the operands made here)."""
    if not GROUPED_MM or dtype not in _GROUPED_DTYPES or not hasattr(torch, "_grouped_mm"):
        return False
    size = torch.empty((), dtype=dtype).element_size()
    if any(n * size % 16 for n in rows):
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or t.data_ptr() % 16:
            return False
        if any(st != 1 and st * size % 16 for st in t.stride()):
            return False
        if t.stride()[-1] != 1 and t.stride()[-2] != 1:
            return False
    return True


class _GroupedMM:
    """The batched GEMMs of the grouped mode: rows (M, K) of group g times
    w[g] (K, N); a weight gradient lhs (M, N) transposed times rhs (M, K),
    per group, 0 for a group with no rows."""

    def __init__(self, offsets, counts):
        self.offs = offsets.to(torch.int32)
        self.empty = [g for g, c in enumerate(counts) if c == 0]

    def rows(self, a, w):
        return torch._grouped_mm(a, w, self.offs)

    def weight_grad(self, lhs, rhs):
        out = torch._grouped_mm(lhs.t(), rhs, self.offs)
        for g in self.empty:   # a group with no rows (a K = 0 product): zeros, made explicit
            out[g].zero_()
        return out


def _cpu_kernel_ok(x, k, gate_up_proj, down_proj):
    """Whether the forward of x (T, H) with k slots a token runs as tfk._cpu's
    kernel: CPU tensors in float32, bfloat16 or float16, H > 0, contiguous
    weights, the T*k assignments spread evenly over min(E, T*k) experts at
    most ROWS_KERNEL_MAX_ROWS each, and tfk._cpu built."""
    rows = x.shape[0] * k
    groups = min(gate_up_proj.shape[0], rows)
    if x.dtype not in _CPU_KERNEL_DTYPES or x.device.type != "cpu" or not rows or not x.shape[1]:
        return False
    if rows > ROWS_KERNEL_MAX_ROWS * groups:
        return False
    if not (gate_up_proj.is_contiguous() and down_proj.is_contiguous()):
        return False
    return import_error("_cpu") is None


def _cumsum(counts):
    total = 0
    for c in counts:
        total += c
        yield total


# ----------------------------------------------- 2-3. gate_up and down, math

def _act_and_grad(gate, activation):
    """act(gate) and act'(gate), in gate's dtype (float32 here)."""
    if activation == "silu":
        s = torch.sigmoid(gate)
        return gate * s, torch.sub(1, s).mul_(gate).add_(1).mul_(s)   # s * (1 + gate * (1 - s)), one buffer
    if activation == "relu":
        pos = (gate > 0).to(gate.dtype)
        return gate * pos, pos
    # gelu, tanh approximation
    c = math.sqrt(2 / math.pi)
    inner = c * (gate + 0.044715 * gate ** 3)
    t = torch.tanh(inner)
    d = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * c * (1 + 3 * 0.044715 * gate * gate)
    return 0.5 * gate * (1 + t), d


def _acc(dtype):
    """The dtype of elementwise work and sums: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _activate(h, activation):
    """act(gate) * up for h = [gate, up] (..., 2I), in float32 (float64 for float64)."""
    inter = h.shape[-1] // 2
    gate, up = h[..., :inter].to(_acc(h.dtype)), h[..., inter:].to(_acc(h.dtype))
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "relu":
        return F.relu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


def _mm(a, b):
    return torch.matmul(a, b)


def _mm_t(lhs, rhs):
    return torch.matmul(lhs.transpose(-1, -2), rhs)


def _block_forward(xb, w1, w2, wb, activation, mm=_mm):
    """Rows xb (..., C, H) of experts w1 (..., 2I, H), w2 (..., H, I), weights wb
    (..., C) in the accumulation dtype -> weighted rows (..., C, H) in it.
    ``mm(rows, w)``: rows times w per group (a batched matmul; or grouped)."""
    h = mm(xb, w1.transpose(-1, -2))                                      # 2. gate_up GEMM
    a = _activate(h, activation).to(xb.dtype)
    y = mm(a, w2.transpose(-1, -2))                                       # 3. down GEMM
    if y.dtype == wb.dtype:
        return y.mul_(wb.unsqueeze(-1))
    return y.to(wb.dtype) * wb.unsqueeze(-1)


def _block_backward(xb, w1, w2, wb, gb, activation, mm=_mm, mm_t=_mm_t):
    """Gradients of one block: (dx rows, d weight per row (in wb's dtype), d w1, d w2).
    ``mm_t(lhs, rhs)``: lhs^T times rhs per group (the weight gradients)."""
    dtype, acc = xb.dtype, wb.dtype
    h = mm(xb, w1.transpose(-1, -2))                                      # recomputed
    inter = h.shape[-1] // 2
    gate, up = h[..., :inter].to(acc), h[..., inter:].to(acc)
    act, dact = _act_and_grad(gate, activation)
    a = act * up
    dA = mm(gb, w2).to(acc)                                               # dout rows @ down[e]
    dweight = (dA * a).sum(-1)
    da = dA * wb.unsqueeze(-1)
    gw = (gb.to(acc) * wb.unsqueeze(-1)).to(dtype)
    dw2 = mm_t(gw, a.to(dtype))
    dh = torch.empty(h.shape, dtype=acc, device=h.device)                # [dgate, dup], written in place
    torch.mul(da, up, out=dh[..., :inter]).mul_(dact)
    torch.mul(da, act, out=dh[..., inter:])
    dh = dh.to(dtype)
    dw1 = mm_t(dh, xb)
    dxb = mm(dh, w1)
    return dxb, dweight, dw1, dw2


# -------------------------------------------------------------- 4. combine

def combine(rows, inverse, T, k):
    """out (T, H): token t's k rows summed in slot order. ``rows`` (M, H) has
    one row per kept assignment; inverse[t*k+s] == M for a dropped one (a zero
    row is appended then; with M == T*k none was dropped)."""
    if rows.shape[0] != inverse.numel():
        rows = _with_zero_row(rows)
    idx = inverse.view(T, k)
    out = rows.index_select(0, idx[:, 0])
    for s in range(1, k):
        out += rows.index_select(0, idx[:, s])
    return out


def _with_zero_row(rows):
    return torch.cat([rows, rows.new_zeros((1,) + tuple(rows.shape[1:]))])


# ------------------------------------------------------- experts fwd and bwd

def experts_forward(x, experts, weights, gate_up_proj, down_proj, activation, capacity):
    """out (T, H) in x's dtype. ``capacity`` None (or < 0) is dropless."""
    T, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    k = experts.shape[1]
    out = new_output((T, H), x.dtype, x.device)
    if _cpu_kernel_ok(x, k, gate_up_proj, down_proj):
        return out.copy_(torch.ops.tfk_cpu.moe_experts_forward(
            x.contiguous(), experts.long().contiguous(), weights.float().contiguous(), gate_up_proj, down_proj,
            activation, -1 if capacity is None else capacity))
    order, offsets, inverse, counts = permute(experts, E, None if capacity is None or capacity < 0 else capacity)
    M = order.numel()
    if M == 0 or H == 0:
        return out.zero_()
    token = order // k
    wrow = weights.reshape(-1).index_select(0, order).to(_acc(x.dtype))
    grouped = _grouped_ok(x.dtype, gate_up_proj, down_proj, rows=(H, two_i, two_i // 2))
    groups = Groups(counts, 3 * H * two_i, x.device, grouped)
    if groups.grouped:
        gmm = _GroupedMM(offsets, counts)
        rows = _block_forward(x.index_select(0, token), gate_up_proj, down_proj, wrow, activation, gmm.rows)
    elif groups.padded:
        yb = _block_forward(groups.pad(x.index_select(0, token)), groups.weights(gate_up_proj),
                            groups.weights(down_proj), groups.pad(wrow), activation)
        rows = groups.unpad(yb)
    else:
        rows = torch.empty(M, H, dtype=wrow.dtype, device=x.device)
        for g, s, e in groups.loop():
            rows[s:e] = _block_forward(x.index_select(0, token[s:e]), gate_up_proj[g], down_proj[g],
                                       wrow[s:e], activation)
    out.copy_(combine(rows, inverse, T, k))
    return out


def experts_backward(dout, x, experts, weights, gate_up_proj, down_proj, activation, capacity):
    """(dx, dweights, d gate_up_proj, d down_proj), each in its input's dtype."""
    T, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    k = experts.shape[1]
    dx = new_output(x.shape, x.dtype, x.device)
    dweights = new_output(weights.shape, weights.dtype, weights.device)
    dw1 = new_output(gate_up_proj.shape, gate_up_proj.dtype, gate_up_proj.device)
    dw2 = new_output(down_proj.shape, down_proj.dtype, down_proj.device)
    order, offsets, inverse, counts = permute(experts, E, None if capacity is None or capacity < 0 else capacity)
    M = order.numel()
    if M == 0 or H == 0:
        for t in (dx, dweights, dw1, dw2):
            t.zero_()
        return dx, dweights, dw1, dw2
    dout = dout.to(x.dtype)
    token = order // k
    wrow = weights.reshape(-1).index_select(0, order).to(_acc(x.dtype))
    grouped = _grouped_ok(x.dtype, gate_up_proj, down_proj, rows=(H, two_i, two_i // 2))
    groups = Groups(counts, 3 * H * two_i, x.device, grouped)
    if groups.grouped:
        gmm = _GroupedMM(offsets, counts)
        dx_rows, dw_rows, dw1, dw2 = _block_backward(
            x.index_select(0, token), gate_up_proj, down_proj, wrow, dout.index_select(0, token), activation,
            gmm.rows, gmm.weight_grad)
    elif groups.padded:
        dxb, dwb, g1, g2 = _block_backward(groups.pad(x.index_select(0, token)), groups.weights(gate_up_proj),
                                           groups.weights(down_proj), groups.pad(wrow),
                                           groups.pad(dout.index_select(0, token)), activation)
        groups.scatter(dw1, g1)
        groups.scatter(dw2, g2)
        dx_rows, dw_rows = groups.unpad(dxb), groups.unpad(dwb)
    else:
        dx_rows = torch.empty(M, H, dtype=x.dtype, device=x.device)
        dw_rows = torch.empty(M, dtype=wrow.dtype, device=x.device)
        done = [False] * E
        for g, s, e in groups.loop():
            dx_rows[s:e], dw_rows[s:e], dw1[g], dw2[g] = _block_backward(
                x.index_select(0, token[s:e]), gate_up_proj[g], down_proj[g], wrow[s:e],
                dout.index_select(0, token[s:e]), activation)
            done[g] = True
        for g in range(E):
            if not done[g]:
                dw1[g].zero_()
                dw2[g].zero_()
    dx.copy_(combine(dx_rows.to(wrow.dtype), inverse, T, k))
    dweights.copy_(_with_zero_row(dw_rows).index_select(0, inverse).view(T, k))
    return dx, dweights, dw1, dw2


# ---------------------------------------------------------------- grouped_mm

def grouped_mm_forward(a, b, offs):
    """out (M, N) in a's dtype: rows of group g times b[g]; rows past offs[-1] are 0."""
    M, K = a.shape
    G, _, N = b.shape
    counts = _counts(offs)
    end = sum(counts)
    groups = Groups(counts, 2 * K * N, a.device, _grouped_ok(a.dtype, a, b))
    if groups.grouped:
        out = torch._grouped_mm(a, b, offs.to(torch.int32))   # rows past the end: uninitialised
        out[end:].zero_()
        return out
    out = new_output((M, N), a.dtype, a.device)
    out[end:].zero_()
    if groups.padded:
        out[:end] = groups.unpad(torch.matmul(groups.pad(a[:end]), groups.weights(b)))
    else:
        for g, s, e in groups.loop():
            torch.mm(a[s:e], b[g], out=out[s:e])
    return out


def grouped_mm_backward(dout, a, b, offs):
    """(da, db): da rows = dout rows @ b[g]^T (0 past offs[-1]); db[g] = a_g^T @ dout_g (0 when empty)."""
    M, K = a.shape
    G, _, N = b.shape
    dout = dout.to(a.dtype)
    counts = _counts(offs)
    end = sum(counts)
    groups = Groups(counts, 4 * K * N, a.device, _grouped_ok(a.dtype, a, b, dout))
    if groups.grouped:
        gmm = _GroupedMM(offs, counts)
        da = gmm.rows(dout, b.transpose(1, 2))   # rows past the end: uninitialised
        da[end:].zero_()
        return da, gmm.weight_grad(a[:end], dout[:end])
    da = new_output(a.shape, a.dtype, a.device)
    db = new_output(b.shape, b.dtype, b.device)
    da[end:].zero_()
    if groups.padded:
        ap, gp = groups.pad(a[:end]), groups.pad(dout[:end])
        da[:end] = groups.unpad(torch.matmul(gp, groups.weights(b).transpose(-1, -2)))
        groups.scatter(db, torch.matmul(ap.transpose(-1, -2), gp))
    else:
        db.zero_()
        for g, s, e in groups.loop():
            da[s:e] = dout[s:e] @ b[g].t()
            db[g] = a[s:e].t() @ dout[s:e]
    return da, db


def _counts(offs):
    ends = offs.tolist()
    return [e - s for s, e in zip([0] + ends[:-1], ends)]
