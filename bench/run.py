"""Benchmark runner: tfk against torch SDPA (dense mask) and FlexAttention.

    python -m bench.run [--mode auto|cpu|gpu] [--only NAME ...] [--repeat N]
                        [--no-flex] [--json PATH] [--backend NAME] [--in-process]

CPU mode (``auto`` without a GPU) times, for every CPU-tier shape of
``bench.registry``:

- ``tfk``: ``tfk.attention(q, k, v, pattern)`` with "auto"'s backend (the block
  engine "torch" for patterns; "sdpa", torch's own kernel, for plain dense and
  causal shapes), forward and forward+backward;
- ``sdpa``: torch's own ``scaled_dot_product_attention`` with the pattern's
  dense bool mask (``is_causal=True`` for plain causal), forward and
  forward+backward: the baseline every ratio divides;
- ``flex``: ``torch.compile(flex_attention)`` with a BlockMask from
  ``create_block_mask`` whose ``mask_mod`` calls the pattern's own ``mask``
  (or, when that cannot be traced, looks the dense mask up: the output says
  so); forward only, as FlexAttention has no CPU backward.

Forward is timed under ``torch.no_grad()``; forward+backward is one forward
with grad-requiring inputs then ``out.backward(dout)``. Each (shape, impl)
runs in a fresh worker process: inputs built from a fixed seed, one warm-up
call of each kind (FlexAttention's first call compiles; its time is reported,
not counted), then the median of ``--repeat`` calls. Peak memory is measured
on one more call, over a baseline with the inputs (and the dense mask or
block mask) already allocated: the table gives the peak of live tensor memory
(the torch profiler's allocation events: the CPU analogue of CUDA's
``max_memory_allocated``, exact and repeatable); the notes add the growth of
the process's resident set (``malloc_trim``, then the kernel's high-water mark
reset through ``/proc/self/clear_refs``), which includes what the allocator
holds on to and varies between runs. In GPU mode memory comes from CUDA's
peak-allocation stats, and times from ``triton.testing.do_bench`` (median).

Every impl's output (and gradients) is compared with SDPA's: a fast wrong
answer shows in the ``|dout|``/``|dgrad|`` columns and makes the exit code 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import contextlib
import ctypes
import gc
import json
import math
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import tfk
from tfk.backends import AttentionCall, select_backend
from tfk.ops.attention.api import torch_sdpa

from .registry import Shape, get_shape, shapes_for
from . import table

IMPLS = ("tfk", "sdpa", "flex")
# flash-attn, where installed, joins in GPU mode for the shapes it can express
# (dense, causal, an undilated causal window).
FLASH = importlib.util.find_spec("flash_attn") is not None
PLAN_BLOCK = 64  # tile size used for the reported plan density (the torch backend's)

# Output agreement with SDPA: max |diff| <= TOL * max(1, max |sdpa|), per dtype.
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# ---------------------------------------------------------------------------
# Memory measurement
# ---------------------------------------------------------------------------

def _status_kib(key):
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) if m else None


class _TensorPeak:
    """Peak growth of live tensor memory during a block, in bytes: the CPU
    counterpart of ``torch.cuda.max_memory_allocated``. Every allocation and
    free of torch's CPU allocator inside the block is recorded by the
    profiler (``profile_memory=True``); the peak of their running sum is the
    block's own working set (inputs allocated before the block are the
    baseline). Deterministic; excludes allocator overhead and memory that
    libraries allocate outside torch (small scratch)."""

    ok = True

    @contextlib.contextmanager
    def measure(self, result: dict, key: str):
        from torch.profiler import ProfilerActivity, profile
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        try:
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
            events.sort(key=lambda e: e.start_ns())
            cur = peak = 0
            for e in events:
                cur += e.nbytes()
                peak = max(peak, cur)
            result[key] = peak if events else None
        except (AttributeError, RuntimeError):  # profiler internals moved: say "n/a", never guess
            result[key] = None


class _HostPeak:
    """Peak resident-set growth of this process during a block, in bytes.

    Before the block: collect garbage, hand freed malloc pages back to the OS
    (``malloc_trim``), reset the kernel's high-water mark
    (``echo 5 > /proc/self/clear_refs``) and read the resident set. After:
    the high-water mark minus that baseline. Includes what the allocator keeps
    (glibc heap fragmentation), so it varies by tens of percent between runs.
    """

    def __init__(self):
        self.ok = False
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = _status_kib("VmHWM") is not None
        except (OSError, AttributeError):
            self.ok = False

    @contextlib.contextmanager
    def measure(self, result: dict, key: str):
        if not self.ok:
            result[key] = None
            yield
            return
        gc.collect()
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        yield
        result[key] = max(_status_kib("VmHWM") - base, 0) * 1024


class _CudaPeak:
    ok = True

    @contextlib.contextmanager
    def measure(self, result: dict, key: str):
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        result[key] = torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------

def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _dense_mask4(pattern, Lq, Lk, device):
    m = pattern.dense_mask(Lq, Lk, device=device)
    return m.unsqueeze(0) if m.dim() == 3 else m


def _make_block_mask(pattern, Lq, Lk, device):
    """A BlockMask whose mask_mod calls ``pattern.mask``; falls back to a
    lookup in the dense mask. Returns (block_mask, how, mask_mod_fallback)."""
    from torch.nn.attention.flex_attention import create_block_mask
    H = pattern.heads
    direct = lambda b, h, qi, ki: pattern.mask(h, qi, ki, Lq, Lk)  # noqa: E731
    try:
        return create_block_mask(direct, None, H, Lq, Lk, device=device), "pattern.mask traced", None
    except Exception as e:  # noqa: BLE001 -- any tracing failure means: fall back
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return _lookup_block_mask(pattern, Lq, Lk, device) + (why,)


def _lookup_block_mask(pattern, Lq, Lk, device):
    from torch.nn.attention.flex_attention import create_block_mask
    dense = pattern.dense_mask(Lq, Lk, device=device)
    if dense.dim() == 2:
        lookup = lambda b, h, qi, ki: dense[qi, ki]  # noqa: E731
        H = None
    else:
        lookup = lambda b, h, qi, ki: dense[h, qi, ki]  # noqa: E731
        H = dense.shape[0]
    return create_block_mask(lookup, None, H, Lq, Lk, device=device), "dense-mask lookup"


class _Impl:
    """fn(q, k, v) -> out for one (shape, impl); built before the memory baseline."""

    def __init__(self, shape: Shape, impl: str, device, backend: str):
        self.shape, self.impl = shape, impl
        self.notes = []
        self.backward = True
        self.backend_name = None
        pattern = shape.make_pattern()
        Lq, Lk, gqa = shape.Lq, shape.Lk, shape.gqa
        if impl == "tfk":
            self.backend_name = _tfk_backend_name(shape, pattern, device, backend)
            self.fn = lambda q, k, v: tfk.attention(q, k, v, pattern, backend=backend)
            if self.backend_name == "sdpa":
                self.notes.append("plain dense/causal: backend 'sdpa' is torch's own fused kernel")
        elif impl == "tfk-cuda":
            self.backend_name = "cuda"
            self.fn = lambda q, k, v: tfk.attention(q, k, v, pattern, backend="cuda")
        elif impl == "sdpa":
            if shape.causal:
                self.fn = lambda q, k, v: torch_sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
                self.notes.append("is_causal=True")
            elif pattern is None:
                self.fn = lambda q, k, v: torch_sdpa(q, k, v, enable_gqa=gqa)
            else:
                mask = _dense_mask4(pattern, Lq, Lk, device)
                self.fn = lambda q, k, v: torch_sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa)
                self.notes.append(f"dense bool mask {tuple(mask.shape)}")
        elif impl == "flash":
            from flash_attn import flash_attn_func
            if not flash_expresses(shape, pattern):
                raise ValueError(f"flash-attn cannot express {pattern!r}")
            window = (pattern.left, pattern.right) if isinstance(pattern, tfk.patterns.SlidingWindow) else (-1, -1)
            causal = shape.causal
            # flash-attn takes (B, L, H, D)
            self.fn = lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      causal=causal, window_size=window).transpose(1, 2)
        elif impl == "flex":
            self.backward = torch.device(device).type != "cpu"
            self.flex = _flex_compiled()
            self.block_mask = None
            self.fallback_reason = None
            if pattern is not None:
                self.block_mask, how, self.fallback_reason = _make_block_mask(pattern, Lq, Lk, device)
                self.notes.append(f"mask_mod: {how}")
                if self.fallback_reason:
                    self.notes.append(f"pattern.mask not traceable by create_block_mask ({self.fallback_reason})")
            self.pattern = pattern
            self.fn = lambda q, k, v: self.flex(q, k, v, block_mask=self.block_mask, enable_gqa=gqa)
        else:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def first_call(self, q, k, v):
        """The warm-up forward. For flex, a compile failure with a traced
        mask_mod falls back to the dense-mask lookup."""
        try:
            return self.fn(q, k, v)
        except Exception as e:  # noqa: BLE001
            if self.impl != "flex" or self.block_mask is None or self.fallback_reason is not None:
                raise
            self.fallback_reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            self.block_mask, how = _lookup_block_mask(self.pattern, self.shape.Lq, self.shape.Lk, q.device)
            self.notes = [n for n in self.notes if not n.startswith("mask_mod")]
            self.notes.append(f"mask_mod: {how}")
            self.notes.append(f"pattern.mask failed under torch.compile ({self.fallback_reason})")
            return self.fn(q, k, v)


def flash_expresses(shape, pattern):
    """Whether flash-attn computes this shape's pattern: dense, causal, or an
    undilated causal window (flash-attn's windows are bottom-right aligned,
    which equals top-left when Lq == Lk)."""
    if pattern is None or shape.causal:
        return True
    window = isinstance(pattern, tfk.patterns.SlidingWindow) and pattern.dilation == 1
    return window and pattern.right == 0 and shape.Lq == shape.Lk


def _tfk_backend_name(shape, pattern, device, backend):
    q = torch.empty(shape.B, shape.H, shape.Lq, shape.D, device=device, dtype=shape.torch_dtype)
    k = torch.empty(shape.B, shape.Hkv, shape.Lk, shape.D, device=device, dtype=shape.torch_dtype)
    call = AttentionCall(q, k, k, pattern, None, 1.0 / math.sqrt(shape.D), 0.0, False)
    return select_backend(backend, call).name


# ---------------------------------------------------------------------------
# One (shape, impl): the worker
# ---------------------------------------------------------------------------

def _median_ms(fn, repeat, sync):
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(shape: Shape, impl: str, *, device="cpu", repeat=3, backend="auto"):
    """Time and measure one (shape, impl) in this process.

    Returns (row, tensors): row is a JSON-able dict; tensors holds ``out``
    (the forward output) and, where forward+backward ran, ``grads``
    (dq, dk, dv), as float32 CPU tensors for cross-checking.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    row = {"shape": shape.name, "impl": impl, "device": str(device), "fwd_ms": None, "fwdbwd_ms": None,
           "peak_fwd_bytes": None, "peak_fwdbwd_bytes": None, "rss_fwd_bytes": None, "rss_fwdbwd_bytes": None,
           "first_call_s": None, "notes": [],
           "backend": None, "error": None}
    tensors = {}
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    peak = _CudaPeak() if gpu else _TensorPeak()
    rss = None if gpu else _HostPeak()
    if rss is not None and not rss.ok:
        rss = None
        row["notes"].append("resident-set growth unavailable (no /proc/self/clear_refs)")
    q, k, v, dout = shape.make_inputs(device)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    imp = _Impl(shape, impl, device, backend)
    row["backend"] = imp.backend_name

    # warm-up (flex compiles here)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = imp.first_call(q, k, v)
        sync()
        row["first_call_s"] = time.perf_counter() - t0
    tensors["out"] = out.detach().float().cpu()
    del out

    def fwd():
        with torch.no_grad():
            imp.fn(q, k, v)

    def fwdbwd():
        for t in (qg, kg, vg):
            t.grad = None
        imp.fn(qg, kg, vg).backward(dout)

    if imp.backward:
        fwdbwd()
        sync()

    if gpu:
        import triton.testing
        row["fwd_ms"] = triton.testing.do_bench(fwd, return_mode="median")
        if imp.backward:
            row["fwdbwd_ms"] = triton.testing.do_bench(fwdbwd, grad_to_none=[qg, kg, vg], return_mode="median")
    else:
        row["fwd_ms"] = _median_ms(fwd, repeat, sync)
        if imp.backward:
            row["fwdbwd_ms"] = _median_ms(fwdbwd, repeat, sync)

    # memory: one more call of each kind per meter (resident set first, as the
    # profiler's own bookkeeping would inflate it)
    meters = [("peak", peak)] + ([("rss", rss)] if rss is not None else [])
    for prefix, meter in reversed(meters):
        with meter.measure(row, f"{prefix}_fwd_bytes"):
            fwd()
        if imp.backward:
            for t in (qg, kg, vg):
                t.grad = None
            with meter.measure(row, f"{prefix}_fwdbwd_bytes"):
                fwdbwd()
    if imp.backward:
        tensors["grads"] = tuple(t.grad.detach().float().cpu() for t in (qg, kg, vg))
    row["notes"] += imp.notes
    return row, tensors


def _worker_main(job_path):
    """Entry point of a worker process: job.pkl in, result.pt out."""
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    result_path = job.pop("result")
    threads = job.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    try:
        row, tensors = measure(**job)
    except Exception:  # noqa: BLE001 -- reported in the row
        row = {"shape": job["shape"].name, "impl": job["impl"], "error": traceback.format_exc(limit=6)}
        tensors = {}
    torch.save({"row": row, "tensors": tensors}, result_path)


def _run_isolated(shape, impl, device, repeat, backend, tmpdir, timeout, threads=None):
    job = os.path.join(tmpdir, f"{shape.name}.{impl}.job.pkl")
    result = os.path.join(tmpdir, f"{shape.name}.{impl}.result.pt")
    with open(job, "wb") as f:
        pickle.dump({"shape": shape, "impl": impl, "device": str(device), "repeat": repeat,
                     "backend": backend, "result": result, "threads": threads}, f)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        p = subprocess.run([sys.executable, "-m", "bench.run", "--_worker", job], env=env, cwd=root,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"shape": shape.name, "impl": impl, "error": f"worker timed out after {timeout} s"}, {}
    if not os.path.exists(result):
        noise = ("USDT:", "SyncActivityProfilerHandler", "DeviceProperties.cpp", "Warning")
        tail = [l for l in (p.stderr or p.stdout or "").strip().splitlines()
                if not any(n in l for n in noise)][-5:]
        return {"shape": shape.name, "impl": impl,
                "error": f"worker exited with {p.returncode} (killed for memory?): " + " | ".join(tail)}, {}
    data = torch.load(result, weights_only=False)
    os.remove(result)
    return data["row"], data["tensors"]


# ---------------------------------------------------------------------------
# Density, comparison, the driver
# ---------------------------------------------------------------------------

def pair_density(pattern, Lq, Lk, rows=1024):
    """Fraction of (query, key) pairs the pattern allows (averaged over heads)."""
    if pattern is None:
        return 1.0
    heads = pattern.heads or 1
    h = torch.arange(heads).view(-1, 1, 1) if pattern.heads else 0
    j = torch.arange(Lk).view(1, 1, -1)
    total = 0
    for r0 in range(0, Lq, rows):
        i = torch.arange(r0, min(Lq, r0 + rows)).view(1, -1, 1)
        total += int(pattern.mask(h, i, j, Lq, Lk).expand(heads, i.shape[1], Lk).sum())
    return total / (heads * Lq * Lk) if Lq * Lk else 0.0


def _max_diff(a, b):
    d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return d if math.isfinite(d) else float("inf")


def _compare(rows_by_impl, tensors_by_impl, dtype):
    """Fill in |dout| and |dgrad| against SDPA (or, without SDPA, tfk)."""
    ref_impl = "sdpa" if "sdpa" in tensors_by_impl else "tfk"
    ref = tensors_by_impl.get(ref_impl)
    tol = TOL.get(dtype, 1e-2)
    for impl, row in rows_by_impl.items():
        t = tensors_by_impl.get(impl)
        row["vs"] = ref_impl
        row["out_diff"] = row["grad_diff"] = None
        row["mismatch"] = False
        if impl == ref_impl or not t or not ref:
            continue
        row["out_diff"] = _max_diff(t["out"], ref["out"])
        bound = tol * max(1.0, ref["out"].abs().max().item())
        row["mismatch"] |= not row["out_diff"] <= bound
        if "grads" in t and "grads" in ref:
            row["grad_diff"] = max(_max_diff(a, b) for a, b in zip(t["grads"], ref["grads"]))
            bound = tol * max(1.0, max(g.abs().max().item() for g in ref["grads"]))
            row["mismatch"] |= not row["grad_diff"] <= bound
        if "flex" in tensors_by_impl and "tfk" in tensors_by_impl and impl == "flex" and ref_impl != "tfk":
            row["flex_vs_tfk"] = _max_diff(t["out"], tensors_by_impl["tfk"]["out"])


def run_shapes(shapes, impls=IMPLS, *, device="cpu", repeat=3, backend="auto", isolate=True,
               timeout=900, threads=None, log=print):
    """Benchmark ``shapes`` (Shape objects, registered or not) with ``impls``.

    Returns one dict per (shape, impl): times in ms, peak memory in bytes,
    ``ratio_fwd``/``ratio_fwdbwd`` (SDPA time / this impl's time), plan tile
    density, pair density, max |diff| of out and grads vs SDPA, ``mismatch``.
    ``isolate=True`` runs each (shape, impl) in a fresh process (the shape's
    pattern factory must then pickle); False runs in this process.
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfk-bench-") as tmpdir:
        for shape in shapes:
            pattern = shape.make_pattern()
            plan = tfk.get_plan(pattern, shape.Lq, shape.Lk, PLAN_BLOCK, PLAN_BLOCK)
            tile_density = plan.tile_density
            density = pair_density(pattern, shape.Lq, shape.Lk)
            by_impl, tens = {}, {}
            for impl in impls:
                if impl == "flash" and not flash_expresses(shape, pattern):
                    continue
                if impl == "tfk-cuda" and shape.dtype not in ("fp16", "bf16"):
                    continue  # the CUDA kernels take fp16 and bf16
                t0 = time.perf_counter()
                if isolate:
                    row, t = _run_isolated(shape, impl, device, repeat, backend, tmpdir, timeout, threads)
                else:
                    try:
                        row, t = measure(shape, impl, device=device, repeat=repeat, backend=backend)
                    except Exception:  # noqa: BLE001
                        row, t = {"shape": shape.name, "impl": impl, "error": traceback.format_exc(limit=6)}, {}
                row.setdefault("notes", [])
                row["wall_s"] = time.perf_counter() - t0
                row.update(tile_density=tile_density, pair_density=density, dtype=shape.dtype)
                by_impl[impl], tens[impl] = row, t
                if log:
                    log(f"  .. {shape.name:<24} {impl:<5} done in {row['wall_s']:.1f} s"
                        + (" (ERROR)" if row.get("error") else ""), file=sys.stderr)
            _compare(by_impl, tens, shape.torch_dtype)
            base = by_impl.get("sdpa", {})
            flops = 4.0 * shape.B * shape.H * shape.Lq * shape.Lk * shape.D * density
            for row in by_impl.values():
                for key in ("fwd_ms", "fwdbwd_ms"):
                    mine, theirs = row.get(key), base.get(key)
                    row["ratio_" + key[:-3]] = theirs / mine if mine and theirs else None
                row["tflops_fwd"] = flops / (row["fwd_ms"] * 1e9) if row.get("fwd_ms") else None
                row["tflops_fwdbwd"] = 2.5 * flops / (row["fwdbwd_ms"] * 1e9) if row.get("fwdbwd_ms") else None
                rows.append(row)
            del tens
    return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def _fmt(x, spec, na="n/a"):
    return na if x is None else format(x, spec)


def _mib(x):
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def format_table(rows, gpu=False):
    names = ["fwd ms", "f+b ms", "fwd x", "f+b x", "fwd MiB", "f+b MiB", "|dout|", "|dgrad|", "tiles"]
    if gpu:
        names[6:6] = ["fwd TF/s", "f+b TF/s"]
    cols = [table.Col("shape", "<"), table.Col("impl", "<")] + [table.Col(n) for n in names]
    lines = []
    for r in rows:
        if lines and r["shape"] != lines[-1][0]:
            lines.append(None)  # an empty line between shapes
        impl = r["impl"] + (f"[{r['backend']}]" if r.get("backend") else "")
        if r.get("error"):
            lines.append([r["shape"], impl, "ERROR: " + r["error"].strip().splitlines()[-1][:100]])
            continue
        ref = r.get("vs", "sdpa")
        cells = [r["shape"], impl, _fmt(r["fwd_ms"], ".1f"), _fmt(r["fwdbwd_ms"], ".1f"),
                 _fmt(r.get("ratio_fwd"), ".2f"), _fmt(r.get("ratio_fwdbwd"), ".2f"),
                 _mib(r.get("peak_fwd_bytes")), _mib(r.get("peak_fwdbwd_bytes")),
                 "-" if r["impl"] == ref else _fmt(r.get("out_diff"), ".1e"),
                 "-" if r["impl"] == ref else _fmt(r.get("grad_diff"), ".1e"),
                 f"{r['tile_density']:.3f}"]
        if gpu:
            cells[8:8] = [_fmt(r.get("tflops_fwd"), ".1f"), _fmt(r.get("tflops_fwdbwd"), ".1f")]
        if r.get("mismatch"):
            cells[-1] += "  MISMATCH"
        lines.append(cells)
    return table.format_table(cols, lines)


def _header(mode, device):
    import triton
    dev = torch.cuda.get_device_name(device) if mode == "gpu" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    head = (f"tfk bench ({mode} mode): {dev}; torch {torch.__version__}, triton {triton.__version__}, "
            f"tfk {tfk.__version__}; backends: {', '.join(tfk.backend_names())}")
    if mode == "cpu" and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        head += f"\nload average at start: {load:.2f}" + (
            " (other processes are using the CPU: timings will be noisy)" if load > 0.7 else "")
    return head


def _legend(mode, repeat):
    timing = ("triton.testing.do_bench, median" if mode == "gpu"
              else f"median of {repeat} after a warm-up call; fwd under no_grad")
    mem = ("torch.cuda.max_memory_allocated growth during one call" if mode == "gpu"
           else "peak growth of live tensor memory during one call (torch profiler allocation events, "
                "the CPU analogue of CUDA's max_memory_allocated); resident-set growth in the notes")
    lines = [f"times: {timing}. x = SDPA time / impl time (>1: faster than SDPA with the dense mask).",
             f"MiB: {mem}. |dout|, |dgrad|: max abs diff vs SDPA (dgrad: max over dq, dk, dv).",
             f"tiles: tfk plan tile density ({PLAN_BLOCK}x{PLAN_BLOCK} tiles visited / all tiles)."]
    if mode == "gpu":
        lines.append("TF/s: 4*B*H*Lq*Lk*D*pair_density / time (x2.5 for fwd+bwd), pair_density = allowed pairs / all.")
    return "\n".join(lines)


def _notes(rows, shapes):
    out = []
    by_name = {s.name: s for s in shapes}
    for name in dict.fromkeys(r["shape"] for r in rows):
        s = by_name[name]
        mine = [r for r in rows if r["shape"] == name]
        d = mine[0]
        gqa = f", GQA {s.H}/{s.Hkv}" if s.gqa else ""
        out.append(f"{name}: B={s.B} H={s.H} Lq={s.Lq} Lk={s.Lk} D={s.D} {s.dtype}{gqa}; "
                   f"{s.describe_pattern()}; pairs {d['pair_density']:.4f}, tiles {d['tile_density']:.4f}"
                   + (f" -- {s.note}" if s.note else ""))
        for r in mine:
            if r.get("error"):
                trace = r["error"].strip().splitlines()
                out.append(f"    {r['impl']}: ERROR\n" + "\n".join("      " + line for line in trace))
                continue
            bits = list(r.get("notes", []))
            if r.get("rss_fwd_bytes") is not None:
                rss = f"RSS growth fwd {_mib(r['rss_fwd_bytes'])} MiB"
                if r.get("rss_fwdbwd_bytes") is not None:
                    rss += f", f+b {_mib(r['rss_fwdbwd_bytes'])} MiB"
                bits.insert(0, rss)
            if r["impl"] == "flex":
                bits.insert(0, f"first call {r['first_call_s']:.1f} s incl. compile, not timed "
                               "(inductor's on-disk cache makes repeat runs shorter than a cold compile)")
                if not r.get("fwdbwd_ms"):
                    bits.append("no CPU backward in FlexAttention")
                if r.get("flex_vs_tfk") is not None:
                    bits.append(f"max|out - tfk out| {r['flex_vs_tfk']:.1e}")
            if bits:
                out.append(f"    {r['impl']}: " + "; ".join(bits))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("auto", "cpu", "gpu"), default="auto")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="registered shape names (any tier)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (CPU mode; median)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--json", metavar="PATH", help="write the result rows as JSON")
    ap.add_argument("--backend", default=None,
                    help="tfk backend to time (default: auto)")
    ap.add_argument("--in-process", action="store_true",
                    help="no worker processes (the RSS figures then carry earlier calls' allocator state)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        _worker_main(args._worker)
        return 0

    mode = args.mode
    if mode == "auto":
        mode = "gpu" if torch.cuda.is_available() else "cpu"
    if mode == "gpu" and not torch.cuda.is_available():
        print("bench.run --mode gpu: no GPU is present (torch.cuda.is_available() is False); nothing timed.")
        print("Running the GPU-free check of the kernels instead (python -m bench.compile_report):\n",
              flush=True)
        from bench import compile_report
        return compile_report.main([])
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    try:
        shapes = [get_shape(n) for n in args.only] if args.only else shapes_for(mode)
    except KeyError as e:
        ap.error(str(e.args[0]))
    impls = [i for i in IMPLS if not (args.no_flex and i == "flex")]
    if mode == "gpu":
        impls.append("tfk-cuda")  # backend "cuda" beside "auto"'s choice
    if mode == "gpu" and FLASH:
        impls.append("flash")
    device = "cuda" if mode == "gpu" else "cpu"
    backend = args.backend or "auto"

    if args.threads:
        torch.set_num_threads(args.threads)
    print(_header(mode, device), flush=True)
    t0 = time.perf_counter()
    rows = run_shapes(shapes, impls, device=device, repeat=args.repeat, backend=backend,
                      isolate=not args.in_process and mode == "cpu", threads=args.threads)
    print()
    print(format_table(rows, gpu=mode == "gpu"))
    print()
    print(_legend(mode, args.repeat))
    print()
    print(_notes(rows, shapes))
    bad = [r for r in rows if r.get("error") or r.get("mismatch")]
    if mode == "cpu" and hasattr(os, "getloadavg"):
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s"
          + (f"; {len(bad)} with errors or mismatches" if bad else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "header": _header(mode, device), "rows": rows}, f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
