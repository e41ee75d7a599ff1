"""Launchers of the CUDA C++ MoE kernels (csrc/moe/): torch.ops.tfk (tfk._C)
for CUDA tensors, torch.ops.tfk_sim (tfk._sim, the same kernels run by the
host-execution layer) for CPU tensors.

The signatures are triton_kernels/moe.py's, so the two are interchangeable:

- ``grouped_gemm(a, b, offs, *, gather=None, trans_b=False, act=None, row_scale=None)``
- ``grouped_gemm_tn(a, b, offs, *, gather_a=None)`` -> (G, K, N) in a's dtype
- ``combine(y, index, k)``
- ``act_backward(gate_up, grad_h, act)``

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

ACTIVATIONS = (None, "silu", "gelu_tanh", "relu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALIGN = 8  # K, N, H: multiples of 8 elements (16-byte chunks of fp16/bf16)


def ops(device):
    """torch.ops.tfk (tfk._C) for CUDA tensors, torch.ops.tfk_sim (tfk._sim) for CPU tensors."""
    if device.type == "cuda":
        importlib.import_module("tfk._C")
        return torch.ops.tfk
    if device.type != "cpu":
        raise ValueError(f"the CUDA MoE kernels take CUDA tensors, or CPU tensors (cuda-sim), not {device}")
    importlib.import_module("tfk._sim")
    return torch.ops.tfk_sim


def _check_float(name, x, dims):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (float16, bfloat16 or float32)")
    if x.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(x.shape)}")


def _same(name, x, ref, ref_name):
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} differs from {ref_name}'s {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: on {x.device}, {ref_name} on {ref.device}")


def _index(name, x, length, device):
    """An int32/int64 1-D index tensor as contiguous int64."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: must be an int32 or int64 tensor, got {x.dtype}")
    if x.dim() != 1 or (length is not None and x.shape[0] != length):
        want = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, the other tensors on {device}")
    return x.to(torch.int64).contiguous()


def _aligned(name, size):
    if size % ALIGN:
        raise ValueError(f"{name} = {size} is not a multiple of {ALIGN}: the kernels read rows in "
                         f"16-byte chunks (8 fp16/bf16 elements)")


def _dense(x):
    """Contiguous, with 16-byte aligned data (cp.async reads 16-byte chunks)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _check_offs(offs, num_rows):
    if offs.device.type != "cpu" or offs.numel() == 0:
        return
    if int(offs[0]) < 0 or bool((offs[1:] < offs[:-1]).any()) or int(offs[-1]) > num_rows:
        raise ValueError(f"offs: must be non-decreasing cumulative row ends in [0, {num_rows}], "
                         f"got {offs.tolist() if offs.numel() <= 16 else 'values out of order or range'}")


def _check_gather(name, gather, used, num_src):
    if gather is None or gather.device.type != "cpu" or used == 0:
        return
    g = gather[:used]
    if bool((g < 0).any()) or bool((g >= num_src).any()):
        raise ValueError(f"{name}: ids of rows below offs[-1] must lie in [0, {num_src})")


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
    _check_float("a", a, 2)
    _check_float("b", b, 3)
    _same("b", b, a, "a")
    G = b.shape[0]
    if G == 0:
        raise ValueError("b: no groups (G = 0)")
    offs = _index("offs", offs, G, a.device)
    K = a.shape[1]
    bk, N = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
    if bk != K:
        raise ValueError(f"b: its K dimension is {bk}, a has K = {K} columns (trans_b={trans_b})")
    _aligned("K", K)
    _aligned("N", N)
    if act not in ACTIVATIONS:
        raise ValueError(f"act: {act!r} is not one of {list(ACTIVATIONS)}")
    n_out = N // 2 if act is not None else N
    if act is not None:
        _aligned(f"N / 2 (the gate and up halves for act={act!r})", n_out)
    if gather is not None:
        gather = _index("gather", gather, None, a.device)
    M = gather.shape[0] if gather is not None else a.shape[0]
    if row_scale is not None:
        if not isinstance(row_scale, torch.Tensor) or row_scale.dtype != torch.float32:
            raise TypeError("row_scale: must be a float32 tensor")
        if row_scale.shape != (M,):
            raise ValueError(f"row_scale: expected shape ({M},), got {tuple(row_scale.shape)}")
        if row_scale.device != a.device:
            raise ValueError(f"row_scale: on {row_scale.device}, a on {a.device}")
        row_scale = row_scale.contiguous()
    _check_offs(offs, M)
    if gather is not None:
        _check_gather("gather", gather, int(offs[-1]) if offs.device.type == "cpu" else 0, a.shape[0])
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
    _check_float("a", a, 2)
    _check_float("b", b, 2)
    _same("b", b, a, "a")
    M, N = b.shape
    K = a.shape[1]
    offs = _index("offs", offs, None, a.device)
    G = offs.shape[0]
    if G == 0:
        raise ValueError("offs: no groups (G = 0)")
    _aligned("K", K)
    _aligned("N", N)
    if gather_a is not None:
        gather_a = _index("gather_a", gather_a, M, a.device)
    elif a.shape[0] != M:
        raise ValueError(f"a: {a.shape[0]} rows, b has {M} (without gather_a they must match)")
    _check_offs(offs, M)
    if gather_a is not None:
        _check_gather("gather_a", gather_a, int(offs[-1]) if offs.device.type == "cpu" else 0, a.shape[0])
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
