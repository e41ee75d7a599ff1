"""Compile report: resources of every shipped kernel, per arch, with no GPU.

    python -m bench.compile_report [--build-dir build/cmake] [--archs 80,90]
        [--quick | --extended] [--no-cuda] [--no-triton] [--jobs N] [--ptxas triton|toolkit]

CUDA: configures and builds the CMake project (CMakeLists.txt), which compiles
each csrc/**/*.cu to a cubin per arch with `-Xptxas -v`, and reads the ptxas logs.

Triton: compiles every shipped config of triton_kernels/attention.py ahead of
time (triton.compile for GPUTarget("cuda", arch, 32)) with the argument types
Triton's launcher derives from a representative call, and reads the log of
the ptxas run Triton itself makes (its bundled ptxas unless --ptxas toolkit).
Default matrix: 3 kernels x {fp16, bf16, fp32 (tf32 dots)} x D = Dv in
{64, 80, 128, 256} x {plain, all features on} x each arch; --extended adds a
third pattern, plain with a bool mask; --quick is one config per kernel per
arch (the test's).

Prints registers, shared memory, spills and stack per kernel (and config).
Exits non-zero, naming them, when any kernel spills, fails to compile, or
needs more shared memory than its arch gives one block.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUILD_DIR = ROOT / "build" / "cmake"

# Max shared memory one block can use (opt-in dynamic maximum), in bytes.
SMEM_LIMIT = {
    "sm_70": 96 * 1024,
    "sm_75": 64 * 1024,
    "sm_80": 163 * 1024,
    "sm_86": 99 * 1024,
    "sm_87": 163 * 1024,
    "sm_89": 99 * 1024,
    "sm_90": 227 * 1024,
    "sm_100": 227 * 1024,
    "sm_120": 99 * 1024,
}
SMEM_LIMIT_UNKNOWN_ARCH = 48 * 1024  # the static limit every arch has


def _build_env():
    # By path, so the report needs neither torch nor an installed tfk.
    spec = importlib.util.spec_from_file_location("_tfk_build_env", ROOT / "tfk" / "_build_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def smem_limit(arch: str) -> int:
    """Bytes of shared memory a block may use on `arch` ("sm_90a" counts as sm_90)."""
    return SMEM_LIMIT.get(re.sub(r"[af]$", "", arch), SMEM_LIMIT_UNKNOWN_ARCH)


def _tool(name: str) -> str:
    """`name` on PATH, else next to this Python (pip's ninja/cmake land in .venv/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise RuntimeError(f"compile_report: `{name}` not found on PATH or in {sysconfig.get_path('scripts')}")


def kernel_sources() -> list[Path]:
    return sorted((ROOT / "csrc").rglob("*.cu"))


def build(build_dir: str | os.PathLike = DEFAULT_BUILD_DIR, archs: list[str] | None = None,
          quiet: bool = True) -> dict:
    """Configure and build the CMake project. `archs` in CMake form ("80", "90a").

    Returns {"cuda": whether CMake found nvcc, "build_dir": Path}.
    """
    be = _build_env()
    if archs is None:
        archs = be.cmake_arch_list(be.cuda_archs()).split(";")
    build_dir = Path(build_dir)
    cmd = [_tool("cmake"), "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
           f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", f"-DTFK_CUDA_ARCHS={';'.join(archs)}"]
    cuda_home = be.find_cuda_home()
    if cuda_home:
        cmd.append(f"-DCUDAToolkit_ROOT={cuda_home}")
    for step in (cmd, [_tool("cmake"), "--build", str(build_dir)]):
        # Quiet: output is kept and shown only when a step fails.
        proc = subprocess.run(step, stdout=subprocess.PIPE if quiet else None,
                              stderr=subprocess.STDOUT if quiet else None, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compile_report: `{' '.join(step)}` failed:\n{proc.stdout or ''}")
    cache = (build_dir / "CMakeCache.txt").read_text()
    m = re.search(r"^CMAKE_CUDA_COMPILER:\w+=(.*)$", cache, re.M)
    has_cuda = bool(m and m.group(1) and not m.group(1).endswith("NOTFOUND"))
    return {"cuda": has_cuda, "build_dir": build_dir}


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str, source: str = "") -> list[dict]:
    """Rows from one `ptxas -v` log: one per entry function (kernel)."""
    rows: list[dict] = []
    cur = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"source": source, "mangled": m.group(1), "kernel": m.group(1), "arch": m.group(2),
                   "registers": None, "smem": 0, "spill_stores": None, "spill_loads": None,
                   "stack": None}
            rows.append(cur)
            continue
        if cur is None:
            continue
        if (m := _PROPS.search(line)) and cur["stack"] is None:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        elif (m := _USED.search(line)) and cur["registers"] is None:
            cur["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                cur["smem"] = int(s.group(1))
    for r in rows:
        missing = [k for k in ("registers", "stack", "spill_stores", "spill_loads") if r[k] is None]
        if missing:
            raise ValueError(f"ptxas log of {source}: no {', '.join(missing)} for {r['mangled']}")
    return rows


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    proc = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if proc.returncode == 0 and len(out) == len(names) else names


# Kernels launched with dynamic shared memory: (namespace, name) -> the last
# template argument is the head dim. Their bytes come from the kernels' own
# functions through the host library (tfk_host_dynamic_smem_bytes).
_DYNAMIC_SMEM = re.compile(r"tfk::attention::\w+::(\w+)<[^>]*,\s*(\d+)>")


def _add_dynamic_smem(rows: list[dict], build_dir: Path) -> None:
    lib = None
    for r in rows:
        m = _DYNAMIC_SMEM.search(r["kernel"])
        if not m:
            continue
        if lib is None:
            lib = ctypes.CDLL(str(build_dir / "libtfk_host.so"))
            lib.tfk_host_dynamic_smem_bytes.argtypes = [ctypes.c_char_p, ctypes.c_int]
            lib.tfk_host_dynamic_smem_bytes.restype = ctypes.c_int64
        n = lib.tfk_host_dynamic_smem_bytes(m.group(1).encode(), int(m.group(2)))
        if n < 0:
            raise RuntimeError(f"compile_report: no dynamic shared memory figure for {r['kernel']}")
        r["smem"] += n


def cuda_rows(build_dir: str | os.PathLike, archs: list[str]) -> list[dict]:
    """Rows from the ptxas logs of the current sources; a missing log is an
    error. smem is static (ptxas) plus the dynamic shared memory a launch
    requests."""
    log_dir = Path(build_dir) / "ptxas"
    rows = []
    for src in kernel_sources():
        for arch in archs:
            log = log_dir / f"{src.stem}.sm_{arch}.log"
            if not log.is_file():
                raise RuntimeError(f"compile_report: no ptxas log {log} (was the CMake build run?)")
            found = parse_ptxas_log(log.read_text(), source=str(src.relative_to(ROOT)))
            if not found:
                raise RuntimeError(f"compile_report: {log} reports no kernel")
            rows += found
    for r, name in zip(rows, _demangle([r["mangled"] for r in rows])):
        r["kernel"] = name
    _add_dynamic_smem(rows, Path(build_dir))
    return rows


# -----------------------------------------------------------------------------
# Triton section
# -----------------------------------------------------------------------------
#
# Each shipped config of triton_kernels/attention.py is compiled ahead of time
# for a named target (no GPU needed) with the argument types and
# specialisations Triton's launcher would derive from one representative call
# of the host code (attention_forward / attention_backward): the launcher's own
# binder is run on stand-in tensors of the right dtypes and on realistic ints.
# Registers, spills and stack come from the log of the ptxas run Triton does
# itself (TRITON_DUMP_PTXAS_LOG); shared memory is Triton's dynamic allocation
# (metadata.shared, what a launch requests) plus any static smem ptxas reports.
#
# Compiles run in worker processes with TRITON_INTERPRET unset (under the
# interpreter @triton.jit gives functions triton.compile cannot take), a fresh
# cache folder, and TRITON_ALWAYS_COMPILE so every config really runs ptxas.
#
# Time, measured on 2 idle cores (Triton 3.8, archs 80 and 90, --no-cuda,
# `time`): the default matrix (144 configs, 108 distinct binaries) took
# 1 min 23 s, --extended (216 configs, 162 binaries) 2 min 0 s, --quick
# (6 configs) 12 s; 2-2.5 times that with the cores shared with a test run.
# A compile takes 0.6-3.0 s (1.4 s on average, about the same for every
# dtype and head dim), and no config spills, so --keep-going changes nothing
# today. Unless --keep-going, a series (one kernel, dtype and arch) stops at
# its first failing config and marks the rest skipped: the report still
# fails, naming it, and a passing report has compiled every config.

TRITON_MODULE = "tfk.triton_kernels.attention"
TRITON_SOURCE = "triton_kernels/attention.py"
TRITON_KERNELS = ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")
# (dtype, dot precision): the kernels' dot_precision(dtype), tf32 for fp32.
TRITON_DTYPES = (("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "tf32"))
# D = Dv. 80 pads to BLOCK_D = 128 (the non-power-of-two class); with the
# representative call's strides it compiles to the same binary as 128.
TRITON_HEAD_DIMS = (64, 80, 128, 256)
# plain: no index, no user mask, no dropout (a causal plan: partial tiles).
# all: every feature on, the register worst case: query and key index tables
#   (a dilated/permuted layout), a float attn_mask (MASK_KIND=2), dropout.
# bool (--extended): plain + a bool attn_mask (MASK_KIND=1, read as uint8).
#   Measured (Triton 3.8, --extended on sm_80 and sm_90, 216 configs): no
#   config spills; bool needs more registers than plain in 38 of the 72
#   (kernel, dtype, head dim, arch) cases, more than `all` in 8.
TRITON_PATTERNS = {
    "plain": dict(HAS_QIDX=False, HAS_KIDX=False, MASK_KIND=0, DROPOUT=False),
    "all": dict(HAS_QIDX=True, HAS_KIDX=True, MASK_KIND=2, DROPOUT=True),
    "bool": dict(HAS_QIDX=False, HAS_KIDX=False, MASK_KIND=1, DROPOUT=False),
}
TRITON_PATTERNS_DEFAULT = ("plain", "all")
# --quick: one config per kernel per arch: every feature on, fp16, head dim
# 128 (the common training config): 12 s on 2 cores (measured, see above),
# cheap enough for a test.
TRITON_QUICK = (("fp16", "ieee"), 128, "all")

# The representative call: B=2, H=8 query heads over Hkv=2 key heads (G=4),
# Lq = Lk = 1000 (not a multiple of 16, so lengths get no divisibility hint);
# sub-passes with index tables cover 500 positions (a dilation of 2).
_CALL = dict(B=2, H=8, Hkv=2, L=1000, L_IDX=500)
_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_LOG2E = 1.4426950408889634


def triton_configs(archs: list[str], quick: bool = False, extended: bool = False) -> list[dict]:
    """The Triton matrix: one dict per (kernel, dtype, precision, head dim,
    pattern, arch); `archs` as capabilities ("80", "90", "90a"). `quick`: one
    config per kernel per arch; `extended`: adds the bool-mask pattern."""
    caps = sorted({int(re.match(r"\d+", str(a)).group(0)) for a in archs})
    if quick:
        dtypes, dims, patterns = (TRITON_QUICK[0],), (TRITON_QUICK[1],), (TRITON_QUICK[2],)
    elif extended:
        dtypes, dims, patterns = TRITON_DTYPES, TRITON_HEAD_DIMS, tuple(TRITON_PATTERNS)
    else:
        dtypes, dims, patterns = TRITON_DTYPES, TRITON_HEAD_DIMS, TRITON_PATTERNS_DEFAULT
    return [dict(kernel=k, dtype=dt, precision=prec, head_dim=d, pattern=p, cap=cap)
            for cap in caps for k in TRITON_KERNELS for (dt, prec) in dtypes for d in dims for p in patterns]


def _config_name(cfg: dict) -> str:
    prec = "/tf32" if cfg["precision"] == "tf32" else ""
    return f"{cfg['dtype']}{prec} D={cfg['head_dim']} {cfg['pattern']}"


def _launch_args(mod, cfg: dict) -> tuple[dict, dict]:
    """(argument values by name, constexprs and launch options) of the
    representative call of `cfg`'s kernel, as the host code passes them.
    Tensors are stand-ins (triton's MockTensor: a dtype, a 16-aligned pointer)."""
    import torch
    from triton.runtime.jit import MockTensor

    T = lambda name: MockTensor(getattr(torch, name))
    dt = _TORCH_DTYPES[cfg["dtype"]]
    pat = TRITON_PATTERNS[cfg["pattern"]]
    D = DV = cfg["head_dim"]
    tdtype = getattr(torch, dt)
    bm, bn = mod.tile_config(D, tdtype)
    launch = mod.launch_config(cfg["kernel"], D, tdtype, heavy=bool(pat["MASK_KIND"] or pat["DROPOUT"]))
    H, Hkv, L = _CALL["H"], _CALL["Hkv"], _CALL["L"]
    lq2 = _CALL["L_IDX"] if pat["HAS_QIDX"] else L
    lk2 = _CALL["L_IDX"] if pat["HAS_KIDX"] else L
    nqb, nkb = -(-lq2 // bm), -(-lk2 // bn)
    kernel = cfg["kernel"]
    v = {}
    # tensors (pointer arguments): see _Launch and attention_forward/backward
    v["Q"], v["K"], v["V"] = T(dt), T(dt), T(dt)
    if kernel == "_attn_fwd":
        # single sub-pass without a query index: out in q's dtype; else float32 partials
        v["Out"] = T("float32" if pat["HAS_QIDX"] else dt)
        v["Lse"] = T("float32")
    else:
        v["DO"], v["Lse"], v["Delta"] = T(dt), T("float32"), T("float32")
        if kernel == "_attn_bwd_dq":
            v["DQ"] = T("float32")
        else:
            v["DK"], v["DV_"] = T("float32"), T("float32")
    # no user mask: q fills the slot; a bool mask is viewed as uint8; a float
    # mask is passed as is (here in the input dtype)
    v["Mask"] = T({0: dt, 1: "uint8", 2: dt}[pat["MASK_KIND"]])
    # absent index tables are filled with kv_count (int32); present ones are int64
    v["QIdx"] = T("int64" if pat["HAS_QIDX"] else "int32")
    v["KIdx"] = T("int64" if pat["HAS_KIDX"] else "int32")
    v["Count"], v["Blocks"], v["Partial"] = T("int32"), T("int32"), T("int32")
    v["PMasks"] = T("uint8")  # bool partial-tile masks viewed as uint8
    v["Tiles"] = T("int32")
    # strides of contiguous q (B,H,L,D), k (B,Hkv,L,D), v (B,Hkv,L,Dv),
    # out/dout (B,H,L,Dv), lse (B,H,L)
    v.update(sqb=H * L * D, sqh=L * D, sqm=D, skb=Hkv * L * D, skh=L * D, skn=D,
             svb=Hkv * L * DV, svh=L * DV, svn=DV, sob=H * L * DV, soh=L * DV, som=DV, slb=H * L, slh=L)
    # a (B, 1, Lq, Lk) mask expanded over heads; no mask: all 0
    v.update(zip(("smb", "smh", "smm", "smn"), (L * L, 0, L, 1) if pat["MASK_KIND"] else (0, 0, 0, 0)))
    # schedule (Hp, nblocks[, nb]): shared across heads (Hp = 1, head strides 0)
    # for plain patterns, per head for the index-table one
    rows, cols = (nqb, nkb) if kernel != "_attn_bwd_dkdv" else (nkb, nqb)
    per_head = pat["HAS_QIDX"]
    v.update(sch=rows if per_head else 0, scm=1, sbh=rows * cols if per_head else 0, sbm=cols)
    v.update(H=H, G=H // Hkv, lq2=lq2, lk2=lk2, D=D, DV=DV, qk_scale=D ** -0.5 * _LOG2E)
    if kernel != "_attn_fwd":
        v["scale"] = D ** -0.5
    if kernel == "_attn_bwd_dkdv":
        v["Hkv"] = Hkv
    # dropout: key = _mix32(...) < 2**32 and threshold = p * 2**32: values at or
    # above 2**31 (half of all seeds; p >= 0.5) make Triton pick int64. Off:
    # seed 0 gives key 0, threshold 0, scale 1.
    if pat["DROPOUT"]:
        v.update(drop_key=0xC0FFEE42, drop_threshold=2 ** 31, drop_scale=2.0)
    else:
        v.update(drop_key=0, drop_threshold=0, drop_scale=1.0)
    meta = dict(pat, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, 1 << (D - 1).bit_length()),
                BLOCK_DV=max(16, 1 << (DV - 1).bit_length()), PRECISION=cfg["precision"],
                COUNT_TILES=False, **launch)
    return v, meta


def _ptxas_log_of(fn_compile):
    """Run fn_compile(), returning (its result, what it printed to stdout)."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn_compile()
    return result, buf.getvalue()


def _sm_arch(cap: int) -> str:
    """The arch Triton compiles a capability for ("sm_90a" for 90)."""
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability
        return sm_arch_from_capability(cap)
    except Exception:  # noqa: BLE001 - a name for a row only
        return f"sm_{cap}"


def _failed_row(cfg: dict) -> dict:
    """A row with no results yet (error None until one is set)."""
    return {"source": TRITON_SOURCE, "kernel": cfg["kernel"], "mangled": cfg["kernel"],
            "config": _config_name(cfg), "arch": _sm_arch(cfg["cap"]), "registers": None, "smem": None,
            "spill_stores": None, "spill_loads": None, "stack": None, "error": None, "same_as": None,
            "skipped": None}


def check_kernel_arguments(kernel: str, params: dict, values: dict, meta: dict, options) -> None:
    """Raise RuntimeError, naming them, unless the representative call of
    `kernel` passes each of its parameters exactly once and nothing else.
    `params` maps the kernel's parameter names to whether each is a constexpr
    (JITFunction.params); `values` must hold exactly its other parameters, and
    `meta` its constexprs plus launch options: names in `options`, the fields
    of the backend's options (num_warps, num_stages, ...), which are not
    kernel parameters. Unchecked, an unknown name in `values` would pass
    unseen (arguments are picked from it by parameter name), and one in `meta`
    would fail only later, as Triton's "unrecognised" keyword argument."""
    problems = []
    if extra := [n for n in values if n not in params]:
        problems.append(f"passes argument(s) {extra} that {kernel} does not have")
    if extra := [n for n in meta if n not in params and n not in options]:
        problems.append(f"passes constexpr(s) {extra} that {kernel} does not have (nor are they launch options)")
    if wrong := [n for n in values if params.get(n)]:
        problems.append(f"passes constexpr(s) {wrong} of {kernel} as runtime arguments")
    if wrong := [n for n in meta if n in params and not params[n]]:
        problems.append(f"passes runtime argument(s) {wrong} of {kernel} as constexprs")
    if missing := [n for n in params if n not in values and n not in meta]:
        problems.append(f"has no value for argument(s) {missing} of {kernel}")
    if problems:
        raise RuntimeError("the report " + "; ".join(problems))


def _triton_compile_one(mod, cfg: dict, seen: dict) -> dict:
    """Compile one config; a row (see triton_rows). `seen` maps a compile key
    (signature, constexprs, attrs, options, target) to the config that made it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    cap = cfg["cap"]
    row = _failed_row(cfg)
    try:
        fn = getattr(mod, cfg["kernel"])
        if not hasattr(fn, "params"):
            raise RuntimeError(f"{cfg['kernel']} is not a compilable JITFunction ({type(fn).__name__}): "
                               "was TRITON_INTERPRET set?")
        values, meta = _launch_args(mod, cfg)
        target = GPUTarget("cuda", cap, 32)
        backend = make_backend(target)
        check_kernel_arguments(cfg["kernel"], {p.name: p.is_constexpr for p in fn.params}, values, meta,
                               set(backend.parse_options({}).__dict__))
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        args = [values[p.name] for p in fn.params if p.name in values]
        # as JITFunction.run adds them
        kwargs = dict(meta, debug=knobs.runtime.debug, instrumentation_mode=knobs.compilation.instrumentation_mode)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        row.update(num_warps=options.num_warps, num_stages=options.num_stages,
                   block=f"{meta['BLOCK_M']}x{meta['BLOCK_N']}")
        key = repr((cfg["kernel"], cap, sorted(signature.items()), sorted(constexprs.items()),
                    sorted(attrs.items()), sorted(options.__dict__.items())))
        if key in seen:  # same binary as an earlier config (e.g. D=80 and D=128)
            first = seen[key]
            row.update({k: first.get(k) for k in ("arch", "registers", "smem", "spill_stores", "spill_loads",
                                                   "stack", "error", "perf_warnings")}, same_as=first["config"])
            return row
        src = ASTSource(fn, signature, constexprs, attrs)
        t0 = time.monotonic()
        kernel, printed = _ptxas_log_of(lambda: triton.compile(src, target=target, options=options.__dict__))
        row["seconds"] = round(time.monotonic() - t0, 1)
        logs = parse_ptxas_log(printed, TRITON_SOURCE)
        if not logs:  # Triton did not print its ptxas log: run ptxas -v on the PTX
            logs = parse_ptxas_log(_run_ptxas(kernel.asm["ptx"], cap), TRITON_SOURCE)
        if len(logs) != 1:
            raise RuntimeError(f"expected one entry function in the ptxas log, got {len(logs)}")
        log = logs[0]
        row.update(arch=log["arch"], registers=log["registers"], stack=log["stack"],
                   spill_stores=log["spill_stores"], spill_loads=log["spill_loads"],
                   smem=int(kernel.metadata.shared) + log["smem"],
                   perf_warnings=len(re.findall(r"Potential Performance Loss", printed)))
        seen[key] = row
    except Exception as e:  # noqa: BLE001 - reported as a failed config
        row["error"] = _error_text(e)
    return row


def _error_text(e: BaseException, limit: int = 900) -> str:
    """A failed compile's message, kept short: Triton's CompilationError puts
    the source excerpt first and the reason last; a ptxas failure carries the
    whole PTX. Keeps the first line, the end, and the cause."""
    msg = str(e).strip()
    if len(msg) > limit:
        first, _, rest = msg.partition("\n")
        msg = f"{first[:200]}\n ... {rest[-(limit - 200):]}"
    text = f"{type(e).__name__}: {msg}"
    if e.__cause__ is not None:
        text += f"\n(caused by {type(e.__cause__).__name__}: {str(e.__cause__)[:300]})"
    return text


def _run_ptxas(ptx: str, cap: int) -> str:
    """`ptxas -v` on Triton's PTX with the flags Triton uses; returns the log."""
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(cap)}", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{proc.stderr[-2000:]}")
    return proc.stderr


def _triton_worker(in_path: str, out_path: str) -> None:
    """Worker process: compile the series of configs in in_path (JSON), write
    rows to out_path. Unless keep_going, a series stops at its first config
    that fails; the rest of it is marked skipped."""
    import importlib
    import json
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas
    spec = json.loads(Path(in_path).read_text())
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    series = spec["series"]
    rows: list[list[dict]] = []
    try:
        mod = importlib.import_module(spec["module"])
    except Exception as e:  # noqa: BLE001
        err = f"import of {spec['module']} failed: {_error_text(e)}"
        rows = [[dict(_failed_row(c), error=err) for c in ser] for ser in series]
    else:
        # A kernel whose source Triton cannot hash (e.g. it calls a host Python
        # function) fails at its first launch. A failed hash leaves placeholder
        # hashes behind on the kernel and the helpers it walked, after which
        # other kernels and later compiles in this process would wrongly pass:
        # so check each kernel first, clearing placeholders after a failure,
        # and fail all configs of a kernel that does not pass.
        from triton.runtime.jit import JITFunction
        jitted = [f for f in vars(mod).values() if isinstance(f, JITFunction)]
        broken = {}
        for name in dict.fromkeys(c["kernel"] for ser in series for c in ser):
            try:
                getattr(mod, name).cache_key
            except Exception as e:  # noqa: BLE001
                broken[name] = "the kernel's source does not pass Triton's dependency check " \
                               f"(JITFunction.cache_key): {_error_text(e)}"
                for f in jitted:
                    if str(getattr(f, "hash", None)).startswith("recursion:"):
                        f.hash = None
        seen: dict = {}
        for ser in series:
            out, failed = [], None
            for cfg in ser:
                if cfg["kernel"] in broken:
                    row = dict(_failed_row(cfg), error=broken[cfg["kernel"]])
                elif failed is not None:
                    row = dict(_failed_row(cfg), skipped=f"after {failed} failed")
                else:
                    row = _triton_compile_one(mod, cfg, seen)
                if failed is None and _row_problems(row) and not spec["keep_going"]:
                    failed = row["config"]
                out.append(row)
            rows.append(out)
    caps = sorted({c["cap"] for ser in series for c in ser}) or [90]
    ptxas = get_ptxas(caps[-1]).path
    Path(out_path).write_text(json.dumps({"rows": rows, "ptxas": ptxas}))


def ptxas_version(path: str) -> str:
    proc = subprocess.run([path, "--version"], capture_output=True, text=True)
    m = re.search(r"release [\d.]+, V[\d.]+", proc.stdout)
    return m.group(0) if m else "unknown version"


def triton_rows(archs: list[str], quick: bool = False, jobs: int | None = None, ptxas: str = "triton",
                module: str = TRITON_MODULE, info: dict | None = None, extended: bool = False,
                keep_going: bool = False) -> list[dict]:
    """Rows for the shipped Triton configs: the keys of cuda_rows (source,
    kernel, mangled, arch, registers, smem, spill_stores, spill_loads, stack)
    plus config ("fp16 D=128 all"), block, num_warps, num_stages, error (None,
    or why the config did not compile), same_as (the config whose binary this
    one shares, or None) and perf_warnings (ptxas "Potential Performance Loss"
    notes), skipped (None, or why the config was not compiled: only after an
    earlier config of the same kernel, dtype and arch failed, unless
    keep_going). `archs` as capabilities ("80", "90"). `ptxas`: "triton" (the
    ptxas Triton bundles and uses at run time) or "toolkit" (the CUDA toolkit's).
    `info`, when given, receives {"ptxas": path, "ptxas_version", "seconds"}.
    """
    import json
    import tempfile

    start = time.monotonic()
    configs = triton_configs(archs, quick, extended)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if ptxas == "toolkit":
        home = _build_env().find_cuda_home()
        if not home or not (Path(home) / "bin" / "ptxas").is_file():
            raise RuntimeError("compile_report: --ptxas toolkit: no CUDA toolkit with bin/ptxas found")
        env["TRITON_PTXAS_PATH"] = str(Path(home) / "bin" / "ptxas")
    elif ptxas != "triton":
        raise ValueError(f"ptxas must be 'triton' or 'toolkit', not {ptxas!r}")
    # A series: the configs of one (arch, kernel, dtype, precision), head dims
    # ascending, plain before all. One worker compiles a series in order, so
    # configs that share a binary (head dims that pad alike) compile once, and
    # (unless keep_going) a series stops at its first failure.
    series: dict = {}
    for i, c in enumerate(configs):
        series.setdefault((c["cap"], c["kernel"], c["dtype"], c["precision"]), []).append(i)
    order = {p: n for n, p in enumerate(TRITON_PATTERNS)}
    for idx in series.values():
        idx.sort(key=lambda i: (configs[i]["head_dim"], order[configs[i]["pattern"]]))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(series)))
    # balance by config count: measured (Triton 3.8, default matrix, 2 cores),
    # no series is clearly slower: a compile takes 1.4-1.5 s on average for
    # each dtype (fp32 with tf32 dots included) and each head dim (D=256
    # included), and which series takes longest (6-13 s) changes from run to run
    cost = lambda key: len(series[key])
    shards: list[list] = [[] for _ in range(jobs)]
    load = [0] * jobs
    for key in sorted(series, key=cost, reverse=True):
        n = load.index(min(load))
        shards[n].append(series[key])
        load[n] += cost(key)
    results: list[dict | None] = [None] * len(configs)
    with tempfile.TemporaryDirectory(prefix="tfk_triton_report_") as tmp:
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")  # leave the user's cache alone
        procs = []
        for n, shard in enumerate(shards):
            if not shard:
                continue
            inp, out = Path(tmp) / f"in{n}.json", Path(tmp) / f"out{n}.json"
            inp.write_text(json.dumps({"module": module, "keep_going": keep_going,
                                       "series": [[configs[i] for i in ser] for ser in shard]}))
            log = Path(tmp) / f"log{n}.txt"  # a file, not a pipe: a full pipe would stall a worker
            with open(log, "w") as f:
                p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--triton-worker",
                                      str(inp), str(out)], env=env, cwd=str(ROOT), stdout=f,
                                     stderr=subprocess.STDOUT)
            procs.append((p, shard, out, log))
        ptxas_path = None
        for p, shard, out, log in procs:
            p.wait()
            if p.returncode != 0 or not out.is_file():
                text = log.read_text(errors="replace")
                raise RuntimeError(f"compile_report: Triton worker failed (exit {p.returncode}):\n{text[-4000:]}")
            data = json.loads(out.read_text())
            ptxas_path = data["ptxas"]
            for ser, ser_rows in zip(shard, data["rows"]):
                for i, row in zip(ser, ser_rows):
                    results[i] = row
    if info is not None:
        info.update(ptxas=ptxas_path, ptxas_version=ptxas_version(ptxas_path) if ptxas_path else None,
                    seconds=time.monotonic() - start)
    return results


def collect(build_dir: str | os.PathLike = DEFAULT_BUILD_DIR, archs: list[str] | None = None, *,
            cuda: bool = True, triton: bool = True, quick: bool = False, jobs: int | None = None,
            ptxas: str = "triton", info: dict | None = None, extended: bool = False,
            keep_going: bool = False) -> list[dict]:
    """Build, then return one row per (kernel, arch): source, kernel (demangled),
    mangled, arch ("sm_80"), registers, smem, spill_stores, spill_loads, stack
    (bytes); Triton rows add config, error and the other keys of triton_rows.
    CUDA rows are empty when CMake found no nvcc. `info` receives
    {"cuda": whether CMake found nvcc, "triton": triton_rows' info}."""
    if archs is None:
        be = _build_env()
        archs = be.cmake_arch_list(be.cuda_archs()).split(";")
    rows: list[dict] = []
    info = {} if info is None else info
    if cuda:
        built = build(build_dir, archs)
        info["cuda"] = built["cuda"]
        if built["cuda"]:
            rows += cuda_rows(build_dir, archs)
    if triton:
        info["triton"] = {}
        rows += triton_rows(archs, quick=quick, jobs=jobs, ptxas=ptxas, info=info["triton"], extended=extended,
                            keep_going=keep_going)
    return rows


def _row_problems(r: dict) -> list[str]:
    config = f" [{r['config']}]" if r.get("config") else ""
    where = f"{_short(r['kernel'])}{config} [{r['arch']}]"
    if r.get("error"):
        return [f"{where} failed to compile: {r['error']}"]
    if r.get("skipped"):  # only ever after a failure, which is reported
        return []
    out = []
    if r["spill_stores"] or r["spill_loads"]:
        out.append(f"{where} spills: {r['spill_stores']} bytes stored, {r['spill_loads']} bytes loaded")
    if r["smem"] > smem_limit(r["arch"]):
        out.append(f"{where} uses {r['smem']} bytes of shared memory, over the "
                   f"{smem_limit(r['arch'])} bytes {r['arch']} allows")
    return out


def problems(rows: list[dict]) -> list[str]:
    """Why the report fails: a config that did not compile, spills, or shared
    memory over the arch's limit."""
    return [line for r in rows for line in _row_problems(r)]


def _short(name: str) -> str:
    return name.split("(", 1)[0]


def _cell(x) -> str:
    return "-" if x is None else str(x)


def _table(head: tuple, body: list[tuple]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """CUDA rows (no "config" key) as one table, Triton rows as another."""
    parts = []
    cuda = [r for r in rows if "config" not in r]
    if cuda:
        head = ("kernel", "arch", "regs", "smem B", "spill st B", "spill ld B", "stack B", "source")
        parts.append("CUDA kernels (csrc/):\n" + _table(head, [(_short(r["kernel"]), r["arch"], str(r["registers"]), str(r["smem"]),
                                    str(r["spill_stores"]), str(r["spill_loads"]), str(r["stack"]), r["source"])
                                   for r in cuda]))
    tri = [r for r in rows if "config" in r]
    if tri:
        head = ("kernel", "config", "arch", "tile", "warps", "stages", "regs", "smem B", "spill st B",
                "spill ld B", "stack B", "note")
        body = []
        for r in tri:
            note = ("FAILED: " + r["error"].splitlines()[0][:100]) if r.get("error") else \
                f"skipped ({r['skipped']})" if r.get("skipped") else \
                (f"= {r['same_as']}" if r.get("same_as") else "")
            if not r.get("error") and r.get("perf_warnings"):
                note = (note + "; " if note else "") + "ptxas perf warning"
            body.append((r["kernel"], r["config"], r["arch"], _cell(r.get("block")), _cell(r.get("num_warps")),
                         _cell(r.get("num_stages")), _cell(r["registers"]), _cell(r["smem"]),
                         _cell(r["spill_stores"]), _cell(r["spill_loads"]), _cell(r["stack"]), note))
        parts.append(f"Triton kernels ({tri[0]['source']}):\n" + _table(head, body))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=str(DEFAULT_BUILD_DIR.relative_to(ROOT)),
                    help="CMake build folder, relative to the repo root (default build/cmake)")
    ap.add_argument("--archs", default=None,
                    help="archs, e.g. 80,90 or 8.0;9.0a (default: $TFK_CUDA_ARCHS or 80,90)")
    ap.add_argument("--quick", action="store_true",
                    help="Triton: one config per kernel per arch (fp16, D=128, every feature on) "
                         "instead of the full matrix")
    ap.add_argument("--extended", action="store_true",
                    help="Triton: add the bool-mask pattern (plain with a bool attn_mask): three "
                         "patterns instead of two, half again the configs")
    ap.add_argument("--keep-going", action="store_true",
                    help="Triton: compile every config; by default a (kernel, dtype, arch) series stops "
                         "at its first failing config")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA (CMake) section")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton section")
    ap.add_argument("--jobs", type=int, default=None,
                    help="parallel Triton compile processes (default: the number of CPUs)")
    ap.add_argument("--ptxas", choices=("triton", "toolkit"), default="triton",
                    help="Triton section: Triton's bundled ptxas, the one it uses at run time (default), "
                         "or the CUDA toolkit's")
    args = ap.parse_args(argv)
    be = _build_env()
    env = dict(os.environ)
    if args.archs is not None:
        env["TFK_CUDA_ARCHS"] = args.archs
    archs = be.cmake_arch_list(be.cuda_archs(env)).split(";")
    build_dir = Path(args.build_dir)
    if not build_dir.is_absolute():
        build_dir = ROOT / build_dir

    info: dict = {}
    rows = collect(build_dir, archs, cuda=not args.no_cuda, triton=not args.no_triton, quick=args.quick,
                   jobs=args.jobs, ptxas=args.ptxas, info=info, extended=args.extended,
                   keep_going=args.keep_going)
    if not args.no_cuda and not info.get("cuda"):
        print("compile_report: no CUDA section: CMake found no CUDA compiler "
              "(set CUDA_HOME or CUDAToolkit_ROOT)", file=sys.stderr)
    if not rows:
        print("compile_report: nothing to report", file=sys.stderr)
        return 2
    print(format_table(rows))
    if "triton" in info:
        t = info["triton"]
        tri = [r for r in rows if "config" in r]
        matrix = "quick" if args.quick else "extended" if args.extended else "default"
        compiled = sum(1 for r in tri if r["registers"] is not None and not r.get("same_as"))
        skipped = sum(1 for r in tri if r.get("skipped"))
        print(f"\nTriton: {len(tri)} configs ({matrix} matrix), {compiled} compiles"
              + (f", {skipped} skipped after a failure (--keep-going compiles them)" if skipped else "")
              + f", {t['seconds']:.0f} s; ptxas {t['ptxas']} ({t['ptxas_version']})")
    bad = problems(rows)
    if bad:
        print(f"\ncompile_report: FAILED, {len(bad)} problem(s):", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"\ncompile_report: OK, {len(rows)} kernel builds, no spills, shared memory within limits")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--triton-worker"]:  # internal: one process of triton_rows
        _triton_worker(*sys.argv[2:4])
        sys.exit(0)
    sys.exit(main())
