"""Launchers of the CUDA C++ MoE kernels (csrc/moe/): torch.ops.tfk (tfk._C)
for CUDA tensors, torch.ops.tfk_sim (tfk._sim, the same kernels run by the
host-execution layer) for CPU tensors.

The signatures are triton_kernels/moe.py's, so the two are interchangeable:

- ``grouped_gemm(a, b, offs, *, gather=None, trans_b=False, act=None, row_scale=None)``
- ``grouped_gemm_tn(a, b, offs, *, gather_a=None)`` -> (G, K, N) in a's dtype
- ``combine(y, index, k)``
- ``act_backward(gate_up, grad_h, act)``
- ``route(logits, top_k, *, score, normalize, bias, n_group, topk_group, scaling)``
  -> (weights, experts, counts)

fp16 and bf16 run on tensor cores (mma.sync m16n8k16, fp32 accumulation);
fp32 on an FMA path in fp32. K and N (H and I of a layer) must be multiples
of 8 (the kernels move rows in 16-byte chunks); others are refused with a
ValueError naming the argument. Value checks that would synchronise with a
GPU (offsets in order and range, gathered ids in range) are made for CPU
tensors only; on CUDA they are the caller's (tfk.moe validates first).
"""
from __future__ import annotations

import importlib

import torch

from ... import backends
from .launch_checks import ACTIVATIONS, ALIGN, DTYPES  # noqa: F401 (part of the module's API)
from .launch_checks import check_aligned as _aligned
from .launch_checks import check_float as _check_float
from .launch_checks import check_index
from .launch_checks import check_grouped_gemm, check_grouped_gemm_tn, check_route
from .launch_checks import check_same as _same



def ops(device):
    """torch.ops.tfk (tfk._C) for CUDA tensors, torch.ops.tfk_sim (tfk._sim) for CPU tensors."""
    if device.type == "cuda":
        importlib.import_module("tfk._C")
        return torch.ops.tfk
    if device.type != "cpu":
        raise ValueError(f"the CUDA MoE kernels take CUDA tensors, or CPU tensors (cuda-sim), not {device}")
    importlib.import_module("tfk._sim")
    return torch.ops.tfk_sim


def _int64(x):
    """A checked int32/int64 index tensor as contiguous int64 (the kernels' type)."""
    return x.to(torch.int64).contiguous()


def _index(name, x, length, device):
    """An int32/int64 1-D index tensor as contiguous int64."""
    check_index(name, x, length, device)
    return _int64(x)


def _int64_output(shape, device):
    """An int64 output, -1 everywhere when outputs are poisoned (an unwritten id or count shows)."""
    if backends.POISON_OUTPUTS:
        return torch.full(shape, -1, dtype=torch.int64, device=device)
    return torch.empty(shape, dtype=torch.int64, device=device)


def _dense(x):
    """Contiguous, with 16-byte aligned data (cp.async reads 16-byte chunks)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def grouped_gemm(a, b, offs, *, gather=None, trans_b=False, act=None, row_scale=None):
    """c = act(A_g @ b[g]) * row_scale over row groups, in a's dtype.

    a (Ma, K); b (G, K, N), or (G, N, K) with ``trans_b``; offs (G,) int32 or
    int64 cumulative row ends: output row r < offs[-1] belongs to group g with
    offs[g-1] <= r < offs[g] (empty groups allowed). Row r of A is
    a[gather[r]] when ``gather`` (M,) is given, else a[r]. Rows
    offs[-1] <= r < M are written 0. act None, "silu", "gelu_tanh" or "relu":
    b's N columns are [gate | up] and c = act(gate) * up (N/2 columns).
    row_scale (M,) float32 multiplies each output row. Returns (M, N or N/2).
    """
    M, K, n_out = check_grouped_gemm(a, b, offs, trans_b, act, gather, row_scale)
    offs = _int64(offs)
    gather = None if gather is None else _int64(gather)
    row_scale = None if row_scale is None else row_scale.contiguous()
    out = backends.new_output((M, n_out), a.dtype, a.device)
    if out.numel() == 0:
        return out
    return ops(a.device).moe_grouped_gemm.out(_dense(a), _dense(b), offs, gather, bool(trans_b), act or "none",
                                              row_scale, out=out)


def grouped_gemm_tn(a, b, offs, *, gather_a=None):
    """c[g] = A[rows_g]^T @ b[rows_g] for each group g: (G, K, N) in a's dtype.

    a (Ma, K), b (M, N); offs (G,) cumulative row ends over b's rows (rows
    past offs[-1] are not read). Row r of A is a[gather_a[r]] when
    ``gather_a`` (M,) is given, else a[r] (then Ma == M). fp32 accumulation
    in a fixed row order (deterministic); empty groups give zeros.
    """
    G, M, K, N = check_grouped_gemm_tn(a, b, offs, gather_a)
    offs = _int64(offs)
    gather_a = None if gather_a is None else _int64(gather_a)
    out = backends.new_output((G, K, N), a.dtype, a.device)
    if out.numel() == 0:
        return out
    return ops(a.device).moe_grouped_gemm_tn.out(_dense(a), _dense(b), offs, gather_a, out=out)


def combine(y, index, k):
    """out[t] = sum over s < k of y[index[t * k + s]], in slot order; index -1
    adds nothing. fp32 accumulation, deterministic. Returns (T, H) in y's dtype."""
    _check_float("y", y, 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: {k!r} must be a positive int")
    index = _index("index", index, None, y.device)
    if index.shape[0] % k:
        raise ValueError(f"index: length {index.shape[0]} is not a multiple of k = {k}")
    _aligned("H", y.shape[1])
    if index.device.type == "cpu" and index.numel() and (bool((index < -1).any()) or
                                                          bool((index >= y.shape[0]).any())):
        raise ValueError(f"index: entries must be -1 or lie in [0, {y.shape[0]})")
    out = backends.new_output((index.shape[0] // k, y.shape[1]), y.dtype, y.device)
    if out.numel() == 0:
        return out
    return ops(y.device).moe_combine.out(y.contiguous(), index, k, out=out)


def act_backward(gate_up, grad_h, act):
    """The gradient of h = act(gate) * up w.r.t. gate_up = [gate | up]:
    (M, 2I) in gate_up's dtype, [dh * up * act'(gate) | dh * act(gate)] in fp32."""
    _check_float("gate_up", gate_up, 2)
    _check_float("grad_h", grad_h, 2)
    _same("grad_h", grad_h, gate_up, "gate_up")
    if act not in ACTIVATIONS or act is None:
        raise ValueError(f"act: {act!r} is not one of {[a for a in ACTIVATIONS if a]}")
    M, N = gate_up.shape
    if N % 2 or grad_h.shape != (M, N // 2):
        raise ValueError(f"grad_h: shape {tuple(grad_h.shape)} does not match gate_up {tuple(gate_up.shape)} "
                         f"(expected ({M}, {N // 2}) and an even width)")
    out = backends.new_output((M, N), gate_up.dtype, gate_up.device)
    if out.numel() == 0:
        return out
    return ops(gate_up.device).moe_act_backward.out(gate_up.contiguous(), grad_h.contiguous(), act, out=out)


def route(logits, top_k, *, score="softmax", normalize=True, bias=None, n_group=None, topk_group=None,
          scaling=1.0):
    """Top-k routing of T tokens over E experts, in one kernel (csrc/moe/moe_route.cu).

    logits (T, E) fp16/bf16/fp32, read as float32. Scores: softmax or sigmoid
    of the logits; the choice score is score + bias ((E,), for the choice
    only). n_group/topk_group: experts split in n_group equal groups (of at
    least 2), a group scored by the sum of its two best choice scores, only
    the topk_group best groups' experts chosen. Top-k by iterated argmax:
    descending, ties to the lower expert (or group) index. Weights: the
    unbiased scores of the chosen experts, divided by their sum when
    ``normalize`` (sigmoid: sum + 1e-20), times ``scaling``.

    Returns (weights (T, k) float32, experts (T, k) int64, counts (E,) int64:
    the (token, slot) assignments of each expert). E <= 256, k <= 8.
    """
    n_group, topk_group = check_route(logits, top_k, score, bias, n_group, topk_group)
    T, E = logits.shape
    dev = logits.device
    weights = backends.new_output((T, top_k), torch.float32, dev)
    experts = _int64_output((T, top_k), dev)
    counts = _int64_output((E,), dev)  # the kernel zeroes it first
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    return ops(dev).moe_route.out(logits.contiguous(), top_k, score, bool(normalize), bias, n_group, topk_group,
                                  float(scaling), weights=weights, experts=experts, counts=counts)
