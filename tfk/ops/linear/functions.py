"""Custom ops and autograd for the linear-attention backends.

A backend gives plain forward and backward functions (torch_backend.py's
signatures); ``linear_ops`` turns them into a custom-op pair
(``torch.library.custom_op`` with fake and autograd registrations, so
``torch.compile(fullgraph=True)`` traces through) and, for eager calls, the
same forward and backward as an ``autograd.Function`` without the custom-op
dispatcher (as tfk/ops/moe/functions.py does). Between forward and backward
only the inputs, out and den are kept.

    forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale)
        -> (out (B, H, L, Dv) in q's dtype, kv (B, Hkv, D, Dv), z (B, Hkv, D), den (B, H, L))
    backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den,
             feature_map, causal, normalize, eps, scale) -> (dq, dk, dv, dkv0, dz0)

kv, z and den are float32 (float64 for float64 inputs); den = phi_q . z + eps
per query, a by-product the backward reuses. feature_map is one of the named
maps (a callable has been applied before). dkv, dz (the gradients of the
returned state) may be None; dkv0, dz0 are returned even without an initial
state (the gradient a zero state would get), and dropped by the autograd rule.
"""
from __future__ import annotations

from typing import Optional

import torch

_NON_TENSOR_ARGS = 5   # feature_map, causal, normalize, eps, scale


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_ops(name, forward, backward):
    """Ops ``tfk::linear_attention_{name}_fwd`` / ``_bwd``. Returns run(...) with
    the forward's arguments, differentiable w.r.t. q, k, v, kv0 and z0;
    ``run.op`` is the forward op, ``run.backward_op`` the backward one."""
    @torch.library.custom_op(f"tfk::linear_attention_{name}_fwd", mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
            kv0: Optional[torch.Tensor], z0: Optional[torch.Tensor], feature_map: str, causal: bool,
            normalize: bool, eps: float, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale)

    @fwd.register_fake
    def _(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale):
        B, H, L, D = q.shape
        Hkv, Dv, acc = k.shape[1], v.shape[-1], _acc(q.dtype)
        return (q.new_empty(B, H, L, Dv), q.new_empty(B, Hkv, D, Dv, dtype=acc), q.new_empty(B, Hkv, D, dtype=acc),
                q.new_empty(B, H, L, dtype=acc))

    @torch.library.custom_op(f"tfk::linear_attention_{name}_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, dkv: Optional[torch.Tensor], dz: Optional[torch.Tensor], q: torch.Tensor,
            k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], kv0: Optional[torch.Tensor],
            z0: Optional[torch.Tensor], out: torch.Tensor, den: torch.Tensor, feature_map: str, causal: bool,
            normalize: bool, eps: float,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den, feature_map, causal,
                        normalize, eps, scale)

    @bwd.register_fake
    def _(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den, feature_map, causal, normalize, eps, scale):
        B, Hkv, D, Dv = k.shape[0], k.shape[1], q.shape[-1], v.shape[-1]
        sd = kv0.dtype if kv0 is not None else _acc(q.dtype)
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(B, Hkv, D, Dv, dtype=sd),
                q.new_empty(B, Hkv, D, dtype=sd))

    def setup_context(ctx, inputs, output):
        q, k, v, mask, kv0, z0, *args = inputs
        out, _, _, den = output
        ctx.save_for_backward(q, k, v, mask, kv0, z0, out, den)
        ctx.args = tuple(args)

    def grad(ctx, dout, dkv, dz, dden):
        q, k, v, mask, kv0, z0, out, den = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dkv0, dz0 = bwd(dout.contiguous(), dkv, dz, q, k, v, mask, kv0, z0, out, den, *ctx.args)
        return (dq, dk, dv, None, None if kv0 is None else dkv0, None if z0 is None else dz0) + \
            (None,) * _NON_TENSOR_ARGS

    fwd.register_autograd(grad, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask, kv0, z0, *args):
            out, kv, z, den = forward(q, k, v, mask, kv0, z0, *args)
            ctx.save_for_backward(q, k, v, mask, kv0, z0, out, den)
            ctx.args = args
            ctx.mark_non_differentiable(den)
            ctx.set_materialize_grads(False)   # an unused state's gradient stays None: no work for it
            return out, kv, z, den

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, dout, dkv, dz, dden):
            q, k, v, mask, kv0, z0, out, den = ctx.saved_tensors
            if dout is None:
                dout = torch.zeros_like(out)
            dq, dk, dv, dkv0, dz0 = backward(dout.contiguous(), dkv, dz, q, k, v, mask, kv0, z0, out, den,
                                             *ctx.args)
            return (dq, dk, dv, None, None if kv0 is None else dkv0, None if z0 is None else dz0) + \
                (None,) * _NON_TENSOR_ARGS

    def run(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale):
        args = (q, k, v, key_padding_mask, kv0, z0, feature_map, bool(causal), bool(normalize), float(eps),
                float(scale))
        if torch.compiler.is_compiling():
            return fwd(*args)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, kv0, z0)):
            return Eager.apply(*args)
        return forward(*args)

    run.op = fwd
    run.backward_op = bwd
    return run
