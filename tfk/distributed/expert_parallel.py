"""Expert parallelism for ``tfk.moe.experts``: each rank of a process group
holds E/P of the experts, tokens travel to their experts' ranks and back by
``all_to_all_single``.

    out = tfk.moe.experts(x, ids, weights, local_gate_up, local_down, group=ep_group)

Rank r of a group of P ranks holds experts [r*E_loc, (r+1)*E_loc) and its own
tokens x (T_r, H) with GLOBAL expert ids (T_r, k) in [0, E), E = P*E_loc (or
the sentinels E and -1: no expert). T_r may differ per rank, and be 0. The
result on rank r equals rank r's rows of the single-process op run on every
rank's tokens concatenated in rank order and every rank's experts
concatenated in rank order; so do the gradients (to rank r's hidden_states
and weights rows, and to rank r's slices of the expert weights).

One call:

    1. counts:   each rank sorts its valid (slot, token) assignments by
                 destination rank (slot-major within a destination) and
                 exchanges the counts per destination (all_to_all_single);
    2. metadata: per assignment, the local expert id (and, with a capacity,
                 the slot and the GLOBAL token index: offset of rank r = sum
                 of T of the lower ranks, all_gather'ed);  not differentiable;
    3. tokens:   the rows x[token] to their experts' ranks (all_to_all_single
                 with split sizes, differentiable: its backward is the same
                 exchange with the splits swapped);
    4. experts:  ``tfk.moe.experts`` on the received rows with local ids and
                 unit weights; with a capacity, the expert's rank keeps, per
                 expert, the first ``capacity`` received assignments in
                 (slot, global token) order (what the single-process op keeps
                 on the gathered inputs); the rest get the sentinel id and
                 contribute 0;
    5. back:     the expert outputs return by the reverse all_to_all;
    6. combine:  at the source, out[t] = sum over s = 0..k-1, in that order,
                 of weight[t, s] * y[t, s] (float32 sums, float64 for float64
                 inputs): deterministic.

The backward runs the exchanges in reverse (two all_to_all, no metadata): it
is a collective, every rank of the group must run it. Validation
(``tfk.moe.experts``) is per rank and before any exchange: a rank whose
inputs are rejected raises, and the others then wait in the first exchange
(a timeout of the process group, or of tfk.distributed.spawn, ends them).
Eager only: the split sizes are host lists (torch.compile breaks the graph).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["experts_parallel", "all_to_all", "exchange_plan"]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with split sizes; the backward is the
    exchange of the gradients with the splits swapped."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _a2a(x, output_splits, input_splits, group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _a2a(grad, input_splits, output_splits, ctx.group), None, None, None


def _a2a(x, output_splits, input_splits, group):
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=list(output_splits), input_split_sizes=list(input_splits),
                           group=group)
    return out


def all_to_all(x, output_splits, input_splits, group=None):
    """Differentiable ``all_to_all_single`` of the rows of x: input_splits[p]
    rows (in order) go to rank p, output_splits[p] come from rank p. The
    backward sends the gradients back with the splits swapped."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def exchange_plan(experts, num_local_experts, world_size):
    """Where rank-local assignments go. experts (T, k) global ids. Returns
    (sel, dest_counts): ``sel`` the flat slot-major indices s*T + t of the
    valid assignments sorted by destination rank (stable: slot-major within a
    destination), ``dest_counts`` (P,) int64 how many go to each rank."""
    T, k = experts.shape
    E = num_local_experts * world_size
    flat = experts.t().reshape(-1).long()                          # s*T + t
    valid = (flat >= 0) & (flat < E)
    dest = torch.where(valid, torch.div(flat, num_local_experts, rounding_mode="floor"), world_size)
    _, perm = torch.sort(dest, stable=True)
    dest_counts = torch.bincount(dest, minlength=world_size + 1)[:world_size]
    sel = perm[:int(valid.sum())]
    return sel, dest_counts


def kept_received(local_ids, slots, tokens, num_local_experts, capacity, k, total_tokens):
    """bool (R,): the received assignments an expert keeps: per local expert,
    the first ``capacity`` in (slot, global token) order."""
    R = local_ids.numel()
    if R == 0:
        return torch.ones(0, dtype=torch.bool, device=local_ids.device)
    key = (local_ids * k + slots) * max(total_tokens, 1) + tokens   # unique: a (token, slot) has one expert
    order = torch.argsort(key)
    sorted_ids = local_ids[order]
    counts = torch.bincount(local_ids, minlength=num_local_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(R, device=local_ids.device) - starts[sorted_ids]
    keep = torch.empty(R, dtype=torch.bool, device=local_ids.device)
    keep[order] = rank_in_expert < capacity
    return keep


def experts_parallel(hidden_states, experts, weights, gate_up_proj, down_proj, *, activation="silu",
                     capacity=None, backend="auto", group=None):
    """Expert-parallel ``tfk.moe.experts`` (see the module's doc). Inputs are
    assumed validated (``tfk.moe.experts(..., group=...)`` does it):
    hidden_states (T_r, H), experts (T_r, k) global ids, weights (T_r, k),
    gate_up_proj (E_loc, 2I, H) and down_proj (E_loc, H, I) this rank's
    experts. Returns (T_r, H) in hidden_states' dtype."""
    from ..ops.moe.api import experts as experts_op

    x = hidden_states
    P = dist.get_world_size(group)
    E_loc = gate_up_proj.shape[0]
    T, k = experts.shape
    H = x.shape[1]
    dev = x.device

    # 1. counts per destination
    sel, send_counts = exchange_plan(experts, E_loc, P)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()

    # 2. metadata: local expert id (+ slot, global token with a capacity)
    flat = experts.t().reshape(-1).long()
    gid = flat[sel]
    dest = torch.repeat_interleave(torch.arange(P, device=dev), send_counts)
    local_ids = gid - dest * E_loc
    tokens, slots = sel % max(T, 1), torch.div(sel, max(T, 1), rounding_mode="floor")
    if capacity is None:
        meta = local_ids[:, None]
    else:
        sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(P)]
        dist.all_gather(sizes, torch.tensor([T], dtype=torch.long, device=dev), group=group)
        sizes = torch.cat(sizes).tolist()
        offset = sum(sizes[:dist.get_rank(group)])
        meta = torch.stack([local_ids, slots, tokens + offset], 1)
    meta_in = _a2a(meta, recv, send, group)

    # 3. tokens to their experts' ranks
    rows = all_to_all(x.index_select(0, tokens), recv, send, group)

    # 4. the local experts
    ids_in = meta_in[:, 0]
    if capacity is not None:
        keep = kept_received(ids_in, meta_in[:, 1], meta_in[:, 2], E_loc, capacity, k, sum(sizes))
        ids_in = torch.where(keep, ids_in, E_loc)
    ones = torch.ones(rows.shape[0], 1, dtype=x.dtype, device=dev)
    y = experts_op(rows, ids_in[:, None], ones, gate_up_proj, down_proj, activation=activation,
                   capacity=None, backend=backend)

    # 5. back to the tokens' ranks
    y = all_to_all(y, send, recv, group)

    # 6. combine at the source, slots in order
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    per_slot = y.new_zeros(k * T, H).index_copy(0, sel, y).view(k, T, H)
    out = None
    for s in range(k):
        term = weights[:, s].to(acc)[:, None] * per_slot[s].to(acc)
        out = term if out is None else out + term
    if out is None:
        out = x.new_zeros(T, H, dtype=acc)
    return out.to(x.dtype)
