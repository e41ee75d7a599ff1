"""bench.kvcache runs end to end on tiny shapes (CPU mode, and the GPU mode's
loop on CPU tensors with a counting timer); what it times is the attention
it claims (tfk and the SDPA baseline agree)."""
import torch

from bench import kvcache as bench_kv
from helpers import CountingTimer


def test_bench_cpu_smoke(capsys):
    rows = bench_kv.main(["--batches", "1", "2", "--caches", "64", "4096", "--windows", "32", "0", "--heads", "4",
                          "2", "16", "--reps", "1"])
    assert [(r["B"], r["cache"], r["window"]) for r in rows] == [
        (B, L, w) for B in (1, 2) for L in (64, 4096) for w in (32, 0)]
    assert all(r["backend"] == "torch" and r["tfk_s"] > 0 and r["sdpa_s"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert "x sdpa" in text
    # the target line needs the 4k and 128k rows: none here
    assert "target" not in text


def test_summary_target_line():
    rows = [dict(B=1, cache=4096, window=0, tfk_s=1e-3), dict(B=1, cache=131072, window=4096, tfk_s=1.2e-3),
            dict(B=8, cache=4096, window=0, tfk_s=1e-3), dict(B=8, cache=131072, window=4096, tfk_s=2e-3)]
    lines = bench_kv.summarize(rows)
    assert "1.20x (target <= 1.5x: met)" in lines[0] and "2.00x (target <= 1.5x: NOT met)" in lines[1]


def test_bench_tfk_and_sdpa_compute_the_same_attention():
    """The SDPA baseline (G heads folded into rows, window as a bool mask over
    the full cache) and tfk's step give the same out."""
    q, kc, vc, seqlens = bench_kv.make_cache(2, 300, 4, 2, 16)
    for window in (0, 50):
        a = bench_kv.tfk_fn(q, kc, vc, seqlens, window)()
        b = bench_kv.sdpa_fn(q, kc, vc, window)()
        torch.testing.assert_close(a, b.view_as(a), rtol=1e-5, atol=1e-5)


def test_run_gpu_on_cpu_with_a_counting_timer():
    """The GPU mode's loop on CPU tensors: a row per implementation, the
    backend "auto" chose, a row saying why "cuda" cannot run here, GB/s from
    the bytes the window reads, and the table."""
    tiny = [bench_kv.GPUShape(B=1, cache=64, window=16, H=4, Hkv=2, D=16)]
    timer, logged = CountingTimer(), []
    rows = bench_kv.run_gpu(tiny, ("fp32",), ("tfk", "tfk_triton", "tfk_cuda", "sdpa"), device="cpu", timer=timer,
                            log=logged.append, hbm=1000.0)
    assert logged == rows and [r["impl"] for r in rows] == ["tfk", "tfk_triton", "tfk_cuda", "sdpa"]
    by = {r["impl"]: r for r in rows}
    assert by["tfk"]["backend"] == "torch" and by["tfk_triton"]["backend"] == "triton"
    assert by["tfk_cuda"]["error"].startswith("n/a (")
    # 1 x 2 key heads x 17 keys x (16 + 16) x 4 bytes in 2 ms
    assert by["tfk"]["gbs"] == 2 * 17 * 32 * 4 / 2e-3 / 1e9 and by["tfk"]["hbm_frac"] == by["tfk"]["gbs"] / 1000
    assert by["tfk"]["x_sdpa"] == 1.0 and timer.calls == 3
    lines = bench_kv.table.format_table(bench_kv.GPU_COLS, [bench_kv.gpu_cells(r) for r in rows]).splitlines()
    assert len(lines) == 2 + len(rows) and "tfk[torch]" in lines[2]
