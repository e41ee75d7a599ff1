"""Backend "triton" specifics (its numerics run in test_attention.py and
test_sdpa.py): tiles counted inside the kernels, head dims, torch.compile,
opcheck, and what it refuses."""
import pytest
import torch

import tfk
from tfk import patterns as P
from tfk.ops.attention import triton_backend
from tfk.triton_kernels import attention as kernels
from helpers import (VISIT_PATTERN_IDS, check_against_reference, check_kernels_visit_the_plan, make_qkv,
                     pattern_mask)


@pytest.mark.parametrize("pattern_id", VISIT_PATTERN_IDS)
def test_kernels_visit_exactly_the_plan(pattern_id, monkeypatch):
    """Counted by the kernels themselves: no dense fallback inside a sparse pattern."""
    check_kernels_visit_the_plan("triton", kernels, pattern_id, torch.float32, 16,
                                 kernels.tile_config(16, torch.float32), monkeypatch)


@pytest.mark.parametrize("D,Dv", [(16, 16), (72, 40), (200, 136), (256, 256)], ids=str)
def test_head_dims(D, Dv):
    """Head dims up to 256, powers of two or not, D != Dv."""
    q, k, v, dout = make_qkv(1, 2, 1, 45, 70, D, Dv)
    pattern = P.sliding_window(30, 8)
    fn = lambda *a: tfk.attention(*a, pattern, backend="triton", return_lse=True)
    check_against_reference(fn, q, k, v, dout, torch.float32, allowed=pattern_mask(pattern, 45, 70))


def test_torch_compile_fullgraph():
    pattern = P.sliding_window(20) | P.global_tokens(2)

    def f(q, k, v):
        a = tfk.attention(q, k, v, pattern, backend="triton")
        b = tfk.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
        return a + b

    q, k, v = (torch.randn(1, 2, 70, 16, requires_grad=True) for _ in range(3))
    out = torch.compile(f, fullgraph=True)(q, k, v)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = f(q, k, v)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


def test_opcheck():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    pattern = P.sliding_window(8, 2)
    plan_id = triton_backend._plan_id(pattern, 40, 40, 16, q.dtype, q.device)
    mask = torch.rand(40, 40) < 0.9
    for args in [(q, k, v, None, plan_id, 0.25, 0.0, 0), (q.requires_grad_(), k, v, mask, plan_id, 0.25, 0.1, 7)]:
        torch.library.opcheck(torch.ops.tfk.triton_attention_fwd.default, args)


def test_refusals_and_auto():
    q = torch.randn(1, 1, 8, 16)
    reasons = lambda **kw: triton_backend.TritonBackend().reasons(tfk.backends.AttentionCall(
        **dict(dict(q=q, k=q, v=q, pattern=None, attn_mask=None, scale=1.0, dropout_p=0.0, return_lse=False), **kw)))
    assert any("bfloat16" in r for r in reasons(q=q.bfloat16(), k=q.bfloat16(), v=q.bfloat16()))
    assert any("float64" in r for r in reasons(q=q.double(), k=q.double(), v=q.double()))
    big = torch.randn(1, 1, 8, 320)
    assert any("head dim 320" in r for r in reasons(q=big, k=big, v=big))
    assert reasons() == []
    # on CPU tensors "auto" never picks the interpreter
    assert tfk.backends.select_backend("auto", tfk.backends.AttentionCall(
        q, q, q, None, None, 1.0, 0.0, False)).name == "torch"
