"""Host side of the fused-attention engine, shared by the kernel backends
("triton", "cuda", "cuda-sim"): sub-passes run in their token layouts and
merge by log-sum-exp, and the custom ops that make a backend's forward and
backward traceable by ``torch.compile``.

A backend supplies per-sub-pass kernels; this module does the rest the same
way for all of them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backends import new_output
from ... import scores
from ...plan import Plan, add_from_layout, from_layout, get_plan, plan_by_id, plan_id, to_layout
from .merge import merge_partials


def forward_over_plan(plan, q, k, v, dv, run):
    """out (B, H, Lq, dv) in q's dtype and lse (B, H, Lq) float32, natural log.

    q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, *). For each sub-pass,
    ``run(sp, q_l, k_l, v_l, o, l)`` writes every element of o (B, H, sp.lq, dv)
    and l (B, H, sp.lq) from the inputs gathered into the sub-pass's layout.
    o is in q's dtype when a single sub-pass covers every query in order, else
    float32 for the merge.
    """
    B, H, Lq = q.shape[:3]
    single = len(plan.subpasses) == 1 and plan.subpasses[0].q_index is None
    out = lse = None
    kv = KeyLayouts(k, v)
    for sp in plan.subpasses:
        q_l, (k_l, v_l) = to_layout(q, sp.q_index), kv.of(sp)
        o = new_output((B, H, sp.lq, dv), q.dtype if single else torch.float32, q.device)
        l = new_output((B, H, sp.lq), torch.float32, q.device)
        run(sp, q_l, k_l, v_l, o, l)
        o, l = from_layout(o, sp.q_index, Lq, 0.0), from_layout(l, sp.q_index, Lq, float("-inf"))
        out, lse = (o, l) if out is None else merge_partials(out, lse, o, l)
    if out is None:  # nothing allowed anywhere
        return (torch.zeros(B, H, Lq, dv, dtype=q.dtype, device=q.device),
                torch.full((B, H, Lq), float("-inf"), device=q.device))
    return (out if out.dtype == q.dtype else out.to(q.dtype)), lse


class KeyLayouts:
    """k, v gathered into each sub-pass's key layout, once per distinct index
    (LSH's hash rounds share one key layout: one gather, not one a round)."""

    def __init__(self, k, v):
        self.k, self.v, self.index, self.kv = k, v, None, None

    def of(self, sp):
        if self.kv is None or sp.kv_index is not self.index:
            self.index = sp.kv_index
            self.kv = to_layout(self.k, sp.kv_index), to_layout(self.v, sp.kv_index)
        return self.kv


def delta_of(out, dout, dlse):
    """rowsum(dout * out) - dlse, float32 (B, H, Lq): the backward's row term."""
    return (dout.float() * out.float()).sum(-1) - dlse.float()


def backward_over_plan(plan, q, k, v, dout, lse, delta, run):
    """dq, dk, dv in float32, shaped like q, k, v.

    For each sub-pass, ``run(sp, q_l, k_l, v_l, do_l, lse_l, delta_l, dq_l,
    dk_l, dv_l)`` writes every element of the float32 gradients dq_l, dk_l,
    dv_l (shaped like the gathered inputs) of that sub-pass's tiles, using the
    merged lse and delta; they add up at the original positions.
    """
    dq = dk = dv = None
    kv = KeyLayouts(k, v)
    for sp in plan.subpasses:
        q_l, do_l, lse_l, delta_l = (to_layout(x, sp.q_index) for x in (q, dout, lse, delta))
        k_l, v_l = kv.of(sp)
        dq_l, dk_l, dv_l = (new_output(x.shape, torch.float32, x.device) for x in (q_l, k_l, v_l))
        run(sp, q_l, k_l, v_l, do_l, lse_l, delta_l, dq_l, dk_l, dv_l)
        if dq is None:
            dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
        for full, part, index in ((dq, dq_l, sp.q_index), (dk, dk_l, sp.kv_index), (dv, dv_l, sp.kv_index)):
            add_from_layout(full, part, index)
    if dq is None:
        return tuple(torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
    return dq, dk, dv


def kernel_reasons(call, max_head_dim):
    """Why fused kernels with head dims up to ``max_head_dim`` cannot run
    ``call``, for what all kernel backends share."""
    why = []
    D, Dv = call.q.shape[-1], call.v.shape[-1]
    if D > max_head_dim:
        why.append(f"head dim {D} > {max_head_dim}")
    if Dv > max_head_dim:
        why.append(f"value head dim {Dv} > {max_head_dim}")
    if call.attn_mask is not None and call.attn_mask.requires_grad and torch.is_grad_enabled():
        why.append("no gradient with respect to attn_mask (detach it, or use backend='reference')")
    return why


def op_plan(pattern, lq, lk, block_q, block_k, device):
    """What a backend hands its op (``attention_ops``) for the plan of these
    arguments: under torch.compile the plan's id (custom ops take ints; a
    constant to the trace), elsewhere the plan itself (one cache lookup)."""
    if torch.compiler.is_compiling():
        return plan_id(pattern, lq, lk, block_q, block_k, device)
    return get_plan(pattern, lq, lk, block_q, block_k, device)


def attention_ops(name, forward, backward):
    """Custom ops ``tfk::{name}_fwd`` and ``tfk::{name}_bwd`` with fake
    implementations and autograd, so ``torch.compile(fullgraph=True)`` traces
    through a backend. Plans travel as ids (tfk.plan.plan_id).

    forward(q, k, v, plan, mask, scale, dropout_p, seed) -> (out, lse)
    backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p, seed) -> (dq, dk, dv)
    Returns run(q, k, v, mask, plan, scale, dropout_p, seed): the forward
    op under torch.compile, the same functions without the dispatcher
    elsewhere; ``run.op`` is the op. ``plan`` is a plan id, or outside
    torch.compile the plan itself (see ``op_plan``).
    """
    @torch.library.custom_op(f"tfk::{name}_fwd", mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], plan_id: int,
            scale: float, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(q, k, v, plan_by_id(plan_id), mask, scale, dropout_p, seed)

    @fwd.register_fake
    def _(q, k, v, mask, plan_id, scale, dropout_p, seed):
        B, H, Lq, _ = q.shape
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=lse_dtype)

    @torch.library.custom_op(f"tfk::{name}_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor], plan_id: int, scale: float,
            dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return backward(dout, dlse, q, k, v, out, lse, plan_by_id(plan_id), mask, scale, dropout_p, seed)

    @bwd.register_fake
    def _(dout, dlse, q, k, v, out, lse, mask, plan_id, scale, dropout_p, seed):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, mask, plan_id, scale, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.args = (plan_id, scale, dropout_p, seed)

    def grad(ctx, dout, dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if dlse is None:
            dlse = torch.zeros_like(lse)
        dq, dk, dv = bwd(dout, dlse, q, k, v, out, lse, mask, *ctx.args)
        return dq, dk, dv, None, None, None, None, None

    fwd.register_autograd(grad, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        """The ops' forward and backward without the custom-op dispatcher
        (tens of microseconds a call): what runs outside torch.compile."""

        @staticmethod
        def forward(ctx, q, k, v, mask, plan, scale, dropout_p, seed):
            out, lse = forward(q, k, v, plan, mask, scale, dropout_p, seed)
            ctx.save_for_backward(q, k, v, out, lse, mask)
            ctx.args = (plan, scale, dropout_p, seed)
            return out, lse

        @staticmethod
        def backward(ctx, dout, dlse):
            q, k, v, out, lse, mask = ctx.saved_tensors
            plan, scale, dropout_p, seed = ctx.args
            dq, dk, dv = backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p, seed)
            return dq, dk, dv, None, None, None, None, None

    def run(q, k, v, mask, plan, scale, dropout_p, seed):
        if torch.compiler.is_compiling():
            return fwd(q, k, v, mask, plan, scale, dropout_p, seed)
        if not isinstance(plan, Plan):
            plan = plan_by_id(plan)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return Eager.apply(q, k, v, mask, plan, scale, dropout_p, seed)
        return forward(q, k, v, plan, mask, scale, dropout_p, seed)

    run.op = fwd
    return run


class _Modified(torch.autograd.Function):
    """Attention with score modifiers (tfk.scores) on a backend's engine
    functions: gradients to q, k, v and to the modifiers' tensors (qv, r,
    the distance bias), from which autograd reaches their parameters."""

    @staticmethod
    def forward(ctx, q, k, v, qv, r, bias, mask, plan, scale, cap, dropout_p, seed, forward, backward):
        fused = scores.Fused(cap, bias, qv, r)
        out, lse = forward(q, k, v, plan, mask, scale, dropout_p, seed, mods=fused)
        ctx.save_for_backward(q, k, v, qv, r, bias, mask, out, lse)
        ctx.args = (plan, scale, cap, dropout_p, seed, backward)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, qv, r, bias, mask, out, lse = ctx.saved_tensors
        plan, scale, cap, dropout_p, seed, backward = ctx.args
        if dlse is None:
            dlse = torch.zeros_like(lse)
        fused = scores.Fused(cap, bias, qv, r)
        dq, dk, dv, (dqv, dr, dbias) = backward(dout.contiguous(), dlse, q, k, v, out, lse, plan, mask, scale,
                                                dropout_p, seed, mods=fused)
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        return dq, dk, dv, dqv, dr, dbias, None, None, None, None, None, None, None, None


def run_modified(call, plan, forward, backward, seed):
    """(out, lse) of ``call`` with its score modifiers on a backend's engine
    functions (forward/backward as ``Backend.block_functions`` gives them,
    taking ``mods=``). Transformer-XL's u and v enter as q + u (the content
    term) and qv = q + v (the position term), so autograd gives their
    gradients; the distance modifiers are summed into one bias vector."""
    mods = call.score_mod
    q, k, v = call.q, call.k, call.v
    B, H, Lq, D = q.shape
    qv = r = None
    if "transformer_xl" in mods:
        if any(sp.q_index is not None or sp.kv_index is not None for sp in plan.subpasses):
            raise ValueError("transformer_xl: the pattern's plan reorders tokens (a dilated window, a grid "
                             "pattern...); Transformer-XL's relative term needs one in natural order (dense, "
                             "causal, sliding windows, global tokens, block layouts)")
        xl = mods["transformer_xl"]
        qv, r = q + xl.v.view(1, H, 1, D), xl.r
        q = q + xl.u.view(1, H, 1, D)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    bias = scores.distance_bias(mods, Lq, k.shape[2], dtype, q.device)
    cap = mods["softcap"].cap if "softcap" in mods else 0.0
    return _Modified.apply(q, k, v, qv, r, bias, call.attn_mask, plan, call.scale, cap, call.dropout_p, seed,
                           forward, backward)


def sum_by_index(values, index, n, sort=None):
    """out[i] = the sum of values[index == i], out (n,), in a fixed order: on
    CPU ``index_add_`` (sequential); elsewhere (index_add_'s float atomics
    vary run to run) a stable sort by index, then a segmented sum of each
    index's run. ``sort`` forces the sorted way. The kernel backends add
    their per-tile shares of the distance bias's gradient with it."""
    if sort is None:
        sort = values.device.type != "cpu"
    if not sort:
        return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    order = torch.sort(index, stable=True).indices
    lengths = torch.bincount(index, minlength=n)
    return torch.segment_reduce(values[order], "sum", lengths=lengths, unsafe=True, initial=0.0)
