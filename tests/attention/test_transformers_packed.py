"""A real client: Hugging Face models trained on packed documents
(``DataCollatorWithFlattening``) with ``attn_implementation="tfk"`` take
tfk.attention_varlen and give the loss and gradients of the same documents
padded, with transformers' eager attention."""
import pytest
import torch
import transformers  # pinned in requirements-test.txt: a missing client fails, never skips

import tfk  # noqa: F401  (registers "tfk")
from tfk.integrations import transformers as integration

DOCS = [5, 9, 3, 12]


def _llama():
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _mistral():
    # a sliding window shorter than the longest document
    config = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                        max_position_embeddings=64)
    return transformers.MistralForCausalLM(config)


def _loss_and_grads(model, **batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("make", [_llama, _mistral], ids=["llama", "mistral_window"])
def test_packed_batch_equals_padded_batch(make, flash_kwargs, monkeypatch):
    torch.manual_seed(0)
    model = make().float()
    docs = [torch.randint(0, 97, (n,)).tolist() for n in DOCS]

    # padded, eager attention
    model.set_attn_implementation("eager")
    L = max(DOCS)
    ids = torch.zeros(len(docs), L, dtype=torch.long)
    mask = torch.zeros(len(docs), L, dtype=torch.long)
    for b, d in enumerate(docs):
        ids[b, :len(d)], mask[b, :len(d)] = torch.tensor(d), 1
    labels = ids.masked_fill(mask == 0, -100)
    want_loss, want_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)

    # packed by transformers' collator, tfk attention
    collator = transformers.DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=flash_kwargs)
    batch = collator([{"input_ids": d} for d in docs])
    assert batch["input_ids"].shape == (1, sum(DOCS))
    calls = []
    varlen = integration.attention_varlen
    monkeypatch.setattr(integration, "attention_varlen", lambda *a, **k: calls.append(a[3]) or varlen(*a, **k))
    model.set_attn_implementation("tfk")
    # no cache: transformers detects packing from position_ids only without one (training)
    got_loss, got_grads = _loss_and_grads(model, **batch, use_cache=False)

    assert len(calls) == 2, "each layer's attention took the packed path"
    assert calls[0].tolist() == [0, 5, 14, 17, 29]
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_positions_without_a_matching_mask_take_the_masked_path():
    """position_ids that restart while the mask says otherwise (here: one
    document's mask) are not taken as packed: tfk follows the mask."""
    q = torch.randn(1, 2, 6, 8)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    causal = torch.ones(6, 6, dtype=torch.bool).tril().view(1, 1, 6, 6)
    assert integration._packed_sequences(q, q, causal, True, {"position_ids": position_ids}) is None
    packed = causal.clone()
    packed[..., 3:, :3] = False
    cu, longest, pattern = integration._packed_sequences(q, q, packed, True, {"position_ids": position_ids})
    assert cu.tolist() == [0, 3, 6] and longest == 3 and pattern == tfk.patterns.causal()
