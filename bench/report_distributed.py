"""The report's multi-device section: tfk.distributed's context-parallel
attention (ring and ulysses) and expert-parallel experts on 2 gloo processes
on this machine's CPU, whatever the device of the rest of the report, against
the float64 reference of the whole problem in one process. Every rank
compares its shard of the output and of every gradient (attention: query,
key, value; experts: hidden_states, routing weights and its experts'
weights); a row holds the largest relative error over ranks (as
bench/report_moe.py: max |tfk - ref| / max |ref|) and the slowest rank's
time of the distributed forward and forward+backward. Run by
``python -m bench.report``."""
from __future__ import annotations

import statistics
import time
import traceback
from dataclasses import dataclass

import torch

import tfk
from tfk import patterns as P
from tfk.distributed import context_parallel_attention, shard
from tfk.ops.moe import experts_reference

from . import report_moe

WORLD = 2


@dataclass(frozen=True)
class DistOp:
    """kind "cp": context_parallel_attention of (B, H, L, D) over WORLD ranks;
    "ep": tfk.moe.experts(..., group=) of T tokens a rank over E experts."""
    name: str
    kind: str
    pattern: str = ""
    method: str = "ring"
    layout: str = "zigzag"
    L: int = 256
    T: int = 0
    E: int = 0
    k: int = 0
    capacity: int | None = None

    def describe(self):
        if self.kind == "cp":
            return (f"context_parallel_attention({self.method}, {self.layout}, {_pattern(self.pattern)!r}, B=1, H=4, Hkv=2, "
                    f"L={self.L}, D=32, {WORLD} ranks)")
        cap = f", capacity={self.capacity}" if self.capacity is not None else ""
        return f"experts(group of {WORLD}, T={self.T} a rank, E={self.E}, k={self.k}, H=48, I=32{cap})"


OPS = [
    DistOp("cp_ring_causal", "cp", "causal"),
    DistOp("cp_ring_window_global", "cp", "window", layout="contiguous"),
    DistOp("cp_ulysses_causal", "cp", "causal", method="ulysses"),
    DistOp("ep_experts", "ep", T=96, E=8, k=2),
    DistOp("ep_experts_capacity", "ep", T=96, E=8, k=2, capacity=20),
]


def _pattern(name):
    return P.causal() if name == "causal" else P.sliding_window(24) | P.global_tokens([0, 1])


def _case(op, rank):
    """(the leaves of the whole problem in float64, fn(*leaves) on this rank, ref(*leaves), shard_of(i, t))."""
    g = torch.Generator().manual_seed(sum(map(ord, op.name)))
    if op.kind == "cp":
        pattern = _pattern(op.pattern)
        leaves = [torch.randn(1, h, op.L, 32, generator=g, dtype=torch.float64) for h in (4, 2, 2)]

        def fn(q, k, v):
            return context_parallel_attention(q, k, v, pattern, method=op.method, layout=op.layout)

        def ref(q, k, v):
            return tfk.attention(q, k, v, pattern, backend="reference")

        return leaves, fn, ref, lambda i, t: shard(t, layout=op.layout)
    T, E, H, I = op.T, op.E, 48, 32
    x = torch.randn(WORLD * T, H, generator=g, dtype=torch.float64)
    ids = torch.rand(WORLD * T, E, generator=g).topk(op.k, -1).indices
    ids[:T // 2, :] = ids[:T // 2, :] % (E // 2)   # skew: some experts busier, capacity drops
    w = torch.rand(WORLD * T, op.k, generator=g, dtype=torch.float64) + 0.1
    a = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64) / H ** 0.5
    b = torch.randn(E, H, I, generator=g, dtype=torch.float64) / I ** 0.5
    E_loc = E // WORLD
    tok = slice(rank * T, (rank + 1) * T)
    exp = slice(rank * E_loc, (rank + 1) * E_loc)
    group = torch.distributed.group.WORLD

    def fn(x, w, a, b):
        return tfk.moe.experts(x, ids[tok], w, a, b, capacity=op.capacity, group=group)

    def ref(x, w, a, b):
        return experts_reference(x, ids, w, a, b, "silu", op.capacity)

    def shard_of(i, t):
        return t[exp] if i >= 2 else t[tok]

    return [x, w, a, b], fn, ref, shard_of


def _rank(rank, world, ops, repeat):
    torch.manual_seed(0)
    rows = {}
    for op in ops:
        try:
            leaves, fn, ref, shard_of = _case(op, rank)
            mine = [shard_of(i, t).float().requires_grad_() for i, t in enumerate(leaves)]
            out = fn(*mine)
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5 + rank))
            out.backward(dout)
            full = [t.detach().clone().requires_grad_() for t in leaves]
            r_out = ref(*full)
            # the whole problem's dout: every rank's own, at its place
            douts = [torch.randn(out.shape, generator=torch.Generator().manual_seed(5 + r)) for r in range(world)]
            whole = _whole_dout(op, douts, r_out)
            r_out.backward(whole.double())
            err_out = report_moe._rel_err(out.detach(), shard_of(0, r_out.detach()))
            err_grads = max(report_moe._rel_err(t.grad, shard_of(i, f.grad)) for i, (t, f) in enumerate(zip(mine,
                                                                                                           full)))
            times = {"fwd": [], "fwdbwd": []}
            for _ in range(repeat):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                with torch.no_grad():
                    fn(*mine)
                times["fwd"].append(time.perf_counter() - t0)
                torch.distributed.barrier()
                t0 = time.perf_counter()
                fn(*mine).backward(dout)
                times["fwdbwd"].append(time.perf_counter() - t0)
            rows[op.name] = dict(err_out=err_out, err_grads=err_grads, times=times)
        except Exception:  # noqa: BLE001 -- a failure is a row
            rows[op.name] = dict(error=traceback.format_exc(limit=8))
    return rows


def _whole_dout(op, douts, r_out):
    """The whole problem's output gradient: each rank's dout at its rows."""
    if op.kind == "ep":
        return torch.cat(douts, 0)
    from tfk.distributed import layout as lay
    whole = torch.zeros_like(r_out, dtype=torch.float32)
    n = r_out.shape[2] // len(douts)
    for r, d in enumerate(douts):
        whole[:, :, lay.positions(op.layout, r, len(douts), n)] = d
    return whole


def check_all(ops, device, dtypes, *, repeat=3, **kw):
    """Rows of every op, in float32 (the section runs on the CPU over gloo)."""
    from tfk.distributed import spawn
    try:
        per_rank = spawn(_rank, WORLD, list(ops), repeat, timeout=300)
    except Exception:  # noqa: BLE001
        return [dict(op=op.name, what=op.describe(), dtype="float32", error=traceback.format_exc(limit=8),
                     ok=False) for op in ops]
    rows = []
    for op in ops:
        got = [r[op.name] for r in per_rank]
        bad = next((g["error"] for g in got if "error" in g), None)
        if bad:
            rows.append(dict(op=op.name, what=op.describe(), dtype="float32", error=bad, ok=False))
            continue
        err_out, err_grads = max(g["err_out"] for g in got), max(g["err_grads"] for g in got)

        def slowest(key):
            return 1e3 * statistics.median(max(g["times"][key][i] for g in got) for i in range(repeat))
        rows.append(dict(op=op.name, what=op.describe(), device="cpu (gloo)", dtype="float32",
                         backend=f"{WORLD} ranks", err_out=err_out, err_grads=err_grads, tol=report_moe.TOL_FP32,
                         ok=err_out <= report_moe.TOL_FP32 and err_grads <= report_moe.TOL_FP32,
                         fwd_ms=slowest("fwd"), fwdbwd_ms=slowest("fwdbwd")))
    return rows
