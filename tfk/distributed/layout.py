"""How a sequence is split across the ranks of a group: ``shard`` and
``unshard``, and the runs of positions each rank holds.

"contiguous": rank r holds positions [r * n, (r + 1) * n) of L = P * n.
"zigzag": the sequence is cut in 2P chunks of c = L / 2P, and rank r holds
chunks r and 2P - 1 - r (in that order), so each rank has as much causal
work as any other.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def runs(layout: str, rank: int, world: int, n: int):
    """The runs of a rank's shard of ``n`` rows: ((global start, local start,
    length), ...), in local order."""
    if layout == "contiguous":
        return ((rank * n, 0, n),)
    c = n // 2
    return ((rank * c, 0, c), ((2 * world - 1 - rank) * c, c, c))


def positions(layout: str, rank: int, world: int, n: int, device=None) -> torch.Tensor:
    """int64 (n,): the global position of each row of a rank's shard."""
    return torch.cat([torch.arange(g, g + m, device=device) for g, _, m in runs(layout, rank, world, n)])


def shard_order(layout: str, world: int, n: int, device=None) -> torch.Tensor:
    """int64 (world * n,): the global positions of every rank's shard, end to end."""
    return torch.cat([positions(layout, r, world, n) for r in range(world)]).to(device)


def natural_order(layout: str, world: int, n: int, device=None) -> torch.Tensor:
    """int64 (world * n,): where each global position lies in the shards end
    to end (``shards.index_select(dim, natural_order(...))`` is the sequence)."""
    order = shard_order(layout, world, n)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return inverse.to(device)


def group_info(group):
    """(rank, world size) of this process in ``group`` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                           "first (or use tfk.distributed.spawn)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_length(length: int, world: int, layout: str, what="the sequence"):
    """The rows of one rank's shard of ``length``, or a ValueError."""
    parts = 2 * world if layout == "zigzag" else world
    if length % parts:
        raise ValueError(f"{what} has {length} positions: the {layout} layout over {world} ranks needs a "
                         f"multiple of {parts}")
    return length // world


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of ``x``, the whole sequence along ``dim`` (every
    rank passes the same ``x``): (..., L / P, ...), a copy."""
    check_layout(layout)
    rank, world = group_info(group)
    dim = dim % x.dim()
    n = shard_length(x.shape[dim], world, layout, what=f"dim {dim} of x")
    return x.index_select(dim, positions(layout, rank, world, n, device=x.device))


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, layout, dim):
        rank, world = group_info(group)
        ctx.group, ctx.layout, ctx.dim = group, layout, dim
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim).index_select(dim, natural_order(layout, world, x.shape[dim], x.device))

    @staticmethod
    def backward(ctx, grad):
        # every rank's use of the whole sequence reaches every shard: sum, then take ours
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return shard(grad, ctx.group, ctx.layout, ctx.dim), None, None, None


def unshard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` along ``dim``
    (all-gather): the inverse of ``shard``. Differentiable: the gradient of
    a shard sums what every rank's result received."""
    check_layout(layout)
    group_info(group)
    return _Unshard.apply(x, group, layout, dim % x.dim())
