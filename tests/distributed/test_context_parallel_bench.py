"""bench.context_parallel and the report's multi-device section end to end at
small sizes, on 2 gloo ranks."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo: bench/

from bench import context_parallel, report_distributed  # noqa: E402


def test_bench_main_two_ranks(capsys):
    B, H, D, L, w = 1, 2, 8, 512, 8
    rows = context_parallel.main(["--world-sizes", "2", "--cases", f"window{w}:{L}", "causal:64", "--heads", str(H),
                                  "--kv-heads", str(H), "--dim", str(D), "--reps", "1", "--warmup", "0",
                                  "--timeout", "120"])
    printed = capsys.readouterr().out
    got = {(r["case"], r["layout"], r["impl"]) for r in rows}
    assert got == {(c, lo, i) for c in (f"window{w}:{L}", "causal:64") for lo in ("zigzag", "contiguous")
                   for i in ("ring", "ulysses", "all_gather")}
    row = B * H * 2 * D * 4          # the bytes of one key+value row, fp32
    for r in rows:
        assert r["ms"] > 0
        if r["impl"] == "all_gather":   # the shard to the other rank, its gradient back
            n = int(r["case"].split(":")[1]) // 2
            assert r["bytes"] == 2 * n * row and r["x_all_gather"] == 1.0
    n = L // 2
    ring = next(r for r in rows if r["case"] == f"window{w}:{L}" and r["layout"] == "contiguous"
                and r["impl"] == "ring")
    # rank 0 sends its last w rows to rank 1 and them again in the backward; rank 1 sends their gradients (fp32)
    assert ring["bytes"] == 2 * w * row and ring["skipped"] == 0.0
    assert ring["bytes_ratio"] == 2 * w * row / (2 * n * row)
    causal = next(r for r in rows if r["case"] == "causal:64" and r["layout"] == "zigzag" and r["impl"] == "ring")
    assert causal["tiles"] == 1.0, "zigzag shards hold the same causal work"
    assert "bytes / all_gather" in printed and "skipped" in printed


def test_report_section_rows():
    rows = report_distributed.check_all(report_distributed.OPS, torch.device("cpu"), [torch.float32], repeat=1)
    assert [r["op"] for r in rows] == [o.name for o in report_distributed.OPS]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["ok"] and r["err_out"] <= r["tol"] and r["err_grads"] <= r["tol"], r
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
