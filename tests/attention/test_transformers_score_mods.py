"""Real clients of the score modifiers: a tiny Hugging Face T5 (relative
position bias, fused from the first layer's own table) and a tiny Gemma 2
(attention logit softcapping, with sliding-window layers and GQA) give the
logits and every parameter gradient of their eager attention through
attn_implementation="tfk"."""
import pytest
import torch
import transformers  # pinned in requirements-test.txt: a missing client fails, never skips

import tfk  # noqa: F401  (registers attn_implementation="tfk")
from tfk.backends import record_choices
from tfk.integrations import transformers as tfk_hf


def _t5():
    config = transformers.T5Config(vocab_size=101, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=16,
                                   relative_attention_max_distance=20, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def _gemma2():
    config = transformers.Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=7,
                                       attn_logit_softcapping=0.05, final_logit_softcapping=30.0,
                                       query_pre_attn_scalar=8, max_position_embeddings=64)
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():   # scores well past the cap, so the softcap bends them
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20.0)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_t5(model):
    model.zero_grad()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 101, (2, 23), generator=g)
    labels = torch.randint(0, 101, (2, 19), generator=g)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, 17:] = 0   # right padding in the encoder
    logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    logits.square().mean().backward()
    return logits.detach(), _grads(model)


def _run_gemma2(model):
    model.zero_grad()
    ids = torch.randint(0, 101, (2, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, 16:] = 0   # right padding (a left-padded row sees no key: eager averages it, SDPA gives 0)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits.square().mean().backward()
    return logits.detach(), _grads(model)


@pytest.mark.parametrize("name", ["t5", "gemma2"])
def test_model_matches_eager(name, monkeypatch):
    torch.manual_seed(0)
    model = (_t5 if name == "t5" else _gemma2)().float()
    run = _run_t5 if name == "t5" else _run_gemma2
    model.set_attn_implementation("eager")
    want_logits, want_grads = run(model)

    fused = []
    original = tfk_hf._t5_relative_bias

    def spy(*args):   # which calls took the fused relative bias
        mod = original(*args)
        fused.append(mod is not None)
        return mod
    monkeypatch.setattr(tfk_hf, "_t5_relative_bias", spy)
    monkeypatch.setenv("TFK_BACKEND", "torch")
    model.set_attn_implementation("tfk")
    with record_choices() as ran:
        got_logits, got_grads = run(model)
    layers = 6 if name == "t5" else 2   # T5: encoder self, decoder self and cross, 2 layers each
    assert ran == ["torch"] * layers, "every attention call ran through tfk's torch engine"
    if name == "t5":   # encoder and decoder self-attention, both layers (cross-attention has no bias)
        assert sum(fused) == 4
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")
