"""Backend "torch": executes a plan block by block with torch ops.

Runs on any device torch does. For each sub-pass it takes chunks of query
blocks, gathers the key blocks their schedule lists, and computes the tile
scores in one batched matmul; memory is O(chunk * keys-per-row), never
O(Lq * Lk). Sub-passes merge by log-sum-exp; the backward recomputes the
scores of the same tiles with the merged lse and delta = rowsum(dO * O), as
flash attention does.
"""
from __future__ import annotations


import torch

from ... import dropout as drop
from ... import backends
from ...backends import AttentionCall, Backend, register_backend
from ...plan import from_layout, get_plan, to_layout
from .merge import merge_partials

BLOCK_Q = 64
BLOCK_K = 64
# Scores per chunk (B * H * rows * keys); bounds the working set.
CHUNK_ELEMENTS = 1 << 22

# Tiles processed by the last forward and backward (schedule tiles, as the
# plan counts them): lets tests check that no tile outside the plan is touched.
stats = {"forward_tiles": 0, "backward_tiles": 0}


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Tiles:
    """The tiles of query blocks [c0, c1) of one sub-pass, gathered."""

    def __init__(self, sp, c0, c1, bq, bk, device):
        count = sp.kv_count[:, c0:c1].long()
        nb = max(int(count.max()), 1)
        blocks = sp.kv_blocks[:, c0:c1, :nb].long()
        part = sp.kv_partial[:, c0:c1, :nb].long()
        used = torch.arange(nb, device=device).view(1, 1, -1) < count.unsqueeze(-1)
        self.num_tiles = int(used.sum())
        kpos = blocks.unsqueeze(-1) * bk + torch.arange(bk, device=device)         # (Hs, cq, nb, bk)
        allowed = (used & (part < 0)).view(*part.shape, 1, 1).expand(-1, -1, -1, bq, bk)
        if sp.num_partial:
            allowed = torch.where((part >= 0).view(*part.shape, 1, 1),
                                  sp.partial_masks[part.clamp(min=0)], allowed)
        allowed = allowed & (kpos < sp.lk).unsqueeze(-2)                            # ragged edge
        hs, cq = part.shape[:2]
        self.allowed = allowed.permute(0, 1, 3, 2, 4).reshape(hs, cq, bq, nb * bk)
        self.kpos = kpos.reshape(hs, cq, nb * bk).clamp(max=sp.lk - 1)             # layout positions
        rows = torch.arange(c0 * bq, c1 * bq, device=device)
        self.r0, self.r1 = c0 * bq, min(c1 * bq, sp.lq)
        self.qpos = rows.clamp(max=sp.lq - 1).view(c1 - c0, bq)                    # layout positions
        self.q_orig = self.qpos if sp.q_index is None else sp.q_index[self.qpos]
        self.k_orig = self.kpos if sp.kv_index is None else sp.kv_index[self.kpos]


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
        bq, bk = self.plan.block_q, self.plan.block_k
        nqb = sp.kv_count.shape[1]
        per_block = self.B * self.H * bq * bk * max(int(sp.kv_count.max()), 1)
        step = max(1, CHUNK_ELEMENTS // per_block)
        for c0 in range(0, nqb, step):
            yield _Tiles(sp, c0, min(nqb, c0 + step), bq, bk, self.q.device)

    def scores(self, t, q_l, k_l):
        """Masked scores (B, H, cq, bq, nkeys), keys gathered (B, H, cq, nkeys, D),
        and the dropout multiplier (or None)."""
        cq, bq = t.qpos.shape
        qc = q_l[:, :, t.qpos.flatten()].view(self.B, self.H, cq, bq, -1)
        kc = k_l[:, self.hk.view(-1, 1, 1), t.kpos]
        s = (qc @ kc.transpose(-1, -2)) * self.scale
        allowed = t.allowed.unsqueeze(0)
        if self.mask is not None:
            m = self.mask[torch.arange(self.B, device=s.device).view(-1, 1, 1, 1, 1),
                          torch.arange(self.H, device=s.device).view(1, -1, 1, 1, 1),
                          t.q_orig.view(1, 1, cq, bq, 1),
                          t.k_orig.unsqueeze(0).unsqueeze(-2)]
            if m.dtype == torch.bool:
                allowed = allowed & m
            else:
                s = s + m.to(s.dtype)
        s = s.masked_fill(~allowed, float("-inf"))
        mult = None
        if self.dropout_p > 0:
            ar = lambda n: torch.arange(n, device=s.device)
            kept = drop.keep(self.seed, ar(self.B).view(-1, 1, 1, 1, 1), ar(self.H).view(1, -1, 1, 1, 1),
                             t.q_orig.view(1, 1, cq, bq, 1), t.k_orig.unsqueeze(0).unsqueeze(-2), self.H,
                             self.dropout_p)
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
        tiles = 0
        for sp in self.plan.subpasses:
            q_l, k_l, v_l = self.layouts(sp)
            o_l = backends.new_output((self.B, self.H, sp.lq, self.Dv), self.dtype, self.q.device)
            lse_l = backends.new_output((self.B, self.H, sp.lq), self.dtype, self.q.device)
            for t in self.chunks(sp):
                tiles += t.num_tiles
                s, _, _, mult = self.scores(t, q_l, k_l)
                lse_c = torch.logsumexp(s, dim=-1)
                p = self.probs(s, lse_c.unsqueeze(-1))
                if mult is not None:
                    p = p * mult
                vc = v_l[:, self.hk.view(-1, 1, 1), t.kpos]
                n = t.r1 - t.r0
                o_l[:, :, t.r0:t.r1] = (p @ vc).flatten(2, 3)[:, :, :n]
                lse_l[:, :, t.r0:t.r1] = lse_c.flatten(2, 3)[:, :, :n]
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
        stats["forward_tiles"] = tiles
        return out, lse

    # -- backward -------------------------------------------------------------

    def backward(self, out, lse, dout, dlse):
        dout = dout.to(self.dtype)
        # dlse enters as an extra term: d lse / d s = p (undropped).
        delta = (dout * out.to(self.dtype)).sum(-1) - dlse.to(self.dtype)
        dq = torch.zeros_like(self.q)
        dk = torch.zeros_like(self.k)
        dv = torch.zeros_like(self.v)
        tiles = 0
        for sp in self.plan.subpasses:
            q_l, k_l, v_l = self.layouts(sp)
            lse_l, do_l, delta_l = (to_layout(x, sp.q_index) for x in (lse, dout, delta))
            dq_l = torch.zeros_like(q_l)
            # key gradients per query head, folded onto key heads at the end
            dk_h = torch.zeros(self.B, self.H * sp.lk, k_l.shape[-1], dtype=self.dtype, device=self.q.device)
            dv_h = torch.zeros(self.B, self.H * sp.lk, self.Dv, dtype=self.dtype, device=self.q.device)
            for t in self.chunks(sp):
                tiles += t.num_tiles
                cq, bq = t.qpos.shape
                s, qc, kc, mult = self.scores(t, q_l, k_l)
                rows = t.qpos.flatten()
                pick = lambda x: x[:, :, rows].view(self.B, self.H, cq, bq, *x.shape[3:])
                # padded rows (past the layout's end) get lse -inf: no probability, no gradient
                valid = (torch.arange(t.r0, t.r0 + cq * bq, device=s.device) < sp.lq).view(cq, bq)
                lse_c = pick(lse_l).masked_fill(~valid, float("-inf"))
                p = self.probs(s, lse_c.unsqueeze(-1))
                do_c = pick(do_l)
                vc = v_l[:, self.hk.view(-1, 1, 1), t.kpos]
                dp = do_c @ vc.transpose(-1, -2)
                pd = p if mult is None else p * mult
                if mult is not None:
                    dp = dp * mult
                ds = p * (dp - pick(delta_l).unsqueeze(-1))
                n = t.r1 - t.r0
                dq_l[:, :, t.r0:t.r1] += ((ds @ kc) * self.scale).flatten(2, 3)[:, :, :n]
                idx = (torch.arange(self.H, device=s.device).view(-1, 1, 1) * sp.lk + t.kpos).flatten()
                dv_h.index_add_(1, idx, (pd.transpose(-1, -2) @ do_c).flatten(1, 3))
                dk_h.index_add_(1, idx, ((ds.transpose(-1, -2) @ qc) * self.scale).flatten(1, 3))
            fold = lambda x: x.view(self.B, self.Hkv, self.H // self.Hkv, sp.lk, -1).sum(2)
            if sp.q_index is None:
                dq += dq_l
            else:
                dq[:, :, sp.q_index] += dq_l
            if sp.kv_index is None:
                dk += fold(dk_h)
                dv += fold(dv_h)
            else:
                dk[:, :, sp.kv_index] += fold(dk_h)
                dv[:, :, sp.kv_index] += fold(dv_h)
        stats["backward_tiles"] = tiles
        return dq, dk, dv


class TorchBlockAttention(torch.autograd.Function):
    """Attention over a plan; returns (out, lse). Differentiable in q, k, v
    (and through lse)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, attn_mask, scale, dropout_p, seed):
        engine = _Engine(q, k, v, plan, attn_mask, scale, dropout_p, seed)
        out, lse = engine.forward()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.args = (plan, scale, dropout_p, seed)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        engine = _Engine(q, k, v, *ctx.args[:1], attn_mask, *ctx.args[1:])
        dq, dk, dv = engine.backward(out, lse, dout, dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


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
        plain = call.pattern is None or call.pattern.key == ("causal", False)
        if plain and call.attn_mask is None and call.dropout_p == 0 and not call.return_lse:
            # torch's own fused CPU kernel is the fastest dense path
            from .api import torch_sdpa
            out = torch_sdpa(q, k, v, is_causal=call.pattern is not None, scale=call.scale,
                             enable_gqa=q.shape[1] != k.shape[1])
            return out, None
        plan = get_plan(call.pattern, q.shape[2], k.shape[2], BLOCK_Q, BLOCK_K, q.device)
        seed = drop.draw_seed() if call.dropout_p > 0 else 0
        return TorchBlockAttention.apply(q, k, v, plan, call.attn_mask, call.scale, call.dropout_p, seed)


register_backend(TorchBackend())
