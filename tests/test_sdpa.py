"""tfk.scaled_dot_product_attention against torch's function and the
float64 reference: masks, broadcasting, GQA, causal alignment, ranks,
dropout."""
import pytest
import torch

import tfk
from tfk import dropout as drop
from tfk.ops.attention import attention_reference, torch_sdpa
from helpers import DTYPES, check_against_reference, make_qkv, mask_cases

BACKENDS = ["triton", "torch", "reference"]


MASK_IDS = list(mask_cases(1, 1, 4, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_id", MASK_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masks(backend, mask_id, dtype):
    B, H, Lq, Lk, D = 2, 3, 65, 47, 40
    q, k, v, dout = make_qkv(B, H, H, Lq, Lk, D)
    mask = mask_cases(B, H, Lq, Lk)[mask_id]
    allowed = mask if mask is not None and mask.dtype == torch.bool else None
    bias = mask if mask is not None and mask.is_floating_point() else None
    fn = lambda q_, k_, v_: tfk.scaled_dot_product_attention(
        q_, k_, v_, attn_mask=None if mask is None else (mask if allowed is not None else mask.to(q_.dtype)),
        backend=backend)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=allowed, bias=bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(33, 33), (20, 57), (57, 20)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_is_top_left(backend, Lq, Lk, dtype):
    q, k, v, dout = make_qkv(1, 2, 2, Lq, Lk, 16)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool).tril()
    fn = lambda q_, k_, v_: tfk.scaled_dot_product_attention(q_, k_, v_, is_causal=True, backend=backend)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=allowed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_scale_and_value_dim(causal, dtype):
    q, k, v, dout = make_qkv(2, 6, 2, 50, 50, 32, Dv=24)
    allowed = torch.ones(50, 50, dtype=torch.bool).tril() if causal else None
    fn = lambda q_, k_, v_: tfk.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, scale=0.11,
                                                             enable_gqa=True)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=allowed, scale=0.11)


@pytest.mark.parametrize("shape", [(3, 40, 16), (2, 3, 4, 40, 16)], ids=str)
def test_other_ranks_match_torch(shape):
    """3-D (N, L, E) and 5-D inputs, as torch accepts them."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(shape[-2], shape[-2], generator=g) < 0.5
    got = tfk.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = torch_sdpa(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want)
    dq, = torch.autograd.grad(got.sum(), q)
    dq_t, = torch.autograd.grad(want.sum(), q)
    torch.testing.assert_close(dq, dq_t)


def test_dropout_zero_is_exact_and_dropout_is_reproducible():
    q, k, v, _ = make_qkv(1, 2, 2, 40, 40, 16)
    a = tfk.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    torch.testing.assert_close(a, torch_sdpa(q, k, v))
    torch.manual_seed(3)
    b = tfk.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(3)
    c = tfk.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    d = tfk.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert torch.equal(b, c) and not torch.equal(b, d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", [None, tfk.patterns.sliding_window(20, 4) | tfk.patterns.global_tokens(2)],
                         ids=["dense", "longformer"])
def test_dropout_equals_reference_given_its_mask(backend, pattern):
    """The mask a call used is obtainable (same seed), and out and grads equal
    the float64 reference's given that mask."""
    B, H, L, p = 2, 2, 70, 0.25
    q, k, v, dout = make_qkv(B, H, 1, L, L, 16)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    out = tfk.attention(*leaves, pattern, dropout_p=p, backend=backend)
    out.backward(dout.float())
    torch.manual_seed(11)
    keep = drop.dense_keep_mask(drop.draw_seed(), B, H, L, L, p)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    allowed = None if pattern is None else pattern.dense_mask(L, L)
    r_out, _ = attention_reference(*ref, allowed, dropout_p=p, keep=keep)
    r_out.backward(dout)
    close = lambda a, b: torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    close(out, r_out)
    for a, b in zip(leaves, ref):
        close(a.grad, b.grad)


def test_dropout_statistics():
    """Keep rate 1 - p, independent neighbours, and an unbiased output."""
    p = 0.3
    keep = drop.dense_keep_mask(12345, 4, 8, 256, 256, p)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 0.005
    x = keep.double() - keep.double().mean()
    corr = (x[..., 1:] * x[..., :-1]).mean() / x.var()
    assert abs(corr) < 0.01
    assert abs(drop.dense_keep_mask(1, 1, 1, 512, 512, 0.5).double().mean().item() - 0.5) < 0.01
    # E[dropout(P) @ V] = P @ V: with V = 1 every row's output averages to 1
    q, k, _, _ = make_qkv(2, 4, 4, 128, 128, 16)
    v = torch.ones(2, 4, 128, 8, dtype=torch.float64)
    outs = torch.stack([tfk.scaled_dot_product_attention(q, k, v, dropout_p=p) for _ in range(8)])
    assert abs(outs.mean().item() - 1.0) < 0.01
    # torch's own dropout agrees in the mean (a statistical peer, not the same bits)
    torch_outs = torch.stack([torch_sdpa(q, k, v, dropout_p=p) for _ in range(8)])
    assert abs(outs.mean().item() - torch_outs.mean().item()) < 0.02
    assert abs(outs.std().item() - torch_outs.std().item()) < 0.1 * torch_outs.std().item()


def test_empty_sequences():
    q = torch.randn(1, 2, 0, 8)
    k = torch.randn(1, 2, 5, 8)
    assert tfk.scaled_dot_product_attention(q, k, k).shape == (1, 2, 0, 8)
    out, lse = tfk.attention(torch.randn(1, 2, 4, 8), q, q, return_lse=True)
    assert torch.equal(out, torch.zeros(1, 2, 4, 8)) and torch.isneginf(lse).all()
