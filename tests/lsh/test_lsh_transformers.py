"""tfk.integrations.transformers.patch_reformer: Hugging Face's
ReformerModelWithLMHead (and ReformerForMaskedLM for non-causal; tiny, random weights) runs its LSH attention through
tfk.lsh_attention, with logits and every parameter gradient equal to HF eager
in fp32 through HF's reversible backward (model.train(): each layer is
recomputed with the buckets its forward returned)."""
import importlib.util
import logging

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers is not installed")

B, V = 2, 37


def _model(L, chunk, n_hashes=3, causal=True, num_buckets=4, hash_seed=7, before=1, after=0):
    from transformers import ReformerConfig, ReformerForMaskedLM, ReformerModelWithLMHead
    cfg = ReformerConfig(vocab_size=V, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                         attn_layers=["lsh", "lsh"], num_hashes=n_hashes, num_buckets=num_buckets,
                         lsh_attn_chunk_length=chunk, lsh_num_chunks_before=before, lsh_num_chunks_after=after,
                         is_decoder=causal, hash_seed=hash_seed, axial_pos_embds=False,
                         max_position_embeddings=L, feed_forward_size=48, hidden_dropout_prob=0.0,
                         lsh_attention_probs_dropout_prob=0.0, pad_token_id=0)
    torch.manual_seed(0)
    # the LM head needs a decoder (and chunks_after=0); the masked LM, an encoder
    model = (ReformerModelWithLMHead if causal else ReformerForMaskedLM)(cfg).float()
    model.train()       # HF's reversible backward (it asserts training) with its recomputation
    return model


def _inputs(L, pad=True):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:
        mask[1, L - L // 3:] = 0     # a padded batch: the second sequence is shorter
    return ids, mask


def _run(model, ids, mask, seed=11):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)          # HF draws layer seeds (and, without hash_seed, rotations) from it
    logits = model(input_ids=ids, attention_mask=mask).logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    (logits * g).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _close(a, b, rtol=1e-5):
    return float((a - b).abs().max()) <= rtol * max(1.0, float(b.abs().max()))


def _compare(model, ids, mask, calls=None):
    from tfk.integrations.transformers import patch_reformer
    logging.disable(logging.WARNING)    # HF warns about num_buckets and padding choices
    try:
        want_logits, want_grads = _run(model, ids, mask)
        with patch_reformer():
            got_logits, got_grads = _run(model, ids, mask)
    finally:
        logging.disable(logging.NOTSET)
    assert _close(got_logits, want_logits), float((got_logits - want_logits).abs().max())
    assert set(got_grads) == set(want_grads)
    attn_params = [k for k in want_grads if "query_key" in k or "value" in k]
    assert len(attn_params) == 4         # both layers' projections get gradients
    bad = {k: float((got_grads[k] - want_grads[k]).abs().max()) for k in want_grads
           if not _close(got_grads[k], want_grads[k])}
    assert not bad, bad


def _count_tfk_calls(monkeypatch):
    import tfk.ops.lsh.api as api
    calls = []
    real = api.lsh_attention

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(api, "lsh_attention", spy)
    return calls


CASES = {
    # L, chunk, n_hashes, causal, num_buckets, before, after
    "causal-n3-c16-pad": (64, 16, 3, True, 4, 1, 0),
    "causal-n2-c32-factorised-before2": (128, 32, 2, True, [2, 4], 2, 0),
    "noncausal-n4-c16-pad-after1": (64, 16, 4, False, 4, 1, 1),
    "full-path-L=chunk": (32, 32, 2, True, 4, 1, 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reformer_lm_logits_and_grads_equal_hf_eager(name, monkeypatch):
    L, chunk, n, causal, nb, before, after = CASES[name]
    model = _model(L, chunk, n_hashes=n, causal=causal, num_buckets=nb, before=before, after=after)
    ids, mask = _inputs(L)
    calls = _count_tfk_calls(monkeypatch)
    _compare(model, ids, mask)
    # two layers, forward and the reversible backward's recomputation: tfk ran 4 times
    assert len(calls) == 4
    assert all(c["causal"] is causal and c["chunk_size"] == chunk and c["n_hashes"] == n for c in calls)
    assert all(c["key_padding_mask"] is not None for c in calls)
    assert all((c["buckets"] is None) == (L <= chunk) for c in calls)


def test_no_hash_seed_and_default_buckets(monkeypatch):
    # rotations from torch's generator and num_buckets set on the fly: HF's own hashing is kept.
    # HF's training forward reseeds torch from torch.seed() (non-deterministic) per layer: made
    # deterministic here so that the two runs draw the same rotations
    def seed():
        s = int(torch.randint(2 ** 62, (1,)).item())
        torch.manual_seed(s)
        return s

    monkeypatch.setattr(torch, "seed", seed)
    model = _model(128, 16, n_hashes=2, num_buckets=None, hash_seed=None)
    ids, mask = _inputs(128, pad=False)
    calls = _count_tfk_calls(monkeypatch)
    _compare(model, ids, mask)
    assert len(calls) == 4


def test_patch_is_removed_after_the_context():
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    from tfk.integrations.transformers import patch_reformer
    original = LSHSelfAttention.forward
    with patch_reformer():
        assert LSHSelfAttention.forward is not original
        with patch_reformer():           # nesting keeps the patch until the outer exit
            pass
        assert LSHSelfAttention.forward is not original
    assert LSHSelfAttention.forward is original
    with pytest.raises(RuntimeError):
        with patch_reformer():
            raise RuntimeError("boom")
    assert LSHSelfAttention.forward is original


def test_fallbacks_run_hf_code(monkeypatch):
    # output_attentions and attention dropout in training run HF's own code for that call
    from tfk.integrations.transformers import patch_reformer
    model = _model(64, 16)
    ids, mask = _inputs(64)
    calls = _count_tfk_calls(monkeypatch)
    logging.disable(logging.WARNING)
    try:
        with patch_reformer():
            model.eval()
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            assert len(out.attentions) == 2 and not calls
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            assert len(calls) == 2
            for m in model.modules():
                if type(m).__name__ == "LSHSelfAttention":
                    m.dropout = 0.1
            model.train()
            model(input_ids=ids, attention_mask=mask)
            assert len(calls) == 2
    finally:
        logging.disable(logging.NOTSET)


def test_generation_with_cache_matches_hf():
    # prefill through tfk, then HF's cached decoding steps: the same tokens as HF eager
    from tfk.integrations.transformers import patch_reformer
    model = _model(64, 16).eval()
    ids = torch.randint(1, V, (1, 32), generator=torch.Generator().manual_seed(5))
    logging.disable(logging.WARNING)
    try:
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
        with patch_reformer():
            got = model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        logging.disable(logging.NOTSET)
    assert torch.equal(got, want)
