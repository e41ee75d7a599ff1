"""Build of tfk: the Python package, plus its C++ extensions when possible.

tfk._C (the CUDA kernels) is built when torch is importable with CUDA support
(torch.version.cuda) and a CUDA toolkit is found (tfk/_build_env.py). No GPU
is needed. tfk._sim (the same kernels compiled for the host, run on CPU
tensors by backend "cuda-sim") is built whenever torch is importable. An
extension that cannot be built is skipped with one line saying why.

Environment:
  TFK_BUILD_CUDA=1   the extension is required: a reason to skip is an error
  TFK_BUILD_CUDA=0   skip the extension deliberately
  TFK_CUDA_ARCHS     archs to compile for, default "8.0;9.0" (also "80,90")
  CUDA_HOME          the toolkit to use (must be valid if set)
  MAX_JOBS           parallel compile jobs, default 2
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _tell(message):
    """One line to stderr, and to the user's terminal when there is one: pip
    shows a build's own output only with -v, so a plain `pip install .` would
    otherwise hide that the CUDA extension was skipped."""
    print(message, file=sys.stderr)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message + "\n")
    except OSError:  # no terminal (CI, a pipe): stderr only
        pass


def _load_build_env():
    # By path: importing tfk here would import the package (and torch) too early.
    path = os.path.join(ROOT, "tfk", "_build_env.py")
    spec = importlib.util.spec_from_file_location("_tfk_build_env", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _packages():
    # triton_kernels/ ships as tfk.triton_kernels only: "triton_kernels" is
    # another project's top-level name on the public index.
    packages = find_packages(where=ROOT, include=["tfk", "tfk.*"])
    packages += ["tfk.triton_kernels"] + [
        "tfk.triton_kernels." + p for p in find_packages(where=os.path.join(ROOT, "triton_kernels"))
    ]
    return packages, {"tfk.triton_kernels": "triton_kernels"}


def _cuda_skip_reason(build_env):
    """None when tfk._C can be built (and the environment is prepared for it)."""
    if os.environ.get("TFK_BUILD_CUDA") == "0":
        return "TFK_BUILD_CUDA=0"
    cuda_home = build_env.find_cuda_home()  # raises on an invalid explicit CUDA_HOME
    if cuda_home is None:
        return ("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc "
                "and include/cuda_runtime.h)")
    archs = build_env.cuda_archs()
    # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import,
    # and with no GPU it cannot guess the archs.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = build_env.torch_arch_list(archs)
    os.environ.setdefault("MAX_JOBS", "2")
    try:
        import torch
    except ImportError as e:
        return f"torch is not importable ({e})"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is built without CUDA"
    return None


def _host_extensions():
    """tfk._sim and tfk._cpu (none when torch is not importable, with the reason)."""
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError as e:
        print(f"tfk: skipping tfk._sim and tfk._cpu (the C++ kernels for the CPU): torch is not importable ({e})",
              file=sys.stderr)
        return []
    include = [os.path.join(ROOT, "csrc")]
    return [
        # kernels.cpp includes the .cu kernel sources: compiled as host C++, they
        # run through the host-execution layer (csrc/common/host_exec.h).
        CppExtension(name="tfk._sim", sources=["csrc/sim/bindings.cpp", "csrc/sim/kernels.cpp"],
                     include_dirs=include, extra_compile_args={"cxx": ["-O2"]}),
        # tfk's native CPU kernels (the torch backends' fast paths); -Wno-psabi:
        # their vector helpers are always inlined, so no vector crosses an ABI
        CppExtension(name="tfk._cpu", sources=["csrc/cpu/bindings.cpp", "csrc/moe/experts_cpu.cpp"],
                     include_dirs=include, extra_compile_args={"cxx": ["-O3", "-Wno-psabi"]}),
    ]


def _cuda_extension(build_env):
    from torch.utils.cpp_extension import CUDAExtension

    # Kernels (.cu) have no torch headers; bindings.cpp has them. Relative paths:
    # setuptools rejects absolute source paths.
    sources = ["csrc/bindings.cpp"] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
        # the host-execution layer's own test kernels run on the host only
        if os.path.basename(os.path.dirname(p)) != "host_exec_tests"
    )
    ext = CUDAExtension(
        name="tfk._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # cxx: torch adds its own -std (its headers need it).
            "cxx": ["-O3"],
            # No --use_fast_math: exp/log stay IEEE (lse merges compare to torch).
            "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
        },
    )
    print(f"tfk: building tfk._C with CUDA_HOME={os.environ['CUDA_HOME']} "
          f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"(MAX_JOBS={os.environ['MAX_JOBS']})", file=sys.stderr)
    return ext


def _write_build_config(reason):
    """tfk/_build_config.py: what this build made and with what, for
    tfk.build_info() (generated; not in git)."""
    config = {"cuda_extension": reason is None, "cuda_skip_reason": reason,
              "cuda_home": os.environ.get("CUDA_HOME") if reason is None else None,
              "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if reason is None else None}
    try:
        import torch
        config.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    except ImportError:
        config.update(torch=None, torch_cuda=None)
    if reason is None:
        import subprocess
        out = subprocess.run([os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"), "--version"],
                             capture_output=True, text=True).stdout
        config["nvcc"] = next((line.strip() for line in out.splitlines() if "release" in line), None)
    with open(os.path.join(ROOT, "tfk", "_build_config.py"), "w") as f:
        f.write(f"# Written by setup.py at build time; read by tfk.build_info().\nCONFIG = {config!r}\n")


def main():
    build_env = _load_build_env()
    packages, package_dir = _packages()
    try:
        reason = _cuda_skip_reason(build_env)
    except ValueError as e:  # a bad CUDA_HOME or TFK_CUDA_ARCHS: the user asked for something else
        raise SystemExit(f"tfk: {e}") from None
    ext_modules = []
    if reason is None:
        ext_modules.append(_cuda_extension(build_env))
    else:
        if os.environ.get("TFK_BUILD_CUDA") == "1":
            raise SystemExit(f"tfk: TFK_BUILD_CUDA=1 but tfk._C cannot be built: {reason}")
        _tell(f"tfk: the CUDA extension tfk._C was NOT built: {reason}. To build it against your own CUDA "
              "torch and toolkit: CUDA_HOME=/path/to/cuda TFK_CUDA_ARCHS='8.0;9.0' "
              "pip install --no-build-isolation .")
    _write_build_config(reason)
    ext_modules += _host_extensions()
    cmdclass = {}
    if ext_modules:
        from torch.utils.cpp_extension import BuildExtension
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    setup(
        packages=packages,
        package_dir=package_dir,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


main()
