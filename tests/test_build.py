"""The build system and the first CUDA kernel, end to end without a GPU.

(a) toolkit discovery and arch parsing; (b) the CMake build and the
host-compiled merge kernel against merge_partials; (c) ptxas reports;
(d) the torch extension; (e) packaging of triton_kernels/ as tfk.triton_kernels.
"""
import ctypes
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bench import compile_report
from tfk import _build_env
from tfk.ops.attention.merge import merge_partials

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["80", "90"]
NEG_INF = float("-inf")


# ---------------------------------------------------------------- (a) discovery

def _toolkit(root: Path, nvcc=True, header=True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    if nvcc:
        exe = root / "bin" / "nvcc"
        exe.write_bytes(b"\x7fELF fake nvcc binary")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    if header:
        (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    return root


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def no_system(tmp_path):
    """A system prefix with no toolkit, so this machine's /usr/local is not found."""
    p = tmp_path / "usr_local"
    p.mkdir()
    return str(p)


def test_find_cuda_home_accepts_real_layout(tmp_path, no_system):
    tk = _toolkit(tmp_path / "cuda-x")
    assert _build_env.find_cuda_home({"CUDA_HOME": str(tk)}, system_prefix=no_system) == str(tk.resolve())
    assert _build_env.find_cuda_home({"CUDA_PATH": str(tk)}, system_prefix=no_system) == str(tk.resolve())


def test_find_cuda_home_refuses_layout_without_header(tmp_path, no_system):
    bad = _toolkit(tmp_path / "cuda-bad", header=False)
    assert _build_env.find_cuda_home({"CUDA_PATH": str(bad)}, system_prefix=no_system) is None
    _script(tmp_path / "wrapbin" / "nvcc", f'#!/bin/sh\nexec {bad}/bin/nvcc "$@"\n')
    assert _build_env.find_cuda_home({"PATH": str(tmp_path / "wrapbin")}, system_prefix=no_system) is None


def test_find_cuda_home_invalid_explicit_raises(tmp_path, no_system):
    bad = _toolkit(tmp_path / "cuda-bad", header=False)
    with pytest.raises(ValueError, match=r"CUDA_HOME.*include/cuda_runtime\.h"):
        _build_env.find_cuda_home({"CUDA_HOME": str(bad)}, system_prefix=no_system)
    with pytest.raises(ValueError, match=r"CUDA_HOME.*bin/nvcc"):
        _build_env.find_cuda_home({"CUDA_HOME": str(tmp_path / "nowhere")}, system_prefix=no_system)


def test_find_cuda_home_follows_wrapper_and_symlink(tmp_path, no_system):
    real = _toolkit(tmp_path / "opt" / "cuda-13.0")
    # Like this machine's /usr/local/bin/nvcc.
    _script(tmp_path / "wrapbin" / "nvcc", f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    env = {"PATH": os.pathsep.join([str(tmp_path / "empty"), str(tmp_path / "wrapbin")])}
    assert _build_env.find_cuda_home(env, system_prefix=no_system) == str(real.resolve())
    (tmp_path / "linkbin").mkdir()
    (tmp_path / "linkbin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    assert _build_env.find_cuda_home({"PATH": str(tmp_path / "linkbin")}, system_prefix=no_system) \
        == str(real.resolve())


def test_find_cuda_home_order(tmp_path, no_system):
    a = _toolkit(tmp_path / "a")
    b = _toolkit(tmp_path / "b")
    _script(tmp_path / "wrapbin" / "nvcc", f'#!/bin/sh\nexec {b}/bin/nvcc "$@"\n')
    env = {"CUDA_PATH": str(a), "PATH": str(tmp_path / "wrapbin")}
    assert _build_env.find_cuda_home(env, system_prefix=no_system) == str(a.resolve())
    assert _build_env.find_cuda_home({**env, "CUDA_HOME": str(b)}, system_prefix=no_system) == str(b.resolve())


def test_find_cuda_home_system_prefix_newest_first(tmp_path):
    prefix = tmp_path / "prefix"
    _toolkit(prefix / "cuda-12.4")
    _toolkit(prefix / "cuda-12.10")
    _toolkit(prefix / "cuda-13.0", header=False)
    assert _build_env.find_cuda_home({}, system_prefix=str(prefix)) == str((prefix / "cuda-12.10").resolve())
    (prefix / "cuda").symlink_to(prefix / "cuda-12.4")
    assert _build_env.find_cuda_home({}, system_prefix=str(prefix)) == str((prefix / "cuda-12.4").resolve())
    assert _build_env.find_cuda_home({}, system_prefix=str(tmp_path / "none")) is None


@pytest.mark.parametrize("raw, expected", [
    (None, ["8.0", "9.0"]),
    ("8.0;9.0", ["8.0", "9.0"]),
    ("80,90", ["8.0", "9.0"]),
    (" 8.0  9.0a ", ["8.0", "9.0a"]),
    ("90a;100;120", ["9.0a", "10.0", "12.0"]),
    ("80;8.0", ["8.0"]),
])
def test_cuda_archs(raw, expected):
    env = {} if raw is None else {"TFK_CUDA_ARCHS": raw}
    assert _build_env.cuda_archs(env) == expected


@pytest.mark.parametrize("raw, bad", [("sm_80", "sm_80"), ("8.0;8", "'8'"), ("8.0+PTX", "8.0+PTX"),
                                      ("80;abc", "abc"), ("", "names no arch"), ("9.0b", "9.0b")])
def test_cuda_archs_errors(raw, bad):
    with pytest.raises(ValueError, match="TFK_CUDA_ARCHS") as e:
        _build_env.cuda_archs({"TFK_CUDA_ARCHS": raw})
    assert bad in str(e.value)


def test_arch_list_forms():
    assert _build_env.torch_arch_list(["8.0", "9.0"]) == "8.0;9.0"
    assert _build_env.cmake_arch_list(["8.0", "9.0a"]) == "80;90a"


# ------------------------------------------------------------ (b) CMake + host

@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """The CMake project, built once for this module into a fresh folder."""
    return compile_report.build(tmp_path_factory.mktemp("cmake"), ARCHS)


@pytest.fixture(scope="module")
def host_lib(cmake_build):
    lib = ctypes.CDLL(str(cmake_build["build_dir"] / "libtfk_host.so"))
    lib.tfk_host_merge_lse.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
    lib.tfk_host_merge_lse.restype = ctypes.c_int
    lib.tfk_host_last_error.restype = ctypes.c_char_p
    return lib


def _host_merge(lib, out_acc, lse_acc, out_i, lse_i):
    rows, dim = out_acc.shape
    rc = lib.tfk_host_merge_lse(out_acc.data_ptr(), lse_acc.data_ptr(), out_i.data_ptr(),
                                lse_i.data_ptr(), rows, dim)
    assert rc == 0, lib.tfk_host_last_error().decode()


def _partials(rows, dim, seed):
    g = torch.Generator().manual_seed(seed)
    out_a, out_b = torch.randn(2, rows, dim, generator=g)
    lse_a, lse_b = torch.randn(2, rows, generator=g) * 3
    idx = torch.arange(rows)
    # Empty rows (lse -inf, out 0): accumulator only, partial only, both.
    for lse, out, empty in ((lse_a, out_a, (idx % 5 == 1) | (idx % 11 == 3)),
                            (lse_b, out_b, (idx % 7 == 2) | (idx % 11 == 3))):
        lse[empty] = NEG_INF
        out[empty] = 0.0
    if rows > 4:  # one side dominating: weights saturate to exactly 1 and 0
        lse_a[4], lse_b[4] = 60.0, -60.0
    return out_a, lse_a, out_b, lse_b


@pytest.mark.parametrize("rows, dim", [(97, 40), (1, 1), (5, 257), (64, 128), (0, 8)])
def test_host_merge_lse_matches_merge_partials(host_lib, rows, dim):
    out_a, lse_a, out_b, lse_b = _partials(rows, dim, seed=rows * 1000 + dim)
    ref_out, ref_lse = merge_partials(out_a, lse_a, out_b, lse_b)
    out_acc, lse_acc = out_a.clone(), lse_a.clone()
    _host_merge(host_lib, out_acc, lse_acc, out_b.clone(), lse_b.clone())
    assert not out_acc.isnan().any() and not lse_acc.isnan().any()
    assert torch.equal(lse_acc.isneginf(), ref_lse.isneginf())
    torch.testing.assert_close(lse_acc, ref_lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_acc, ref_out, atol=1e-6, rtol=1e-6)
    if rows > 3:  # row 3 is empty on both sides
        assert lse_acc[3] == NEG_INF and torch.all(out_acc[3] == 0)


def test_host_merge_lse_all_empty_rows(host_lib):
    rows, dim = 33, 40
    out_acc, out_i = torch.zeros(rows, dim), torch.zeros(rows, dim)
    lse_acc, lse_i = torch.full((rows,), NEG_INF), torch.full((rows,), NEG_INF)
    _host_merge(host_lib, out_acc, lse_acc, out_i, lse_i)
    assert torch.all(out_acc == 0) and torch.all(lse_acc == NEG_INF)


def test_host_merge_lse_rejects_bad_arguments(host_lib):
    assert host_lib.tfk_host_merge_lse(None, None, None, None, -1, 4) != 0
    assert b"negative" in host_lib.tfk_host_last_error()
    assert host_lib.tfk_host_merge_lse(None, None, None, None, 3, 4) != 0
    assert b"null" in host_lib.tfk_host_last_error()


# --------------------------------------------------------------- (c) ptxas

def test_ptxas_reports_no_spills(cmake_build):
    if _build_env.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc) found: no ptxas reports to check")
    assert cmake_build["cuda"], "a CUDA toolkit exists but CMake found no CUDA compiler"
    rows = compile_report.cuda_rows(cmake_build["build_dir"], ARCHS)
    sources = [str(p.relative_to(ROOT)) for p in compile_report.kernel_sources()]
    assert sources, "no kernel sources under csrc/"
    for src in sources:
        per_arch = {f"sm_{a}": {r["kernel"] for r in rows if r["source"] == src and r["arch"] == f"sm_{a}"}
                    for a in ARCHS}
        assert all(per_arch.values()), f"{src}: an arch has no kernel report: {per_arch}"
        assert per_arch["sm_80"] == per_arch["sm_90"], f"{src}: kernels differ between archs"
    names = {r["kernel"].split("(")[0] for r in rows}
    assert {"tfk::merge::merge_lse_out_kernel", "tfk::merge::merge_lse_lse_kernel"} <= names
    assert compile_report.problems(rows) == []
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)


def test_compile_report_flags_spills_and_smem():
    """The report's checks can fail: a spilling kernel and an over-limit one."""
    log = """ptxas info    : Compiling entry function '_Z3fatPf' for 'sm_80'
ptxas info    : Function properties for _Z3fatPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 200000 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3okPf' for 'sm_90'
ptxas info    : Function properties for _Z3okPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 200000 bytes smem
"""
    rows = compile_report.parse_ptxas_log(log, "x.cu")
    assert [(r["arch"], r["registers"], r["smem"], r["spill_stores"], r["stack"]) for r in rows] == \
        [("sm_80", 255, 200000, 8, 16), ("sm_90", 32, 200000, 0, 0)]
    bad = compile_report.problems(rows)
    assert len(bad) == 2 and all("_Z3fatPf" in b for b in bad)


# ------------------------------------------------------------ (d) extension

def _extension_expected():
    if os.environ.get("TFK_BUILD_CUDA") == "0":
        return "TFK_BUILD_CUDA=0"
    if _build_env.find_cuda_home() is None:
        return "no CUDA toolkit"
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    return None


def test_extension_registers_ops():
    reason = _extension_expected()
    if reason:
        pytest.skip(f"tfk._C is not expected here: {reason}")
    import tfk._C  # noqa: F401  (fails the test if the build skipped it)

    op = torch.ops.tfk.merge_lse_
    schema = str(op.default._schema)
    assert "Tensor(a!) out_acc" in schema and "Tensor(b!) lse_acc" in schema
    x, lse = torch.zeros(3, 4), torch.zeros(3)
    with pytest.raises(NotImplementedError):  # CUDA only: CPU tensors have no kernel
        op(x, lse, x.clone(), lse.clone())
    # the attention kernels, with the schemas tfk._sim shares (csrc/attention/ops.h)
    import tfk._sim  # noqa: F401
    for name in ("attention_fwd_", "attention_bwd_"):
        cuda, sim = getattr(torch.ops.tfk, name).default, getattr(torch.ops.tfk_sim, name).default
        assert str(cuda._schema).split("(", 1)[1] == str(sim._schema).split("(", 1)[1]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(cuda.name(), "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(cuda.name(), "CPU")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows, dim", [(97, 40), (5, 257)])
def test_extension_merge_lse_cuda(rows, dim):
    import tfk._C  # noqa: F401

    out_a, lse_a, out_b, lse_b = (t.cuda() for t in _partials(rows, dim, seed=7))
    ref_out, ref_lse = merge_partials(out_a, lse_a, out_b, lse_b)
    torch.ops.tfk.merge_lse_(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(lse_a, ref_lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_a, ref_out, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="lse_i"):
        torch.ops.tfk.merge_lse_(out_a, lse_a, out_b, lse_b.double())


# ------------------------------------------------------------ (e) packaging

def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TFK_BUILD_CUDA"] = "0"
    return env


def test_installed_triton_kernels_only_under_tfk(tmp_path):
    """In a process whose cwd is not the repo: only tfk.triton_kernels is ours."""
    code = ("import importlib.util as u, json\n"
            "spec = lambda n: (lambda s: s and s.origin)(u.find_spec(n))\n"
            "print(json.dumps([spec('tfk'), spec('triton_kernels'), spec('tfk.triton_kernels')]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, check=True)
    tfk_origin, top, ours = json.loads(proc.stdout)
    if tfk_origin is None:
        pytest.skip("tfk is not installed in this environment")
    assert ours is not None, "tfk is installed but tfk.triton_kernels does not import"
    assert top is None or not Path(top).resolve().is_relative_to(ROOT / "triton_kernels"), \
        f"`import triton_kernels` resolves to our folder: {top}"
    assert Path(ours).read_text() == (ROOT / "triton_kernels" / "__init__.py").read_text()


def test_wheel_maps_triton_kernels_into_tfk(tmp_path):
    """A regular (non-editable) build: the wheel has tfk/triton_kernels/, no top-level triton_kernels/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("tfk", "triton_kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
           "-w", str(tmp_path / "dist"), str(src)]
    terminal = shutil.which("script")
    if terminal:  # on a terminal, as a user at a prompt: pip -q hides the build's own output
        cmd = [terminal, "-qec", shlex.join(cmd), "/dev/null"]
    proc = subprocess.run(cmd, env=_clean_env(), check=True, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    (wheel,) = (tmp_path / "dist").glob("tfk-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tfk/triton_kernels/__init__.py" in names
    assert "tfk/_build_env.py" in names
    assert not [n for n in names if n.startswith("triton_kernels/")], names
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["tfk"]
    if not terminal:
        pytest.skip("the wheel is right; the line on the terminal needs util-linux `script` for a terminal")
    # a build that skips the CUDA extension says so on the user's terminal, with the command that builds it
    assert "tfk._C was NOT built: TFK_BUILD_CUDA=0" in proc.stdout, proc.stdout
    assert "pip install --no-build-isolation ." in proc.stdout


def test_build_info_reports_the_build_and_the_backends():
    """tfk.build_info() against what this machine and its setup.py run say."""
    import io

    import tfk
    buf = io.StringIO()
    info = tfk.build_info(file=buf)
    text = buf.getvalue()
    build = info["build"]
    assert build is not None, "setup.py writes tfk/_build_config.py"
    reason = _extension_expected()
    assert build["cuda_extension"] == (reason is None), (build, reason)
    if reason is None:
        assert info["extensions"]["_C"] == "built"
        assert build["cuda_archs"] == _build_env.torch_arch_list(_build_env.cuda_archs())
        assert build["cuda_home"] == _build_env.find_cuda_home()
        assert f"built for archs {build['cuda_archs']}" in text
    else:
        assert "pip install --no-build-isolation" in text
    assert info["extensions"]["_sim"] == info["extensions"]["_cpu"] == "built"
    assert info["backends"]["reference"]["runs"] == ["float16", "bfloat16", "float32"]
    assert info["backends"]["cuda-sim"]["runs"] == ([] if torch.cuda.is_available() else ["float16", "bfloat16"])
    moe = info["moe_backends"]
    assert moe["torch"]["runs"] == moe["reference"]["runs"] == ["float16", "bfloat16", "float32"]
    assert moe["cuda-sim"]["runs"] == ([] if torch.cuda.is_available() else ["float16", "bfloat16", "float32"])
    if not torch.cuda.is_available():  # the tests run Triton in its interpreter: no bf16
        assert info["backends"]["triton"]["runs"] == moe["triton"]["runs"] == ["float16", "float32"]
        assert any("needs CUDA tensors" in r for r in info["backends"]["cuda"]["reasons"])
        assert any("needs CUDA tensors" in r for r in moe["cuda"]["reasons"])
    assert "moe       backend torch" in text
    linear = info["linear_backends"]
    assert linear["torch"]["runs"] == linear["reference"]["runs"] == ["float16", "bfloat16", "float32"]
    assert linear["cuda-sim"]["runs"] == ([] if torch.cuda.is_available() else ["float16", "bfloat16", "float32"])
    if not torch.cuda.is_available():
        assert any("needs CUDA tensors" in r for r in linear["cuda"]["reasons"])
    assert "linear    backend torch" in text
    lsh = info["lsh_backends"]
    assert lsh["torch"]["runs"] == lsh["reference"]["runs"] == ["float16", "bfloat16", "float32"]
    assert "lsh       backend torch" in text
    kvcache = info["kvcache_backends"]
    assert kvcache["torch"]["runs"] == kvcache["reference"]["runs"] == ["float16", "bfloat16", "float32"]
    assert kvcache["cuda-sim"]["runs"] == ([] if torch.cuda.is_available() else ["float16", "bfloat16"])
    assert "kvcache   backend torch" in text
    for name in tfk.backend_names():
        assert f"backend {name}" in text
