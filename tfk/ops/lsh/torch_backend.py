"""LSH attention with torch ops on the sorted, chunked layout: the CPU default.

``order`` (B, H, n, L) holds, per round, the positions sorted by (bucket,
position); the rounds concatenated give n·L slots, cut into N = n·L / C chunks
of C = chunk_size. Chunk c attends to chunks c - before .. c + after (mod N):
W = 1 + before + after key chunks, gathered by ``torch.roll`` of the chunk axis
(the window order of Hugging Face's ``_look_adjacent``). Per chunk:

    S   = scale · Q Kw^T          Q (C, D) the sorted qk, Kw (W·C, D) its normalised keys
    S   = -1e5 where key position == query position; -inf where masked
    P   = exp(S - lse_c),  lse_c = logsumexp(S)    O_c = (P ∘ keep / (1 - p)) Vw

then O_c, lse_c go back to original positions per round (out_r, lse_r) and the
rounds merge: lse = logsumexp_r lse_r, out = Σ_r exp(lse_r - lse) out_r.

Backward (explicit; S, P, O_r recomputed from the inputs, nothing but the
inputs and ``order`` kept between forward and backward):

    dO_r   = w_r dout,   w_r = exp(lse_r - lse)
    dlse_r = w_r (dout · (out_r - out) + dlse)
    dPd    = dO_c Vw^T,  dVw = Pd^T dO_c,  dP = dPd ∘ keep / (1 - p)
    dS     = P ∘ (dP - rowsum(dP ∘ P) + dlse_c),   0 at the self entries (a constant)
    dQ     = scale · dS Kw,  dKw = scale · dS^T Q

window gradients roll back onto their chunks, slots scatter-add onto positions,
and the key role's gradient passes through the normalisation:
dx = r/√D · (dk - x r² (dk·x) / D), r = rsqrt(mean(x²) + 1e-6).

Memory: the scores are (B, H, N, C, W·C) = O(n · L · C · W) per head, never L×L.
Everything runs in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch

from ... import dropout as drop
from ...backends import new_output

SELF_LOGIT = -1e5
EPS = 1e-6


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _windows(x, before, after):
    """(B, H, N, C, ...) -> (B, H, N, W·C, ...): for chunk c, the chunks
    c - before .. c + after (mod N) in that order (Hugging Face's ``_look_adjacent``)."""
    if before == 0 and after == 0:
        return x
    return torch.cat([x.roll(-d, dims=2) for d in range(-before, after + 1)], dim=3)


def _unwindow(dx, before, after, C):
    """The transpose of _windows: (B, H, N, W·C, ...) -> (B, H, N, C, ...)."""
    if before == 0 and after == 0:
        return dx
    parts = dx.split(C, dim=3)
    total = None
    for part, d in zip(parts, range(-before, after + 1)):
        rolled = part.roll(d, dims=2)
        total = rolled if total is None else total + rolled
    return total


def _gather_slots(x, slots):
    """x (B, H, L, F) at slots (B, H, S) -> (B, H, S, F)."""
    return x.gather(2, slots[..., None].expand(-1, -1, -1, x.shape[-1]))


def _normalise(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) / math.sqrt(x.shape[-1])


def _normalise_backward(x, dk):
    D = x.shape[-1]
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return (r / math.sqrt(D)) * (dk - x * (r * r) * (dk * x).sum(-1, keepdim=True) / D)


def _chunk_scores(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p,
                  dropout_seed):
    """Everything the forward and the backward share, in the sorted chunked layout."""
    acc = acc_dtype(qk.dtype)
    B, H, n, L = order.shape
    C, N = chunk_size, n * L // chunk_size
    x, v = qk.to(acc), value.to(acc)
    slots = order.reshape(B, H, n * L)
    Q = _gather_slots(x, slots).view(B, H, N, C, -1)
    Kw = _windows(_normalise(Q), before, after)
    Vw = _windows(_gather_slots(v, slots).view(B, H, N, C, -1), before, after)
    qpos = slots.view(B, H, N, C)
    kpos = _windows(qpos, before, after)                           # (B, H, N, W·C)
    S = (Q @ Kw.transpose(-1, -2)).mul_(scale)                      # (B, H, N, C, W·C)
    qp, kp = qpos[..., :, None], kpos[..., None, :]
    masked = None
    if causal:
        masked = kp > qp
    if key_padding_mask is not None:
        pad = ~key_padding_mask[:, None, :].expand(B, H, L).gather(2, kpos.reshape(B, H, -1)).view(B, H, N, 1, -1)
        masked = pad if masked is None else masked | pad
    if masked is not None:
        S.masked_fill_(masked, float("-inf"))
    is_self = kp == qp
    S.masked_fill_(is_self, SELF_LOGIT)
    lse_c = torch.logsumexp(S, -1)                                  # (B, H, N, C)
    P = torch.exp(S - lse_c[..., None])
    keep = None
    if dropout_p > 0:
        b = torch.arange(B, device=qk.device).view(B, 1, 1, 1, 1)
        h = torch.arange(H, device=qk.device).view(1, H, 1, 1, 1)
        r = (torch.arange(N, device=qk.device) * C // L).view(1, 1, N, 1, 1)   # the round of each chunk
        keep = drop.keep(dropout_seed, b, h * n + r, qp, kp, H * n, dropout_p)
    return Q, Kw, Vw, slots, P, lse_c, keep, is_self


def _undo(x_slots, order, n, L):
    """Sorted slots (B, H, n·L, F) -> per round original positions (B, H, n, L, F)."""
    B, H = order.shape[:2]
    inv = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=order.device).expand_as(order)
                                           .contiguous())
    x = x_slots.view(B, H, n, L, -1)
    return x.gather(3, inv[..., None].expand(-1, -1, -1, -1, x.shape[-1]))


def _rounds(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed):
    B, H, n, L = order.shape
    Q, Kw, Vw, slots, P, lse_c, keep, is_self = _chunk_scores(
        qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed)
    Pd = P if keep is None else P * keep / (1 - dropout_p)
    O_c = Pd @ Vw                                                   # (B, H, N, C, Dv)
    out_r = _undo(O_c.reshape(B, H, n * L, -1), order, n, L)
    lse_r = _undo(lse_c.reshape(B, H, n * L, 1), order, n, L)[..., 0]
    lse = torch.logsumexp(lse_r, 2)
    w = torch.exp(lse_r - lse[:, :, None])                          # (B, H, n, L)
    out = (w[..., None] * out_r).sum(2)
    return out, lse, out_r, w, (Q, Kw, Vw, slots, P, Pd, keep, is_self)


def lsh_forward(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p,
                dropout_seed):
    """(out (B, H, L, Dv) in qk's dtype, lse (B, H, L) float32, float64 for float64 inputs)."""
    out, lse, *_ = _rounds(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p,
                           dropout_seed)
    B, H, L = lse.shape
    result = new_output((B, H, L, value.shape[-1]), qk.dtype, qk.device)
    lse_out = new_output((B, H, L), lse.dtype, qk.device)
    result.copy_(out)
    lse_out.copy_(lse)
    return result, lse_out


def lsh_backward(dout, dlse, qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale,
                 dropout_p, dropout_seed):
    """(dqk, dvalue) for the gradients dout (B, H, L, Dv) and dlse (B, H, L) or None."""
    B, H, n, L = order.shape
    C, N = chunk_size, n * L // chunk_size
    acc = acc_dtype(qk.dtype)
    out, lse, out_r, w, (Q, Kw, Vw, slots, P, Pd, keep, is_self) = _rounds(
        qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed)
    do = dout.to(acc)[:, :, None]                                   # (B, H, 1, L, Dv)
    dO_r = w[..., None] * do
    g = (do * (out_r - out[:, :, None])).sum(-1)
    if dlse is not None:
        g = g + dlse.to(acc)[:, :, None]
    dlse_r = w * g                                                  # (B, H, n, L)
    # per round, original positions -> sorted slots
    dO_c = dO_r.gather(3, order[..., None].expand(-1, -1, -1, -1, dO_r.shape[-1])).view(B, H, N, C, -1)
    dlse_c = dlse_r.gather(3, order).view(B, H, N, C)
    dVw = Pd.transpose(-1, -2) @ dO_c
    dP = dO_c @ Vw.transpose(-1, -2)
    if keep is not None:
        dP = dP * keep / (1 - dropout_p)
    dS = P * (dP - (dP * P).sum(-1, keepdim=True) + dlse_c[..., None])
    dS.masked_fill_(is_self, 0)
    dS.mul_(scale)
    dQ = dS @ Kw
    dKw = dS.transpose(-1, -2) @ Q
    dK = _unwindow(dKw, before, after, C)
    dV = _unwindow(dVw, before, after, C)
    x = qk.to(acc)
    idx = lambda t: slots[..., None].expand(-1, -1, -1, t.shape[-1])
    D, Dv = x.shape[-1], value.shape[-1]
    dq_pos = torch.zeros(B, H, L, D, dtype=acc, device=qk.device).scatter_add_(2, idx(x), dQ.reshape(B, H, -1, D))
    dk_slots = _normalise_backward(Q.reshape(B, H, -1, D), dK.reshape(B, H, -1, D))
    dq_pos.scatter_add_(2, idx(x), dk_slots)
    dv_pos = torch.zeros(B, H, L, Dv, dtype=acc, device=qk.device).scatter_add_(2, idx(dV), dV.reshape(B, H, -1, Dv))
    dqk, dvalue = new_output(qk.shape, qk.dtype, qk.device), new_output(value.shape, value.dtype, value.device)
    dqk.copy_(dq_pos)
    dvalue.copy_(dv_pos)
    return dqk, dvalue
