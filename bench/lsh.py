"""LSH attention (Reformer) benchmark, CPU mode: tfk.lsh_attention (backend
"torch") against Hugging Face's LSHSelfAttention math in torch and against
dense SDPA, B=1, H=2, D=Dv=64, chunk 64 (one chunk before, none after), causal
(Reformer's language model), fp32.

    python -m bench.lsh --threads 1                      # L 4096 16384, n_hashes 1 2 4 8
    python -m bench.lsh --threads 1 --lengths 4096 16384 65536 --n-hashes 4
    python -m bench.lsh --no-memory --json out.json

Implementations, on the same qk (B, H, L, D) (query and, length-normalised,
key) and value (B, H, L, Dv), with the same rotations (so the same buckets):
  "tfk"   tfk.lsh_attention(qk, v, n_hashes=n, n_buckets=nb, chunk_size=64,
          causal=True, rotations=R, backend="torch"): hashing, sort, chunked
          attention, merge of the rounds, and its explicit backward.
  "hf"    Hugging Face's LSHSelfAttention.forward (transformers'
          modeling_reformer.py, a layer with the same config and hash_seed, so
          the same rotations) with its two projections replaced by modules that
          return the given qk and v ((B, L, H·D), the layout the layer projects
          to): what is timed is everything the layer does after its
          projections: _hash_vectors, the sort, the gathers, _attend (the
          (n·L/64, 64, 128) score tensors), ReverseSort, the merge of the
          rounds, and autograd's backward of all that.
  "sdpa"  torch.nn.functional.scaled_dot_product_attention(qk, qk, v,
          is_causal=True): dense attention on the same tensors (a different
          function: the cost LSH avoids), up to --sdpa-max tokens (default
          8192: quadratic time, about 20 s a fwd+bwd step at 16384 on one
          thread here; pass --sdpa-max 16384 for it) and at the first
          n_hashes only (it has no hashes: its row is the same at every n).
n_buckets: tfk's default rule (the largest power of two <= 2·L/64), one int,
given to both (Hugging Face would factorise it past its own limit).

Time: the median of --reps runs after one warm-up, implementations
interleaved run by run (the machine may be shared; pass --threads 1). A step
whose warm-up takes longer than --long seconds (default 1) is timed by that
run alone. The default run (L 4096 16384, n_hashes 1 2 4 8, --threads 1)
takes about 3-4 minutes here.
"fwd" runs under no_grad; "fwd+bwd" is the forward with gradients to qk and v
and the backward of a fixed random dout.

Memory ("MiB", fwd+bwd), at the n_hashes in --memory-n-hashes (default 4,
the targets'; each child process costs seconds of start-up; SDPA's at its
row): each (L,
n_hashes, implementation) runs once in a fresh Python process which resets its peak resident set just before the step
and reports the peak minus the resident set then (bench/peak.py): what one
step adds at its peak.

Summary: the issue's targets at L = 16384, n_hashes = 4: tfk's fwd+bwd time
against HF's (target >= 2x faster) and its peak memory (target <= half of
HF's); tfk's scaling, fwd+bwd time at 4x the tokens (target <= 5x).

GPU mode (``--device cuda``, the default when a GPU is present; run_gpu):
GPU_SHAPES, 65536 tokens a batch (B = 65536 // L) at L = 4096, 16384, 65536,
H = 8, D = Dv = 64, chunk 64 (one before), causal, n_hashes 1, 2, 4, 8; bf16
and fp16. Implementations, one at a time: "tfk" (backend "auto", the one it
chose in brackets), "tfk_triton", "tfk_cuda", "hf" (Hugging Face's layer as
in CPU mode, on the GPU) and "sdpa" (dense causal, same qk and v). Time: CUDA
events, median of --reps after --warmup calls. TFLOP/s from the tiles the
kernels visit: each of the n·L/64 chunks scores its 64 queries against
(1 + before)·64 keys, 2·64·128·(D + Dv) flops a chunk forward (HF's math
does the same products), x3.5 forward+backward; SDPA's own, 4·B·H·L²·D / 2
forward. Peak MiB: torch.cuda.max_memory_allocated growth in one step.
"x hf", "x sdpa": their time over this row's.

    python -m bench.lsh --device cuda --shapes L16384_n4 --dtypes bf16
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tfk
from tfk.ops.lsh import default_n_buckets, draw_rotations

from . import peak, table
from .peak import CudaTimer

B, H, D, CHUNK, BEFORE, AFTER = 1, 2, 64, 64, 1, 0
LENGTHS = (4096, 16384)
N_HASHES = (1, 2, 4, 8)
IMPLS = ("tfk", "hf", "sdpa")
MODES = ("fwd", "fwd+bwd")
HASH_SEED = 7


def make_inputs(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk, v, dout = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    return qk, v, dout


class _Given(torch.nn.Module):
    """Stands in for a projection: returns the tensor it holds (its input unused)."""

    def __init__(self):
        super().__init__()
        self.t = None

    def forward(self, hidden_states):
        return self.t


def hf_layer(L, n_hashes):
    """Hugging Face's LSHSelfAttention with this bench's config, projections replaced by _Given."""
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention
    cfg = ReformerConfig(hidden_size=H * D, num_attention_heads=H, attention_head_size=D,
                         lsh_attn_chunk_length=CHUNK, num_hashes=n_hashes, num_buckets=default_n_buckets(L, CHUNK),
                         lsh_num_chunks_before=BEFORE, lsh_num_chunks_after=AFTER, is_decoder=True,
                         hash_seed=HASH_SEED, lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=L)
    layer = LSHSelfAttention(cfg).eval()
    layer.query_key, layer.value = _Given(), _Given()
    return layer


def impl_fn(name, L, n_hashes):
    """fn(qk, v) -> out, on (B, H, L, D) tensors."""
    nb = default_n_buckets(L, CHUNK)
    if name == "tfk":
        R = draw_rotations(H, D, n_hashes, nb, seed=HASH_SEED)
        return lambda qk, v: tfk.lsh_attention(qk, v, n_hashes=n_hashes, n_buckets=nb, chunk_size=CHUNK,
                                               chunks_before=BEFORE, chunks_after=AFTER, causal=True,
                                               rotations=R, backend="torch")
    if name == "hf":
        layer = hf_layer(L, n_hashes)
        dummy = torch.empty(B, L, H * D)

        def fn(qk, v):
            # (B, H, L, D) -> (B, L, H·D), the layout the layer's projections produce (views only)
            layer.query_key.t = qk.transpose(1, 2).reshape(B, L, H * D)
            layer.value.t = v.transpose(1, 2).reshape(B, L, H * D)
            out = layer(dummy).hidden_states                      # (B, L, H·D)
            return out.view(B, L, H, D).transpose(1, 2)
        return fn
    if name == "sdpa":
        return lambda qk, v: F.scaled_dot_product_attention(qk, qk, v, is_causal=True)
    raise ValueError(f"unknown implementation {name!r}")


def skip_reason(name, L, n_hashes, args):
    if name == "sdpa":
        if n_hashes != min(args.n_hashes):
            return "same as its first row: no hashes"
        if L > args.sdpa_max:
            return f"skipped: L > {args.sdpa_max} (quadratic time)"
    return None


def time_config(L, n_hashes, args):
    """{(impl, mode): median seconds or a string saying why not}."""
    qk, v, dout = make_inputs(L)
    fns = {name: skip_reason(name, L, n_hashes, args) or impl_fn(name, L, n_hashes) for name in IMPLS}
    return peak.time_interleaved(fns, (qk, v), dout, MODES, args.reps, args.long)


def _memory_child(L, n_hashes, name):
    peak.child_threads()
    logging.disable(logging.WARNING)
    L, n_hashes = int(L), int(n_hashes)
    qk, v, dout = make_inputs(L)
    fn = impl_fn(name, L, n_hashes)
    peak.report_step_peak(lambda: peak.cpu_step(fn, (qk, v), dout, "fwd+bwd"))


def memory(L, n_hashes, name):
    """MiB one fwd+bwd step adds at its peak, in a fresh process (module doc)."""
    return peak.child_peak_mib("bench.lsh", L, n_hashes, name)


def _cell(v, unit):
    if v is None:
        return "-"
    if isinstance(v, str):
        return "same" if v.startswith("same") else v.split(":")[0]
    return f"{v * 1e3:.1f}" if unit == "ms" else f"{v:.0f}"


def cols(memory_on):
    c = [table.Col("L", ">", 6), table.Col("n", ">", 2), table.Col("mode", "<", 7)]
    for name in IMPLS:
        c.append(table.Col(f"{name} ms", ">", 10))
        if memory_on:
            c.append(table.Col(f"{name} MiB", ">", 9))
    return c + [table.Col("x hf", ">", 5)]


def cells(row, memory_on):
    c = [str(row["L"]), str(row["n_hashes"]), row["mode"]]
    for name in IMPLS:
        c.append(_cell(row[f"{name}_s"], "ms"))
        if memory_on:
            c.append(_cell(row.get(f"{name}_peak_mib"), "MiB"))
    return c + [table.fmt(row["hf_over_tfk"], ".1f")]


def summarize(rows, lengths):
    """The issue's targets (module doc) and tfk's scaling at every n_hashes."""
    get = lambda L, n, mode, key: next((r.get(key) for r in rows if r["L"] == L and r["n_hashes"] == n  # noqa: E731
                                        and r["mode"] == mode), None)
    lines = []
    for n in sorted({r["n_hashes"] for r in rows}):
        scal = []
        for L in lengths:
            a, b = get(L, n, "fwd+bwd", "tfk_s"), get(4 * L, n, "fwd+bwd", "tfk_s")
            if isinstance(a, float) and isinstance(b, float):
                scal.append(f"{L}->{4 * L}: {b / a:.1f}x")
        if scal:
            lines.append(f"n_hashes={n}: tfk fwd+bwd time at 4x tokens: {', '.join(scal)} (target <= 5x: "
                         f"{'met' if all(float(s.split(': ')[1][:-1]) <= 5 for s in scal) else 'NOT met'})")
    t, h = get(16384, 4, "fwd+bwd", "tfk_s"), get(16384, 4, "fwd+bwd", "hf_s")
    if isinstance(t, float) and isinstance(h, float):
        lines.append(f"target: fwd+bwd at L = 16384, n_hashes = 4: tfk {t * 1e3:.0f} ms, HF {h * 1e3:.0f} ms: "
                     f"{h / t:.1f}x faster (target >= 2x: {'met' if h / t >= 2 else 'NOT met'})")
    tm, hm = get(16384, 4, "fwd+bwd", "tfk_peak_mib"), get(16384, 4, "fwd+bwd", "hf_peak_mib")
    if isinstance(tm, float) and isinstance(hm, float):
        lines.append(f"target: peak memory at L = 16384, n_hashes = 4: tfk {tm:.0f} MiB, HF {hm:.0f} MiB: "
                     f"{tm / hm:.2f} of HF's (target <= 0.5: {'met' if tm <= 0.5 * hm else 'NOT met'})")
    return lines


def run_cpu(args):
    memory_on = not args.no_memory
    c = cols(memory_on)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={B} H={H} D=Dv={D} chunk={CHUNK} "
          f"(before {BEFORE}, after {AFTER}) causal fp32; median of {args.reps} "
          f"(one run when a step takes > {args.long:g} s)")
    print("ms: time; x hf: HF's time / tfk's" +
          ("; MiB: what one fwd+bwd step adds to a fresh process at its peak" if memory_on else ""))
    print(table.format_table(c, []), flush=True)
    rows = []
    for L in args.lengths:
        for n in args.n_hashes:
            times = time_config(L, n, args)
            for mode in MODES:
                row = dict(L=L, n_hashes=n, mode=mode)
                for name in IMPLS:
                    row[f"{name}_s"] = times[(name, mode)]
                    measured = n in args.memory_n_hashes or (name == "sdpa" and n == min(args.n_hashes))
                    if memory_on and mode == "fwd+bwd" and measured:
                        why = skip_reason(name, L, n, args)
                        row[f"{name}_peak_mib"] = why or memory(L, n, name)
                t, h = row["tfk_s"], row["hf_s"]
                row["hf_over_tfk"] = h / t if isinstance(h, float) and isinstance(t, float) else None
                rows.append(row)
                print(table.format_table(c, [cells(row, memory_on)], header=False), flush=True)
    for reason in sorted({v for r in rows for v in r.values() if isinstance(v, str) and "skipped" in v}):
        print("note:", reason)
    print("note: sdpa runs at the first n_hashes only (dense attention has no hashes)")
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
    L: int
    D: int
    n_hashes: int
    chunk: int = CHUNK
    before: int = BEFORE
    after: int = AFTER


GPU_SHAPES = {f"L{L}_n{n}": GPUShape(f"L{L}_n{n}", 65536 // L, 8, L, 64, n)
              for L in (4096, 16384, 65536) for n in N_HASHES}
GPU_DTYPES = ("bf16", "fp16")
GPU_IMPLS = ("tfk", "tfk_triton", "tfk_cuda", "hf", "sdpa")
TFK_BACKENDS = {"tfk": "auto", "tfk_triton": "triton", "tfk_cuda": "cuda"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gpu_flops(s: GPUShape, impl, mode):
    """The flops a row's TFLOP/s counts (module doc)."""
    if impl == "sdpa":
        fwd = 4 * s.B * s.H * s.L * s.L * s.D // 2
    else:
        window = (1 + s.before + s.after) * s.chunk
        fwd = s.B * s.H * s.n_hashes * s.L * window * 2 * (s.D + s.D)
    return fwd if mode == "fwd" else fwd * 7 // 2


def _gpu_impl(name, s: GPUShape, device):
    """fn(qk, v) -> out on (B, H, L, D) tensors, or raises why not."""
    nb = default_n_buckets(s.L, s.chunk)
    if name in TFK_BACKENDS:
        R = draw_rotations(s.H, s.D, s.n_hashes, nb, seed=HASH_SEED).to(device)
        return lambda qk, v: tfk.lsh_attention(qk, v, n_hashes=s.n_hashes, n_buckets=nb, chunk_size=s.chunk,
                                               chunks_before=s.before, chunks_after=s.after, causal=True,
                                               rotations=R, backend=TFK_BACKENDS[name])
    if name == "hf":
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention
        cfg = ReformerConfig(hidden_size=s.H * s.D, num_attention_heads=s.H, attention_head_size=s.D,
                             lsh_attn_chunk_length=s.chunk, num_hashes=s.n_hashes, num_buckets=nb,
                             lsh_num_chunks_before=s.before, lsh_num_chunks_after=s.after, is_decoder=True,
                             hash_seed=HASH_SEED, lsh_attention_probs_dropout_prob=0.0,
                             max_position_embeddings=s.L)
        layer = LSHSelfAttention(cfg).eval().to(device)
        layer.query_key, layer.value = _Given(), _Given()

        def fn(qk, v):
            B, H, L, D = qk.shape
            layer.query_key.t = qk.transpose(1, 2).reshape(B, L, H * D)
            layer.value.t = v.transpose(1, 2).reshape(B, L, H * D)
            out = layer(qk.new_empty(B, L, H * D)).hidden_states
            return out.view(B, L, H, D).transpose(1, 2)
        return fn
    if name == "sdpa":
        return lambda qk, v: F.scaled_dot_product_attention(qk, qk, v, is_causal=True)
    raise ValueError(f"unknown implementation {name!r}")


def build_gpu_steps(name, s: GPUShape, inputs, device):
    """{mode: step()} for implementation ``name``, and the tfk backend that ran (or None)."""
    qk, v, dout = inputs
    fn = _gpu_impl(name, s, device)
    with tfk.backends.record_choices() as ran, torch.no_grad():
        fn(qk, v)
    chosen = (ran[0] if ran else None) if name in TFK_BACKENDS else None

    def run(mode):
        if mode == "fwd":
            with torch.no_grad():
                fn(qk, v)
            return
        leaves = [t.detach().requires_grad_() for t in (qk, v)]
        fn(*leaves).backward(dout)
    return {mode: (lambda mode=mode: run(mode)) for mode in MODES}, chosen


def run_gpu(shapes, dtypes=GPU_DTYPES, impls=GPU_IMPLS, *, device="cuda", timer=None, log=None):
    """Rows, one per (shape, dtype, mode, implementation): ms, TFLOP/s, peak
    MiB, and HF's and SDPA's time over this one's ("x_hf", "x_sdpa").
    ``timer``: CudaTimer() by default (a stand-in needs its time(fn) and
    peak_bytes(fn)); ``log(row)`` is called as each (shape, dtype) is done."""
    timer = timer or CudaTimer()
    rows = []
    for s in shapes:
        for dt in dtypes:
            g = torch.Generator(device).manual_seed(0)
            qk, v, dout = (torch.randn(s.B, s.H, s.L, s.D, generator=g, device=device).to(_DTYPES[dt])
                           for _ in range(3))
            base = dict(shape=s.name, B=s.B, H=s.H, L=s.L, D=s.D, n_hashes=s.n_hashes, dtype=dt)
            done = peak.measure_impls(impls, base, MODES,
                                      lambda name: build_gpu_steps(name, s, (qk, v, dout), device), timer,
                                      lambda name, mode: gpu_flops(s, name, mode), PEERS, device)
            for r in done:
                if log:
                    log(r)
            rows += done
    return rows


PEERS = ("hf", "sdpa")
GPU_COLS = peak.gpu_cols(10, PEERS)


def gpu_cells(r):
    return peak.gpu_cells(r, PEERS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present")
    ap.add_argument("--shapes", nargs="*", help="GPU mode (default: every GPU shape)")
    ap.add_argument("--dtypes", nargs="*", default=list(GPU_DTYPES), help="GPU mode")
    ap.add_argument("--impls", nargs="*", default=list(GPU_IMPLS), help="GPU mode")
    ap.add_argument("--warmup", type=int, default=3, help="GPU mode: untimed calls first")
    ap.add_argument("--lengths", nargs="*", type=int, default=list(LENGTHS),
                    help="CPU mode: multiples of 64 (longer: 32768 65536)")
    ap.add_argument("--n-hashes", nargs="*", type=int, default=list(N_HASHES))
    ap.add_argument("--reps", type=int, default=None, help="timed runs (default: 3 on CPU, 20 on GPU)")
    ap.add_argument("--long", type=float, default=1.0, help="a step whose warm-up takes longer is timed by it alone")
    ap.add_argument("--sdpa-max", type=int, default=8192)
    ap.add_argument("--memory-n-hashes", nargs="*", type=int, default=[4],
                    help="the n_hashes whose fwd+bwd peak memory is measured")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for every run (default: torch's)")
    ap.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TFK_BENCH_THREADS"] = str(args.threads)
    if args.memory_child:
        return _memory_child(*args.memory_child)
    logging.disable(logging.WARNING)        # transformers' notices
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is present (torch.cuda.is_available() is False)")
    if device == "cuda":
        names = args.shapes or list(GPU_SHAPES)
        unknown = [n for n in names if n not in GPU_SHAPES]
        if unknown:
            ap.error(f"unknown shape(s) {unknown}; known: {', '.join(GPU_SHAPES)}")
        timer = CudaTimer(args.warmup, args.reps or 20)
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; CUDA events, median of {timer.reps} "
              f"after {timer.warmup} warm-up calls; chunk {CHUNK} (before {BEFORE}, after {AFTER}), causal\n"
              "TFLOP/s: the band's score and value products (tfk, hf), SDPA's own (sdpa); peak MiB: "
              "max_memory_allocated growth in one step; x hf, x sdpa: their time / this one's")
        print(table.format_table(GPU_COLS, []), flush=True)
        log = lambda r: print(table.format_table(GPU_COLS, [gpu_cells(r)], header=False), flush=True)  # noqa: E731
        rows = run_gpu([GPU_SHAPES[n] for n in names], args.dtypes, args.impls, device=device, timer=timer,
                       log=log)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return rows
    args.reps = args.reps or 3
    bad = [L for L in args.lengths if L % CHUNK or L <= CHUNK]
    if bad:
        ap.error(f"lengths must be multiples of {CHUNK} above it, got {bad}")
    rows = run_cpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
