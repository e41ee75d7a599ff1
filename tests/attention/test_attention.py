"""tfk.attention on every backend under test ("torch", "triton" in Triton's
interpreter, "cuda-sim": the CUDA kernels on the host-execution layer) against
the float64 reference: forward, lse and every gradient, for every pattern; the
tiles each backend visits; and what the kernel backends share (head dims,
torch.compile, opcheck, what each refuses)."""
import pytest
import torch

import tfk
from tfk import patterns as P
from tfk.backends import AttentionCall, get_backend, select_backend
from tfk.ops.attention import attention_reference
from tfk.plan import plan_id
from helpers import (PATTERN_IDS, VISIT_PATTERN_IDS, backend_params, check_against_reference,
                     check_backend_visits_the_plan, make_qkv, pattern_mask, patterns_for_tests, plan_tiles,
                     stable_seed)
from tolerances import assert_close

# (B, H, Hkv, Lq, Lk, D, Dv): awkward sizes, GQA and MQA, Lq != Lk, Dv != D
SHAPES = {
    "gqa_97_d40": (2, 4, 2, 97, 97, 40, 40),
    "mqa_63x130_d80_dv24": (1, 3, 1, 63, 130, 80, 24),
}
LONG_SHAPES = {
    "1025_d64": (1, 2, 2, 1025, 1025, 64, 64),
    "gqa_300x257_d128": (2, 8, 2, 300, 257, 128, 128),
}


def _case(backend, pattern_id, shape, dtype):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    pattern = patterns_for_tests(H, Lq, Lk)[pattern_id]
    q, k, v, dout = make_qkv(B, H, Hkv, Lq, Lk, D, Dv, seed=stable_seed(pattern_id, shape))
    fn = lambda q_, k_, v_: tfk.attention(q_, k_, v_, pattern, backend=backend, return_lse=True)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=pattern_mask(pattern, Lq, Lk))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
@pytest.mark.parametrize("backend,dtype", backend_params())
def test_attention(backend, dtype, pattern_id, shape):
    _case(backend, pattern_id, SHAPES[shape], dtype)


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(LONG_SHAPES))
@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
@pytest.mark.parametrize("backend,dtype", backend_params(["torch", "cuda-sim"])
                         + [pytest.param("torch", torch.float64, id="torch-float64")])
def test_attention_long(backend, dtype, pattern_id, shape):
    _case(backend, pattern_id, LONG_SHAPES[shape], dtype)


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_scale_and_lse_gradient(backend, dtype):
    """scale is honoured, and a loss on lse back-propagates (through delta in
    the kernels) as the reference's does."""
    pattern = P.sliding_window(30, 3)
    q, k, v, dout = make_qkv(1, 2, 1, 50, 77, 24)
    weight = torch.linspace(-1, 1, 50, dtype=torch.float64)
    allowed = pattern.dense_mask(50, 77)

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        ((out.double() * dout).sum() + (lse.double() * weight).sum()).backward()
        return [out, lse] + [t.grad for t in leaves]

    ref = lambda *a: attention_reference(*a, allowed, scale=0.3)
    want = grads(ref, torch.float64)
    base = grads(ref, dtype)  # the same arithmetic in the dtype under test sets the scale of its error
    got = grads(lambda *a: tfk.attention(*a, pattern, scale=0.3, backend=backend, return_lse=True), dtype)
    for name, g, w, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, base):
        assert_close(name, g, w, b, dtype)


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_rows_with_no_key_give_zero_and_no_nan(backend, dtype):
    """Bottom-right causal with Lq > Lk leaves the first queries with no key:
    out 0, lse -inf, gradients 0."""
    pattern = P.causal(bottom_right=True)
    q, k, v, dout = make_qkv(1, 2, 2, 40, 20, 16)  # queries 0..19 see nothing
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = tfk.attention(*leaves, pattern, backend=backend, return_lse=True)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    out.backward(dout.to(dtype))
    assert torch.equal(leaves[0].grad[:, :, :20], torch.zeros_like(leaves[0].grad[:, :, :20]))
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_one_token_sequences(backend, dtype):
    for Lq, Lk in ((1, 1), (1, 70), (70, 1)):
        q, k, v, dout = make_qkv(1, 2, 1, Lq, Lk, 16)
        fn = lambda *a: tfk.attention(*a, backend=backend, return_lse=True)
        check_against_reference(fn, q, k, v, dout, dtype)


def test_empty_sequences():
    q = torch.randn(1, 2, 0, 8)
    assert tfk.scaled_dot_product_attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)).shape == (1, 2, 0, 8)
    out, lse = tfk.attention(torch.randn(1, 2, 4, 8), q, q, return_lse=True)
    assert torch.equal(out, torch.zeros(1, 2, 4, 8)) and torch.isneginf(lse).all()


HEAD_DIMS = [  # (backend, dtype, D, Dv)
    *[("triton", torch.float32, D, Dv) for D, Dv in [(16, 16), (72, 40), (200, 136), (256, 256)]],
    *[("cuda-sim", dt, D, Dv) for dt in (torch.float16, torch.bfloat16)
      for D, Dv in [(64, 64), (128, 128), (16, 16), (128, 96), (72, 40)]],  # 64 and 128 native, others padded
    *[("torch", torch.float32, D, Dv) for D, Dv in [(72, 40), (200, 136)]],
]


@pytest.mark.parametrize("backend,dtype,D,Dv", [pytest.param(*c, id=f"{c[0]}-{str(c[1])[6:]}-{c[2]}x{c[3]}")
                                                for c in HEAD_DIMS])
def test_head_dims(backend, dtype, D, Dv):
    """Head dims up to each backend's limit, powers of two or not, D != Dv."""
    q, k, v, dout = make_qkv(1, 2, 1, 45, 70, D, Dv)
    pattern = P.sliding_window(30, 8)
    fn = lambda *a: tfk.attention(*a, pattern, backend=backend, return_lse=True)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=pattern_mask(pattern, 45, 70))


# One dtype and head dim per backend for the checks that are not numerical.
SETUPS = {"torch": (torch.float32, 16), "triton": (torch.float32, 16), "cuda-sim": (torch.float16, 64)}


@pytest.mark.parametrize("pattern_id", VISIT_PATTERN_IDS)
@pytest.mark.parametrize("backend", list(SETUPS))
def test_backend_visits_exactly_the_plan(backend, pattern_id):
    """Counted where scores are computed (inside the kernels, or at the torch
    engine's score matmul): no dense fallback inside a sparse pattern, no
    padding tile, in the forward and in every backward pass."""
    dtype, D = SETUPS[backend]
    B, H, Hkv, L = 2, 4, 2, 150
    check_backend_visits_the_plan(backend, patterns_for_tests(H, L, L)[pattern_id], dtype, B, H, Hkv, L, D)


@pytest.mark.parametrize("L,pattern", [(1024, P.causal()), (4096, P.sliding_window(256) | P.global_tokens(4))],
                         ids=["causal_1024", "longformer_4096"])
def test_torch_engine_scores_only_the_plans_tiles_at_length(L, pattern):
    """Schedule rows of different lengths (causal; a window with global rows)
    cost their own tiles, not the longest row's."""
    check_backend_visits_the_plan("torch", pattern, torch.float32, 1, 1, 1, L, 8)


@pytest.mark.parametrize("pattern_id", ["longformer", "window_dilated", "block_layout_per_head"])
def test_torch_engine_thread_pool(monkeypatch, pattern_id):
    """Large CPU calls run their (batch, key head) units on a thread pool: the
    same tiles, the reference's results (GQA, permuted layouts, per-head
    schedules), and inference mode carried into the workers."""
    from tfk.ops.attention import torch_blocks
    monkeypatch.setattr(torch_blocks, "PARALLEL_SCORES", 0)
    monkeypatch.setattr(torch_blocks, "_POOL", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        B, H, Hkv, L = 2, 4, 2, 150
        pattern = patterns_for_tests(H, L, L)[pattern_id]
        check_backend_visits_the_plan("torch", pattern, torch.float32, B, H, Hkv, L, 16)
        q, k, v, dout = make_qkv(B, H, Hkv, L, L, 16)
        fn = lambda *a: tfk.attention(*a, pattern, backend="torch", return_lse=True)
        check_against_reference(fn, q, k, v, dout, torch.float32, allowed=pattern_mask(pattern, L, L))
        assert torch_blocks._POOL, "the pool ran"
        with torch.inference_mode():
            out = tfk.attention(q.float(), k.float(), v.float(), pattern, backend="torch")
        torch.testing.assert_close(out, fn(q.float(), k.float(), v.float())[0])
    finally:
        torch.set_num_threads(threads)


KERNEL_OPS = {"torch": "torch_attention_fwd", "triton": "triton_attention_fwd", "cuda-sim": "cuda_attention_fwd"}


@pytest.mark.parametrize("backend", list(KERNEL_OPS) + ["auto"])
def test_torch_compile_fullgraph(backend):
    """The custom ops trace without a graph break, forward and backward, and
    so does "auto"'s choice (the block engine and torch's kernel on CPU)."""
    dtype, D = SETUPS.get(backend, (torch.float32, 16))
    pattern = P.sliding_window(20) | P.global_tokens(2)

    def f(q, k, v):
        a = tfk.attention(q, k, v, pattern, backend=backend)
        b = tfk.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
        return a + b

    q, k, v = (torch.randn(1, 2, 70, D, dtype=dtype, requires_grad=True) for _ in range(3))
    out = torch.compile(f, fullgraph=True)(q, k, v)
    out.float().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = f(q, k, v)
    want.float().sum().backward()
    torch.testing.assert_close(out, want)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("backend", list(KERNEL_OPS))
def test_opcheck(backend):
    dtype, D = SETUPS[backend]
    q, k, v = (torch.randn(1, 2, 40, D, dtype=dtype) for _ in range(3))
    ident = plan_id(P.sliding_window(8, 2), 40, 40, *plan_tiles(backend, D, dtype), q.device)
    mask = torch.rand(40, 40) < 0.9
    op = getattr(torch.ops.tfk, KERNEL_OPS[backend]).default
    for args in [(q, k, v, None, ident, 0.25, 0.0, 0), (q.requires_grad_(), k, v, mask, ident, 0.25, 0.1, 7)]:
        torch.library.opcheck(op, args)


def _call(q, k=None, v=None, **kw):
    return AttentionCall(**dict(dict(q=q, k=q if k is None else k, v=q if v is None else v, pattern=None,
                                     attn_mask=None, scale=1.0, dropout_p=0.0, return_lse=False), **kw))


def _t(D=16, dtype=torch.float32, **kw):
    return torch.randn(1, 1, 8, D, dtype=dtype, **kw)


REFUSALS = {  # backend: [(call, a reason it must give)]; the first call of each runs
    "torch": [(_call(_t()), None),
              (_call(_t(requires_grad=True), attn_mask=torch.zeros(8, 8, requires_grad=True)), "attn_mask")],
    "sdpa": [(_call(_t()), None), (_call(_t(), attn_mask=torch.ones(8, 8, dtype=torch.bool)), None),
             (_call(_t(), pattern=P.sliding_window(2)), "pattern"),
             (_call(_t(), dropout_p=0.1), "dropout"), (_call(_t(), return_lse=True), "return_lse")],
    "triton": [(_call(_t()), None), (_call(_t(dtype=torch.bfloat16)), "bfloat16"),
               (_call(_t(dtype=torch.float64)), "float64"), (_call(_t(320)), "head dim 320")],
    "cuda-sim": [(_call(_t(64, torch.float16)), None), (_call(_t(64)), "float32"),
                 (_call(_t(136, torch.float16)), "head dim 136 > 128")],
    "cuda": [(_call(_t(64, torch.float16)), "needs CUDA tensors")],
}


@pytest.mark.parametrize("backend", list(REFUSALS))
def test_refusals_name_the_reason(backend):
    for call, reason in REFUSALS[backend]:
        why = get_backend(backend).reasons(call)
        if reason is None:
            assert why == []
        else:
            assert any(reason in r for r in why), why
            with pytest.raises(tfk.BackendUnavailable, match=reason):
                select_backend(backend, call)


def test_auto_on_cpu():
    """torch's fused kernel for what it computes as tfk does, the block engine
    for the rest; never an interpreter or the host-execution layer."""
    x = _t()
    assert select_backend("auto", _call(x)).name == "sdpa"
    assert select_backend("auto", _call(x, pattern=P.causal())).name == "sdpa"
    assert select_backend("auto", _call(x, attn_mask=torch.ones(8, 8, dtype=torch.bool))).name == "sdpa"
    for kw in (dict(pattern=P.sliding_window(2)), dict(dropout_p=0.1), dict(return_lse=True)):
        assert select_backend("auto", _call(x, **kw)).name == "torch"
    assert select_backend("auto", _call(_t(64, torch.float16), pattern=P.sliding_window(2))).name == "torch"
