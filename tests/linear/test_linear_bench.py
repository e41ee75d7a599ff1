"""bench.linear runs end to end on tiny lengths: rows, skips and the summary;
the main report's linear rows check against the reference."""
import torch

from bench import linear as bench_linear
from helpers import CountingTimer


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


def test_gpu_flops_by_hand():
    s = bench_linear.GPU_SHAPES["c_L16384_d64"]
    assert (s.B, s.H, s.Hkv, s.L, s.D, s.Dv, s.causal) == (4, 16, 16, 16384, 64, 64, True)
    # 2*B*(Hkv + H)*L*D*(Dv + 1) = 2*4*32*16384*64*65
    assert bench_linear.gpu_flops(s, "tfk", "fwd") == 17_448_304_640
    assert bench_linear.gpu_flops(s, "tfk", "fwd+bwd") == 3 * 17_448_304_640
    # SDPA causal: 4*B*H*L^2*D / 2 = 2*4*16*16384^2*64
    assert bench_linear.gpu_flops(s, "sdpa", "fwd") == 2_199_023_255_552
    assert bench_linear.gpu_flops(s, "sdpa", "fwd+bwd") == 2_199_023_255_552 * 7 // 2
    assert all(sh.B * sh.L == 65536 for sh in bench_linear.GPU_SHAPES.values() if not sh.state)


def test_run_gpu_on_cpu_with_a_counting_timer():
    """The GPU mode's loop on CPU tensors: every (implementation, mode) row,
    the backend "auto" chose, rows that say why an implementation cannot run,
    the ratios, and the table."""
    tiny = [bench_linear.GPUShape("tiny_c", 1, 4, 2, 40, 8, 8, True),
            bench_linear.GPUShape("tiny_nc", 1, 2, 2, 33, 8, 4, False),
            bench_linear.GPUShape("tiny_decode", 2, 4, 2, 1, 8, 8, True, state=True, modes=("fwd",))]
    timer, logged = CountingTimer(), []
    impls = ("tfk", "tfk_cuda", "sdpa")
    rows = bench_linear.run_gpu(tiny, ("fp32",), impls, device="cpu", timer=timer, log=logged.append)
    assert logged == rows
    assert [(r["shape"], r["impl"], r["mode"]) for r in rows] == [
        (s.name, i, m) for s in tiny for i in impls for m in s.modes]
    by = {(r["shape"], r["impl"], r["mode"]): r for r in rows}
    ok = [r for r in rows if not r.get("error")]
    assert timer.calls == len(ok)
    for s in tiny:
        r = by[(s.name, "tfk", s.modes[-1])]
        assert r.get("error") is None and r["backend"] == "torch", r
        assert r["ms"] == 2.0 and r["peak_mib"] == 5.0
        assert r["tflops"] == bench_linear.gpu_flops(s, "tfk", s.modes[-1]) / 2e-3 / 1e12
        assert by[(s.name, "tfk_cuda", s.modes[0])]["error"].startswith("n/a (BackendUnavailable")
    assert by[("tiny_c", "tfk", "fwd")]["x_sdpa"] == 1.0              # the same fake time as SDPA's
    assert by[("tiny_decode", "sdpa", "fwd")]["error"].startswith("n/a (ValueError: SDPA carries no state")
    lines = bench_linear.table.format_table(bench_linear.GPU_COLS,
                                            [bench_linear.gpu_cells(r) for r in rows]).splitlines()
    assert len(lines) == 2 + len(rows) and "tfk[torch]" in lines[2]


def test_gpu_steps_compute_linear_attention():
    """What the GPU mode times is the benchmarked formula: its tfk function
    (elu1, scale D^-0.5) equals the float64 reference, and its steps run."""
    s = bench_linear.GPUShape("tiny", 1, 2, 1, 24, 8, 8, True)
    q, k, v, dout, state = bench_linear.make_gpu_inputs(s, "cpu", torch.float32)
    fn, _ = bench_linear._impl("tfk", s, q, k, v, state)
    from tfk.ops.linear.reference import linear_attention_reference
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = linear_attention_reference(*leaves, causal=True, feature_map="elu1", scale=s.D ** -0.5)[0]
    torch.testing.assert_close(fn(q, k, v).double(), ref, rtol=1e-5, atol=1e-6)
    steps, chosen = bench_linear.build_gpu_steps("tfk", s, (q, k, v, dout, state))
    assert chosen == "torch" and set(steps) == {"fwd", "fwd+bwd"}
    steps["fwd+bwd"]()          # runs; the gradients live on its own leaves
