"""bench.distributed_moe end to end at the smallest sizes: 2 gloo ranks, one
timed step each, its table rows and its byte counts."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo: bench/

from bench import distributed_moe  # noqa: E402


def test_bench_main_two_ranks(capsys):
    T, H, k = 8, 16, 2
    rows = distributed_moe.main(["--world-sizes", "2", "--tokens", str(T), "--hidden", str(H), "--intermediate", "16",
                                 "--experts", "4", "--top-k", str(k), "--reps", "1", "--warmup", "0",
                                 "--timeout", "60"])
    printed = capsys.readouterr().out
    assert [(r["P"], r["impl"]) for r in rows] == [(2, "all_to_all"), (2, "all_gather")]
    for r in rows:
        assert r["ms"] > 0
        assert r["diff"] < 1e-5, "the two implementations compute the same outputs"
    a2a, ag = rows
    assert ag["x_all_gather"] == 1.0
    # all_gather: x (fp32), ids (int64) and weights (fp32) to the one peer; partial outputs; dout, dx, dweights
    assert ag["bytes"] == T * (H * 4 + k * 8 + k * 4) + T * H * 4 + 2 * T * H * 4 + T * k * 4
    # all_to_all: counts, then at most every (token, slot) row each way, forward and backward, plus its id
    assert 8 < a2a["bytes"] <= 8 + T * k * 8 + 2 * (2 * T * k) * H * 4
    assert (a2a["bytes"] - 8) % 8 == 0
    for r in rows:
        assert any(line.split()[:2] == ["2", r["impl"]] for line in printed.splitlines()), printed
    assert "ms / step" in printed and "MiB sent / rank" in printed
