"""Backend "triton": the kernels of triton_kernels/attention.py as torch
custom ops (forward and backward, with fake implementations and autograd
registered), so ``torch.compile(fullgraph=True)`` traces through them.

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set
before tfk was imported (Triton's interpreter; the tests run this way).
Under "auto" it is taken for CUDA tensors only.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

from ... import dropout as drop
from ...backends import AttentionCall, Backend, register_backend
from ...plan import Plan, get_plan
from .engine import attention_ops, kernel_reasons, op_plan, run_modified

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_KERNELS = None


def _kernels():
    """tfk.triton_kernels.attention, imported on first use (it imports triton)."""
    global _KERNELS
    if _KERNELS is None:
        from ...triton_kernels import attention
        _KERNELS = attention
    return _KERNELS


def _plan(pattern, lq, lk, head_dim, dtype, device):
    return op_plan(pattern, lq, lk, *_kernels().tile_config(head_dim, dtype), device)


def _forward(q, k, v, plan, mask, scale, dropout_p, seed, window=drop.WHOLE, mods=None):
    return _kernels().attention_forward(q, k, v, plan, mask, scale, dropout_p, seed, window, mods=mods)


def _backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p, seed, window=drop.WHOLE, mods=None):
    """dq, dk, dv; with score modifiers (tfk.scores.Fused) also their
    gradients (d qv, d r, d bias), None where absent."""
    return _kernels().attention_backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p, seed, window,
                                         mods=mods)


# out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32; dq, dk, dv.
attention_fwd = attention_ops("triton_attention", _forward, _backward)


class TritonBackend(Backend):
    name = "triton"
    priority = 20
    # softcap and the distance modifiers (alibi, relative_bias, adaptive_span)
    # are fused; Transformer-XL is refused in reasons()
    # fused: a softcap and the distance bias (Transformer-XL runs on backend "torch")
    score_mods = frozenset({"softcap", "alibi", "relative_bias", "adaptive_span"})

    def reasons(self, call):
        why = device_reasons(call.q)
        if not _HAS_TRITON:
            return why
        if call.score_mod and max(call.q.shape[-1], call.v.shape[-1]) > _kernels().MODS_MAX_HEAD_DIM:
            why.append(f"score_mod with head dim > {_kernels().MODS_MAX_HEAD_DIM} (the dK/dV kernel would spill; "
                       "backend='torch' runs it)")
        return why + kernel_reasons(call, _kernels().MAX_HEAD_DIM)

    def auto_for(self, call):
        return call.q.is_cuda

    def run(self, call: AttentionCall):
        # gradients share their inputs' strides: contiguous keeps that simple
        q, k, v = call.q.contiguous(), call.k.contiguous(), call.v.contiguous()
        plan = _plan(call.pattern, q.shape[2], k.shape[2], max(q.shape[-1], v.shape[-1]), q.dtype, q.device)
        seed = drop.draw_seed() if call.dropout_p > 0 else 0
        if call.score_mod:
            if not isinstance(plan, Plan):   # under torch.compile op_plan gives an id: run_modified takes a Plan
                plan = get_plan(call.pattern, q.shape[2], k.shape[2],
                                *_kernels().tile_config(max(q.shape[-1], v.shape[-1]), q.dtype), q.device)
            return run_modified(dataclasses.replace(call, q=q, k=k, v=v), plan, _forward, _backward, seed)
        return attention_fwd(q, k, v, call.attn_mask, plan, call.scale, call.dropout_p, seed)

    def block_functions(self, call):
        tiles = _kernels().tile_config(max(call.q.shape[-1], call.v.shape[-1]), call.q.dtype)
        return tuple(tiles), _forward, _backward


def device_reasons(q):
    """Why the Triton kernels cannot take tensors like ``q`` (device, dtype):
    every family's Triton backends share these."""
    if not _HAS_TRITON:
        return ["triton is not installed"]
    why = []
    if not q.is_cuda and not (q.is_cpu and _INTERPRET):
        why.append(f"tensors on {q.device}: needs CUDA, or CPU tensors with TRITON_INTERPRET=1 "
                   "set before tfk is imported")
    if q.dtype not in _DTYPES:
        why.append(f"dtype {q.dtype} (supports float16, bfloat16, float32)")
    elif q.dtype == torch.bfloat16 and not q.is_cuda:
        why.append("bfloat16 arithmetic is wrong in Triton's interpreter: bf16 runs on GPU only")
    elif q.dtype == torch.float32 and q.is_cuda and not torch.backends.cuda.matmul.allow_tf32:
        why.append("float32 runs with tf32 dots on GPU: set torch.backends.cuda.matmul.allow_tf32 = True "
                   "to allow them, or use backend='torch' for exact float32")
    return why


register_backend(TritonBackend())
