"""A real client: greedy generation of tiny Hugging Face models with random
weights and a StaticCache, attn_implementation="tfk", gives eager's tokens,
and its decode steps run tfk.attention_with_kvcache (a sliding window
included)."""
import pytest
import torch
import transformers  # pinned in requirements-test.txt: a missing client fails, never skips

import tfk
from tfk.integrations import transformers as integration


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def _mistral():
    # a window shorter than prompt + generation: the static cache's sliding layers roll
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5, max_position_embeddings=64))


@pytest.mark.parametrize("make", [_llama, _mistral], ids=["llama", "mistral_window"])
def test_static_cache_generation_decodes_through_tfk(make, monkeypatch):
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(0, 97, (2, 6))
    kw = dict(max_new_tokens=8, do_sample=False, cache_implementation="static", pad_token_id=0)
    model.set_attn_implementation("eager")
    want = model.generate(ids, **kw)

    calls = []
    decode = integration.attention_with_kvcache
    monkeypatch.setattr(integration, "attention_with_kvcache",
                        lambda *a, **k: calls.append((a[3].tolist(), k["pattern"])) or decode(*a, **k))
    model.set_attn_implementation("tfk")
    with tfk.backends.record_choices() as ran:
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)
    # every decode step after the prompt, in both layers, took the KV-cache path
    steps = kw["max_new_tokens"] - 1
    assert len(calls) == 2 * steps
    window = model.config.sliding_window if isinstance(model, transformers.MistralForCausalLM) else None
    for n, (seqlens, pattern) in enumerate(calls):
        step = n // 2
        # a rolled window's cache holds the last `window` keys: the query then reads all of them
        assert seqlens == [min(6 + step, window - 1) if window else 6 + step] * 2
        assert pattern == (tfk.patterns.sliding_window(window - 1) if window else None)
    assert ran.count("torch") >= 2 * steps


def test_decode_under_a_padding_mask_takes_the_masked_path():
    """Left padding (a mask that is not causal from the first key): not a
    plain cached decode, so tfk follows the mask."""
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 10, 8)
    mask = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
    mask[:, :, :, :7] = True
    seqlens, pattern = integration._cached_decode(q, k, k, mask, 0.0, True, {})
    assert seqlens.tolist() == [6, 6] and pattern is None
    mask[1, :, :, :2] = False   # sequence 1 left-padded
    assert integration._cached_decode(q, k, k, mask, 0.0, True, {}) is None
    mask[1, :, :, :2] = True
    assert integration._cached_decode(q, k, k, mask, 0.0, True, {"sliding_window": 3}) is None
