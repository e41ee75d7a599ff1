"""tfk.distributed.context_parallel_attention on 2 and 4 gloo processes.

One spawn per world size runs every case (spawning costs ~10-20 s here); each
test then checks its own case: every rank's shard of out, lse and every
gradient against the float64 oracle of the whole problem, within the
tolerance of the same computation in one process (cp_cases.py).
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import cp_cases  # noqa: E402

import tfk  # noqa: E402
from tfk import patterns as P  # noqa: E402
from tfk.distributed import context_parallel_attention, shard, spawn, unshard  # noqa: E402

TIMEOUT = {2: 150, 4: 240}   # ~25 s and ~45 s here


@pytest.fixture(scope="module")
def results():
    """results(world): every rank's results, from one spawn per world size (a
    spawn that fails fails every test of that size, without spawning again)."""
    got = {}

    def of(world):
        if world not in got:
            try:
                got[world] = spawn(cp_cases.run_cases, world, cp_cases.cases_for(world), timeout=TIMEOUT[world])
            except Exception as e:  # noqa: BLE001
                got[world] = e
        if isinstance(got[world], Exception):
            raise got[world]
        return got[world]
    return of


def _check(per_rank, case):
    name = cp_cases.case_id(case)
    for rank, res in enumerate(per_rank):
        r = res[name]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        bad = {k: v for k, v in r["errors"].items() if not (v[0] <= v[1] and not v[2])}
        assert r["ok"] and not bad, f"rank {rank}: (err, bound, nan) {bad}"


@pytest.mark.parametrize("case", cp_cases.cases_for(2), ids=cp_cases.case_id)
def test_two_ranks(results, case):
    _check(results(2), case)


@pytest.mark.parametrize("case", cp_cases.cases_for(4), ids=cp_cases.case_id)
def test_four_ranks(results, case):
    _check(results(4), case)


def test_sliding_window_talks_to_its_neighbour_only(results):
    """Contiguous shards of 32 under a window of 8 on 4 ranks: in the forward
    each rank but the last sends its last 8 key/value rows to the next rank,
    and nothing else; 2 of the 3 ring steps carry nothing for every rank."""
    case = next(c for c in cp_cases.cases_for(4) if c["layout"] == "contiguous" and c["pattern"] == "window")
    per_rank = [res[cp_cases.case_id(case)] for res in results(4)]
    B, Hkv, D, Dv, fp32 = 2, 4, 16, 16, 4
    for rank, r in enumerate(per_rank):
        c = r["counts"]
        assert c["ring_steps"] == 3 and c["skipped_steps"] == 2, (rank, c)
        assert c["forward_bytes"] == (8 * B * Hkv * (D + Dv) * fp32 if rank < 3 else 0), (rank, c)
        # backward: the same rows again to the next rank, and the previous rank's rows' gradients (fp32) home
        rows = 8 * B * Hkv * (D + Dv)
        assert c["backward_bytes"] == (rows * fp32 if rank < 3 else 0) + (rows * 4 if rank > 0 else 0), (rank, c)


def _world_one(fn):
    """Runs fn in this process within a one-rank gloo group."""
    from tfk.distributed import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        return fn()
    finally:
        dist.destroy_process_group()


def test_one_rank_equals_attention():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 24, 8, requires_grad=True) for _ in range(3))

    def run():
        out = context_parallel_attention(q, k, v, P.causal())
        assert torch.equal(unshard(shard(q)), q.detach())
        return out
    out = _world_one(run)
    ref = tfk.attention(q.double(), k.double(), v.double(), P.causal(), backend="reference")
    assert (out - ref).abs().max() < 1e-6


def test_errors():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(RuntimeError, match="not initialised"):
        context_parallel_attention(q, q, q)

    def bad_calls():
        with pytest.raises(ValueError, match="method must be one of"):
            context_parallel_attention(q, q, q, method="tree")
        with pytest.raises(ValueError, match="layout must be one of"):
            context_parallel_attention(q, q, q, layout="striped")
        with pytest.raises(ValueError, match="must be even"):
            context_parallel_attention(q[:, :, :15], q[:, :, :15], q[:, :, :15])
        with pytest.raises(ValueError, match="Lq == Lk"):
            context_parallel_attention(q, q[:, :, :8], q[:, :, :8])
        with pytest.raises(ValueError, match="query must be 4-D"):
            context_parallel_attention(q[0], q, q)
        with pytest.raises(ValueError, match="attn_mask must be 4-D"):
            context_parallel_attention(q, q, q, attn_mask=torch.ones(16, 16, dtype=torch.bool))
        with pytest.raises(tfk.BackendUnavailable, match="no block functions"):
            context_parallel_attention(q, q, q, backend="reference")
        with pytest.raises(ValueError, match="dim 2 of x has 15 positions"):
            shard(torch.randn(1, 1, 15, 4), layout="zigzag")
    _world_one(bad_calls)
