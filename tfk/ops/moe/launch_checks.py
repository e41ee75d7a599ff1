"""Argument checks shared by the MoE kernel launchers (triton_kernels/moe.py
and cuda_kernels.py): one message per mistake, naming the argument and what
was expected. torch only (the CUDA launchers must not import triton).

Value checks that read tensor data (offsets in order and range, gathered ids
in range) run for CPU tensors only: on CUDA they would synchronise with the
GPU, and are the caller's there (tfk.moe validates before it launches).
"""
from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# K and N (H and I of a layer) must be multiples of 8: rows of 16 bytes in
# fp16/bf16, what Triton's vectorised loads and the CUDA kernels' ldmatrix and
# cp.async chunks need.
ALIGN = 8
# Routing: a token's scores fit one program (Triton) or one warp (CUDA).
ROUTE_MAX_EXPERTS = 256
ROUTE_MAX_TOP_K = 8
SCORES = ("softmax", "sigmoid")
# grouped_gemm's epilogues (None: none)
ACTIVATIONS = (None, "silu", "gelu_tanh", "relu")


def check_float(name, x, dims):
    """x: a tensor of DTYPES with ``dims`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (float16, bfloat16 or float32)")
    if x.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(x.shape)}")


def check_same(name, x, ref, ref_name):
    """x has ref's dtype and device."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} differs from {ref_name}'s {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: on {x.device}, {ref_name} on {ref.device}")


def check_index(name, x, length, device):
    """x: a 1-D int32/int64 tensor on ``device``, of ``length`` entries unless None."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: must be an int32 or int64 tensor, got {x.dtype}")
    if x.dim() != 1 or (length is not None and x.shape[0] != length):
        want = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, the other tensors on {device}")


def check_aligned(name, size):
    if size % ALIGN:
        raise ValueError(f"{name} = {size} is not a multiple of {ALIGN}: the kernels read rows in "
                         f"16-byte chunks (8 fp16/bf16 elements)")


def check_offs(offs, num_rows):
    """Offsets must be non-decreasing in [0, num_rows]; CPU only."""
    if offs.device.type != "cpu" or offs.numel() == 0:
        return
    o = offs.to(torch.int64)
    if int(o[0]) < 0 or bool((o[1:] < o[:-1]).any()) or int(o[-1]) > num_rows:
        raise ValueError(f"offs: must be non-decreasing cumulative row ends in [0, {num_rows}], "
                         f"got {o.tolist() if o.numel() <= 16 else 'values out of order or range'}")


def check_gather(name, gather, used, num_src):
    """Gathered ids of the used rows (the first ``used``) must lie in [0, num_src); CPU only."""
    if gather is None or gather.device.type != "cpu" or used == 0:
        return
    g = gather[:used]
    if bool((g < 0).any()) or bool((g >= num_src).any()):
        raise ValueError(f"{name}: ids of rows below offs[-1] must lie in [0, {num_src})")


def check_grouped_gemm(a, b, offs, trans_b, act, gather, row_scale):
    """grouped_gemm's arguments (see its docstring in either kernel set);
    returns (M, K, n_out): output rows, the reduced size, output columns."""
    check_float("a", a, 2)
    check_float("b", b, 3)
    check_same("b", b, a, "a")
    G = b.shape[0]
    check_index("offs", offs, G, a.device)
    if G == 0:
        raise ValueError("b: no groups (G = 0)")
    K = a.shape[1]
    bk, N = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
    if bk != K:
        raise ValueError(f"b: its K dimension is {bk}, a has K = {K} columns (trans_b={trans_b})")
    check_aligned("K", K)
    check_aligned("N", N)
    if act not in ACTIVATIONS:
        raise ValueError(f"act: {act!r} is not one of {list(ACTIVATIONS)}")
    n_out = N // 2 if act is not None else N
    if act is not None:
        check_aligned(f"N / 2 (the gate and up halves for act={act!r})", n_out)
    if gather is not None:
        check_index("gather", gather, None, a.device)
    M = gather.shape[0] if gather is not None else a.shape[0]
    if row_scale is not None:
        if not isinstance(row_scale, torch.Tensor) or row_scale.dtype != torch.float32:
            raise TypeError("row_scale: must be a float32 tensor")
        if row_scale.shape != (M,):
            raise ValueError(f"row_scale: expected shape ({M},), got {tuple(row_scale.shape)}")
        if row_scale.device != a.device:
            raise ValueError(f"row_scale: on {row_scale.device}, a on {a.device}")
    check_offs(offs, M)
    if gather is not None and offs.device.type == "cpu":
        check_gather("gather", gather, int(offs[-1]), a.shape[0])
    return M, K, n_out


def check_grouped_gemm_tn(a, b, offs, gather_a):
    """grouped_gemm_tn's arguments; returns (G, M, K, N)."""
    check_float("a", a, 2)
    check_float("b", b, 2)
    check_same("b", b, a, "a")
    M, N = b.shape
    K = a.shape[1]
    check_index("offs", offs, None, a.device)
    G = offs.shape[0]
    if G == 0:
        raise ValueError("offs: no groups (G = 0)")
    check_aligned("K", K)
    check_aligned("N", N)
    if gather_a is not None:
        check_index("gather_a", gather_a, M, a.device)
    elif a.shape[0] != M:
        raise ValueError(f"a: {a.shape[0]} rows, b has {M} (without gather_a they must match)")
    check_offs(offs, M)
    if gather_a is not None and offs.device.type == "cpu":
        check_gather("gather_a", gather_a, int(offs[-1]), a.shape[0])
    return G, M, K, N


def check_route(logits, top_k, score, bias, n_group, topk_group):
    """The routing launchers' arguments: logits (T, E) float, 1 <= E <= 256,
    1 <= top_k <= min(E, 8), bias (E,) float or None, n_group dividing E into
    groups of >= 2 experts with topk_group in [1, n_group], or both None.

    Returns (n_group, topk_group) as the kernels take them: (0, 0) when no
    group limits the choice (none given, or every group kept).
    """
    check_float("logits", logits, 2)
    E = logits.shape[1]
    if not 1 <= E <= ROUTE_MAX_EXPERTS:
        raise ValueError(f"logits: E = {E} experts; the kernel takes 1 to {ROUTE_MAX_EXPERTS}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= min(ROUTE_MAX_TOP_K, E):
        raise ValueError(f"top_k: {top_k!r}; must be an int in [1, {min(ROUTE_MAX_TOP_K, E)}] (E = {E}, at most "
                         f"{ROUTE_MAX_TOP_K})")
    if score not in SCORES:
        raise ValueError(f"score: {score!r} is not one of {list(SCORES)}")
    if bias is not None:
        check_float("bias", bias, 1)
        if bias.shape[0] != E:
            raise ValueError(f"bias: expected shape ({E},), got {tuple(bias.shape)}")
        if bias.device != logits.device:
            raise ValueError(f"bias: on {bias.device}, logits on {logits.device}")
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group: give both or neither")
    if n_group is None:
        return 0, 0
    if isinstance(n_group, bool) or not isinstance(n_group, int) or n_group < 1 or E % n_group:
        raise ValueError(f"n_group: {n_group!r} must be a positive divisor of E = {E}")
    group_size = E // n_group
    if group_size < 2:
        raise ValueError(f"n_group: {n_group} groups of {group_size} expert; a group is scored by "
                         f"its top 2, so groups need at least 2 experts")
    if isinstance(topk_group, bool) or not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group: {topk_group!r} must be an int in [1, n_group = {n_group}]")
    if top_k > topk_group * group_size:
        raise ValueError(f"top_k: {top_k} exceeds the {topk_group * group_size} experts of "
                         f"topk_group = {topk_group} groups")
    return (0, 0) if topk_group == n_group else (n_group, topk_group)
