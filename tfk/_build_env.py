"""Where the CUDA toolkit is and which archs to build for.

Standard library only: setup.py loads this file by path before torch is
imported (torch reads CUDA_HOME once, at import of torch.utils.cpp_extension),
and bench/compile_report.py uses it to drive CMake. Nothing here needs a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = ["find_cuda_home", "cuda_archs", "torch_arch_list", "cmake_arch_list",
           "DEFAULT_ARCHS"]

DEFAULT_ARCHS = "8.0;9.0"

# A real nvcc is an executable binary; a wrapper is a script we must read.
_SCRIPT_MAGIC = b"#!"
# An absolute path to an nvcc inside a wrapper script, e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`.
_NVCC_IN_SCRIPT = re.compile(r"""(/[^\s"'`;|&<>()$]*/bin/nvcc)(?![\w.-])""")


def _missing(root: str | os.PathLike) -> list[str]:
    """The parts of a toolkit layout that `root` lacks (empty: a valid toolkit)."""
    root = Path(root)
    missing = []
    if not (root / "bin" / "nvcc").is_file():
        missing.append("bin/nvcc")
    if not (root / "include" / "cuda_runtime.h").is_file():
        missing.append("include/cuda_runtime.h")
    return missing


def _is_script(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == _SCRIPT_MAGIC
    except OSError:
        return False


def _toolkits_of_nvcc(nvcc: str, depth: int = 0) -> list[str]:
    """Toolkit roots that an nvcc on PATH belongs to, following wrapper scripts."""
    real = os.path.realpath(nvcc)
    if not _is_script(real):
        return [os.path.dirname(os.path.dirname(real))]
    if depth >= 4:  # wrappers of wrappers: give up rather than loop
        return []
    try:
        text = Path(real).read_text(errors="replace")
    except OSError:
        return []
    roots = []
    for target in _NVCC_IN_SCRIPT.findall(text):
        if os.path.realpath(target) != real and os.path.isfile(target):
            roots.extend(_toolkits_of_nvcc(target, depth + 1))
    return roots


def _version_key(path: Path) -> tuple[int, ...] | None:
    m = re.fullmatch(r"cuda-(\d+(?:\.\d+)*)", path.name)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def find_cuda_home(env=os.environ, *, system_prefix: str = "/usr/local") -> str | None:
    """The root of a CUDA toolkit (the folder with bin/nvcc and include/cuda_runtime.h).

    Candidates in order: $CUDA_HOME, $CUDA_PATH, the toolkit of the `nvcc` on
    $PATH (symlinks resolved, wrapper scripts followed), <prefix>/cuda, then
    <prefix>/cuda-* newest version first. Returns the real path, or None.
    An explicit $CUDA_HOME that is not a toolkit raises ValueError: a user who
    names a toolkit wants that one, not a silent fallback.
    `system_prefix` exists so tests can hide this machine's /usr/local.
    """
    explicit = env.get("CUDA_HOME")
    if explicit:
        missing = _missing(explicit)
        if missing:
            raise ValueError(
                f"CUDA_HOME={explicit!r} is not a CUDA toolkit: missing {' and '.join(missing)}")
        return os.path.realpath(explicit)

    candidates: list[str] = []
    if env.get("CUDA_PATH"):
        candidates.append(env["CUDA_PATH"])
    path = env.get("PATH")
    if path:
        nvcc = shutil.which("nvcc", path=path)
        if nvcc:
            candidates.extend(_toolkits_of_nvcc(nvcc))
    prefix = Path(system_prefix)
    candidates.append(str(prefix / "cuda"))
    try:
        versioned = [(k, p) for p in prefix.glob("cuda-*") if (k := _version_key(p)) is not None]
    except OSError:
        versioned = []
    candidates.extend(str(p) for _, p in sorted(versioned, reverse=True))

    for cand in candidates:
        if not _missing(cand):
            return os.path.realpath(cand)
    return None


_ARCH_DOTTED = re.compile(r"(\d{1,2})\.(\d)([af]?)")
_ARCH_PLAIN = re.compile(r"(\d{1,2})(\d)([af]?)")


def cuda_archs(env=os.environ) -> list[str]:
    """Parse TFK_CUDA_ARCHS (default "8.0;9.0") into ["8.0", "9.0"].

    Separators ';', ',' or spaces; items "8.0" or "80", with an optional
    arch-specific suffix ("9.0a", "90a", "10.0f"). Duplicates are dropped.
    """
    raw = env.get("TFK_CUDA_ARCHS")
    if raw is None:
        raw = DEFAULT_ARCHS
    items = [t for t in re.split(r"[;,\s]+", raw.strip()) if t]
    if not items:
        raise ValueError(f"TFK_CUDA_ARCHS={raw!r} names no arch (expected e.g. '8.0;9.0' or '80,90')")
    archs: list[str] = []
    for item in items:
        m = _ARCH_DOTTED.fullmatch(item) or _ARCH_PLAIN.fullmatch(item)
        if m is None or int(m.group(1)) == 0:
            raise ValueError(
                f"TFK_CUDA_ARCHS: bad arch {item!r} (expected e.g. '8.0', '80', '9.0a' or '90a')")
        arch = f"{int(m.group(1))}.{m.group(2)}{m.group(3)}"
        if arch not in archs:
            archs.append(arch)
    return archs


def torch_arch_list(archs: list[str]) -> str:
    """["8.0", "9.0"] -> "8.0;9.0" (the form of TORCH_CUDA_ARCH_LIST)."""
    return ";".join(archs)


def cmake_arch_list(archs: list[str]) -> str:
    """["8.0", "9.0a"] -> "80;90a" (the form of CMake arch lists, sm_<n>)."""
    return ";".join(a.replace(".", "") for a in archs)
