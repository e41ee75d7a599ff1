"""The report's MoE section: every op of ``tfk.moe`` at a moderate size with
awkward counts (T 301 and 77, empty experts, sentinels, capacity drops),
against the float64 reference (tfk/ops/moe/reference.py; route against its
definition in float64), with its time. Run by ``python -m bench.report``.

Errors are relative, max |tfk - ref| / max |ref|: "err out" for the output,
"err grads" the largest over the gradients (experts: hidden_states, routing
weights, gate_up_proj, down_proj; grouped_mm: a, b; route: the logits).
Tolerances as the attention rows: 1e-4 in float32; in float16/bfloat16 twice
the error of the reference computed in that dtype plus a floor.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass

import torch

import tfk
from tfk.ops.moe import experts_reference, grouped_mm_reference

from .table import Col, fmt, format_table


@dataclass(frozen=True)
class MoEOp:
    """kind "experts": tfk.moe.experts (T tokens, E experts, top-k, H, I);
    "grouped_mm": tfk.moe.grouped_mm of (T, H) rows in E groups to I columns;
    "route": tfk.moe.route of (T, E) logits."""
    name: str
    kind: str
    T: int
    E: int
    k: int
    H: int = 0
    I: int = 0
    activation: str = "silu"
    capacity: int | None = None
    ids: str = "topk"           # "topk" | "sentinels" | "skewed" (empty experts)
    score: str = "softmax"
    groups: tuple | None = None  # (n_group, topk_group)

    def describe(self):
        if self.kind == "experts":
            cap = f", capacity={self.capacity}" if self.capacity is not None else ""
            return (f"experts(T={self.T}, E={self.E}, k={self.k}, H={self.H}, I={self.I}, {self.activation}"
                    f"{cap}, ids {self.ids})")
        if self.kind == "grouped_mm":
            return f"grouped_mm(M={self.T}, G={self.E} (some empty), K={self.H}, N={self.I})"
        g = f", n_group={self.groups[0]}, topk_group={self.groups[1]}, bias" if self.groups else ""
        return f"route(T={self.T}, E={self.E}, k={self.k}, {self.score}{g})"


OPS = [
    MoEOp("moe_experts", "experts", 301, 8, 2, 64, 96),
    MoEOp("moe_experts_e64_k6", "experts", 77, 64, 6, 32, 16, ids="skewed"),
    MoEOp("moe_experts_capacity", "experts", 129, 8, 4, 32, 48, activation="gelu", capacity=40),
    MoEOp("moe_experts_sentinels", "experts", 97, 8, 2, 40, 24, activation="relu", ids="sentinels"),
    MoEOp("moe_grouped_mm", "grouped_mm", 301, 8, 0, 64, 48),
    MoEOp("moe_route_softmax", "route", 301, 8, 2),
    MoEOp("moe_route_sigmoid_groups", "route", 77, 64, 6, score="sigmoid", groups=(8, 3)),
]

TOL_FP32 = 1e-4
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _ids(op, g):
    ids = torch.rand(op.T, op.E, generator=g).topk(op.k, -1).indices
    if op.ids == "skewed":        # half of the experts never hit
        ids = torch.rand(op.T, op.E // 2, generator=g).topk(op.k, -1).indices
    if op.ids == "sentinels":
        drop = torch.rand(op.T, op.k, generator=g)
        ids[drop < 0.15] = op.E
        ids[drop > 0.9] = -1
    return ids


def _case(op, device):
    """(leaves in float64, fixed (non-differentiable) args, fn(*leaves, backend=) -> out, ref(*leaves) -> out)."""
    g = torch.Generator().manual_seed(sum(map(ord, op.name)))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if op.kind == "experts":
        ids = _ids(op, g).to(device)
        leaves = [r(op.T, op.H), torch.rand(op.T, op.k, generator=g, dtype=torch.float64) + 0.1,
                  r(op.E, 2 * op.I, op.H) / op.H ** 0.5, r(op.E, op.H, op.I) / op.I ** 0.5]
        fn = lambda x, w, a, b, backend: tfk.moe.experts(x, ids, w, a, b, activation=op.activation,  # noqa: E731
                                                         capacity=op.capacity, backend=backend)
        ref = lambda x, w, a, b: experts_reference(x, ids, w, a, b, op.activation, op.capacity)  # noqa: E731
    elif op.kind == "grouped_mm":
        sizes = torch.randint(0, 2 * op.T // op.E, (op.E,), generator=g)
        sizes[1] = sizes[-2] = 0
        offs = torch.cumsum(sizes, 0).clamp(max=op.T - 3).to(device)   # and rows past the end
        leaves = [r(op.T, op.H), r(op.E, op.H, op.I) / op.H ** 0.5]
        fn = lambda a, b, backend: tfk.moe.grouped_mm(a, b, offs, backend=backend)  # noqa: E731
        ref = lambda a, b: grouped_mm_reference(a, b, offs)  # noqa: E731
    else:
        bias = (r(op.E) * 0.1).to(device) if op.groups else None
        n_group, topk_group = op.groups or (None, None)
        # distinct logits on a grid every dtype holds exactly (steps of 4/E): the
        # same choice in float64 and in half precision, no near-ties
        leaves = [(torch.rand(op.T, op.E, generator=g).argsort(-1) - op.E / 2).double() * (4 / op.E)]
        fn = lambda x, backend: tfk.moe.route(x, op.k, score=op.score, bias=bias, n_group=n_group,  # noqa: E731
                                              topk_group=topk_group, backend=backend).weights
        ref = lambda x: _route_definition(x, op.k, op.score, bias, n_group, topk_group)  # noqa: E731
    return [t.to(device) for t in leaves], fn, ref


def _route_definition(logits, k, score, bias, n_group, topk_group):
    """The weights by the issue's definition, in the logits' dtype, from the
    same choice (ties aside, the choice is the same in float64)."""
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    choice = scores.detach() + (0 if bias is None else bias.to(scores.dtype))
    if n_group:
        T, E = choice.shape
        top2 = choice.view(T, n_group, -1).topk(2, -1).values.sum(-1)
        keep = torch.zeros_like(top2, dtype=torch.bool).scatter_(1, top2.topk(topk_group, -1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, 1), -math.inf)
    w = scores.gather(1, choice.topk(k, -1).indices)
    return w / (w.sum(-1, keepdim=True) + (1e-20 if score == "sigmoid" else 0.0))


def _rel_err(x, ref):
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (x.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    return err / scale if scale else err


def _fwd_bwd(fn, leaves, dtype, seed):
    xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out = fn(*xs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(dout.to(out.device, out.dtype))
    return out.detach(), [t.grad for t in xs]


def check_op(op, device, dtype, *, backend="auto", repeat=3, time_it=True, timer=None, case=None):
    """One row: the backend chosen, errors of out and of the gradients, tolerances, times.
    ``case(op, device)`` gives (leaves, fn, ref) (default: this module's ops)."""
    leaves, fn, ref = (case or _case)(op, device)
    run = lambda *xs: fn(*xs, backend=backend)  # noqa: E731
    with tfk.backends.record_choices() as names:
        out, grads = _fwd_bwd(run, leaves, dtype, 1)
    r_out, r_grads = _fwd_bwd(ref, leaves, torch.float64, 1)
    err_out = _rel_err(out, r_out)
    err_grads = max(_rel_err(a, b) for a, b in zip(grads, r_grads))
    if dtype == torch.float32:
        tol_out = tol_grads = TOL_FP32
    else:
        l_out, l_grads = _fwd_bwd(ref, leaves, dtype, 1)
        tol_out = 2 * _rel_err(l_out, r_out) + FLOOR[dtype]
        tol_grads = 2 * max(_rel_err(a, b) for a, b in zip(l_grads, r_grads)) + FLOOR[dtype]
    row = {"op": op.name, "what": op.describe(), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "backend": names[0] if names else "torch", "err_out": err_out, "err_grads": err_grads,
           "tol": max(tol_out, tol_grads), "ok": err_out <= tol_out and err_grads <= tol_grads,
           "fwd_ms": None, "fwdbwd_ms": None}
    if time_it:
        xs = [t.detach().to(dtype) for t in leaves]
        ls = [t.detach().to(dtype).requires_grad_() for t in leaves]
        dout = out.to(dtype)

        def fwd():
            with torch.no_grad():
                run(*xs)

        def fwdbwd():
            run(*ls).backward(dout)

        fwd()
        fwdbwd()
        row["fwd_ms"] = timer(fwd, repeat, device)
        row["fwdbwd_ms"] = timer(fwdbwd, repeat, device)
    return row


def check_all(ops, device, dtypes, check=None, **kw):
    """Rows of every (op, dtype) by ``check`` (default check_op); a failure is
    a row with its traceback."""
    rows = []
    for op in ops:
        for dtype in dtypes:
            try:
                rows.append((check or check_op)(op, device, dtype, **kw))
            except Exception:  # noqa: BLE001 -- a failure is a row, and a non-zero exit
                rows.append({"op": op.name, "what": op.describe(), "dtype": str(dtype).replace("torch.", ""),
                             "error": traceback.format_exc(limit=8), "ok": False})
    return rows


def format_rows(rows):
    cols = [Col("op", "<"), Col("dtype", "<"), Col("backend", "<"), Col("err out"), Col("err grads"),
            Col("fwd ms"), Col("f+b ms"), Col("check", "<")]
    err = lambda e: "-" if e is None else "inf" if e == float("inf") else f"{e:.1e}"  # noqa: E731
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["op"], r.get("dtype", ""), "ERROR: " + r["error"].strip().splitlines()[-1][:110]])
            continue
        lines.append([r["op"], r["dtype"], r["backend"], err(r["err_out"]), err(r["err_grads"]),
                      fmt(r["fwd_ms"], ".1f"), fmt(r["fwdbwd_ms"], ".1f"),
                      "ok" if r["ok"] else f"FAIL (tol {r['tol']:.1e})"])
    return format_table(cols, lines)
