"""Call overhead of the SDPA drop-in, in one run, on the CPU.

    python -m bench.overhead [--calls N] [--threads N]

Table 1, tfk against torch: tfk.scaled_dot_product_attention and torch's own
function on the small calls where the work before the kernel shows (decoding
one token against a cache, short sequences). Forward only, under
torch.no_grad(). The two take turns call by call, ``--calls`` timed calls
each after a warm-up, and each reports its median (other work on the machine
then slows both alike); the table gives both times, their ratio (tfk /
torch, 1.0 = no overhead), the backend "auto" ran and the largest difference
between the two outputs (they must agree).

Table 2, host side of the kernel backends: the work the "triton" and "cuda"
paths do on the host around their kernels (validation, backend selection,
plan lookup, layouts, op dispatch), timed per call with every kernel
launch replaced by a counter (``stubbed_launches``), so that no GPU is needed
and the launches are counted apart. "cuda" is timed through "cuda-sim", the
same Python path on CPU tensors. Nested times: ``call`` is the public
function, ``op`` the backend's op entry point called directly, given the plan
as the backends give it (``engine.op_plan``; under torch.compile it is the
custom op, outside it the same functions without the custom-op dispatcher),
``body`` the op's implementation given the plan; call - op is tfk's own
dispatch (validation, backend selection, plan lookup), op - body the entry
point's. On a GPU each small torch op on the path (empty outputs,
copies) also launches a kernel, and each kernel launch adds its launcher's
host time, which this table leaves out.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

import tfk
from tfk.ops.attention import api, torch_sdpa

from . import table
from .table import Col


@dataclass(frozen=True)
class Case:
    name: str
    q: tuple          # query shape; key and value are kv
    kv: tuple
    mask: str = ""    # "" | "bool" (a (B, 1, 1, S) padding mask, as decoding uses)
    causal: bool = False

    def inputs(self, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in (self.q, self.kv, self.kv))
        kw = dict(is_causal=self.causal, enable_gqa=self.q[1] != self.kv[1])
        if self.mask == "bool":
            m = torch.ones(self.kv[0], 1, 1, self.kv[2], dtype=torch.bool)
            m[..., : self.kv[2] // 10] = False  # left padding
            kw["attn_mask"] = m
        return (q, k, v), kw


CASES = [
    Case("decode_gqa_mask", (1, 8, 1, 32), (1, 2, 300, 32), mask="bool"),
    Case("decode_gqa", (1, 8, 1, 64), (1, 2, 1024, 64)),
    Case("small_plain", (1, 4, 64, 32), (1, 4, 64, 32)),
    Case("small_causal", (2, 4, 128, 64), (2, 4, 128, 64), causal=True),
    Case("prefill_causal_mask", (1, 8, 256, 64), (1, 8, 256, 64), mask="bool"),
]
HOST_CASES = [c for c in CASES if c.name in ("decode_gqa", "small_plain", "small_causal")]
HOST_BACKENDS = ("triton", "cuda-sim")


def _per_call(fns, calls):
    """Seconds per call of each of ``fns``: the median over ``calls`` timed
    calls each, the functions taking turns call by call (so a slow phase of
    the machine hits all of them alike), after a warm-up call."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    clock = time.perf_counter
    for _ in range(calls):
        for fn, ts in zip(fns, times):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
    return [statistics.median(ts) for ts in times]


def measure(case: Case, calls=500) -> dict:
    (q, k, v), kw = case.inputs()
    with torch.no_grad():
        with tfk.backends.record_choices() as ran:
            got = tfk.scaled_dot_product_attention(q, k, v, **kw)
        want = torch_sdpa(q, k, v, **kw)
        t_torch, t_tfk = _per_call([lambda: torch_sdpa(q, k, v, **kw),
                                    lambda: tfk.scaled_dot_product_attention(q, k, v, **kw)], calls)
    return {"case": case.name, "backend": ran[0], "torch_us": t_torch * 1e6, "tfk_us": t_tfk * 1e6,
            "ratio": t_tfk / t_torch, "max_diff": float((got - want).abs().max())}


def format_table(rows) -> str:
    cols = [Col("case", "<"), Col("backend", "<"), Col("torch us"), Col("tfk us"), Col("tfk/torch"), Col("max diff")]
    return table.format_table(cols, [[r["case"], r["backend"], f"{r['torch_us']:.1f}", f"{r['tfk_us']:.1f}",
                                      f"{r['ratio']:.2f}", f"{r['max_diff']:.1e}"] for r in rows])


@contextlib.contextmanager
def stubbed_launches():
    """Inside the block every forward kernel launch of the "triton" and
    "cuda"/"cuda-sim" backends only counts itself, leaving its outputs
    unwritten: the Triton kernel's ``_attn_fwd[grid](...)`` and the CUDA
    ops' ``attention_fwd_`` (one kernel launch each). The triton backend also
    takes CPU tensors inside, as under TRITON_INTERPRET=1. Yields a dict whose
    "launches" counts them. For timing the host side only."""
    from tfk.ops.attention import cuda_backend, triton_backend

    kernels = triton_backend._kernels()
    count = {"launches": 0}

    def launch(*args, **kwargs):
        count["launches"] += 1

    class Kernel:  # kernel[grid](...)
        def __getitem__(self, grid):
            return launch

    class Ops:
        attention_fwd_ = staticmethod(launch)

    saved = kernels._attn_fwd, cuda_backend._ops, triton_backend._INTERPRET
    kernels._attn_fwd, cuda_backend._ops, triton_backend._INTERPRET = Kernel(), lambda device: Ops(), True
    try:
        yield count
    finally:
        kernels._attn_fwd, cuda_backend._ops, triton_backend._INTERPRET = saved


def _op_and_body(backend, pattern, q, k, v):
    """The backend's op entry point and its implementation, as functions of (q, k, v)."""
    from tfk.ops.attention import cuda_backend, triton_backend
    from tfk.ops.attention.engine import op_plan

    scale = q.shape[-1] ** -0.5
    if backend == "triton":
        op, body = triton_backend.attention_fwd, triton_backend._forward
        tiles = triton_backend._kernels().tile_config(max(q.shape[-1], v.shape[-1]), q.dtype)
    else:
        op, body = cuda_backend.attention_fwd, cuda_backend.attention_forward
        tiles = (cuda_backend.BLOCK, cuda_backend.BLOCK)
    plan = op_plan(pattern, q.shape[2], k.shape[2], *tiles, q.device)  # what the backends hand their op
    return (lambda: op(q, k, v, None, plan, scale, 0.0, 0)), (lambda: body(q, k, v, plan, None, scale, 0.0, 0))


def measure_host(case: Case, backend: str, calls=500) -> dict:
    """The host side of ``backend``'s forward on ``case`` in float16, launches stubbed."""
    (q, k, v), kw = case.inputs(torch.float16)
    pattern = api._CAUSAL if case.causal else None
    with torch.no_grad(), stubbed_launches() as count:
        with tfk.backends.record_choices() as ran:
            tfk.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
        count["launches"] = 0
        tfk.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
        launches = count["launches"]
        op, body = _op_and_body(backend, pattern, q, k, v)
        t_call, t_op, t_body = _per_call(
            [lambda: tfk.scaled_dot_product_attention(q, k, v, backend=backend, **kw), op, body], calls)
    return {"case": case.name, "backend": ran[0], "call_us": t_call * 1e6, "op_us": t_op * 1e6,
            "body_us": t_body * 1e6, "launches": launches}


def format_host_table(rows) -> str:
    cols = [Col("case", "<"), Col("backend", "<"), Col("call us"), Col("op us"), Col("body us"), Col("call-op"),
            Col("op-body"), Col("launches")]
    return table.format_table(cols, [[r["case"], r["backend"], f"{r['call_us']:.1f}", f"{r['op_us']:.1f}",
                                      f"{r['body_us']:.1f}", f"{r['call_us'] - r['op_us']:.1f}",
                                      f"{r['op_us'] - r['body_us']:.1f}", str(r["launches"])] for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500, help="timed calls of each function")
    ap.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"tfk {tfk.__version__}, torch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
    print("\ntfk.scaled_dot_product_attention against torch's, float32, forward")
    print(format_table([measure(c, args.calls) for c in CASES]))
    print("\nhost side of the kernel backends, float16, forward, kernel launches stubbed (counted apart); "
          "'cuda-sim' runs the 'cuda' path on CPU tensors")
    print(format_host_table([measure_host(c, b, args.calls) for b in HOST_BACKENDS for c in HOST_CASES]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
