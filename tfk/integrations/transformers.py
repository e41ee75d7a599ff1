"""``attn_implementation="tfk"`` for Hugging Face transformers."""
from ..ops.attention.api import scaled_dot_product_attention


def tfk_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers' attention-function signature: (B, H, L, D) in,
    ((B, L, H, Dv), None) out. Masks come from transformers' SDPA mask builder."""
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='tfk' does not support softcap yet")
    groups = getattr(module, "num_key_value_groups", 1)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                       scale=scaling, is_causal=is_causal, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def register():
    """Register "tfk" with transformers, if it is importable. Returns whether it was."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register("tfk", tfk_attention_forward)
    AttentionMaskInterface.register("tfk", sdpa_mask)
    return True
