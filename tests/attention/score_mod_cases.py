"""Score-modifier cases (tfk.scores) and their check against the float64
reference, shared by the tests of every backend."""
import torch

import tfk
from tfk import scores as S
from tfk.ops.attention import attention_reference
from tolerances import FLOOR, assert_close


def _params(kind, H, Lq, Lk, D, g):
    """float64 parameter leaves of a modifier kind."""
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    if kind in ("alibi", "alibi+softcap"):
        return [S.alibi_slopes(H).double()]
    if kind in ("relative_bias", "relative_bias_causal"):
        return [r(16, H)]
    if kind == "adaptive_span":
        return [torch.tensor([3.0, 10.5, 30.0, 0.25][:H] + [7.0] * (H - 4), dtype=torch.float64)]
    if kind == "transformer_xl":
        return [0.5 * r(H, Lq + Lk - 1, D), 0.5 * r(H, D), 0.5 * r(H, D)]
    if kind == "transformer_xl_shared_r":
        return [0.5 * r(1, Lq + Lk - 1, D), 0.5 * r(H, D), 0.5 * r(H, D)]
    return []


def _modifier(kind, params):
    if kind == "alibi":
        return S.alibi(*params)
    if kind == "alibi+softcap":
        return [S.alibi(*params), S.softcap(4.0)]
    if kind == "relative_bias":
        return S.relative_bias(params[0], num_buckets=16, max_distance=40)
    if kind == "relative_bias_causal":
        return S.relative_bias(params[0], num_buckets=16, max_distance=40, bidirectional=False)
    if kind == "softcap":
        return S.softcap(1.5)
    if kind == "adaptive_span":
        return S.adaptive_span(params[0], ramp=8.0)
    if kind.startswith("transformer_xl"):
        return S.transformer_xl(*params)
    raise ValueError(kind)


KINDS = ["alibi", "alibi+softcap", "relative_bias", "relative_bias_causal", "softcap", "adaptive_span",
         "transformer_xl", "transformer_xl_shared_r"]
XL_KINDS = ("transformer_xl", "transformer_xl_shared_r")


def _run(fn_backend, kind, pattern, leaves, params, dout, dlse, scale=None):
    q, k, v = leaves
    out, lse = fn_backend(q, k, v, pattern, _modifier(kind, params), scale)
    loss = (out * dout.to(out.dtype)).sum() + (lse.masked_fill(torch.isinf(lse), 0) * dlse.to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, [*leaves, *params], allow_unused=True)
    return out.detach(), lse.detach(), grads


def check_score_mod(backend, dtype, kind, pattern, B=2, H=4, Hkv=2, Lq=70, Lk=70, D=16, seed=0):
    """tfk.attention(..., score_mod=<kind>, backend=backend) in dtype against
    the float64 reference: out, lse, dq, dk, dv and every parameter's
    gradient, at a tolerance set by the reference's own error in dtype."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(*s, generator=g, dtype=torch.float64)
                     for s in ((B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), (B, H, Lq, D)))
    dlse = torch.randn(B, H, Lq, generator=g, dtype=torch.float64)
    params = _params(kind, H, Lq, Lk, D, g)

    def leaves(dt, param_dt):
        return ([t.to(dt).requires_grad_() for t in (q, k, v)],
                [t.to(param_dt).requires_grad_() for t in params])

    def tfk_fn(be):
        return lambda q_, k_, v_, pat, mod, scale: tfk.attention(q_, k_, v_, pat, score_mod=mod, backend=be,
                                                                 return_lse=True, scale=scale)

    def lowp_fn(q_, k_, v_, pat, mod, scale):   # the reference's formulas in dtype: torch's own error
        allowed = None if pat is None else pat.dense_mask(Lq, Lk)
        mods = S.canonical(mod)
        return attention_reference(q_, k_, v_, allowed, None, scale, score_mod=mods)

    xl = kind in XL_KINDS
    ref = _run(tfk_fn("reference"), kind, pattern, *leaves(torch.float64, torch.float64), dout, dlse)
    low = _run(lowp_fn, kind, pattern, *leaves(dtype, dtype if xl else torch.float32), dout, dlse)
    got = _run(tfk_fn(backend), kind, pattern, *leaves(dtype, dtype if xl else torch.float32), dout, dlse)
    assert got[0].dtype == dtype
    for name, a, r_, l_ in (("out", got[0], ref[0], low[0]), ("lse", got[1], ref[1], low[1])):
        assert_close(name, a, r_, l_, dtype)
    for name, a, r_, l_ in zip(("dq", "dk", "dv"), got[2], ref[2], low[2]):
        assert_close(name, a, r_, l_, dtype)
    for i, (a, r_, l_) in enumerate(zip(got[2][3:], ref[2][3:], low[2][3:])):
        assert a is not None, f"parameter {i} of {kind} got no gradient"
        assert_param(f"{kind} parameter {i}", a, r_, l_, dtype)


def assert_param(what, got, ref, low, dtype):
    """A parameter's gradient (a sum over many scores): the rule of
    tolerances.py, with the floor scaled by the gradient's size."""
    from tolerances import FACTOR, max_err
    assert not torch.isnan(got).any(), f"{what}: NaN in the gradient"
    err, base = max_err(got, ref), max_err(low, ref)
    bound = FACTOR * base + FLOOR[dtype]["dq"] * max(1.0, float(ref.abs().max()))
    assert err <= bound, f"{what}: err {err:.3g} > bound {bound:.3g} (torch's err in {dtype}: {base:.3g})"
