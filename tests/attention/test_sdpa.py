"""tfk.scaled_dot_product_attention on every backend under test, against the
float64 reference: masks, broadcasting, GQA, causal alignment, scale, ranks,
dropout."""
import itertools

import pytest
import torch

import tfk
from tfk import dropout as drop
from tfk import patterns as P
from tfk.backends import AttentionCall, get_backend
from tfk.ops.attention import attention_reference, torch_sdpa
from helpers import (backend_params, check_against_reference, make_qkv, mask_cases, pattern_mask,
                     patterns_for_tests)
from tolerances import assert_close

MASK_IDS = list(mask_cases(1, 1, 4, 4))
def _with_sdpa():
    """The backends under test, and "sdpa" (torch's kernel: what "auto" runs
    on CPU for calls without a pattern, dropout or lse), for those calls."""
    return backend_params() + [pytest.param("sdpa", dt, id=f"sdpa-{str(dt)[6:]}")
                               for dt in (torch.float32, torch.float16)]


def _split(mask):
    """A mask case as the reference's (allowed, bias)."""
    if mask is None:
        return None, None
    return (mask, None) if mask.dtype == torch.bool else (None, mask)


def _as_given(mask, dtype):
    """A float mask case in the dtype under test, as a user passes it."""
    return mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)


@pytest.mark.parametrize("mask_id", MASK_IDS)
@pytest.mark.parametrize("backend,dtype", _with_sdpa())
def test_masks(backend, dtype, mask_id):
    """Bool and float masks, broadcast in several ways, with a fully masked
    row and -inf entries; the kernels read them through broadcast strides.
    ("sdpa" here shows torch's CPU kernel keeps tfk's rule for the empty row.)"""
    B, H, Lq, Lk, D = 2, 3, 65, 47, 40
    q, k, v, dout = make_qkv(B, H, H, Lq, Lk, D)
    mask = mask_cases(B, H, Lq, Lk)[mask_id]
    fn = lambda q_, k_, v_: tfk.scaled_dot_product_attention(q_, k_, v_, attn_mask=_as_given(mask, q_.dtype),
                                                             backend=backend)
    check_against_reference(fn, q, k, v, dout, dtype, *_split(mask))


@pytest.mark.parametrize("mask_id", ["bool_B1LS", "float_with_neg_inf"])
@pytest.mark.parametrize("backend,dtype", backend_params())
def test_masks_under_a_pattern(backend, dtype, mask_id):
    """The engine takes a pattern and a mask together (the public functions
    take one or the other): under a permuted layout, masks are read at
    original positions."""
    B, H, Lq, Lk, D = 2, 3, 65, 47, 40
    q, k, v, dout = make_qkv(B, H, H, Lq, Lk, D)
    mask = mask_cases(B, H, Lq, Lk)[mask_id]
    pattern = P.sliding_window(20, 0, dilation=2) | P.global_tokens(3)
    allowed, bias = _split(mask)
    pat = pattern_mask(pattern, Lq, Lk)
    fn = lambda q_, k_, v_: get_backend(backend).run(AttentionCall(
        q_, k_, v_, pattern, _as_given(mask, q_.dtype), D ** -0.5, 0.0, True))
    check_against_reference(fn, q, k, v, dout, dtype, allowed=pat if allowed is None else pat & allowed, bias=bias)


@pytest.mark.parametrize("Lq,Lk", [(33, 33), (20, 57), (57, 20)], ids=str)
@pytest.mark.parametrize("backend,dtype", _with_sdpa())
def test_causal_is_top_left_with_scale(backend, dtype, Lq, Lk):
    q, k, v, dout = make_qkv(1, 2, 2, Lq, Lk, 16)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool).tril()
    fn = lambda q_, k_, v_: tfk.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=0.3,
                                                             backend=backend)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=allowed, scale=0.3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,dtype", _with_sdpa())
def test_gqa_scale_and_value_dim(backend, dtype, causal):
    q, k, v, dout = make_qkv(2, 6, 2, 50, 50, 32, Dv=24)
    allowed = torch.ones(50, 50, dtype=torch.bool).tril() if causal else None
    fn = lambda q_, k_, v_: tfk.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, scale=0.11,
                                                             enable_gqa=True, backend=backend)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=allowed, scale=0.11)


# query and key/value shapes as torch's own sample inputs for this function
# use them (B, H, L, S, E = 4, 4, 3, 6, 8), and more: 2-D, 5-D, broadcast heads
BROADCAST_SHAPES = {
    "3d": ((4, 3, 8), (4, 6, 8)),
    "4d": ((4, 4, 3, 8), (4, 4, 6, 8)),
    "q3d_kv4d": ((4, 3, 8), (4, 4, 6, 8)),
    "2d": ((3, 8), (6, 8)),
    "5d_broadcast_batch": ((2, 3, 4, 3, 8), (3, 2, 6, 8)),
    "kv_one_head": ((4, 4, 3, 8), (4, 1, 6, 8)),
    "q_one_head": ((4, 1, 3, 8), (4, 4, 6, 8)),
}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("shapes", list(BROADCAST_SHAPES))
def test_shapes_broadcast_as_torchs(shapes, backend):
    """Leading dims broadcast between query, key, value and attn_mask, of any
    rank, with and without enable_gqa and is_causal: what torch accepts tfk
    accepts, with torch's result and gradients (torch in float64 is the
    oracle); what torch rejects tfk rejects with a named error."""
    sq, skv = BROADCAST_SHAPES[shapes]
    g = torch.Generator().manual_seed(0)
    make = lambda s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = make(sq), make(skv), make(skv)
    masks = [None, torch.rand(sq[-2], skv[-2], generator=g) < 0.6,
             torch.randn((1,) * (max(len(sq), len(skv)) - 2) + (sq[-2], skv[-2]), generator=g, dtype=torch.float64)]
    for causal, gqa, mask in itertools.product((False, True), (False, True), masks):
        if causal and mask is not None:
            continue
        kw = dict(is_causal=causal, enable_gqa=gqa, attn_mask=mask)
        try:
            want = torch_sdpa(q, k, v, **kw)
        except (RuntimeError, IndexError):  # torch's own errors for what it rejects
            with pytest.raises(ValueError):
                tfk.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
            continue
        got = tfk.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
        assert got.shape == want.shape, kw
        torch.testing.assert_close(got, want, msg=lambda m: f"{kw}: {m}")
        dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
            torch.testing.assert_close(a, b, msg=lambda m: f"{kw}: {m}")


DIRECT_CALLS = {  # (H, Hkv, Lq, Lk, kwargs): calls "auto" sends straight to torch's kernel on CPU
    "plain": (3, 3, 33, 47, {}),
    "causal_scale": (3, 3, 33, 47, {"is_causal": True, "scale": 0.3}),
    "gqa_decode": (6, 2, 1, 47, {"enable_gqa": True}),
    "gqa_same_heads": (3, 3, 33, 47, {"enable_gqa": True, "dropout_p": 0}),
    **{f"mask_{m}": (3, 3, 33, 47, {"attn_mask": m}) for m in MASK_IDS if m != "none"},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(DIRECT_CALLS))
def test_auto_on_cpu_takes_the_sdpa_backend_directly(case, dtype):
    """On CPU "auto" runs these calls on torch's kernel without building the
    canonical call: the same out and gradients, bit for bit, as backend "sdpa"
    through the full path (masks broadcast, an empty row, a mask with a
    gradient), recorded as "sdpa", the backend the full path's "auto" picks."""
    H, Hkv, Lq, Lk, kw = DIRECT_CALLS[case]
    q, k, v, dout = (t.to(dtype) for t in make_qkv(2, H, Hkv, Lq, Lk, 40))
    mask = kw.get("attn_mask")
    if mask is not None:
        mask = _as_given(mask_cases(2, H, Lq, Lk)[mask], dtype)
    runs = []
    for backend in ("auto", "sdpa"):
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
        m_ = None if mask is None else mask.detach().requires_grad_(mask.is_floating_point())
        with tfk.backends.record_choices() as ran:
            out = tfk.scaled_dot_product_attention(q_, k_, v_, **dict(kw, attn_mask=m_), backend=backend)
        out.backward(dout)
        runs.append((ran, [out, q_.grad, k_.grad, v_.grad, None if m_ is None else m_.grad]))
    (ran_auto, got), (ran_sdpa, want) = runs
    assert ran_auto == ran_sdpa == ["sdpa"]
    call = AttentionCall(q, k, v, P.causal() if kw.get("is_causal") else None, mask, 0.1, 0.0, False)
    assert tfk.backends.select_backend("auto", call).name == "sdpa", "the full path's choice too"
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


def test_direct_calls_skip_backend_selection(monkeypatch):
    """The decode-shaped call (a padding mask, GQA) never reaches
    select_backend; under TFK_BACKEND it does."""
    from tfk.ops.attention import api

    def select(*a):
        raise AssertionError("selected")

    monkeypatch.setattr(api, "select_backend", select)
    q, k, v = torch.randn(1, 8, 1, 32), torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    mask = torch.ones(1, 1, 1, 300, dtype=torch.bool)
    out = tfk.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(out, torch_sdpa(q, k, v, attn_mask=mask, enable_gqa=True))
    monkeypatch.setenv("TFK_BACKEND", "sdpa")
    with pytest.raises(AssertionError, match="selected"):
        tfk.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_dropout_zero_is_no_dropout_and_dropout_is_reproducible():
    q, k, v, _ = make_qkv(1, 2, 2, 40, 40, 16)
    a = tfk.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    torch.testing.assert_close(a, attention_reference(q, k, v)[0], rtol=1e-12, atol=1e-12)
    torch.manual_seed(3)
    b = tfk.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(3)
    c = tfk.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    d = tfk.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert torch.equal(b, c) and not torch.equal(b, d)


@pytest.mark.parametrize("pattern_id", ["dense", "longformer", "window_dilated"])
@pytest.mark.parametrize("backend,dtype", backend_params())
def test_dropout_equals_reference_given_its_mask(backend, dtype, pattern_id):
    """Every backend draws tfk.dropout's keep mask, bit for bit (at original
    positions under permuted layouts): out and grads match the float64
    reference given that mask, within the dtype's rounding."""
    B, H, Hkv, Lq, Lk, D, p = 2, 2, 1, 70, 100, 16, 0.25
    pattern = patterns_for_tests(H, Lq, Lk)[pattern_id]
    allowed = pattern_mask(pattern, Lq, Lk)
    q, k, v, dout = make_qkv(B, H, Hkv, Lq, Lk, D)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    out = tfk.attention(*leaves, pattern, dropout_p=p, backend=backend)
    out.backward(dout.to(dtype))
    torch.manual_seed(11)
    keep = drop.dense_keep_mask(drop.draw_seed(), B, H, Lq, Lk, p)

    def reference(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        r_out, _ = attention_reference(*leaves, allowed, dropout_p=p, keep=keep)
        r_out.backward(dout.to(dt))
        return [r_out] + [t.grad for t in leaves]

    # the reference in the dtype under test, same mask, sets the rounding scale
    for name, got, want, low in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves],
                                    reference(torch.float64), reference(dtype)):
        assert_close(name, got, want, low, dtype)


def test_dropout_statistics():
    """Keep rate 1 - p, independent neighbours, and an unbiased output: over
    many draws, the mean output is the undropped float64 reference within
    the Monte-Carlo error the reference itself predicts."""
    p = 0.3
    keep = drop.dense_keep_mask(12345, 4, 8, 256, 256, p)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 0.005
    x = keep.double() - keep.double().mean()
    corr = (x[..., 1:] * x[..., :-1]).mean() / x.var()
    assert abs(corr) < 0.01
    assert abs(drop.dense_keep_mask(1, 1, 1, 512, 512, 0.5).double().mean().item() - 0.5) < 0.01
    # E[dropout(P) @ V] = P @ V, and each draw's variance is p / (1 - p) * (P**2 @ V**2)
    q, k, v, _ = make_qkv(2, 4, 4, 64, 64, 16, seed=5)
    draws = 64
    torch.manual_seed(0)
    mean = torch.stack([tfk.scaled_dot_product_attention(q, k, v, dropout_p=p) for _ in range(draws)]).mean(0)
    want, _ = attention_reference(q, k, v)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    var = p / (1 - p) * (probs.square() @ v.square()) / draws
    z2 = ((mean - want).square() / var).mean().item()
    assert 0.9 < z2 < 1.1, f"mean squared z-score {z2:.3f} (1 for an unbiased output)"
