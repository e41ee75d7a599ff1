"""Backend "torch": executes a plan tile by tile with torch ops.

Runs on any device torch does. For each sub-pass it takes chunks of whole
schedule rows (query blocks), gathers exactly the tiles their schedule lists,
each with its key block, and computes all their scores in one batched matmul:
no tile outside the plan is scored, and memory is O(tiles per chunk), never
O(Lq * Lk). A row's softmax combines its tiles by segment reductions; sub-passes
merge by log-sum-exp. The backward recomputes the scores of the same tiles with
the merged lse and delta = rowsum(dO * O), as flash attention does, and adds
each tile's dq, dk and dv at its positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import dropout as drop
from ... import backends
from ...backends import AttentionCall, Backend, register_backend
from ...plan import from_layout, plan_id, to_layout
from .engine import attention_ops
from .merge import merge_partials

BLOCK_Q = 64
BLOCK_K = 64
# Scores per chunk (B * heads * tiles * BLOCK_Q * BLOCK_K); bounds the working set.
CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Tiles:
    """The schedule's tiles of query blocks [c0, c1) of one sub-pass, as a flat
    list in (schedule head, query block) order.

    Tensors are shaped (Hb, T, ...): Hb = H when the schedule is shared by
    every head (each tile then stands for H of them), else 1, with each tile's
    own head in ``head``.
    """

    def __init__(self, sp, H, c0, c1, bq, bk, device):
        count = sp.kv_count[:, c0:c1].long()
        hs, cq = count.shape
        nb = max(int(count.max()), 1)
        used = torch.arange(nb, device=device) < count.unsqueeze(-1)               # (Hs, cq, nb)
        sh, qb, slot = used.nonzero(as_tuple=True)                                  # row-major: (head, qblock) order
        kb = sp.kv_blocks[:, c0:c1][sh, qb, slot].long()
        part = sp.kv_partial[:, c0:c1][sh, qb, slot].long()
        self.num = (H if hs == 1 else 1) * kb.numel()  # (head, tile) pairs
        # a row id per tile for segment reductions: rows are (schedule head, query block)
        self.row = sh * cq + qb
        self.rows = hs * cq
        self.head = (torch.arange(H, device=device).view(H, 1) if hs == 1 else sh.view(1, -1))
        ar_q, ar_k = torch.arange(bq, device=device), torch.arange(bk, device=device)
        qpos = (c0 + qb).unsqueeze(-1) * bq + ar_q                                     # (T, bq) layout positions
        kpos = kb.unsqueeze(-1) * bk + ar_k                                            # (T, bk)
        allowed = (qpos < sp.lq).unsqueeze(-1) & (kpos < sp.lk).unsqueeze(-2)         # the sequences' edges
        if sp.num_partial:
            tile = sp.partial_masks[part.clamp(min=0)]
            allowed = torch.where((part >= 0).view(-1, 1, 1), tile, allowed)
        self.allowed = allowed                                                         # (T, bq, bk)
        self.qpad, self.kpad = qpos, kpos                                              # padded: where grads add up
        self.qpos, self.kpos = qpos.clamp(max=sp.lq - 1), kpos.clamp(max=sp.lk - 1)    # where inputs are read
        self.q_orig = self.qpos if sp.q_index is None else sp.q_index[self.qpos]
        self.k_orig = self.kpos if sp.kv_index is None else sp.kv_index[self.kpos]
        self.r0, self.r1 = c0 * bq, min(c1 * bq, sp.lq)  # the layout rows these blocks hold

    def to_positions(self, x, H):
        """Per-row results (B, Hb, rows, bq, ...) as (B, H, r1 - r0, ...), the
        layout rows r0..r1 of every head."""
        x = x.reshape(x.shape[0], H, -1, *x.shape[4:])
        return x[:, :, :self.r1 - self.r0]


class _Engine:
    """Everything one call needs, in the compute dtype and the plan's layouts."""

    def __init__(self, q, k, v, plan, attn_mask, scale, dropout_p, seed):
        self.dtype = _compute_dtype(q.dtype)
        self.q, self.k, self.v = (t.to(self.dtype) for t in (q, k, v))
        self.plan, self.scale, self.dropout_p, self.seed = plan, scale, dropout_p, seed
        self.B, self.H, self.Lq, _ = q.shape
        self.Hkv, self.Lk = k.shape[1], k.shape[2]
        self.Dv = v.shape[-1]
        self.hk = torch.arange(self.H, device=q.device) // (self.H // self.Hkv)
        self.mask = None
        if attn_mask is not None:
            self.mask = attn_mask.expand(self.B, self.H, self.Lq, self.Lk)

    def layouts(self, sp):
        return to_layout(self.q, sp.q_index), to_layout(self.k, sp.kv_index), to_layout(self.v, sp.kv_index)

    def chunks(self, sp):
        """_Tiles over runs of whole query blocks, each within CHUNK_ELEMENTS
        scores (a block with more tiles than that is a chunk of its own)."""
        bq, bk = self.plan.block_q, self.plan.block_k
        per_tile = self.B * (self.H if sp.kv_count.shape[0] == 1 else 1) * bq * bk
        budget = max(1, CHUNK_ELEMENTS // per_tile)
        per_block = sp.kv_count.sum(0).tolist()
        c0, tiles = 0, 0
        for c, n in enumerate(per_block):
            if c > c0 and tiles + n > budget:
                yield _Tiles(sp, self.H, c0, c, bq, bk, self.q.device)
                c0, tiles = c, 0
            tiles += n
        if per_block:
            yield _Tiles(sp, self.H, c0, len(per_block), bq, bk, self.q.device)

    def gather(self, x, t, pos):
        """Rows ``pos`` (T, n) of x (B, H, L, ...) at each tile's heads: (B, Hb, T, n, ...)."""
        return x[:, t.head.unsqueeze(-1), pos]

    def gather_kv(self, x, t):
        """Each tile's keys of x (B, Hkv, Lk, ...), for its heads' key heads: (B, Hb, T, bk, ...)."""
        return x[:, self.hk[t.head].unsqueeze(-1), t.kpos]

    def scores(self, t, q_l, k_l, pass_name):
        """Masked scores (B, Hb, T, bq, bk), the gathered queries and keys, and
        the dropout multiplier (or None)."""
        backends.add_tiles(pass_name, self.B * t.num)
        qc = self.gather(q_l, t, t.qpos)
        kc = self.gather_kv(k_l, t)
        s = (qc @ kc.transpose(-1, -2)) * self.scale
        allowed = t.allowed
        b = torch.arange(self.B, device=s.device).view(-1, 1, 1, 1, 1)
        h = t.head.view(1, *t.head.shape, 1, 1)
        i, j = t.q_orig.view(1, 1, -1, t.q_orig.shape[1], 1), t.k_orig.view(1, 1, -1, 1, t.k_orig.shape[1])
        if self.mask is not None:
            m = self.mask[b, h, i, j]
            if m.dtype == torch.bool:
                allowed = allowed & m
            else:
                s = s + m.to(s.dtype)
        s = s.masked_fill(~allowed, float("-inf"))
        mult = None
        if self.dropout_p > 0:
            kept = drop.keep(self.seed, b, h, i, j, self.H, self.dropout_p)
            mult = kept.to(s.dtype) / (1.0 - self.dropout_p)
        return s, qc, kc, mult

    @staticmethod
    def probs(s, lse):
        """exp(s - lse), 0 in rows that saw no key."""
        empty = torch.isneginf(lse)
        return torch.where(empty, torch.zeros_like(s), torch.exp(s - lse.masked_fill(empty, 0)))

    # -- forward --------------------------------------------------------------

    def forward(self):
        out = lse = None
        for sp in self.plan.subpasses:
            q_l, k_l, v_l = self.layouts(sp)
            o_l = backends.new_output((self.B, self.H, sp.lq, self.Dv), self.dtype, self.q.device)
            lse_l = backends.new_output((self.B, self.H, sp.lq), self.dtype, self.q.device)
            for t in self.chunks(sp):
                s, _, _, mult = self.scores(t, q_l, k_l, "forward")
                rows = (*s.shape[:2], t.rows, s.shape[-2])
                # each row's softmax over its tiles: a segment max, then a segment sum
                tile_max = s.amax(-1)
                m = torch.full(rows, float("-inf"), dtype=s.dtype, device=s.device)
                m.scatter_reduce_(2, t.row.view(1, 1, -1, 1).expand_as(tile_max), tile_max, "amax")
                m.masked_fill_(torch.isneginf(m), 0)
                e = torch.exp(s - m[:, :, t.row].unsqueeze(-1))
                l = torch.zeros(rows, dtype=s.dtype, device=s.device).index_add_(2, t.row, e.sum(-1))
                p = e / l.masked_fill(l == 0, 1)[:, :, t.row].unsqueeze(-1)
                if mult is not None:
                    p = p * mult
                o = torch.zeros(*rows, self.Dv, dtype=s.dtype, device=s.device)
                o.index_add_(2, t.row, p @ self.gather_kv(v_l, t))
                o_l[:, :, t.r0:t.r1] = t.to_positions(o, self.H)
                lse_l[:, :, t.r0:t.r1] = t.to_positions(m + torch.log(l), self.H)  # log 0: -inf for empty rows
            # queries outside this sub-pass's layout saw none of its keys
            o_sp = from_layout(o_l, sp.q_index, self.Lq, 0.0)
            lse_sp = from_layout(lse_l, sp.q_index, self.Lq, float("-inf"))
            if out is None:
                out, lse = o_sp, lse_sp
            else:
                out, lse = merge_partials(out, lse, o_sp, lse_sp)
        if out is None:  # nothing allowed anywhere (or an empty sequence)
            out = torch.zeros(self.B, self.H, self.Lq, self.Dv, dtype=self.dtype, device=self.q.device)
            lse = torch.full((self.B, self.H, self.Lq), float("-inf"), dtype=self.dtype, device=self.q.device)
        return out, lse

    # -- backward -------------------------------------------------------------

    def backward(self, out, lse, dout, dlse):
        dout = dout.to(self.dtype)
        # dlse enters as an extra term: d lse / d s = p (undropped).
        delta = (dout * out.to(self.dtype)).sum(-1) - dlse.to(self.dtype)
        dq = torch.zeros_like(self.q)
        dk = torch.zeros_like(self.k)
        dv = torch.zeros_like(self.v)
        B, H, dev = self.B, self.H, self.q.device
        for sp in self.plan.subpasses:
            q_l, k_l, v_l = self.layouts(sp)
            do_l = to_layout(dout, sp.q_index)
            # row statistics padded to whole query blocks: padding rows get no probability
            nqp = sp.kv_count.shape[1] * self.plan.block_q
            pad = lambda x, fill: F.pad(to_layout(x, sp.q_index), (0, nqp - sp.lq), value=fill)
            lse_p, delta_p = pad(lse, float("-inf")), pad(delta, 0.0)
            dq_l = torch.zeros_like(q_l)
            # key gradients per query head at padded key positions, folded onto key heads at the end
            nkp = sp.q_count.shape[1] * self.plan.block_k
            dk_h = torch.zeros(B, H * nkp, k_l.shape[-1], dtype=self.dtype, device=dev)
            dv_h = torch.zeros(B, H * nkp, self.Dv, dtype=self.dtype, device=dev)
            for t in self.chunks(sp):
                s, qc, kc, mult = self.scores(t, q_l, k_l, "backward")
                p = self.probs(s, self.gather(lse_p, t, t.qpad).unsqueeze(-1))
                do_c = self.gather(do_l, t, t.qpos)
                dp = do_c @ self.gather_kv(v_l, t).transpose(-1, -2)
                pd = p
                if mult is not None:
                    pd, dp = p * mult, dp * mult
                ds = p * (dp - self.gather(delta_p, t, t.qpad).unsqueeze(-1))
                dq_rows = torch.zeros(*s.shape[:2], t.rows, s.shape[-2], q_l.shape[-1], dtype=s.dtype, device=dev)
                dq_rows.index_add_(2, t.row, ds @ kc)
                dq_l[:, :, t.r0:t.r1] += t.to_positions(dq_rows, H) * self.scale
                at = (t.head.unsqueeze(-1) * nkp + t.kpad).flatten()          # (head, padded key) per score column
                dv_h.index_add_(1, at, (pd.transpose(-1, -2) @ do_c).flatten(1, 3))
                dk_h.index_add_(1, at, ((ds.transpose(-1, -2) @ qc) * self.scale).flatten(1, 3))
            fold = lambda x: x.view(B, self.Hkv, H // self.Hkv, nkp, -1).sum(2)[:, :, :sp.lk]
            if sp.q_index is None:
                dq += dq_l
            else:
                dq.index_add_(2, sp.q_index, dq_l)
            if sp.kv_index is None:
                dk += fold(dk_h)
                dv += fold(dv_h)
            else:
                dk.index_add_(2, sp.kv_index, fold(dk_h))
                dv.index_add_(2, sp.kv_index, fold(dv_h))
        return dq, dk, dv


def _forward(q, k, v, plan, mask, scale, dropout_p, seed):
    out, lse = _Engine(q, k, v, plan, mask, scale, dropout_p, seed).forward()
    return out.to(q.dtype), lse


def _backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p, seed):
    dq, dk, dv = _Engine(q, k, v, plan, mask, scale, dropout_p, seed).backward(out, lse, dout, dlse)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) (float64 for float64
# inputs, else float32); dq, dk, dv. A custom op like the kernel backends',
# so torch.compile(fullgraph=True) traces through this backend too.
torch_attention_fwd = attention_ops("torch_attention", _forward, _backward)


class TorchBackend(Backend):
    name = "torch"
    priority = 10

    def reasons(self, call):
        why = []
        if call.attn_mask is not None and call.attn_mask.requires_grad and torch.is_grad_enabled():
            why.append("no gradient with respect to attn_mask (detach it, or use backend='reference')")
        return why

    def run(self, call: AttentionCall):
        q, k, v = call.q, call.k, call.v
        ident = plan_id(call.pattern, q.shape[2], k.shape[2], BLOCK_Q, BLOCK_K, q.device)
        seed = drop.draw_seed() if call.dropout_p > 0 else 0
        return torch_attention_fwd(q, k, v, call.attn_mask, ident, call.scale, call.dropout_p, seed)


register_backend(TorchBackend())
