"""``attn_implementation="tfk"`` and ``experts_implementation="tfk"`` for
Hugging Face transformers.

``import tfk`` registers "tfk" with transformers' attention and experts
interfaces: at once when transformers is already imported, else right after
its first import (an import hook; tfk never imports transformers itself).
"""
import importlib.abc
import importlib.util
import sys
import warnings

import torch

from ..ops.attention.api import scaled_dot_product_attention


def tfk_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          is_causal=None, position_bias=None, **kwargs):
    """transformers' attention-function signature: (B, H, L, D) in,
    ((B, L, H, Dv), None) out. Masks come from transformers' SDPA mask builder;
    a ``position_bias`` (T5-style models) joins the mask as transformers'
    "sdpa" joins it."""
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='tfk' does not support softcap yet")
    groups = getattr(module, "num_key_value_groups", 1)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    # (decided on the model's mask, before a position bias joins it, as transformers decides)
    pack = groups > 1 and q_len == 1 and attention_mask is not None and not torch.compiler.is_compiling()
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask
        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if pack:
        # Decoding under a mask: each group's queries become the rows of its
        # key/value head, as transformers' "sdpa" does (the same numbers, and
        # torch's kernel then needs no GQA broadcast).
        query = query.reshape(query.shape[0], query.shape[1] // groups, groups, query.shape[-1])
        if attention_mask.shape[1] != 1:
            attention_mask = attention_mask.reshape(attention_mask.shape[0], -1, groups, attention_mask.shape[-1])
        groups = 1
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                       scale=scaling, is_causal=is_causal, enable_gqa=groups > 1)
    out = out.reshape(out.shape[0], -1, q_len, out.shape[-1])  # undoes the packing above
    return out.transpose(1, 2).contiguous(), None


# transformers' hidden_act names of the activations tfk's experts fuse
_EXPERT_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu",
                       "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}


def _experts_refusal(module):
    """Why tfk's experts cannot stand in for this experts module, or None."""
    from transformers.integrations.moe import _default_apply_gate

    if not getattr(module, "has_gate", True):
        return "its experts have no gate (an up_proj only)"
    if getattr(module, "has_bias", False):
        return "its experts have biases"
    if getattr(module, "is_transposed", False):
        return "its expert weights are stored transposed"
    if not getattr(module, "is_concatenated", True):
        return "its gate and up weights are interleaved, not concatenated"
    if getattr(module, "has_post_expert_norm", False):
        return "it normalises each expert's output"
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return "it has its own gate function (_apply_gate)"
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    if act not in _EXPERT_ACTIVATIONS:
        return f"its activation {act!r} (tfk fuses {sorted(_EXPERT_ACTIVATIONS)})"
    return None


def tfk_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """transformers' experts signature: hidden_states (T, H), top_k_index and
    top_k_weights (T, k) in; (T, H) out. For experts with the concatenated
    gate_up layout: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""
    why = _experts_refusal(module)
    if why is not None:
        raise ValueError(f"experts_implementation='tfk' cannot run {type(module).__name__}: {why}. "
                         "Use experts_implementation='eager' or 'grouped_mm' for this model.")
    from ..ops.moe import experts

    return experts(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj,
                   activation=_EXPERT_ACTIVATIONS[module.config.hidden_act])


def register():
    """Register "tfk" with transformers, if it is importable. Returns whether it was."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.moe import ExpertsInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register("tfk", tfk_attention_forward)
    AttentionMaskInterface.register("tfk", sdpa_mask)
    ExpertsInterface.register("tfk", tfk_experts_forward)
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first import of transformers it steps
    aside, and has the real loader register "tfk" once the package has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # once, and the lookup below finds the real package
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                register()
            except Exception as e:  # noqa: BLE001 - never break the user's import of transformers
                warnings.warn(f"tfk: could not register 'tfk' with transformers: {e}")

        spec.loader.exec_module = exec_module
        return spec


def register_when_imported():
    """Register now if transformers is imported, else after its first import."""
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
