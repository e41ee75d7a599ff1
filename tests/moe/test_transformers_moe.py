"""A real client: tiny Hugging Face MoE models with random weights give the
logits, the router's auxiliary loss and every parameter gradient of
transformers' own "eager" experts when run with experts_implementation="tfk";
models whose experts tfk cannot stand in for are refused with the reason."""
import subprocess
import sys

import pytest
import torch
import transformers  # pinned in requirements-test.txt: a missing client fails, never skips

import tfk  # noqa: F401 - registers "tfk" with transformers
from tfk.backends import record_choices

VOCAB = 101


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        output_router_logits=True, router_aux_loss_coef=0.02)
    return transformers.MixtralForCausalLM(config)


def _qwen2_moe():
    # a shared expert with a sigmoid gate beside the routed ones; top-k weights not renormalised
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=64,
        output_router_logits=True, router_aux_loss_coef=0.02)
    return transformers.Qwen2MoeForCausalLM(config)


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=16, num_experts_per_tok=3,
        norm_topk_prob=True, max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.02)
    return transformers.Qwen3MoeForCausalLM(config)


def _olmoe():
    config = transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        output_router_logits=True, router_aux_loss_coef=0.02, eos_token_id=VOCAB - 1)
    return transformers.OlmoeForCausalLM(config)


def _deepseek_v3():
    # sigmoid scores, a choice bias, group-limited choice, a dense first layer and a shared expert
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
        routed_scaling_factor=2.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.DeepseekV3ForCausalLM(config)


MODELS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
          "deepseek_v3": _deepseek_v3}


def _run(model, ids, mask):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()  # the language-model loss plus, where configured, the router's aux loss
    aux = getattr(out, "aux_loss", None)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), None if aux is None else aux.detach(), grads


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_eager_experts(name):
    torch.manual_seed(0)
    model = MODELS[name]().float()
    with torch.no_grad():  # DeepSeek-V3's choice bias starts at 0: give it something to do
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.5)
    model.set_experts_implementation("eager")
    ids = torch.randint(0, VOCAB, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the aux loss weighs tokens by the mask
    want_logits, want_aux, want_grads = _run(model, ids, mask)

    model.set_experts_implementation("tfk")
    with record_choices() as ran:
        got_logits, got_aux, got_grads = _run(model, ids, mask)
    assert ran and set(ran) == {"torch"}, f"each MoE layer ran through tfk's torch backend: {ran}"
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    if want_aux is None:
        assert got_aux is None
    else:
        torch.testing.assert_close(got_aux, want_aux, rtol=1e-5, atol=1e-7)
    assert got_grads.keys() == want_grads.keys()
    experts_params = [n for n in want_grads if "experts" in n]
    assert experts_params, "the experts' weights have gradients"
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _gpt_oss():
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, layer_types=["full_attention"])
    return transformers.GptOssForCausalLM(config)


def test_models_it_cannot_run_are_refused_with_the_reason():
    """GPT-OSS's experts have biases and a clamped gate of their own."""
    model = _gpt_oss().float()
    model.set_experts_implementation("tfk")
    with pytest.raises(ValueError, match="experts_implementation='tfk' cannot run GptOssExperts: its experts "
                                         "have biases"):
        model(input_ids=torch.randint(0, VOCAB, (1, 5)))


CLIENT = """
import sys, torch
{first}
from transformers import MixtralConfig, MixtralForCausalLM
config = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
model = MixtralForCausalLM(config).eval()
model.set_experts_implementation("tfk")  # raises unless "tfk" is registered
with tfk.backends.record_choices() as ran:
    model(input_ids=torch.randint(0, 97, (1, 9)))
print(ran)
"""


@pytest.mark.parametrize("first", ["tfk", "transformers"])
def test_import_tfk_is_enough_for_experts_implementation(first):
    """In a fresh process, either import order; ``import tfk`` alone does not
    import transformers."""
    if first == "tfk":
        imports = "import tfk\nassert 'transformers' not in sys.modules\nimport transformers"
    else:
        imports = "import transformers\nimport tfk"
    proc = subprocess.run([sys.executable, "-c", CLIENT.format(first=imports)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['torch']", proc.stdout


def test_from_pretrained_with_experts_implementation(tmp_path):
    """The loading route: a saved tiny model (no download) loaded with experts_implementation="tfk"."""
    torch.manual_seed(0)
    _mixtral().save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9))
    eager = transformers.MixtralForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    model = transformers.MixtralForCausalLM.from_pretrained(tmp_path, experts_implementation="tfk").eval()
    assert model.config._experts_implementation == "tfk"
    with torch.no_grad(), record_choices() as ran:
        got = model(input_ids=ids).logits
    assert ran == ["torch"] * 2, ran
    torch.testing.assert_close(got, eager(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
