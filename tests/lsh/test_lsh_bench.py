"""bench.lsh runs end to end on tiny lengths (rows, skips, the summary); the
main report's LSH rows check against the float64 reference."""
import importlib.util

import pytest
import torch

from bench import lsh as bench_lsh
from bench import peak
from helpers import CountingTimer

requires_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                 reason="transformers is not installed")


@requires_hf
def test_bench_lsh_smoke(capsys):
    rows = bench_lsh.main(["--lengths", "128", "512", "--n-hashes", "1", "2", "--reps", "1", "--no-memory",
                           "--sdpa-max", "128"])
    assert [(r["L"], r["n_hashes"], r["mode"]) for r in rows] == [
        (L, n, m) for L in (128, 512) for n in (1, 2) for m in ("fwd", "fwd+bwd")]
    assert all(isinstance(r["tfk_s"], float) and isinstance(r["hf_s"], float) for r in rows)
    by = {(r["L"], r["n_hashes"], r["mode"]): r for r in rows}
    assert isinstance(by[(128, 1, "fwd")]["sdpa_s"], float)
    assert by[(128, 2, "fwd")]["sdpa_s"].startswith("same")
    assert by[(512, 1, "fwd")]["sdpa_s"].startswith("skipped: L > 128")
    text = capsys.readouterr().out
    assert "tfk fwd+bwd time at 4x tokens: 128->512" in text and "note: skipped: L > 128" in text


@requires_hf
def test_bench_hf_and_tfk_compute_the_same_attention():
    """What the bench times is one function: tfk's and HF's steps (same
    rotations via hash_seed) give the same out and gradients; SDPA runs."""
    L, n = 256, 2
    qk, v, dout = bench_lsh.make_inputs(L)
    outs = {}
    for name in ("tfk", "hf"):
        fn = bench_lsh.impl_fn(name, L, n)
        leaves = [t.detach().requires_grad_() for t in (qk, v)]
        out = fn(*leaves)
        out.backward(dout)
        outs[name] = (out.detach(), leaves[0].grad, leaves[1].grad)
    for a, b in zip(outs["tfk"], outs["hf"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    peak.cpu_step(bench_lsh.impl_fn("sdpa", L, n), (qk, v), dout, "fwd+bwd")


def test_report_rows_check_against_the_reference(monkeypatch):
    """The main report's LSH rows pass on the torch backend, and a planted bug
    (keys 1% too long after the length normalisation) fails them."""
    from bench import report_lsh
    from tfk.ops.lsh import torch_backend
    cpu = torch.device("cpu")
    rows = report_lsh.check_all(report_lsh.OPS, cpu, [torch.float32], time_it=False)
    assert [r["op"] for r in rows] == [o.name for o in report_lsh.OPS]
    assert all(r["ok"] and r["backend"] == "torch" for r in rows), rows
    real = torch_backend._rsqrt_ms
    monkeypatch.setattr(torch_backend, "_rsqrt_ms", lambda x: real(x) * 1.01)
    planted = report_lsh.check_all(report_lsh.OPS, cpu, [torch.float32], time_it=False)
    assert not any(r["ok"] for r in planted), planted


def test_report_runs_an_lsh_op(tmp_path, capsys):
    """bench.report's --only takes the LSH ops, and their section runs and checks."""
    import json

    from bench import report
    path = tmp_path / "report.json"
    assert report.main(["--only", "lsh_full_path_pad", "--repeat", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    # the CUDA kernels take it too (L <= chunk): its cuda-sim rows follow
    assert [(r["op"], r["backend"], r["ok"]) for r in rows] == [
        ("lsh_full_path_pad", "torch", True), ("lsh_full_path_pad", "cuda-sim", True),
        ("lsh_full_path_pad", "cuda-sim", True)]
    assert "LSH attention (tfk.lsh_attention)" in capsys.readouterr().out


def test_report_half_precision_rows():
    """The rows a GPU runs in fp16/bf16 check here on the CPU too (their
    tolerance baseline is the formula in float32: -1e5 overflows float16)."""
    from bench import report_lsh
    rows = report_lsh.check_all(report_lsh.OPS[-1:], torch.device("cpu"), [torch.float16, torch.bfloat16],
                                time_it=False)
    assert [r["dtype"] for r in rows] == ["float16", "bfloat16"]
    assert all(r["ok"] for r in rows), rows


def test_gpu_flops_by_hand():
    s = bench_lsh.GPU_SHAPES["L16384_n4"]
    # B=4, H=8: n·L = 65536 slots, each scoring 128 keys, 2·(64 + 64) flops a pair
    assert bench_lsh.gpu_flops(s, "tfk", "fwd") == 4 * 8 * 65536 * 128 * 256 == 68_719_476_736
    assert bench_lsh.gpu_flops(s, "hf", "fwd+bwd") == 68_719_476_736 * 7 // 2
    assert bench_lsh.gpu_flops(s, "sdpa", "fwd") == 4 * 4 * 8 * 16384 ** 2 * 64 // 2
    assert all(sh.B * sh.L == 65536 for sh in bench_lsh.GPU_SHAPES.values())


@requires_hf
def test_run_gpu_on_cpu_with_a_counting_timer():
    """The GPU mode's loop on CPU tensors: every (implementation, mode) row,
    the backend "auto" chose, a row that says why an implementation cannot
    run, the ratios, and the table."""
    tiny = [bench_lsh.GPUShape("tiny", 1, 2, 256, 16, 2)]
    timer, logged = CountingTimer(), []
    impls = ("tfk", "tfk_cuda", "hf", "sdpa")
    rows = bench_lsh.run_gpu(tiny, ("fp32",), impls, device="cpu", timer=timer, log=logged.append)
    assert logged == rows
    assert [(r["impl"], r["mode"]) for r in rows] == [(i, m) for i in impls for m in ("fwd", "fwd+bwd")]
    by = {(r["impl"], r["mode"]): r for r in rows}
    assert timer.calls == len([r for r in rows if not r.get("error")]) == 6
    r = by[("tfk", "fwd+bwd")]
    assert r.get("error") is None and r["backend"] == "torch", r
    assert r["ms"] == 2.0 and r["peak_mib"] == 5.0 and r["x_hf"] == r["x_sdpa"] == 1.0
    assert r["tflops"] == bench_lsh.gpu_flops(tiny[0], "tfk", "fwd+bwd") / 2e-3 / 1e12
    assert by[("tfk_cuda", "fwd")]["error"].startswith("n/a (BackendUnavailable")
    lines = bench_lsh.table.format_table(bench_lsh.GPU_COLS, [bench_lsh.gpu_cells(r) for r in rows]).splitlines()
    assert len(lines) == 2 + len(rows) and "tfk[torch]" in lines[2]


@requires_hf
def test_gpu_steps_compute_the_same_attention():
    """The GPU mode's tfk and HF functions agree (same rotations)."""
    s = bench_lsh.GPUShape("tiny", 1, 2, 256, 16, 2)
    qk, v = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    a = bench_lsh._gpu_impl("tfk", s, "cpu")(qk, v)
    b = bench_lsh._gpu_impl("hf", s, "cpu")(qk, v)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
