"""The project's report: every op tfk ships, on the hardware present.

    python -m bench.report [--only NAME ...] [--backend NAME] [--repeat N] [--json PATH]

For each op (the SDPA drop-in: dense, causal, bool mask, float mask, GQA,
3-D input, dropout; ``tfk.attention`` with each pattern kind, a union, an
intersection, a per-head block layout, GQA, dropout, the grid patterns, the
score modifiers of ``tfk.scores``), at a moderate size with
awkward lengths (197, 263, 1025; head dims 40 and 80), it prints the backend
``backend="auto"`` chooses, the error of out, dq, dk and dv against the
float64 reference (for dropout: the reference given the keep mask the call
drew), and the time of the forward and of forward+backward.

Errors are relative: max |tfk - ref| / max |ref|, per tensor. The tolerance
is 1e-4 for float32; for float16/bfloat16 (GPU only) it is twice the error
of the same reference computed in that dtype plus a floor. Exit code 1 when
any error exceeds its tolerance (or anything fails), so the report is also a
check. CUDA tensors when a GPU is present (float16, bfloat16, float32), CPU
float32 otherwise.

Without a GPU a second table runs the CUDA kernels (csrc/attention/) on the
CPU through backend "cuda-sim" (tfk's host-execution layer) in float16 and
bfloat16, for every op whose modifiers the kernels fuse, checked the same way and not timed: the layer emulates a GPU, its speed says nothing about one.
``--no-sim`` skips it. Then the same for packed sequences
(bench/report_varlen.py), KV-cache decoding (bench/report_kvcache.py,
forward only), the MoE ops (bench/report_moe.py),
the linear-attention ops (bench/report_linear.py; the csrc/linear/
kernels on cuda-sim), the LSH-attention ops (bench/report_lsh.py), and
context-parallel attention and expert-parallel experts on 2 gloo processes
(bench/report_distributed.py).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

import tfk
from tfk import dropout as drop
from tfk import patterns as P
from tfk.ops.attention import attention_reference

from . import report_distributed, report_kvcache, report_linear, report_lsh, report_moe, report_varlen
from .table import Col, fmt, format_table

# Relative tolerance per dtype: fp32 is absolute-relative; fp16/bf16 add this
# floor to 2x the error of the reference computed in that dtype.
TOL_FP32 = 1e-4
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DROPOUT_SEED = 20240611


@dataclass(frozen=True)
class Op:
    """One shipped op at one size.

    kind "sdpa": ``tfk.scaled_dot_product_attention``; ``mask`` is None, "bool"
    (per batch, broadcast over heads, with two empty rows) or "float" (per
    head: an ALiBi-like bias with some -inf). kind "attention":
    ``tfk.attention`` with ``pattern()``. ``rank3``: (N, L, E) inputs.
    """
    name: str
    kind: str
    B: int
    H: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    pattern: Callable | None = field(default=None, compare=False)
    mask: str | None = None
    is_causal: bool = False
    dropout_p: float = 0.0
    rank3: bool = False
    # score_mod(H, Lq, Lk, D, device, dtype) -> a tfk.scores modifier (or list), the same values at any dtype
    score_mod: Callable | None = field(default=None, compare=False)

    def describe(self):
        if self.kind == "sdpa":
            bits = [f"mask={self.mask}"] if self.mask else []
            bits += ["is_causal"] if self.is_causal else []
            bits += [f"enable_gqa ({self.H}/{self.Hkv})"] if self.H != self.Hkv else []
            bits += [f"dropout_p={self.dropout_p}"] if self.dropout_p else []
            bits += ["3-D (N, L, E)"] if self.rank3 else []
            return "sdpa(" + ", ".join(bits) + ")"
        p = self.pattern()
        extra = f", dropout_p={self.dropout_p}" if self.dropout_p else ""
        if self.score_mod is not None:
            mods = tfk.scores.canonical(self.score_mod(self.H, self.Lq, self.Lk, self.D, "cpu", torch.float32))
            extra += f", score_mod={list(mods.values())!r}"
        gqa = f", GQA {self.H}/{self.Hkv}" if self.H != self.Hkv else ""
        return f"attention({p!r}{gqa}{extra})"


def _param(seed, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mods(kind):
    """A score_mod builder for Op (module doc of tfk.scores)."""
    S = tfk.scores

    def build(H, Lq, Lk, D, device, dtype):
        f32 = torch.float64 if dtype == torch.float64 else torch.float32
        if kind == "alibi":
            return S.alibi(S.alibi_slopes(H).to(device, f32))
        if kind == "t5":
            return S.relative_bias(_param(1, 32, H, scale=0.5).to(device, f32))
        if kind == "softcap+alibi":
            return [S.softcap(2.0), S.alibi(S.alibi_slopes(H).to(device, f32))]
        if kind == "span":
            return S.adaptive_span(torch.tensor([30.0, 100.0, 300.0, 700.0][:H]).to(device, f32), 32.0)
        if kind == "xl":
            return S.transformer_xl(*(t.to(device, dtype) for t in (_param(2, H, Lq + Lk - 1, D, scale=0.3),
                                                                    _param(3, H, D, scale=0.3),
                                                                    _param(4, H, D, scale=0.3))))
        raise ValueError(kind)
    return build


def _per_head_layout():
    g = torch.Generator().manual_seed(7)
    nb = math.ceil(1025 / 64)
    layout = torch.rand(4, nb, nb, generator=g) < 0.3
    layout |= torch.eye(nb, dtype=torch.bool)  # no empty rows
    return P.block_layout(layout, 64)


OPS = [
    Op("sdpa_dense", "sdpa", 2, 3, 3, 197, 197, 80),
    Op("sdpa_causal", "sdpa", 1, 4, 4, 1025, 1025, 40, is_causal=True),
    Op("sdpa_causal_lq<lk", "sdpa", 1, 4, 4, 197, 1025, 40, is_causal=True),
    Op("sdpa_bool_mask", "sdpa", 2, 3, 3, 197, 263, 80, mask="bool"),
    Op("sdpa_float_mask", "sdpa", 2, 3, 3, 197, 263, 80, mask="float"),
    Op("sdpa_gqa", "sdpa", 1, 8, 2, 1025, 1025, 40),
    Op("sdpa_3d", "sdpa", 4, 1, 1, 197, 263, 80, rank3=True),
    Op("sdpa_dropout", "sdpa", 2, 3, 3, 197, 263, 80, dropout_p=0.1),
    Op("causal_bottom_right", "attention", 1, 4, 4, 197, 1025, 80, pattern=lambda: P.causal(bottom_right=True)),
    Op("sliding_window", "attention", 1, 4, 4, 1025, 1025, 80, pattern=lambda: P.sliding_window(128)),
    Op("dilated_window", "attention", 1, 4, 4, 1025, 1025, 40, pattern=lambda: P.sliding_window(96, 96, dilation=3)),
    Op("global_tokens_n", "attention", 1, 4, 4, 1025, 1025, 40, pattern=lambda: P.global_tokens(7)),
    Op("global_tokens_idx", "attention", 1, 4, 4, 1025, 1025, 40,
       pattern=lambda: P.global_tokens(torch.tensor([0, 333, 700, 1024]))),
    Op("strided", "attention", 1, 4, 4, 1025, 1025, 80, pattern=lambda: P.strided(32)),
    Op("fixed", "attention", 1, 4, 4, 1025, 1025, 80, pattern=lambda: P.fixed(64, 8)),
    Op("bigbird", "attention", 1, 4, 4, 1025, 1025, 80, pattern=lambda: P.bigbird(64, 3, 1, 2, seed=3)),
    Op("block_layout_per_head", "attention", 1, 4, 4, 1025, 1025, 40, pattern=_per_head_layout),
    Op("union_window|global", "attention", 1, 4, 4, 1025, 1025, 80,
       pattern=lambda: P.sliding_window(64, 64) | P.global_tokens(torch.tensor([0, 512, 1000]))),
    Op("intersect_strided&window", "attention", 1, 4, 4, 1025, 1025, 40,
       pattern=lambda: P.strided(16) & P.sliding_window(300)),
    Op("gqa_window", "attention", 1, 8, 2, 1025, 1025, 40, pattern=lambda: P.sliding_window(100, 100)),
    Op("window_dropout", "attention", 1, 4, 4, 1025, 1025, 40, pattern=lambda: P.sliding_window(64),
       dropout_p=0.1),
    # grid patterns (rows x cols, frames x rows x cols)
    Op("neighborhood_2d", "attention", 1, 4, 2, 1073, 1073, 40, pattern=lambda: P.neighborhood((29, 37), 7)),
    Op("neighborhood_3d_dilated", "attention", 1, 4, 4, 990, 990, 40,
       pattern=lambda: P.neighborhood((9, 10, 11), 3, dilation=(1, 2, 2))),
    Op("axial_causal", "attention", 1, 4, 4, 1073, 1073, 80, pattern=lambda: P.axial((29, 37), axis=0, causal=True)),
    Op("local_blocks&causal", "attention", 1, 4, 4, 1073, 1073, 40,
       pattern=lambda: P.local_blocks((29, 37), (8, 8), 3) & P.causal()),
    # score modifiers (tfk.scores)
    Op("alibi_causal", "attention", 1, 4, 4, 1025, 1025, 40, pattern=lambda: P.causal(), score_mod=_mods("alibi")),
    Op("t5_bias", "attention", 2, 4, 4, 197, 263, 80, pattern=lambda: P.Dense(), score_mod=_mods("t5")),
    Op("softcap+alibi_window", "attention", 1, 4, 2, 1025, 1025, 40, pattern=lambda: P.sliding_window(128),
       score_mod=_mods("softcap+alibi")),
    Op("adaptive_span", "attention", 1, 4, 4, 1025, 1025, 40, pattern=lambda: P.causal(), score_mod=_mods("span")),
    Op("transformer_xl_memory", "attention", 1, 4, 4, 197, 460, 40, pattern=lambda: P.causal(bottom_right=True),
       score_mod=_mods("xl")),
]


def cuda_kernels_take(op):
    """Whether the CUDA kernels fuse the op's modifiers (cuda-sim's table)."""
    if op.score_mod is None:
        return True
    kinds = tfk.backends.get_backend("cuda-sim").score_mods
    mods = tfk.scores.canonical(op.score_mod(op.H, op.Lq, op.Lk, op.D, "cpu", torch.float32))
    return kinds is True or all(k in kinds for k in mods)


# ---------------------------------------------------------------------------
# Building a case: inputs, the tfk call, the reference
# ---------------------------------------------------------------------------

@dataclass
class Case:
    inputs: tuple            # q, k, v in the op's dtype (the shapes the call takes)
    dout: torch.Tensor
    call: Callable           # call(q, k, v, backend) -> out
    reference: Callable      # reference(q, k, v) -> out, in the inputs' dtype


def _seed_of(name):
    return sum(ord(c) * 31 ** i for i, c in enumerate(name)) % (2**31)


def build_case(op: Op, device, dtype) -> Case:
    g = torch.Generator().manual_seed(_seed_of(op.name))
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, H, Hkv, Lq, Lk, D = op.B, op.H, op.Hkv, op.Lq, op.Lk, op.D
    if op.rank3:
        shapes = [(B, Lq, D), (B, Lk, D), (B, Lk, D), (B, Lq, D)]
    else:
        shapes = [(B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), (B, H, Lq, D)]
    q, k, v, dout = (rn(*s).to(device=device, dtype=dtype) for s in shapes)

    allowed = bias = None   # for the reference, (B or 1, H or 1, Lq, Lk)
    mask = None
    if op.kind == "sdpa":
        if op.mask == "bool":
            m = torch.rand(B, 1, Lq, Lk, generator=g) < 0.7
            m[:, :, 3] = False          # empty rows: out = 0 by tfk's (and the reference's) convention
            m[:, :, Lq - 1] = False
            mask = m.to(device)
            allowed = mask
        elif op.mask == "float":
            slopes = 2.0 ** (-torch.arange(1, H + 1, dtype=torch.float32))
            dist = (torch.arange(Lq).view(-1, 1) - torch.arange(Lk).view(1, -1)).abs().float()
            m = -slopes.view(1, H, 1, 1) * dist
            m = m.masked_fill(torch.rand(1, H, Lq, Lk, generator=g) < 0.1, float("-inf"))
            mask = m.to(device=device, dtype=dtype)
            bias = mask
        if op.is_causal:
            allowed = (torch.arange(Lk).view(1, -1) <= torch.arange(Lq).view(-1, 1)).to(device)
        if op.rank3 and mask is not None:
            mask = mask[:, 0]

        def call(q, k, v, backend):
            return tfk.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=op.dropout_p,
                                                    is_causal=op.is_causal, enable_gqa=H != Hkv,
                                                    backend=backend)
    else:
        pattern = op.pattern()
        dense = pattern.dense_mask(Lq, Lk, device=device)
        allowed = dense.unsqueeze(0) if dense.dim() == 3 else dense

        def call(q, k, v, backend):
            mod = None if op.score_mod is None else op.score_mod(H, Lq, Lk, D, q.device, q.dtype)
            return tfk.attention(q, k, v, pattern, dropout_p=op.dropout_p, backend=backend, score_mod=mod)

    def reference(q, k, v):
        if op.rank3:
            q, k, v = (t.unsqueeze(1) for t in (q, k, v))
        keep = None
        if op.dropout_p:
            torch.manual_seed(DROPOUT_SEED)
            seed = drop.draw_seed()
            keep = drop.dense_keep_mask(seed, q.shape[0], q.shape[1], Lq, Lk, op.dropout_p, device=q.device)
        mods = None
        if op.score_mod is not None:
            mods = tfk.scores.canonical(op.score_mod(H, Lq, Lk, D, q.device, q.dtype))
        out, _ = attention_reference(q, k, v, allowed, None if bias is None else bias.to(q.dtype),
                                     dropout_p=op.dropout_p, keep=keep, score_mod=mods)
        return out.squeeze(1) if op.rank3 else out

    return Case((q, k, v), dout, call, reference)


def _fwd_bwd(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def _rel_err(x, ref):
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (x.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    if not math.isfinite(err) or not bool(torch.isfinite(x).all()):
        return float("inf")
    return err / max(scale, 1e-30) if scale else err


def _timed_ms(fn, repeat, device):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_op(op: Op, device="cpu", dtype=torch.float32, *, backend="auto", repeat=3, time_it=True):
    """Run one op with ``backend``, against the float64 reference.

    Returns a dict: backend (the one chosen), err_out/err_dq/err_dk/err_dv
    (relative), tol, ok, fwd_ms, fwdbwd_ms (None unless time_it).
    """
    device = torch.device(device)
    case = build_case(op, device, dtype)
    fn = lambda q, k, v: case.call(q, k, v, backend)  # noqa: E731
    torch.manual_seed(DROPOUT_SEED)
    with tfk.backends.record_choices() as names:
        out, grads = _fwd_bwd(fn, case.inputs, case.dout)
    row = {"op": op.name, "what": op.describe(), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "backend": names[0] if names else "?"}

    ref64 = [t.double() for t in case.inputs]
    ref_out, ref_grads = _fwd_bwd(case.reference, ref64, case.dout.double())
    errs = [_rel_err(out, ref_out)] + [_rel_err(g, r) for g, r in zip(grads, ref_grads)]
    if dtype in (torch.float32, torch.float64):
        tols = [TOL_FP32] * 4
    else:  # 2x the error of the reference computed in this dtype, plus a floor
        low_out, low_grads = _fwd_bwd(case.reference, case.inputs, case.dout)
        torch_errs = [_rel_err(low_out, ref_out)] + [_rel_err(g, r) for g, r in zip(low_grads, ref_grads)]
        tols = [2 * e + FLOOR[dtype] for e in torch_errs]
    row.update(err_out=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3], tol=max(tols),
               tols=tols, ok=all(e <= t for e, t in zip(errs, tols)), fwd_ms=None, fwdbwd_ms=None)

    if time_it:
        q, k, v = case.inputs
        leaves = [t.detach().clone().requires_grad_(True) for t in case.inputs]

        def fwd():
            with torch.no_grad():
                fn(q, k, v)

        def fwdbwd():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(case.dout)

        fwd()
        fwdbwd()
        row["fwd_ms"] = _timed_ms(fwd, repeat, device)
        row["fwdbwd_ms"] = _timed_ms(fwdbwd, repeat, device)
    return row


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

def header(device):
    import triton
    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        dev = f"CPU, {torch.get_num_threads()} torch threads (no GPU)"
    return (f"tfk {tfk.__version__} report -- device: {dev}; torch {torch.__version__}; "
            f"triton {triton.__version__}; backends registered: {', '.join(tfk.backend_names())}")


def _fmt_err(e):
    return "inf" if e == float("inf") else f"{e:.1e}"


def format_rows(rows):
    cols = [Col("op", "<"), Col("dtype", "<"), Col("backend", "<"), Col("err out"), Col("err dq"), Col("err dk"),
            Col("err dv"), Col("fwd ms"), Col("f+b ms"), Col("check", "<")]
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["op"], r.get("dtype", ""), "ERROR: " + r["error"].strip().splitlines()[-1][:110]])
            continue
        lines.append([r["op"], r["dtype"], r["backend"], _fmt_err(r["err_out"]), _fmt_err(r["err_dq"]),
                      _fmt_err(r["err_dk"]), _fmt_err(r["err_dv"]), fmt(r["fwd_ms"], ".1f"),
                      fmt(r["fwdbwd_ms"], ".1f"), "ok" if r["ok"] else f"FAIL (tol {r['tol']:.1e})"])
    return format_table(cols, lines)


SIM_DTYPES = (torch.float16, torch.bfloat16)


def _sim_built():
    from tfk.backends import import_error
    return import_error("_sim") is None


def _check_all(ops, device, dtypes, **kw):
    rows = []
    for op in ops:
        for dtype in dtypes:
            try:
                row = check_op(op, device, dtype, **kw)
            except Exception:  # noqa: BLE001 -- a failure is a row, and a non-zero exit
                row = {"op": op.name, "what": op.describe(), "dtype": str(dtype).replace("torch.", ""),
                       "error": traceback.format_exc(limit=8), "ok": False}
            rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    names = [o.name for o in OPS + report_varlen.OPS + report_kvcache.OPS + report_moe.OPS + report_linear.OPS
             + report_lsh.OPS + report_distributed.OPS]
    ap.add_argument("--only", nargs="+", metavar="OP", help=f"ops to run, from: {', '.join(names)}")
    ap.add_argument("--backend", default="auto", help="backend to check (default: auto)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per measurement on CPU (median)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--no-sim", action="store_true", help="skip the CUDA kernels on the CPU (backend cuda-sim)")
    args = ap.parse_args(argv)
    ops, varlen_ops, kv_ops = OPS, report_varlen.OPS, report_kvcache.OPS
    moe_ops, linear_ops, lsh_ops = report_moe.OPS, report_linear.OPS, report_lsh.OPS
    dist_ops = report_distributed.OPS
    if args.only:
        missing = [n for n in args.only if n not in names]
        if missing:
            ap.error(f"unknown op(s) {missing}; known: {', '.join(names)}")
        ops = [o for o in OPS if o.name in args.only]
        varlen_ops = [o for o in report_varlen.OPS if o.name in args.only]
        kv_ops = [o for o in report_kvcache.OPS if o.name in args.only]
        moe_ops = [o for o in report_moe.OPS if o.name in args.only]
        linear_ops = [o for o in report_linear.OPS if o.name in args.only]
        lsh_ops = [o for o in report_lsh.OPS if o.name in args.only]
        dist_ops = [o for o in report_distributed.OPS if o.name in args.only]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]

    t0 = time.perf_counter()
    print(header(device), flush=True)
    print(f"errors: max|tfk - ref| / max|ref| against the float64 reference; tolerance fp32 {TOL_FP32:g}"
          + ("; fp16/bf16: 2x the reference's own error in that dtype + floor" if device.type == "cuda" else "")
          + "; times: median, fwd under no_grad\n")
    sim = device.type == "cpu" and args.backend == "auto" and not args.no_sim and _sim_built()
    rows = []
    if ops:
        rows = _check_all(ops, device, dtypes, backend=args.backend, repeat=args.repeat)
        print(format_rows(rows))
        if sim:
            print("\nThe CUDA kernels on the CPU: backend cuda-sim (the csrc/attention/ sources through tfk's "
                  "host-execution layer), untimed:", flush=True)
            sim_rows = _check_all([o for o in ops if cuda_kernels_take(o)], device, SIM_DTYPES, backend="cuda-sim",
                                  time_it=False)
            print(format_rows(sim_rows))
            rows += sim_rows
    sections = [  # (module, its ops, title, title of its cuda-sim table, which ops cuda-sim takes)
        (report_varlen, varlen_ops, "Packed sequences (tfk.attention_varlen); err grads: the largest over query, "
         "key and value:", "The same on the CUDA attention kernels (csrc/attention/) on the CPU: backend "
         "cuda-sim, untimed:", report_varlen.cuda_kernels_take),
        (report_kvcache, kv_ops, "KV-cache decoding (tfk.attention_with_kvcache, forward only):",
         "The split-KV CUDA kernels (csrc/kvcache/) on the CPU: backend cuda-sim, untimed:",
         report_kvcache.cuda_kernels_take),
        (report_moe, moe_ops, "Mixture-of-Experts (tfk.moe); err grads: the largest over the inputs' gradients:",
         "The MoE CUDA kernels (csrc/moe/) on the CPU: backend cuda-sim, untimed:", None),
        (report_linear, linear_ops, "Linear attention (tfk.linear_attention); err grads: the largest over q, k, v "
         "(and the initial state's):", "The linear-attention CUDA kernels (csrc/linear/) on the CPU: backend "
         "cuda-sim, untimed:", None),
        (report_lsh, lsh_ops, "LSH attention (tfk.lsh_attention); err grads: the larger over qk and value:",
         "The LSH ops the CUDA attention kernels take (csrc/attention/; 64-wide tiles: chunks of 64), on the CPU: "
         "backend cuda-sim, untimed:", report_lsh.cuda_kernels_take),
        (report_distributed, dist_ops, f"Past one device (tfk.distributed) on {report_distributed.WORLD} gloo "
         "processes on the CPU; err: the largest over ranks of each rank's shard; times: the slowest rank's:",
         "", lambda op: False),
    ]
    for module, family_ops, title, sim_title, sim_takes in sections:
        if not family_ops:
            continue
        print("\n" + title, flush=True)
        family_rows = module.check_all(family_ops, device, dtypes, backend=args.backend, repeat=args.repeat,
                                       timer=_timed_ms)
        print(report_moe.format_rows(family_rows))
        sim_ops = [o for o in family_ops if sim_takes is None or sim_takes(o)]
        if sim and sim_ops:
            print("\n" + sim_title, flush=True)
            sim_rows = module.check_all(sim_ops, device, SIM_DTYPES, backend="cuda-sim", time_it=False)
            print(report_moe.format_rows(sim_rows))
            family_rows += sim_rows
        rows += family_rows
    print()
    for op in ops:
        print(f"  {op.name:<26} B={op.B} H={op.H} Lq={op.Lq} Lk={op.Lk} D={op.D}: {op.describe()}")
    for op in varlen_ops + kv_ops + moe_ops + linear_ops + lsh_ops + dist_ops:
        print(f"  {op.name:<26} {op.describe()}")
    for r in rows:
        if r.get("error"):
            print(f"\n{r['op']} ({r['dtype']}) failed:\n{r['error']}")
    bad = [r for r in rows if not r.get("ok")]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} ok in {time.perf_counter() - t0:.0f} s"
          + (f"; FAILED: {', '.join(r['op'] + ' ' + r['dtype'] for r in bad)}" if bad else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header(device), "rows": rows}, f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
