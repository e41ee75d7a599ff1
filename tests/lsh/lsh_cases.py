"""Inputs, the float64 oracle and torch's same-dtype baseline for the LSH
tests (tests/tolerances.py's rule, as tests/linear/linear_cases.py):

    err(tfk) <= FACTOR * err(torch in dtype) + FLOOR[dtype][output] * max(1, max |reference|)

"torch in dtype" is the reference formula evaluated in float32 on the inputs
rounded to dtype, its out and gradients rounded to dtype. Every run of a case
uses the same buckets (hashed once from the float64 qk), so the layouts agree:
the hashing itself is tested separately.
"""
from dataclasses import dataclass, replace

import torch

import tfk
from tfk.ops.lsh import draw_rotations, hash_buckets, lsh_attention_reference, sorted_order
from tolerances import FACTOR, FLOOR, max_err


@dataclass(frozen=True)
class Case:
    B: int = 2
    H: int = 2
    L: int = 64
    D: int = 40
    Dv: int | None = None
    n_hashes: int = 2
    n_buckets: object = 4
    chunk_size: int = 16
    before: int = 1
    after: int = 0
    causal: bool = False
    mask: bool = False          # a random key_padding_mask (and, when B > 1, one row that keeps one key only)
    scale: float = 1.0

    @property
    def vdim(self):
        return self.D if self.Dv is None else self.Dv

    @property
    def full(self):
        return self.L <= self.chunk_size

    def with_(self, **kw):
        return replace(self, **kw)


def make_inputs(c: Case, seed=0):
    """float64 qk, value, mask or None, buckets (None on the full path), and the
    gradient seeds (dout, dlse) of the loss sum(out*dout) + sum(lse*dlse)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    qk, v = r(c.B, c.H, c.L, c.D), r(c.B, c.H, c.L, c.vdim)
    mask = None
    if c.mask:
        mask = torch.rand(c.B, c.L, generator=g) < 0.75
        if c.B > 1:
            mask[-1] = False
            mask[-1, c.L // 2] = True
    buckets = None
    if not c.full:
        rot = draw_rotations(c.H, c.D, c.n_hashes, c.n_buckets, seed=seed + 1)
        buckets = hash_buckets(qk, rot, c.n_buckets, mask)
    return qk, v, mask, buckets, (r(c.B, c.H, c.L, c.vdim), r(c.B, c.H, c.L))


def op_args(c: Case, dtype=torch.float32, dropout_p=0.0, seed=5):
    """The arguments of a backend's forward op (functions.lsh_ops) for case c:
    leaves qk and value in dtype, the sorted layout, the mask and options."""
    qk, v, mask, buckets, _ = make_inputs(c)
    qk, v = qk.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
    return (qk, v, sorted_order(buckets), mask, c.chunk_size, c.before, c.after, c.causal, c.scale, dropout_p,
            seed)


def check_compile_fullgraph(**kw):
    """torch.compile(fullgraph=True) traces tfk.lsh_attention(qk, v, **kw) and its
    backward: the same loss and gradients as the eager call."""
    c = Case(B=1, L=64, D=16, n_hashes=2, chunk_size=16, causal=True, mask=True)
    qk, v, mask, buckets, _ = make_inputs(c)
    qk, v = qk.float(), v.float()

    def f(qk, v):
        out, lse = tfk.lsh_attention(qk, v, n_hashes=2, chunk_size=16, causal=True, key_padding_mask=mask,
                                     return_lse=True, **kw)
        return out.sum() + lse.sum()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (qk, v)]
    b = [t.clone().requires_grad_() for t in (qk, v)]
    y1, y2 = f(*a), compiled(*b)
    y1.backward()
    y2.backward()
    assert torch.allclose(y1, y2)
    for x1, x2 in zip(a, b):
        assert torch.allclose(x1.grad, x2.grad, atol=1e-6)


def run(fn, inputs, dtype, device="cpu"):
    """fn(qk, v, mask, buckets) -> (out, lse) on leaves cast to dtype on device;
    returns {out, lse, dqk, dv} as CPU tensors."""
    qk, v, mask, buckets, (dout, dlse) = inputs
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (qk, v)]
    out, lse = fn(*leaves, on(mask), on(buckets))
    loss = (out.double() * on(dout)).sum() + (lse.double() * on(dlse)).sum()
    dqk, dv = torch.autograd.grad(loss, leaves)
    return dict(out=out.detach().cpu(), lse=lse.detach().cpu(), dqk=dqk.cpu(), dv=dv.cpu())


def tfk_fn(c: Case, backend="torch"):
    return lambda qk, v, mask, buckets: tfk.lsh_attention(
        qk, v, n_hashes=c.n_hashes, n_buckets=c.n_buckets, chunk_size=c.chunk_size, chunks_before=c.before,
        chunks_after=c.after, causal=c.causal, key_padding_mask=mask, buckets=buckets, scale=c.scale,
        backend=backend, return_lse=True)


def reference_fn(c: Case):
    return lambda qk, v, mask, buckets: lsh_attention_reference(
        qk, v, buckets, chunk_size=c.chunk_size, chunks_before=c.before, chunks_after=c.after, causal=c.causal,
        key_padding_mask=mask, scale=c.scale)


def baseline(c: Case, inputs, dtype):
    """torch in dtype: the formula in float32 on dtype-rounded inputs, out and gradients rounded to dtype."""
    qk, v, *rest = inputs
    ref = reference_fn(c)

    def fn(*args):
        out, lse = ref(*args)
        return out.to(dtype).float(), lse
    got = run(fn, (qk.to(dtype), v.to(dtype), *rest), torch.float32)
    for name in ("out", "dqk", "dv"):
        got[name] = got[name].to(dtype)
    return got


NAMES = dict(out="out", lse="lse", dqk="dq", dv="dv")   # FLOOR's keys


def check_case(c: Case, dtype, backend="torch", seed=0, device="cpu", floor_dtype=None):
    """``floor_dtype``: the dtype whose FLOOR applies (tf32 dots on a GPU: float16's)."""
    inputs = make_inputs(c, seed)
    ref = run(reference_fn(c), inputs, torch.float64)
    base = baseline(c, inputs, dtype) if dtype != torch.float64 else None
    got = run(tfk_fn(c, backend), inputs, dtype, device)
    assert got["out"].dtype == dtype
    assert got["lse"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert not torch.isnan(g).any(), f"{name}: NaN (an unwritten element, or broken math)"
        err = max_err(g, r)
        base_err = max_err(base[name], r) if base is not None else 0.0
        floor = FLOOR[floor_dtype or dtype][NAMES[name]] * max(1.0, float(r.abs().max()))
        bound = FACTOR * base_err + floor
        assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g} (torch's err in {dtype}: {base_err:.3g})"
