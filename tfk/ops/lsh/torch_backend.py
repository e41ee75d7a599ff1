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

with no out_r and no second forward; window gradients add onto their
positions, the key role's through the length normalisation, dx = r/√D · (dk -
x r² (dk·x) / D), r = rsqrt(mean(x²) + 1e-6).

How (each cut measured at L = 16384, n_hashes = 4, one thread):
- the keys are never formed: Kw = diag(r/√D) Xw, so S = (Q Xw^T) · (scale·r/√D
  per column), dQ = (dS ∘ cols) Xw and the key role's dx is the normalisation's
  backward, linear in its dk, applied once per position to the sum over windows;
- exp(t) as exp2(t · log2 e): torch's exp of -inf or of underflowing values
  takes a slow path (several times slower), exp2 does not. t = S - max (or
  S - lse) is formed in natural units first, as Hugging Face's logsumexp does:
  near the self logit (-1e5) float32's absolute precision is 0.008, and a
  query that sees only itself must merge its rounds as Hugging Face does;
- the self entries: a query's own slot is in its own chunk, at a fixed column
  (a strided diagonal); only windows that reach another round (or repeat a
  chunk) compare positions element by element;
- the forward scales O_c (C x Dv), not P (C x W·C); the backward takes P =
  exp(S - lse_c) from the saved lse_slots (no logsumexp);
- windows are gathered by rows straight from qk and value (no sorted copies),
  gradients index_add_ straight onto positions, O_c and lse_c index_copy_ onto
  (round, position);
- a block's scratch tensors are reused from block to block (_Workspace).

Forward and backward go a block of chunks at a time (BLOCK_ELEMENTS scores a
block): memory is O(n·L·Dv) for the rounds' outputs, O(L·D) for gradients,
plus one block's scores, never L×L nor the whole (n·L, W·C) score tensor.
At L = 16384, n_hashes = 4 (bench.lsh, one thread, hashing included) the
forward+backward is about 3x faster than Hugging Face's LSH math (1.7x before
these cuts), at about 0.16 of its peak memory (0.45 before). Everything runs
in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch

from ... import dropout as drop
from ...backends import new_output

SELF_LOGIT = -1e5
EPS = 1e-6
LOG2E = 1 / math.log(2)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# Scores a block of chunks computes at once: a few MiB, reused from block to
# block (_Workspace).
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


def _rsqrt_ms(x):
    """r = rsqrt(mean(x²) + 1e-6) per row (the keys' length normalisation),
    without an x-sized temporary."""
    return torch.linalg.vector_norm(x, dim=-1).square_().div_(x.shape[-1]).add_(EPS).rsqrt_()


def keys_of(x):
    """The keys of qk = x (..., D): x · r / √D (the kernel backends form them;
    this backend scales score columns instead, _key_scale)."""
    return x * (_rsqrt_ms(x) / math.sqrt(x.shape[-1]))[..., None]


def keys_backward(x, dk):
    """d loss / dx (float32 x, dk) from d loss / d keys_of(x) (_key_backward)."""
    D = x.shape[-1]
    G = dk * (_rsqrt_ms(x) / math.sqrt(D))[..., None]
    return _key_backward(x.reshape(-1, D), G.reshape(-1, D), _Workspace()).view(x.shape)


def _key_scale(x, scale):
    """scale · r / √D per position, the key being x times r / √D: it scales the
    score columns (one pass over the scores, none over gathered keys)."""
    return _rsqrt_ms(x).mul_(scale / math.sqrt(x.shape[-1]))


def _key_backward(x, G, ws):
    """dx from G (M, D) = Σ over windows of r/√D · dk (dk: the normalised key's
    gradient), x (M, D): dx = G - x r² (G·x) / D, linear in G, so once per
    position on the sum. In place, BLOCK_ELEMENTS at a time."""
    D = x.shape[-1]
    step = max(1, BLOCK_ELEMENTS // D)
    for a in range(0, x.shape[0], step):
        g, q = G[a:a + step], x[a:a + step]
        t = ws("t", g.shape, g.dtype, g.device)
        c = torch.mul(g, q, out=t).sum(-1, keepdim=True).mul_(_rsqrt_ms(q).square_().div_(D)[:, None])
        g.sub_(torch.mul(q, c, out=t))
    return G


class _Workspace:
    """Scratch tensors reused from block to block, by name: a fresh multi-MiB
    tensor per block costs page faults each time (the CPU allocator gives big
    blocks back to the system), about a third of the time."""

    def __init__(self):
        self.bufs = {}

    def __call__(self, name, shape, dtype, device):
        n = math.prod(shape)
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = self.bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(shape)


def _fill_self(S, qp, kp, idx, before, value, L):
    """S (B, H, nb, C, W·C) = value where key position == query position. A
    query's own slot is in its own chunk (window index ``before``), at column
    before·C + i: a strided diagonal. Other copies of its position come only
    from chunks of another round, or from its own chunk repeated (W > N): only
    those chunks compare positions element by element."""
    C = S.shape[3]
    S[..., before * C:(before + 1) * C].diagonal(0, -2, -1).fill_(value)
    own = idx[:, before:before + 1]
    other = ((idx * C // L) != (own * C // L)).any(1) | ((idx == own).sum(1) > 1)
    if other.any():
        j = other.nonzero()[:, 0]
        sub = S.index_select(2, j)
        sub.masked_fill_(kp.index_select(2, j) == qp.index_select(2, j), value)
        S.index_copy_(2, j, sub)


def _block_logits(xf, pos, ks, idx, c0, c1, before, L, key_padding_mask, causal, ws):
    """One block of chunks c0 .. c1 - 1, from xf (B·H·L, D) the qk rows and pos
    (B, H, N, C) each slot's position: the windows' rows Xw (B, H, nb, W·C, D),
    its queries Qb (the own chunk's rows of Xw: a view), the logits S masked,
    self entries SELF_LOGIT, the query and key positions and the windows' row
    indices into (B·H·L, F) views."""
    B, H, _, C = pos.shape
    kpos = _in_windows(pos, idx)                                    # (B, H, nb, W·C)
    rows_w = _rows(kpos.reshape(B, H, -1), L)
    Xw = torch.index_select(xf, 0, rows_w, out=ws("xw", (rows_w.numel(), xf.shape[1]), xf.dtype, xf.device)) \
        .view(B, H, c1 - c0, -1, xf.shape[1])
    Qb = Xw[:, :, :, before * C:(before + 1) * C]
    qp = pos[:, :, c0:c1, :, None]                                  # (B, H, nb, C, 1)
    kp = kpos[:, :, :, None, :]
    S = torch.matmul(Qb, Xw.transpose(-1, -2), out=ws("s", (B, H, c1 - c0, C, kpos.shape[-1]), xf.dtype, xf.device))
    S.mul_(_in_windows(ks, idx)[:, :, :, None, :])
    masked = torch.gt(kp, qp, out=ws("mask", S.shape, torch.bool, S.device)) if causal else None
    if key_padding_mask is not None:
        pad = ~key_padding_mask[:, None, :].expand(B, H, L).gather(2, kpos.reshape(B, H, -1)) \
            .view(B, H, c1 - c0, 1, -1)
        masked = pad if masked is None else masked.logical_or_(pad)
    if masked is not None:
        S.masked_fill_(masked, float("-inf"))
    _fill_self(S, qp, kp, idx, before, SELF_LOGIT, L)
    return Xw, Qb, S, qp, kp, rows_w


def _keep(c0, c1, n, L, qp, kp, dropout_p, dropout_seed):
    """The block's dropout keep mask, or None."""
    if dropout_p == 0:
        return None
    B, H, _, C = qp.shape[:4]
    b = torch.arange(B, device=qp.device).view(B, 1, 1, 1, 1)
    h = torch.arange(H, device=qp.device).view(1, H, 1, 1, 1)
    r = (torch.arange(c0, c1, device=qp.device) * C // L).view(1, 1, -1, 1, 1)   # the round of each chunk
    return drop.keep(dropout_seed, b, h * n + r, qp, kp, H * n, dropout_p)


def _prepare(qk, value, order, chunk_size, scale):
    """qk and value as (B·H·L, F) rows in the accumulation dtype, each slot's
    position (B, H, N, C) and key scale (B, H, N, C)."""
    acc = acc_dtype(qk.dtype)
    B, H, n, L = order.shape
    x = qk.to(acc)
    slots = order.reshape(B, H, n * L)
    ks = _key_scale(x, scale).gather(2, slots).view(B, H, -1, chunk_size)
    return x.reshape(B * H * L, -1), value.to(acc).reshape(B * H * L, -1), slots.view(ks.shape), ks


def _rounds(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p, dropout_seed):
    """out, lse and each sorted slot's lse within its chunk's window (B, H, n·L)."""
    B, H, n, L = order.shape
    xf, vf, pos, ks = _prepare(qk, value, order, chunk_size, scale)
    N, C, Dv = pos.shape[2], chunk_size, vf.shape[1]
    out_r = vf.new_empty(B, H, n, L, Dv)
    lse_r = vf.new_empty(B, H, n, L)
    lse_c = vf.new_empty(B, H, N, C)
    bh = torch.arange(0, B * H * n * L, n * L, device=qk.device).view(B, H, 1)
    ws = _Workspace()
    for c0, c1 in _blocks(B, H, N, C, 1 + before + after):
        idx = _window_index(c0, c1, N, before, after, qk.device)
        _, _, S, qp, kp, rows_w = _block_logits(xf, pos, ks, idx, c0, c1, before, L, key_padding_mask, causal, ws)
        m = S.amax(-1, keepdim=True)                                # finite: the self entry is
        E = S.sub_(m).mul_(LOG2E).exp2_()
        s = E.sum(-1, keepdim=True)
        lse_b = m + s.log()
        lse_c[:, :, c0:c1] = lse_b[..., 0]
        # P = E · exp(m - lse), as Hugging Face's exp(S - lse) with its float32
        # lse (near -1e5 that is not E / s), applied to O (C x Dv), not to P
        f = torch.exp(m - lse_b)
        keep = _keep(c0, c1, n, L, qp, kp, dropout_p, dropout_seed)
        if keep is not None:
            E.mul_(keep)
            f.div_(1 - dropout_p)
        Vw = torch.index_select(vf, 0, rows_w, out=ws("vw", (rows_w.numel(), Dv), vf.dtype, vf.device))
        O = torch.matmul(E, Vw.view(*S.shape[:-2], -1, Dv), out=ws("o", (*S.shape[:-1], Dv), vf.dtype, vf.device))
        O.mul_(f)
        # onto (round, position): row bh·n·L + round·L + position of out_r
        rnd = torch.arange(c0 * C, c1 * C, device=qk.device) // L * L
        rr = (bh + rnd + pos[:, :, c0:c1].reshape(B, H, -1)).reshape(-1)
        out_r.view(-1, Dv).index_copy_(0, rr, O.view(-1, Dv))
        lse_r.view(-1).index_copy_(0, rr, lse_b.view(-1))
    lse = torch.logsumexp(lse_r, 2)
    w = torch.exp(lse_r - lse[:, :, None])                          # (B, H, n, L)
    out = out_r[:, :, 0] * w[:, :, 0, :, None]                    # Σ_r w_r out_r, round by round (an einsum
    for r in range(1, n):                                           # permutes out_r for a bmm of 1 x n x n)
        out.addcmul_(out_r[:, :, r], w[:, :, r, :, None])
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
    xf, vf, pos, ks = _prepare(qk, value, order, chunk_size, scale)
    N, C, D, Dv = pos.shape[2], chunk_size, xf.shape[1], vf.shape[1]
    do = dout.to(acc)                                               # (B, H, L, Dv)
    c = -(do * out.to(acc)).sum(-1)                                 # (B, H, L): dlse - dout · out
    if dlse is not None:
        c = c + dlse.to(acc)
    slots = pos.reshape(B, H, -1)
    w = torch.exp(lse_slots.to(acc) - lse.to(acc).gather(2, slots))  # (B, H, n·L): w_r at each slot
    coef = (w * c.gather(2, slots)).view(B, H, N, C)
    w = w.view(B, H, N, C, 1)
    do = do.reshape(B * H * L, Dv)
    lse_s = lse_slots.to(acc).view(B, H, N, C)
    G = torch.zeros_like(xf)        # Σ over windows of r/√D · d(normalised key), per position (_key_backward)
    dv_pos = torch.zeros_like(vf)
    dq_pos = torch.zeros_like(xf)
    ws = _Workspace()
    W = 1 + before + after
    for c0, c1 in _blocks(B, H, N, C, W):
        nb = c1 - c0
        idx = _window_index(c0, c1, N, before, after, qk.device)
        Xw, Qb, S, qp, kp, rows_w = _block_logits(xf, pos, ks, idx, c0, c1, before, L, key_padding_mask, causal,
                                                  ws)
        P = S.sub_(lse_s[:, :, c0:c1, :, None]).mul_(LOG2E).exp2_()
        keep = _keep(c0, c1, n, L, qp, kp, dropout_p, dropout_seed)
        rows = _rows(pos[:, :, c0:c1].reshape(B, H, -1), L)
        dOb = torch.index_select(do, 0, rows, out=ws("do", (rows.numel(), Dv), acc, do.device)) \
            .view(B, H, nb, C, Dv).mul_(w[:, :, c0:c1])             # dO_c = w_r dout at the block's slots
        Vw = torch.index_select(vf, 0, rows_w, out=ws("vw", (rows_w.numel(), Dv), acc, vf.device)) \
            .view(B, H, nb, W * C, Dv)
        Pd = P if keep is None else P * keep / (1 - dropout_p)
        dVw = torch.matmul(Pd.transpose(-1, -2), dOb, out=ws("dvw", (B, H, nb, W * C, Dv), acc, vf.device))
        dv_pos.index_add_(0, rows_w, dVw.view(-1, Dv))
        dP = torch.matmul(dOb, Vw.transpose(-1, -2), out=ws("dp", S.shape, acc, vf.device))
        if keep is not None:
            dP.mul_(keep).div_(1 - dropout_p)
        dS = P.mul_(dP.add_(coef[:, :, c0:c1, :, None]))
        _fill_self(dS, qp, kp, idx, before, 0, L)                  # the self logit is a constant
        dS.mul_(_in_windows(ks, idx)[:, :, :, None, :])             # d/d(q·x): scale · r / √D per key column
        # the queries' part is final here: straight onto their positions
        dq_pos.index_add_(0, rows, torch.matmul(dS, Xw, out=ws("dq", (B, H, nb, C, D), acc, xf.device)).view(-1, D))
        Gb = torch.matmul(dS.transpose(-1, -2), Qb, out=ws("g", (B, H, nb, W * C, D), acc, xf.device))
        G.index_add_(0, rows_w, Gb.view(-1, D))
    dq_pos.add_(_key_backward(xf, G, ws))
    dqk, dvalue = new_output(qk.shape, qk.dtype, qk.device), new_output(value.shape, value.dtype, value.device)
    dqk.copy_(dq_pos.view(qk.shape))
    dvalue.copy_(dv_pos.view(value.shape))
    return dqk, dvalue
