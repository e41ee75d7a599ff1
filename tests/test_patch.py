"""tfk.patch_torch routes torch's SDPA through tfk and restores it."""
import pytest
import torch
import torch.nn.functional as F

import tfk
from tfk import backends
from tfk.ops.attention import torch_sdpa


def _spy(monkeypatch, name):
    calls = []
    backend = backends.get_backend(name)
    run = backend.run
    monkeypatch.setattr(backend, "run", lambda call: calls.append(name) or run(call))
    return calls


def test_context_manager_routes_and_restores(monkeypatch):
    calls = _spy(monkeypatch, "reference")
    q = torch.randn(1, 2, 10, 8)
    with tfk.patch_torch(backend="reference"):
        assert F.scaled_dot_product_attention is not torch_sdpa
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert calls == ["reference"]
    assert F.scaled_dot_product_attention is torch_sdpa
    torch.testing.assert_close(out, torch_sdpa(q, q, q, is_causal=True))


def test_plain_call_with_undo_and_nesting():
    outer = tfk.patch_torch()
    inner = tfk.patch_torch(backend="reference")
    inner.undo()
    assert F.scaled_dot_product_attention is not torch_sdpa  # the outer patch stays
    outer.undo()
    outer.undo()  # idempotent
    assert F.scaled_dot_product_attention is torch_sdpa


def test_transformers_attn_implementation(monkeypatch):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    with tfk.patch_torch():
        pass  # registers "tfk"
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    want = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation("tfk")
    calls = _spy(monkeypatch, "torch")
    got = model(input_ids=ids, attention_mask=mask).logits
    assert calls == ["torch", "torch"], "each layer's attention ran through tfk"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
