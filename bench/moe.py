"""MoE experts benchmark: tfk.moe.experts against Hugging Face's experts
implementations (and, on a GPU, torch's grouped_mm and the peers installed)
in the same process and dtype.

    python -m bench.moe                     # every shape, time and memory
    python -m bench.moe --shapes train_T4096 decode_T32 --reps 3
    python -m bench.moe --no-memory --json out.json
    python -m bench.moe --device cuda       # GPU mode (the default when a GPU is present)

CPU mode (the default without a GPU):

Implementations: "tfk" (tfk.moe.experts, backend "torch"), "hf_eager"
(MixtralExperts with config._experts_implementation = "eager": a Python loop
over the hit experts) and "hf_grouped_mm" (the same module with "grouped_mm":
torch's grouped_mm, where it runs on this CPU; "n/a" with the error where not).

Time: the median of --reps runs after one warm-up (on a shared machine pass
--threads 1: two intra-op threads contending with other processes make
small ops wait on each other, by 100x at worst), implementations
interleaved run by run (the machine may be shared). "fwd" runs under
no_grad; "fwd+bwd" is the forward with gradients to hidden_states, routing
weights and both weight tensors, and the backward of a fixed random dout.

Memory ("peak MiB", fwd+bwd rows): each (shape, implementation) runs once in a fresh
Python process, which resets its peak resident set (/proc/self/clear_refs)
just before the step (inputs, weights and dout already built, no warm-up)
and reports the peak (VmHWM) minus the resident set at that moment: what one step adds to the process at its peak, allocator caching
and library workspaces included, the same way for every implementation.

GPU mode (``--device cuda``; see run_gpu): the CPU shapes and the full-size
ones (Mixtral E=8 k=2 H=4096 I=14336, DeepSeek-like E=64 k=6 H=2048 I=1408,
T 1..16384; decode sizes, T <= 32, forward only) in bf16 and fp16, and fp32
for tfk. Implementations, one at a time (built, timed, freed): "tfk"
(backend "auto"; the backend it chose in brackets), "tfk_triton" and
"tfk_cuda" (backends named), "hf_eager" and "hf_grouped_mm" (on CUDA the
latter is torch's grouped GEMM), "torch_grouped_mm" (the expert GEMMs alone:
torch.nn.functional.grouped_mm, or torch._grouped_mm, on rows already grouped
by expert, the SiLU-and-multiply between them; no gather, no combine), and
"megablocks" (ParallelDroplessMLP, GLU, its default block-sparse mlp_impl,
driven with our routing) and "scattermoe" (GLUMLP) when importable, on
their own random weights (values do not change the time). Time: CUDA
events, the median of --reps after --warmup calls. TFLOP/s: the expert
GEMMs' flops (expert_flops: 2*M*H*2I + 2*M*I*H forward for M routed rows,
the backward twice the forward) over that time. Peak MiB:
torch.cuda.max_memory_allocated during one step minus the memory allocated
before it. "x eager": hf_eager's time over the implementation's, same shape,
dtype and mode.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tfk

from . import peak, table
from .peak import CudaTimer


@dataclass(frozen=True)
class MoEShape:
    name: str
    T: int
    E: int
    k: int
    H: int
    I: int
    dtype: str = "fp32"
    modes: tuple = ("fwd", "fwd+bwd")


SHAPES = {s.name: s for s in [
    # the targets: (a) training-sized fwd+bwd, (b) decode-sized fwd
    MoEShape("train_T4096", 4096, 8, 2, 1024, 2048),
    MoEShape("decode_T32", 32, 64, 6, 256, 128),
    # more: a single decode token, DeepSeek-like prefill, a small Mixtral-like layer
    MoEShape("decode_T1", 1, 64, 6, 256, 128, modes=("fwd",)),
    MoEShape("decode_T32_bf16", 32, 64, 6, 256, 128, dtype="bf16", modes=("fwd",)),
    MoEShape("deepseek_T1024", 1024, 64, 6, 256, 128),
    MoEShape("mixtral_small_T512", 512, 8, 2, 512, 1024),
]}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = ("tfk", "hf_eager", "hf_grouped_mm", "tfk_gemms")
FWD_ONLY = ("tfk_gemms",)


def make_inputs(s: MoEShape, seed=0, device="cpu", dtype=None):
    """x, expert ids, routing weights, gate_up_proj, down_proj, dout: drawn on
    ``device`` (no full-size weights through the host), in ``dtype``
    (default: the shape's)."""
    g = torch.Generator(device).manual_seed(seed)
    dt = dtype or _DTYPES[s.dtype]
    rn = lambda *size: torch.randn(*size, generator=g, device=device)  # noqa: E731
    x = rn(s.T, s.H).to(dt)
    logits = rn(s.T, s.E)
    r = tfk.moe.route(logits, s.k)
    w1 = (rn(s.E, 2 * s.I, s.H) / s.H ** 0.5).to(dt)
    w2 = (rn(s.E, s.H, s.I) / s.I ** 0.5).to(dt)
    dout = rn(s.T, s.H).to(dt)
    return x, r.experts, r.weights, w1, w2, dout


def make_impl(name, s: MoEShape, w1, w2, tfk_backend="torch"):
    """fn(x, ids, weights) -> out, and the weight leaves it differentiates,
    on w1's device and in its dtype. ``tfk_backend``: the backend "tfk" runs."""
    if name == "tfk":
        w1, w2 = w1.clone(), w2.clone()
        return (lambda x, ids, w: tfk.moe.experts(x, ids, w, w1, w2, backend=tfk_backend)), [w1, w2]
    if name == "tfk_gemms":
        return _gemms_impl(s, w1, w2), []
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    cfg = transformers.MixtralConfig(hidden_size=s.H, intermediate_size=s.I, num_local_experts=s.E,
                                     num_experts_per_tok=s.k, hidden_act="silu")
    cfg._experts_implementation = {"hf_eager": "eager", "hf_grouped_mm": "grouped_mm"}[name]
    with torch.device(w1.device):  # parameters made where they run
        module = MixtralExperts(cfg).to(w1.dtype)
    with torch.no_grad():
        module.gate_up_proj.copy_(w1)
        module.down_proj.copy_(w2)
    return (lambda x, ids, w: module(x, ids, w)), [module.gate_up_proj, module.down_proj]


def _gemms_impl(s: MoEShape, w1, w2):
    """The torch backend's two expert GEMMs alone, as its forward runs them
    (its mode: tfk._cpu's small-group kernel, torch's grouped_mm, a padded
    batch, or one mm per expert), on rows already sorted by expert: no
    routing, permutation or combine (the kernel gathers its rows and applies
    the activation between the products, as in the forward). The bound of
    any implementation built on these GEMMs: hf_eager's time over this one is
    the most such an implementation can gain on eager. The inputs of the call
    are ignored (fixed ids)."""
    from tfk.ops.moe import torch_backend as tb
    x, ids, w, _, _, _ = make_inputs(s, device=w1.device, dtype=w1.dtype)
    order, offsets, _, counts = tb.permute(ids, s.E)
    if tb._cpu_kernel_ok(x, s.k, w1, w2):   # as experts_forward decides
        token, wrow = order // s.k, w.reshape(-1).index_select(0, order)
        return lambda *_: (torch.ops.tfk_cpu.moe_experts_rows(x, token, offsets, wrow, w1, w2, "silu"),)
    rows = x.index_select(0, order // s.k)
    act = torch.randn(rows.shape[0], s.I, device=w1.device).to(w1.dtype)
    grouped = tb._grouped_ok(w1.dtype, w1, w2, rows=(s.H, 2 * s.I, s.I))
    groups = tb.Groups(counts, 3 * s.H * 2 * s.I, w1.device, grouped)   # experts_forward's choice
    if groups.grouped:
        gmm = tb._GroupedMM(offsets, counts)
        return lambda *_: (gmm.rows(rows, w1.transpose(1, 2)), gmm.rows(act, w2.transpose(1, 2)))
    if groups.padded:
        xp, ap = groups.pad(rows), groups.pad(act)
        w1g, w2g = groups.weights(w1).transpose(1, 2), groups.weights(w2).transpose(1, 2)
        return lambda *_: (groups.unpad(xp @ w1g), groups.unpad(ap @ w2g))
    return lambda *_: [(rows[a:b] @ w1[g].t(), act[a:b] @ w2[g].t()) for g, a, b in groups.loop()]


def step(fn, params, x, ids, w, dout, mode):
    if mode == "fwd":
        with torch.no_grad():
            fn(x, ids, w)
        return
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    fn(x, ids, w).backward(dout)


def time_shape(s: MoEShape, reps: int, impls=IMPLS):
    """{(impl, mode): median seconds or an error string}."""
    x, ids, w, w1, w2, dout = make_inputs(s)
    fns = {}
    for name in impls:
        try:
            fns[name] = make_impl(name, s, w1, w2)
        except Exception as e:  # noqa: BLE001 - reported
            fns[name] = f"n/a ({type(e).__name__}: {e})"
    results = {}
    for mode in s.modes:
        live = {}
        for name, f in fns.items():
            if isinstance(f, str) or (name in FWD_ONLY and mode != "fwd"):
                results[(name, mode)] = f if isinstance(f, str) else "-"
                continue
            try:
                step(*f, x, ids, w, dout, mode)  # warm-up
                live[name] = f
            except Exception as e:  # noqa: BLE001 - reported
                results[(name, mode)] = f"n/a ({type(e).__name__}: {str(e)[:80]})"
        times = {name: [] for name in live}
        for _ in range(reps):
            for name, f in live.items():
                t0 = time.perf_counter()
                step(*f, x, ids, w, dout, mode)
                times[name].append(time.perf_counter() - t0)
        for name in live:
            results[(name, mode)] = statistics.median(times[name])
    return results


def _memory_child(shape_name, impl, mode):
    peak.child_threads()
    s = SHAPES[shape_name]
    x, ids, w, w1, w2, dout = make_inputs(s)
    f = make_impl(impl, s, w1, w2)
    del w1, w2
    peak.report_step_peak(lambda: step(*f, x, ids, w, dout, mode))


def memory(s: MoEShape, impl, mode):
    """MiB one step adds at its peak, measured in a fresh process (see the module doc)."""
    return peak.child_peak_mib("bench.moe", s.name, impl, mode)


def _fmt(v, unit):
    if isinstance(v, str):
        return v[:40]
    return f"{v * 1e3:.2f}" if unit == "s" else f"{v:.0f}"


def _cpu_cols(memory):
    """The CPU table's columns; minimum widths so that rows printed as they
    are measured line up with the header printed first."""
    cols = [table.Col("shape", "<", 20), table.Col("mode", "<", 7)]
    for impl in IMPLS:
        cols.append(table.Col(f"{impl} ms", ">", 9))
        if memory and impl not in FWD_ONLY:
            cols.append(table.Col(f"{impl} MiB"))
    return cols + [table.Col("tfk speed x eager"), table.Col("GEMM bound x eager")] + (
        [table.Col("tfk memory x eager")] if memory else [])


def _cpu_cells(row, memory):
    cells = [row["shape"], row["mode"]]
    for impl in IMPLS:
        cells.append(_fmt(row[f"{impl}_s"], "s"))
        if memory and impl not in FWD_ONLY:
            cells.append(_fmt(row[f"{impl}_peak_mib"], "m") if f"{impl}_peak_mib" in row else "-")
    ratios = [row["speedup_vs_eager"], row["gemm_bound_vs_eager"]] + ([row["memory_vs_eager"]] if memory else [])
    return cells + [table.fmt(x, ".2f") + ("x" if x else "") for x in ratios]


def run_cpu(args):
    """CPU mode: one row per (shape, mode), implementations side by side."""
    memory_on = not args.no_memory
    cols = _cpu_cols(memory_on)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.reps}")
    print("ms: median time; speed x eager: hf_eager's time / tfk's; tfk_gemms: the expert GEMMs alone (fwd), "
          "GEMM bound x eager: hf_eager's time / tfk_gemms'" + (
        "; MiB: what one fwd+bwd step adds to a fresh process at its peak; memory x eager: tfk's / hf_eager's"
        if memory_on else ""))
    print(table.format_table(cols, []), flush=True)
    rows = []
    for name in args.shapes:
        s = SHAPES[name]
        times = time_shape(s, args.reps)
        for mode in s.modes:
            row = dict(shape=name, T=s.T, E=s.E, k=s.k, H=s.H, I=s.I, dtype=s.dtype, mode=mode)
            for impl in IMPLS:
                row[f"{impl}_s"] = times[(impl, mode)]
                if memory_on and mode == "fwd+bwd" and impl not in FWD_ONLY:
                    row[f"{impl}_peak_mib"] = memory(s, impl, mode)
            t, h, gm = row["tfk_s"], row["hf_eager_s"], row["tfk_gemms_s"]
            row["speedup_vs_eager"] = h / t if not isinstance(t, str) and not isinstance(h, str) else None
            row["gemm_bound_vs_eager"] = h / gm if not isinstance(gm, str) and not isinstance(h, str) else None
            tm, hm = row.get("tfk_peak_mib"), row.get("hf_eager_peak_mib")
            row["memory_vs_eager"] = tm / hm if isinstance(tm, float) and isinstance(hm, float) and hm > 0 else None
            rows.append(row)
            print(table.format_table(cols, [_cpu_cells(row, memory_on)], header=False), flush=True)
    return rows


# ---------------------------------------------------------------------------
# GPU mode
# ---------------------------------------------------------------------------

def _modes(T):
    return ("fwd",) if T <= 32 else ("fwd", "fwd+bwd")  # decode sizes: forward only


GPU_SHAPES = {s.name: s for s in [
    *(MoEShape(f"mixtral_T{T}", T, 8, 2, 4096, 14336, modes=_modes(T)) for T in (1, 32, 512, 4096, 16384)),
    *(MoEShape(f"deepseek_T{T}", T, 64, 6, 2048, 1408, modes=_modes(T)) for T in (1, 32, 512, 4096, 16384)),
]}
GPU_DTYPES = ("bf16", "fp16", "fp32")
GPU_IMPLS = ("tfk", "tfk_triton", "tfk_cuda", "hf_eager", "hf_grouped_mm", "torch_grouped_mm", "megablocks",
             "scattermoe")
TFK_BACKENDS = {"tfk": "auto", "tfk_triton": "triton", "tfk_cuda": "cuda"}
FP32_IMPLS = tuple(TFK_BACKENDS)   # the peers' fast paths are half precision only
PEERS = ("megablocks", "scattermoe")  # timed when importable


def expert_flops(s: MoEShape, mode, rows=None):
    """Flops of the expert GEMMs for ``rows`` routed rows (default T*k):
    gate_up (M x H times H x 2I) and down (M x I times I x H), 2 flops a
    multiply-add; the backward (input and weight gradients) twice the forward."""
    M = s.T * s.k if rows is None else rows
    fwd = 2 * M * s.H * 2 * s.I + 2 * M * s.I * s.H
    return fwd if mode == "fwd" else 3 * fwd


def _grouped_mm_impl(s: MoEShape, x, ids, w1, w2):
    """The expert GEMMs alone on rows already grouped by expert: (fwd, fwd+bwd
    closures' body) as fn(rows) -> out rows, the rows, and the weight leaves."""
    grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped_mm is None:
        raise RuntimeError(f"torch {torch.__version__} has no grouped_mm")
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    rows = x.index_select(0, order // s.k)          # grouping: outside the timed call
    offs = torch.bincount(flat, minlength=s.E).cumsum(0).to(torch.int32)
    w1, w2 = w1.clone(), w2.clone()

    def fn(a):
        gate, up = grouped_mm(a, w1.transpose(-2, -1), offs=offs).chunk(2, -1)
        return grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    return fn, rows, [w1, w2]


def _peer_impl(name, s: MoEShape, w1):
    """MegaBlocks or ScatterMoE as fn(x, ids, weights) -> out, with the weight leaves."""
    if name == "megablocks":
        from megablocks.layers import moe as mb_moe
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import ParallelDroplessMLP
        args = Arguments(hidden_size=s.H, ffn_hidden_size=s.I, moe_num_experts=s.E, moe_top_k=s.k, mlp_type="glu",
                         bias=False, return_bias=False, activation_fn=F.silu, moe_loss_weight=0.0,
                         fp16=w1.dtype == torch.float16, bf16=w1.dtype == torch.bfloat16, device=w1.device)
        module = ParallelDroplessMLP(args)
        scores = torch.full((s.T, s.E), 1.0 / s.E, device=w1.device, dtype=w1.dtype)  # only its aux loss reads them

        def fn(x, ids, w):
            out = module(x, scores, w, ids)
            getattr(mb_moe, "clear_load_balancing_loss", lambda: None)()  # it keeps what it saved otherwise
            return out[0] if isinstance(out, tuple) else out
        return fn, list(module.parameters())
    from scattermoe.mlp import GLUMLP
    module = GLUMLP(input_size=s.H, hidden_size=s.I, num_experts=s.E, top_k=s.k, activation=torch.nn.SiLU())
    module = module.to(device=w1.device, dtype=w1.dtype)
    return (lambda x, ids, w: module(x, w, ids)), list(module.parameters())


def build_steps(name, s: MoEShape, inputs):
    """{mode: step()} for implementation ``name`` on ``inputs`` (make_inputs'
    tuple, on the device and in the dtype to time), and the tfk backend that
    ran (or None)."""
    x, ids, w, w1, w2, dout = inputs
    chosen = None
    if name == "torch_grouped_mm":
        fn, rows, params = _grouped_mm_impl(s, x, ids, w1, w2)
        drows = torch.randn(rows.shape, generator=torch.Generator(rows.device).manual_seed(1),
                            device=rows.device).to(rows.dtype)

        def run(mode):
            if mode == "fwd":
                with torch.no_grad():
                    fn(rows)
                return
            for p in params:
                p.requires_grad_(True)
            fn(rows.detach().requires_grad_()).backward(drows)
            _free_grads(params)
        return {mode: (lambda mode=mode: run(mode)) for mode in s.modes}, None
    if name in TFK_BACKENDS:
        fn, params = make_impl("tfk", s, w1, w2, tfk_backend=TFK_BACKENDS[name])
        with tfk.backends.record_choices() as ran, torch.no_grad():
            fn(x, ids, w)
        chosen = ran[0] if ran else None
    elif name in PEERS:
        fn, params = _peer_impl(name, s, w1)
    else:
        fn, params = make_impl(name, s, w1, w2)

    def run(mode):
        step(fn, params, x, ids, w, dout, mode)
        _free_grads(params)
    return {mode: (lambda mode=mode: run(mode)) for mode in s.modes}, chosen


def _free_grads(params):
    """Drop the weight gradients a step made, so that the next step's peak
    memory is measured from the inputs and weights alone."""
    for p in params:
        p.grad = None


def run_gpu(shapes, dtypes=GPU_DTYPES, impls=GPU_IMPLS, *, device="cuda", timer=None, log=None):
    """Rows, one per (shape, dtype, mode, implementation): ms, TFLOP/s of the
    expert GEMMs, peak MiB, and hf_eager's time over this one ("x_eager").
    ``timer``: CudaTimer() by default (see there for what a stand-in needs);
    ``log(row)`` is called as each row is done. Implementations run one at a
    time and are freed before the next."""
    timer = timer or CudaTimer()
    rows = []
    for s in shapes:
        for dt in dtypes:
            inputs = make_inputs(s, device=device, dtype=_DTYPES[dt])
            done = []
            for name in impls:
                if dt == "fp32" and name not in FP32_IMPLS:
                    continue
                base = dict(shape=s.name, T=s.T, E=s.E, k=s.k, H=s.H, I=s.I, dtype=dt, impl=name, x_eager=None)
                done += peak.measure_rows(base, s.modes, lambda: build_steps(name, s, inputs), timer,
                                          lambda mode: expert_flops(s, mode))
                if device != "cpu" and torch.cuda.is_available():
                    torch.cuda.empty_cache()
            eager = {r["mode"]: r["ms"] for r in done if r["impl"] == "hf_eager" and r["ms"]}
            for r in done:
                if r["ms"] and r["mode"] in eager:
                    r["x_eager"] = eager[r["mode"]] / r["ms"]
                if log:
                    log(r)
            rows += done
    return rows


GPU_COLS = [table.Col("shape", "<", 16), table.Col("dtype", "<", 5), table.Col("mode", "<", 7),
            table.Col("impl", "<", 24), table.Col("ms", ">", 9), table.Col("TFLOP/s", ">", 8),
            table.Col("peak MiB", ">", 9), table.Col("x eager", ">", 7)]


def gpu_cells(r):
    impl = r["impl"] + (f"[{r['backend']}]" if r.get("backend") else "")
    if r.get("error"):
        return [r["shape"], r["dtype"], r["mode"], impl, r["error"]]
    return [r["shape"], r["dtype"], r["mode"], impl, table.fmt(r["ms"], ".3f"), table.fmt(r["tflops"], ".1f"),
            table.fmt(r["peak_mib"], ".0f"), table.fmt(r["x_eager"], ".2f")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present")
    ap.add_argument("--shapes", nargs="*", help="default: every shape of the mode")
    ap.add_argument("--reps", type=int, default=None, help="timed runs (default: 5 on CPU, 20 on GPU)")
    ap.add_argument("--warmup", type=int, default=3, help="GPU mode: untimed calls first")
    ap.add_argument("--dtypes", nargs="*", default=list(GPU_DTYPES), help="GPU mode (fp32: tfk only)")
    ap.add_argument("--impls", nargs="*", default=list(GPU_IMPLS), help="GPU mode")
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is present (torch.cuda.is_available() is False)")
    known = SHAPES if device == "cpu" else {**SHAPES, **GPU_SHAPES}
    args.shapes = args.shapes or list(known)
    unknown = [n for n in args.shapes if n not in known]
    if unknown:
        ap.error(f"unknown shape(s) {unknown} for {device}; known: {', '.join(known)}")
    if device == "cpu":
        args.reps = args.reps or 5
        rows = run_cpu(args)
    else:
        impls = list(args.impls)
        for peer in PEERS:
            if peer in impls and importlib.util.find_spec(peer) is None:
                print(f"{peer}: not installed, skipped")
                impls.remove(peer)
        timer = CudaTimer(args.warmup, args.reps or 20)
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; CUDA events, median of {timer.reps} "
              f"after {timer.warmup} warm-up calls\nTFLOP/s: expert GEMMs, 6*M*H*I per forward for M = T*k rows "
              "(x3 fwd+bwd); peak MiB: max_memory_allocated growth in one step; x eager: hf_eager's time / this")
        print(table.format_table(GPU_COLS, []), flush=True)
        log = lambda r: print(table.format_table(GPU_COLS, [gpu_cells(r)], header=False), flush=True)  # noqa: E731
        rows = run_gpu([known[n] for n in args.shapes], args.dtypes, impls, device=device, timer=timer, log=log)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
