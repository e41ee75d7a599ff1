"""Compile report: resources of every shipped kernel, per arch, with no GPU.

    python -m bench.compile_report [--build-dir build/cmake] [--archs 80,90]
        [--quick | --extended] [--no-cuda] [--no-triton] [--families attention,moe]
        [--jobs N] [--ptxas triton|toolkit]

CUDA: configures and builds the CMake project (CMakeLists.txt), which compiles
each csrc/**/*.cu to a cubin per arch with `-Xptxas -v`, and reads the ptxas logs.
Shared memory is ptxas's static figure plus the dynamic bytes a launch
requests, from the kernels' own functions in the host library: the attention
kernels' at their head dim, the linear-attention forward's
(linear::fwd_smem_bytes) per element type at D = kMaxDim (csrc/linear/linear.h).

Triton: compiles every shipped config of triton_kernels/attention.py,
triton_kernels/moe.py, triton_kernels/linear.py and triton_kernels/kvcache.py ahead of time
(triton.compile for GPUTarget("cuda", arch, 32)) with the argument types
Triton's launcher derives from a
representative call, and reads the log of the ptxas run Triton itself makes
(its bundled ptxas unless --ptxas toolkit).
Attention, default matrix: 3 kernels x {fp16, bf16, fp32 (tf32 dots)} x
D = Dv in {64, 80, 128, 256} x {plain, all features on} x each arch;
--extended adds a third pattern, plain with a bool mask.
MoE (see MOE_* below): the launchers themselves (grouped_gemm, grouped_gemm_tn,
route, act_backward, combine, permute) are called on meta tensors and their
kernel launches captured, so constexprs, tiles, dot precision and launch
options are the launchers' own: grouped_gemm for each dtype x activation x
gather x row scale x weight layout, route for every BLOCK_E it can take
(E = 1..256) plain and with every feature, the others per dtype, activation
or BLOCK_E; --extended adds the least tiles and the rest of the constexpr
ranges (route's k = 1..8, int32 ids, ...).
Linear attention (see LINEAR_* below): as MoE, linear.py's launchers
(forward, backward) on meta tensors, their launches captured (tiles and
num_warps from linear.config): _linear_fwd, _linear_bwd_dq, _linear_bwd_dk,
_linear_bwd_dv and _linear_decode for 3 dtypes x head dims (D, Dv) in
LINEAR_HEAD_DIMS (D = Dv in 16, 40, 64, 80, 128, 256; (64, 128), (128, 64))
x {causal elu1, non-causal elu1, non-causal softmax}, each with a key padding
mask and an initial state (or incoming state gradient) on; _softmax_k_stats
per dtype and D; --extended adds the plain pattern (identity map, nothing
on), the forward with an fp32 out (the backward's recompute) and the
one-token decode step.
KV-cache decoding (see KVCACHE_* below): kvcache_forward's launches of
_kvcache_split and _kvcache_merge, captured as for MoE, for 3 dtypes x
D in {64, 128, 256} x {one-token causal decode, a 16-query window on a
paged cache}.
--quick is one config per kernel per arch (the tests'). --families picks
the modules (default attention,moe,linear,kvcache).

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
# The linear-attention forward (csrc/linear/linear_fwd.cu): the template
# arguments are the element type and causal; the bytes depend on the type and
# D (the value tile is kBlockE wide whatever E is), from linear::fwd_smem_bytes
# in the host library at D = kMaxDim (csrc/linear/linear.h), the most a
# launch takes.
_DYNAMIC_SMEM_LINEAR = re.compile(r"tfk::linear::\w+::linear_fwd_kernel<\s*([\w:]+)\s*,")
_LINEAR_CUDA_DTYPES = {"__half": 0, "__nv_bfloat16": 1, "float": 2}  # linear::Dtype


class _LinearFwdParams(ctypes.Structure):
    """tfk::linear::FwdParams (csrc/linear/linear.h): its leading fields, field
    for field, through vdim (fwd_smem_bytes reads dtype and dim); the fields
    after them (pointers, the map, flags) as zeroed room, more than they take."""
    _fields_ = [("dtype", ctypes.c_int), ("causal", ctypes.c_bool), ("batch", ctypes.c_int64),
                ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64), ("len_q", ctypes.c_int64),
                ("len_k", ctypes.c_int64), ("dim", ctypes.c_int), ("vdim", ctypes.c_int),
                ("rest", ctypes.c_int64 * 64)]


def linear_cuda_max_dim() -> int:
    """kMaxDim of csrc/linear/linear.h: the largest D (and E) a launch takes."""
    m = re.search(r"constexpr int kMaxDim = (\d+);", (ROOT / "csrc" / "linear" / "linear.h").read_text())
    if not m:
        raise RuntimeError("compile_report: no kMaxDim in csrc/linear/linear.h")
    return int(m.group(1))


def _add_dynamic_smem(rows: list[dict], build_dir: Path) -> None:
    lib = None

    def host_lib():
        nonlocal lib
        if lib is None:
            lib = ctypes.CDLL(str(build_dir / "libtfk_host.so"))
            lib.tfk_host_dynamic_smem_bytes.argtypes = [ctypes.c_char_p, ctypes.c_int]
            lib.tfk_host_dynamic_smem_bytes.restype = ctypes.c_int64
            # tfk::linear::fwd_smem_bytes(const FwdParams&)
            lib.linear_fwd_smem = lib["_ZN3tfk6linear14fwd_smem_bytesERKNS0_9FwdParamsE"]
            lib.linear_fwd_smem.argtypes = [ctypes.POINTER(_LinearFwdParams)]
            lib.linear_fwd_smem.restype = ctypes.c_int64
        return lib

    for r in rows:
        if m := _DYNAMIC_SMEM.search(r["kernel"]):
            n = host_lib().tfk_host_dynamic_smem_bytes(m.group(1).encode(), int(m.group(2)))
        elif m := _DYNAMIC_SMEM_LINEAR.search(r["kernel"]):
            dtype = _LINEAR_CUDA_DTYPES.get(m.group(1))
            if dtype is None:
                raise RuntimeError(f"compile_report: unknown element type {m.group(1)} in {r['kernel']}")
            d = linear_cuda_max_dim()
            n = host_lib().linear_fwd_smem(ctypes.byref(_LinearFwdParams(dtype=dtype, dim=d, vdim=d)))
        else:
            continue
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
# Each shipped config of a Triton module (TRITON_FAMILIES: attention, moe, linear;
# each with its matrix of configs and its way to build a config's launch
# arguments) is compiled ahead of time for a named target (no GPU needed)
# with the argument types and specialisations Triton's launcher would derive
# from one representative call of the host code (attention_forward /
# attention_backward; the MoE launchers themselves, see below): the
# launcher's own binder is run on stand-in tensors of the right dtypes and on
# realistic ints.
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
# lsh: LSH attention's sub-passes (tfk/ops/lsh/kernel_backends.py): index
#   tables per (batch, head) (the sorted rounds), the key padding as a bool
#   mask (MASK_KIND=1), dropout, and the position predicates (PREDICATES=2:
#   causal by position and the self logit).
# bool (--extended): plain + a bool attn_mask (MASK_KIND=1, read as uint8).
#   Measured (Triton 3.8, --extended on sm_80 and sm_90, 216 configs): no
#   config spills; bool needs more registers than plain in 38 of the 72
#   (kernel, dtype, head dim, arch) cases, more than `all` in 8.
TRITON_PATTERNS = {
    "plain": dict(HAS_QIDX=False, HAS_KIDX=False, MASK_KIND=0, DROPOUT=False, PREDICATES=0),
    "all": dict(HAS_QIDX=True, HAS_KIDX=True, MASK_KIND=2, DROPOUT=True, PREDICATES=0),
    "lsh": dict(HAS_QIDX=2, HAS_KIDX=2, MASK_KIND=1, DROPOUT=True, PREDICATES=2),
    "bool": dict(HAS_QIDX=False, HAS_KIDX=False, MASK_KIND=1, DROPOUT=False, PREDICATES=0),
    # score modifiers (tfk.scores): a softcap and a distance bias, whose
    # gradient the dK/dV kernel reduces per tile diagonal (DBIAS=1, natural order).
    # Head dims up to 128 (triton_kernels.attention.MODS_MAX_HEAD_DIM): at
    # D=256 dK/dV with modifiers spilled (24-104 bytes; Triton 3.8, sm_80 and
    # sm_90a), so the backend refuses modifiers there.
    "mods": dict(HAS_QIDX=False, HAS_KIDX=False, MASK_KIND=0, DROPOUT=False, PREDICATES=0, SOFTCAP=True,
                 HAS_BIAS=True),
    # every feature of "all" and the modifiers: in a reordered layout the dK/dV
    # kernel stores its bias gradient per element (DBIAS=2)
    "mods_all": dict(HAS_QIDX=True, HAS_KIDX=True, MASK_KIND=2, DROPOUT=True, PREDICATES=0, SOFTCAP=True,
                     HAS_BIAS=True),
}
TRITON_PATTERNS_DEFAULT = ("plain", "all", "lsh", "mods", "mods_all")
# --quick: one config per kernel per arch: every feature on (score modifiers too), fp16, head dim
# 128 (the common training config): 12 s on 2 cores (measured, see above),
# cheap enough for a test.
TRITON_QUICK = (("fp16", "ieee"), 128, "mods_all")

# The representative call: B=2, H=8 query heads over Hkv=2 key heads (G=4),
# Lq = Lk = 1000 (not a multiple of 16, so lengths get no divisibility hint);
# sub-passes with index tables cover 500 positions (a dilation of 2).
_CALL = dict(B=2, H=8, Hkv=2, L=1000, L_IDX=500)
_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_LOG2E = 1.4426950408889634


def _caps(archs: list[str]) -> list[int]:
    return sorted({int(re.match(r"\d+", str(a)).group(0)) for a in archs})


def attention_configs(archs: list[str], quick: bool = False, extended: bool = False) -> list[dict]:
    """The attention matrix: one dict per (kernel, dtype, precision, head dim,
    pattern, arch); `archs` as capabilities ("80", "90", "90a"). `quick`: one
    config per kernel per arch; `extended`: adds the bool-mask pattern."""
    caps = _caps(archs)
    if quick:
        dtypes, dims, patterns = (TRITON_QUICK[0],), (TRITON_QUICK[1],), (TRITON_QUICK[2],)
    elif extended:
        dtypes, dims, patterns = TRITON_DTYPES, TRITON_HEAD_DIMS, tuple(TRITON_PATTERNS)
    else:
        dtypes, dims, patterns = TRITON_DTYPES, TRITON_HEAD_DIMS, TRITON_PATTERNS_DEFAULT
    # the modifiers' variants ship up to MODS_MAX_HEAD_DIM (the backend refuses them above)
    from triton_kernels.attention import MODS_MAX_HEAD_DIM
    return [dict(family="attention", kernel=k, dtype=dt, precision=prec, head_dim=d, pattern=p, cap=cap)
            for cap in caps for k in TRITON_KERNELS for (dt, prec) in dtypes for d in dims for p in patterns
            if not (p.startswith("mods") and d > MODS_MAX_HEAD_DIM)]


def _config_name(cfg: dict) -> str:
    if "name" in cfg:  # MoE and linear configs carry theirs
        return cfg["name"]
    prec = "/tf32" if cfg["precision"] == "tf32" else ""
    return f"{cfg['dtype']}{prec} D={cfg['head_dim']} {cfg['pattern']}"


def _attention_launch_args(mod, cfg: dict) -> tuple[dict, dict]:
    """(argument values by name, constexprs and launch options) of the
    representative call of `cfg`'s kernel, as the host code passes them.
    Tensors are stand-ins (triton's MockTensor: a dtype, a 16-aligned pointer)."""
    import torch
    from triton.runtime.jit import MockTensor

    T = lambda name: MockTensor(getattr(torch, name))
    dt = _TORCH_DTYPES[cfg["dtype"]]
    pat = dict(TRITON_PATTERNS[cfg["pattern"]])
    softcap, has_bias = bool(pat.pop("SOFTCAP", False)), bool(pat.pop("HAS_BIAS", False))
    D = DV = cfg["head_dim"]
    tdtype = getattr(torch, dt)
    bm, bn = mod.tile_config(D, tdtype, pat["PREDICATES"])
    launch = mod.launch_config(cfg["kernel"], D, tdtype, bool(pat["MASK_KIND"] or pat["DROPOUT"] or pat["PREDICATES"]),
                               bn, softcap or has_bias)
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
    # for plain patterns and LSH's band, per head for the index-table one
    rows, cols = (nqb, nkb) if kernel != "_attn_bwd_dkdv" else (nkb, nqb)
    per_head = pat["HAS_QIDX"] and not pat["PREDICATES"]
    v.update(sch=rows if per_head else 0, scm=1, sbh=rows * cols if per_head else 0, sbm=cols)
    # index tables per (batch, head) (LSH: the query layout is one round of
    # the (B, H, n, L) order, the key layout all n = 4 rounds): one stride each
    v.update(sqi=4 * lq2 if pat["PREDICATES"] else 0, ski=lk2 if pat["PREDICATES"] else 0)
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
    # dropout's head index h·rounds + round: LSH's 4 hash rounds, round 1
    v["rounds"], v["rnd"] = (4, 1) if pat["PREDICATES"] else (1, 0)
    # the call's place in the grid whose keep mask it draws (tfk.dropout.Window): the whole call
    v.update(drop_h0=0, drop_heads=H, drop_q0=0, drop_k0=0)
    # score modifiers (_Launch.mod_args): the base-2 bias (H, 2L - 1) float32,
    # q fills the slot without one; the softcap's factors (1.0 without)
    v["Bias"] = T("float32" if has_bias else dt)
    v.update(sbias=2 * L - 1, lq_full=L, cap_scale=D ** -0.5 / 30.0 if softcap else 1.0,
             cap2=30.0 * _LOG2E if softcap else 1.0)
    if kernel == "_attn_bwd_dkdv":
        # the bias gradient's per-tile shares (float32 values, int32 indices); q_l fills the slots without
        v["DBias"], v["DBiasIdx"] = (T("float32"), T("int32")) if has_bias else (T(dt), T(dt))
        v.update(dslots=cols, nbias=2 * L - 1)
    extra = mod.mods_meta(kernel, has_bias, softcap, int(pat["HAS_QIDX"]), int(pat["HAS_KIDX"]), bm, bn,
                          launch.get("SPLIT_N", 1))
    meta = dict(pat, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, 1 << (D - 1).bit_length()),
                BLOCK_DV=max(16, 1 << (DV - 1).bit_length()), PRECISION=cfg["precision"],
                COUNT_TILES=False, **extra, **launch)
    return v, meta


# MoE (triton_kernels/moe.py). A config names a launcher call: the launcher
# (by its kernel), the input dtype and the options and sizes of the call.
# _moe_launch_args runs that launcher on meta tensors (shapes and strides, no
# data) with the module's kernels swapped for recorders and takes its launch
# of the config's kernel, so the constexprs (tiles from gemm_tiles and _block,
# route's BLOCK_T/BLOCK_E/BLOCK_G/BLOCK_K, permute's BLOCK_E), the dot
# precision (dot_precision) and the launch options (launch_config) are
# moe.py's own, not a copy kept here. The report keeps only which calls to
# make. MOE_DTYPES' precisions are checked against what the launcher passes.
#
# Default matrix, per arch (the launchers' largest tiles, at the
# representative sizes below):
#   _moe_grouped_gemm: 3 dtypes x act {none, silu, gelu_tanh, relu} x
#     {without, with} gather x {without, with} row scale x weight layout
#     {b (G, K, N), b (G, N, K) with trans_b}: 96.
#   _moe_grouped_gemm_tn: 3 dtypes x {without, with} gather: 6.
#   _moe_route: 3 logits dtypes x E in MOE_EXPERTS (every BLOCK_E route can
#     take: next_power_of_2(E) for 1 <= E <= 256, BLOCK_T = 16, 8 at 256) x
#     {plain: softmax, k = min(8, E); all: sigmoid, a bias, the most groups
#     (n_group = E / 2: the largest BLOCK_G for that E) keeping half of them,
#     the largest k they allow}: 54. TOP_K, N_GROUP and TOPK_GROUP are loop
#     trip counts (range, not static_range); the tiles [BLOCK_T, BLOCK_E],
#     [BLOCK_T, BLOCK_G] and [BLOCK_T, BLOCK_K] set the registers, and k = 8
#     gives the largest BLOCK_K. --extended adds k = 1..7 at E = 256 and E = 8,
#     and softmax with a bias and groups, unnormalised.
#   _moe_act_bwd: 3 dtypes x act {silu, gelu_tanh, relu}: 9.
#   _moe_combine: 3 dtypes, k = 8, int64 index (permute's inverse): 3.
#   _moe_histogram, _moe_scan, _moe_scatter (permute): int64 ids, E in
#     MOE_EXPERTS: every BLOCK_E = next_power_of_2(E + 1) in 2..512: 9 each.
# --extended adds the least tiles (H = I = 16: 16-wide N and K tiles) for the
# GEMMs, act_bwd and combine, int32 ids and index, and combine with k = 1.
# --quick: one config per kernel per arch, the register worst case (fp16,
# every feature on; route: bf16 logits, E = 128, whose [16, 128] and [16, 64]
# tiles need more registers than E = 256's [8, 256] and [8, 128]; permute:
# E = 256).
#
# Measured (Triton 3.8, default matrix, 390 configs on sm_80 and sm_90, 424 s
# of compiles: 234 s on 2 cores shared with a test run): registers at most
# 153/142 (grouped_gemm, sm_80/sm_90), 108 (route), 187 (histogram, E = 256,
# sm_90); shared memory at most 36 KiB; no spills. (Route ran on 4 warps
# before: two configs with groups spilled 4-8 bytes on sm_90a at 48 and 96
# registers; 8 warps spill none.)

MOE_MODULE = "tfk.triton_kernels.moe"
MOE_SOURCE = "triton_kernels/moe.py"
MOE_KERNELS = ("_moe_grouped_gemm", "_moe_grouped_gemm_tn", "_moe_route", "_moe_act_bwd", "_moe_combine",
               "_moe_histogram", "_moe_scan", "_moe_scatter")
MOE_DTYPES = TRITON_DTYPES  # moe.dot_precision: tf32 dots for fp32, as attention
MOE_ACTS = ("none", "silu", "gelu_tanh", "relu")  # grouped_gemm's act ("none": act=None)
# One E per power of two up to moe.MAX_EXPERTS: every BLOCK_E of route
# (next_power_of_2(E): 1..256) and of permute (next_power_of_2(E + 1): 2..512).
MOE_EXPERTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The representative call: T = 1000 tokens (not a multiple of 16, as the
# attention's L), hidden H = 2048, expert width I = 768, E = 128 experts,
# k = 8 (Qwen3-30B-A3B's layer); M = T * k routed rows. H and I are multiples
# of 64, so the GEMM tiles are the launchers' upper bounds (gemm_tiles).
_MOE_CALL = dict(T=1000, H=2048, I=768, E=128, k=8)
# --extended: sizes at which the launchers shrink the N and K tiles to 16
_MOE_SMALL = dict(H=16, I=16)


def _moe_name(kernel: str, dtype: str, precision: str | None, o: dict) -> str:
    parts = [dtype + ("/tf32" if precision == "tf32" else "")]
    if kernel == "_moe_grouped_gemm":
        parts += [o["act"], "gather" if o["gather"] else "", "scale" if o["scale"] else "",
                  "b(G,N,K)" if o["trans_b"] else "b(G,K,N)"]
    elif kernel == "_moe_grouped_gemm_tn":
        parts += ["gather" if o["gather"] else ""]
    elif kernel == "_moe_route":
        parts += [f"E={o['E']} k={o['k']}", o["score"], "bias" if o["bias"] else "",
                  f"groups {o['n_group']}/{o['topk_group']}" if o["n_group"] else "",
                  "" if o["normalize"] else "unnormalised"]
    elif kernel == "_moe_act_bwd":
        parts += [o["act"]]
    elif kernel == "_moe_combine":
        parts += [f"k={o['k']}", f"{o['index']} index"]
    else:
        parts += [f"E={o['E']}"]
    if o.get("small"):
        parts.append("small")
    return " ".join(p for p in parts if p)


def _moe_table():
    """(tier, kernel, dtype, precision, launcher options) of one arch, tier
    "quick" (also in the default matrix), "default" or "extended"; a series'
    configs in the order they compile."""
    def tier(quick, extended=False):
        return "quick" if quick else "extended" if extended else "default"

    for dt, prec in MOE_DTYPES:
        for small in (False, True):
            for trans_b in (False, True):
                for act in MOE_ACTS:
                    for gather in (False, True):
                        for scale in (False, True):
                            q = dt == "fp16" and act == "silu" and gather and scale and trans_b and not small
                            yield (tier(q, small), "_moe_grouped_gemm", dt, prec,
                                   dict(act=act, gather=gather, scale=scale, trans_b=trans_b, small=small))
    for dt, prec in MOE_DTYPES:
        for small in (False, True):
            for gather in (False, True):
                yield (tier(dt == "fp16" and gather and not small, small), "_moe_grouped_gemm_tn", dt, prec,
                       dict(gather=gather, small=small))
    for dt, _ in MOE_DTYPES:
        for E in MOE_EXPERTS:
            ng = E // 2 if E >= 4 else None  # groups of 2 experts: the largest BLOCK_G
            tg = ng // 2 if ng else None
            k_all = min(8, E, 2 * tg if tg else E)
            patterns = [(False, dict(k=min(8, E), score="softmax", bias=False, normalize=True)),
                        (dt == "bf16" and E == 128, dict(k=k_all, score="sigmoid", bias=True, normalize=True,
                                                         n_group=ng, topk_group=tg))]
            for q, p in patterns:
                yield tier(q), "_moe_route", dt, None, dict(dict(E=E, n_group=None, topk_group=None), **p)
            if E in (8, 256) and dt == "bf16":  # the other k (BLOCK_K 1..8)
                for q, p in patterns:
                    for k in range(1, p["k"]):
                        yield tier(False, True), "_moe_route", dt, None, dict(
                            dict(E=E, n_group=None, topk_group=None), **dict(p, k=k))
            if E >= 4:
                yield tier(False, True), "_moe_route", dt, None, dict(
                    E=E, k=k_all, score="softmax", bias=True, normalize=False, n_group=ng, topk_group=tg)
    for dt, _ in MOE_DTYPES:
        for small in (False, True):
            for act in MOE_ACTS[1:]:
                yield (tier(dt == "fp16" and act == "gelu_tanh" and not small, small), "_moe_act_bwd", dt, None,
                       dict(act=act, small=small))
    for dt, _ in MOE_DTYPES:
        for small in (False, True):
            for index in ("int64", "int32"):
                for k in (8, 1):
                    ext = small or index == "int32" or k == 1
                    yield (tier(dt == "fp16" and not ext, ext), "_moe_combine", dt, None,
                           dict(k=k, index=index, small=small))
    for kernel in ("_moe_histogram", "_moe_scan", "_moe_scatter"):
        for ids in ("int64", "int32"):
            for E in MOE_EXPERTS:
                yield tier(ids == "int64" and E == 256, ids == "int32"), kernel, ids, None, dict(E=E)


def moe_configs(archs: list[str], quick: bool = False, extended: bool = False) -> list[dict]:
    """The MoE matrix (see above): one dict per (kernel, dtype, launcher
    options, arch), with its name."""
    tiers = {"quick"} if quick else {"quick", "default", "extended"} if extended else {"quick", "default"}
    return [dict(family="moe", kernel=k, dtype=dt, precision=prec, opts=o, cap=cap, name=_moe_name(k, dt, prec, o))
            for cap in _caps(archs) for (t, k, dt, prec, o) in _moe_table() if t in tiers]


def _capture_launch(mod, kernel: str, call) -> tuple[tuple, dict]:
    """Run call() (a launcher of `mod`) with every @triton.jit function of
    `mod` replaced by a recorder; (positional, keyword arguments) of its one
    launch of `kernel`."""
    from triton.runtime.jit import JITFunction

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, args, kwargs))

    saved = {n: f for n, f in vars(mod).items() if isinstance(f, JITFunction)}
    try:
        for n in saved:
            setattr(mod, n, Recorder(n))
        call()
    finally:
        for n, f in saved.items():
            setattr(mod, n, f)
    mine = [(args, kwargs) for n, args, kwargs in launches if n == kernel]
    if len(mine) != 1:
        raise RuntimeError(f"the launcher launched {kernel} {len(mine)} times, expected once "
                           f"(launches: {[n for n, _, _ in launches]})")
    return mine[0]


def _moe_launch_args(mod, cfg: dict) -> tuple[dict, dict]:
    """(argument values by name, constexprs and launch options) of `cfg`'s
    kernel as its launcher passes them for the representative call (meta
    tensors, see above); tensors become MockTensors of their dtypes."""
    import torch
    from triton.runtime.jit import MockTensor

    o, kernel = cfg["opts"], cfg["kernel"]
    z = dict(_MOE_CALL, **(_MOE_SMALL if o.get("small") else {}))
    T, H, I, E, k = z["T"], z["H"], z["I"], z["E"], z["k"]
    M = T * k
    dt = getattr(torch, _TORCH_DTYPES.get(cfg["dtype"], cfg["dtype"]))
    i64, f32 = torch.int64, torch.float32

    def t(*shape, dtype=dt):
        return torch.empty(shape, dtype=dtype, device="meta")

    if kernel == "_moe_grouped_gemm":  # gate_up (act: b holds [gate | up]) or down, x gathered by token
        N = 2 * I if o["act"] != "none" else I
        call = lambda: mod.grouped_gemm(  # noqa: E731
            t(T if o["gather"] else M, H), t(E, N, H) if o["trans_b"] else t(E, H, N), t(E, dtype=i64),
            gather=t(M, dtype=i64) if o["gather"] else None, trans_b=o["trans_b"],
            act=None if o["act"] == "none" else o["act"], row_scale=t(M, dtype=f32) if o["scale"] else None)
    elif kernel == "_moe_grouped_gemm_tn":  # d down: dout (gathered by token)^T @ (w * act)
        call = lambda: mod.grouped_gemm_tn(  # noqa: E731
            t(T if o["gather"] else M, H), t(M, I), t(E, dtype=i64),
            gather_a=t(M, dtype=i64) if o["gather"] else None)
    elif kernel == "_moe_route":  # a bias in float32, as DeepSeek-V3's correction bias
        call = lambda: mod.route(  # noqa: E731
            t(T, o["E"]), o["k"], score=o["score"], normalize=o["normalize"],
            bias=t(o["E"], dtype=f32) if o["bias"] else None, n_group=o["n_group"], topk_group=o["topk_group"])
    elif kernel == "_moe_act_bwd":
        call = lambda: mod.act_backward(t(M, 2 * I), t(M, I), o["act"])  # noqa: E731
    elif kernel == "_moe_combine":
        call = lambda: mod.combine(t(T * o["k"], H), t(T * o["k"], dtype=getattr(torch, o["index"])),  # noqa: E731
                                   o["k"])
    elif kernel in ("_moe_histogram", "_moe_scan", "_moe_scatter"):
        call = lambda: mod.permute(t(T, k), o["E"])  # noqa: E731
    else:
        raise RuntimeError(f"no launcher known for {kernel}")
    args, kwargs = _capture_launch(mod, kernel, call)
    names = [p.name for p in getattr(mod, kernel).params]
    if len(args) > len(names):
        raise RuntimeError(f"the launcher passes {len(args)} positional arguments, {kernel} has {len(names)}")
    mock = lambda v: MockTensor(v.dtype) if isinstance(v, torch.Tensor) else v  # noqa: E731
    values = {n: mock(v) for n, v in zip(names, args)}
    meta = {n: mock(v) for n, v in kwargs.items()}
    if cfg.get("precision") and meta.get("PRECISION") != cfg["precision"]:
        raise RuntimeError(f"the launcher passes PRECISION={meta.get('PRECISION')!r} for {cfg['dtype']}, "
                           f"the report's matrix says {cfg['precision']!r}")
    return values, meta


def _moe_tile(meta: dict) -> str:
    """The BLOCK_* constexprs: "M64 N64 K32", "T8 E256 G128 K8", "64 E512"."""
    return " ".join(f"{n[6:]}{v}" for n, v in meta.items() if n == "BLOCK" or n.startswith("BLOCK_"))


# Linear attention (triton_kernels/linear.py). As for MoE, a config names a
# launcher call: forward (which launches _linear_fwd, or _linear_decode when L
# and S are at most DECODE_LEN, and _softmax_k_stats first for the softmax
# map) or backward (_linear_bwd_dq, _linear_bwd_dk, _linear_bwd_dv, and
# _softmax_k_stats for the softmax map), run on meta tensors with the kernels
# swapped for recorders (_capture_launch): the tiles (config(): BLOCK_C,
# BLOCK_D / BLOCK_TD, BLOCK_DV / BLOCK_TV), the dot precision (DOT_PRECISION:
# tf32 dots on fp32 operands for every input dtype) and num_warps are
# linear.py's own.
#
# Default matrix, per arch: 3 dtypes x head dims LINEAR_HEAD_DIMS ((D, Dv):
# D = Dv in 16, 40, 64, 80, 128, 256 (40 pads to 64, but a runtime D that is
# not a multiple of 16 makes a binary of its own; 80 compiles to 128's), and
# D != Dv both ways: (64, 128), (128, 64)) x the patterns, each with every
# feature on: a key padding mask, an initial state (forward, dq, decode) or an
# incoming state gradient (dk, dv), normalised:
#   causal: the elu1 map; non-causal: elu1, and softmax (FMAP 3, which has its
#   own code: row statistics, the keys' statistics; non-causal only).
#   _linear_fwd, _linear_bwd_dq, _linear_bwd_dk, _linear_bwd_dv, _linear_decode
#   (L = S = _LINEAR_CALL["L_DECODE"]): 72 configs each; _softmax_k_stats (its
#   tile depends on D only): 3 dtypes x the 6 D: 18.
# --extended adds the plain pattern (identity map, no mask, no state, not
# normalised; causal and non-causal), the forward the backward runs to
# recompute out in fp32 (OUT fp32, fp16/bf16) and the one-token decode step
# (L = S = 1: Triton makes 1 a constant).
# --quick: one config per kernel per arch: fp32, D = Dv = 256 (the widest
# tiles), causal elu1 (_softmax_k_stats: non-causal softmax), all features.
#
# Measured (Triton 3.8, ptxas 12.9, default matrix, 756 configs on sm_80 and
# sm_90: 582 compiles, 762 s on 2 cores shared with a test run for the first
# 5 minutes; --quick: 12 configs, 48 s): no config spills. Registers up to
# 255 (the causal forward, dq and dk at D = 40 and 64; at most 242 at
# D = 256), _softmax_k_stats 48; shared memory at most 114 KB (_linear_fwd,
# fp32, D = 256). The kernels split every dot's reduction into 64-wide
# blocks (_kdot) and launch with maxnreg=255: before, 30 configs spilled,
# up to 480 bytes (fp32 D = 256 forward on sm_90), and no tiling of config()
# removed the wide ones (docs/DESIGN.md).

LINEAR_MODULE = "tfk.triton_kernels.linear"
LINEAR_SOURCE = "triton_kernels/linear.py"
LINEAR_KERNELS = ("_linear_fwd", "_linear_bwd_dq", "_linear_bwd_dk", "_linear_bwd_dv", "_linear_decode",
                  "_softmax_k_stats")
LINEAR_DTYPES = ("fp16", "bf16", "fp32")
LINEAR_HEAD_DIMS = ((16, 16), (40, 40), (64, 64), (80, 80), (128, 128), (256, 256), (64, 128), (128, 64))
# (feature map, key padding mask, initial state / incoming state gradient, normalize)
LINEAR_PATTERNS = {
    "all": dict(feature_map="elu1", mask=True, state=True, normalize=True),
    "softmax": dict(feature_map="softmax", mask=True, state=True, normalize=True),
    "plain": dict(feature_map="identity", mask=False, state=False, normalize=False),
}
LINEAR_QUICK = ("fp32", (256, 256))
# The representative call: B = 2, H = 8 query heads over Hkv = 2 KV heads,
# L = S = 1000 (not a multiple of 16); decode: L = S = 13 (<= DECODE_LEN, not
# a multiple of 16 nor 1).
_LINEAR_CALL = dict(B=2, H=8, Hkv=2, L=1000, L_DECODE=13)


def _linear_name(dtype: str, o: dict) -> str:
    parts = [dtype, f"D={o['D']}" + (f" Dv={o['Dv']}" if o["Dv"] != o["D"] else ""),
             "causal" if o["causal"] else "non-causal", o["pattern"]]
    if o.get("L"):
        parts.append(f"L={o['L']}")
    if o.get("out_fp32"):
        parts.append("out fp32")
    return " ".join(parts)


def _linear_table():
    """(tier, kernel, dtype, options) of one arch, as _moe_table."""
    def opts(D, Dv, causal, pattern, **kw):
        return dict(dict(D=D, Dv=Dv, causal=causal, pattern=pattern, L=None, out_fp32=False), **kw)

    q_dt, q_dims = LINEAR_QUICK
    for kernel in LINEAR_KERNELS:
        for dt in LINEAR_DTYPES:
            for D, Dv in LINEAR_HEAD_DIMS:
                if kernel == "_softmax_k_stats":   # D only
                    if D == Dv:
                        q = (dt, (D, Dv)) == (q_dt, q_dims)
                        yield "quick" if q else "default", kernel, dt, opts(D, Dv, False, "softmax")
                        yield "extended", kernel, dt, opts(D, Dv, False, "softmax", mask=False)
                    continue
                for causal, pattern in ((True, "all"), (False, "all"), (False, "softmax"),
                                        (True, "plain"), (False, "plain")):
                    q = (dt, (D, Dv), causal, pattern) == (q_dt, q_dims, True, "all")
                    tier = "quick" if q else "extended" if pattern == "plain" else "default"
                    yield tier, kernel, dt, opts(D, Dv, causal, pattern)
                    if pattern == "plain":
                        continue
                    if kernel == "_linear_fwd" and dt != "fp32":  # the backward's recompute of out
                        yield "extended", kernel, dt, opts(D, Dv, causal, pattern, out_fp32=True)
                    if kernel == "_linear_decode":  # the one-token step
                        yield "extended", kernel, dt, opts(D, Dv, causal, pattern, L=1)


def linear_configs(archs: list[str], quick: bool = False, extended: bool = False) -> list[dict]:
    """The linear-attention matrix (see above): one dict per (kernel, dtype,
    options, arch), with its name."""
    tiers = {"quick"} if quick else {"quick", "default", "extended"} if extended else {"quick", "default"}
    return [dict(family="linear", kernel=k, dtype=dt, precision="tf32", opts=o, cap=cap, name=_linear_name(dt, o))
            for cap in _caps(archs) for (t, k, dt, o) in _linear_table() if t in tiers]


def _linear_launch_args(mod, cfg: dict) -> tuple[dict, dict]:
    """(argument values by name, constexprs and launch options) of `cfg`'s
    kernel as forward/backward of linear.py pass them for the representative
    call on meta tensors (see above)."""
    import torch
    from triton.runtime.jit import MockTensor

    o, kernel = cfg["opts"], cfg["kernel"]
    pat = dict(LINEAR_PATTERNS[o["pattern"]], **({"mask": o["mask"]} if "mask" in o else {}))
    B, H, Hkv = _LINEAR_CALL["B"], _LINEAR_CALL["H"], _LINEAR_CALL["Hkv"]
    L = o["L"] or (_LINEAR_CALL["L_DECODE"] if kernel == "_linear_decode" else _LINEAR_CALL["L"])
    D, Dv = o["D"], o["Dv"]
    dt = getattr(torch, _TORCH_DTYPES[cfg["dtype"]])
    f32 = torch.float32

    def t(*shape, dtype=dt):
        return torch.empty(shape, dtype=dtype, device="meta")

    q, k, v = t(B, H, L, D), t(B, Hkv, L, D), t(B, Hkv, L, Dv)
    mask = t(B, L, dtype=torch.bool) if pat["mask"] else None
    kv0, z0 = (t(B, Hkv, D, Dv, dtype=f32), t(B, Hkv, D, dtype=f32)) if pat["state"] else (None, None)
    if kernel in ("_linear_fwd", "_linear_decode", "_softmax_k_stats"):
        call = lambda: mod.forward(  # noqa: E731
            q, k, v, mask, kv0, z0, pat["feature_map"], o["causal"], pat["normalize"], 1e-6, D ** -0.5,
            t(B, H, L, Dv, dtype=f32 if o["out_fp32"] else dt), t(B, H, L, dtype=f32),
            t(B, Hkv, D, Dv, dtype=f32), t(B, Hkv, D, dtype=f32))
    elif kernel in ("_linear_bwd_dq", "_linear_bwd_dk", "_linear_bwd_dv"):
        # with the state pattern, an incoming state gradient (dkv, dz) too, in fp32 as the host passes it
        dkv, dz = (t(B, Hkv, D, Dv, dtype=f32), t(B, Hkv, D, dtype=f32)) if pat["state"] else (None, None)
        call = lambda: mod.backward(  # noqa: E731
            t(B, H, L, Dv), dkv, dz, q, k, v, mask, kv0, z0, t(B, H, L, dtype=f32), t(B, H, L, dtype=f32),
            pat["feature_map"], o["causal"], pat["normalize"], D ** -0.5,
            t(B, H, L, D), t(B, Hkv, L, D), t(B, Hkv, L, Dv), t(B, Hkv, D, Dv, dtype=f32),
            t(B, Hkv, D, dtype=f32), eps=1e-6)
    else:
        raise RuntimeError(f"no launcher known for {kernel}")
    args, kwargs = _capture_launch(mod, kernel, call)
    names = [p.name for p in getattr(mod, kernel).params]
    if len(args) > len(names):
        raise RuntimeError(f"the launcher passes {len(args)} positional arguments, {kernel} has {len(names)}")
    mock = lambda x: MockTensor(x.dtype) if isinstance(x, torch.Tensor) else x  # noqa: E731
    values = {n: mock(x) for n, x in zip(names, args)}
    meta = {n: mock(x) for n, x in kwargs.items()}
    if "PREC" in (p.name for p in getattr(mod, kernel).params) and meta.get("PREC") != cfg["precision"]:
        raise RuntimeError(f"the launcher passes PREC={meta.get('PREC')!r} for {cfg['dtype']}, "
                           f"the report's matrix says {cfg['precision']!r}")
    return values, meta


def _linear_tile(meta: dict) -> str:
    """The chunk, then the state tile: "C16 D256 DV16" (forward), "C16 TD16 DV256" (dq, dk)."""
    return " ".join(f"{n[6:]}{meta[n]}" for n in ("BLOCK_C", "BLOCK_L", "BLOCK_D", "BLOCK_TD", "BLOCK_DV",
                                                  "BLOCK_TV") if n in meta)


# KV-cache decoding (triton_kernels/kvcache.py): a config names a call of the
# launcher, kvcache_forward (the split pass _kvcache_split, then the merge
# _kvcache_merge), captured on meta tensors (_capture_launch) with its own
# tiles (tile_config: BLOCK_M rows of the G x Lq group, BLOCK_N keys), warps,
# stages and dot precision (tf32 for fp32).
# Matrix, per arch: 3 dtypes x head dims (64, 128, 256) x two calls: one-token
# decode, causal, contiguous cache, G = 4 (4 rows); and a 16-query block under
# a sliding window on a paged cache (pages of 16), G = 8 (128 rows: row blocks
# of 64, 32 over D = 128): 36 configs of each kernel. --quick: fp16, D = 128,
# the paged window.
KVCACHE_MODULE = "tfk.triton_kernels.kvcache"
KVCACHE_SOURCE = "triton_kernels/kvcache.py"
KVCACHE_KERNELS = ("_kvcache_split", "_kvcache_merge")
KVCACHE_DTYPES = ("fp16", "bf16", "fp32")
KVCACHE_HEAD_DIMS = (64, 128, 256)
# (name, paged, window, G, Lq)
KVCACHE_CALLS = (("decode", False, 0, 4, 1), ("paged window", True, 32, 8, 16))
KVCACHE_QUICK = ("fp16", 128, "paged window")


def kvcache_configs(archs: list[str], quick: bool = False, extended: bool = False) -> list[dict]:
    """The KV-cache matrix (see above): one dict per (kernel, dtype, D, call, arch)."""
    return [dict(family="kvcache", kernel=k, dtype=dt, precision="tf32" if dt == "fp32" else "ieee",
                 opts=dict(D=D, call=c), cap=cap, name=f"{dt} D={D} {c[0]}")
            for cap in _caps(archs) for k in KVCACHE_KERNELS for dt in KVCACHE_DTYPES for D in KVCACHE_HEAD_DIMS
            for c in KVCACHE_CALLS if not quick or (dt, D, c[0]) == KVCACHE_QUICK]


def _kvcache_launch_args(mod, cfg: dict) -> tuple[dict, dict]:
    """(argument values by name, constexprs and launch options) of `cfg`'s
    kernel as kvcache_forward passes them for its call on meta tensors."""
    import torch
    from triton.runtime.jit import MockTensor

    from tfk import patterns as P
    from tfk.ops.kvcache.call import KVCacheCall, band_of

    D, (_, paged, window, G, Lq) = cfg["opts"]["D"], cfg["opts"]["call"]
    dt = getattr(torch, _TORCH_DTYPES[cfg["dtype"]])
    B, Hkv = 2, 2
    meta = lambda *shape, dtype=dt: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    cache = meta(64, Hkv, 16, D) if paged else meta(B, Hkv, 4096, D)
    table = meta(B, 64, dtype=torch.int32) if paged else None
    pattern = P.sliding_window(window) if window else P.causal()
    call = KVCacheCall(meta(B, Hkv * G, Lq, D), cache, meta(*cache.shape), meta(B, dtype=torch.int32), table,
                       pattern, band_of(pattern), D ** -0.5, True, 1000)
    args, kwargs = _capture_launch(mod, cfg["kernel"], lambda: mod.kvcache_forward(call))
    names = [p.name for p in getattr(mod, cfg["kernel"]).params]
    mock = lambda x: MockTensor(x.dtype) if isinstance(x, torch.Tensor) else x  # noqa: E731
    return {n: mock(x) for n, x in zip(names, args)}, {n: mock(x) for n, x in kwargs.items()}


def _kvcache_tile(meta: dict) -> str:
    """Rows x keys of the split pass; splits x value width of the merge."""
    if "BLOCK_N" in meta:
        return f"{meta['BLOCK_M']}x{meta['BLOCK_N']}"
    return f"S{meta['BLOCK_S']} DV{meta['BLOCK_DV']}"


# The Triton modules the report compiles: where each lives, its configs and
# how to build a config's launch arguments.
TRITON_FAMILIES = {
    "attention": dict(module=TRITON_MODULE, source=TRITON_SOURCE, configs=attention_configs,
                      launch_args=_attention_launch_args, tile=lambda meta: f"{meta['BLOCK_M']}x{meta['BLOCK_N']}"),
    "moe": dict(module=MOE_MODULE, source=MOE_SOURCE, configs=moe_configs, launch_args=_moe_launch_args,
                tile=_moe_tile),
    "linear": dict(module=LINEAR_MODULE, source=LINEAR_SOURCE, configs=linear_configs,
                   launch_args=_linear_launch_args, tile=_linear_tile),
    "kvcache": dict(module=KVCACHE_MODULE, source=KVCACHE_SOURCE, configs=kvcache_configs,
                    launch_args=_kvcache_launch_args, tile=_kvcache_tile),
}


def _family(cfg: dict) -> dict:
    return TRITON_FAMILIES[cfg.get("family", "attention")]


def triton_configs(archs: list[str], quick: bool = False, extended: bool = False,
                   families: tuple | list | None = None) -> list[dict]:
    """Every family's matrix (attention_configs, moe_configs, linear_configs), `families`
    (default all of TRITON_FAMILIES) in order."""
    return [c for f in (families or TRITON_FAMILIES) for c in TRITON_FAMILIES[f]["configs"](archs, quick, extended)]


def _launch_args(mod, cfg: dict) -> tuple[dict, dict]:
    """(argument values by name, constexprs and launch options) of `cfg`."""
    return _family(cfg)["launch_args"](mod, cfg)


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
    return {"source": _family(cfg)["source"], "kernel": cfg["kernel"], "mangled": cfg["kernel"],
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
                   block=_family(cfg)["tile"](meta))
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
        logs = parse_ptxas_log(printed, row["source"])
        if not logs:  # Triton did not print its ptxas log: run ptxas -v on the PTX
            logs = parse_ptxas_log(_run_ptxas(kernel.asm["ptx"], cap), row["source"])
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
    loaded: dict = {}  # family -> its module, or why it did not import
    broken: dict = {}  # (family, kernel) -> why it cannot compile

    def load(family: str):
        if family in loaded:
            return loaded[family]
        name = spec["modules"][family]
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            loaded[family] = f"import of {name} failed: {_error_text(e)}"
            return loaded[family]
        # A kernel whose source Triton cannot hash (e.g. it calls a host Python
        # function) fails at its first launch. A failed hash leaves placeholder
        # hashes behind on the kernel and the helpers it walked, after which
        # other kernels and later compiles in this process would wrongly pass:
        # so check each kernel first, clearing placeholders after a failure,
        # and fail all configs of a kernel that does not pass.
        from triton.runtime.jit import JITFunction
        jitted = [f for f in vars(mod).values() if isinstance(f, JITFunction)]
        for kname in dict.fromkeys(c["kernel"] for ser in series for c in ser
                                   if c.get("family", "attention") == family):
            try:
                getattr(mod, kname).cache_key
            except Exception as e:  # noqa: BLE001
                broken[(family, kname)] = "the kernel's source does not pass Triton's dependency check " \
                                          f"(JITFunction.cache_key): {_error_text(e)}"
                for f in jitted:
                    if str(getattr(f, "hash", None)).startswith("recursion:"):
                        f.hash = None
        loaded[family] = mod
        return mod

    seen: dict = {}
    for ser in series:
        out, failed = [], None
        for cfg in ser:
            family = cfg.get("family", "attention")
            mod = load(family)
            if isinstance(mod, str):
                row = dict(_failed_row(cfg), error=mod)
            elif (family, cfg["kernel"]) in broken:
                row = dict(_failed_row(cfg), error=broken[(family, cfg["kernel"])])
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
                info: dict | None = None, extended: bool = False, keep_going: bool = False,
                families: tuple | list | None = None, modules: dict | None = None) -> list[dict]:
    """Rows for the shipped Triton configs: the keys of cuda_rows (source,
    kernel, mangled, arch, registers, smem, spill_stores, spill_loads, stack)
    plus config ("fp16 D=128 all"), block (the tile), num_warps, num_stages, error (None,
    or why the config did not compile), same_as (the config whose binary this
    one shares, or None) and perf_warnings (ptxas "Potential Performance Loss"
    notes), skipped (None, or why the config was not compiled: only after an
    earlier config of the same kernel, dtype and arch failed, unless
    keep_going). `archs` as capabilities ("80", "90"). `ptxas`: "triton" (the
    ptxas Triton bundles and uses at run time) or "toolkit" (the CUDA toolkit's).
    `families`: which of TRITON_FAMILIES (default all); `modules`: module
    names to import instead of a family's (e.g. {"moe": "my_moe"}).
    `info`, when given, receives {"ptxas": path, "ptxas_version", "seconds"}.
    """
    import json
    import tempfile

    start = time.monotonic()
    configs = triton_configs(archs, quick, extended, families)
    module_names = {f: (modules or {}).get(f, TRITON_FAMILIES[f]["module"]) for f in TRITON_FAMILIES}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if ptxas == "toolkit":
        home = _build_env().find_cuda_home()
        if not home or not (Path(home) / "bin" / "ptxas").is_file():
            raise RuntimeError("compile_report: --ptxas toolkit: no CUDA toolkit with bin/ptxas found")
        env["TRITON_PTXAS_PATH"] = str(Path(home) / "bin" / "ptxas")
    elif ptxas != "triton":
        raise ValueError(f"ptxas must be 'triton' or 'toolkit', not {ptxas!r}")
    # A series: the configs of one (family, arch, kernel, dtype, precision), in
    # the order the matrix lists them (attention: head dims ascending, plain
    # before all). One worker compiles a series in order, so configs that
    # share a binary (head dims that pad alike) compile once, and (unless
    # keep_going) a series stops at its first failure.
    series: dict = {}
    for i, c in enumerate(configs):
        series.setdefault((c["family"], c["cap"], c["kernel"], c["dtype"], c["precision"]), []).append(i)
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
            inp.write_text(json.dumps({"modules": module_names, "keep_going": keep_going,
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
            keep_going: bool = False, families: tuple | list | None = None) -> list[dict]:
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
                            keep_going=keep_going, families=families)
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
    """CUDA rows (no "config" key) as one table, Triton rows as one per source."""
    parts = []
    cuda = [r for r in rows if "config" not in r]
    if cuda:
        head = ("kernel", "arch", "regs", "smem B", "spill st B", "spill ld B", "stack B", "source")
        parts.append("CUDA kernels (csrc/):\n" + _table(head, [(_short(r["kernel"]), r["arch"], str(r["registers"]), str(r["smem"]),
                                    str(r["spill_stores"]), str(r["spill_loads"]), str(r["stack"]), r["source"])
                                   for r in cuda]))
    for source in dict.fromkeys(r["source"] for r in rows if "config" in r):
        tri = [r for r in rows if "config" in r and r["source"] == source]
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
        parts.append(f"Triton kernels ({source}):\n" + _table(head, body))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=str(DEFAULT_BUILD_DIR.relative_to(ROOT)),
                    help="CMake build folder, relative to the repo root (default build/cmake)")
    ap.add_argument("--archs", default=None,
                    help="archs, e.g. 80,90 or 8.0;9.0a (default: $TFK_CUDA_ARCHS or 80,90)")
    ap.add_argument("--quick", action="store_true",
                    help="Triton: one config per kernel per arch (attention: fp16, D=128, every feature "
                         "on; moe, linear: see the module doc) instead of the full matrix")
    ap.add_argument("--extended", action="store_true",
                    help="Triton: add the bool-mask pattern (plain with a bool attn_mask): three "
                         "patterns instead of two, half again the configs; moe, linear: see the module doc")
    ap.add_argument("--keep-going", action="store_true",
                    help="Triton: compile every config; by default a (kernel, dtype, arch) series stops "
                         "at its first failing config")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA (CMake) section")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton section")
    ap.add_argument("--families", default=",".join(TRITON_FAMILIES),
                    help=f"Triton: the kernel modules to compile, of {','.join(TRITON_FAMILIES)} "
                         "(default all)")
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

    families = [f for f in args.families.split(",") if f]
    if not families:
        ap.error("--families: none given")
    if unknown := [f for f in families if f not in TRITON_FAMILIES]:
        ap.error(f"--families: unknown {unknown}; known: {list(TRITON_FAMILIES)}")
    info: dict = {}
    rows = collect(build_dir, archs, cuda=not args.no_cuda, triton=not args.no_triton, quick=args.quick,
                   jobs=args.jobs, ptxas=args.ptxas, info=info, extended=args.extended,
                   keep_going=args.keep_going, families=families)
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
        per_source = ", ".join(f"{sum(1 for r in tri if r['source'] == src)} of {src}"
                               for src in dict.fromkeys(r["source"] for r in tri))
        print(f"\nTriton: {len(tri)} configs ({matrix} matrix: {per_source}), {compiled} compiles"
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
