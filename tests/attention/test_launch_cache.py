"""The host state the kernel backends keep from call to call (Triton's launch
options and constexprs, cached per head dims, dtype, mask kind, dropout and
tile counting; the kernels' "no dropout" arguments) is never stale: calls that
differ from the one before in one such respect, run in turn in one process,
each match the reference backend (forward, lse and gradients), and each counts
the tiles of its own plan while counting."""
import pytest
import torch

import tfk
from tfk import patterns as P
from helpers import plan_tiles

# (name, dtype) in the order the calls run: a second dtype comes last
BACKENDS = {"triton": (torch.float32, torch.float16), "cuda-sim": (torch.float16, torch.bfloat16)}
TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _calls(D, dtype):
    """(kwargs of _run, what changes from the call before)."""
    base = dict(B=1, H=2, Hkv=2, Lq=40, Lk=40, D=D, Dv=D, pattern=None, mask=None, dropout_p=0.0, lse=True,
                dtype=dtype)
    # each head dim grows with the other one as before: a config cached for the smaller one fails
    steps = [("first", dict(Dv=D // 2)), ("smaller head dim", dict(D=D // 2)), ("larger head dims", {}),
             ("bool mask", dict(mask="bool")), ("float mask", dict(mask="float")), ("no mask", {}),
             ("dropout", dict(dropout_p=0.3)), ("no dropout", {}), ("causal", dict(pattern=P.causal())),
             ("gqa", dict(H=4, Hkv=2, pattern=P.causal())), ("no lse", dict(lse=False)),
             ("dilated layout", dict(pattern=P.sliding_window(16, dilation=4))),  # q and kv indices
             ("dropout in a layout", dict(pattern=P.sliding_window(16, dilation=4), dropout_p=0.3)),  # positions
             ("global rows, columns", dict(Lq=130, Lk=130, pattern=P.global_tokens(2))),  # one index each
             ("other lengths", dict(Lq=23, Lk=57, pattern=P.causal(bottom_right=True)))]
    return [(name, dict(base, **change)) for name, change in steps]


def _run(backend, B, H, Hkv, Lq, Lk, D, Dv, pattern, mask, dropout_p, lse, dtype, seed=0):
    """tfk.attention (or the drop-in, with a mask) on ``backend``: out, lse (or
    None) and the gradients, from inputs drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g).to(dtype).requires_grad_()
               for h, n, d in ((H, Lq, D), (Hkv, Lk, D), (Hkv, Lk, Dv)))
    dout = torch.randn(B, H, Lq, Dv, generator=g).to(dtype)
    torch.manual_seed(seed + 1)  # the dropout seed each backend draws
    if mask is None:
        res = tfk.attention(q, k, v, pattern, dropout_p=dropout_p, backend=backend, return_lse=lse)
        out, l = res if lse else (res, None)
    else:
        m = torch.rand(Lq, Lk, generator=g) < 0.8
        m = m if mask == "bool" else torch.zeros(Lq, Lk).masked_fill(~m, float("-inf")) + torch.rand(Lq, Lk, generator=g)
        out, l = tfk.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p, enable_gqa=H != Hkv,
                                                  backend=backend), None
    out.backward(dout)
    return out, l, q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_calls_in_turn_match_the_reference(backend):
    for dtype in BACKENDS[backend]:
        for name, kw in _calls(64 if backend == "cuda-sim" else 32, dtype):
            got = _run(backend, **kw)
            want = _run("reference", **kw)
            tol = TOL[dtype]
            for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
                if b is not None:
                    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol,
                                               msg=lambda m: f"{backend} {dtype}, {name}: {what}: {m}")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_tile_counts_follow_each_call(backend):
    """A call outside a counter, then the same inside one, then another
    shape: each counted call reports its own plan's tiles."""
    dtype = BACKENDS[backend][0]
    D = 64 if backend == "cuda-sim" else 32
    for L in (40, 40, 70):
        q = torch.randn(1, 2, L, D).to(dtype)
        tfk.attention(q, q, q, P.causal(), backend=backend)  # not counted
        with tfk.backends.count_tiles() as counts:
            tfk.attention(q, q, q, P.causal(), backend=backend)
        plan = tfk.plan.get_plan(P.causal(), L, L, *plan_tiles(backend, D, dtype))
        assert counts["forward"] == 2 * plan.num_tiles, (L, counts)
