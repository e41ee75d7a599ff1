"""Backend "triton": the kernels of triton_kernels/attention.py as torch
custom ops (forward and backward, with fake implementations and autograd
registered), so ``torch.compile(fullgraph=True)`` traces through them.

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set
before tfk was imported (Triton's interpreter; the tests run this way).
Under "auto" it is taken for CUDA tensors only.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ... import dropout as drop
from ...backends import AttentionCall, Backend, register_backend
from ...plan import get_plan

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from ...triton_kernels import attention
    return attention


# Plans reach the custom ops as an int id (ops take tensors and scalars only):
# the id names get_plan's arguments, so the plan itself stays in its cache.
_PLAN_IDS: dict = {}
_PLAN_ARGS: list = []


@torch.compiler.assume_constant_result
def _plan_id(pattern, lq, lk, head_dim, dtype, device):
    """The id of the plan for this call; a constant to torch.compile."""
    block_m, block_n = _kernels().tile_config(head_dim, dtype)
    args = (pattern, lq, lk, block_m, block_n, str(device))
    key = (None if pattern is None else pattern.key,) + args[1:]
    if key not in _PLAN_IDS:
        _PLAN_IDS[key] = len(_PLAN_ARGS)
        _PLAN_ARGS.append(args)
    return _PLAN_IDS[key]


def _plan(plan_id):
    return get_plan(*_PLAN_ARGS[plan_id])


@torch.library.custom_op("tfk::triton_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  plan_id: int, scale: float, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32."""
    return _kernels().attention_forward(q, k, v, _plan(plan_id), mask, scale, dropout_p, seed)


@attention_fwd.register_fake
def _(q, k, v, mask, plan_id, scale, dropout_p, seed):
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=torch.float32)


@torch.library.custom_op("tfk::triton_attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor], plan_id: int, scale: float,
                  dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv."""
    return _kernels().attention_backward(dout, dlse, q, k, v, out, lse, _plan(plan_id), mask, scale,
                                         dropout_p, seed)


@attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, mask, plan_id, scale, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, plan_id, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.args = (plan_id, scale, dropout_p, seed)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = attention_bwd(dout, dlse, q, k, v, out, lse, mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class TritonBackend(Backend):
    name = "triton"
    priority = 20

    def reasons(self, call):
        why = []
        q = call.q
        if not _HAS_TRITON:
            return ["triton is not installed"]
        if not q.is_cuda and not (q.device.type == "cpu" and _INTERPRET):
            why.append(f"tensors on {q.device}: needs CUDA, or CPU tensors with TRITON_INTERPRET=1 "
                       "set before tfk is imported")
        if q.dtype not in _DTYPES:
            why.append(f"dtype {q.dtype} (supports float16, bfloat16, float32)")
        elif q.dtype == torch.bfloat16 and not q.is_cuda:
            why.append("bfloat16 arithmetic is wrong in Triton's interpreter: bf16 runs on GPU only")
        elif q.dtype == torch.float32 and q.is_cuda and not torch.backends.cuda.matmul.allow_tf32:
            why.append("float32 runs with tf32 dots on GPU: set torch.backends.cuda.matmul.allow_tf32 = True "
                       "to allow them, or use backend='torch' for exact float32")
        limit = _kernels().MAX_HEAD_DIM
        for name, d in (("head dim", q.shape[-1]), ("value head dim", call.v.shape[-1])):
            if d > limit:
                why.append(f"{name} {d} > {limit}")
        if call.attn_mask is not None and call.attn_mask.requires_grad and torch.is_grad_enabled():
            why.append("no gradient with respect to attn_mask (detach it, or use backend='reference')")
        return why

    def auto_for(self, call):
        return call.q.is_cuda

    def run(self, call: AttentionCall):
        # gradients share their inputs' strides: contiguous keeps that simple
        q, k, v = (t.contiguous() for t in (call.q, call.k, call.v))
        plan_id = _plan_id(call.pattern, q.shape[2], k.shape[2], max(q.shape[-1], v.shape[-1]), q.dtype, q.device)
        seed = drop.draw_seed() if call.dropout_p > 0 else 0
        return attention_fwd(q, k, v, call.attn_mask, plan_id, call.scale, call.dropout_p, seed)


register_backend(TritonBackend())
