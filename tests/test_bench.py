"""Smoke tests of bench/: the registry, the runner and the report (fast:
tiny shapes, no FlexAttention compile)."""
import functools
import math

import pytest
import torch

import tfk
from tfk import patterns as P
from bench import registry, report, run


def test_acceptance_shape_is_registered_exactly():
    s = registry.get_shape("sliding_window_8k")
    assert (s.B, s.H, s.Hkv, s.Lq, s.Lk, s.D) == (1, 8, 8, 8192, 8192, 64)
    assert s.dtype == "fp32" and s.torch_dtype == torch.float32
    assert s.in_tier("cpu") and s.backward and not s.causal
    p = s.make_pattern()
    assert p == P.sliding_window(256, 0)
    assert (p.left, p.right, p.dilation) == (256, 0, 1)


def test_registry_tiers_and_anchor_shapes():
    cpu = registry.shapes_for("cpu")
    assert len(cpu) >= 6 and all(s.dtype == "fp32" for s in cpu)
    gpu = {(s.B, s.H, s.Lq, s.D, s.causal, s.dtype) for s in registry.shapes_for("gpu")}
    assert (1, 16, 16384, 128, False, "fp16") in gpu and (1, 16, 16384, 128, True, "bf16") in gpu
    for L in (1024, 2048, 4096, 8192, 16384):
        assert (4, 32, L, 64, True, "fp16") in gpu and (4, 32, L, 64, False, "fp16") in gpu
    natten = [s for s in registry.shapes_for("gpu") if s.Lq == 32768]
    assert natten and all(s.make_pattern().left + s.make_pattern().right + 1 == 2048 for s in natten)
    for s in registry.REGISTRY.values():  # every factory builds a pattern that applies to the shape
        p = s.make_pattern()
        if p is not None:
            p.check_lengths(s.Lq, s.Lk)


def test_registry_inputs_are_deterministic():
    s = registry.Shape("tiny", B=1, H=2, Hkv=1, Lq=5, Lk=7, D=4)
    a, b = s.make_inputs(), s.make_inputs()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (1, 2, 5, 4) and a[1].shape == (1, 1, 7, 4)


def test_run_shapes_tfk_matches_sdpa():
    shape = registry.Shape("tiny_window_gqa", B=1, H=4, Hkv=2, Lq=197, Lk=197, D=40,
                           pattern=functools.partial(P.sliding_window, 48, 3))
    rows = run.run_shapes([shape], ("tfk", "sdpa"), repeat=1, isolate=False, log=None)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"tfk", "sdpa"}
    for r in rows:
        assert r.get("error") is None, r.get("error")
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        assert r["tile_density"] > 0 and 0 < r["pair_density"] < 1
    assert by["tfk"]["backend"] == "torch"
    assert by["tfk"]["out_diff"] < 1e-5 and by["tfk"]["grad_diff"] < 1e-5
    assert not by["tfk"]["mismatch"]
    assert by["sdpa"]["ratio_fwdbwd"] == pytest.approx(1.0)
    assert by["tfk"]["ratio_fwd"] == pytest.approx(by["sdpa"]["fwd_ms"] / by["tfk"]["fwd_ms"])
    assert "|dout|" in run.format_table(rows)


def test_run_compare_flags_a_wrong_answer():
    rows = {"tfk": {}, "sdpa": {}}
    good = {"out": torch.ones(2, 3), "grads": (torch.ones(2), torch.ones(2), torch.ones(2))}
    bad = {"out": torch.ones(2, 3) + 1e-2, "grads": good["grads"]}
    run._compare(rows, {"tfk": bad, "sdpa": good}, torch.float32)
    assert rows["tfk"]["mismatch"] and rows["tfk"]["out_diff"] == pytest.approx(1e-2)
    assert not rows["sdpa"]["mismatch"]


def test_pair_density():
    assert run.pair_density(None, 10, 10) == 1.0
    assert run.pair_density(P.causal(), 64, 64) == pytest.approx(64 * 65 / 2 / 64**2)
    p = P.sliding_window(5, 2, dilation=2)
    assert run.pair_density(p, 100, 90, rows=7) == pytest.approx(p.dense_mask(100, 90).float().mean().item())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_run_gpu_mode_without_gpu_runs_the_compile_report(capsys, monkeypatch):
    from bench import compile_report
    calls = []
    monkeypatch.setattr(compile_report, "main", lambda argv: calls.append(argv) or 0)
    assert run.main(["--mode", "gpu"]) == 0
    out = capsys.readouterr().out
    assert "no GPU" in out and "bench.compile_report" in out
    assert calls == [[]], "the compile report ran in place of the GPU timings"


TINY = report.Op("tiny_union_dropout", "attention", 1, 2, 1, 67, 131, 40,
                 pattern=lambda: P.sliding_window(16, 8) | P.global_tokens(2), dropout_p=0.2)


def test_report_check_op_within_tolerance():
    row = report.check_op(TINY, "cpu", torch.float32, repeat=1)
    errs = [row[k] for k in ("err_out", "err_dq", "err_dk", "err_dv")]
    assert all(math.isfinite(e) for e in errs)
    assert max(errs) <= row["tol"] == report.TOL_FP32
    assert row["ok"] and row["backend"] in tfk.backend_names()
    assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0
    assert "FAIL" not in report.format_rows([row])


def test_report_sdpa_mask_op_within_tolerance():
    op = report.Op("tiny_bool_mask", "sdpa", 2, 2, 2, 33, 45, 40, mask="bool")
    row = report.check_op(op, "cpu", torch.float32, time_it=False)
    assert row["ok"], row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_report_cuda_sim_rows(dtype):
    """The report's second table: the CUDA kernels on the CPU, fp16 and bf16."""
    op = report.Op("tiny_gqa_window", "attention", 1, 4, 2, 70, 97, 40, pattern=lambda: P.sliding_window(20))
    row = report.check_op(op, "cpu", dtype, backend="cuda-sim", time_it=False)
    assert row["ok"] and row["backend"] == "cuda-sim", row


def test_report_check_op_catches_a_wrong_output(monkeypatch):
    right = tfk.attention
    monkeypatch.setattr(tfk, "attention", lambda *a, **kw: right(*a, **kw) * 1.001)
    row = report.check_op(TINY, "cpu", torch.float32, time_it=False)
    assert not row["ok"] and row["err_out"] > report.TOL_FP32


def test_overhead_table_times_both_and_agrees():
    from bench import overhead
    row = overhead.measure(overhead.CASES[0], calls=2)
    assert row["backend"] == "sdpa" and row["max_diff"] == 0.0
    assert row["torch_us"] > 0 and row["tfk_us"] > 0
    assert row["ratio"] == pytest.approx(row["tfk_us"] / row["torch_us"])
    assert "decode_gqa_mask" in overhead.format_table([row])


@pytest.mark.parametrize("backend", ["triton", "cuda-sim"])
def test_overhead_host_table_counts_launches_apart(backend):
    """The host-side table runs a kernel backend's whole path with each kernel
    launch only counted: one forward launch per plain or causal call, and the
    stubs gone afterwards."""
    from bench import overhead
    from tfk.ops.attention import cuda_backend, triton_backend
    saved = triton_backend._INTERPRET, cuda_backend._ops, triton_backend._kernels()._attn_fwd
    rows = [overhead.measure_host(case, backend, calls=2) for case in overhead.HOST_CASES]
    for row in rows:
        assert row["backend"] == backend and row["launches"] == 1, row
        assert row["call_us"] > 0 and row["op_us"] > 0 and row["body_us"] > 0
    assert (triton_backend._INTERPRET, cuda_backend._ops, triton_backend._kernels()._attn_fwd) == saved
    assert "small_causal" in overhead.format_host_table(rows)


def test_generate_bench_same_tokens():
    """bench.generate's three ways decode the same tokens, a padded batch
    included, in its step loops and in model.generate."""
    from bench import generate
    rows = generate.measure(tokens=3, rounds=1, batch=2, layers=1)
    assert [r["way"] for r in rows] == list(generate.WAYS)
    for r in rows:
        assert r["same_tokens"] and r["same_generate"] and r["ms"] > 0, r
    assert "patch_torch" in generate.format_table(rows)


def test_score_mods_bench_runs_every_kind(monkeypatch, capsys):
    """bench.score_mods end to end on tiny shapes of every kind: each
    implementation runs (flex off: its compile takes minutes here), tfk's
    tiles are counted and the T5 memory line is measured."""
    from bench import score_mods as sm
    tiny = {
        "alibi_8k": sm.Shape("alibi_8k", 128, 128, 2, 16, "alibi"),
        "t5_4096": sm.Shape("t5_4096", 96, 96, 2, 16, "t5"),
        "span_4096": sm.Shape("span_4096", 128, 128, 2, 16, "span"),
        "xl_2k_mem2k": sm.Shape("xl_2k_mem2k", 64, 128, 2, 16, "xl"),
        "nbhd_128": sm.Shape("nbhd_128", 256, 256, 2, 16, "grid", (16, 16), "neighborhood"),
        "axial_128": sm.Shape("axial_128", 256, 256, 2, 16, "grid", (16, 16), "axial"),
    }
    monkeypatch.setattr(sm, "SHAPES", tiny)
    rows = sm.main(["--shapes", *tiny, "--reps", "1", "--no-flex", "--threads", "1"])
    out = capsys.readouterr().out
    assert {r["shape"] for r in rows} == set(tiny) and len(rows) == 2 * len(tiny)
    for r in rows:
        assert isinstance(r["tfk_s"], float) and isinstance(r["sdpa_s"], float), r
        assert 0 < r["tiles"] <= r["dense_tiles"]
    assert "peak MiB of live tensors, t5_4096" in out
    assert "target: 7x7 neighbourhood on 128x128" in out


def test_score_mods_bench_peers_compute_the_same_function():
    """What bench.score_mods times as SDPA's equivalent (a dense float mask;
    Transformer-XL's term computed densely and shifted) gives tfk's output:
    the bench compares like with like."""
    import argparse

    from bench import score_mods as sm
    args = argparse.Namespace(sdpa_max_scores=1 << 30, no_flex=True)
    for s in (sm.Shape("a", 100, 100, 2, 16, "alibi"), sm.Shape("t", 96, 96, 2, 16, "t5"),
              sm.Shape("s", 128, 128, 2, 16, "span"), sm.Shape("x", 64, 128, 2, 16, "xl"),
              sm.Shape("n", 169, 169, 2, 16, "grid", (13, 13), "neighborhood"),
              sm.Shape("ax", 169, 169, 2, 16, "grid", (13, 13), "axial")):
        q, k, v, _ = sm.make_inputs(s)
        with torch.no_grad():
            got = sm.impl_fn("tfk", s, args)(q, k, v)
            want = sm.impl_fn("sdpa", s, args)(q, k, v)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m: f"{s.name}: {m}")
