"""Inputs, the float64 oracle and tolerances for the MoE tests.

The oracle is tfk.ops.moe.reference in float64; "torch's own error in the same
dtype" is that same loop run in the tested dtype (what plain torch code gives),
and a result passes when err <= FACTOR * that + FLOOR (tests/tolerances.py)."""
import zlib

import torch

from tfk.ops.moe import experts_reference, grouped_mm_reference
from tolerances import FACTOR, FLOOR, max_err

GRADS = ("dx", "dweights", "dgate_up", "ddown")

# The torch backend's ways of running groups, forced (its module settings):
# one matmul per non-empty expert ("loop"), torch's grouped GEMM over the
# weights in place ("grouped"), one batched matmul over groups padded to the
# largest ("padded"); and, for the experts' forward, tfk._cpu's kernel
# ("rows"; its backward runs grouped).
MODES = {"loop": dict(LOOP_COST_FLOPS=-1.0, GROUPED_MM=True, ROWS_KERNEL_MAX_ROWS=0),
         "grouped": dict(LOOP_COST_FLOPS=1e30, GROUPED_MM=True, ROWS_KERNEL_MAX_ROWS=0),
         "padded": dict(LOOP_COST_FLOPS=1e30, GROUPED_MM=False, ROWS_KERNEL_MAX_ROWS=0)}
EXPERTS_MODES = {**MODES, "rows": dict(LOOP_COST_FLOPS=1e30, GROUPED_MM=True, ROWS_KERNEL_MAX_ROWS=1 << 62)}


def force_mode(monkeypatch, mode):
    from tfk.ops.moe import torch_backend
    for name, value in EXPERTS_MODES[mode].items():
        monkeypatch.setattr(torch_backend, name, value)


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode()) % 10000


def assert_moe_close(name, got, ref, lowp, dtype):
    """Like tolerances.assert_close, for the MoE outputs: ``out`` takes the
    output floor, gradients the gradient floor."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the result (unwritten or broken element)"
    err = max_err(got, ref)
    base = max_err(lowp, ref) if lowp is not None else 0.0
    bound = FACTOR * base + FLOOR[dtype]["out" if name == "out" else "dq"]
    assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g} (torch's err in {dtype}: {base:.3g})"


def make_ids(T, E, k, g, kind="topk"):
    """(T, k) int64 expert ids: distinct random choices per token ("topk"),
    or the special layouts the tests name."""
    if kind == "topk":
        return torch.rand(T, E, generator=g).topk(k, -1).indices
    if kind == "empty_experts":   # only experts 1 and 3 hit (E >= 4)
        ids = torch.tensor([1, 3])[torch.randint(0, 2, (T, k), generator=g)]
        ids[:, 0], ids[:, -1] = 1, 3
        return ids
    if kind == "one_expert":      # every token's every slot on expert E - 1
        return torch.full((T, k), E - 1, dtype=torch.long)
    if kind == "sentinels":       # E and -1 mixed with real ids
        ids = torch.rand(T, E, generator=g).topk(k, -1).indices
        drop = torch.rand(T, k, generator=g)
        ids[drop < 0.2] = E
        ids[(drop >= 0.2) & (drop < 0.35)] = -1
        return ids
    if kind == "all_sentinels":
        return torch.full((T, k), E, dtype=torch.long)
    raise ValueError(kind)


def make_experts_inputs(T, E, k, H, I, kind="topk", seed=0):
    """float64 leaves x (T, H), weights (T, k), gate_up_proj (E, 2I, H),
    down_proj (E, H, I), with ids (T, k) and dout (T, H); values O(1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    ids = make_ids(T, E, k, g, kind)
    weights = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1
    return dict(x=r(T, H), ids=ids, weights=weights, w1=r(E, 2 * I, H) / H ** 0.5, w2=r(E, H, I) / I ** 0.5,
                dout=r(T, H))


def run_experts(fn, inp, dtype, weights_dtype=None):
    """fn(x, ids, weights, w1, w2) on leaves cast to dtype (weights to
    ``weights_dtype``, default dtype); returns out and the four gradients."""
    x, w, w1, w2 = (inp[n].detach().to(dtype).requires_grad_() for n in ("x", "weights", "w1", "w2"))
    if weights_dtype is not None:
        w = inp["weights"].detach().to(weights_dtype).requires_grad_()
    out = fn(x, inp["ids"], w, w1, w2)
    out.backward(inp["dout"].to(out.dtype))
    return out.detach(), [t.grad for t in (x, w, w1, w2)]


def check_experts(fn, inp, dtype, activation="silu", capacity=None):
    """fn against the float64 reference, tolerance from the same loop in dtype."""
    ref = lambda x, i, w, a, b: experts_reference(x, i, w, a, b, activation, capacity)
    r_out, r_grads = run_experts(ref, inp, torch.float64)
    l_out, l_grads = (None, [None] * 4) if dtype == torch.float64 else run_experts(ref, inp, dtype)
    out, grads = run_experts(fn, inp, dtype)
    assert out.dtype == dtype
    assert_moe_close("out", out, r_out, l_out, dtype)
    for name, got, rg, lg in zip(GRADS, grads, r_grads, l_grads):
        assert got is not None, f"{name}: no gradient"
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}"
        assert_moe_close(name, got, rg, lg, dtype)
    return out, grads


def check_grouped_mm(fn, a, b, offs, dout, dtype):
    """fn(a, b, offs) against the float64 reference, forward and both gradients."""
    def run(f, d):
        a_, b_ = (t.detach().to(d).requires_grad_() for t in (a, b))
        out = f(a_, b_, offs)
        out.backward(dout.to(d))
        return out.detach(), a_.grad, b_.grad
    ref = run(grouped_mm_reference, torch.float64)
    lowp = run(grouped_mm_reference, dtype)
    got = run(fn, dtype)
    for name, g_, r_, l_ in zip(("out", "da", "db"), got, ref, lowp):
        assert g_.dtype == dtype
        assert_moe_close(name, g_, r_, l_, dtype)
    return got
