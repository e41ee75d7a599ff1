"""The reference itself (the oracle of every other test, never its own): against
torch SDPA in float64 and cases computed by hand."""
import math

import torch

import tfk
from tfk import dropout as drop
from tfk.ops.attention import attention_reference, torch_sdpa


def test_matches_torch_sdpa_in_float64():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 30, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 25, 16, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.rand(2, 1, 30, 25, generator=g) < 0.7
    bias = torch.randn(30, 25, generator=g, dtype=torch.float64)
    out, _ = attention_reference(q, k, v, allowed, bias, scale=0.2)
    want = torch_sdpa(q, k, v, attn_mask=bias.masked_fill(~allowed, float("-inf")), scale=0.2, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_hand_computed():
    # one query, two keys with scores a and b after scaling
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0, 10.0], [3.0, 30.0]]]], dtype=torch.float64)
    out, lse = attention_reference(q, k, v, scale=1.0)
    a, b = 2.0, 0.0
    wa, wb = math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))
    torch.testing.assert_close(out, torch.tensor([[[[wa * 1 + wb * 3, wa * 10 + wb * 30]]]], dtype=torch.float64))
    torch.testing.assert_close(lse, torch.tensor([[[math.log(math.exp(a) + math.exp(b))]]], dtype=torch.float64))


def test_row_with_no_key_is_zero_with_zero_gradients():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    allowed = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    bias = torch.zeros(3, 3, dtype=torch.float64)
    bias[2] = float("-inf")  # row 2 emptied by the bias instead
    out, lse = attention_reference(q, k, v, allowed, bias)
    assert torch.equal(out[0, 0, 0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(out[0, 0, 2], torch.zeros(4, dtype=torch.float64))
    assert torch.isneginf(lse[0, 0, 0]) and torch.isneginf(lse[0, 0, 2])
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, 0, 0], torch.zeros(4, dtype=torch.float64))


def test_reference_backend_mask_gradient_matches_torch():
    """Backend "reference" (what "auto" falls back to for a float mask that
    requires grad): out and every gradient, the mask's included, as torch's
    own function computes them in float64."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(4, 9, 11, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda *a, attn_mask: tfk.scaled_dot_product_attention(*a, attn_mask=attn_mask, enable_gqa=True,
                                                                      backend="reference"),
               lambda *a, attn_mask: torch_sdpa(*a, attn_mask=attn_mask, enable_gqa=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = fn(*leaves[:3], attn_mask=leaves[3])
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out))
        grads.append([out] + [t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_backend_dropout_by_definition():
    """With dropout: softmax(scores) * keep / (1 - p) @ v, written out here from
    the keep mask tfk.dropout.dense_keep_mask gives for the call's seed."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(5)
    out = tfk.attention(q, k, v, tfk.patterns.causal(), dropout_p=0.4, backend="reference")
    torch.manual_seed(5)
    keep = drop.dense_keep_mask(drop.draw_seed(), 1, 2, 7, 7, 0.4)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    want = (torch.softmax(scores, -1) * keep / 0.6) @ v
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
