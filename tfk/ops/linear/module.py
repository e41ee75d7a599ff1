"""tfk.nn.LinearAttention: projections around tfk.linear_attention, with a
state for generation."""
from __future__ import annotations

from torch import nn

from .api import linear_attention
from .torch_backend import FEATURE_MAPS


class LinearAttention(nn.Module):
    """Multi-head linear attention with q/k/v/o projections.

    embed_dim E = num_heads * head_dim; num_kv_heads (default num_heads) divides
    num_heads (grouped-query). Projections: q_proj E -> H*Dh, k_proj and v_proj
    E -> Hkv*Dh, o_proj H*Dh -> E, with biases when ``bias``. feature_map,
    causal, normalize, eps and backend are tfk.linear_attention's.

    forward(x (B, L, E), state=None, key_padding_mask=None) -> (y (B, L, E), state)
        state: (kv (B, Hkv, Dh', Dh), z (B, Hkv, Dh')) float32 (float64 for
        float64 inputs), the sums over every position seen so far; pass it back
        with the next tokens. Generation: y, state = m(prompt); then for each
        new token x_t (B, 1, E): y_t, state = m(x_t, state), which equals the
        last row of m(prompt + tokens so far) when causal. With
        feature_map="softmax" (non-causal only) there is no state: it must be
        None and None is returned.
        key_padding_mask (B, L) bool: False for padding tokens, which then add
        nothing to the state or to any output.
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, feature_map="elu1", causal=True, bias=False,
                 normalize=True, eps=1e-6, backend="auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not callable(feature_map) and feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS} or a callable, got {feature_map!r}")
        if feature_map == "softmax" and causal:
            raise ValueError("feature_map='softmax' needs causal=False (Efficient Attention is non-causal)")
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.feature_map, self.causal, self.normalize, self.eps, self.backend = \
            feature_map, causal, normalize, eps, backend
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias, **kw)

    def _heads(self, t, heads):
        B, L, _ = t.shape
        return t.view(B, L, heads, self.head_dim).transpose(1, 2)      # (B, heads, L, Dh)

    def forward(self, x, state=None, key_padding_mask=None):
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, embed_dim = {self.embed_dim}), got shape {tuple(x.shape)}")
        q = self._heads(self.q_proj(x), self.num_heads)
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        stateful = self.feature_map != "softmax"
        res = linear_attention(q, k, v, causal=self.causal, feature_map=self.feature_map, normalize=self.normalize,
                               eps=self.eps, key_padding_mask=key_padding_mask, initial_state=state,
                               return_state=stateful, backend=self.backend)
        out, new_state = res if stateful else (res, None)
        B, L = x.shape[:2]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)), new_state

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"feature_map={self.feature_map!r}, causal={self.causal}")
