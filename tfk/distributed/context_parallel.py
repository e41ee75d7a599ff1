"""Context-parallel attention: a sequence split across the ranks of a group.

"ring": every rank keeps its query shard; key/value rows travel to the ranks
whose queries need them (``schedule``), one ring step t at a time (rank r
sends to r + t and receives from r - t, with ``batch_isend_irecv``, the next
step's transfer in flight while this step computes). Each step's pieces run
on the local engine and merge into fp32 accumulators by log-sum-exp. The
backward sends the same rows again and the key/value gradients home.

"ulysses": all-to-all from sequence shards to head shards, the local engine
on the whole sequence, all-to-all back.
"""
from __future__ import annotations

import collections
import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import dropout as drop
from ..backends import AttentionCall, BackendUnavailable, select_backend
from ..ops.attention.api import _check_common, _check_shapes, _check_tensors
from ..patterns import Pattern, Shifted
from ..plan import get_plan
from . import layout as lay
from . import schedule as sched

METHODS = ("ring", "ulysses")

# Counters of communication, filled by every call inside count_communication().
_COUNTERS: list = []


@contextlib.contextmanager
def count_communication():
    """Counts what this rank's context-parallel calls inside the block send: a
    ``collections.Counter`` with "forward_bytes" and "backward_bytes" (payload
    sent), "ring_steps" (steps t = 1 .. P - 1 of ring calls),
    "skipped_steps" (steps in which this rank neither sent nor received key
    rows in the forward) and "compute_seconds" (host time in the ring's
    local attention pieces, waits excluded: on a GPU, launch time only)."""
    counts = collections.Counter()
    _COUNTERS.append(counts)
    try:
        yield counts
    finally:
        _COUNTERS.remove(counts)


def _count(name, n):
    for c in _COUNTERS:
        c[name] += n


def merge_into(acc_out, acc_lse, out, lse):
    """acc <- the log-sum-exp merge of acc and (out, lse), in place, in the
    sigmoid form (no exp of a large number): out = acc - sigmoid(lse -
    acc_lse) * (acc - out); lse = lse - logsigmoid(lse - acc_lse). Rows with
    lse = -inf (no key) leave acc as it is."""
    empty, fresh = torch.isneginf(lse), torch.isneginf(acc_lse)
    d = torch.where(empty, float("-inf"), lse - acc_lse)   # +inf where acc is empty and lse is not
    acc_out.sub_(torch.sigmoid(d).unsqueeze(-1) * (acc_out - out.to(acc_out.dtype)))
    acc_lse.copy_(torch.where(empty, acc_lse, torch.where(fresh, lse, lse - F.logsigmoid(d))))


class _Peers:
    """Point-to-point transfers within a group (ranks of the group, tagged)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = lay.group_info(group)

    def start(self, sends, recvs):
        """Posts every (tensor, group rank, tag) send and receive; returns the requests."""
        ops = []
        for op, items in ((dist.isend, sends), (dist.irecv, recvs)):
            for t, peer, tag in items:
                gpeer = peer if self.group is None else dist.get_global_rank(self.group, peer)
                ops.append(dist.P2POp(op, t, gpeer, self.group, tag))
        return dist.batch_isend_irecv(ops) if ops else []


def _rows(x, ranges):
    """Rows ``ranges`` of x (B, H, n, D) along dim 2, end to end, contiguous."""
    if ranges[0][0] == 0 and ranges[-1][1] == x.shape[2] and sum(b - a for a, b in ranges) == x.shape[2]:
        return x.contiguous()   # all of it, in order
    return torch.cat([x[:, :, a:b] for a, b in ranges], 2).contiguous()


def _add_rows(x, ranges, rows):
    """x[:, :, ranges] += rows (the layout of ``_rows``)."""
    at = 0
    for a, b in ranges:
        x[:, :, a:b] += rows[:, :, at:at + b - a]
        at += b - a


class _Ring:
    """One ring call's fixed facts: the schedule, the engine, the peers."""

    def __init__(self, links, peers, pattern, length, scale, mask, dropout_p, seed):
        self.links, self.peers, self.pattern, self.length = links, peers, pattern, length
        self.scale, self.mask, self.dropout_p, self.seed = scale, mask, dropout_p, seed
        self.tiles = self.fwd = self.bwd = None   # the engine's (set once a backend is chosen)

    def dropout(self, piece):
        """The dropout arguments of a piece: it draws its window of the whole call's keep mask."""
        if self.dropout_p == 0:
            return (0.0, 0), {}
        window = drop.Window(q_offset=piece.q_global, k_offset=piece.k_global)
        return (self.dropout_p, self.seed), dict(window=window)

    def plan(self, piece, device):
        shifted = Shifted(self.pattern, piece.q_global, piece.k_global, self.length)
        return get_plan(shifted, piece.q_len, piece.k_len, *self.tiles, device)

    def piece_mask(self, piece):
        if self.mask is None:
            return None
        return self.mask[..., piece.q_global:piece.q_global + piece.q_len,
                         piece.k_global:piece.k_global + piece.k_len]

    def kv_transfer(self, t, tensors, tag):
        """Step t's exchange of key rows: ours to rank + t, theirs from rank - t.
        Returns (requests, received tensors or None, bytes sent, the sends:
        their tensors must live until the requests complete)."""
        r, P = self.peers.rank, self.peers.world
        dst, src = (r + t) % P, (r - t) % P
        out_link, in_link = self.links[dst][r], self.links[r][src]
        sends, recvs, received, sent = [], [], None, 0
        if out_link.ranges:
            for i, x in enumerate(tensors):
                rows = _rows(x, out_link.ranges)
                sends.append((rows, dst, tag + i))
                sent += rows.numel() * rows.element_size()
        if in_link.ranges:
            received = [x.new_empty(*x.shape[:2], in_link.rows, *x.shape[3:]) for x in tensors]
            recvs = [(y, src, tag + i) for i, y in enumerate(received)]
        return self.peers.start(sends, recvs), received, sent, sends

    def forward(self, q, k, v):
        r, P = self.peers.rank, self.peers.world
        B, H, n = q.shape[:3]
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        acc_out = torch.zeros(B, H, n, v.shape[-1], dtype=acc_dtype, device=q.device)
        acc_lse = torch.full((B, H, n), float("-inf"), dtype=acc_dtype, device=q.device)
        pending = None
        for t in range(P):
            if t + 1 < P:  # the next step's rows travel while this one computes
                nxt = self.kv_transfer(t + 1, (k, v), 4 * (t + 1))
                _count("forward_bytes", nxt[2])
                _count("ring_steps", 1)
                _count("skipped_steps", int(not nxt[0]))
            link = self.links[r][(r - t) % P]
            if t == 0:
                kv = [_rows(x, link.ranges) for x in (k, v)] if link.ranges else None
            else:
                reqs, kv, _, _ = pending
                for w in reqs:
                    w.wait()
            start = time.perf_counter()
            for p in link.pieces:
                kb, vb = (x[:, :, p.buf:p.buf + p.k_len].contiguous() for x in kv)
                qp = q[:, :, p.q_local:p.q_local + p.q_len].contiguous()
                args, kw = self.dropout(p)
                o, l = self.fwd(qp, kb, vb, self.plan(p, q.device), self.piece_mask(p), self.scale, *args, **kw)
                rows = slice(p.q_local, p.q_local + p.q_len)
                merge_into(acc_out[:, :, rows], acc_lse[:, :, rows], o, l.to(acc_dtype))
            _count("compute_seconds", time.perf_counter() - start)
            pending = nxt if t + 1 < P else None
        return acc_out.to(q.dtype), acc_lse

    def backward(self, q, k, v, out, lse, dout, dlse):
        r, P = self.peers.rank, self.peers.world
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
        pending = grads_home = None
        for t in range(P):
            src = (r - t) % P
            link = self.links[r][src]
            if t + 1 < P:
                nxt = self.kv_transfer(t + 1, (k, v), 4 * (t + 1))
                _count("backward_bytes", nxt[2])
            if t == 0:
                kv = [_rows(x, link.ranges) for x in (k, v)] if link.ranges else None
            else:
                reqs, kv, _, _ = pending
                for w in reqs:
                    w.wait()
            pending = nxt if t + 1 < P else None
            gk = gv = None
            if link.pieces:
                gk, gv = (torch.zeros(*x.shape[:2], link.rows, x.shape[3], dtype=acc, device=x.device) for x in (k, v))
            start = time.perf_counter()
            for p in link.pieces:
                rows = slice(p.q_local, p.q_local + p.q_len)
                keys = slice(p.buf, p.buf + p.k_len)
                qp, op_, dop = (x[:, :, rows].contiguous() for x in (q, out, dout))
                lp, dlp = lse[:, :, rows].contiguous(), dlse[:, :, rows].contiguous()
                kb, vb = (x[:, :, keys].contiguous() for x in kv)
                args, kw = self.dropout(p)
                a, b, c = self.bwd(dop, dlp, qp, kb, vb, op_, lp, self.plan(p, q.device), self.piece_mask(p),
                                   self.scale, *args, **kw)
                dq[:, :, rows] += a
                gk[:, :, keys] += b
                gv[:, :, keys] += c
            _count("compute_seconds", time.perf_counter() - start)
            # key gradients go home: ours at once, others' to rank - t, theirs from rank + t
            if t == 0:
                if gk is not None:
                    _add_rows(dk, link.ranges, gk)
                    _add_rows(dv, link.ranges, gv)
                continue
            if grads_home is not None:
                self._land(grads_home, dk, dv)
            grads_home = self.grads_transfer(t, gk, gv, dk, dv)
        if grads_home is not None:
            self._land(grads_home, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    def grads_transfer(self, t, gk, gv, dk, dv):
        r, P = self.peers.rank, self.peers.world
        src, dst = (r - t) % P, (r + t) % P
        sends = [] if gk is None else [(gk, src, 4 * t + 2), (gv, src, 4 * t + 3)]
        back = self.links[dst][r]
        recvs = []
        if back.pieces:
            recvs = [(dk.new_empty(*dk.shape[:2], back.rows, dk.shape[3]), dst, 4 * t + 2),
                     (dv.new_empty(*dv.shape[:2], back.rows, dv.shape[3]), dst, 4 * t + 3)]
        _count("backward_bytes", sum(x.numel() * x.element_size() for x, _, _ in sends))
        return self.peers.start(sends, recvs), recvs, back.ranges, sends

    @staticmethod
    def _land(transfer, dk, dv):
        reqs, recvs, ranges, _ = transfer
        for w in reqs:
            w.wait()
        if recvs:
            _add_rows(dk, ranges, recvs[0][0])
            _add_rows(dv, ranges, recvs[1][0])


class _Attention(torch.autograd.Function):
    """(out, lse) of ``runner.forward(q, k, v)``; the backward is
    ``runner.backward(q, k, v, out, lse, dout, dlse)`` (a _Ring, or _Local)."""

    @staticmethod
    def forward(ctx, q, k, v, runner):
        out, lse = runner.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.runner = runner
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        return (*ctx.runner.backward(q, k, v, out, lse, dout, dlse), None)


def _seq_to_heads(x, group, layout):
    """(B, Hx, n, ...) sequence shards -> (B, Hx / P, L, ...) head shards, the
    sequence in natural order (all-to-all)."""
    rank, P = lay.group_info(group)
    B, Hx, n = x.shape[:3]
    rest = x.shape[3:]
    send = x.reshape(B, P, Hx // P, n, *rest).transpose(0, 1).contiguous()   # by destination (head group)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)                           # by source (sequence shard)
    y = recv.movedim(0, 2).reshape(B, Hx // P, P * n, *rest)                  # shards end to end
    return y.index_select(2, lay.natural_order(layout, P, n, x.device))


def _heads_to_seq(y, group, layout):
    """The inverse of ``_seq_to_heads``."""
    rank, P = lay.group_info(group)
    B, Hp, L = y.shape[:3]
    rest = y.shape[3:]
    n = L // P
    shards = y.index_select(2, lay.shard_order(layout, P, n, y.device))
    send = shards.reshape(B, Hp, P, n, *rest).movedim(2, 0).contiguous()      # by destination (sequence shard)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)                           # by source (head group)
    return recv.transpose(0, 1).reshape(B, P * Hp, n, *rest)


class _Reshard(torch.autograd.Function):
    """Sequence shards to head shards (``to_heads``) or back; the backward
    is the other direction."""

    @staticmethod
    def forward(ctx, x, group, layout, to_heads):
        ctx.args = group, layout, not to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, layout)

    @staticmethod
    def backward(ctx, grad):
        group, layout, to_heads = ctx.args
        return (_seq_to_heads if to_heads else _heads_to_seq)(grad.contiguous(), group, layout), None, None, None


def _check_mask(mask, q, length):
    if mask is None:
        return None
    if not torch.is_tensor(mask):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise TypeError(f"attn_mask must be bool, float32 or query's dtype {q.dtype}, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"attn_mask is on {mask.device}, expected query's device {q.device}")
    full = (q.shape[0], q.shape[1], length, length)
    if mask.dim() != 4 or any(m not in (1, f) for m, f in zip(mask.shape, full)):
        raise ValueError(f"attn_mask must be 4-D and broadcast to (B, H, L, L) = {full} for the whole "
                         f"sequence, got shape {tuple(mask.shape)}")
    if mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("attn_mask takes no gradient in context_parallel_attention (detach it)")
    return mask


def context_parallel_attention(query, key, value, pattern=None, *, group=None, method="ring", layout="zigzag",
                               scale=None, dropout_p=0.0, backend="auto", return_lse=False, attn_mask=None):
    """Attention over a sequence split across the ranks of ``group``.

    Each rank passes its shard of the sequence, in ``layout`` ("zigzag": the
    sequence cut in 2P chunks, rank r holding chunks r and 2P - 1 - r;
    "contiguous": rank r holding positions [r L/P, (r+1) L/P); see
    ``tfk.distributed.shard``): query (B, H, L/P, D), key (B, Hkv, L/P, D),
    value (B, Hkv, L/P, Dv). It gets its shard of what ``tfk.attention`` on the
    whole sequence returns, forward and backward: out (B, H, L/P, Dv), and with
    ``return_lse`` lse (B, H, L/P) (float32; float64 for float64 inputs).

    pattern: any ``tfk.patterns`` pattern, at the whole sequence's positions.
    attn_mask: None, or a bool or float mask of the whole sequence,
        broadcastable to (B, H, L, L), the same on every rank.
    method: "ring" (key/value rows go to the ranks that need them, as the
        plan decides; steps with no tile send nothing) or "ulysses"
        (all-to-all to head shards: H and Hkv divisible by P).
    dropout_p: dropout on the probabilities with the keep mask one process
        would draw (the seed from every rank's torch generator, the first
        rank's taken).
    backend: the engine each rank runs ("auto", "torch", "triton", "cuda",
        "cuda-sim").
    Every rank of the group must call it with the same pattern, mask and
    options (and run the backward).
    """
    _check_tensors(query, key, value)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L/P, D), got {t.dim()}-D of shape {tuple(t.shape)}")
    _check_shapes(query, key, value, gqa=True)
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"query's shard has {query.shape[2]} positions and key's {key.shape[2]}: context "
                         "parallelism needs Lq == Lk")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    lay.check_layout(layout)
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a tfk.patterns pattern or None, got {type(pattern).__name__}")
    scale = _check_common(scale, dropout_p, query.shape[-1])
    dropout_p = float(dropout_p)
    rank, P = lay.group_info(group)
    n = query.shape[2]
    if layout == "zigzag" and n % 2:
        raise ValueError(f"the zigzag layout holds two chunks a rank: the shard's length {n} must be even")
    length = n * P
    if pattern is not None:
        if pattern.heads not in (None, 1, query.shape[1]):
            raise ValueError(f"pattern has {pattern.heads} heads but query has {query.shape[1]}")
        pattern.check_lengths(length, length)
    mask = _check_mask(attn_mask, query, length)
    seed = _shared_seed(group, query.device) if dropout_p > 0 else 0
    if method == "ulysses":
        return _ulysses(query, key, value, pattern, mask, group, P, layout, scale, dropout_p, seed, backend,
                        return_lse)
    links = sched.build(pattern, length, P, layout, n, mask)
    first = next((p for row in links for link in row for p in link.pieces), None)
    if first is None:   # nothing allowed anywhere
        first = sched.Piece(0, n, 0, 0, n, 0)
    ring = _Ring(links, _Peers(group), pattern, length, scale, mask, dropout_p, seed)
    call = AttentionCall(query[:, :, :first.q_len], key[:, :, :first.k_len], value[:, :, :first.k_len],
                         Shifted(pattern, first.q_global, first.k_global, length), ring.piece_mask(first),
                         scale, dropout_p, True)
    ring.tiles, ring.fwd, ring.bwd = _engine(backend, call)
    out, lse = _Attention.apply(query, key, value, ring)
    return (out, lse) if return_lse else out


def _engine(backend, call):
    """(tiles, forward, backward) of the backend that runs ``call``'s pieces."""
    chosen = select_backend(backend, call)
    functions = chosen.block_functions(call)
    if functions is None:
        raise BackendUnavailable(f"backend {chosen.name!r} cannot run context-parallel attention (it has no "
                                 "block functions): use 'torch', 'triton', 'cuda' or 'cuda-sim'")
    return functions


def _shared_seed(group, device):
    """A dropout seed every rank of the group agrees on: each draws one from
    its torch generator (as one process would), the group's first rank's wins."""
    seed = torch.tensor([drop.draw_seed()], dtype=torch.int64, device=device)
    dist.broadcast(seed, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    return int(seed)


def _ulysses(q, k, v, pattern, mask, group, P, layout, scale, dropout_p, seed, backend, return_lse):
    H, Hkv = q.shape[1], k.shape[1]
    if H % P or Hkv % P:
        raise ValueError(f"ulysses splits heads across {P} ranks: query's {H} and key/value's {Hkv} heads must "
                         "both be divisible by it (or use method='ring')")
    if pattern is not None and pattern.heads not in (None, 1):
        raise ValueError(f"ulysses splits heads across ranks: a per-head pattern ({pattern.heads} heads) is not "
                         "supported (use method='ring')")
    rank = lay.group_info(group)[0]
    qh, kh, vh = (_Reshard.apply(x, group, layout, True) for x in (q, k, v))
    if mask is not None and mask.shape[1] != 1:
        mask = mask[:, rank * (H // P):(rank + 1) * (H // P)]
    call = AttentionCall(qh, kh, vh, pattern, mask, scale, dropout_p, True)
    tiles, forward, backward = _engine(backend, call)
    kw = dict(window=drop.Window(head_offset=rank * (H // P), heads=H)) if dropout_p > 0 else {}
    plan = get_plan(pattern, qh.shape[2], kh.shape[2], *tiles, q.device)
    local = _Local(forward, backward, plan, mask, scale, dropout_p, seed, kw)
    out, lse = _Attention.apply(qh.contiguous(), kh.contiguous(), vh.contiguous(), local)
    out = _Reshard.apply(out, group, layout, False)
    return (out, _Reshard.apply(lse, group, layout, False)) if return_lse else out


class _Local:
    """A backend's block functions on a rank's whole problem (ulysses' heads),
    with its place in the whole call's dropout mask."""

    def __init__(self, forward, backward, plan, mask, scale, dropout_p, seed, kw):
        self.fwd, self.bwd, self.args, self.kw = forward, backward, (plan, mask, scale, dropout_p, seed), kw

    def forward(self, q, k, v):
        return self.fwd(q, k, v, *self.args, **self.kw)

    def backward(self, q, k, v, out, lse, dout, dlse):
        return self.bwd(dout, dlse, q, k, v, out, lse, *self.args, **self.kw)
