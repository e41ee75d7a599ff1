"""Inputs, the float64 oracle and torch's same-dtype baseline for the
linear-attention tests.

A result passes when, against the float64 reference (tests/tolerances.py's rule),

    err(tfk) <= FACTOR * err(torch in dtype) + FLOOR[dtype][output] * max(1, max |reference|)

"torch in dtype" is the reference formula evaluated in float32 on the inputs
rounded to dtype, its out and gradients rounded to dtype: the error any
implementation with dtype inputs and outputs makes. (A plain fp16 evaluation is
no baseline: its unnormalised sums overflow, which would make the bound vacuous.)
"""
from dataclasses import dataclass, replace

import torch

import tfk
from tfk.ops.linear import linear_attention_reference
from tolerances import FACTOR, max_err

# Rounding floors per output (the state is float32 whatever the inputs' dtype).
FLOOR = {
    torch.float32: dict(out=1e-6, kv=1e-5, z=1e-5, dq=4e-6, dk=4e-6, dv=4e-6, dkv0=1e-5, dz0=1e-5),
    torch.float16: dict(out=1e-3, kv=1e-4, z=1e-4, dq=2e-3, dk=2e-3, dv=2e-3, dkv0=1e-4, dz0=1e-4),
    torch.bfloat16: dict(out=8e-3, kv=1e-3, z=1e-3, dq=1.6e-2, dk=1.6e-2, dv=1.6e-2, dkv0=1e-3, dz0=1e-3),
}


@dataclass(frozen=True)
class Case:
    B: int = 2
    H: int = 4
    Hkv: int = 4
    L: int = 63
    S: int | None = None       # None: S = L
    D: int = 40
    Dv: int | None = None      # None: Dv = D
    causal: bool = True
    feature_map: object = "elu1"
    normalize: bool = True
    eps: float = 1e-6
    scale: float = 1.0
    mask: bool = False          # a random key_padding_mask (and, non-causal, one batch row with every key masked)
    state: bool = False         # an initial state (requiring grad) and the returned state (with gradients)
    inputs: str = "normal"      # "normal": N(0, 0.5^2); "positive": U(0, 1) q and k (identity maps, normalised)

    @property
    def kv_len(self):
        return self.L if self.S is None else self.S

    @property
    def vdim(self):
        return self.D if self.Dv is None else self.Dv

    def with_(self, **kw):
        return replace(self, **kw)


def make_inputs(c: Case, seed=0):
    """float64 tensors: q, k, v, mask or None, (kv0, z0) or None, and the
    gradient seeds (dout, dkv, dz) of the loss sum(out*dout) + sum(kv*dkv) + sum(z*dz)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    S, Dv = c.kv_len, c.vdim
    if c.inputs == "positive":
        q = torch.rand(c.B, c.H, c.L, c.D, generator=g, dtype=torch.float64)
        k = torch.rand(c.B, c.Hkv, S, c.D, generator=g, dtype=torch.float64)
    else:
        q, k = 0.5 * r(c.B, c.H, c.L, c.D), 0.5 * r(c.B, c.Hkv, S, c.D)
    v = r(c.B, c.Hkv, S, Dv)
    mask = None
    if c.mask:
        mask = torch.rand(c.B, S, generator=g) < 0.75
        if not c.causal and c.B > 1:
            mask[-1] = False
    state = None
    Dp = c.D * 2 if callable(c.feature_map) else c.D     # the tests' callables double D
    if c.state:
        state = (r(c.B, c.Hkv, Dp, Dv), torch.rand(c.B, c.Hkv, Dp, generator=g, dtype=torch.float64) * c.kv_len)
    seeds = (r(c.B, c.H, c.L, Dv), r(c.B, c.Hkv, Dp, Dv), r(c.B, c.Hkv, Dp))
    return q, k, v, mask, state, seeds


def run(fn, c: Case, inputs, dtype, state_dtype, device="cpu"):
    """fn(q, k, v, mask, state) -> out or (out, (kv, z)) on leaves cast to dtype
    (state to state_dtype) on ``device``; returns {name: CPU tensor} for out, kv,
    z and every gradient."""
    q, k, v, mask, state, (dout, dkv, dz) = inputs
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, v)]
    st = None if state is None else tuple(t.detach().to(device, state_dtype).requires_grad_() for t in state)
    res = fn(*leaves, None if mask is None else mask.to(device), st)
    out, (kv, z) = res if c.state else (res, (None, None))
    loss = (out.double().cpu() * dout).sum()
    if c.state:
        loss = loss + (kv.double().cpu() * dkv).sum() + (z.double().cpu() * dz).sum()
    wrt = leaves + (list(st) if st else [])
    grads = torch.autograd.grad(loss, wrt)
    got = dict(out=out.detach())
    if c.state:
        got.update(kv=kv.detach(), z=z.detach())
    got.update(zip(["dq", "dk", "dv", "dkv0", "dz0"], grads))
    return {name: t.cpu() for name, t in got.items()}


def tfk_fn(c: Case, backend="torch"):
    return lambda q, k, v, mask, st: tfk.linear_attention(
        q, k, v, causal=c.causal, feature_map=c.feature_map, normalize=c.normalize, eps=c.eps, scale=c.scale,
        key_padding_mask=mask, initial_state=st, return_state=c.state, backend=backend)


def reference_fn(c: Case):
    def fn(q, k, v, mask, st):
        out, state = linear_attention_reference(q, k, v, causal=c.causal, feature_map=c.feature_map,
                                                normalize=c.normalize, eps=c.eps, scale=c.scale,
                                                key_padding_mask=mask, initial_state=st)
        return (out, state) if c.state else out
    return fn


def baseline(c: Case, inputs, dtype):
    """torch in dtype: the formula in float32 on dtype-rounded inputs, out and gradients rounded to dtype."""
    q, k, v, mask, state, seeds = inputs
    if callable(c.feature_map):   # tfk applies a callable in dtype, so does the baseline
        c = c.with_(feature_map=lambda x, f=c.feature_map: f(x.to(dtype)).to(x.dtype))
    rounded = (q.to(dtype), k.to(dtype), v.to(dtype), mask, state, seeds)
    ref = reference_fn(c)

    def fn(*args):   # out in dtype inside the graph: its gradient arrives rounded to dtype, as tfk's does
        res = ref(*args)
        return (res[0].to(dtype).float(), res[1]) if c.state else res.to(dtype).float()
    got = run(fn, c, rounded, torch.float32, torch.float32)
    for name in ("out", "dq", "dk", "dv"):
        got[name] = got[name].to(dtype)
    return got


def check_case(c: Case, dtype, backend="torch", seed=0, device="cpu"):
    """tfk (``backend``, in ``dtype``, on ``device``) against the float64 reference
    (on the CPU), every output and gradient."""
    inputs = make_inputs(c, seed)
    ref = run(reference_fn(c), c, inputs, torch.float64, torch.float64)
    base = baseline(c, inputs, dtype) if dtype != torch.float64 else None
    got = run(tfk_fn(c, backend), c, inputs, dtype, torch.float64 if dtype == torch.float64 else torch.float32,
              device)
    assert got["out"].dtype == dtype
    if c.state:
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert got["kv"].dtype == want and got["z"].dtype == want, "the state must be float32 (float64 inputs: 64)"
    assert set(got) == set(ref), f"outputs/gradients differ: {sorted(got)} vs {sorted(ref)}"
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert not torch.isnan(g).any(), f"{name}: NaN (an unwritten element, or broken math)"
        err = max_err(g, r)
        base_err = max_err(base[name], r) if base is not None else 0.0
        # the floor is relative to the result's size: unnormalised outputs and states grow with the sums
        floor = FLOOR.get(dtype, {}).get(name, 1e-10) * max(1.0, float(r.abs().max()))
        bound = FACTOR * base_err + floor
        assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g} (torch's err in {dtype}: {base_err:.3g})"


def check_pieces_equal_one_call(backend, B, H, Hkv, L, D, Dv, pieces, feature_map="elu1", seed=0):
    """A causal sequence run in ``pieces`` ((start, end) position ranges: a
    prompt in chunks, then decode steps), each call passing the last state,
    against one call over it all: outputs, final state and the gradients of
    q, k and v (through the chain of states) agree, on ``backend``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = 0.5 * torch.randn(B, H, L, D, generator=g), 0.5 * torch.randn(B, Hkv, L, D, generator=g), \
        torch.randn(B, Hkv, L, Dv, generator=g)
    mask = torch.rand(B, L, generator=g) < 0.8
    kw = dict(feature_map=feature_map, return_state=True, backend=backend)

    def chained(q, k, v):
        outs, state = [], None
        for a, b in pieces:
            out, state = tfk.linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], initial_state=state,
                                              key_padding_mask=mask[:, a:b], **kw)
            outs.append(out)
        return torch.cat(outs, 2), state

    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
    o1, (kv1, z1) = tfk.linear_attention(*leaves[0], key_padding_mask=mask, **kw)
    o2, (kv2, z2) = chained(*leaves[1])
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv2, kv1, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z2, z1, rtol=1e-5, atol=1e-4)
    seeds = [torch.randn(t.shape, generator=g) for t in (o1, kv1, z1)]
    for o, kv, z in ((o1, kv1, z1), (o2, kv2, z2)):
        ((o * seeds[0]).sum() + (kv * seeds[1]).sum() + (z * seeds[2]).sum()).backward()
    for name, a, b in zip(("dq", "dk", "dv"), leaves[0], leaves[1]):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
