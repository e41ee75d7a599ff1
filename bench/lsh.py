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
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import torch
import torch.nn.functional as F

import tfk
from tfk.ops.lsh import default_n_buckets, draw_rotations

from . import peak, table

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", nargs="*", type=int, default=list(LENGTHS),
                    help="multiples of 64 (longer: 32768 65536)")
    ap.add_argument("--n-hashes", nargs="*", type=int, default=list(N_HASHES))
    ap.add_argument("--reps", type=int, default=3)
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
    bad = [L for L in args.lengths if L % CHUNK or L <= CHUNK]
    if bad:
        ap.error(f"lengths must be multiples of {CHUNK} above it, got {bad}")
    logging.disable(logging.WARNING)        # transformers' notices
    rows = run_cpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
