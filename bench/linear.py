"""Linear attention benchmark, CPU mode: tfk.linear_attention (backend "torch")
against torch SDPA and against the quadratic form, B=1, H=8, D=64, fp32.

    python -m bench.linear --threads 1          # every length, time and memory
    python -m bench.linear --lengths 1024 16384 --reps 3
    python -m bench.linear --no-memory --json out.json

Implementations, each causal and non-causal:
  "linear"     tfk.linear_attention(q, k, v, causal=..., feature_map="elu1",
               backend="torch"): the chunked form (causal) or the phi(K)^T V
               reduction (non-causal)
  "sdpa"       torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=...)
  "quadratic"  the same linear-attention formula in its quadratic form, float32:
               A = phi(q) phi(k)^T (lower-triangular when causal),
               out = A v / (A 1 + eps); (H, L, L) scores, H·L²·4 bytes each
SDPA runs up to --sdpa-max tokens (default 16384 causal, --sdpa-max-noncausal
8192 non-causal: its cost is quadratic, about a minute a step at 16384 on one
thread here), the quadratic form up to --quadratic-max (default 4096: several
(H, L, L) float32 matrices live at once in its backward, 2 GiB each at 8192);
longer rows say "skipped" and why.

Time: the median of --reps runs after one warm-up, implementations interleaved
run by run (the machine may be shared; pass --threads 1: two intra-op threads
contending with other processes make small ops wait on each other, by 100x at
worst). A step whose warm-up takes longer than --long seconds is timed by that
one run (its first-call overhead is negligible beside it). "fwd" runs under
no_grad; "fwd+bwd" is the forward with gradients to q, k and v, and the
backward of a fixed random dout.

Memory ("peak MiB", fwd+bwd): each (length, implementation, causal) runs once
in a fresh Python process, which resets its peak resident set
(/proc/self/clear_refs) just before the step (inputs and dout already built, no
warm-up) and reports the peak (VmHWM) minus the resident set at that moment, as
bench/moe.py does. Linear is measured at every length; SDPA and the quadratic
form up to --memory-max (default 4096) tokens.

Summary: the speed ratio SDPA / linear per length, the crossover (the shortest
length from which linear is faster), the scaling of linear (time at 8x the
tokens / time; the target is <= 10) and its peak memory per token, and the
issue's target: causal fwd+bwd at L = 16384 >= 20x faster than SDPA.

GPU mode: not yet; it comes with the Triton and CUDA kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import tfk

from . import peak

B, H, D = 1, 8, 64
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
IMPLS = ("linear", "sdpa", "quadratic")
MODES = ("fwd", "fwd+bwd")
EPS = 1e-6


def make_inputs(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
    return q, k, v, dout


def quadratic(q, k, v, causal):
    """The linear-attention formula as an (L, L) product, float32."""
    pq, pk = F.elu(q) + 1, F.elu(k) + 1
    A = pq @ pk.transpose(-1, -2)
    if causal:
        A = torch.tril(A)
    return (A @ v) / (A.sum(-1, keepdim=True) + EPS)


def impl_fn(name, causal):
    if name == "linear":
        return lambda q, k, v: tfk.linear_attention(q, k, v, causal=causal, feature_map="elu1", eps=EPS,
                                                    backend="torch")
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return lambda q, k, v: quadratic(q, k, v, causal)


def step(fn, q, k, v, dout, mode):
    if mode == "fwd":
        with torch.no_grad():
            fn(q, k, v)
        return
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    fn(*leaves).backward(dout)


def skip_reason(name, L, causal, args, memory=False):
    """Why (name, L) is not run, or None."""
    if name == "sdpa":
        limit = args.sdpa_max if causal else args.sdpa_max_noncausal
        if L > limit:
            return f"skipped: L > {limit} (quadratic time)"
    if name == "quadratic" and L > args.quadratic_max:
        return f"skipped: L > {args.quadratic_max} (each (H, L, L) score matrix takes H·L²·4 B: 2 GiB at 8192)"
    if memory and name != "linear" and L > args.memory_max:
        return f"not measured: L > {args.memory_max}"
    return None


def time_length(L, causal, args):
    """{(impl, mode): median seconds or a string saying why not}."""
    q, k, v, dout = make_inputs(L)
    results = {}
    for mode in MODES:
        live = {}
        for name in IMPLS:
            why = skip_reason(name, L, causal, args)
            if why:
                results[(name, mode)] = why
                continue
            fn = impl_fn(name, causal)
            t0 = time.perf_counter()
            step(fn, q, k, v, dout, mode)   # warm-up
            first = time.perf_counter() - t0
            if first > args.long:
                results[(name, mode)] = first
            else:
                live[name] = fn
        times = {name: [] for name in live}
        for _ in range(args.reps):
            for name, fn in live.items():
                t0 = time.perf_counter()
                step(fn, q, k, v, dout, mode)
                times[name].append(time.perf_counter() - t0)
        for name in live:
            results[(name, mode)] = statistics.median(times[name])
    return results


def _memory_child(L, name, causal):
    peak.child_threads()
    q, k, v, dout = make_inputs(int(L))
    fn = impl_fn(name, causal == "causal")
    peak.report_step_peak(lambda: step(fn, q, k, v, dout, "fwd+bwd"))


def memory(L, name, causal):
    """MiB one fwd+bwd step adds at its peak, measured in a fresh process (see the module doc)."""
    return peak.child_peak_mib("bench.linear", L, name, "causal" if causal else "noncausal")


def _fmt(v, unit):
    if isinstance(v, str):
        return v.split(":")[0]
    return f"{v * 1e3:9.1f} ms" if unit == "s" else f"{v:7.0f} MiB"


def summarize(rows, lengths):
    """Lines: crossover, scaling, memory per token and the 16384 target."""
    lines = []
    get = lambda causal, mode, L, key: next((r.get(key) for r in rows if r["causal"] == causal and r["mode"] == mode
                                             and r["L"] == L), None)
    for causal in (True, False):
        for mode in MODES:
            tag = f"{'causal' if causal else 'non-causal'} {mode}"
            wins = [L for L in lengths if isinstance(get(causal, mode, L, "sdpa_s"), float)]
            faster = [L for L in wins if get(causal, mode, L, "linear_s") < get(causal, mode, L, "sdpa_s")]
            if not wins:
                cross = "no SDPA rows"
            elif not faster:
                cross = f"linear slower than SDPA up to L = {wins[-1]}"
            else:
                # the shortest length from which linear stays faster
                first = next((L for L in wins if all(x in faster for x in wins if x >= L)), None)
                if first is None:
                    cross = f"linear faster at L = {faster} only, slower at L = {wins[-1]}"
                else:
                    cross = f"linear faster from L = {first}" + (
                        " (the shortest measured)" if first == wins[0] else
                        f" (slower at L = {max(x for x in wins if x < first)})")
            scal = []
            for L in lengths:
                a, b = get(causal, mode, L, "linear_s"), get(causal, mode, 8 * L, "linear_s")
                if isinstance(a, float) and isinstance(b, float):
                    scal.append(f"{L}->{8 * L}: {b / a:.1f}x")
            lines.append(f"{tag:22s} crossover: {cross}; linear time at 8x tokens: {', '.join(scal) or 'n/a'}")
    mems = [(L, get(True, "fwd+bwd", L, "linear_peak_mib")) for L in lengths]
    mems = [(L, m) for L, m in mems if isinstance(m, float)]
    if mems:
        lines.append("linear causal fwd+bwd peak memory per token: " +
                     ", ".join(f"L={L}: {m * 1024 / L:.1f} KiB" for L, m in mems if L >= 1024))
        ratios = [f"{L}->{8 * L}: {m8 / m:.1f}x" for L, m in mems for L8, m8 in mems if L8 == 8 * L and m > 0]
        if ratios:
            lines.append("linear causal fwd+bwd peak memory at 8x tokens: " + ", ".join(ratios))
    lin, sd = get(True, "fwd+bwd", 16384, "linear_s"), get(True, "fwd+bwd", 16384, "sdpa_s")
    if isinstance(lin, float) and isinstance(sd, float):
        lines.append(f"target: causal fwd+bwd at L = 16384: linear {lin * 1e3:.0f} ms, SDPA {sd * 1e3:.0f} ms: "
                     f"{sd / lin:.1f}x faster (target >= 20x: {'met' if sd / lin >= 20 else 'NOT met'})")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", nargs="*", type=int, default=list(LENGTHS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--long", type=float, default=3.0, help="a step whose warm-up takes longer is timed by it alone")
    ap.add_argument("--sdpa-max", type=int, default=16384)
    ap.add_argument("--sdpa-max-noncausal", type=int, default=8192)
    ap.add_argument("--quadratic-max", type=int, default=4096)
    ap.add_argument("--memory-max", type=int, default=4096)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--noncausal", action=argparse.BooleanOptionalAction, default=True,
                    help="also the non-causal rows (default on)")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for every run (default: torch's)")
    ap.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TFK_BENCH_THREADS"] = str(args.threads)
    if args.memory_child:
        return _memory_child(*args.memory_child)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={B} H={H} D={D} fp32; "
          f"median of {args.reps} (one run when a step takes > {args.long:g} s)")
    rows = []
    for causal in ((True, False) if args.noncausal else (True,)):
        for L in args.lengths:
            times = time_length(L, causal, args)
            for mode in MODES:
                row = dict(L=L, causal=causal, mode=mode)
                for name in IMPLS:
                    row[f"{name}_s"] = times[(name, mode)]
                    if not args.no_memory and mode == "fwd+bwd":
                        why = skip_reason(name, L, causal, args, memory=True)
                        row[f"{name}_peak_mib"] = why or memory(L, name, causal)
                lin, sd = row["linear_s"], row["sdpa_s"]
                row["sdpa_over_linear"] = sd / lin if isinstance(sd, float) and isinstance(lin, float) else None
                rows.append(row)
                line = f"{'causal' if causal else 'noncausal':9s} L={L:<6d} {mode:8s} " + "  ".join(
                    f"{name} {_fmt(row[f'{name}_s'], 's')}" + (f" / {_fmt(row[f'{name}_peak_mib'], 'm')}"
                                                               if f"{name}_peak_mib" in row else "")
                    for name in IMPLS)
                if row["sdpa_over_linear"]:
                    line += f"  | linear {row['sdpa_over_linear']:.1f}x SDPA's speed"
                print(line, flush=True)
    for reason in sorted({v for r in rows for k, v in r.items() if isinstance(v, str) and "skipped" in v}):
        print("note:", reason)
    for line in summarize(rows, args.lengths):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
