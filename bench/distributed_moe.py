"""Expert-parallel MoE benchmark: tfk.moe.experts(..., group=...) (tokens to
their experts' ranks by all_to_all) against an all-gather baseline, one
forward+backward step, P ranks.

    python -m bench.distributed_moe                      # CPU, gloo, 2 and 4 processes
    python -m bench.distributed_moe --world-sizes 2 --tokens 1024 --reps 3
    python -m bench.distributed_moe --gpu                # NCCL, one process per GPU

Every rank holds E/P experts and T tokens (--tokens, per rank) routed by
tfk.moe.route over all E experts (random logits, top --top-k), and runs one
training step: the forward, then the backward of a fixed random dout, with
gradients to hidden_states, the routing weights and the rank's expert
weights. Implementations:

  all_to_all: tfk.moe.experts(x, ids, weights, local_gate_up, local_down,
              group=...) (tfk/distributed/expert_parallel.py): counts, then
              the routed rows to their experts' ranks and back, each row
              sent once per (token, slot) whose expert lives elsewhere;
  all_gather: every rank all-gathers every rank's tokens, ids and weights,
              runs its local experts (tfk.moe.experts, the other experts'
              ids as sentinels) on every token, and the partial outputs are
              summed back to the tokens' ranks by reduce_scatter (backward:
              all_gather of dout, reduce_scatter of the input gradients).

Time: per rep, the ranks meet at a barrier, then each times its step (CUDA:
synchronised); a rep's time is the slowest rank's; the median of --reps
after --warmup steps, implementations interleaved rep by rep. "MiB sent":
the payload a rank hands to the other ranks in one step (its own block to
itself excluded), counted from the split sizes: all_to_all its rows both
ways, forward and backward, plus the counts and expert ids; all_gather its
block of tokens, ids and weights to each peer, and each peer's block of the
partial outputs and of the gradients (as a direct exchange would; gloo's and
NCCL's ring algorithms relay more). Reported as the largest over ranks.
"max |diff|": the largest difference between the two implementations'
outputs (they compute the same thing).

On a shared CPU pass --threads 1 (the default here): P processes with
several intra-op threads each contend for the cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

import tfk

from . import table

IMPLS = ("all_to_all", "all_gather")
CPU_DEFAULTS = dict(tokens=4096, hidden=256, intermediate=512, experts=16, top_k=2, dtype="fp32")
GPU_DEFAULTS = dict(tokens=16384, hidden=4096, intermediate=1408, experts=64, top_k=6, dtype="bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------- all-gather baseline

def _reduce_scatter(out, inp, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor   # the newer name first
    fn(out, inp, group=group)


def _all_gather(out, inp, group):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


class _AllGather(torch.autograd.Function):
    """(T, ...) on every rank -> (P*T, ...) in rank order; backward: the sum
    over ranks of the gradient's block of this rank (reduce_scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        P = dist.get_world_size(group)
        out = x.new_empty((P * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather(out, x.contiguous(), group)
        return out

    @staticmethod
    def backward(ctx, grad):
        P = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // P,) + tuple(grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), ctx.group)
        return out, None


class _ReduceScatter(torch.autograd.Function):
    """(P*T, ...) partial sums on every rank -> this rank's block of their sum;
    backward: all_gather of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        P = dist.get_world_size(group)
        out = x.new_empty((x.shape[0] // P,) + tuple(x.shape[1:]))
        _reduce_scatter(out, x.contiguous(), group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.group), None


def experts_all_gather(x, ids, weights, gate_up_proj, down_proj, group=None):
    """The baseline: equal T on every rank; ids global, this rank's experts
    [r*E_loc, (r+1)*E_loc)."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    E_loc = gate_up_proj.shape[0]
    xs = _AllGather.apply(x, group)
    ws = _AllGather.apply(weights, group)
    all_ids = ids.new_empty((P * ids.shape[0],) + tuple(ids.shape[1:]))
    _all_gather(all_ids, ids.contiguous(), group)
    local = all_ids - r * E_loc
    local = torch.where((local >= 0) & (local < E_loc), local, E_loc)
    partial = tfk.moe.experts(xs, local, ws.to(x.dtype), gate_up_proj, down_proj)
    return _ReduceScatter.apply(partial, group)


# ------------------------------------------------------------ bytes counted

def bytes_all_to_all(ids, E_loc, group=None):
    """What this rank sends to the others in one step of the all_to_all
    implementation (dropless), from the split sizes."""
    from tfk.distributed.expert_parallel import exchange_plan
    P, r = dist.get_world_size(group), dist.get_rank(group)
    _, send = exchange_plan(ids, E_loc, P)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    other_send = int(send.sum() - send[r])
    other_recv = int(recv.sum() - recv[r])
    return other_send, other_recv


def _step_bytes(impl, T, H, k, elt, P, other_send, other_recv):
    if impl == "all_to_all":
        counts = (P - 1) * 8
        meta = other_send * 8                              # the local expert id of each row
        rows = 2 * (other_send + other_recv) * H * elt     # rows there and back, forward and backward
        return counts + meta + rows
    gather = (P - 1) * T * (H * elt + k * 8 + k * 4)       # x, ids, float32 weights to each peer
    scatter = (P - 1) * T * H * elt                        # partial outputs, reduce_scatter
    backward = (P - 1) * T * H * elt * 2 + (P - 1) * T * k * 4   # dout all_gather; dx, dweights reduce_scatter
    return gather + scatter + backward


# ---------------------------------------------------------------- the ranks

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_rank(rank, world, cfg):
    """One rank: builds its inputs, times every implementation; returns
    {impl: {"times": [s per rep], "bytes": int}, "diff": float}."""
    if cfg["gpu"]:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    T, H, I, E, k = cfg["tokens"], cfg["hidden"], cfg["intermediate"], cfg["experts"], cfg["top_k"]
    if E % world:
        raise ValueError(f"--experts {E} must be divisible by the world size {world}")
    E_loc, dtype = E // world, _DTYPES[cfg["dtype"]]
    g = torch.Generator(device).manual_seed(1000 + rank)
    rn = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    x = rn(T, H).to(dtype)
    routing = tfk.moe.route(rn(T, E), k)
    ids, weights = routing.experts, routing.weights
    w1 = (rn(E_loc, 2 * I, H) / H ** 0.5).to(dtype)
    w2 = (rn(E_loc, H, I) / I ** 0.5).to(dtype)
    dout = rn(T, H).to(dtype)
    group = dist.group.WORLD
    fns = {
        "all_to_all": lambda x_, w_, a, b: tfk.moe.experts(x_, ids, w_, a, b, group=group),
        "all_gather": lambda x_, w_, a, b: experts_all_gather(x_, ids, w_, a, b, group=group),
    }
    leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w1, w2)]

    def step(name):
        for t in leaves:
            t.grad = None
        out = fns[name](*leaves)
        out.backward(dout)
        return out.detach()

    other_send, other_recv = bytes_all_to_all(ids, E_loc, group)
    elt = torch.empty((), dtype=dtype).element_size()
    res = {name: {"times": [], "bytes": _step_bytes(name, T, H, k, elt, world, other_send, other_recv)}
           for name in cfg["impls"]}
    outs = {}
    for _ in range(cfg["warmup"]):
        for name in cfg["impls"]:
            outs[name] = step(name)
    for _ in range(cfg["reps"]):
        for name in cfg["impls"]:
            dist.barrier(group)
            _sync(device)
            t0 = time.perf_counter()
            outs[name] = step(name)
            _sync(device)
            res[name]["times"].append(time.perf_counter() - t0)
    got = [outs[n] for n in cfg["impls"] if outs.get(n) is not None]
    res["diff"] = float((got[0].float() - got[1].float()).abs().max()) if len(got) == 2 and T else 0.0
    return res


# -------------------------------------------------------------------- main

COLS = [table.Col("P", ">", 2), table.Col("impl", "<", 10), table.Col("ms / step", ">", 10),
        table.Col("MiB sent / rank", ">", 15), table.Col("x all_gather", ">", 12), table.Col("max |diff|", ">", 10)]


def run(world_sizes, cfg, *, timeout=300.0, threads=1, log=print):
    """Spawns each world size once; returns one row per (P, impl)."""
    from tfk.distributed import spawn
    rows = []
    for P in world_sizes:
        per_rank = spawn(bench_rank, P, cfg, timeout=timeout, threads=threads,
                         backend="nccl" if cfg["gpu"] else "gloo")
        by_impl = {}
        for name in cfg["impls"]:
            slowest = [max(r[name]["times"][i] for r in per_rank) for i in range(cfg["reps"])]
            by_impl[name] = dict(P=P, impl=name, ms=1e3 * statistics.median(slowest),
                                 bytes=max(r[name]["bytes"] for r in per_rank),
                                 diff=max(r["diff"] for r in per_rank))
        base = by_impl.get("all_gather")
        for name in cfg["impls"]:
            row = by_impl[name]
            row["x_all_gather"] = base["ms"] / row["ms"] if base else None
            rows.append(row)
            log(table.format_table(COLS, [cells(row)], header=False))
    return rows


def cells(r):
    return [str(r["P"]), r["impl"], table.fmt(r["ms"], ".1f"), table.fmt(r["bytes"] / 2 ** 20, ".3f"),
            table.fmt(r["x_all_gather"], ".2f") + ("x" if r["x_all_gather"] else ""), table.fmt(r["diff"], ".2g")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="NCCL, one process per GPU, CUDA tensors (GPU defaults: "
                    + ", ".join(f"{k}={v}" for k, v in GPU_DEFAULTS.items()) + ")")
    ap.add_argument("--world-sizes", type=int, nargs="*", help="default: 2 4 on CPU, every GPU's count on --gpu")
    ap.add_argument("--tokens", type=int, help=f"per rank (CPU default {CPU_DEFAULTS['tokens']})")
    ap.add_argument("--hidden", type=int, help=f"H (CPU default {CPU_DEFAULTS['hidden']})")
    ap.add_argument("--intermediate", type=int, help=f"I (CPU default {CPU_DEFAULTS['intermediate']})")
    ap.add_argument("--experts", type=int, help=f"global E (CPU default {CPU_DEFAULTS['experts']})")
    ap.add_argument("--top-k", type=int, help=f"k (CPU default {CPU_DEFAULTS['top_k']})")
    ap.add_argument("--dtype", choices=list(_DTYPES), help="CPU default fp32, GPU bf16")
    ap.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--reps", type=int, default=3, help="timed steps (the median of the slowest rank's)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per world size before the ranks are killed")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    defaults = GPU_DEFAULTS if args.gpu else CPU_DEFAULTS
    cfg = {key: getattr(args, key) if getattr(args, key) is not None else v for key, v in defaults.items()}
    cfg.update(gpu=args.gpu, impls=list(args.impls), reps=args.reps, warmup=args.warmup)
    if args.gpu:
        if not torch.cuda.is_available():
            ap.error("--gpu: no GPU is present (torch.cuda.is_available() is False)")
        world_sizes = args.world_sizes or [torch.cuda.device_count()]
        if max(world_sizes) > torch.cuda.device_count():
            ap.error(f"--world-sizes {world_sizes}: only {torch.cuda.device_count()} GPUs")
    else:
        world_sizes = args.world_sizes or [2, 4]
    print(f"torch {torch.__version__}; {'NCCL, one GPU per rank' if args.gpu else 'gloo, CPU'}, "
          f"{args.threads} thread(s) per rank; T={cfg['tokens']} tokens per rank, H={cfg['hidden']}, "
          f"I={cfg['intermediate']}, E={cfg['experts']}, k={cfg['top_k']}, {cfg['dtype']}; one fwd+bwd step, "
          f"slowest rank, median of {args.reps}")
    print(table.format_table(COLS, []), flush=True)
    rows = run(world_sizes, cfg, timeout=args.timeout, threads=args.threads,
               log=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
