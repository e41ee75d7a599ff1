"""``attn_implementation="tfk"`` and ``experts_implementation="tfk"`` for
Hugging Face transformers.

``import tfk`` registers "tfk" with transformers' attention and experts
interfaces: at once when transformers is already imported, else right after
its first import (an import hook; tfk never imports transformers itself).

``patch_reformer()``, a context manager, runs Reformer's LSH attention
(``LSHSelfAttention``) through ``tfk.lsh_attention``.
"""
import contextlib
import importlib.abc
import importlib.util
import sys
import warnings

import torch

from .. import patterns, scores
from ..ops.attention.api import scaled_dot_product_attention
from ..ops.attention.varlen import Packed, attention_varlen
from ..ops.kvcache.api import attention_with_kvcache


def tfk_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          is_causal=None, position_bias=None, softcap=None, **kwargs):
    """transformers' attention-function signature: (B, H, L, D) in,
    ((B, L, H, Dv), None) out. Masks come from transformers' SDPA mask builder.
    ``softcap`` (Gemma 2) is fused (``tfk.scores.softcap``); T5's relative
    bias is fused (``tfk.scores.relative_bias`` on the layer's own table)
    where the layer made ``position_bias`` itself, else a ``position_bias``
    joins the mask as transformers' "sdpa" joins it."""
    score_mod = [] if softcap is None else [scores.softcap(softcap)]
    t5 = _t5_relative_bias(module, query, key, position_bias)
    if t5 is not None:
        score_mod.append(t5)
        position_bias = None
    score_mod = score_mod or None
    groups = getattr(module, "num_key_value_groups", 1)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if position_bias is None and score_mod is None:
        decode = _cached_decode(query, key, value, attention_mask, dropout, is_causal, kwargs)
        if decode is not None:
            seqlens, pattern = decode
            out = attention_with_kvcache(query, key, value, seqlens, pattern=pattern, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        packed = _packed_sequences(query, key, attention_mask, is_causal, kwargs)
        if packed is not None:
            cu, longest, pattern = packed
            q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))   # (L, heads, D)
            out = attention_varlen(q, k, v, cu, cu, longest, longest, pattern, scale=scaling, dropout_p=dropout)
            return out.unsqueeze(0), None
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
                                       scale=scaling, is_causal=is_causal, enable_gqa=groups > 1,
                                       score_mod=score_mod)
    out = out.reshape(out.shape[0], -1, q_len, out.shape[-1])  # undoes the packing above
    return out.transpose(1, 2).contiguous(), None


def _t5_relative_bias(module, query, key, position_bias):
    """T5's bias as ``tfk.scores.relative_bias`` on the first layer's table, or None.

    The first layer of a T5 stack makes ``position_bias`` from its own table
    (for queries and keys at the same positions: no cache offset) and the
    stack hands that same tensor to every later layer: the modifier made for
    the first is kept on the tensor, so the later ones fuse it too."""
    if position_bias is None:
        return None
    mod = getattr(position_bias, "_tfk_score_mod", None)
    if mod is not None or not getattr(module, "has_relative_attention_bias", False):
        return mod
    table = getattr(getattr(module, "relative_attention_bias", None), "weight", None)
    if table is None or query.shape[2] != key.shape[2] or table.shape[1] != query.shape[1]:
        return None
    mod = scores.relative_bias(table, module.relative_attention_num_buckets, module.relative_attention_max_distance,
                               bidirectional=not module.is_decoder)
    position_bias._tfk_score_mod = mod
    return mod


def _cached_decode(query, key, value, attention_mask, dropout, is_causal, kwargs):
    """(cache_seqlens, pattern) when the call decodes against a cache that
    transformers updated (key/value: the whole cache, as a StaticCache
    passes it) under the plain causal mask (and the layer's sliding window):
    sequence b's queries are then at s_b, s_b + 1, ... with s_b the last key
    its first query may read, which the mask must confirm for every query,
    or None (the masked path runs: padding, a rolled window, anything else).
    Forward only (inference): never while a gradient is wanted."""
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    if not is_causal or dropout or Lq >= Lk or attention_mask is None or attention_mask.dtype != torch.bool \
            or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    mask = attention_mask[:, 0].expand(B, Lq, Lk)
    j = torch.arange(Lk, device=query.device)
    seqlens = torch.where(mask[:, 0], j, -1).amax(-1)                      # (B,): the first query's position
    p = (seqlens.view(B, 1) + torch.arange(Lq, device=query.device)).unsqueeze(-1)   # (B, Lq, 1)
    want = j <= p
    window = kwargs.get("sliding_window")
    if window is not None:
        want = want & (j > p - window)
    if bool((seqlens < 0).any()) or int(seqlens.max()) + Lq > Lk or not bool((mask == want).all()):
        return None
    pattern = None if window is None else patterns.sliding_window(window - 1)
    return seqlens.to(torch.int32), pattern


def _packed_sequences(query, key, attention_mask, is_causal, kwargs):
    """(cu_seqlens, longest, pattern) when a batch of one row packs several
    documents, as transformers passes them: flash-attn's keyword arguments
    ``cu_seq_lens_q``/``cu_seq_lens_k`` (which flash-attn honours over any
    mask), or ``position_ids`` restarting per document (transformers' rule: a
    step other than +1 starts one), whose mask transformers built and which
    must then equal the packed pattern's, else None (the masked path runs).
    The pattern within each document: causal or not, with the layer's
    ``sliding_window`` (transformers': a key less than ``sliding_window``
    positions away)."""
    L = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != L or L < 2 or torch.compiler.is_compiling():
        return None
    window = kwargs.get("sliding_window")
    if window is not None:
        pattern = patterns.sliding_window(window - 1, 0 if is_causal else window - 1)
    else:
        pattern = patterns.causal() if is_causal else None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        if not torch.equal(cu_q, cu_k) or int(cu_q[-1]) != L:
            return None
        cu = cu_q.to(torch.int32)
        return cu, int(cu.diff().max()), pattern
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[-1] != L or attention_mask is None \
            or attention_mask.dtype != torch.bool:
        return None
    pos = position_ids.reshape(-1, L)[0]
    starts = (pos[1:] - pos[:-1] != 1).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), L)]).to(torch.int32)
    lens = cu.diff().tolist()
    allowed = Packed(pattern or patterns.DENSE, lens, lens).dense_mask(L, L, device=query.device)
    if not bool((attention_mask == allowed).all()):
        return None
    return cu, max(lens), pattern


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
    """Finds nothing itself: for transformers it returns the real spec with a
    loader that registers "tfk" once the package has run, and leaves
    sys.meta_path then. A lookup that imports nothing
    (importlib.util.find_spec("transformers"), as availability checks do)
    gets a spec that is never run, so the finder stays for the real import."""
    _looking = False

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" or self._looking:
            return None
        self._looking = True   # the lookup below asks every finder, this one included
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
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


# ------------------------------------------------------------ Reformer's LSH

def _lsh_fallback_reason(module, past_buckets_states, output_attentions, kwargs):
    """Why this LSHSelfAttention call runs Hugging Face's own code, or None."""
    if past_buckets_states is not None and len(past_buckets_states) > module.layer_idx:
        return "incremental decoding with past_buckets_states"
    if output_attentions:
        return "output_attentions (tfk does not materialise the probabilities)"
    if module.training and module.dropout > 0:
        return "attention dropout in training (HF's dropout masks, recomputed by its reversible backward)"
    if module.chunk_length is None:
        return "lsh_attn_chunk_length is None"
    if kwargs:
        return f"arguments tfk does not take: {sorted(kwargs)}"
    return None


def _tfk_lsh_self_attention_forward(self, hidden_states, attention_mask=None, num_hashes=None, buckets=None,
                                    past_buckets_states=None, use_cache=False, output_attentions=False, **kwargs):
    """``LSHSelfAttention.forward`` with its attention computed by
    ``tfk.lsh_attention`` (see ``patch_reformer``)."""
    if _lsh_fallback_reason(self, past_buckets_states, output_attentions, kwargs) is not None:
        return _LSH_PATCH["original"](self, hidden_states, attention_mask=attention_mask, num_hashes=num_hashes,
                                        buckets=buckets, past_buckets_states=past_buckets_states,
                                        use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    from transformers.models.reformer.modeling_reformer import LSHSelfAttentionOutput

    from ..ops.lsh.api import lsh_attention

    B, L = hidden_states.shape[:2]
    H, D = self.num_attention_heads, self.attention_head_size
    num_hashes = num_hashes if num_hashes is not None else self.num_hashes
    qk = self._split_hidden_size_dim(self.query_key(hidden_states), H, D)
    value = self._split_hidden_size_dim(self.value(hidden_states), H, D)
    full = L <= self.chunk_length
    if full:
        buckets = None          # HF's standard self-attention: no hashing (buckets pass through as HF does)
    else:
        if self.num_buckets is None:
            self._set_num_buckets(L)
        if buckets is None:     # HF's own hashing: its rotations, its RNG use, its padding bucket and offsets
            buckets = self._hash_vectors(qk, num_hashes, attention_mask)
        buckets = buckets.reshape(B, H, num_hashes, L)
    mask = None if attention_mask is None else attention_mask.to(torch.bool)
    out = lsh_attention(qk, value, n_hashes=num_hashes, chunk_size=self.chunk_length,
                        chunks_before=self.num_chunks_before, chunks_after=self.num_chunks_after,
                        causal=bool(self.is_decoder), key_padding_mask=mask,
                        buckets=None if full else buckets)
    out = self._merge_hidden_size_dims(out, H, D)
    return LSHSelfAttentionOutput(hidden_states=out, attention_probs=(), buckets=buckets)


_LSH_PATCH = {"depth": 0, "original": None}   # nested patch_reformer contexts patch once, restore at the last exit


@contextlib.contextmanager
def patch_reformer():
    """Within this context, Hugging Face Reformer's ``LSHSelfAttention`` (every
    instance: ``ReformerModel``, ``ReformerModelWithLMHead``, ...) computes its
    attention with ``tfk.lsh_attention``; the original forward is restored on
    exit (also on an exception). Imports transformers when entered.

    What is patched: ``LSHSelfAttention.forward``. The projections, HF's hashing
    (``_hash_vectors``: its rotations, ``hash_seed`` and RNG use, its padding
    bucket, ``_set_num_buckets`` when ``num_buckets`` is None) and the returned
    buckets stay HF's; the sort, chunked attention, masks and the merge of the
    rounds are one ``tfk.lsh_attention`` call with the layer's config:
    num_hashes (or the call's), chunk_length, num_chunks_before/after,
    ``is_decoder`` as ``causal``, ``attention_mask`` as ``key_padding_mask`` and
    the buckets. HF's reversible backward recomputes each layer with the buckets
    the forward returned, which tfk takes as given, so the recomputation sees the
    same layout. L <= chunk_length is HF's full-attention path (tfk's too).

    Calls that run HF's own code unchanged (the fallback, per call):
    incremental decoding with ``past_buckets_states`` (a prefill that only
    starts the cache runs through tfk), ``output_attentions=True``, attention
    dropout > 0 while training (HF's masks, which its reversible backward
    replays by seed), ``lsh_attn_chunk_length=None``.

    Numerics: fp32 equals HF's eager result (masked keys are -inf in tfk and
    -1e9 in HF: the same probabilities); the self logit is -1e5 in every dtype,
    where HF uses -1e3 in fp16.
    """
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    if _LSH_PATCH["depth"] == 0:
        _LSH_PATCH["original"] = LSHSelfAttention.forward
        LSHSelfAttention.forward = _tfk_lsh_self_attention_forward
    _LSH_PATCH["depth"] += 1
    try:
        yield
    finally:
        _LSH_PATCH["depth"] -= 1
        if _LSH_PATCH["depth"] == 0:
            LSHSelfAttention.forward = _LSH_PATCH["original"]
            _LSH_PATCH["original"] = None
