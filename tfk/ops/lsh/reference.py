"""The LSH-attention oracle: a dense formulation per hash round, in the inputs'
dtype (the tests and the "reference" backend call it in float64). It shares
nothing with the other backends: they are checked against it. Gradients by
autograd.

Round r sorts the positions by (bucket, position); the rounds are concatenated
(n·L sorted slots) and cut into chunks of ``chunk_size``. The window of a query
is its chunk and ``chunks_before`` / ``chunks_after`` neighbours, circularly, so
``counts[r, i, j]`` (how often key position j lies in the window of query
position i in round r, 0, 1, 2, ...) is the whole layout. Per round, with
k = qk · rsqrt(mean(qk², -1) + 1e-6) / sqrt(D) and s = scale · q·k:

    logit_ij = -1e5 where j == i; s_ij where allowed (key kept, j <= i if causal); else -inf
    lse_r,i  = log Σ_j counts_ij exp(logit_ij)
    out_r,i  = Σ_j counts_ij exp(logit_ij - lse_r,i) · keep_ij / (1 - p) · v_j

and the rounds merge by log-sum-exp: lse = logsumexp_r lse_r,
out = Σ_r exp(lse_r - lse) out_r.
"""
import math

import torch

SELF_LOGIT = -1e5


def window_counts(buckets, chunk_size, chunks_before, chunks_after):
    """(B, H, n, L, L) counts of key position j in the window of query position i,
    round r, from buckets (B, H, n, L) (only their order within a round matters)."""
    B, H, n, L = buckets.shape
    pos = torch.arange(L, device=buckets.device)
    order = torch.argsort(buckets * L + pos, dim=-1)               # (B, H, n, L): position at each sorted slot
    slots = order.reshape(B, H, n * L)                              # the concatenated sequence
    n_chunks = n * L // chunk_size
    chunk_of_slot = torch.arange(n * L, device=buckets.device) // chunk_size
    counts = torch.zeros(B, H, n * L, L, dtype=torch.int64, device=buckets.device)
    for d in range(-chunks_before, chunks_after + 1):
        other = (chunk_of_slot + d) % n_chunks                      # the neighbour chunk of each query slot
        keys = other[:, None] * chunk_size + torch.arange(chunk_size, device=buckets.device)   # (nL, C) slots
        key_pos = slots[:, :, keys]                                 # (B, H, nL, C) key positions
        counts.scatter_add_(3, key_pos, torch.ones_like(key_pos))
    # rows are query slots; move them to query positions per round
    counts = counts.view(B, H, n, L, L)
    inv = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order).contiguous())
    return counts.gather(3, inv[..., None].expand(B, H, n, L, L))


def lsh_attention_reference(qk, value, buckets, *, chunk_size, chunks_before=1, chunks_after=0, causal=False,
                            key_padding_mask=None, scale=1.0, dropout_p=0.0, keep=None):
    """(out (B, H, L, Dv), lse (B, H, L)) for qk (B, H, L, D), value (B, H, L, Dv).

    buckets (B, H, n, L), or None for the full-attention path (L <= chunk_size:
    one round, every key in the window once). keep: None or the (B, H, n, L, L)
    bool dropout keep mask (applied with 1 / (1 - dropout_p))."""
    B, H, L, D = qk.shape
    if buckets is None:
        counts = torch.ones(B, H, 1, L, L, dtype=torch.int64, device=qk.device)
    else:
        counts = window_counts(buckets, chunk_size, chunks_before, chunks_after)
    k = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(D)
    s = scale * qk @ k.transpose(-1, -2)                            # (B, H, L, L)
    i = torch.arange(L, device=qk.device)
    allowed = torch.ones(L, L, dtype=torch.bool, device=qk.device)
    if causal:
        allowed = i[None, :] <= i[:, None]
    allowed = allowed.expand(B, 1, L, L)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    logits = s.masked_fill(~allowed, float("-inf"))
    logits = torch.where(i[:, None] == i[None, :], torch.full_like(s, SELF_LOGIT), logits)
    logits = logits.unsqueeze(2) + counts.to(qk.dtype).log()        # (B, H, n, L, L); count 0 -> -inf
    lse_r = torch.logsumexp(logits, -1)                             # (B, H, n, L)
    p = torch.exp(logits - lse_r[..., None])
    if keep is not None and dropout_p > 0:
        p = p * keep / (1 - dropout_p)
    out_r = p @ value.unsqueeze(2)                                  # (B, H, n, L, Dv)
    lse = torch.logsumexp(lse_r, 2)
    out = (torch.exp(lse_r - lse[:, :, None])[..., None] * out_r).sum(2)
    return out, lse
