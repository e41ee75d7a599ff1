"""KV-cache decoding benchmark. CPU mode (the default without a GPU): one
decode step (Lq = 1) of tfk.attention_with_kvcache (backend "auto": "torch"
on CPU) against torch SDPA over the cache, B in {1, 8}, caches of 4k, 32k and
128k keys, a sliding window of 4096 or none, H = 8 query heads over Hkv = 2
key heads, D = 128, fp32. GPU mode: tfk's backends against SDPA, and the KV
bytes read per second against the device's HBM bandwidth (below).

    python -m bench.kvcache --threads 1
    python -m bench.kvcache --batches 1 --caches 4096 131072 --reps 5 --json out.json
    python -m bench.kvcache --device cuda --dtypes bf16 --hbm-gbs 4800

The step: every sequence holds ``cache`` keys (cache_seqlens = cache - 1,
the query at the last position, key/value already written: no append), and
the query reads them all (causal) or the last window + 1.

The baseline: torch.nn.functional.scaled_dot_product_attention over the FULL
valid cache (B, Hkv, cache, D) as it stands, the G = H / Hkv query heads of a
key head folded into query rows (q viewed as (B, Hkv, G, D): GQA without
repeating K/V); for a window, a bool mask (1, 1, 1, cache) that keeps the
last window + 1 keys. SDPA has no notion of a window's key range, so it
reads the whole cache: that is what a caller of SDPA pays. tfk reads only the
keys the pattern allows (key_range).

Time: the median of --reps runs after one warm-up, tfk and SDPA interleaved
run by run (the machine may be shared: pass --threads 1). A step whose warm-up
takes longer than --long seconds is timed by that one run.

Summary: the issue's target, per batch: a windowed decode (window 4096) over
a 128k cache costs within 1.5x of a decode over a 4k cache (no window).

GPU mode (``--device cuda``, the default when a GPU is present; see
run_gpu): B in {1, 8, 64}, caches 4k, 32k, 128k, window 4096 or none,
H = 32, Hkv = 8, D = 128, bf16 and fp16 (fp32 with --dtypes fp32: tf32
dots). Implementations: "tfk" (backend "auto", the one it chose in
brackets), "tfk_triton", "tfk_cuda" (when that backend is registered and can
run), "sdpa" (as above). Time: CUDA events, median of --reps after --warmup
calls. GB/s: the KV bytes the step must read (B·Hkv·keys·(D + Dv)·itemsize,
keys = min(cache, window + 1)) over its time, for every implementation (SDPA
reads more: its GB/s is the useful rate), and that over the device's HBM
bandwidth (HBM_GBS by device name, or --hbm-gbs).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tfk.ops.kvcache as kv
from tfk import backends
from tfk import patterns as P

from . import peak, table
from .peak import CudaTimer

H, HKV, D = 8, 2, 128
BATCHES = (1, 8)
CACHES = (4096, 32768, 131072)
WINDOWS = (4096, 0)              # 0: no window (causal over the whole cache)
TARGET_RATIO = 1.5
# HBM bandwidth, GB/s, of the devices we know (by a substring of the device name)
HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "RTX 4090": 1008.0}


def make_cache(B, L, h=H, hkv=HKV, d=D, dtype=torch.float32, device="cpu", seed=0):
    """q (B, h, 1, d), k_cache / v_cache (B, hkv, L, d), cache_seqlens = L - 1 (int32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    q, kc, vc = r(B, h, 1, d), r(B, hkv, L, d), r(B, hkv, L, d)
    return q, kc, vc, torch.full((B,), L - 1, dtype=torch.int32, device=device)


def pattern_of(window):
    return P.sliding_window(window) if window else None


def tfk_fn(q, kc, vc, seqlens, window, backend="auto"):
    pattern = pattern_of(window)
    return lambda: kv.attention_with_kvcache(q, kc, vc, seqlens, pattern=pattern, backend=backend)


def sdpa_fn(q, kc, vc, window):
    """SDPA over the full cache (see the module doc): G query heads folded into rows."""
    B, h, _, d = q.shape
    L = kc.shape[2]
    qf = q.view(B, kc.shape[1], h // kc.shape[1], d)
    mask = None
    if window and window + 1 < L:
        mask = (torch.arange(L, device=q.device) >= L - 1 - window).view(1, 1, 1, L)
    return lambda: F.scaled_dot_product_attention(qf, kc, vc, attn_mask=mask)


def chosen_backend(fn):
    with backends.record_choices() as names:
        fn()
    return names[-1] if names else "?"


# ---------------------------------------------------------------------------
# CPU mode
# ---------------------------------------------------------------------------

def cpu_cols():
    return [table.Col("B", ">", 3), table.Col("cache", ">", 7), table.Col("window", ">", 6),
            table.Col("backend", "<", 8), table.Col("tfk ms", ">", 9), table.Col("sdpa ms", ">", 9),
            table.Col("x sdpa", ">", 7)]


def cpu_cells(r):
    return [str(r["B"]), str(r["cache"]), str(r["window"] or "none"), r["backend"], f"{r['tfk_s'] * 1e3:.3f}",
            f"{r['sdpa_s'] * 1e3:.3f}", f"{r['sdpa_s'] / r['tfk_s']:.1f}"]


def summarize(rows):
    """The target line per batch: windowed decode at 128k over the no-window decode at 4k."""
    lines = []
    get = lambda B, L, w: next((r["tfk_s"] for r in rows if (r["B"], r["cache"], r["window"]) == (B, L, w)), None)
    for B in sorted({r["B"] for r in rows}):
        long_w, short = get(B, 131072, 4096), get(B, 4096, 0)
        if long_w is None or short is None:
            continue
        ratio = long_w / short
        lines.append(f"target B={B}: windowed decode (window 4096) over a 128k cache {long_w * 1e3:.3f} ms, decode "
                     f"over a 4k cache {short * 1e3:.3f} ms: {ratio:.2f}x (target <= {TARGET_RATIO}x: "
                     f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    return lines


def run_cpu(args):
    """CPU mode: one row per (B, cache, window), tfk and SDPA side by side."""
    h, hkv, d = args.heads
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={h} Hkv={hkv} D={d} Lq=1 fp32; "
          f"median of {args.reps} (one run when a step takes > {args.long:g} s)")
    print("ms: time per decode step; x sdpa: SDPA's time (over the full cache) / tfk's")
    cols = cpu_cols()
    print(table.format_table(cols, []), flush=True)
    rows = []
    for B in args.batches:
        for L in args.caches:
            q, kc, vc, seqlens = make_cache(B, L, h, hkv, d)
            for window in args.windows:
                fns = {"tfk": tfk_fn(q, kc, vc, seqlens, window), "sdpa": sdpa_fn(q, kc, vc, window)}
                times = peak.time_interleaved(fns, (), None, ("fwd",), args.reps, args.long)
                row = dict(B=B, cache=L, window=window, backend=chosen_backend(fns["tfk"]),
                           tfk_s=times[("tfk", "fwd")], sdpa_s=times[("sdpa", "fwd")])
                rows.append(row)
                print(table.format_table(cols, [cpu_cells(row)], header=False), flush=True)
            del q, kc, vc
    for line in summarize(rows):
        print(line)
    return rows


# ---------------------------------------------------------------------------
# GPU mode
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GPUShape:
    B: int
    cache: int
    window: int
    H: int = 32
    Hkv: int = 8
    D: int = 128

    @property
    def name(self):
        return f"B{self.B}_L{self.cache}_" + (f"w{self.window}" if self.window else "full")


GPU_SHAPES = [GPUShape(B, L, w) for B in (1, 8, 64) for L in CACHES for w in WINDOWS]
GPU_DTYPES = ("bf16", "fp16")
GPU_IMPLS = ("tfk", "tfk_triton", "tfk_cuda", "sdpa")
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def kv_bytes(s: GPUShape, itemsize):
    """The KV bytes a decode step must read: the keys its window reaches, K and V."""
    keys = min(s.cache, s.window + 1) if s.window else s.cache
    return s.B * s.Hkv * keys * 2 * s.D * itemsize


def hbm_gbs(device, override=None):
    if override:
        return override
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in HBM_GBS.items() if k in name), None)
    return None


def run_gpu(shapes, dtypes=GPU_DTYPES, impls=GPU_IMPLS, *, device="cuda", timer=None, log=None, hbm=None):
    """One row per (shape, dtype, implementation): ms, GB/s, the fraction of
    HBM bandwidth, x sdpa; or an error saying why it cannot run."""
    timer = timer or CudaTimer()
    peak_gbs = hbm_gbs(device, hbm)
    rows = []
    for s in shapes:
        for dt in dtypes:
            dtype = _DT[dt]
            try:
                q, kc, vc, seqlens = make_cache(s.B, s.cache, s.H, s.Hkv, s.D, dtype, device)
            except RuntimeError as e:          # out of memory: every implementation's row says so
                rows += [dict(shape=s.name, dtype=dt, impl=i, error=peak.error_text(e)) for i in impls]
                continue
            sdpa_s = None
            for impl in impls:
                row = dict(shape=s.name, dtype=dt, impl=impl)
                backend = {"tfk": "auto", "tfk_triton": "triton", "tfk_cuda": "cuda"}.get(impl)
                fn = sdpa_fn(q, kc, vc, s.window) if impl == "sdpa" else tfk_fn(q, kc, vc, seqlens, s.window,
                                                                                 backend)
                try:
                    if backend is not None:
                        row["backend"] = chosen_backend(fn)
                    sec = timer.time(fn)
                except Exception as e:          # noqa: BLE001 (a backend that cannot run: its row says why)
                    row["error"] = peak.error_text(e)
                else:
                    row["ms"] = sec * 1e3
                    row["gbs"] = kv_bytes(s, q.element_size()) / sec / 1e9
                    row["hbm_frac"] = row["gbs"] / peak_gbs if peak_gbs else None
                    if impl == "sdpa":
                        sdpa_s = sec
                rows.append(row)
                if log:
                    log(row)
            for r in rows:
                if r["shape"] == s.name and r["dtype"] == dt and "ms" in r and sdpa_s:
                    r["x_sdpa"] = sdpa_s * 1e3 / r["ms"]
            del q, kc, vc
    return rows


GPU_COLS = [table.Col("shape", "<", 18), table.Col("dtype", "<", 5), table.Col("impl", "<", 18),
            table.Col("ms", ">", 8), table.Col("GB/s", ">", 7), table.Col("HBM", ">", 5), table.Col("x sdpa", ">", 6)]


def gpu_cells(r):
    name = r["impl"] + (f"[{r['backend']}]" if r.get("backend") and r["impl"] == "tfk" else "")
    head = [r["shape"], r["dtype"], name]
    if r.get("error"):
        return head + [r["error"]]
    frac = r.get("hbm_frac")
    return head + [f"{r['ms']:.3f}", f"{r['gbs']:.0f}", "-" if frac is None else f"{frac:.0%}",
                   table.fmt(r.get("x_sdpa"), ".2f")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present")
    ap.add_argument("--batches", nargs="*", type=int, default=list(BATCHES), help="CPU mode")
    ap.add_argument("--caches", nargs="*", type=int, default=list(CACHES), help="CPU mode: keys per sequence")
    ap.add_argument("--windows", nargs="*", type=int, default=list(WINDOWS), help="CPU mode: 0 = no window")
    ap.add_argument("--heads", nargs=3, type=int, default=[H, HKV, D], metavar=("H", "HKV", "D"), help="CPU mode")
    ap.add_argument("--shapes", nargs="*", help="GPU mode: names such as B8_L131072_w4096 (default: all)")
    ap.add_argument("--dtypes", nargs="*", default=list(GPU_DTYPES), help="GPU mode")
    ap.add_argument("--impls", nargs="*", default=list(GPU_IMPLS), help="GPU mode")
    ap.add_argument("--hbm-gbs", type=float, help="GPU mode: the device's HBM bandwidth (default: HBM_GBS)")
    ap.add_argument("--warmup", type=int, default=3, help="GPU mode: untimed calls first")
    ap.add_argument("--reps", type=int, default=None, help="timed runs (default: 5 on CPU, 20 on GPU)")
    ap.add_argument("--long", type=float, default=3.0, help="a step whose warm-up takes longer is timed by it alone")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for every run (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        args.reps = args.reps or 5
        rows = run_cpu(args)
    else:
        shapes = [s for s in GPU_SHAPES if not args.shapes or s.name in args.shapes]
        print(table.format_table(GPU_COLS, []), flush=True)
        rows = run_gpu(shapes, args.dtypes, args.impls, device=device,
                       timer=CudaTimer(args.warmup, args.reps or 20), hbm=args.hbm_gbs,
                       log=lambda r: print(table.format_table(GPU_COLS, [gpu_cells(r)], header=False), flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
