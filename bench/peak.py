"""Peak resident memory of one step, in a fresh process (the CPU benches'
"peak MiB"): the parent runs ``python -m <module> --memory-child ARGS``; the
child builds its inputs, calls ``report_step_peak(step)``, which resets the
peak resident set (/proc/self/clear_refs), runs the step and prints the peak
(VmHWM) minus the resident set before it: what one step adds at its peak,
allocator caching and library workspaces included.

On a GPU the benches' time and peak memory come from CudaTimer instead (CUDA
events; torch.cuda.max_memory_allocated), in the same process, and
measure_rows makes the GPU modes' rows of one implementation."""
from __future__ import annotations

import json
import statistics
import time
import os
import subprocess
import sys

import torch

from .table import Col, fmt

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_threads():
    """In the child, first: the parent's --threads (TFK_BENCH_THREADS), when set."""
    if os.environ.get("TFK_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["TFK_BENCH_THREADS"]))


def report_step_peak(step):
    """In the child: run step() once and print {"peak_mib": ...} (see the module doc)."""
    with open("/proc/self/clear_refs", "w") as fh:   # resets the peak (VmHWM) to the current RSS
        fh.write("5")
    before = _status_mib("VmRSS")
    step()
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - before}))


def child_peak_mib(module, *args):
    """In the parent: MiB one step adds at its peak in a fresh ``python -m module
    --memory-child *args``, or "n/a (the child's last error line)"."""
    r = subprocess.run([sys.executable, "-m", module, "--memory-child", *map(str, args)],
                       capture_output=True, text=True, cwd=_ROOT)
    if r.returncode:
        return f"n/a ({(r.stderr.strip().splitlines() or ['?'])[-1][:80]})"
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mib"]


class CudaTimer:
    """Times a step with CUDA events: ``warmup`` calls, then the median of
    ``reps``; ``peak_bytes``: torch.cuda.max_memory_allocated during one
    step minus the memory allocated before it. A test passes any object with
    these two methods (and CPU tensors)."""

    def __init__(self, warmup=3, reps=10):
        self.warmup, self.reps = warmup, reps

    def time(self, fn):
        """Median seconds of one call."""
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def peak_bytes(self, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before


def error_text(e):
    """A row's "n/a (Type: first line)" for an exception."""
    return f"n/a ({type(e).__name__}: {str(e).strip().splitlines()[0][:100] if str(e).strip() else ''})"


def measure_rows(base, modes, build, timer, flops):
    """The GPU modes' rows of one implementation, one per mode: ``base`` plus
    mode, backend, ms, tflops (flops(mode) over the time) and peak_mib, or an
    "error" that says why. ``build()`` -> ({mode: step()}, the tfk backend
    that ran or None); when it raises, every row says why. ``timer``:
    CudaTimer, or a stand-in with its time(fn) and peak_bytes(fn)."""
    steps, chosen, failed = None, None, None
    try:
        steps, chosen = build()
    except Exception as e:  # noqa: BLE001 - a row that says why
        failed = error_text(e)
    rows = []
    for mode in modes:
        row = dict(base, mode=mode, backend=chosen, ms=None, tflops=None, peak_mib=None)
        if failed:
            row["error"] = failed
        else:
            try:
                t = timer.time(steps[mode])
                row.update(ms=t * 1e3, tflops=flops(mode) / t / 1e12,
                           peak_mib=timer.peak_bytes(steps[mode]) / 2 ** 20)
            except Exception as e:  # noqa: BLE001
                row["error"] = error_text(e)
        rows.append(row)
    return rows


def measure_impls(impls, base, modes, build, timer, flops, peers, device):
    """The GPU modes' rows of one (shape, dtype), every implementation in turn:
    measure_rows of ``build(name)`` with ``flops(name, mode)``, the GPU's
    cache emptied between them, and x_<peer>, each peer's time over the row's
    in the same mode (None where either did not run). ``base`` gets impl and
    the x_ keys."""
    rows = []
    for name in impls:
        row_base = dict(base, impl=name, **{f"x_{p}": None for p in peers})
        rows += measure_rows(row_base, modes, lambda: build(name), timer, lambda mode: flops(name, mode))
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()
    for peer in peers:
        ref = {r["mode"]: r["ms"] for r in rows if r["impl"] == peer and r["ms"]}
        for r in rows:
            if r["ms"] and r["mode"] in ref:
                r[f"x_{peer}"] = ref[r["mode"]] / r["ms"]
    return rows


def gpu_cols(shape_width, peers):
    """The GPU modes' table columns (bench.table), with a time ratio per peer."""
    return ([Col("shape", "<", shape_width), Col("dtype", "<", 5), Col("mode", "<", 7), Col("impl", "<", 20),
             Col("ms", ">", 9), Col("TFLOP/s", ">", 8), Col("peak MiB", ">", 9)]
            + [Col(f"x {p}", ">", 6) for p in peers])


def gpu_cells(r, peers):
    """A GPU-mode row's cells for gpu_cols: the backend "auto" chose in brackets, or the error."""
    impl = r["impl"] + (f"[{r['backend']}]" if r.get("backend") else "")
    if r.get("error"):
        return [r["shape"], r["dtype"], r["mode"], impl, r["error"]]
    return ([r["shape"], r["dtype"], r["mode"], impl, fmt(r["ms"], ".3f"), fmt(r["tflops"], ".1f"),
             fmt(r["peak_mib"], ".0f")] + [fmt(r[f"x_{p}"], ".2f") for p in peers])


def cpu_step(fn, inputs, dout, mode):
    """One step of the CPU benches: fn(*inputs) under no_grad ("fwd"), or with
    gradients to every input and the backward of ``dout`` ("fwd+bwd")."""
    if mode == "fwd":
        with torch.no_grad():
            fn(*inputs)
        return
    leaves = [t.detach().requires_grad_() for t in inputs]
    fn(*leaves).backward(dout)


def time_interleaved(fns, inputs, dout, modes, reps, long):
    """{(name, mode): median seconds of cpu_step, or the reason string} for
    ``fns`` {name: fn, or a string saying why it is not run}. Per mode: one
    warm-up each (a step slower than ``long`` seconds is timed by it alone),
    then ``reps`` runs with the implementations interleaved run by run (the
    machine may be shared)."""
    results = {}
    for mode in modes:
        live = {}
        for name, fn in fns.items():
            if isinstance(fn, str):
                results[(name, mode)] = fn
                continue
            t0 = time.perf_counter()
            cpu_step(fn, inputs, dout, mode)   # warm-up
            first = time.perf_counter() - t0
            if first > long:
                results[(name, mode)] = first
            else:
                live[name] = fn
        times = {name: [] for name in live}
        for _ in range(reps):
            for name, fn in live.items():
                t0 = time.perf_counter()
                cpu_step(fn, inputs, dout, mode)
                times[name].append(time.perf_counter() - t0)
        for name in live:
            results[(name, mode)] = statistics.median(times[name])
    return results
