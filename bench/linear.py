"""Linear attention benchmark. CPU mode (the default without a GPU):
tfk.linear_attention (backend "torch") against torch SDPA and against the
quadratic form, B=1, H=8, D=64, fp32; GPU mode: tfk's backends against SDPA
and fla, TFLOP/s (below).

    python -m bench.linear --threads 1          # every length, time and memory
    python -m bench.linear --lengths 1024 16384 --reps 3
    python -m bench.linear --no-memory --json out.json
    python -m bench.linear --device cuda --shapes c_L16384_d64 --dtypes bf16

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

GPU mode (``--device cuda``, the default when a GPU is present; see run_gpu):
GPU_SHAPES, 65536 tokens a batch (B = 65536 // L) at L = 1024...65536,
H = 16, D = Dv = 64, causal and not; D = 128 and GQA (H = 32, Hkv = 8) at
4096 and 16384; a decode step (L = 1 on an initial state, B = 64, forward
only); in bf16, fp16 and fp32. Implementations, one at a time: "tfk"
(backend "auto", the one it chose in brackets), "tfk_triton", "tfk_cuda",
"sdpa" (torch's, same q, k, v; not for decode: no state) and "fla"
(flash-linear-attention's chunk_linear_attn when importable: causal only, it
has no non-causal kernel; (B, L, H, D) inputs and K/V repeated to H heads
before the timed call, elu1 applied in the step as tfk's users get it fused).
Time: CUDA events, median of --reps after --warmup calls. TFLOP/s: the state
form's flops for the linear implementations, 2·B·Hkv·L·D·(Dv+1) (phi(K)^T V')
+ 2·B·H·L·D·(Dv+1) (phi(Q) S) per forward, x3 forward+backward; SDPA's own,
4·B·H·L²·D per forward (half causal), x3.5 forward+backward. Peak MiB:
torch.cuda.max_memory_allocated growth in one step. "x sdpa" and "x fla":
their time over this row's (same shape, dtype, mode).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tfk

from . import peak, table
from .peak import CudaTimer

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
    fns = {name: skip_reason(name, L, causal, args) or impl_fn(name, causal) for name in IMPLS}
    return peak.time_interleaved(fns, (q, k, v), dout, MODES, args.reps, args.long)


def _memory_child(L, name, causal):
    peak.child_threads()
    q, k, v, dout = make_inputs(int(L))
    fn = impl_fn(name, causal == "causal")
    peak.report_step_peak(lambda: peak.cpu_step(fn, (q, k, v), dout, "fwd+bwd"))


def memory(L, name, causal):
    """MiB one fwd+bwd step adds at its peak, measured in a fresh process (see the module doc)."""
    return peak.child_peak_mib("bench.linear", L, name, "causal" if causal else "noncausal")


def _cell(v, unit):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v.split(":")[0]
    return f"{v * 1e3:.1f}" if unit == "ms" else f"{v:.0f}"


def cpu_cols(memory_on):
    cols = [table.Col("pattern", "<", 9), table.Col("L", ">", 6), table.Col("mode", "<", 7)]
    for name in IMPLS:
        cols.append(table.Col(f"{name} ms", ">", 12))
        if memory_on:
            cols.append(table.Col(f"{name} MiB", ">", 11))
    return cols + [table.Col("x sdpa", ">", 6)]


def cpu_cells(row, memory_on):
    cells = ["causal" if row["causal"] else "noncausal", str(row["L"]), row["mode"]]
    for name in IMPLS:
        cells.append(_cell(row[f"{name}_s"], "ms"))
        if memory_on:
            cells.append(_cell(row.get(f"{name}_peak_mib"), "MiB"))
    return cells + [table.fmt(row["sdpa_over_linear"], ".1f")]


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


def run_cpu(args):
    """CPU mode: one row per (pattern, length, mode), implementations side by side."""
    memory_on = not args.no_memory
    cols = cpu_cols(memory_on)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={B} H={H} D={D} fp32; "
          f"median of {args.reps} (one run when a step takes > {args.long:g} s)")
    print("ms: time; x sdpa: SDPA's time / linear's"
          + ("; MiB: what one fwd+bwd step adds to a fresh process at its peak" if memory_on else ""))
    print(table.format_table(cols, []), flush=True)
    rows = []
    for causal in ((True, False) if args.noncausal else (True,)):
        for L in args.lengths:
            times = time_length(L, causal, args)
            for mode in MODES:
                row = dict(L=L, causal=causal, mode=mode)
                for name in IMPLS:
                    row[f"{name}_s"] = times[(name, mode)]
                    if memory_on and mode == "fwd+bwd":
                        why = skip_reason(name, L, causal, args, memory=True)
                        row[f"{name}_peak_mib"] = why or memory(L, name, causal)
                lin, sd = row["linear_s"], row["sdpa_s"]
                row["sdpa_over_linear"] = sd / lin if isinstance(sd, float) and isinstance(lin, float) else None
                rows.append(row)
                print(table.format_table(cols, [cpu_cells(row, memory_on)], header=False), flush=True)
    for reason in sorted({v for r in rows for k, v in r.items() if isinstance(v, str) and "skipped" in v}):
        print("note:", reason)
    for line in summarize(rows, args.lengths):
        print(line)
    return rows


# ---------------------------------------------------------------------------
# GPU mode
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GPUShape:
    name: str
    B: int
    H: int
    Hkv: int
    L: int
    D: int
    Dv: int
    causal: bool
    state: bool = False                 # an initial state (a decode step)
    modes: tuple = MODES


def _shapes():
    for L in (1024, 4096, 16384, 65536):
        for causal in (True, False):
            yield GPUShape(f"{'c' if causal else 'nc'}_L{L}_d64", 65536 // L, 16, 16, L, 64, 64, causal)
    for L in (4096, 16384):
        yield GPUShape(f"c_L{L}_d128", 65536 // L, 16, 16, L, 128, 128, True)
        yield GPUShape(f"c_L{L}_d128_gqa", 65536 // L, 32, 8, L, 128, 128, True)
    yield GPUShape("decode_d128_gqa", 64, 32, 8, 1, 128, 128, True, state=True, modes=("fwd",))


GPU_SHAPES = {s.name: s for s in _shapes()}
GPU_DTYPES = ("bf16", "fp16", "fp32")
GPU_IMPLS = ("tfk", "tfk_triton", "tfk_cuda", "sdpa", "fla")
TFK_BACKENDS = {"tfk": "auto", "tfk_triton": "triton", "tfk_cuda": "cuda"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gpu_flops(s: GPUShape, impl, mode):
    """The flops a row's TFLOP/s counts (module doc): the state form for the
    linear implementations, SDPA's score and value products for "sdpa"."""
    if impl == "sdpa":
        fwd = 4 * s.B * s.H * s.L * s.L * s.D // (2 if s.causal else 1)
        return fwd if mode == "fwd" else fwd * 7 // 2
    fwd = 2 * s.B * (s.Hkv + s.H) * s.L * s.D * (s.Dv + 1)
    return fwd if mode == "fwd" else 3 * fwd


def make_gpu_inputs(s: GPUShape, device, dtype, seed=0):
    """q, k, v, dout (q's layout, (B, H, L, Dv)) and the initial state or None."""
    g = torch.Generator(device).manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    q, k, v = r(s.B, s.H, s.L, s.D), r(s.B, s.Hkv, s.L, s.D), r(s.B, s.Hkv, s.L, s.Dv)
    dout = r(s.B, s.H, s.L, s.Dv)
    state = None
    if s.state:   # as a prefix of 4096 elu1 keys would leave it
        state = (torch.randn(s.B, s.Hkv, s.D, s.Dv, generator=g, device=device),
                 torch.rand(s.B, s.Hkv, s.D, generator=g, device=device) * 4096)
    return q, k, v, dout, state


def _impl(name, s: GPUShape, q, k, v, state):
    """fn(q, k, v) -> out for implementation ``name`` and the (q, k, v) it takes
    (fla: its own layout, made here, outside the timed call), or raises why not."""
    scale = s.D ** -0.5
    if name in TFK_BACKENDS:
        backend = TFK_BACKENDS[name]

        def fn(q, k, v):
            out = tfk.linear_attention(q, k, v, causal=s.causal, feature_map="elu1", scale=scale,
                                       initial_state=state, return_state=state is not None, backend=backend)
            return out[0] if state is not None else out
        return fn, (q, k, v)
    if name == "sdpa":
        if s.state:
            raise ValueError("SDPA carries no state (a decode step needs the whole KV cache)")
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, scale=scale,
                                                                enable_gqa=s.H != s.Hkv)), (q, k, v)
    if name == "fla":
        if not s.causal:
            raise ValueError("fla has no non-causal kernel")
        from fla.ops.linear_attn import chunk_linear_attn
        G = s.H // s.Hkv
        lay = lambda x, rep=1: x.repeat_interleave(rep, 1).transpose(1, 2).contiguous()  # noqa: E731
        s0 = None if state is None else state[0].repeat_interleave(G, 1).contiguous()

        def fn(q, k, v):
            o, _ = chunk_linear_attn(F.elu(q) + 1, F.elu(k) + 1, v, scale=scale, initial_state=s0,
                                     output_final_state=state is not None, normalize=True)
            return o
        return fn, (lay(q), lay(k, G), lay(v, G))
    raise ValueError(f"unknown implementation {name!r}")


def build_gpu_steps(name, s: GPUShape, inputs):
    """{mode: step()} for implementation ``name`` on make_gpu_inputs' tuple, and
    the tfk backend that ran (or None)."""
    q, k, v, dout, state = inputs
    fn, (qi, ki, vi) = _impl(name, s, q, k, v, state)
    douti = dout if qi is q else dout.transpose(1, 2).contiguous()
    chosen = None
    with tfk.backends.record_choices() as ran, torch.no_grad():
        fn(qi, ki, vi)
    if name in TFK_BACKENDS:
        chosen = ran[0] if ran else None

    def run(mode):
        if mode == "fwd":
            with torch.no_grad():
                fn(qi, ki, vi)
            return
        leaves = [t.detach().requires_grad_() for t in (qi, ki, vi)]
        fn(*leaves).backward(douti)
    return {mode: (lambda mode=mode: run(mode)) for mode in s.modes}, chosen


def run_gpu(shapes, dtypes=GPU_DTYPES, impls=GPU_IMPLS, *, device="cuda", timer=None, log=None):
    """Rows, one per (shape, dtype, mode, implementation): ms, TFLOP/s, peak
    MiB, and SDPA's and fla's time over this one's ("x_sdpa", "x_fla").
    ``timer``: CudaTimer() by default (a stand-in needs its time(fn) and
    peak_bytes(fn)); ``log(row)`` is called as each (shape, dtype) is done."""
    timer = timer or CudaTimer()
    rows = []
    for s in shapes:
        for dt in dtypes:
            inputs = make_gpu_inputs(s, device, _DTYPES[dt])
            base = dict(shape=s.name, B=s.B, H=s.H, Hkv=s.Hkv, L=s.L, D=s.D, Dv=s.Dv, causal=s.causal, dtype=dt)
            done = peak.measure_impls(impls, base, s.modes, lambda name: build_gpu_steps(name, s, inputs), timer,
                                      lambda name, mode: gpu_flops(s, name, mode), PEERS, device)
            for r in done:
                if log:
                    log(r)
            rows += done
    return rows


PEERS = ("sdpa", "fla")
GPU_COLS = peak.gpu_cols(17, PEERS)


def gpu_cells(r):
    return peak.gpu_cells(r, PEERS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present")
    ap.add_argument("--lengths", nargs="*", type=int, default=list(LENGTHS), help="CPU mode")
    ap.add_argument("--shapes", nargs="*", help="GPU mode (default: every GPU shape)")
    ap.add_argument("--dtypes", nargs="*", default=list(GPU_DTYPES), help="GPU mode")
    ap.add_argument("--impls", nargs="*", default=list(GPU_IMPLS), help="GPU mode")
    ap.add_argument("--warmup", type=int, default=3, help="GPU mode: untimed calls first")
    ap.add_argument("--reps", type=int, default=None, help="timed runs (default: 3 on CPU, 20 on GPU)")
    ap.add_argument("--long", type=float, default=3.0, help="a step whose warm-up takes longer is timed by it alone")
    ap.add_argument("--sdpa-max", type=int, default=16384)
    ap.add_argument("--sdpa-max-noncausal", type=int, default=8192)
    ap.add_argument("--quadratic-max", type=int, default=4096)
    ap.add_argument("--memory-max", type=int, default=4096)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--noncausal", action=argparse.BooleanOptionalAction, default=True,
                    help="CPU mode: also the non-causal rows (default on)")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for every run (default: torch's)")
    ap.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TFK_BENCH_THREADS"] = str(args.threads)
    if args.memory_child:
        return _memory_child(*args.memory_child)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is present (torch.cuda.is_available() is False)")
    if device == "cpu":
        args.reps = args.reps or 3
        rows = run_cpu(args)
    else:
        names = args.shapes or list(GPU_SHAPES)
        unknown = [n for n in names if n not in GPU_SHAPES]
        if unknown:
            ap.error(f"unknown shape(s) {unknown}; known: {', '.join(GPU_SHAPES)}")
        impls = list(args.impls)
        if "fla" in impls and importlib.util.find_spec("fla") is None:
            print("fla: not installed, skipped")
            impls.remove("fla")
        timer = CudaTimer(args.warmup, args.reps or 20)
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; CUDA events, median of {timer.reps} "
              f"after {timer.warmup} warm-up calls; elu1 feature map, scale D^-0.5\nTFLOP/s: the state form's "
              "flops (linear), SDPA's own (sdpa); peak MiB: max_memory_allocated growth in one step; "
              "x sdpa, x fla: their time / this one's")
        print(table.format_table(GPU_COLS, []), flush=True)
        log = lambda r: print(table.format_table(GPU_COLS, [gpu_cells(r)], header=False), flush=True)  # noqa: E731
        rows = run_gpu([GPU_SHAPES[n] for n in names], args.dtypes, impls, device=device, timer=timer, log=log)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
