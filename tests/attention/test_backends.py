"""The backend registry: auto by priority, TFK_BACKEND, reasons on refusal,
and a visible warning whenever "auto" falls back past a backend that refused."""
import warnings

import pytest
import torch

import tfk
from tfk import backends
from tfk.ops.attention import attention_reference


class Refusing(backends.Backend):
    name = "refusing"
    priority = 1000

    def reasons(self, call):
        return ["head dim 16 is not supported", "needs a GPU"]

    def run(self, call):
        raise AssertionError("never runs")


@pytest.fixture
def refusing():
    b = backends.register_backend(Refusing())
    yield b
    del backends._BACKENDS[b.name]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(backends, "_WARNED", set())


def test_registry_lists_backends():
    names = tfk.backend_names()
    assert {"torch", "sdpa", "reference"} <= set(names)
    assert names.index("sdpa") < names.index("torch") < names.index("reference")


def test_a_named_backend_lists_every_reason(refusing):
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(tfk.BackendUnavailable, match="head dim 16 is not supported; needs a GPU"):
        tfk.attention(q, q, q, backend="refusing")


def test_auto_falls_back_with_a_warning_naming_the_reason_once(refusing):
    q = torch.randn(1, 1, 8, 16)
    with backends.record_choices() as ran:
        with pytest.warns(tfk.FallbackWarning, match=r"on 'torch', because refusing: head dim 16 is not supported"):
            tfk.attention(q, q, q, tfk.patterns.sliding_window(3))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tfk.attention(q, q, q, tfk.patterns.sliding_window(3))  # the same fallback warns once
    assert ran == ["torch", "torch"]


def test_a_registered_backend_is_asked_about_plain_calls(refusing):
    """A backend registered above "sdpa" is asked about every call, the plain
    CPU ones "auto" otherwise sends straight to torch's kernel included."""
    q = torch.randn(1, 1, 8, 16)
    with backends.record_choices() as ran:
        with pytest.warns(tfk.FallbackWarning, match=r"on 'sdpa', because refusing: head dim 16"):
            tfk.scaled_dot_product_attention(q, q, q)
    assert ran == ["sdpa"]


def test_routing_is_not_a_fallback():
    """On CPU "auto" sends pattern calls to the block engine and plain ones to
    torch's kernel: by design, without a warning."""
    q = torch.randn(1, 1, 8, 16)
    with warnings.catch_warnings(), backends.record_choices() as ran:
        warnings.simplefilter("error")
        tfk.attention(q, q, q, tfk.patterns.sliding_window(3))
        tfk.scaled_dot_product_attention(q, q, q, is_causal=True)
        tfk.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    assert ran == ["torch", "sdpa", "sdpa"]


def test_env_overrides_auto(monkeypatch):
    q = torch.randn(1, 1, 8, 16)
    monkeypatch.setenv("TFK_BACKEND", "reference")
    with backends.record_choices() as ran:
        tfk.scaled_dot_product_attention(q, q, q)
    assert ran == ["reference"]
    monkeypatch.setenv("TFK_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be"):
        tfk.scaled_dot_product_attention(q, q, q)


def test_mask_gradients():
    """On CPU torch's kernel ("sdpa") differentiates attn_mask: the gradients
    match the float64 reference's. With dropout it cannot take the call, and
    the block engine has no mask gradient: "auto" falls back to the reference,
    visibly."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(8, 8, generator=g, dtype=torch.float64)
    grads, routes = [], []
    for fn in (lambda *a, attn_mask: tfk.scaled_dot_product_attention(*a, attn_mask=attn_mask),
               lambda *a, attn_mask: attention_reference(*a, bias=attn_mask)[0]):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        with warnings.catch_warnings(), backends.record_choices() as ran:
            warnings.simplefilter("error")
            out = fn(*leaves[:3], attn_mask=leaves[3])
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out))
        grads.append([out] + [t.grad for t in leaves])
        routes.append(ran)
    assert routes == [["sdpa"], []], "torch's kernel took the call, with no fallback warning"
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    x, mask = q.float().requires_grad_(), bias.float().requires_grad_()
    with pytest.raises(tfk.BackendUnavailable, match="attn_mask"):
        tfk.scaled_dot_product_attention(x, x, x, attn_mask=mask, backend="torch")
    with backends.record_choices() as ran, pytest.warns(tfk.FallbackWarning, match="no gradient with respect to attn_mask"):
        out = tfk.scaled_dot_product_attention(x, x, x, attn_mask=mask, dropout_p=0.1)
    assert ran == ["reference"]
    out.sum().backward()
    assert mask.grad is not None and mask.grad.shape == (8, 8)


def test_fp32_on_a_gpu_without_tf32_is_a_visible_fallback():
    """fp32 CUDA tensors are meant for "triton" (its auto_for holds), which
    refuses them unless tf32 is allowed: "auto" then falls back with the
    FallbackWarning above, naming that reason. (A stand-in for a CUDA tensor:
    no GPU here.)"""
    class CudaTensor:
        is_cuda, device, dtype, shape, requires_grad = True, torch.device("cuda"), torch.float32, (1, 1, 8, 16), False

    triton = backends.get_backend("triton")
    x = CudaTensor()
    call = backends.AttentionCall(x, x, x, None, None, 0.25, 0.0, False)
    matmul = torch.backends.cuda.matmul
    allowed = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert triton.auto_for(call)
        assert any("allow_tf32" in r for r in triton.reasons(call))
        matmul.allow_tf32 = True
        assert not any("allow_tf32" in r for r in triton.reasons(call))
    finally:
        matmul.allow_tf32 = allowed
