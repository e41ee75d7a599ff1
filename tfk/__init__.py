"""tfk: Triton and CUDA kernels for the Transformer attention family and for
Mixture-of-Experts dispatch, each checked against a float64 reference.

    import tfk
    out = tfk.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = tfk.attention(q, k, v, tfk.patterns.sliding_window(256) | tfk.patterns.global_tokens(4))
    out = tfk.attention(q, k, v, tfk.patterns.causal(), score_mod=tfk.scores.alibi(tfk.scores.alibi_slopes(H)))
    out = tfk.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, tfk.patterns.causal())  # packed
    out = tfk.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, key=k, value=v)   # decoding
    y = tfk.moe.experts(x, ids, weights, gate_up_proj, down_proj)   # Mixture-of-Experts, HF layout
    out = tfk.linear_attention(q, k, v, causal=True, feature_map="elu1")   # linear attention, O(L)
    out = tfk.lsh_attention(qk, v, n_hashes=4, chunk_size=64, causal=True)   # Reformer LSH attention
    out = tfk.distributed.context_parallel_attention(q_shard, k_shard, v_shard, pattern)   # over P ranks
    tfk.build_info()   # what this install was built with, and which backends run here
"""
__version__ = "0.1.0"

from . import patterns  # noqa: E402,F401
from . import scores  # noqa: E402,F401
from .backends import BackendUnavailable, FallbackWarning, backend_names  # noqa: E402,F401
from .info import build_info  # noqa: E402,F401
from .integrations.transformers import register_when_imported as _register_when_imported  # noqa: E402
from .ops.attention import attention, attention_varlen, scaled_dot_product_attention  # noqa: E402,F401
from . import moe  # noqa: E402,F401
from .ops.kvcache import attention_with_kvcache  # noqa: E402,F401
from .ops.linear import linear_attention  # noqa: E402,F401
from .ops.lsh import lsh_attention  # noqa: E402,F401
from . import nn  # noqa: E402,F401
from . import distributed  # noqa: E402,F401
from .patch import patch_torch  # noqa: E402,F401
from .plan import get_plan  # noqa: E402,F401

_register_when_imported()  # attn_implementation="tfk" and experts_implementation="tfk", without importing transformers

__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "scaled_dot_product_attention", "linear_attention", "lsh_attention", "moe", "nn", "patterns", "scores", "distributed",
           "patch_torch", "backend_names", "BackendUnavailable", "FallbackWarning", "get_plan", "build_info"]
