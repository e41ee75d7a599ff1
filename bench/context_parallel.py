"""Context-parallel attention benchmark: tfk.distributed.context_parallel_attention
(ring, ulysses) against an all-gather baseline, one forward+backward step, P ranks.

    python -m bench.context_parallel                     # CPU, gloo, 4 processes: window 256 at 32k, causal at 8k
    python -m bench.context_parallel --world-sizes 2 4 --cases causal:8192 --layouts zigzag contiguous
    python -m bench.context_parallel --gpu               # NCCL, one process per GPU

Every rank holds its shard (B, H, L/P, D) of query, key and value (random,
in the layout) and runs one training step: the forward, then the backward of
a fixed random dout. Implementations:

  ring:       context_parallel_attention(method="ring"): key/value rows go
              only to the ranks whose plans need them (a sliding window: the
              window's rows of the neighbours), the gradients come home;
  ulysses:    context_parallel_attention(method="ulysses"): all-to-all to
              head shards and back;
  all_gather: every rank all-gathers the whole key and value, then attends
              its queries to them (tfk.attention under the pattern shifted to
              its positions: the same tiles as the ring); the backward
              reduce-scatters their gradients.

Time: per rep, the ranks meet at a barrier, then each times its step; a rep's
time is the slowest rank's, the median of --reps after --warmup steps,
implementations interleaved rep by rep. "MiB sent": what a rank sends in one
step, the largest over ranks (ring: counted by tfk.distributed.
count_communication as it sends; all_gather: its key/value shard to each peer
forward and its gradient block to each peer backward, as a direct
reduce-scatter would; ulysses: (P-1)/P of query, key, value and out, each way,
forward and backward). "skipped": the fraction of the ring's steps in which a
rank neither sent nor received. "balance": the slowest rank's local attention
time over the fastest's (ring: compute only, waits excluded; with more ranks
than cores, contention blurs it) and "tiles": the same ratio of the tiles
each rank computed (exact).

On a shared CPU pass --threads 1 (the default here).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

import tfk
from tfk import patterns as P
from tfk.distributed import context_parallel_attention, count_communication
from tfk.distributed import layout as lay
from tfk.patterns import Shifted

from . import table
from .distributed_moe import _AllGather, _sync

IMPLS = ("ring", "ulysses", "all_gather")
CPU_DEFAULTS = dict(batch=1, heads=4, kv_heads=4, dim=32, dtype="fp32", cases=["window256:32768", "causal:8192"])
GPU_DEFAULTS = dict(batch=1, heads=32, kv_heads=8, dim=128, dtype="bf16", cases=["window4096:131072", "causal:131072"])
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pattern_of(name):
    """"causal", "window<w>" (a sliding window of w keys back), "dense"."""
    if name == "causal":
        return P.causal()
    if name.startswith("window"):
        return P.sliding_window(int(name[len("window"):]))
    if name == "dense":
        return None
    raise ValueError(f"unknown pattern {name!r}: causal, window<w> or dense")


def attention_all_gather(q, k, v, pattern, layout, group=None, backend="auto"):
    """The baseline: the whole key and value on every rank (all_gather;
    backward reduce_scatter), this rank's queries attend to them."""
    r, world = lay.group_info(group)
    n = q.shape[2]
    length = n * world
    natural = lay.natural_order(layout, world, n, q.device)
    k_all, v_all = (_AllGather.apply(x.movedim(2, 0).contiguous(), group).movedim(0, 2).index_select(2, natural)
                    for x in (k, v))
    outs = [tfk.attention(q[:, :, loc:loc + m], k_all, v_all, Shifted(pattern, g, 0, length), backend=backend)
            for g, loc, m in lay.runs(layout, r, world, n)]
    return torch.cat(outs, 2)


def bench_rank(rank, world, cfg):
    """One rank: every (case, layout, impl); returns {key: {"times", "bytes", "skipped", "compute", "tiles"}}."""
    if cfg["gpu"]:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dtype = _DTYPES[cfg["dtype"]]
    B, H, Hkv, D = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["dim"]
    elt = torch.empty((), dtype=dtype).element_size()
    results = {}
    for case in cfg["cases"]:
        name, length = case.split(":")
        length = int(length)
        pattern = pattern_of(name)
        n = length // world
        g = torch.Generator(device).manual_seed(100 + rank)
        q, k, v, dout = (torch.randn(B, h, n, D, generator=g, device=device).to(dtype) for h in (H, Hkv, Hkv, H))
        for layout in cfg["layouts"]:
            fns = {
                "ring": lambda a, b, c: context_parallel_attention(a, b, c, pattern, layout=layout),
                "ulysses": lambda a, b, c: context_parallel_attention(a, b, c, pattern, layout=layout,
                                                                      method="ulysses"),
                "all_gather": lambda a, b, c: attention_all_gather(a, b, c, pattern, layout),
            }
            impls = [i for i in cfg["impls"] if not (i == "ulysses" and (H % world or Hkv % world))]
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            shard_bytes = B * Hkv * n * 2 * D * elt
            static_bytes = {
                "all_gather": 2 * (world - 1) * shard_bytes,
                "ulysses": 2 * (world - 1) * B * n * D * elt * (2 * H + 2 * Hkv) // world,
            }
            res = {i: dict(times=[], compute=[], bytes=static_bytes.get(i, 0), skipped=0.0, tiles=0) for i in impls}

            def step(impl):
                for t in leaves:
                    t.grad = None
                with count_communication() as comm, tfk.backends.count_tiles() as tiles:
                    fns[impl](*leaves).backward(dout)
                return comm, sum(tiles.values())

            for _ in range(cfg["warmup"]):
                for impl in impls:
                    step(impl)
            for _ in range(cfg["reps"]):
                for impl in impls:
                    dist.barrier()
                    _sync(device)
                    t0 = time.perf_counter()
                    comm, tiles = step(impl)
                    _sync(device)
                    res[impl]["times"].append(time.perf_counter() - t0)
                    res[impl]["tiles"] = tiles
                    if impl == "ring":
                        res[impl]["bytes"] = comm["forward_bytes"] + comm["backward_bytes"]
                        res[impl]["skipped"] = comm["skipped_steps"] / max(comm["ring_steps"], 1)
                        res[impl]["compute"].append(comm["compute_seconds"])
            for impl in impls:
                results[case, layout, impl] = res[impl]
    return results


COLS = [table.Col("P", ">", 2), table.Col("case", "<", 18), table.Col("layout", "<", 10),
        table.Col("impl", "<", 10), table.Col("ms / step", ">", 10), table.Col("MiB sent / rank", ">", 15),
        table.Col("x all_gather", ">", 12), table.Col("bytes / all_gather", ">", 18), table.Col("skipped", ">", 7),
        table.Col("balance", ">", 7), table.Col("tiles", ">", 6)]


def run(world_sizes, cfg, *, timeout=600.0, threads=1, log=print):
    """Spawns each world size once; returns one row per (P, case, layout, impl)."""
    from tfk.distributed import spawn
    rows = []
    for world in world_sizes:
        per_rank = spawn(bench_rank, world, cfg, timeout=timeout, threads=threads,
                         backend="nccl" if cfg["gpu"] else "gloo")
        for key in per_rank[0]:
            case, layout, impl = key
            runs = [r[key] for r in per_rank]
            slowest = [max(r["times"][i] for r in runs) for i in range(cfg["reps"])]
            row = dict(P=world, case=case, layout=layout, impl=impl, ms=1e3 * statistics.median(slowest),
                       bytes=max(r["bytes"] for r in runs), skipped=min(r["skipped"] for r in runs) if impl == "ring"
                       else None)
            own = [statistics.median(r["compute"] if r["compute"] else r["times"]) for r in runs]
            row["balance"] = max(own) / max(min(own), 1e-12)
            row["tiles"] = max(r["tiles"] for r in runs) / max(min(r["tiles"] for r in runs), 1)
            rows.append(row)
        for row in rows:
            if row["P"] != world:
                continue
            base = next((b for b in rows if b["P"] == world and b["case"] == row["case"]
                         and b["layout"] == row["layout"] and b["impl"] == "all_gather"), None)
            row["x_all_gather"] = base["ms"] / row["ms"] if base else None
            row["bytes_ratio"] = row["bytes"] / base["bytes"] if base and base["bytes"] else None
            log(table.format_table(COLS, [cells(row)], header=False))
    return rows


def cells(r):
    def x(v, fmt=".2f", unit="x"):
        return table.fmt(v, fmt) + (unit if v is not None else "")
    return [str(r["P"]), r["case"], r["layout"], r["impl"], table.fmt(r["ms"], ".1f"),
            table.fmt(r["bytes"] / 2 ** 20, ".3f"), x(r["x_all_gather"]), x(r["bytes_ratio"], ".4f", ""),
            x(r["skipped"], ".2f", ""), x(r["balance"]), x(r["tiles"])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="NCCL, one process per GPU, CUDA tensors (GPU defaults: "
                    + ", ".join(f"{k}={v}" for k, v in GPU_DEFAULTS.items()) + ")")
    ap.add_argument("--world-sizes", type=int, nargs="*", help="default: 4 on CPU, every GPU's count on --gpu")
    ap.add_argument("--cases", nargs="*", help="pattern:length, pattern causal, window<w> or dense "
                    f"(CPU default {' '.join(CPU_DEFAULTS['cases'])})")
    ap.add_argument("--layouts", nargs="*", default=["zigzag", "contiguous"], choices=lay.LAYOUTS)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--dtype", choices=list(_DTYPES), help="CPU default fp32, GPU bf16")
    ap.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--reps", type=int, default=3, help="timed steps (the median of the slowest rank's)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per world size before the ranks are killed")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    defaults = GPU_DEFAULTS if args.gpu else CPU_DEFAULTS
    cfg = {key: getattr(args, key) if getattr(args, key) is not None else v for key, v in defaults.items()}
    cfg.update(gpu=args.gpu, impls=list(args.impls), layouts=list(args.layouts), reps=args.reps,
               warmup=args.warmup)
    if args.gpu:
        if not torch.cuda.is_available():
            ap.error("--gpu: no GPU is present (torch.cuda.is_available() is False)")
        world_sizes = args.world_sizes or [torch.cuda.device_count()]
    else:
        world_sizes = args.world_sizes or [4]
    print(f"torch {torch.__version__}; {'NCCL, one GPU per rank' if args.gpu else 'gloo, CPU'}, "
          f"{args.threads} thread(s) per rank; B={cfg['batch']}, H={cfg['heads']}, Hkv={cfg['kv_heads']}, "
          f"D={cfg['dim']}, {cfg['dtype']}; one fwd+bwd step, slowest rank, median of {args.reps}")
    print(table.format_table(COLS, []), flush=True)
    rows = run(world_sizes, cfg, timeout=args.timeout, threads=args.threads,
               log=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
