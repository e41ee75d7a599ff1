"""LSH attention with torch ops on the sorted, chunked layout: the CPU default.

``order`` (B, H, n, L) holds, per round, the positions sorted by (bucket,
position); the rounds concatenated give n·L slots, cut into N = n·L / C chunks
of C = chunk_size. Chunk c attends to chunks c - before .. c + after (mod N):
W = 1 + before + after key chunks, in that order (the window order of Hugging
Face's ``_look_adjacent``). Per chunk:

    S   = scale · Q Kw^T          Q (C, D) the sorted qk, Kw (W·C, D) its normalised keys
    S   = -1e5 where key position == query position; -inf where masked
    P   = exp(S - lse_c),  lse_c = logsumexp(S)    O_c = (P ∘ keep / (1 - p)) Vw

then O_c, lse_c go back to original positions per round (out_r, lse_r) and the
rounds merge: lse = logsumexp_r lse_r, out = Σ_r exp(lse_r - lse) out_r.

Backward (explicit): between forward and backward the inputs, ``order``, out,
lse and lse_slots (each sorted slot's lse_c, n·L floats) are kept. With
w_r = exp(lse_r - lse), dO_r = w_r dout and dlse_r = w_r (dout · out_r -
dout · out + dlse); the softmax's rowsum(dP ∘ P) = w_r dout · out_r cancels
the first part, so one pass that recomputes S and P takes

    dPd    = dO_c Vw^T,  dVw = Pd^T dO_c,  dP = dPd ∘ keep / (1 - p)
    dS     = P ∘ (dP + w_r (dlse - dout · out)),   0 at the self entries (a constant)
    dQ     = scale · dS Kw,  dKw = scale · dS^T Q

with no out_r and no second forward; window gradients add onto their chunks,
the key role's through the length normalisation, dx = r/√D · (dk - x r²
(dk·x) / D), r = rsqrt(mean(x²) + 1e-6), and slots scatter-add onto positions.

Forward and backward go a block of chunks at a time (BLOCK_ELEMENTS scores a
block), gathering each block's key windows by index: memory is the sorted qk
and v and their gradients, O(n·L·D), plus one block's scores, never L×L nor
the whole (n·L, W·C) score tensor. At L = 16384, n_hashes = 4 (bench.lsh,
one thread) the forward+backward peak is about 0.4 of Hugging Face's LSH
math and the time about half.
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


# Scores a block of chunks computes at once: a few MiB, reused by the
# allocator from block to block.
BLOCK_ELEMENTS = 1 << 20


def _blocks(B, H, N, C, W):
    """(c0, c1) ranges of chunks, about BLOCK_ELEMENTS scores each."""
    step = max(1, BLOCK_ELEMENTS // (B * H * C * W * C))
    for c0 in range(0, N, step):
        yield c0, min(N, c0 + step)


def _window_index(c0, c1, N, before, after, device):
    """(c1 - c0, W): the key chunks of chunks c0 .. c1 - 1, c - before .. c + after (mod N)."""
    return (torch.arange(c0, c1, device=device)[:, None] + torch.arange(-before, after + 1, device=device)) % N


def _in_windows(x, idx):
    """x (B, H, N, C, ...) at the window index (nb, W) -> (B, H, nb, W·C, ...)."""
    B, H, _, C = x.shape[:4]
    return x.index_select(2, idx.reshape(-1)).view(B, H, idx.shape[0], idx.shape[1] * C, *x.shape[4:])


def _rows(slots, L):
    """Row indices into a (B·H·L, F) view for the positions ``slots`` (B, H, S):
    index_select and index_add_ copy whole rows, where gather and scatter_add
    with an index expanded over F (or advanced indexing) go element by element,
    several times slower here."""
    B, H, _ = slots.shape
    return (slots + torch.arange(0, B * H * L, L, device=slots.device).view(B, H, 1)).reshape(-1)


def _gather_slots(x, slots):
    """x (B, H, L, F) at slots (B, H, S) -> (B, H, S, F)."""
    B, H, L, Fd = x.shape
    return x.reshape(B * H * L, Fd).index_select(0, _rows(slots, L)).view(B, H, -1, Fd)


def _normalise(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) / math.sqrt(x.shape[-1])


def _normalise_backward(x, dk):
    D = x.shape[-1]
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return (r / math.sqrt(D)) * (dk - x * (r * r) * (dk * x).sum(-1, keepdim=True) / D)


def _layout(qk, value, order, chunk_size):
    """The sorted chunked layout: Q (B, H, N, C, D) and V (B, H, N, C, Dv) in the
    accumulation dtype, and the original position of each slot (B, H, N, C)."""
    acc = acc_dtype(qk.dtype)
    B, H, n, L = order.shape
    C, N = chunk_size, n * L // chunk_size
    slots = order.reshape(B, H, n * L)
    Q = _gather_slots(qk.to(acc), slots).view(B, H, N, C, -1)
    V = _gather_slots(value.to(acc), slots).view(B, H, N, C, -1)
    return Q, V, slots.view(B, H, N, C)


def _block_probs(Q, V, pos, idx, c0, c1, L, n, key_padding_mask, causal, scale, dropout_p, dropout_seed):
    """One block of chunks c0 .. c1 - 1: its queries, key and value windows, P,
    lse_c, the dropout keep mask (or None) and where key == query."""
    B, H, N, C, _ = Q.shape
    Qb = Q[:, :, c0:c1]
    Kw, Vw = _normalise(_in_windows(Q, idx)), _in_windows(V, idx)
    qp = pos[:, :, c0:c1, :, None]                                  # (B, H, nb, C, 1)
    kpos = _in_windows(pos, idx)                                    # (B, H, nb, W·C)
    kp = kpos[:, :, :, None, :]
    S = (Qb @ Kw.transpose(-1, -2)).mul_(scale)                     # (B, H, nb, C, W·C)
    masked = kp > qp if causal else None
    if key_padding_mask is not None:
        pad = ~key_padding_mask[:, None, :].expand(B, H, L).gather(2, kpos.reshape(B, H, -1)) \
            .view(B, H, c1 - c0, 1, -1)
        masked = pad if masked is None else masked | pad
    if masked is not None:
        S.masked_fill_(masked, float("-inf"))
    is_self = kp == qp
    S.masked_fill_(is_self, SELF_LOGIT)
    lse_c = torch.logsumexp(S, -1)                                  # (B, H, nb, C)
    P = S.sub_(lse_c[..., None]).exp_()
    keep = None
    if dropout_p > 0:
        b = torch.arange(B, device=Q.device).view(B, 1, 1, 1, 1)
        h = torch.arange(H, device=Q.device).view(1, H, 1, 1, 1)
        r = (torch.arange(c0, c1, device=Q.device) * C // L).view(1, 1, -1, 1, 1)   # the round of each chunk
        keep = drop.keep(dropout_seed, b, h * n + r, qp, kp, H * n, dropout_p)
    return Qb, Kw, Vw, P, lse_c, keep, is_self


def _undo(x_slots, order, n, L):
    """Sorted slots (B, H, n·L, F) -> per round original positions (B, H, n, L, F)."""
    B, H = order.shape[:2]
    inv = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=order.device).expand_as(order)
                                           .contiguous())
    inv = inv + torch.arange(0, n * L, L, device=order.device).view(1, 1, n, 1)   # slot of (round, position)
    return _gather_slots(x_slots, inv.view(B, H, n * L)).view(B, H, n, L, -1)


def _rounds(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed):
    """out, lse and each sorted slot's lse within its chunk's window (B, H, n·L)."""
    B, H, n, L = order.shape
    Q, V, pos = _layout(qk, value, order, chunk_size)
    N, C = Q.shape[2], chunk_size
    O_c = Q.new_empty(B, H, N, C, V.shape[-1])
    lse_c = Q.new_empty(B, H, N, C)
    for c0, c1 in _blocks(B, H, N, C, 1 + before + after):
        idx = _window_index(c0, c1, N, before, after, Q.device)
        _, _, Vw, P, lse_b, keep, _ = _block_probs(Q, V, pos, idx, c0, c1, L, n, key_padding_mask, causal, scale,
                                                   dropout_p, dropout_seed)
        Pd = P if keep is None else P.mul_(keep).div_(1 - dropout_p)
        torch.matmul(Pd, Vw, out=O_c[:, :, c0:c1])
        lse_c[:, :, c0:c1] = lse_b
    out_r = _undo(O_c.view(B, H, n * L, -1), order, n, L)
    lse_r = _undo(lse_c.view(B, H, n * L, 1), order, n, L)[..., 0]
    lse = torch.logsumexp(lse_r, 2)
    w = torch.exp(lse_r - lse[:, :, None])                          # (B, H, n, L)
    out = torch.einsum("bhnl,bhnld->bhld", w, out_r)
    return out, lse, lse_c.view(B, H, n * L)


def lsh_forward(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p,
                dropout_seed):
    """(out (B, H, L, Dv) in qk's dtype, lse (B, H, L) and lse_slots (B, H, n·L), float32
    (float64 for float64 inputs)."""
    out, lse, lse_c = _rounds(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale,
                              dropout_p, dropout_seed)
    B, H, L = lse.shape
    result = new_output((B, H, L, value.shape[-1]), qk.dtype, qk.device)
    lse_out, lse_slots = new_output((B, H, L), lse.dtype, qk.device), new_output(lse_c.shape, lse.dtype, qk.device)
    result.copy_(out)
    lse_out.copy_(lse)
    lse_slots.copy_(lse_c)
    return result, lse_out, lse_slots


def lsh_backward(dout, dlse, qk, value, order, key_padding_mask, out, lse, lse_slots, chunk_size, before, after,
                 causal, scale, dropout_p, dropout_seed):
    """(dqk, dvalue) for the gradients dout (B, H, L, Dv) and dlse (B, H, L) or None,
    from the forward's out, lse and lse_slots.

    With w_r = exp(lse_r - lse), dO_c = w_r dout and dlse_r = w_r (dout · out_r -
    dout · out + dlse), the softmax term rowsum(dP ∘ P) = w_r dout · out_r
    cancels dlse_r's first part: dS = P ∘ (dP + w_r (dlse - dout · out)), so
    neither out_r nor a second forward is needed."""
    B, H, n, L = order.shape
    acc = acc_dtype(qk.dtype)
    Q, V, pos = _layout(qk, value, order, chunk_size)
    N, C, D, Dv = Q.shape[2], chunk_size, Q.shape[-1], V.shape[-1]
    do = dout.to(acc)                                               # (B, H, L, Dv)
    c = -(do * out.to(acc)).sum(-1)                                 # (B, H, L): dlse - dout · out
    if dlse is not None:
        c = c + dlse.to(acc)
    slots = pos.reshape(B, H, -1)
    w = torch.exp(lse_slots.to(acc) - lse.to(acc).gather(2, slots))  # (B, H, n·L): w_r at each slot
    dO_c = _gather_slots(do, slots).mul_(w[..., None]).view(B, H, N, C, Dv)
    coef = (w * c.gather(2, slots)).view(B, H, N, C)
    dQ = torch.zeros_like(Q)        # d loss / d sorted qk, both roles (query, and key through the normalisation)
    dV = torch.zeros_like(V)
    W = 1 + before + after
    for c0, c1 in _blocks(B, H, N, C, W):
        idx = _window_index(c0, c1, N, before, after, Q.device)
        Qb, Kw, Vw, P, _, keep, is_self = _block_probs(Q, V, pos, idx, c0, c1, L, n, key_padding_mask, causal,
                                                       scale, dropout_p, dropout_seed)
        dOb = dO_c[:, :, c0:c1]
        Pd = P if keep is None else P * keep / (1 - dropout_p)
        dVw = Pd.transpose(-1, -2) @ dOb
        dP = dOb @ Vw.transpose(-1, -2)
        if keep is not None:
            dP = dP * keep / (1 - dropout_p)
        dS = P.mul_(dP + coef[:, :, c0:c1, :, None])
        dS.masked_fill_(is_self, 0).mul_(scale)
        dQ[:, :, c0:c1] += dS @ Kw
        dKw = _normalise_backward(_in_windows(Q, idx), dS.transpose(-1, -2) @ Qb)
        flat = idx.reshape(-1)
        dQ.index_add_(2, flat, dKw.view(B, H, -1, C, D))
        dV.index_add_(2, flat, dVw.view(B, H, -1, C, Dv))
    rows = _rows(slots, L)
    dq_pos = torch.zeros(B * H * L, D, dtype=acc, device=qk.device).index_add_(0, rows, dQ.reshape(-1, D))
    dv_pos = torch.zeros(B * H * L, Dv, dtype=acc, device=qk.device).index_add_(0, rows, dV.reshape(-1, Dv))
    dqk, dvalue = new_output(qk.shape, qk.dtype, qk.device), new_output(value.shape, value.dtype, value.device)
    dqk.copy_(dq_pos.view(qk.shape))
    dvalue.copy_(dv_pos.view(value.shape))
    return dqk, dvalue
