"""bench.moe's GPU mode driven on the CPU (a counting timer, CPU tensors), its
flops arithmetic against hand computations, and bench.table, the formatter
behind every bench table."""
import pytest
import torch

from bench import moe, table

TINY = moe.MoEShape("tiny", T=6, E=4, k=2, H=16, I=8)


class CountingTimer:
    """Stands in for CudaTimer: runs each step once, counts the calls and
    reports fixed figures (1 ms, 3 MiB)."""

    def __init__(self):
        self.calls = {"time": 0, "peak": 0}

    def time(self, fn):
        self.calls["time"] += 1
        fn()
        return 1e-3

    def peak_bytes(self, fn):
        self.calls["peak"] += 1
        fn()
        return 3 * 2 ** 20


def test_expert_flops_by_hand():
    # Mixtral, T=4096, k=2: M = 8192 rows; gate_up 2*8192*4096*28672, down 2*8192*14336*4096
    s = moe.GPU_SHAPES["mixtral_T4096"]
    assert (s.E, s.k, s.H, s.I) == (8, 2, 4096, 14336)
    assert moe.expert_flops(s, "fwd") == 1_924_145_348_608 + 962_072_674_304 == 2_886_218_022_912
    assert moe.expert_flops(s, "fwd+bwd") == 3 * 2_886_218_022_912
    # DeepSeek-like, T=1: M = 6 rows: 2*6*2048*2816 + 2*6*1408*2048
    d = moe.GPU_SHAPES["deepseek_T1"]
    assert (d.E, d.k, d.H, d.I, d.modes) == (64, 6, 2048, 1408, ("fwd",))
    assert moe.expert_flops(d, "fwd") == 69_206_016 + 34_603_008
    assert moe.expert_flops(TINY, "fwd", rows=1) == 2 * 16 * 16 + 2 * 8 * 16


def test_gpu_shapes_cover_the_targets():
    names = set(moe.GPU_SHAPES)
    for T in (1, 16384):
        assert f"mixtral_T{T}" in names and f"deepseek_T{T}" in names
    assert not names & set(moe.SHAPES), "GPU shapes stay out of the CPU mode"


def test_run_gpu_on_cpu_with_a_counting_timer():
    timer, logged = CountingTimer(), []
    impls = ("tfk", "hf_eager", "torch_grouped_mm", "tfk_cuda")
    rows = moe.run_gpu([TINY], ("fp32", "bf16"), impls, device="cpu", timer=timer, log=logged.append)
    assert logged == rows
    # fp32: the tfk implementations only; bf16: every one
    got = [(r["dtype"], r["impl"], r["mode"]) for r in rows]
    want = [(dt, i, m) for dt in ("fp32", "bf16") for i in impls if dt == "bf16" or i.startswith("tfk")
            for m in TINY.modes]
    assert got == want
    ok = [r for r in rows if not r.get("error")]
    assert timer.calls == {"time": len(ok), "peak": len(ok)}
    by = {(r["dtype"], r["impl"], r["mode"]): r for r in rows}
    for dt in ("fp32", "bf16"):
        r = by[(dt, "tfk", "fwd+bwd")]
        assert r.get("error") is None and r["backend"] == "torch", r   # "auto" on CPU tensors
        assert r["ms"] == pytest.approx(1.0) and r["peak_mib"] == pytest.approx(3.0)
        assert r["tflops"] == pytest.approx(moe.expert_flops(TINY, "fwd+bwd") / 1e-3 / 1e12)
    assert by[("bf16", "tfk", "fwd")]["x_eager"] == pytest.approx(1.0)  # same fake time as hf_eager
    assert by[("fp32", "tfk", "fwd")]["x_eager"] is None                 # no hf_eager in fp32
    for r in rows:
        if r["impl"] in ("hf_eager", "tfk"):
            assert r.get("error") is None, r
    # the CUDA backend cannot take CPU tensors: a row that says why, not a crash
    assert by[("fp32", "tfk_cuda", "fwd")]["error"].startswith("n/a (")
    lines = table.format_table(moe.GPU_COLS, [moe.gpu_cells(r) for r in rows]).splitlines()
    assert len(lines) == 2 + len(rows) and "tfk[torch]" in lines[2]


def test_gpu_steps_compute_the_experts():
    """The steps run_gpu times do the work: the forward of torch_grouped_mm's
    rows equals tfk's output regrouped; fwd+bwd leaves no weight gradient behind."""
    inputs = moe.make_inputs(TINY, device="cpu", dtype=torch.float32)
    x, ids, w, w1, w2, _ = inputs
    fn, rows, params = moe._grouped_mm_impl(TINY, x, ids, w1, w2)
    import tfk
    per_slot = tfk.moe.experts(x.repeat_interleave(TINY.k, 0), ids.reshape(-1, 1), torch.ones(TINY.T * TINY.k, 1),
                               w1, w2, backend="reference")
    order = ids.flatten().argsort(stable=True)
    torch.testing.assert_close(fn(rows), per_slot[order].to(rows.dtype), atol=1e-5, rtol=1e-5)
    steps, _ = moe.build_steps("torch_grouped_mm", TINY, inputs)
    steps["fwd+bwd"]()
    assert all(p.grad is None for p in params)


def test_table_format():
    cols = [table.Col("name", "<"), table.Col("ms"), table.Col("note", "<", 6)]
    out = table.format_table(cols, [["a", "1.5", "x"], None, ["long name", "12.25", ""], ["bad", "ERROR: boom boom"]])
    assert out.splitlines() == [
        "name          ms  note",
        "---------  -----  ------",
        "a            1.5  x",
        "",
        "long name  12.25",
        "bad        ERROR: boom boom",
    ]
    assert table.format_table(cols, [["a", "1.5", "x"]], header=False) == "a     1.5  x"  # widths from this row
    assert table.fmt(None, ".1f") == "-" and table.fmt(2.25, ".1f") == "2.2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_moe_main_refuses_cuda_without_a_gpu():
    with pytest.raises(SystemExit):
        moe.main(["--device", "cuda"])


# the torch backend's modes, as tests/moe/moe_cases.py: (LOOP_COST_FLOPS, GROUPED_MM, ROWS_KERNEL_MAX_ROWS)
MODES = {"loop": (-1.0, True, 0), "grouped": (1e30, True, 0), "padded": (1e30, False, 0), "rows": (1e30, True, 1e9)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_gemm_bound_runs_the_expert_gemms(dtype, mode, monkeypatch):
    """tfk_gemms (the CPU table's GEMM bound) computes both expert products of
    every routed row (gathered by expert), in each of the torch backend's
    modes, against a float64 loop: the gate_up product, or, from tfk._cpu's
    kernel ("rows"), the weighted rows it ends with."""
    from tfk.ops.moe import torch_backend as tb
    for name, value in zip(("LOOP_COST_FLOPS", "GROUPED_MM", "ROWS_KERNEL_MAX_ROWS"), MODES[mode]):
        monkeypatch.setattr(tb, name, value)
    x, ids, w, w1, w2, _ = moe.make_inputs(TINY, dtype=dtype)
    fn, params = moe.make_impl("tfk_gemms", TINY, w1, w2)
    assert params == []
    out = fn(None, None, None)
    order, offsets, _, counts = tb.permute(ids, TINY.E)
    expert = torch.repeat_interleave(torch.arange(TINY.E), torch.tensor(counts))
    rows = x.index_select(0, order // TINY.k).double()
    want_h = torch.stack([rows[r] @ w1[e].double().t() for r, e in enumerate(expert.tolist())])
    if mode == "rows":
        assert isinstance(out, tuple) and len(out) == 1
        act = torch.nn.functional.silu(want_h[:, :TINY.I]) * want_h[:, TINY.I:]
        want = torch.stack([act[r] @ w2[e].double().t() for r, e in enumerate(expert.tolist())])
        want *= w.reshape(-1)[order].double()[:, None]
        torch.testing.assert_close(out[0].double(), want, rtol=2e-2, atol=2e-2)
        return
    got_h = out[0] if isinstance(out, tuple) else torch.cat([h for h, _ in out])
    assert got_h.shape == want_h.shape == (TINY.T * TINY.k, 2 * TINY.I)
    torch.testing.assert_close(got_h.double(), want_h, rtol=2e-2, atol=2e-2)
    assert (out[1] if isinstance(out, tuple) else torch.cat([y for _, y in out])).shape == (TINY.T * TINY.k, TINY.H)
