"""The attention reference: dense, masked, float64-capable, no tricks.

A query row with no allowed key returns 0 and lse = -inf (as torch SDPA's
math path returns 0 for such rows); its gradients are 0. Every backend
follows this convention.
"""
import math

import torch

from ...scores import t5_buckets


def attention_reference(q, k, v, allowed=None, bias=None, scale=None, dropout_p=0.0, keep=None, score_mod=None):
    """Dense attention in the inputs' dtype (pass float64 for an oracle).

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv), H % Hkv == 0.
        allowed: bool, broadcastable to (B, H, Lq, Lk); True = may attend.
        bias: float, broadcastable to (B, H, Lq, Lk); added to the scores.
        scale: defaults to 1/sqrt(D).
        dropout_p, keep: dropout probability and the bool (B, H, Lq, Lk) keep mask.
        score_mod: {kind: modifier} of tfk.scores (``tfk.scores.canonical``),
            each applied densely from its definition (see ``modified_scores``).
    Returns:
        out (B, H, Lq, Dv) and lse (B, H, Lq), natural log, of the undropped scores.
    """
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if score_mod:
        s = modified_scores(q, k, scale, score_mod)
    else:
        s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # re-masking -inf scores (from the bias too) keeps NaN out of the gradients of empty rows
    s = s.masked_fill(torch.isneginf(s), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse).unsqueeze(-1)
    p = torch.where(empty, torch.zeros_like(s), torch.exp(s - lse.unsqueeze(-1).masked_fill(empty, 0)))
    if dropout_p > 0:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, lse


def modified_scores(q, k, scale, mods):
    """Dense scores (B, H, Lq, Lk) under tfk.scores modifiers, from their
    definitions (k already repeated to H heads), in q's dtype:
    Transformer-XL's two terms with r gathered at i - j + Lk - 1, then the
    softcap, then ALiBi, T5's bucketed bias and the adaptive span's log m."""
    Lq, Lk = q.shape[2], k.shape[2]
    i = torch.arange(Lq, device=q.device).view(-1, 1)
    j = torch.arange(Lk, device=q.device).view(1, -1)
    if "transformer_xl" in mods:
        xl = mods["transformer_xl"]
        H, D = xl.u.shape
        content = (q + xl.u.to(q.dtype).view(1, H, 1, D)) @ k.transpose(-1, -2)
        r = xl.r.to(q.dtype).expand(H, -1, -1)                                # (H, Lq + Lk - 1, D)
        rel = r[:, i - j + Lk - 1]                                             # (H, Lq, Lk, D)
        position = torch.einsum("bhid,hijd->bhij", q + xl.v.to(q.dtype).view(1, H, 1, D), rel)
        s = (content + position) * scale
    else:
        s = (q @ k.transpose(-1, -2)) * scale
    if "softcap" in mods:
        cap = mods["softcap"].cap
        s = cap * torch.tanh(s / cap)
    if "alibi" in mods:
        s = s + mods["alibi"].slopes.to(s.dtype).view(-1, 1, 1) * (j - i)
    if "relative_bias" in mods:
        rb = mods["relative_bias"]
        s = s + rb.table.to(s.dtype)[t5_buckets(j - i, rb.num_buckets, rb.max_distance, rb.bidirectional)] \
            .permute(2, 0, 1)
    if "adaptive_span" in mods:
        sp = mods["adaptive_span"]
        m = ((sp.ramp + sp.z.to(s.dtype).view(-1, 1, 1) - (i - j)) / sp.ramp).clamp(0, 1)
        s = s + torch.where(m > 0, torch.log(m.clamp(min=torch.finfo(s.dtype).tiny)), -math.inf)
    return s
