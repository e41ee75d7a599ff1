"""Expert parallelism: tfk.moe.experts(..., group=...) and tfk.moe.MoE(...,
group=...) on 2 and 4 gloo ranks against the single-process op on the
gathered inputs.

Spawning ranks is slow (importing torch), so each world size spawns once
(a module-scoped fixture): every case runs inside the ranks, which measure
their errors and return them; the tests below assert per case. Each rank
builds the same global inputs from a fixed seed, takes its tokens (rank
order) and its experts (rank order), and computes the oracle itself: the
float64 reference on the gathered inputs, and the single-process
``tfk.moe.experts`` on them in the tested dtype (the "same computation in one
process" baseline). A result passes when

    err(expert parallel vs float64) <= FACTOR * err(single process vs float64) + FLOOR

(tests/tolerances.py; out takes the output floor, the gradients dq's).
"""
import math
import os
import sys

import pytest
import torch

import tfk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moe"))
from moe_cases import GRADS, make_experts_inputs  # noqa: E402
from tfk.distributed import spawn  # noqa: E402
from tfk.ops.moe.reference import experts_reference, kept_assignments  # noqa: E402
from tolerances import FACTOR, FLOOR, max_err  # noqa: E402

F32, F16 = torch.float32, torch.float16

# name: (tokens per rank, E, k, H, I, activation, capacity, ids kind, dtype)
CASES = {
    2: {
        "fp32_k2_uneven": ([13, 7], 8, 2, 16, 24, "silu", None, "topk", F32),
        "fp16_k2": ([11, 9], 8, 2, 16, 24, "silu", None, "topk", F16),
        "fp32_k1_rank0_no_tokens": ([0, 17], 8, 1, 16, 8, "silu", None, "topk", F32),
        "fp32_capacity3_k2": ([20, 9], 8, 2, 16, 24, "silu", 3, "topk", F32),
        "fp16_capacity4_k3_gelu": ([9, 14], 8, 3, 16, 8, "gelu", 4, "topk", F16),
        "fp32_empty_experts": ([10, 12], 8, 2, 16, 24, "silu", None, "empty_experts", F32),
        "fp32_sentinels_k3": ([12, 19], 8, 3, 16, 24, "silu", None, "sentinels", F32),
        "fp16_sentinels_capacity3_k4_relu": ([15, 8], 8, 4, 16, 24, "relu", 3, "sentinels", F16),
        "fp32_capacity0": ([6, 5], 8, 2, 8, 8, "silu", 0, "topk", F32),
    },
    4: {
        "fp32_k2_uneven": ([5, 0, 11, 3], 8, 2, 16, 24, "silu", None, "topk", F32),
        "fp16_k3": ([6, 9, 4, 7], 12, 3, 16, 8, "silu", None, "topk", F16),
        "fp32_capacity2_sentinels_k2": ([7, 4, 0, 9], 8, 2, 16, 24, "silu", 2, "sentinels", F32),
        "fp16_capacity3_k2": ([8, 8, 5, 10], 8, 2, 16, 8, "gelu", 3, "topk", F16),
        "fp32_empty_experts_k1": ([9, 3, 6, 0], 8, 1, 8, 16, "silu", None, "empty_experts", F32),
    },
}

# MoE module cases: (tokens per rank, E, k, H, I, capacity_factor, shared_expert)
MODULE_CASES = {
    2: {"moe_dropless_shared": ([9, 14], 8, 2, 16, 24, None, 8)},
    4: {"moe_capacity0.5": ([6, 10, 0, 7], 8, 2, 16, 24, 0.5, None)},
}
SPAWN_TIMEOUT = {2: 120, 4: 180}


# ----------------------------------------------------- run inside the ranks

def _slices(rank, sizes, E_loc):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank]), slice(rank * E_loc, (rank + 1) * E_loc)


def _run(fn, inp, dtype, rows, experts):
    """fn(x, ids, w, w1, w2) on leaves in dtype (the token rows and expert
    slices given); out and the four gradients."""
    x, w, w1, w2 = (t.detach().to(dtype).requires_grad_() for t in
                    (inp["x"][rows], inp["weights"][rows], inp["w1"][experts], inp["w2"][experts]))
    out = fn(x, inp["ids"][rows], w, w1, w2)
    out.backward(inp["dout"][rows].to(out.dtype))
    return [out.detach()] + [t.grad for t in (x, w, w1, w2)]


def _experts_case(rank, world, case):
    sizes, E, k, H, I, act, cap, kind, dtype = case
    E_loc = E // world
    inp = make_experts_inputs(sum(sizes), E, k, H, I, kind, seed=7 * world + len(sizes) + sum(sizes) + k)
    everything = (slice(None), slice(None))
    ref = _run(lambda *a: experts_reference(*a, act, cap), inp, torch.float64, *everything)
    one = _run(lambda *a: tfk.moe.experts(*a, activation=act, capacity=cap), inp, dtype, *everything)
    rows, mine = _slices(rank, sizes, E_loc)
    ep_fn = lambda *a: tfk.moe.experts(*a, activation=act, capacity=cap,  # noqa: E731
                                       group=torch.distributed.group.WORLD)
    ep = _run(ep_fn, inp, dtype, rows, mine)
    again = _run(ep_fn, inp, dtype, rows, mine)
    res = {"dtype": dtype, "deterministic": all(torch.equal(a, b) for a, b in zip(ep, again))}
    for name, got, r, o, part in zip(("out",) + GRADS, ep, ref, one, (rows, rows, rows, mine, mine)):
        res[name] = dict(err=max_err(got, r[part]), base=max_err(o[part], r[part]), nan=bool(torch.isnan(got).any()),
                         shape_ok=tuple(got.shape) == tuple(r[part].shape), dtype_ok=got.dtype == dtype)
    ids = inp["ids"]
    valid = (ids >= 0) & (ids < E)
    res["dropped"] = int(valid.sum() - kept_assignments(ids, E, cap).sum())
    res["sentinels"] = int((~valid).sum())
    res["rank_tokens"] = sizes[rank]
    res["rank_assignments"] = int(((ids[valid] // E_loc) == rank).sum())   # what this rank's experts get
    return res


def _module_case(rank, world, case):
    sizes, E, k, H, I, factor, shared = case
    E_loc = E // world
    torch.manual_seed(123)
    ref = tfk.moe.MoE(H, I, E, k, capacity_factor=factor, shared_expert=shared, dtype=torch.float64)
    ep = tfk.moe.MoE(H, I, E, k, capacity_factor=factor, shared_expert=shared,
                     group=torch.distributed.group.WORLD)
    rows, mine = _slices(rank, sizes, E_loc)
    full = {n: p.detach() for n, p in ref.named_parameters()}
    with torch.no_grad():
        for n, p in ep.named_parameters():
            p.copy_(full[n][mine] if n in ("gate_up_proj", "down_proj") else full[n])
    one = tfk.moe.MoE(H, I, E, k, capacity_factor=factor, shared_expert=shared)
    one.load_state_dict({n: t.float() for n, t in ref.state_dict().items()})
    g = torch.Generator().manual_seed(99)
    x = torch.randn(sum(sizes), H, generator=g, dtype=torch.float64)
    dout = torch.randn(sum(sizes), H, generator=g, dtype=torch.float64)

    def run(m, dtype, part):
        xx = x[part].to(dtype).requires_grad_()
        out = m(xx)
        out.backward(dout[part].to(dtype))
        return out.detach(), xx.grad, {n: p.grad for n, p in m.named_parameters()}

    r_out, r_dx, r_g = run(ref, torch.float64, slice(None))
    o_out, o_dx, o_g = run(one, torch.float32, slice(None))
    e_out, e_dx, e_g = run(ep, torch.float32, rows)
    res = {"dtype": torch.float32, "capacity": ep.capacity(sum(sizes)), "local_shape": tuple(ep.gate_up_proj.shape)}
    pairs = {"out": (e_out, r_out[rows], o_out[rows]), "dx": (e_dx, r_dx[rows], o_dx[rows])}
    for n, got in e_g.items():
        if n in ("gate_up_proj", "down_proj"):
            pairs["d" + n] = (got, r_g[n][mine], o_g[n][mine])
        else:   # replicated: every rank's tokens add to it, as data parallel
            got = got.clone()
            torch.distributed.all_reduce(got)
            pairs["d" + n] = (got, r_g[n], o_g[n])
    for name, (got, r, o) in pairs.items():
        res[name] = dict(err=max_err(got, r), base=max_err(o, r), nan=bool(torch.isnan(got).any()),
                         shape_ok=tuple(got.shape) == tuple(r.shape), dtype_ok=got.dtype == torch.float32)
    res["dropped"] = 0
    if factor is not None:   # assignments the single-process layer drops on the gathered tokens
        ids = one.routing.experts
        res["dropped"] = int(ids.numel() - kept_assignments(ids, E, one.capacity(sum(sizes))).sum())
    return res


def _errors_in_ranks(rank, world):
    """Messages of the errors a rank raises before any exchange."""
    W = torch.distributed.group.WORLD
    out = {}
    try:
        tfk.moe.MoE(16, 8, 4 * world + 1, 2, group=W)
    except ValueError as e:
        out["indivisible"] = str(e)
    x = torch.randn(3, 8)
    w1, w2 = torch.randn(2, 16, 8), torch.randn(2, 8, 8)
    E = 2 * world
    for name, bad in (("id_past_sentinel", E + 1), ("id_below_sentinel", -2)):
        ids = torch.tensor([[0, 1], [bad, 0], [1, 0]])
        try:
            tfk.moe.experts(x, ids, torch.ones(3, 2), w1, w2, group=W)
        except ValueError as e:
            out[name] = str(e)
    try:
        tfk.moe.experts(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), w1, w2[:, :, :4], group=W)
    except ValueError as e:
        out["down_shape"] = str(e)
    try:
        tfk.moe.experts(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), w1.double(), w2.double(), group=W)
    except TypeError as e:
        out["dtype"] = str(e)
    return out


def rank_main(rank, world):
    """{case: its measurements, or {"error": traceback}}; after a case raises
    the rank stops (the others may be out of step in the exchanges: if they
    wait in a collective, spawn's timeout ends them), later cases are absent."""
    import traceback
    results = {}
    runs = [(n, _experts_case, c) for n, c in CASES[world].items()]
    runs += [(n, _module_case, c) for n, c in MODULE_CASES[world].items()]
    runs += [("errors", lambda r, w, c: _errors_in_ranks(r, w), None)]
    for name, fn, case in runs:
        try:
            results[name] = fn(rank, world, case)
        except Exception:  # noqa: BLE001 - reported by the case's test
            results[name] = {"error": traceback.format_exc()}
            break
    return results


# ------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def ranks():
    """ranks(P): every rank's results, one spawn per world size (on first use)."""
    cache = {}

    def get(world):
        if world not in cache:
            try:
                cache[world] = spawn(rank_main, world, timeout=SPAWN_TIMEOUT[world])
            except Exception as e:  # noqa: BLE001 - a failed spawn fails each test of that size, once
                cache[world] = e
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]
    return get


def _result(per_rank, case):
    """Every rank's result of the case; fails with a rank's traceback where it raised."""
    for rank, res in enumerate(per_rank):
        if case not in res:
            failed = [n for n, r in res.items() if "error" in r]
            pytest.fail(f"rank {rank}: not run, case {failed} raised before it")
        if "error" in res[case]:
            pytest.fail(f"rank {rank} raised:\n{res[case]['error']}")
    return [res[case] for res in per_rank]


def _assert_case(per_rank, case):
    for rank, r in enumerate(_result(per_rank, case)):
        dtype = r["dtype"]
        for name, m in r.items():
            if not isinstance(m, dict):
                continue
            assert m["shape_ok"] and m["dtype_ok"], f"rank {rank} {name}: wrong shape or dtype"
            assert not m["nan"], f"rank {rank} {name}: NaN"
            bound = FACTOR * m["base"] + FLOOR[dtype]["out" if name == "out" else "dq"]
            assert m["err"] <= bound, (f"rank {rank} {name}: err {m['err']:.3g} > bound {bound:.3g} "
                                       f"(single process: {m['base']:.3g})")


def _experts_params():
    return [pytest.param(w, c, id=f"P{w}-{c}") for w in CASES for c in CASES[w]]


def _module_params():
    return [pytest.param(w, c, id=f"P{w}-{c}") for w in MODULE_CASES for c in MODULE_CASES[w]]


@pytest.mark.parametrize("world,case", _experts_params())
def test_experts_parallel_matches_single_process(ranks, world, case):
    per_rank = ranks(world)
    _assert_case(per_rank, case)
    assert all(res[case]["deterministic"] for res in per_rank), "two identical calls differ"
    sizes, E, k, H, I, act, cap, kind, dtype = CASES[world][case]
    first = per_rank[0][case]
    if cap is not None:
        assert first["dropped"] > 0, "the capacity drops nothing: the case does not test it"
    if kind == "sentinels":
        assert first["sentinels"] > 0
    if kind == "empty_experts":   # only experts 1 and 3 are hit: some ranks receive nothing
        assert any(res[case]["rank_assignments"] == 0 for res in per_rank)


@pytest.mark.parametrize("world,case", _module_params())
def test_moe_module_with_group(ranks, world, case):
    per_rank = ranks(world)
    _assert_case(per_rank, case)
    sizes, E, k, H, I, factor, shared = MODULE_CASES[world][case]
    for res in per_rank:
        assert res[case]["local_shape"] == (E // world, 2 * I, H)
    if factor is not None:
        assert per_rank[0][case]["capacity"] == math.ceil(factor * sum(sizes) * k / E)   # the global T
        assert per_rank[0][case]["dropped"] > 0


def test_cases_cover_the_brief():
    all_cases = [c for w in CASES for c in CASES[w].values()]
    assert any(0 in c[0] for c in all_cases), "a rank with no tokens"
    assert {c[2] for c in all_cases} >= {1, 2, 3}
    assert {c[8] for c in all_cases} == {F32, F16}
    assert any(c[6] is not None for c in all_cases) and any(c[6] is None for c in all_cases)


def test_errors_in_ranks(ranks):
    for errs in _result(ranks(2), "errors"):
        assert "num_experts = 9 must be divisible by the group's size 2" in errs["indivisible"]
        assert "experts[1, 0] = 5 is out of range" in errs["id_past_sentinel"]
        assert "[0, 4)" in errs["id_past_sentinel"] and "2 local experts x 2 ranks" in errs["id_past_sentinel"]
        assert "experts[1, 0] = -2" in errs["id_below_sentinel"]
        assert "down_proj must be (E, H, I) = (2, 8, 8)" in errs["down_shape"]
        assert "gate_up_proj has dtype torch.float64" in errs["dtype"]


def test_group_without_init_process_group(monkeypatch):
    if torch.distributed.is_initialized():   # left so by something else in this process: pretend it is not
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    x, ids, w = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    w1, w2 = torch.randn(2, 16, 8), torch.randn(2, 8, 8)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised.*init_process_group"):
        tfk.moe.experts(x, ids, w, w1, w2, group=object())
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        tfk.moe.MoE(8, 8, 4, 2, group=object())
    # without a group nothing changes: the single-process op
    assert tfk.moe.experts(x, ids, w, w1, w2, group=None).shape == (3, 8)
