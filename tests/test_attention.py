"""tfk.attention on every backend that runs here, against the float64
reference: forward, lse and every gradient, for every pattern."""
import pytest
import torch

import tfk
from helpers import DTYPES, PATTERN_IDS, check_against_reference, make_qkv, pattern_mask, patterns_for_tests

# (B, H, Hkv, Lq, Lk, D, Dv): awkward sizes, GQA, Lq != Lk, Dv != D
SHAPES = {
    "gqa_97": (2, 4, 2, 97, 97, 40, 40),
    "mqa_63x130_d80": (1, 3, 1, 63, 130, 80, 24),
}
LONG_SHAPES = {
    "1025_d64": (1, 2, 2, 1025, 1025, 64, 64),
    "gqa_300x257_d128": (2, 8, 2, 300, 257, 128, 128),
}
BACKENDS = ["triton", "torch", "reference"]


def _case(backend, pattern_id, shape, dtype):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    pattern = patterns_for_tests(H, Lq, Lk)[pattern_id]
    q, k, v, dout = make_qkv(B, H, Hkv, Lq, Lk, D, Dv, seed=hash(pattern_id) % 1000)
    fn = lambda q_, k_, v_: tfk.attention(q_, k_, v_, pattern, backend=backend, return_lse=True)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=pattern_mask(pattern, Lq, Lk))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention(backend, pattern_id, shape, dtype):
    _case(backend, pattern_id, SHAPES[shape], dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", list(LONG_SHAPES), ids=str)
@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
def test_attention_long(pattern_id, shape, dtype):
    _case("torch", pattern_id, LONG_SHAPES[shape], dtype)


def test_custom_scale_and_lse_gradient():
    """scale is honoured, and a loss on lse back-propagates correctly."""
    pattern = tfk.patterns.sliding_window(30, 3)
    q, k, v, _ = make_qkv(1, 2, 2, 77, 77, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = tfk.attention(*leaves, pattern, scale=0.3, backend="torch", return_lse=True)
    (out.sum() + (lse * torch.linspace(-1, 1, 77, dtype=torch.float64)).sum()).backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = tfk.ops.attention.attention_reference(*ref, pattern.dense_mask(77, 77), scale=0.3)
    (r_out.sum() + (r_lse * torch.linspace(-1, 1, 77, dtype=torch.float64)).sum()).backward()
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(lse, r_lse)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_rows_with_no_key_give_zero_and_no_nan():
    """Bottom-right causal with Lq > Lk leaves the first queries with no key:
    out 0, lse -inf, grads 0."""
    pattern = tfk.patterns.causal(bottom_right=True)
    q, k, v, dout = make_qkv(1, 2, 2, 40, 20, 8)  # bottom-right: queries 0..19 see nothing
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = tfk.attention(*leaves, pattern, backend="torch", return_lse=True)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    out.backward(dout)
    assert torch.equal(leaves[0].grad[:, :, :20], torch.zeros_like(leaves[0].grad[:, :, :20]))
    assert all(torch.isfinite(t.grad).all() for t in leaves)
