"""Custom ops and autograd for the MoE backends.

Each kernel-style backend gives plain forward and backward functions; this
file turns them into custom ops (``torch.library.custom_op`` with fake and
autograd registrations, so ``torch.compile(fullgraph=True)`` traces through
them) and, for eager calls, the same forward and backward as an
``autograd.Function`` without the custom-op dispatcher (as the attention
engine does). Between forward and backward only the inputs are kept.
"""
from __future__ import annotations

import torch


def experts_ops(name, forward, backward):
    """Ops ``tfk::moe_experts_{name}_fwd`` / ``_bwd``.

    forward(x, experts, weights, gate_up_proj, down_proj, activation, capacity) -> out (T, H)
    backward(dout, x, experts, weights, gate_up_proj, down_proj, activation, capacity)
        -> (dx, dweights, d gate_up_proj, d down_proj)
    capacity is an int, -1 for dropless. Returns run(...) with the forward's
    arguments; ``run.op`` is the forward op.
    """
    @torch.library.custom_op(f"tfk::moe_experts_{name}_fwd", mutates_args=())
    def fwd(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
            down_proj: torch.Tensor, activation: str, capacity: int) -> torch.Tensor:
        return forward(x, experts, weights, gate_up_proj, down_proj, activation, capacity)

    @fwd.register_fake
    def _(x, experts, weights, gate_up_proj, down_proj, activation, capacity):
        return x.new_empty(x.shape)

    @torch.library.custom_op(f"tfk::moe_experts_{name}_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
            gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activation: str,
            capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return backward(dout, x, experts, weights, gate_up_proj, down_proj, activation, capacity)

    @bwd.register_fake
    def _(dout, x, experts, weights, gate_up_proj, down_proj, activation, capacity):
        return (torch.empty_like(x), torch.empty_like(weights), torch.empty_like(gate_up_proj),
                torch.empty_like(down_proj))

    def setup_context(ctx, inputs, output):
        x, experts, weights, gate_up_proj, down_proj, activation, capacity = inputs
        ctx.save_for_backward(x, experts, weights, gate_up_proj, down_proj)
        ctx.args = (activation, capacity)

    def grad(ctx, dout):
        x, experts, weights, w1, w2 = ctx.saved_tensors
        dx, dw, d1, d2 = bwd(dout.contiguous(), x, experts, weights, w1, w2, *ctx.args)
        return dx, None, dw, d1, d2, None, None

    fwd.register_autograd(grad, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, experts, weights, gate_up_proj, down_proj, activation, capacity):
            ctx.save_for_backward(x, experts, weights, gate_up_proj, down_proj)
            ctx.args = (activation, capacity)
            return forward(x, experts, weights, gate_up_proj, down_proj, activation, capacity)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, dout):
            x, experts, weights, w1, w2 = ctx.saved_tensors
            dx, dw, d1, d2 = backward(dout.contiguous(), x, experts, weights, w1, w2, *ctx.args)
            return dx, None, dw, d1, d2, None, None

    def run(x, experts, weights, gate_up_proj, down_proj, activation, capacity):
        if torch.compiler.is_compiling():
            return fwd(x, experts, weights, gate_up_proj, down_proj, activation, capacity)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, gate_up_proj, down_proj)):
            return Eager.apply(x, experts, weights, gate_up_proj, down_proj, activation, capacity)
        return forward(x, experts, weights, gate_up_proj, down_proj, activation, capacity)

    run.op = fwd
    return run


def grouped_mm_ops(name, forward, backward):
    """Ops ``tfk::moe_grouped_mm_{name}_fwd`` / ``_bwd``: forward(a, b, offs) -> out,
    backward(dout, a, b, offs) -> (da, db)."""
    @torch.library.custom_op(f"tfk::moe_grouped_mm_{name}_fwd", mutates_args=())
    def fwd(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return forward(a, b, offs)

    @fwd.register_fake
    def _(a, b, offs):
        return a.new_empty(a.shape[0], b.shape[2])

    @torch.library.custom_op(f"tfk::moe_grouped_mm_{name}_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
            offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return backward(dout, a, b, offs)

    @bwd.register_fake
    def _(dout, a, b, offs):
        return torch.empty_like(a), torch.empty_like(b)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def grad(ctx, dout):
        a, b, offs = ctx.saved_tensors
        da, db = bwd(dout.contiguous(), a, b, offs)
        return da, db, None

    fwd.register_autograd(grad, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, offs):
            ctx.save_for_backward(a, b, offs)
            return forward(a, b, offs)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, dout):
            a, b, offs = ctx.saved_tensors
            da, db = backward(dout.contiguous(), a, b, offs)
            return da, db, None

    def run(a, b, offs):
        if torch.compiler.is_compiling():
            return fwd(a, b, offs)
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return Eager.apply(a, b, offs)
        return forward(a, b, offs)

    run.op = fwd
    return run


def route_ops(name, forward, backward):
    """Ops ``tfk::moe_route_{name}_fwd`` / ``_bwd``.

    forward(logits, bias, top_k, score, normalize, n_group, topk_group, scaling)
        -> (weights (T, k) float32, experts (T, k) int64); n_group 0: no group limit
    backward(dweights, logits, experts, score, normalize, scaling) -> d logits
    Only the weights are differentiable, w.r.t. the logits (the bias and the
    groups steer the choice only). Returns run(...) with the forward's
    arguments; ``run.op`` is the forward op.
    """
    @torch.library.custom_op(f"tfk::moe_route_{name}_fwd", mutates_args=())
    def fwd(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, score: str, normalize: bool, n_group: int,
            topk_group: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(logits, bias, top_k, score, normalize, n_group, topk_group, scaling)

    @fwd.register_fake
    def _(logits, bias, top_k, score, normalize, n_group, topk_group, scaling):
        T = logits.shape[0]
        return logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int64)

    @torch.library.custom_op(f"tfk::moe_route_{name}_bwd", mutates_args=())
    def bwd(dweights: torch.Tensor, logits: torch.Tensor, experts: torch.Tensor, score: str, normalize: bool,
            scaling: float) -> torch.Tensor:
        return backward(dweights, logits, experts, score, normalize, scaling)

    @bwd.register_fake
    def _(dweights, logits, experts, score, normalize, scaling):
        return torch.empty_like(logits)

    def setup_context(ctx, inputs, output):
        logits, _, _, score, normalize, _, _, scaling = inputs
        ctx.save_for_backward(logits, output[1])
        ctx.args = (score, normalize, scaling)
        ctx.mark_non_differentiable(output[1])

    def grad(ctx, dweights, _):
        logits, experts = ctx.saved_tensors
        return bwd(dweights.contiguous(), logits, experts, *ctx.args), None, None, None, None, None, None, None

    fwd.register_autograd(grad, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, bias, top_k, score, normalize, n_group, topk_group, scaling):
            weights, experts = forward(logits, bias, top_k, score, normalize, n_group, topk_group, scaling)
            ctx.save_for_backward(logits, experts)
            ctx.args = (score, normalize, scaling)
            ctx.mark_non_differentiable(experts)
            return weights, experts

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, dweights, _):
            logits, experts = ctx.saved_tensors
            return backward(dweights.contiguous(), logits, experts, *ctx.args), None, None, None, None, None, None, None

    def run(logits, bias, top_k, score, normalize, n_group, topk_group, scaling):
        args = (logits, bias, top_k, score, normalize, n_group, topk_group, scaling)
        if torch.compiler.is_compiling():
            return fwd(*args)
        if torch.is_grad_enabled() and logits.requires_grad:
            return Eager.apply(*args)
        return forward(*args)

    run.op = fwd
    return run
