"""Custom ops and autograd for the LSH-attention backends (as the linear family's
functions.py): ``lsh_ops(name, forward, backward)`` registers
``tfk::lsh_attention_{name}_fwd`` / ``_bwd`` with fake implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces through.

    forward(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed)
        -> (out (B, H, L, Dv) in qk's dtype, lse (B, H, L) float32 / float64)
    backward(dout, dlse, qk, value, order, key_padding_mask, <the same options>) -> (dqk, dvalue)

``order`` (B, H, n, L) int64 is the sorted layout (positions by bucket per
round); it and the mask get no gradient. Between forward and backward only the
inputs are kept: the backward recomputes the scores.
"""
from __future__ import annotations

from typing import Optional

import torch

_NON_TENSOR_ARGS = 7   # chunk_size, before, after, causal, scale, dropout_p, dropout_seed


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def lsh_ops(name, forward, backward):
    @torch.library.custom_op(f"tfk::lsh_attention_{name}_fwd", mutates_args=())
    def fwd(qk: torch.Tensor, value: torch.Tensor, order: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
            chunk_size: int, before: int, after: int, causal: bool, scale: float, dropout_p: float,
            dropout_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p,
                       dropout_seed)

    @fwd.register_fake
    def _(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed):
        B, H, L, _ = qk.shape
        return qk.new_empty(B, H, L, value.shape[-1]), qk.new_empty(B, H, L, dtype=_acc(qk.dtype))

    @torch.library.custom_op(f"tfk::lsh_attention_{name}_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], qk: torch.Tensor, value: torch.Tensor,
            order: torch.Tensor, key_padding_mask: Optional[torch.Tensor], chunk_size: int, before: int, after: int,
            causal: bool, scale: float, dropout_p: float, dropout_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return backward(dout, dlse, qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale,
                        dropout_p, dropout_seed)

    @bwd.register_fake
    def _(dout, dlse, qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p,
          dropout_seed):
        return torch.empty_like(qk), torch.empty_like(value)

    def setup_context(ctx, inputs, output):
        qk, value, order, mask, *args = inputs
        ctx.save_for_backward(qk, value, order, mask)
        ctx.args = tuple(args)

    def grad(ctx, dout, dlse):
        qk, value, order, mask = ctx.saved_tensors
        if dout is None:
            B, H, L, _ = qk.shape
            dout = qk.new_zeros(B, H, L, value.shape[-1])
        dqk, dvalue = bwd(dout.contiguous(), dlse, qk, value, order, mask, *ctx.args)
        return (dqk, dvalue, None, None) + (None,) * _NON_TENSOR_ARGS

    fwd.register_autograd(grad, setup_context=setup_context)

    def run(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed):
        return fwd(qk, value, order, key_padding_mask, int(chunk_size), int(before), int(after), bool(causal),
                   float(scale), float(dropout_p), int(dropout_seed))

    run.op = fwd
    run.backward_op = bwd
    return run
