"""``tfk.build_info()``: what this tfk was built with and what runs here."""
from __future__ import annotations

import importlib
import sys

import torch

from . import __version__
from .backends import AttentionCall, backend_names, get_backend


def _probe_calls():
    """Small calls a backend is asked about: on the GPU if there is one, else
    on the CPU, in each dtype the backends take."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    for dtype in dtypes:
        x = torch.zeros(1, 1, 64, 64, dtype=dtype, device=device)
        yield dtype, AttentionCall(x, x, x, None, None, 0.125, 0.0, False)


def _probe_moe_calls():
    """The same for the MoE family: a small experts call in each dtype."""
    from .ops.moe import ExpertsCall
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.zeros(2, 64, dtype=dtype, device=device)
        ids = torch.zeros(2, 1, dtype=torch.long, device=device)
        w1, w2 = torch.zeros(1, 128, 64, dtype=dtype, device=device), torch.zeros(1, 64, 64, dtype=dtype, device=device)
        yield dtype, ExpertsCall(x, ids, torch.ones(2, 1, device=device), w1, w2, "silu", None)


def _probe_linear_calls():
    """The same for linear attention: a small causal call in each dtype."""
    from .ops.linear import LinearCall
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.zeros(1, 1, 64, 64, dtype=dtype, device=device)
        yield dtype, LinearCall(x, x, x, True, "elu1", True, 1e-6, 1.0, None, None, False)


def _probe_lsh_calls():
    """The same for LSH attention: a small call (the full-attention path) in each dtype."""
    from .ops.lsh import LshCall
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.zeros(1, 1, 64, 64, dtype=dtype, device=device)
        yield dtype, LshCall(x, x, None, 64, 1, 0, False, None, 1.0, 0.0, 0, False)


def _probe_kvcache_calls():
    """The same for KV-cache decoding: one query over a short cache in each dtype."""
    from .ops.kvcache import KVCacheCall, band_of
    from .patterns import causal
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, cache = torch.zeros(1, 1, 1, 64, dtype=dtype, device=device), torch.zeros(1, 1, 64, 64, dtype=dtype,
                                                                                      device=device)
        seqlens = torch.zeros(1, dtype=torch.int32, device=device)
        yield dtype, KVCacheCall(q, cache, cache, seqlens, None, causal(), band_of(causal()), 1.0, False)


def _usable(family, probes):
    """For each backend of ``family``: the dtypes it runs here, or why it cannot."""
    backends = {}
    for name in backend_names(family):
        runs, why = [], []
        for dtype, call in probes():
            reasons = get_backend(name, family).reasons(call)
            (why.extend(r for r in reasons if r not in why) if reasons else runs.append(str(dtype)[6:]))
        backends[name] = {"runs": runs, "reasons": [] if runs else why}
    return backends


def build_info(file=None) -> dict:
    """Print (to ``file``, default stdout) and return: versions, the build of
    the extensions (tfk._C: the CUDA kernels, with the archs and toolkit it was
    compiled for; tfk._sim: the same kernels for the CPU; tfk._cpu: the native
    CPU kernels), and, for each
    backend of each family (attention, moe, linear, lsh, kvcache), the dtypes it runs here
    or why it cannot."""
    try:
        triton = importlib.import_module("triton").__version__
    except ImportError:
        triton = None
    try:
        build = importlib.import_module("tfk._build_config").CONFIG
    except ImportError:
        build = None
    extensions = {}
    for name in ("_C", "_sim", "_cpu"):
        try:
            importlib.import_module(f"tfk.{name}")
            extensions[name] = "built"
        except ImportError as e:
            extensions[name] = f"not importable: {e}"
    backends = _usable("attention", _probe_calls)
    moe_backends = _usable("moe", _probe_moe_calls)
    linear_backends = _usable("linear", _probe_linear_calls)
    lsh_backends = _usable("lsh", _probe_lsh_calls)
    kvcache_backends = _usable("kvcache", _probe_kvcache_calls)
    info = {
        "tfk": __version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "build": build, "extensions": extensions, "backends": backends, "moe_backends": moe_backends,
        "linear_backends": linear_backends, "lsh_backends": lsh_backends, "kvcache_backends": kvcache_backends,
    }
    out = file or sys.stdout
    print(f"tfk {info['tfk']}: torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
          f"GPU: {info['gpu'] or 'none'}", file=out)
    if build is None:
        print("build: no record (tfk was not installed through its setup.py)", file=out)
    elif build["cuda_extension"]:
        print(f"tfk._C: built for archs {build['cuda_archs']} with {build['cuda_home']} ({build.get('nvcc')}), "
              f"against torch {build['torch']} (CUDA {build['torch_cuda']}); {extensions['_C']}", file=out)
    else:
        print(f"tfk._C: not built ({build['cuda_skip_reason']}); to build it: CUDA_HOME=/path/to/cuda "
              "TFK_CUDA_ARCHS='8.0;9.0' pip install --no-build-isolation .", file=out)
    print(f"tfk._sim: {extensions['_sim']}; tfk._cpu: {extensions['_cpu']}", file=out)
    device = "the GPU" if info["gpu"] else "the CPU"
    for family, table in (("attention", backends), ("moe", moe_backends), ("linear", linear_backends),
                          ("lsh", lsh_backends), ("kvcache", kvcache_backends)):
        for name, b in table.items():
            state = ("runs " + ", ".join(b["runs"])) if b["runs"] else "cannot run: " + "; ".join(b["reasons"])
            print(f"  {family:<9} backend {name:<9} on {device}: {state}", file=out)
    return info
