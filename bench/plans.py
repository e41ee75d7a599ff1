"""Plan build time, in one run, on the CPU: tfk's plans from block-level
reasoning against the exhaustive compiler (the mask on every pair) and
FlexAttention's create_block_mask, for every built-in pattern and
Longformer's window | global, as the sequence grows.

    python -m bench.plans [--lengths 8192,32768,131072] [--repeat 3]
                          [--peers-up-to 8192] [--threads 1] [--clock cpu]

For each (pattern, L): the median build time of ``compile_plan`` (no cache),
the plan's tiles and partial tiles, the bytes its tensors hold, and the time
per thousand tiles (flat as L grows: time follows the tiles). Up to
``--peers-up-to`` the same plan is built by ``compile_plan_exhaustive``
(checked equal) and Flex's ``create_block_mask`` is timed (its BlockMask is
FlexAttention's plan), both with ratios to tfk's time. Times are this
process's CPU time (``--clock cpu``, the default: with one thread, the
build's own time, without the waits for a busy machine's cores) or wall time
(``--clock wall``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tfk import patterns as P
from tfk.plan import compile_plan, compile_plan_exhaustive

from . import table
from .table import Col

BLOCK = 64

# the clock every time is read from (``--clock``)
clock = time.process_time


def patterns(L):
    """The patterns of the table, by name, for length L."""
    n = -(-L // BLOCK)
    g = torch.Generator().manual_seed(0)
    return {
        "causal": P.causal(),
        "causal_bottom_right": P.causal(bottom_right=True),
        "window_256": P.sliding_window(256),
        "window_512_dilation_4": P.sliding_window(512, dilation=4),
        "global_16": P.global_tokens(16),
        "strided_256": P.strided(256),
        "fixed_128_8": P.fixed(128, 8),
        "bigbird_64_3_2_3": P.bigbird(64, 3, 2, 3),
        "block_layout_1pct": P.block_layout(torch.rand(n, n, generator=g) < 0.01, BLOCK),
        "window_256|global_16": P.sliding_window(256) | P.global_tokens(16),
        "window_256&causal": P.sliding_window(256, 256) & P.causal(),
    }


def plan_bytes(plan):
    total = 0
    for sp in plan.subpasses:
        for t in (sp.q_index, sp.kv_index, sp.kv_count, sp.kv_blocks, sp.kv_partial, sp.q_count, sp.q_blocks,
                  sp.q_partial, sp.partial_masks):
            total += 0 if t is None else t.numel() * t.element_size()
    return total


def _median_time(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = clock()
        out = fn()
        times.append(clock() - t0)
    return statistics.median(times), out


def _flex_time(pattern, L):
    from torch.nn.attention.flex_attention import create_block_mask
    mask_mod = lambda b, h, qi, ki: pattern.mask(h, qi, ki, L, L)  # noqa: E731
    t0 = clock()
    create_block_mask(mask_mod, None, pattern.heads, L, L, device="cpu", BLOCK_SIZE=BLOCK)
    return clock() - t0


def measure(name, pattern, L, repeat=3, peers=False) -> dict:
    t, plan = _median_time(lambda: compile_plan(pattern, L, L, BLOCK, BLOCK), repeat)
    row = {"pattern": name, "L": L, "ms": t * 1e3, "tiles": plan.num_tiles,
           "partial": sum(sp.num_partial for sp in plan.subpasses), "mb": plan_bytes(plan) / 2 ** 20,
           "us_per_ktile": t * 1e6 / max(plan.num_tiles / 1e3, 1e-3)}
    if peers:
        t0 = clock()
        want = compile_plan_exhaustive(pattern, L, L, BLOCK, BLOCK)
        row["exhaustive_x"] = (clock() - t0) / t
        row["same"] = _same(plan, want)
        try:
            row["flex_x"] = _flex_time(pattern, L) / t
        except Exception as e:  # noqa: BLE001 -- a pattern Flex cannot trace: say so in the table
            row["flex_x"] = None
            row["flex_error"] = f"{type(e).__name__}"
    return row


def _same(a, b):
    if len(a.subpasses) != len(b.subpasses):
        return False
    for x, y in zip(a.subpasses, b.subpasses):
        for f in ("kv_count", "kv_blocks", "kv_partial", "q_count", "q_blocks", "q_partial", "partial_masks"):
            if not torch.equal(getattr(x, f), getattr(y, f)):
                return False
    return True


# minimum widths: main() prints each row as it is measured, before the table
COLS = [Col("pattern", "<", 22), Col("L", ">", 6), Col("build ms", ">", 8), Col("tiles", ">", 8),
        Col("partial", ">", 7), Col("plan MB", ">", 7), Col("us/ktile", ">", 8), Col("exhaustive/tfk", ">", 14),
        Col("flex/tfk", ">", 8)]


def format_table(rows, header=True) -> str:
    lines = []
    for r in rows:
        ex = f"{r['exhaustive_x']:.0f}x" + ("" if r["same"] else " DIFFERS") if "exhaustive_x" in r else "-"
        fl = "-" if "flex_x" not in r else (f"{r['flex_x']:.0f}x" if r["flex_x"] else r.get("flex_error", "?"))
        lines.append([r["pattern"], str(r["L"]), f"{r['ms']:.1f}", str(r["tiles"]), str(r["partial"]),
                      f"{r['mb']:.2f}", f"{r['us_per_ktile']:.1f}", ex, fl])
    return table.format_table(COLS, lines, header)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.plans", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peers-up-to", type=int, default=8192,
                    help="build with the exhaustive compiler and Flex's create_block_mask up to this length")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady timings)")
    ap.add_argument("--only", default="", help="comma-separated pattern names")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="time by this process's CPU time (default) or by the wall clock")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    only = [s for s in args.only.split(",") if s]
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        for name, pattern in patterns(L).items():
            if only and name not in only:
                continue
            rows.append(measure(name, pattern, L, args.repeat, peers=L <= args.peers_up_to))
            print(format_table(rows[-1:], header=False), flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
