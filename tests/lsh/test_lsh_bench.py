"""bench.lsh runs end to end on tiny lengths (rows, skips, the summary); the
main report's LSH rows check against the float64 reference."""
import importlib.util

import pytest
import torch

from bench import lsh as bench_lsh
from bench import peak

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
    assert [(r["op"], r["ok"]) for r in rows] == [("lsh_full_path_pad", True)]
    assert "LSH attention (tfk.lsh_attention)" in capsys.readouterr().out


def test_report_half_precision_rows():
    """The rows a GPU runs in fp16/bf16 check here on the CPU too (their
    tolerance baseline is the formula in float32: -1e5 overflows float16)."""
    from bench import report_lsh
    rows = report_lsh.check_all(report_lsh.OPS[-1:], torch.device("cpu"), [torch.float16, torch.bfloat16],
                                time_it=False)
    assert [r["dtype"] for r in rows] == ["float16", "bfloat16"]
    assert all(r["ok"] for r in rows), rows
