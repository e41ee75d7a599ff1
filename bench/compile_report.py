"""Compile report: resources of every shipped kernel, per arch, with no GPU.

    python -m bench.compile_report [--build-dir build/cmake] [--archs 80,90]

Configures and builds the CMake project (CMakeLists.txt), which compiles each
csrc/**/*.cu to a cubin per arch with `-Xptxas -v`, reads the ptxas logs, and
prints registers, shared memory, spills and stack per kernel. Exits non-zero,
naming the kernels, when any kernel spills or needs more shared memory than
its arch gives one block.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
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


def cuda_rows(build_dir: str | os.PathLike, archs: list[str]) -> list[dict]:
    """Rows from the ptxas logs of the current sources; a missing log is an error."""
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
    return rows


def triton_rows(archs: list[str]) -> list[dict]:
    """Rows for the shipped Triton configs (same keys as cuda_rows).

    Placeholder: the Triton section compiles each config ahead of time with
    triton.compile(..., target=GPUTarget("cuda", arch, 32)) and reads ptxas.
    """
    return []


def collect(build_dir: str | os.PathLike = DEFAULT_BUILD_DIR, archs: list[str] | None = None) -> list[dict]:
    """Build, then return one row per (kernel, arch): source, kernel (demangled),
    mangled, arch ("sm_80"), registers, smem, spill_stores, spill_loads, stack
    (bytes). CUDA rows are empty when CMake found no nvcc."""
    if archs is None:
        be = _build_env()
        archs = be.cmake_arch_list(be.cuda_archs()).split(";")
    info = build(build_dir, archs)
    rows = cuda_rows(build_dir, archs) if info["cuda"] else []
    return rows + triton_rows(archs)


def problems(rows: list[dict]) -> list[str]:
    """Why the report fails: spills or shared memory over the arch's limit."""
    out = []
    for r in rows:
        where = f"{r['kernel']} [{r['arch']}]"
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{where} spills: {r['spill_stores']} bytes stored, {r['spill_loads']} bytes loaded")
        if r["smem"] > smem_limit(r["arch"]):
            out.append(f"{where} uses {r['smem']} bytes of shared memory, over the "
                       f"{smem_limit(r['arch'])} bytes {r['arch']} allows")
    return out


def _short(name: str) -> str:
    return name.split("(", 1)[0]


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "arch", "regs", "smem B", "spill st B", "spill ld B", "stack B", "source")
    body = [(_short(r["kernel"]), r["arch"], str(r["registers"]), str(r["smem"]),
             str(r["spill_stores"]), str(r["spill_loads"]), str(r["stack"]), r["source"]) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=str(DEFAULT_BUILD_DIR.relative_to(ROOT)),
                    help="CMake build folder, relative to the repo root (default build/cmake)")
    ap.add_argument("--archs", default=None,
                    help="archs, e.g. 80,90 or 8.0;9.0a (default: $TFK_CUDA_ARCHS or 80,90)")
    args = ap.parse_args(argv)
    be = _build_env()
    env = dict(os.environ)
    if args.archs is not None:
        env["TFK_CUDA_ARCHS"] = args.archs
    archs = be.cmake_arch_list(be.cuda_archs(env)).split(";")
    build_dir = Path(args.build_dir)
    if not build_dir.is_absolute():
        build_dir = ROOT / build_dir

    rows = collect(build_dir, archs)
    if not rows:
        print("compile_report: nothing to report: CMake found no CUDA compiler "
              "(set CUDA_HOME or CUDAToolkit_ROOT)", file=sys.stderr)
        return 2
    print(format_table(rows))
    bad = problems(rows)
    if bad:
        print(f"\ncompile_report: FAILED, {len(bad)} problem(s):", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"\ncompile_report: OK, {len(rows)} kernel builds, no spills, shared memory within limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
