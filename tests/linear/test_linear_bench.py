"""bench.linear runs end to end on tiny lengths: rows, skips and the summary;
the main report's linear rows check against the reference."""
import torch

from bench import linear as bench_linear


def test_bench_linear_smoke(capsys):
    rows = bench_linear.main(["--lengths", "64", "512", "--reps", "1", "--no-memory", "--quadratic-max", "64",
                              "--sdpa-max-noncausal", "64"])
    assert len(rows) == 2 * 2 * 2            # causal and not, 2 lengths, fwd and fwd+bwd
    assert all(isinstance(r["linear_s"], float) for r in rows)
    text = capsys.readouterr().out
    assert "skipped: L > 64" in text and "crossover" in text and "linear time at 8x tokens: 64->512" in text


def test_report_rows_check_against_the_reference(monkeypatch):
    """The main report's linear rows pass on the torch backend, and a planted
    bug (phi(q) 1% too large) fails the unnormalised row."""
    from bench import report_linear
    from tfk.ops.linear import torch_backend
    cpu = torch.device("cpu")
    rows = report_linear.check_all(report_linear.OPS, cpu, [torch.float32], time_it=False)
    assert [r["op"] for r in rows] == [o.name for o in report_linear.OPS]
    assert all(r["ok"] and r["backend"] == "torch" for r in rows), rows
    real = torch_backend.feature_map
    monkeypatch.setattr(torch_backend, "feature_map",
                        lambda x, name, dim, keep=None: real(x, name, dim, keep) * (1.01 if dim == -1 else 1.0))
    planted = report_linear.check_all(report_linear.OPS, cpu, [torch.float32], time_it=False)
    assert not {r["op"]: r["ok"] for r in planted}["linear_noncausal_identity"]
