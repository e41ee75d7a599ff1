"""The compile report's Triton section: every shipped Triton kernel
(triton_kernels/attention.py, triton_kernels/moe.py, triton_kernels/linear.py) compiles ahead of time,
with no GPU, for sm_80 and sm_90 without spilling and within the arch's
shared memory; and the ptxas-log parser it relies on.

The compiles run in worker processes with TRITON_INTERPRET unset, so this
works under conftest.py's interpreter mode.
"""
import importlib.util
import os
import re

import pytest
import torch

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
    full = cr.triton_configs(ARCHS, families=["attention"])
    assert full == cr.attention_configs(ARCHS)
    keys = {(c["kernel"], c["dtype"], c["precision"], c["head_dim"], c["pattern"], c["cap"]) for c in full}
    assert len(keys) == len(full)
    for kernel in cr.TRITON_KERNELS:
        for dtype, precision in (("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "tf32")):
            for d in (64, 80, 128, 256):
                for pattern in ("plain", "all", "lsh"):
                    for cap in (80, 90):
                        assert (kernel, dtype, precision, d, pattern, cap) in keys
    assert cr.TRITON_PATTERNS["all"] == dict(HAS_QIDX=True, HAS_KIDX=True, MASK_KIND=2, DROPOUT=True, PREDICATES=0)
    # LSH's sub-passes: index tables per (batch, head), the padding mask, dropout, causal and self predicates
    assert cr.TRITON_PATTERNS["lsh"] == dict(HAS_QIDX=2, HAS_KIDX=2, MASK_KIND=1, DROPOUT=True, PREDICATES=2)
    quick = cr.triton_configs(ARCHS, quick=True, families=["attention"])
    assert sorted((c["kernel"], c["cap"]) for c in quick) == sorted(
        (k, cap) for k in cr.TRITON_KERNELS for cap in (80, 90))
    # every family by default
    assert cr.triton_configs(ARCHS) == (full + cr.moe_configs(ARCHS) + cr.linear_configs(ARCHS)
                                        + cr.kvcache_configs(ARCHS))


def test_triton_shipped_matrix_compiles_without_spills_for_sm80_sm90():
    """A real check over every shipped config (each kernel, dtype, head-dim
    class, plain, all features and LSH's, both archs): a spill, a compile error or
    shared memory over the limit fails here."""
    interpret = os.environ.get("TRITON_INTERPRET")
    info = {}
    rows = cr.triton_rows(ARCHS, keep_going=True, info=info, families=["attention"])
    assert os.environ.get("TRITON_INTERPRET") == interpret  # the caller's mode is left alone
    assert len(rows) == len(cr.attention_configs(ARCHS))
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
    rows = cr.triton_rows(["90"], quick=True, families=["attention"], modules={"attention": "shadowed_attention"})
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
    configs = cr.attention_configs(["90"], extended=True)
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


# -----------------------------------------------------------------------------
# MoE kernels (triton_kernels/moe.py)
# -----------------------------------------------------------------------------

def _compilable_moe_module(monkeypatch, name="_tfk_moe_compilable"):
    """triton_kernels/moe.py loaded afresh with TRITON_INTERPRET unset (see
    _compilable_attention_module)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location(name, cr.ROOT / cr.MOE_SOURCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_moe_matrix_covers_the_launchers_configs():
    default = cr.moe_configs(ARCHS)
    keys = [(c["kernel"], c["name"], c["cap"]) for c in default]
    assert len(set(keys)) == len(keys)
    opts = {(c["kernel"], c["dtype"], c["precision"], c["cap"], tuple(sorted(c["opts"].items()))) for c in default}
    for cap in (80, 90):
        for dtype, precision in (("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "tf32")):
            for act in ("none", "silu", "gelu_tanh", "relu"):
                for gather in (False, True):
                    for scale in (False, True):
                        for trans_b in (False, True):
                            o = dict(act=act, gather=gather, scale=scale, trans_b=trans_b, small=False)
                            assert ("_moe_grouped_gemm", dtype, precision, cap, tuple(sorted(o.items()))) in opts
            for gather in (False, True):
                o = dict(gather=gather, small=False)
                assert ("_moe_grouped_gemm_tn", dtype, precision, cap, tuple(sorted(o.items()))) in opts
            for act in ("silu", "gelu_tanh", "relu"):
                assert ("_moe_act_bwd", dtype, None, cap, (("act", act), ("small", False))) in opts
            route = [c["opts"] for c in default if c["kernel"] == "_moe_route" and c["dtype"] == dtype
                     and c["cap"] == cap]
            # every BLOCK_E (next_power_of_2(E), E = 1..256), plain and with every feature
            assert sorted({o["E"] for o in route}) == [2 ** i for i in range(9)]
            for E in cr.MOE_EXPERTS:
                assert dict(E=E, k=min(8, E), score="softmax", bias=False, normalize=True, n_group=None,
                            topk_group=None) in route
                assert any(o["E"] == E and o["score"] == "sigmoid" and o["bias"] and
                           (o["n_group"] == E // 2 or E < 4) for o in route)
        for kernel in ("_moe_histogram", "_moe_scan", "_moe_scatter"):
            assert sorted(c["opts"]["E"] for c in default if c["kernel"] == kernel and c["cap"] == cap) == \
                list(cr.MOE_EXPERTS)
    quick = cr.moe_configs(ARCHS, quick=True)
    assert sorted((c["kernel"], c["cap"]) for c in quick) == sorted(
        (k, cap) for k in cr.MOE_KERNELS for cap in (80, 90))
    assert all(c in default for c in quick)
    extended = cr.moe_configs(ARCHS, extended=True)
    assert all(c in extended for c in default) and len(extended) > len(default)


def test_moe_launch_args_are_the_launchers_own(monkeypatch):
    """Every MoE config's arguments, from its launcher run on meta tensors,
    pass the argument check; the tiles, dot precision and launch options are
    moe.py's (gemm_tiles, dot_precision, launch_config), and route and
    permute reach every BLOCK_E they can take. No compile."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    mod = _compilable_moe_module(monkeypatch)
    options = set(make_backend(GPUTarget("cuda", 90, 32)).parse_options({}).__dict__)
    block_e = {"_moe_route": set(), "_moe_histogram": set(), "_moe_scan": set(), "_moe_scatter": set()}
    for cfg in cr.moe_configs(["90"], extended=True):
        values, meta = cr._launch_args(mod, cfg)
        params = {p.name: p.is_constexpr for p in getattr(mod, cfg["kernel"]).params}
        cr.check_kernel_arguments(cfg["kernel"], params, values, meta, options)
        dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(cfg["dtype"], "int64"))
        if cfg["kernel"] in ("_moe_grouped_gemm", "_moe_grouped_gemm_tn"):
            bm, bn, bk = mod.gemm_tiles(dtype)
            assert meta["PRECISION"] == mod.dot_precision(dtype) == cfg["precision"]
            assert meta["BLOCK_M"] == bm
            if not cfg["opts"]["small"]:  # the launchers' upper bounds
                assert (meta["BLOCK_N"], meta["BLOCK_K"]) == (bn, bk), cfg
        if cfg["kernel"] in mod.KERNELS[:5]:
            assert {k: meta[k] for k in ("num_warps", "num_stages")} == mod.launch_config(cfg["kernel"], dtype)
        if cfg["kernel"] in block_e:
            block_e[cfg["kernel"]].add(meta["BLOCK_E"])
    assert block_e["_moe_route"] == {2 ** i for i in range(9)}  # 1..256
    for kernel in ("_moe_histogram", "_moe_scan", "_moe_scatter"):
        assert block_e[kernel] == {2 ** i for i in range(1, 10)}  # 2..512


def test_moe_config_fails_when_the_launcher_and_the_report_disagree(monkeypatch):
    """A launcher passing a constexpr its kernel lacks, launching the kernel
    twice, or a dot precision other than the report's fails the config,
    naming the reason. In-process: these fail before Triton binds the
    arguments (triton.compile stopped anyway; this process's triton.language
    was built for the interpreter, so binding would not work here)."""
    import triton
    mod = _compilable_moe_module(monkeypatch)

    def compile_reached(*args, **kwargs):
        raise RuntimeError("reached triton.compile")

    monkeypatch.setattr(triton, "compile", compile_reached)
    quick = {c["kernel"]: c for c in cr.moe_configs(["90"], quick=True)}
    shipped = mod.launch_config
    monkeypatch.setattr(mod, "launch_config", lambda kernel, dtype: dict(shipped(kernel, dtype), BOGUS=1))
    row = cr._triton_compile_one(mod, quick["_moe_route"], {})
    assert "constexpr(s) ['BOGUS'] that _moe_route does not have" in row["error"]
    monkeypatch.setattr(mod, "launch_config", shipped)

    fp32 = next(c for c in cr.moe_configs(["90"]) if c["kernel"] == "_moe_grouped_gemm" and c["dtype"] == "fp32")
    monkeypatch.setattr(mod, "dot_precision", lambda dtype: "ieee")
    row = cr._triton_compile_one(mod, fp32, {})
    assert "PRECISION='ieee' for fp32, the report's matrix says 'tf32'" in row["error"]

    shipped_combine = mod.combine
    monkeypatch.setattr(mod, "combine", lambda y, index, k: (shipped_combine(y, index, k),
                                                             shipped_combine(y, index, k))[0])
    row = cr._triton_compile_one(mod, quick["_moe_combine"], {})
    assert "launched _moe_combine 2 times, expected once" in row["error"]
    # the recorders are gone again: the module's kernels are its JITFunctions
    assert all(hasattr(getattr(mod, k), "params") for k in mod.KERNELS)


@pytest.mark.parametrize("matrix", ["quick", pytest.param("default", marks=pytest.mark.slow)])
def test_moe_shipped_matrix_compiles_without_spills_for_sm80_sm90(matrix):
    """A real check over the MoE matrix: each kernel's register worst case on
    both archs (quick, the default tier: 16 compiles, 33 s on 2 shared cores) or every config of the
    report's default matrix (the long tier): it compiles, with no spill and
    shared memory within the arch's limit."""
    quick = matrix == "quick"
    rows = cr.triton_rows(ARCHS, quick=quick, keep_going=True, families=["moe"])
    assert len(rows) == len(cr.moe_configs(ARCHS, quick=quick))
    errors = [f"{r['kernel']} [{r['config']}] [{r['arch']}]: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    assert {r["kernel"] for r in rows} == set(cr.MOE_KERNELS)
    assert all(r["source"] == cr.MOE_SOURCE and r["registers"] > 0 for r in rows)
    assert cr.problems(rows) == [], "\n" + cr.format_table(rows)
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)


PLANTED_MOE = '''

def gemm_tiles(dtype):  # planted: accumulators of 64 x 256 fp32, two of them with an act: spills
    return (64, 256, 64)


PERMUTE_BLOCK = 48  # planted: not a power of two, tl.arange refuses it
'''


def test_moe_report_fails_planted_spill_and_compile_error(tmp_path, monkeypatch):
    """moe.py with GEMM tiles too big for the registers and a permute block
    that is not a power of two: the report names the spilling grouped GEMM
    and the two permute kernels that do not compile; the other kernels pass."""
    src = (cr.ROOT / cr.MOE_SOURCE).read_text()
    (tmp_path / "planted_moe.py").write_text(src + PLANTED_MOE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    rows = cr.triton_rows(["90"], quick=True, families=["moe"], modules={"moe": "planted_moe"})
    by_kernel = {r["kernel"]: r for r in rows}
    assert sorted(by_kernel) == sorted(cr.MOE_KERNELS)
    gemm = by_kernel["_moe_grouped_gemm"]
    assert gemm["error"] is None and gemm["block"].startswith("M64 N256 K64") and gemm["spill_stores"] > 0, gemm
    bad = cr.problems(rows)
    assert any(line.startswith("_moe_grouped_gemm [fp16 silu gather scale b(G,N,K)] [sm_90a] spills")
               for line in bad), bad
    for kernel in ("_moe_histogram", "_moe_scatter"):
        assert by_kernel[kernel]["error"] and "power of 2" in by_kernel[kernel]["error"], by_kernel[kernel]
        assert any(line.startswith(f"{kernel} [int64 E=256] [sm_90a] failed to compile") for line in bad)
    for kernel in ("_moe_route", "_moe_act_bwd", "_moe_combine", "_moe_scan"):
        assert not cr._row_problems(by_kernel[kernel]), by_kernel[kernel]
    assert "FAILED" in cr.format_table(rows)


# -----------------------------------------------------------------------------
# Linear-attention kernels (triton_kernels/linear.py, csrc/linear/linear_fwd.cu)
# -----------------------------------------------------------------------------

def _compilable_linear_module(monkeypatch, name="_tfk_linear_compilable"):
    """triton_kernels/linear.py loaded afresh with TRITON_INTERPRET unset (see
    _compilable_attention_module)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location(name, cr.ROOT / cr.LINEAR_SOURCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_linear_matrix_covers_the_launchers_configs():
    default = cr.linear_configs(ARCHS)
    keys = [(c["kernel"], c["name"], c["cap"]) for c in default]
    assert len(set(keys)) == len(keys)
    opts = {(c["kernel"], c["dtype"], c["cap"], c["opts"]["D"], c["opts"]["Dv"], c["opts"]["causal"],
             c["opts"]["pattern"]) for c in default}
    dims = {d for d, _ in cr.LINEAR_HEAD_DIMS}
    assert {16, 40, 64, 80, 128, 256} <= dims and any(d != dv for d, dv in cr.LINEAR_HEAD_DIMS)
    assert cr.LINEAR_PATTERNS["all"] == dict(feature_map="elu1", mask=True, state=True, normalize=True)
    for cap in (80, 90):
        for dtype in ("fp16", "bf16", "fp32"):
            for kernel in cr.LINEAR_KERNELS:
                if kernel == "_softmax_k_stats":   # its tile depends on D only
                    for d in dims:
                        assert (kernel, dtype, cap, d, d, False, "softmax") in opts
                    continue
                for d, dv in cr.LINEAR_HEAD_DIMS:
                    for causal, pattern in ((True, "all"), (False, "all"), (False, "softmax")):
                        assert (kernel, dtype, cap, d, dv, causal, pattern) in opts
    quick = cr.linear_configs(ARCHS, quick=True)
    assert sorted((c["kernel"], c["cap"]) for c in quick) == sorted(
        (k, cap) for k in cr.LINEAR_KERNELS for cap in (80, 90))
    assert all(c in default for c in quick)
    extended = cr.linear_configs(ARCHS, extended=True)
    assert all(c in extended for c in default) and len(extended) > len(default)


def test_linear_launch_args_are_the_launchers_own(monkeypatch):
    """Every linear config's arguments, from forward/backward run on meta
    tensors, pass the argument check; chunk, num_warps and dot precision are
    linear.py's (config, DECODE_LEN, DOT_PRECISION), and the report's kernels
    are the module's. No compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    mod = _compilable_linear_module(monkeypatch)
    assert set(cr.LINEAR_KERNELS) == set(mod.KERNELS)
    options = set(make_backend(GPUTarget("cuda", 90, 32)).parse_options({}).__dict__)
    for cfg in cr.linear_configs(["90"], extended=True):
        values, meta = cr._launch_args(mod, cfg)
        params = {p.name: p.is_constexpr for p in getattr(mod, cfg["kernel"]).params}
        cr.check_kernel_arguments(cfg["kernel"], params, values, meta, options)
        o = cfg["opts"]
        C, BD, BDV, tile, warps = mod.config(o["D"], 16 if cfg["kernel"] == "_softmax_k_stats" else o["Dv"])
        assert meta["num_warps"] == warps, cfg
        if cfg["kernel"] == "_linear_decode":
            assert meta["BLOCK_L"] == mod.DECODE_LEN
        else:
            assert meta["BLOCK_C"] == C, cfg
        if "PREC" in params:
            assert meta["PREC"] == mod.DOT_PRECISION == cfg["precision"]
        # the state tile: Dv tiled forward and in dv, D tiled in dq, dk and the softmax statistics
        tiled_v = cfg["kernel"] in ("_linear_fwd", "_linear_decode")
        for name, want in (("BLOCK_D", BD), ("BLOCK_TD", min(tile, BD)), ("BLOCK_TV", min(tile, BDV)),
                           ("BLOCK_DV", min(tile, BDV) if tiled_v else BDV)):
            if name in meta:
                assert meta[name] == want, (cfg, name, meta[name])


def test_linear_config_fails_when_the_launcher_and_the_report_disagree(monkeypatch):
    """A dot precision other than the report's, or a launcher launching a
    kernel twice, fails the config, naming the reason (in-process: before
    Triton binds the arguments)."""
    import triton
    mod = _compilable_linear_module(monkeypatch)

    def compile_reached(*args, **kwargs):
        raise RuntimeError("reached triton.compile")

    monkeypatch.setattr(triton, "compile", compile_reached)
    quick = {c["kernel"]: c for c in cr.linear_configs(["90"], quick=True)}
    monkeypatch.setattr(mod, "DOT_PRECISION", "ieee")
    row = cr._triton_compile_one(mod, quick["_linear_fwd"], {})
    assert "PREC='ieee' for fp32, the report's matrix says 'tf32'" in row["error"]
    monkeypatch.setattr(mod, "DOT_PRECISION", "tf32")
    shipped = mod.forward
    monkeypatch.setattr(mod, "forward", lambda *a: (shipped(*a), shipped(*a))[0])
    row = cr._triton_compile_one(mod, quick["_linear_fwd"], {})
    assert "launched _linear_fwd 2 times, expected once" in row["error"]
    assert all(hasattr(getattr(mod, k), "params") for k in mod.KERNELS)


@pytest.mark.parametrize("matrix", ["quick", pytest.param("default", marks=pytest.mark.slow)])
def test_linear_shipped_matrix_compiles_without_spills_for_sm80_sm90(matrix):
    """A real check over the linear-attention matrix: each kernel's widest
    config on both archs (quick, the default tier: 12 compiles) or every config
    of the report's default matrix (the long tier): it compiles, with no spill
    and shared memory within the arch's limit."""
    quick = matrix == "quick"
    rows = cr.triton_rows(ARCHS, quick=quick, keep_going=True, families=["linear"])
    assert len(rows) == len(cr.linear_configs(ARCHS, quick=quick))
    errors = [f"{r['kernel']} [{r['config']}] [{r['arch']}]: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    assert {r["kernel"] for r in rows} == set(cr.LINEAR_KERNELS)
    assert all(r["source"] == cr.LINEAR_SOURCE and r["registers"] > 0 for r in rows)
    assert cr.problems(rows) == [], "\n" + cr.format_table(rows)


def _linear_cuda_smem(elem_bytes: int, fp32: bool, dim: int) -> int:
    """smem_layout(dim).total of csrc/linear/linear_fwd.cu, recomputed: the fp32
    state slice, the fp32 score tile, then Q, K (rows padded) and V' tiles."""
    h = (cr.ROOT / "csrc" / "linear" / "linear.h").read_text()
    chunk, block_e = (int(re.search(rf"constexpr int {n} = (\d+);", h).group(1)) for n in ("kChunk", "kBlockE"))
    up = lambda x: (x + 15) // 16 * 16  # noqa: E731
    dp = up(dim)
    ld = dp + 1 if fp32 else dp + 8
    vld = block_e if fp32 else block_e + 8
    return (up(dp * block_e * 4) + up(chunk * (chunk + 1) * 4) + 2 * up(chunk * ld * elem_bytes)
            + up(chunk * vld * elem_bytes))


def test_linear_cuda_rows_get_dynamic_shared_memory():
    """The CUDA forward's rows add the dynamic shared memory a launch requests
    (linear::fwd_smem_bytes through the host library) at the largest D, per
    element type; needs the CMake build's libtfk_host.so."""
    build_dir = cr.DEFAULT_BUILD_DIR
    if not (build_dir / "libtfk_host.so").is_file():
        pytest.skip(f"no {build_dir}/libtfk_host.so (run python -m bench.compile_report first)")
    names = {"__half": (2, False), "__nv_bfloat16": (2, False), "float": (4, True)}
    rows = [dict(kernel=f"void tfk::linear::fwd::linear_fwd_kernel<{t}, {c}>(tfk::linear::FwdParams)", smem=16)
            for t in names for c in ("false", "true")]
    cr._add_dynamic_smem(rows, build_dir)
    d = cr.linear_cuda_max_dim()
    assert d >= 256
    for r in rows:
        t = re.search(r"<(\w+),", r["kernel"]).group(1)
        assert r["smem"] == 16 + _linear_cuda_smem(*names[t], d), r
        assert r["smem"] <= cr.smem_limit("sm_80")


# ------------------------------------------------------------- KV-cache decoding

def test_kvcache_launch_args_are_the_launchers_own(monkeypatch):
    """Every KV-cache config's arguments, from kvcache_forward run on meta
    tensors, pass the argument check, with tile_config's tiles and warps and
    the dtype's dot precision. No compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("_tfk_kvcache_compilable", cr.ROOT / cr.KVCACHE_SOURCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    options = set(make_backend(GPUTarget("cuda", 90, 32)).parse_options({}).__dict__)
    configs = cr.kvcache_configs(["90"])
    assert len(configs) == len(cr.KVCACHE_KERNELS) * 3 * len(cr.KVCACHE_HEAD_DIMS) * len(cr.KVCACHE_CALLS)
    for cfg in configs:
        values, meta = cr._launch_args(mod, cfg)
        params = {p.name: p.is_constexpr for p in getattr(mod, cfg["kernel"]).params}
        cr.check_kernel_arguments(cfg["kernel"], params, values, meta, options)
        if cfg["kernel"] == "_kvcache_split":
            _, _, G, Lq = cfg["opts"]["call"][1:]
            dtype = getattr(torch, cr._TORCH_DTYPES[cfg["dtype"]])
            block_m, block_n, warps, stages = mod.tile_config(G * Lq, cfg["opts"]["D"], dtype)
            assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"]) == (block_m, block_n, warps), cfg
            assert meta["PRECISION"] == cfg["precision"], cfg


@pytest.mark.parametrize("matrix", ["quick", pytest.param("default", marks=pytest.mark.slow)])
def test_kvcache_matrix_compiles_without_spills_for_sm80_sm90(matrix):
    """The split-KV decode kernels compile for both archs, with no spill and
    shared memory within the arch's limit: the quick config (the default
    tier: 4 compiles) or the report's whole matrix (the long tier)."""
    quick = matrix == "quick"
    rows = cr.triton_rows(ARCHS, quick=quick, keep_going=True, families=["kvcache"])
    assert len(rows) == len(cr.kvcache_configs(ARCHS, quick=quick))
    errors = [f"{r['kernel']} [{r['config']}] [{r['arch']}]: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    assert {r["kernel"] for r in rows} == set(cr.KVCACHE_KERNELS)
    assert all(r["source"] == cr.KVCACHE_SOURCE and r["registers"] > 0 for r in rows)
    assert cr.problems(rows) == [], "\n" + cr.format_table(rows)
