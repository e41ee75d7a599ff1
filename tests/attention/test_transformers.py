"""A real client: tiny Hugging Face models with random weights give the same
logits and gradients through tfk ("triton" backend, in the interpreter
without a GPU) as with torch's own attention."""
import subprocess
import sys

import pytest
import torch
import transformers  # pinned in requirements-test.txt: a missing client fails, never skips

import tfk
from tfk.backends import record_choices


def _gpt2():
    config = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _mistral():
    # GQA (4 query heads on 2 key/value heads) and a sliding window shorter than the sequence
    config = transformers.MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=7,
                                        max_position_embeddings=64)
    return transformers.MistralForCausalLM(config)


MODELS = {"gpt2": _gpt2, "mistral_gqa_window": _mistral}


def _logits_and_grads(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("route", ["attn_implementation", "patch_torch"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_torch_attention(name, route, monkeypatch):
    torch.manual_seed(0)
    model = MODELS[name]().float()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 101, (2, 21))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    want_logits, want_grads = _logits_and_grads(model, ids, mask)

    with record_choices() as ran:
        if route == "patch_torch":
            with tfk.patch_torch(backend="triton"):
                got_logits, got_grads = _logits_and_grads(model, ids, mask)
        else:
            monkeypatch.setenv("TFK_BACKEND", "triton")
            model.set_attn_implementation("tfk")
            got_logits, got_grads = _logits_and_grads(model, ids, mask)
    assert ran == ["triton", "triton"], "each layer's attention ran through tfk's triton backend"
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("q_len,kv_len,mask_heads", [(1, 57, 1), (1, 57, 8), (1, 57, None), (9, 57, 1), (9, 9, None)],
                         ids=str)
def test_attention_function_matches_transformers_sdpa(q_len, kv_len, mask_heads):
    """tfk's attention function computes what transformers' "sdpa" computes,
    bit for bit, with GQA: decoding (one query per head, under a padding
    mask shared by the heads or per head, or none) and prefill, so greedy
    tokens cannot drift apart."""
    import types
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from tfk.integrations.transformers import tfk_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, q_len, 8, 32, generator=g).transpose(1, 2)  # (B, H, L, D) as models make it
    k, v = (torch.randn(2, 2, kv_len, 32, generator=g) for _ in range(2))
    mask = None if mask_heads is None else torch.rand(2, mask_heads, q_len, kv_len, generator=g) < 0.8
    got = tfk_attention_forward(module, q, k, v, mask, scaling=0.2)[0]
    want = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)[0]
    assert got.shape == want.shape == (2, q_len, 8, 32)
    assert torch.equal(got, want)
    # a T5-style position bias joins the mask, as transformers' "sdpa" joins it
    bias = torch.randn(1, 8, q_len, kv_len, generator=g)
    got = tfk_attention_forward(module, q, k, v, mask, scaling=0.2, position_bias=bias)[0]
    want = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2, position_bias=bias)[0]
    assert torch.equal(got, want)
    assert not torch.equal(got, tfk_attention_forward(module, q, k, v, mask, scaling=0.2)[0])


CLIENT = """
import sys, torch
{first}
assert "tfk" in sys.modules and "transformers" in sys.modules
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(config).eval()
model.set_attn_implementation("tfk")  # raises unless "tfk" is registered
with tfk.backends.record_choices() as ran:
    model(input_ids=torch.randint(0, 97, (1, 9)))
print(ran)
"""


@pytest.mark.parametrize("first", ["tfk", "tfk_then_find_spec", "transformers"])
def test_import_tfk_is_enough_for_attn_implementation(first):
    """In a fresh process, either import order: no patch_torch() call, and
    ``import tfk`` alone does not import transformers. "tfk_then_find_spec":
    an availability check (importlib.util.find_spec) before the import must
    not use up the registration."""
    if first == "tfk":
        imports = "import tfk\nassert 'transformers' not in sys.modules\nimport transformers"
    elif first == "tfk_then_find_spec":
        imports = ("import tfk, importlib.util\nassert importlib.util.find_spec('transformers') is not None\n"
                   "assert 'transformers' not in sys.modules\nimport transformers")
    else:
        imports = "import transformers\nimport tfk"
    proc = subprocess.run([sys.executable, "-c", CLIENT.format(first=imports)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['sdpa']", proc.stdout
