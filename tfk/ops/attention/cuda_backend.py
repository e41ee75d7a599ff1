"""Backends "cuda" and "cuda-sim": the FlashAttention-2 style CUDA kernels of
csrc/attention/ (ldmatrix + mma.sync, cp.async double buffering, online
softmax) over the engine's plans.

"cuda" runs them on a GPU through tfk._C (built for sm_80 and sm_90).
"cuda-sim" runs the same sources, compiled for the host (tfk._sim), on CPU
tensors through tfk's host-execution layer: for tests and debugging, never
chosen by "auto", and slow (a 4-warp block's threads are fibers).

Both take float16 and bfloat16, head dims up to 128 (the kernels are built for
64 and 128; smaller head dims are padded with zeros), any D != Dv, GQA,
Lq != Lk, every pattern, user masks and dropout (tfk.dropout's counter hash,
the same keep mask as every backend). Tiles are 64 x 64.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ... import backends
from ... import dropout as drop
from ...backends import AttentionCall, Backend, register_backend
from .engine import attention_ops, backward_over_plan, delta_of, forward_over_plan, kernel_reasons, op_plan

BLOCK = 64            # kBlockM = kBlockN in csrc/attention/attention.h
HEAD_DIMS = (64, 128)  # the instantiated kernels
_DTYPES = (torch.float16, torch.bfloat16)

def _ops(device):
    """torch.ops.tfk (tfk._C) for CUDA tensors, torch.ops.tfk_sim (tfk._sim) for CPU tensors."""
    if device.type == "cuda":
        importlib.import_module("tfk._C")
        return torch.ops.tfk
    importlib.import_module("tfk._sim")
    return torch.ops.tfk_sim


def kernel_head_dim(d: int) -> int:
    """The instantiated head dim that holds ``d`` (<= 128)."""
    for h in HEAD_DIMS:
        if d <= h:
            return h
    raise ValueError(f"head dim {d} > {HEAD_DIMS[-1]}")


def _pad(x, hd):
    """x with its last dim zero-padded to hd, contiguous (zeros change no dot product)."""
    return x.contiguous() if x.shape[-1] == hd else F.pad(x, (0, hd - x.shape[-1]))


def _kernel_mask(mask, shape):
    """A (B, H, Lq, Lk) view the kernels read through strides: bool as uint8, else float32."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.expand(shape).view(torch.uint8)
    return mask.to(torch.float32).expand(shape)


_DROPOUT_ARGS = ("drop_key", "drop_threshold", "drop_scale")
_NO_DROPOUT = dict(zip(_DROPOUT_ARGS, drop.kernel_args(0, 0.0)))  # threshold 0: the kernels skip dropout


def _dropout_args(dropout_p, seed, window=drop.WHOLE):
    """The ops' drop_key, drop_threshold, drop_scale (tfk.dropout's hash), and
    drop_window: the call's place in the grid whose mask it draws."""
    if dropout_p == 0:
        return _NO_DROPOUT
    args = dict(zip(_DROPOUT_ARGS, drop.kernel_args(seed, dropout_p)))
    if window != drop.WHOLE:
        args["drop_window"] = [window.head_offset, window.heads or 0, window.q_offset, window.k_offset]
    return args


def _schedules(sp, backward):
    """The sub-pass's schedule tensors in the ops' argument order."""
    kv = (sp.kv_count, sp.kv_blocks, sp.kv_partial)
    return kv + (sp.q_count, sp.q_blocks, sp.q_partial) if backward else kv


def _subpass_options(sp):
    """The sub-pass's position predicates and dropout rounds, as the ops take them."""
    return dict(predicates=sp.predicates, drop_rounds=sp.rounds, drop_round=sp.round)


def _prepare(q, k, v, mask):
    """The kernels' head dim, the ops for q's device, the mask as they read
    it, and the tile counters the kernels fill (forward, dQ, dK/dV), None
    unless a tfk.backends.count_tiles() block is open."""
    hd = kernel_head_dim(max(q.shape[-1], v.shape[-1]))
    m = None if mask is None else _kernel_mask(mask, (*q.shape[:3], k.shape[2]))
    tiles = torch.zeros(3, dtype=torch.int32, device=q.device) if backends.counting_tiles() else None
    return hd, _ops(q.device), m, tiles


def _count(tiles):
    if tiles is not None:
        backends.add_kernel_tiles(tiles)


def attention_forward(q, k, v, plan, mask, scale, dropout_p=0.0, seed=0, window=drop.WHOLE):
    """out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32 over ``plan``
    (64 x 64 tiles). q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv);
    mask None, or bool/float broadcastable to (B, H, Lq, Lk); dropout on the
    probabilities with ``seed`` (tfk.dropout), drawing ``window`` of a larger call's mask."""
    hd, ops, m, tiles = _prepare(q, k, v, mask)
    dropout = _dropout_args(dropout_p, seed, window)

    def run(sp, q_l, k_l, v_l, o, l):
        ops.attention_fwd_(q_l, k_l, v_l, m, sp.q_index, sp.kv_index, *_schedules(sp, False),
                           sp.partial_masks.view(torch.uint8), scale, o, l, **dropout, tiles=tiles,
                           **_subpass_options(sp))

    out, lse = forward_over_plan(plan, _pad(q, hd), _pad(k, hd), _pad(v, hd), hd, run)
    _count(tiles)
    Dv = v.shape[-1]
    return (out if Dv == hd else out[..., :Dv].contiguous()), lse


def attention_backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p=0.0, seed=0, window=drop.WHOLE):
    """dq, dk, dv for ``attention_forward``'s result, given dout and lse's gradient dlse."""
    hd, ops, m, tiles = _prepare(q, k, v, mask)
    dropout = _dropout_args(dropout_p, seed, window)

    def run(sp, q_l, k_l, v_l, do_l, lse_l, delta_l, dq_l, dk_l, dv_l):
        ops.attention_bwd_(do_l, q_l, k_l, v_l, lse_l, delta_l, m, sp.q_index, sp.kv_index,
                           *_schedules(sp, True), sp.partial_masks.view(torch.uint8), scale, dq_l, dk_l, dv_l,
                           **dropout, tiles=tiles, **_subpass_options(sp))

    dq, dk, dv = backward_over_plan(plan, _pad(q, hd), _pad(k, hd), _pad(v, hd), _pad(dout, hd), lse,
                                    delta_of(out, dout, dlse), run)
    _count(tiles)
    D, Dv = q.shape[-1], v.shape[-1]
    return dq[..., :D].to(q.dtype), dk[..., :D].to(k.dtype), dv[..., :Dv].to(v.dtype)


# out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32; dq, dk, dv.
attention_fwd = attention_ops("cuda_attention", attention_forward, attention_backward)


class CudaBackend(Backend):
    """The CUDA kernels on a GPU (tfk._C)."""
    name = "cuda"
    # Below "triton" under "auto" until the kernels are measured on a GPU.
    priority = 15
    module = "_C"

    def reasons(self, call):
        q = call.q
        why = backends.cuda_kernel_reasons(self.module, q)
        if q.dtype not in _DTYPES:
            why.append(f"dtype {q.dtype} (supports float16, bfloat16)")
        return why + kernel_reasons(call, HEAD_DIMS[-1])

    def auto_for(self, call):
        return call.q.is_cuda

    def run(self, call: AttentionCall):
        q, k, v = call.q.contiguous(), call.k.contiguous(), call.v.contiguous()
        plan = op_plan(call.pattern, q.shape[2], k.shape[2], BLOCK, BLOCK, q.device)
        seed = drop.draw_seed() if call.dropout_p > 0 else 0
        return attention_fwd(q, k, v, call.attn_mask, plan, call.scale, call.dropout_p, seed)

    def block_functions(self, call):
        return (BLOCK, BLOCK), attention_forward, attention_backward


class CudaSimBackend(CudaBackend):
    """The same kernels on CPU tensors through the host-execution layer (tfk._sim)."""
    name = "cuda-sim"
    priority = 0
    module = "_sim"

    def auto_for(self, call):
        return False


register_backend(CudaBackend())
register_backend(CudaSimBackend())
