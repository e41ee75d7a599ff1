"""The backend registry: auto by priority, TFK_BACKEND, reasons on refusal."""
import pytest
import torch

import tfk
from tfk import backends


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


def _spy(monkeypatch, name):
    calls = []
    backend = backends.get_backend(name)
    run = backend.run
    monkeypatch.setattr(backend, "run", lambda call: calls.append(name) or run(call))
    return calls


def test_registry_lists_backends():
    names = tfk.backend_names()
    assert {"torch", "reference"} <= set(names)
    assert names.index("torch") < names.index("reference"), "torch outranks the reference"


def test_auto_skips_a_refusing_backend_and_named_one_lists_every_reason(refusing, monkeypatch):
    q = torch.randn(1, 1, 8, 16)
    calls = _spy(monkeypatch, "torch")
    tfk.attention(q, q, q, tfk.patterns.causal())
    assert calls == ["torch"]
    with pytest.raises(tfk.BackendUnavailable, match="head dim 16 is not supported; needs a GPU"):
        tfk.attention(q, q, q, backend="refusing")


def test_env_overrides_auto(monkeypatch):
    q = torch.randn(1, 1, 8, 16)
    calls = _spy(monkeypatch, "reference")
    monkeypatch.setenv("TFK_BACKEND", "reference")
    tfk.scaled_dot_product_attention(q, q, q)
    assert calls == ["reference"]
    monkeypatch.setenv("TFK_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be"):
        tfk.scaled_dot_product_attention(q, q, q)


def test_torch_backend_refuses_mask_gradients_with_a_reason():
    q = torch.randn(1, 1, 8, 16, requires_grad=True)
    bias = torch.zeros(8, 8, requires_grad=True)
    with pytest.raises(tfk.BackendUnavailable, match="attn_mask"):
        tfk.scaled_dot_product_attention(q, q, q, attn_mask=bias, backend="torch")
    # auto falls back to the reference, which has that gradient
    out = tfk.scaled_dot_product_attention(q, q, q, attn_mask=bias)
    out.sum().backward()
    assert bias.grad is not None and bias.grad.shape == (8, 8)
