"""The linear-attention oracle: the quadratic masked form, in the inputs' dtype
(the tests and the "reference" backend call it in float64). It shares nothing
with the other backends: they are checked against it. Gradients by autograd."""
import torch
import torch.nn.functional as F

_ELEMENTWISE = {
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1,
    "relu": F.relu,
}


def feature_maps_reference(query, key, feature_map, scale=1.0, key_padding_mask=None):
    """(phi_q, phi_k): phi_q = scale * phi(query) (B, H, L, D'), phi_k = phi(key)
    (B, Hkv, S, D') with keys where key_padding_mask (B, S) is False set to 0.
    "softmax": phi(q) over q's D channels, phi(k) over the unmasked S positions."""
    keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    if feature_map == "softmax":
        pq = query.softmax(-1)
        logits = key if keep is None else key.masked_fill(~keep, float("-inf"))
        pk = torch.nan_to_num(logits.softmax(-2), nan=0.0)   # a batch with every key masked: 0
    else:
        f = feature_map if callable(feature_map) else _ELEMENTWISE[feature_map]
        pq, pk = f(query), f(key)
    if keep is not None:
        pk = pk * keep
    return scale * pq, pk


def linear_attention_reference(query, key, value, *, causal=True, feature_map="elu1", normalize=True, eps=1e-6,
                               scale=1.0, key_padding_mask=None, initial_state=None):
    """out (B, H, L, Dv) and the state (kv (B, Hkv, D', Dv), z (B, Hkv, D')) after
    the last position, all in query's dtype:

        A = phi_q phi_k^T (B, H, L, S), lower-triangular when causal
        out = (A v + phi_q kv0) / (A 1 + phi_q . z0 + eps)   (no division unless normalize)
        kv = kv0 + phi_k^T v,  z = z0 + sum_j phi_k_j

    Query head h reads key/value head h // (H // Hkv)."""
    pq, pk = feature_maps_reference(query, key, feature_map, scale, key_padding_mask)
    group = query.shape[1] // key.shape[1]
    pk_h, v_h = pk.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    A = pq @ pk_h.transpose(-1, -2)
    if causal:
        A = A.tril()
    num, den = A @ v_h, A.sum(-1)
    kv, z = pk.transpose(-1, -2) @ value, pk.sum(-2)
    if initial_state is not None:
        kv0, z0 = (s.to(query.dtype) for s in initial_state)
        num = num + pq @ kv0.repeat_interleave(group, 1)
        den = den + (pq * z0.repeat_interleave(group, 1)[:, :, None, :]).sum(-1)
        kv, z = kv0 + kv, z0 + z
    out = num / (den + eps)[..., None] if normalize else num
    return out, (kv, z)
