"""Score modifiers and grid patterns, CPU mode: tfk.attention (backend
"torch") against torch SDPA with the equivalent dense float mask and against
compiled FlexAttention with the equivalent score_mod / block mask, fp32, B=1.

    python -m bench.score_mods --threads 1                  # every shape
    python -m bench.score_mods --threads 1 --shapes nbhd_128 t5_4096
    python -m bench.score_mods --no-flex --json out.json

Shapes (SHAPES):
  alibi_8k      ALiBi (the paper's slopes, learnable), causal, L=8192, H=4, D=64
  t5_4096       T5's bucketed bias (32 buckets, max distance 128, learnable table), L=4096, H=4, D=64
  span_4096     adaptive span, spans 64, 256, 512, 1024 (z learnable, ramp 32), causal, L=4096, H=4, D=64
  xl_2k_mem2k   Transformer-XL: 2048 queries after a 2048-key memory (Lk=4096), causal over the memory
                (bottom-right), H=4, D=64, r, u, v learnable
  nbhd_64       7x7 neighbourhood (NATTEN) on a 64x64 grid, H=4, D=32
  nbhd_128      7x7 neighbourhood on a 128x128 grid (L=16384), H=4, D=32
  axial_128     axial attention along rows of a 128x128 grid, H=4, D=32
Implementations:
  "tfk"   tfk.attention(q, k, v, pattern, score_mod=..., backend="torch"); the modifiers'
          parameters get gradients in fwd+bwd (what training does).
  "sdpa"  torch's scaled_dot_product_attention with the modifier and pattern as one dense
          (1, H, Lq, Lk) float mask built once outside the step (constant: no gradient to the
          parameters, which favours it); Transformer-XL: its relative term as Dai et al. compute it
          (q+v against every r row, shifted, (B, H, Lq, Lk)) inside the step, as the mask.
  "flex"  torch.compile(flex_attention) with the score_mod (the same per-distance vector tfk's
          kernels read, indexed at kv - q) and a block mask for the pattern; CPU flex has no
          backward (fwd+bwd: n/a); Transformer-XL: n/a (its term reads q, not a function of indices).
Time: median of --reps after one warm-up, implementations interleaved run by run; a step
slower than --long seconds (default 30) is timed by its warm-up alone (FlexAttention compiles before its warm-up). Memory (MiB, fwd+bwd, tfk only):
the peak growth of live tensor memory in one step after a warm-up step, every allocation of
torch's CPU allocator traced by the profiler (bench/run.py's _TensorPeak: deterministic), for
t5_4096 with and without the bias (the target: within 1.2x).
Summary: the issue's targets: nbhd_128 fwd+bwd >= 10x faster than sdpa; t5_4096 peak with
the bias <= 1.2x the call without it.

GPU mode (--device cuda, the default with a GPU): the same shapes in bf16 (--dtypes), tfk on
backend "auto" (the one it chose in brackets), SDPA and compiled FlexAttention (forward and
backward), CUDA events (bench/peak.py's CudaTimer) and max_memory_allocated; TFLOP/s of the
allowed pairs (4 * pairs * D forward, x3.5 forward+backward) for every implementation.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import tfk
from tfk import patterns as P
from tfk import scores as S

from . import peak, table

MODES = ("fwd", "fwd+bwd")
IMPLS = ("tfk", "sdpa", "flex")


@dataclass(frozen=True)
class Shape:
    name: str
    Lq: int
    Lk: int
    H: int
    D: int
    kind: str                      # alibi, t5, span, xl, grid
    grid: tuple = ()
    grid_pattern: str = ""
    extra: dict = field(default_factory=dict, hash=False, compare=False)


SHAPES = {s.name: s for s in (
    Shape("alibi_8k", 8192, 8192, 4, 64, "alibi"),
    Shape("t5_4096", 4096, 4096, 4, 64, "t5"),
    Shape("span_4096", 4096, 4096, 4, 64, "span"),
    Shape("xl_2k_mem2k", 2048, 4096, 4, 64, "xl"),
    Shape("nbhd_64", 4096, 4096, 4, 32, "grid", (64, 64), "neighborhood"),
    Shape("nbhd_128", 16384, 16384, 4, 32, "grid", (128, 128), "neighborhood"),
    Shape("axial_128", 16384, 16384, 4, 32, "grid", (128, 128), "axial"),
)}


def make_inputs(s, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(1, s.H, s.Lq, s.D, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(1, s.H, s.Lk, s.D, generator=g).to(device, dtype) for _ in range(2))
    return q, k, v, dout


def params(s, grad, device="cpu", dtype=torch.float32):
    """The pattern, a builder of the score_mod (None for a grid pattern) and
    the modifier's parameters (learnable when ``grad``; Transformer-XL's in
    the inputs' dtype, the others float32)."""
    g = torch.Generator().manual_seed(1)

    def leaf(t, dt=torch.float32):
        return t.to(device, dt).requires_grad_(grad)
    if s.kind == "alibi":
        slopes = leaf(S.alibi_slopes(s.H))
        return P.causal(), lambda: S.alibi(slopes), (slopes,)
    if s.kind == "t5":
        table_ = leaf(0.5 * torch.randn(32, s.H, generator=g))
        return None, lambda: S.relative_bias(table_, 32, 128, True), (table_,)
    if s.kind == "span":
        z = leaf(torch.tensor([64.0, 256.0, 512.0, 1024.0])[:s.H] - 32.0)
        return P.causal(), lambda: S.adaptive_span(z, 32.0), (z,)
    if s.kind == "xl":
        r = leaf(0.1 * torch.randn(s.H, s.Lq + s.Lk - 1, s.D, generator=g), dtype)
        u, v = (leaf(0.1 * torch.randn(s.H, s.D, generator=g), dtype) for _ in range(2))
        return P.causal(bottom_right=True), lambda: S.transformer_xl(r, u, v), (r, u, v)
    if s.grid_pattern == "neighborhood":
        return P.neighborhood(s.grid, 7), None, ()
    return P.axial(s.grid, axis=1), None, ()


def dense_mask(s, device="cpu", dtype=torch.float32):
    """The modifier and pattern as one (1, H, Lq, Lk) float mask (not for xl)."""
    pattern, build, _ = params(s, False, device)
    allowed = None if pattern is None else pattern.dense_mask(s.Lq, s.Lk, device=device)
    if build is None:
        bias = torch.zeros(1, 1, s.Lq, s.Lk, device=device)
    else:
        mods = S.canonical(build())
        bias = S.distance_bias(mods, s.Lq, s.Lk, torch.float32, device)          # (H, Lq + Lk - 1)
        i, j = torch.arange(s.Lq, device=device).view(-1, 1), torch.arange(s.Lk, device=device).view(1, -1)
        bias = bias[:, j - i + s.Lq - 1].unsqueeze(0)
    bias = bias if allowed is None else bias.masked_fill(~allowed, -math.inf)
    return bias.to(dtype)


def impl_fn(name, s, args, device="cpu", dtype=torch.float32):
    """fn(q, k, v) -> out, or a string saying why not."""
    pattern, build, _ = params(s, True, device, dtype)
    backend = "torch" if device == "cpu" else "auto"
    if name == "tfk":
        return lambda q, k, v: tfk.attention(q, k, v, pattern, score_mod=None if build is None else build(),
                                             backend=backend)
    if name == "sdpa":
        if s.Lq * s.Lk * s.H > args.sdpa_max_scores:
            return f"skipped: {s.H} x {s.Lq} x {s.Lk} mask > --sdpa-max-scores"
        if s.kind == "xl":
            _, _, (r, u, v_) = params(s, False, device, dtype)
            causal = P.causal(bottom_right=True).dense_mask(s.Lq, s.Lk, device=device)
            i, j = torch.arange(s.Lq, device=device).view(-1, 1), torch.arange(s.Lk, device=device).view(1, -1)
            shift = (i - j + s.Lk - 1).expand(s.Lq, s.Lk)

            def xl(q, k, v):   # Dai et al.: (q + v) against every r row, then the relative shift
                pos = (q + v_.view(1, s.H, 1, s.D)) @ r.transpose(-1, -2) * s.D ** -0.5   # (B, H, Lq, Lq+Lk-1)
                bias = pos.gather(-1, shift.expand(*pos.shape[:2], -1, -1)).masked_fill(~causal, -math.inf)
                return F.scaled_dot_product_attention(q + u.view(1, s.H, 1, s.D), k, v, attn_mask=bias)
            return xl
        mask = dense_mask(s, device, dtype)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if name == "flex":
        if args.no_flex:
            return "skipped: --no-flex"
        if s.kind == "xl":
            return "n/a: the relative term reads q"
        return _flex_fn(s, device)
    raise ValueError(name)


def _flex_fn(s, device="cpu"):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    pattern, build, _ = params(s, False, device)
    block_mask = None
    if pattern is not None:
        block_mask = create_block_mask(lambda b, h, qi, ki: pattern.mask(h, qi, ki, s.Lq, s.Lk), None, None,
                                       s.Lq, s.Lk, device=device)
    score_mod = None
    if build is not None:
        bias = S.distance_bias(S.canonical(build()), s.Lq, s.Lk, torch.float32, device).contiguous()
        Lq1 = s.Lq - 1

        def score_mod(score, b, h, qi, ki):
            return score + bias[h, ki - qi + Lq1]
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)


def time_shape(s, args):
    q, k, v, dout = make_inputs(s)
    fns = {name: impl_fn(name, s, args) for name in args.impls}
    if callable(fns.get("flex")):   # compile outside the timing
        with torch.no_grad():
            fns["flex"](q, k, v)
    results = {}
    for mode in MODES:
        live = {n: f for n, f in fns.items()}
        if mode == "fwd+bwd" and not isinstance(live.get("flex"), str) and "flex" in live:
            live["flex"] = "n/a: no CPU backward"
        results.update(peak.time_interleaved(live, (q, k, v), dout, (mode,), args.reps, args.long))
    return results


def tensor_peak_mib(name, with_bias):
    """Peak growth of live tensor memory (MiB) in one tfk fwd+bwd step of
    shape ``name`` after a warm-up step: torch's CPU allocations traced by the
    profiler (bench.run._TensorPeak; deterministic)."""
    from .run import _TensorPeak
    s = SHAPES[name]
    q, k, v, dout = make_inputs(s)
    pattern, build, _ = params(s, True)
    mod = build() if with_bias and build is not None else None
    fn = lambda q_, k_, v_: tfk.attention(q_, k_, v_, pattern, score_mod=mod, backend="torch")  # noqa: E731
    peak.cpu_step(fn, (q, k, v), dout, "fwd+bwd")
    result = {}
    with _TensorPeak().measure(result, "peak"):
        peak.cpu_step(fn, (q, k, v), dout, "fwd+bwd")
    return None if result["peak"] is None else result["peak"] / 2 ** 20


def _cell(x):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x.split(":")[0]
    return f"{x * 1e3:.1f}"


def run_cpu(args):
    c = [table.Col("shape", "<", 12), table.Col("mode", "<", 7)] + \
        [table.Col(f"{n} ms", ">", 10) for n in args.impls] + \
        [table.Col("x sdpa", ">", 7), table.Col("x flex", ">", 7), table.Col("tiles", ">", 9)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32, B=1; median of {args.reps} "
          f"(one run when a step takes > {args.long:g} s); x sdpa / x flex: their time over tfk's")
    print(table.format_table(c, []), flush=True)
    rows = []
    for name in args.shapes:
        s = SHAPES[name]
        times = time_shape(s, args)
        pattern, build, _ = params(s, False)
        q, k, v, _ = make_inputs(s)
        with tfk.backends.count_tiles() as counts:
            with torch.no_grad():
                tfk.attention(q, k, v, pattern, score_mod=None if build is None else build(), backend="torch")
        dense_tiles = s.H * -(-s.Lq // 64) * -(-s.Lk // 64)
        for mode in MODES:
            row = dict(shape=name, mode=mode, tiles=counts["forward"], dense_tiles=dense_tiles)
            for n in args.impls:
                row[f"{n}_s"] = times[(n, mode)]
            t = row["tfk_s"]
            for peer in ("sdpa", "flex"):
                p = row.get(f"{peer}_s")
                row[f"{peer}_over_tfk"] = p / t if isinstance(p, float) and isinstance(t, float) else None
            rows.append(row)
            print(table.format_table(c, [[name, mode] + [_cell(row[f"{n}_s"]) for n in args.impls] +
                                         [table.fmt(row["sdpa_over_tfk"], ".1f"), table.fmt(row["flex_over_tfk"], ".1f"),
                                          f"{row['tiles']}/{dense_tiles}"]], header=False), flush=True)
    notes = sorted({v for r in rows for v in r.values() if isinstance(v, str) and ":" in v})
    for n in notes:
        print("note:", n)
    return rows


def summarize(rows, mem):
    lines = []
    r = next((r for r in rows if r["shape"] == "nbhd_128" and r["mode"] == "fwd+bwd"), None)
    if r is not None and isinstance(r.get("sdpa_over_tfk"), float):
        x = r["sdpa_over_tfk"]
        lines.append(f"target: 7x7 neighbourhood on 128x128, H=4, D=32, fwd+bwd: tfk {r['tfk_s'] * 1e3:.0f} ms, "
                     f"sdpa (dense mask) {r['sdpa_s'] * 1e3:.0f} ms: {x:.1f}x faster (target >= 10x: "
                     f"{'met' if x >= 10 else 'NOT met'})")
    if mem:
        a, b = mem.get("with"), mem.get("without")
        if isinstance(a, float) and isinstance(b, float):
            lines.append(f"target: T5 bias at L=4096 fwd+bwd peak: {a:.0f} MiB with, {b:.0f} MiB without: "
                         f"{a / b:.2f}x (target <= 1.2x: {'met' if a <= 1.2 * b else 'NOT met'})")
    return lines


def run_gpu(args):
    from .peak import CudaTimer, gpu_cells, gpu_cols, measure_impls
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    peers = [p for p in ("sdpa", "flex") if p in args.impls]
    c = gpu_cols(12, peers)
    print(table.format_table(c, []), flush=True)
    rows = []
    for name in args.shapes:
        s = SHAPES[name]
        pattern = params(s, False)[0]
        pairs = s.H * (s.Lq * s.Lk if pattern is None else int(pattern.dense_mask(s.Lq, s.Lk).sum()))
        for dt in args.dtypes:
            q, k, v, dout = make_inputs(s, device="cuda", dtype=dtypes[dt])

            def build(impl):
                fn = impl_fn(impl, s, args, "cuda", dtypes[dt])
                if isinstance(fn, str):
                    raise RuntimeError(fn)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]

                def fwd():
                    with torch.no_grad():
                        fn(q, k, v)

                def fwd_bwd():
                    fn(*leaves).backward(dout)
                return {"fwd": fwd, "fwd+bwd": fwd_bwd}, None

            def flops(impl, mode):
                return 4 * pairs * s.D * (1 if mode == "fwd" else 3.5)
            new = measure_impls(args.impls, dict(shape=name, dtype=dt), MODES, build, CudaTimer(), flops, peers,
                                "cuda")
            rows += new
            print(table.format_table(c, [gpu_cells(r, peers) for r in new], header=False), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--long", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--sdpa-max-scores", type=int, default=4 * 16384 * 16384)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=("bf16", "fp16"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "tfk" not in args.impls:
        args.impls = ["tfk"] + args.impls
    if args.device == "cuda":
        rows = run_gpu(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(rows=rows), f, indent=1, default=str)
        return rows
    rows = run_cpu(args)
    mem = {}
    if not args.no_memory and "t5_4096" in args.shapes:
        mem = {"with": tensor_peak_mib("t5_4096", True), "without": tensor_peak_mib("t5_4096", False)}
        print(f"peak MiB of live tensors, t5_4096 fwd+bwd, tfk: with the bias {table.fmt(mem['with'], '.1f')}, "
              f"without {table.fmt(mem['without'], '.1f')} (inputs excluded)")
    for line in summarize(rows, mem):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, memory=mem), f, indent=1, default=str)
    return rows


if __name__ == "__main__":
    main()
