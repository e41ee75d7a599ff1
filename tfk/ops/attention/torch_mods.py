"""The torch engine's score modifiers (``tfk.scores``), chunk by chunk.

A chunk's scores get, per query head, the distance bias at j - i (one gather
from the (H, Lq + Lk - 1) vector) and Transformer-XL's relative term from a
band of r per tile: for a tile of queries i0 + a and keys j0 + c, the rows
r[i - j + Lk - 1] it needs are the W = bq + bk - 1 rows below
top = i0 + bq - 1 - j0 + Lk - 1. Taken in descending order (band[w] =
r[top - w]), the tile's term qv_a . r[..] is entry (a, bq - 1 - a + c) of
qv @ bandᵀ (bq, W), i.e. the (bq, bk) view with strides (W - 1, 1) at offset
bq - 1: the relative shift as a strided view, never an Lq x Lk tensor. The
backward writes the tile's score gradients through the same view into a
zero (bq, W) band, which then gives the gradients of qv and of the band's r
rows. Each (batch, head) accumulates its own parameter gradients (units run
concurrently by batch and key head), summed at the end in a fixed order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2E = math.log2(math.e)


class Mods:
    """A call's modifiers in the engine's compute dtype (see tfk.scores.Fused)."""

    def __init__(self, fused, dtype, plan):
        self.cap = fused.softcap
        self.Lq, self.Lk = plan.lq, plan.lk
        self.bias2 = None if fused.bias is None else (fused.bias.to(dtype) * LOG2E).contiguous()
        self.bq, self.bk = plan.block_q, plan.block_k
        if self.bias2 is not None:
            # padded[h, bq + x] = bias2[h, x]: a tile row of contiguous keys reads a run of it
            self.padded = F.pad(self.bias2, (self.bq, self.bk + self.bq))
        # a -inf in the bias (an adaptive span's m = 0) can empty a query's row
        self.may_mask = self.bias2 is not None and bool(torch.isneginf(self.bias2).any())
        self.qv = None if fused.qv is None else fused.qv.to(dtype)
        self.r = None if fused.r is None else fused.r.to(dtype).contiguous()
        self.dbias = self.dqv = self.dr = None

    def query_side(self, eng, sp):
        return None if self.qv is None else eng.query_side(self.qv, sp.q_index)

    def _distance_index(self, c):
        """(R, bq, n*bk) entries j - i + Lq - 1 of the chunk's tiles."""
        R, bq = c.q_orig.shape
        return c.k_orig.view(R, 1, -1) - c.q_orig.view(R, bq, 1) + (self.Lq - 1)

    def _row_starts(self, c, sp):
        """(R, bq) entries of the padded vector where each query row's run of
        keys starts, when every row of the chunk reads contiguous keys in
        natural order (then a tile row's bias is a run of the vector: the bias
        is one gather of rows, the gradient per diagonal); else None."""
        if sp.q_index is not None or sp.kv_index is not None or c.step is None:
            return None
        return c.k_orig[:, :1] - c.q_orig + (self.Lq - 1 + self.bq)    # q_orig: padded rows clamped, masked

    def distance_bias(self, hq, c, sp):
        """Base-2 bias (R, G, bq, n*bk) of the chunk's scores for heads hq."""
        starts = self._row_starts(c, sp)
        if starts is None:
            return self.bias2[hq][:, self._distance_index(c)].transpose(0, 1)
        runs = self.padded[hq].unfold(1, c.nbk, 1)                       # (G, X, n*bk): runs[g, x] = padded[g, x:]
        return runs[:, starts].transpose(0, 1)

    @staticmethod
    def _diagonal_sums(ds4):
        """ds4 (R, G, bq, m) -> (R, G, m + bq - 1): entry t sums the scores with
        c - a = t - (bq - 1) (rows flipped, padded and re-strided so that each
        diagonal is a column)."""
        R, G, bq, m = ds4.shape
        M = m + bq
        P = ds4.new_zeros(R, G, bq, M)
        P[:, :, torch.arange(bq - 1, -1, -1, device=ds4.device), :m] = ds4   # rows reversed, without a flipped copy
        return P.as_strided((R, G, bq, M - 1), (G * bq * M, bq * M, M - 1, 1)).sum(2)

    def _band(self, h, c, bq, bk):
        """Head h's band of r per tile, descending: (R, n, W, D), and its row ids (R, n, W)."""
        R, n = c.R, c.n
        i0 = c.q_orig[:, 0]                                   # natural order: the block's first query
        j0 = c.kpos.view(R, n, bk)[:, :, 0]
        top = i0.view(R, 1) + (bq - 1 + self.Lk - 1) - j0
        W = bq + bk - 1
        ids = (top.unsqueeze(-1) - torch.arange(W, device=top.device)).clamp_(0, self.r.shape[1] - 1)
        r = self.r[h if self.r.shape[0] > 1 else 0]
        return r[ids], ids

    @staticmethod
    def _shift(P, bq, bk):
        """The (R, n, bq, bk) view of P (R, n, bq, W) at (a, bq - 1 - a + c)."""
        R, n, _, W = P.shape
        return P.as_strided((R, n, bq, bk), (n * bq * W, bq * W, W - 1, 1), P.storage_offset() + bq - 1)

    def relative_scores(self, qvc, hq, c, eng):
        """Transformer-XL's unscaled term (R, G*bq, n*bk) for query rows qvc (R, G*bq, D)."""
        bq, bk, G = eng.bq, eng.bk, eng.G
        out = qvc.new_empty(c.R, G, bq, c.n, bk)
        qv = qvc.view(c.R, G, bq, -1)
        for g in range(G):
            band, _ = self._band(hq.start + g, c, bq, bk)
            P = torch.matmul(qv[:, g].unsqueeze(1), band.transpose(-1, -2))      # (R, n, bq, W)
            out[:, g] = self._shift(P, bq, bk).transpose(1, 2)
        return out.view(c.R, G * bq, c.n * bk)

    # -- backward -------------------------------------------------------------

    def start_backward(self, eng):
        B, H = eng.B, eng.H
        dev, dt = eng.q.device, eng.dtype
        if self.bias2 is not None:
            self.dbias = torch.zeros(B, H, self.bias2.shape[1], dtype=dt, device=dev)
            self.dpadded = torch.zeros(B, H, self.padded.shape[1], dtype=dt, device=dev)
        if self.r is not None:
            nqp = -(-self.Lq // eng.bq) * eng.bq
            self.dqv = torch.zeros(B, H, nqp, self.qv.shape[-1], dtype=dt, device=dev)
            self.dr = torch.zeros(B, H, *self.r.shape[1:], dtype=dt, device=dev)

    def backward(self, ds, capped, qvc, b, hq, c, sp, eng):
        """From ds (R, G*bq, n*bk), the gradient of the final scores: adds the
        parameters' shares and returns the gradient of the raw scores q.k."""
        G, bq, bk = eng.G, eng.bq, eng.bk
        if self.dbias is not None:
            ds4 = ds.view(c.R, G, bq, -1)
            starts = self._row_starts(c, sp)
            if starts is None:
                index = self._distance_index(c).flatten()
                for g in range(G):
                    self.dbias[b, hq.start + g].index_add_(0, index, ds4[:, g].flatten())
            else:   # diagonal t of row r's tile is entry starts[r, 0] + t - (bq - 1) of the padded vector
                sums = self._diagonal_sums(ds4)   # (row 0 is never a padded row, whose start is clamped)
                first = starts[:, :1] - (bq - 1) + torch.arange(sums.shape[-1], device=ds.device)
                for g in range(G):
                    self.dpadded[b, hq.start + g].index_add_(0, first.flatten(), sums[:, g].flatten())
        if capped is not None:   # s = cap tanh(scale raw / cap): d/d raw = scale (1 - tanh^2), scale applied later
            ds = ds * capped.square_().neg_().add_(1)
        if self.r is not None:
            ds5 = ds.view(c.R, G, bq, c.n, bk)
            qv = qvc.view(c.R, G, bq, -1)
            W = bq + bk - 1
            for g in range(G):
                h = hq.start + g
                band, ids = self._band(h, c, bq, bk)
                dP = ds.new_zeros(c.R, c.n, bq, W)
                self._shift(dP, bq, bk).copy_(ds5[:, g].transpose(1, 2))
                rows = self.dqv[b, h].view(-1, bq, qv.shape[-1])
                rows[c.qb] += torch.matmul(dP, band).sum(1).mul_(eng.scale)
                dband = torch.matmul(dP.transpose(-1, -2), qv[:, g].unsqueeze(1)).mul_(eng.scale)
                self.dr[b, h].index_add_(0, ids.flatten(), dband.flatten(0, 2))
        return ds

    def grads(self):
        """(d qv (B, H, Lq, D), d r (H or 1, Lq + Lk - 1, D), d bias (H, Lq + Lk - 1)), None where absent."""
        dqv = dr = dbias = None
        if self.dbias is not None:
            Ld = self.dbias.shape[2]
            dbias = (self.dbias + self.dpadded[:, :, self.bq:self.bq + Ld]).sum(0)
        if self.r is not None:
            dqv = self.dqv[:, :, :self.Lq]
            dr = self.dr.sum(0)
            if self.r.shape[0] == 1:
                dr = dr.sum(0, keepdim=True)
        return dqv, dr, dbias
