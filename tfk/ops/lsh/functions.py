"""Custom ops and autograd for the LSH-attention backends (as the linear family's
functions.py): ``lsh_ops(name, forward, backward)`` registers
``tfk::lsh_attention_{name}_fwd`` / ``_bwd`` with fake implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces through.

    forward(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed)
        -> (out (B, H, L, Dv) in qk's dtype, lse (B, H, L) float32 / float64,
            lse_slots (B, H, n·L): each sorted slot's log-sum-exp within its chunk's window)
    backward(dout, dlse, qk, value, order, key_padding_mask, out, lse, lse_slots, <the same options>)
        -> (dqk, dvalue)

``order`` (B, H, n, L) int64 is the sorted layout (positions by bucket per
round); it and the mask get no gradient. Between forward and backward the
inputs, out, lse and lse_slots are kept (O(n·L) more): the backward
recomputes the scores, not the forward.
"""
from __future__ import annotations

from typing import Optional

import torch

_NON_TENSOR_ARGS = 7   # chunk_size, before, after, causal, scale, dropout_p, dropout_seed


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def lsh_ops(name, forward, backward, slot_lse=True):
    """``slot_lse=False``: the backend's backward takes the merged lse alone,
    and its third output is empty (B, H, 0)."""
    @torch.library.custom_op(f"tfk::lsh_attention_{name}_fwd", mutates_args=())
    def fwd(qk: torch.Tensor, value: torch.Tensor, order: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
            chunk_size: int, before: int, after: int, causal: bool, scale: float, dropout_p: float,
            dropout_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return forward(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p,
                       dropout_seed)

    @fwd.register_fake
    def _(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed):
        B, H, L, _ = qk.shape
        acc = _acc(qk.dtype)
        return (qk.new_empty(B, H, L, value.shape[-1]), qk.new_empty(B, H, L, dtype=acc),
                qk.new_empty(B, H, order.shape[2] * L if slot_lse else 0, dtype=acc))

    @torch.library.custom_op(f"tfk::lsh_attention_{name}_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], qk: torch.Tensor, value: torch.Tensor,
            order: torch.Tensor, key_padding_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
            lse_slots: torch.Tensor, chunk_size: int, before: int, after: int, causal: bool, scale: float,
            dropout_p: float, dropout_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return backward(dout, dlse, qk, value, order, key_padding_mask, out, lse, lse_slots, chunk_size, before,
                        after, causal, scale, dropout_p, dropout_seed)

    @bwd.register_fake
    def _(dout, dlse, qk, value, order, key_padding_mask, out, lse, lse_slots, chunk_size, before, after, causal,
          scale, dropout_p, dropout_seed):
        return torch.empty_like(qk), torch.empty_like(value)

    def setup_context(ctx, inputs, output):
        qk, value, order, mask, *args = inputs
        ctx.save_for_backward(qk, value, order, mask, *output)
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(output[2])

    def grad(ctx, dout, dlse, _dlse_slots):
        qk, value, order, mask, out, lse, lse_slots = ctx.saved_tensors
        if dout is None:
            B, H, L, _ = qk.shape
            dout = qk.new_zeros(B, H, L, value.shape[-1])
        dqk, dvalue = bwd(dout.contiguous(), dlse, qk, value, order, mask, out, lse, lse_slots, *ctx.args)
        return (dqk, dvalue, None, None) + (None,) * _NON_TENSOR_ARGS

    fwd.register_autograd(grad, setup_context=setup_context)

    def run(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed):
        """(out, lse)."""
        out, lse, _ = fwd(qk, value, order, key_padding_mask, int(chunk_size), int(before), int(after),
                          bool(causal), float(scale), float(dropout_p), int(dropout_seed))
        return out, lse

    run.op = fwd
    run.backward_op = bwd
    return run
