"""The compile report's Triton section: every shipped Triton kernel compiles
ahead of time, with no GPU, for sm_80 and sm_90 without spilling and within
the arch's shared memory; and the ptxas-log parser it relies on.

The compiles run in worker processes with TRITON_INTERPRET unset, so this
works under conftest.py's interpreter mode.
"""
import importlib.util
import os
import re

import pytest

from bench import compile_report as cr

ARCHS = ["80", "90"]

# A ptxas -v log as Triton prints it (TRITON_DUMP_PTXAS_LOG=1): a performance
# note and a gmem line before the entry, no smem on the "Used" line (Triton's
# shared memory is dynamic), a cumulative stack size.
TRITON_LOG = """\
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline \
stage in the function '_attn_fwd'
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_attn_fwd' for 'sm_90a'
ptxas info    : Function properties for _attn_fwd
    32 bytes stack frame, 28 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 32 bytes cumulative stack size
ptxas info    : Compile time = 416.597 ms
"""

# As nvcc -Xptxas -v prints it: static smem on the "Used" line, two kernels.
NVCC_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4headPfi' for 'sm_80'
ptxas info    : Function properties for _Z4headPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 16384 bytes smem, 368 bytes cmem[0]
ptxas info    : Compiling entry function '_Z4tailPfi' for 'sm_80'
ptxas info    : Function properties for _Z4tailPfi
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, 360 bytes cmem[0]
"""


def _summary(rows):
    return [(r["kernel"], r["arch"], r["registers"], r["smem"], r["spill_stores"], r["spill_loads"], r["stack"])
            for r in rows]


def test_ptxas_log_parser_reads_triton_log():
    rows = cr.parse_ptxas_log(TRITON_LOG, "triton_kernels/attention.py")
    assert _summary(rows) == [("_attn_fwd", "sm_90a", 255, 0, 28, 24, 32)]
    assert rows[0]["source"] == "triton_kernels/attention.py"


def test_ptxas_log_parser_reads_nvcc_log():
    rows = cr.parse_ptxas_log(NVCC_LOG, "x.cu")
    assert _summary(rows) == [("_Z4headPfi", "sm_80", 40, 16384, 0, 0, 0),
                              ("_Z4tailPfi", "sm_80", 64, 0, 4, 12, 8)]


def test_ptxas_log_parser_rejects_incomplete_log():
    with pytest.raises(ValueError, match="registers"):
        cr.parse_ptxas_log(TRITON_LOG.replace("Used 255 registers", "Used many registers"))


def test_problems_name_failed_spilling_and_oversized_triton_configs():
    ok = dict(source="t.py", kernel="_k", mangled="_k", arch="sm_90a", registers=128, smem=100_000,
              spill_stores=0, spill_loads=0, stack=0, error=None, same_as=None)
    rows = [dict(ok, config="fp16 D=64 plain"),
            dict(ok, config="fp16 D=128 all", spill_stores=8),
            dict(ok, config="bf16 D=256 all", arch="sm_80", smem=cr.smem_limit("sm_80") + 1),
            dict(ok, config="fp32 D=80 bool", smem=cr.smem_limit("sm_90a")),  # at the limit: fine
            dict(ok, config="fp32 D=64 all", registers=None, smem=None, spill_stores=None, spill_loads=None,
                 stack=None, error="CompilationError: boom")]
    bad = cr.problems(rows)
    assert len(bad) == 3
    assert "[fp16 D=128 all] [sm_90a] spills" in bad[0]
    assert "[bf16 D=256 all] [sm_80]" in bad[1] and "shared memory" in bad[1]
    assert "[fp32 D=64 all] [sm_90a] failed to compile: CompilationError: boom" in bad[2]
    assert "FAILED" in cr.format_table(rows)


def test_triton_matrix_covers_the_shipped_configs():
    full = cr.triton_configs(ARCHS)
    keys = {(c["kernel"], c["dtype"], c["precision"], c["head_dim"], c["pattern"], c["cap"]) for c in full}
    assert len(keys) == len(full)
    for kernel in cr.TRITON_KERNELS:
        for dtype, precision in (("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "tf32")):
            for d in (64, 80, 128, 256):
                for pattern in ("plain", "all"):
                    for cap in (80, 90):
                        assert (kernel, dtype, precision, d, pattern, cap) in keys
    assert cr.TRITON_PATTERNS["all"] == dict(HAS_QIDX=True, HAS_KIDX=True, MASK_KIND=2, DROPOUT=True)
    quick = cr.triton_configs(ARCHS, quick=True)
    assert sorted((c["kernel"], c["cap"]) for c in quick) == sorted(
        (k, cap) for k in cr.TRITON_KERNELS for cap in (80, 90))


def test_triton_shipped_matrix_compiles_without_spills_for_sm80_sm90():
    """A real check over every shipped config (each kernel, dtype, head-dim
    class, plain and all features, both archs): a spill, a compile error or
    shared memory over the limit fails here."""
    interpret = os.environ.get("TRITON_INTERPRET")
    info = {}
    rows = cr.triton_rows(ARCHS, keep_going=True, info=info)
    assert os.environ.get("TRITON_INTERPRET") == interpret  # the caller's mode is left alone
    assert len(rows) == len(cr.triton_configs(ARCHS))
    assert info["ptxas"] and info["ptxas_version"]
    errors = [f"{r['kernel']} [{r['config']}] [{r['arch']}]: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    for r in rows:
        assert r["registers"] > 0 and r["smem"] > 0, r  # a dot needs shared memory
    assert cr.problems(rows) == [], "\n" + cr.format_table(rows)
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)
    assert all(r["smem"] <= cr.smem_limit(r["arch"]) for r in rows)


def test_triton_report_fails_a_kernel_that_calls_a_host_function(tmp_path, monkeypatch):
    """A host `def _mix32` after the @triton.jit one (a bug this file once had)
    makes Triton refuse every kernel at its first launch; the report must fail
    all of them, not only the first one it hashes."""
    src = (cr.ROOT / cr.TRITON_SOURCE).read_text()
    (tmp_path / "shadowed_attention.py").write_text(src + "\n\ndef _mix32(x):\n    return x\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rows = cr.triton_rows(["90"], quick=True, module="shadowed_attention")
    assert sorted(r["kernel"] for r in rows) == sorted(cr.TRITON_KERNELS)
    for r in rows:
        assert r["error"] and "Unsupported function referenced" in r["error"], r
    assert len(cr.problems(rows)) == len(rows)


def _compilable_attention_module(monkeypatch):
    """triton_kernels/attention.py loaded afresh with TRITON_INTERPRET unset
    (conftest.py sets it for this process): its kernels are JITFunctions that
    _triton_compile_one can take."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("_tfk_attention_compilable", cr.ROOT / cr.TRITON_SOURCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_triton_config_fails_on_an_argument_the_kernel_does_not_have(monkeypatch):
    """The report passes each kernel exactly its parameters: a value or a
    constexpr the kernel does not have fails the config, naming it, instead of
    being dropped. The check comes before Triton binds the arguments, so this
    runs in-process, with no compile (triton.compile stopped anyway)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    mod = _compilable_attention_module(monkeypatch)

    def compile_reached(*args, **kwargs):
        raise RuntimeError("reached triton.compile")

    monkeypatch.setattr(triton, "compile", compile_reached)
    options = set(make_backend(GPUTarget("cuda", 90, 32)).parse_options({}).__dict__)
    configs = cr.triton_configs(["90"], extended=True)
    for cfg in configs:  # the shipped arguments pass the check
        params = {p.name: p.is_constexpr for p in getattr(mod, cfg["kernel"]).params}
        cr.check_kernel_arguments(cfg["kernel"], params, *cr._launch_args(mod, cfg), options)

    shipped = cr._launch_args

    def adding(extra_values, extra_meta):
        def launch_args(m, cfg):
            values, meta = shipped(m, cfg)
            return dict(values, **extra_values), dict(meta, **extra_meta)
        return launch_args

    for kernel in cr.TRITON_KERNELS:
        cfg = next(c for c in configs if c["kernel"] == kernel)
        for extra_values, extra_meta, expected in (
                (dict(Lq=1000), {}, f"argument(s) ['Lq'] that {kernel} does not have"),
                ({}, dict(BOGUS_FLAG=True), f"constexpr(s) ['BOGUS_FLAG'] that {kernel} does not have")):
            monkeypatch.setattr(cr, "_launch_args", adding(extra_values, extra_meta))
            row = cr._triton_compile_one(mod, cfg, {})
            assert row["error"] and expected in row["error"], (cfg, row["error"])
    # SPLIT_N is a constexpr of the backward kernels only
    monkeypatch.setattr(cr, "_launch_args", adding({}, dict(SPLIT_N=1)))
    fwd = next(c for c in configs if c["kernel"] == "_attn_fwd")
    assert "['SPLIT_N'] that _attn_fwd does not have" in cr._triton_compile_one(mod, fwd, {})["error"]


def test_kernel_argument_check_names_every_kind_of_mismatch():
    params = {"Q": False, "H": False, "BLOCK_M": True}
    options = {"num_warps", "num_stages"}
    cr.check_kernel_arguments("_k", params, dict(Q=0, H=1), dict(BLOCK_M=64, num_warps=4), options)
    for values, meta, expected in (
            (dict(Q=0, H=1, Lk=2), dict(BLOCK_M=64), "argument(s) ['Lk'] that _k does not have"),
            (dict(Q=0, H=1), dict(BLOCK_M=64, SPLIT_N=2), "constexpr(s) ['SPLIT_N'] that _k does not have"),
            (dict(Q=0, H=1, BLOCK_M=64), {}, "constexpr(s) ['BLOCK_M'] of _k as runtime arguments"),
            (dict(Q=0), dict(BLOCK_M=64, H=1), "runtime argument(s) ['H'] of _k as constexprs"),
            (dict(Q=0), dict(BLOCK_M=64), "no value for argument(s) ['H'] of _k")):
        with pytest.raises(RuntimeError, match=re.escape(expected)):
            cr.check_kernel_arguments("_k", params, values, meta, options)
