"""MoE experts benchmark, CPU mode: tfk.moe.experts (backend "torch") against
Hugging Face's experts implementations in the same process and dtype.

    python -m bench.moe                     # every shape, time and memory
    python -m bench.moe --shapes train_T4096 decode_T32 --reps 3
    python -m bench.moe --no-memory --json out.json

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
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

import tfk


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
    MoEShape("deepseek_T1024", 1024, 64, 6, 256, 128),
    MoEShape("mixtral_small_T512", 512, 8, 2, 512, 1024),
]}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = ("tfk", "hf_eager", "hf_grouped_mm")


def make_inputs(s: MoEShape, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = _DTYPES[s.dtype]
    x = torch.randn(s.T, s.H, generator=g).to(dt)
    logits = torch.randn(s.T, s.E, generator=g)
    r = tfk.moe.route(logits, s.k)
    w1 = (torch.randn(s.E, 2 * s.I, s.H, generator=g) / s.H ** 0.5).to(dt)
    w2 = (torch.randn(s.E, s.H, s.I, generator=g) / s.I ** 0.5).to(dt)
    dout = torch.randn(s.T, s.H, generator=g).to(dt)
    return x, r.experts, r.weights, w1, w2, dout


def make_impl(name, s: MoEShape, w1, w2):
    """fn(x, ids, weights) -> out, and the weight leaves it differentiates."""
    if name == "tfk":
        w1, w2 = w1.clone(), w2.clone()
        return (lambda x, ids, w: tfk.moe.experts(x, ids, w, w1, w2, backend="torch")), [w1, w2]
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    cfg = transformers.MixtralConfig(hidden_size=s.H, intermediate_size=s.I, num_local_experts=s.E,
                                     num_experts_per_tok=s.k, hidden_act="silu")
    cfg._experts_implementation = {"hf_eager": "eager", "hf_grouped_mm": "grouped_mm"}[name]
    module = MixtralExperts(cfg).to(_DTYPES[s.dtype])
    with torch.no_grad():
        module.gate_up_proj.copy_(w1)
        module.down_proj.copy_(w2)
    return (lambda x, ids, w: module(x, ids, w)), [module.gate_up_proj, module.down_proj]


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
            if isinstance(f, str):
                results[(name, mode)] = f
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


def _status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_child(shape_name, impl, mode):
    if os.environ.get("TFK_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["TFK_BENCH_THREADS"]))
    s = SHAPES[shape_name]
    x, ids, w, w1, w2, dout = make_inputs(s)
    f = make_impl(impl, s, w1, w2)
    del w1, w2
    with open("/proc/self/clear_refs", "w") as fh:   # resets the peak (VmHWM) to the current RSS
        fh.write("5")
    before = _status_mib("VmRSS")
    step(*f, x, ids, w, dout, mode)
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - before}))


def memory(s: MoEShape, impl, mode):
    """MiB one step adds at its peak, measured in a fresh process (see the module doc)."""
    r = subprocess.run([sys.executable, "-m", "bench.moe", "--memory-child", s.name, impl, mode],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode:
        return f"n/a ({(r.stderr.strip().splitlines() or ['?'])[-1][:80]})"
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"]


def _fmt(v, unit):
    if isinstance(v, str):
        return v[:40]
    return f"{v * 1e3:.2f} ms" if unit == "s" else f"{v:.0f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.reps}")
    rows = []
    for name in args.shapes:
        s = SHAPES[name]
        times = time_shape(s, args.reps)
        for mode in s.modes:
            row = dict(shape=name, T=s.T, E=s.E, k=s.k, H=s.H, I=s.I, dtype=s.dtype, mode=mode)
            for impl in IMPLS:
                row[f"{impl}_s"] = times[(impl, mode)]
                if not args.no_memory and mode == "fwd+bwd":
                    row[f"{impl}_peak_mib"] = memory(s, impl, mode)
            t, h = row["tfk_s"], row["hf_eager_s"]
            row["speedup_vs_eager"] = h / t if not isinstance(t, str) and not isinstance(h, str) else None
            tm, hm = row.get("tfk_peak_mib"), row.get("hf_eager_peak_mib")
            row["memory_vs_eager"] = tm / hm if isinstance(tm, float) and isinstance(hm, float) and hm > 0 else None
            rows.append(row)
            line = f"{name:20s} {mode:8s} " + "  ".join(
                f"{impl} {_fmt(row[f'{impl}_s'], 's')}" + (f" / {_fmt(row[f'{impl}_peak_mib'], 'm')}"
                                                          if f"{impl}_peak_mib" in row else "")
                for impl in IMPLS)
            if row["speedup_vs_eager"]:
                line += f"  | tfk {row['speedup_vs_eager']:.2f}x eager's speed"
            if row["memory_vs_eager"]:
                line += f", {row['memory_vs_eager']:.2f}x its peak memory"
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
