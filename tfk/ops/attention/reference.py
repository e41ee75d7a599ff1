"""The attention reference: dense, masked, float64-capable, no tricks.

A query row with no allowed key returns 0 and lse = -inf (as torch SDPA's
math path returns 0 for such rows); its gradients are 0. Every backend
follows this convention.
"""
import math

import torch


def attention_reference(q, k, v, allowed=None, bias=None, scale=None, dropout_p=0.0, keep=None):
    """Dense attention in the inputs' dtype (pass float64 for an oracle).

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv), H % Hkv == 0.
        allowed: bool, broadcastable to (B, H, Lq, Lk); True = may attend.
        bias: float, broadcastable to (B, H, Lq, Lk); added to the scores.
        scale: defaults to 1/sqrt(D).
        dropout_p, keep: dropout probability and the bool (B, H, Lq, Lk) keep mask.
    Returns:
        out (B, H, Lq, Dv) and lse (B, H, Lq), natural log, of the undropped scores.
    """
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
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
