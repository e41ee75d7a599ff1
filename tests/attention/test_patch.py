"""tfk.patch_torch routes torch's SDPA through tfk and restores it, nested in
any order."""
import pytest
import torch
import torch.nn.functional as F

import tfk
from tfk import backends
from tfk.ops.attention import torch_sdpa


def _routes_to():
    """The backend a plain call through torch's function runs on, or None for torch's own."""
    q = torch.randn(1, 1, 4, 8)
    with backends.record_choices() as ran:
        F.scaled_dot_product_attention(q, q, q)
    return ran[0] if ran else None


def test_context_manager_routes_and_restores():
    q = torch.randn(1, 2, 10, 8, dtype=torch.float64)
    with tfk.patch_torch(backend="torch"), backends.record_choices() as ran:
        assert F.scaled_dot_product_attention is not torch_sdpa
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert ran == ["torch"]
    assert F.scaled_dot_product_attention is torch_sdpa
    torch.testing.assert_close(out, torch_sdpa(q, q, q, is_causal=True))


@pytest.mark.parametrize("order", ["inner_first", "outer_first"])
def test_nesting_undone_in_any_order(order):
    outer = tfk.patch_torch(backend="torch")
    inner = tfk.patch_torch(backend="reference")
    assert _routes_to() == "reference"  # the most recent patch routes
    first, second = (inner, outer) if order == "inner_first" else (outer, inner)
    first.undo()
    assert _routes_to() == second.function.keywords["backend"]  # the other patch still routes
    second.undo()
    second.undo()  # idempotent
    assert F.scaled_dot_product_attention is torch_sdpa
    assert _routes_to() is None


def test_transformers_attn_implementation(monkeypatch):
    """Through the block engine (torch's kernel would answer for these masked
    dense calls under "auto")."""
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
    monkeypatch.setenv("TFK_BACKEND", "torch")
    with backends.record_choices() as ran:
        got = model(input_ids=ids, attention_mask=mask).logits
    assert ran == ["torch", "torch"], "each layer's attention ran through tfk's block engine"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
