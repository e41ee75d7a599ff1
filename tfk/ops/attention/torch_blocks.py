"""Backend "torch": executes a plan tile by tile with torch ops.

Runs on any device torch does. Each sub-pass's schedule rows (query blocks)
are grouped by their tile count n; a chunk of such rows is, for one batch and
key head, one batched matmul (rows, G*block_q, D) @ (rows, D, n*block_k):
exactly the plan's tiles are scored (the G query heads of a key head stack
along the rows), a row's softmax is a dense softmax over its n*block_k keys,
and its output one more matmul. Memory is O(tiles per chunk), never
O(Lq * Lk). Where a chunk's key blocks advance by a fixed step per row
(windows), its keys are a strided view of the key tensor, not a copy; partial
tiles add a 0/-inf bias (a bool masked_fill is several times slower on CPU).
Scores are kept in base 2 (scale * log2(e)), as exp2 is the cheaper exp.
On CPU, a large call's (batch, key head) units run on a pool of torch's
thread count, each op on one thread. Sub-passes merge by log-sum-exp. The
backward recomputes the scores of the same tiles with the merged lse and
delta = rowsum(dO * O), as flash attention does.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from ... import dropout as drop
from ... import backends
from ...backends import AttentionCall, Backend, register_backend
from ...plan import from_layout, plan_by_id, plan_id, to_layout
from .engine import attention_ops, run_modified
from .merge import merge_partials
from .torch_mods import Mods as _Mods
from .varlen import Packed

BLOCK_Q = 64
BLOCK_K = 64
# Scores per chunk (rows * G * block_q * n * block_k, for one batch and key
# head): a chunk's elementwise passes then run in a core's cache.
CHUNK_ELEMENTS = 1 << 18
# Fewer scores than this a call (a few milliseconds) run on the calling thread.
PARALLEL_SCORES = 1 << 21
LOG2E = math.log2(math.e)
# Packed sequences (tfk.attention_varlen) take wider tiles: on 24 documents of
# 64-2048 tokens, causal, fwd+bwd took 2.8-3.0 s with 128 x 128 tiles and
# 3.1-4.0 s with 64 x 64 (interleaved runs on one thread, here).
PACKED_BLOCK = 128


def tiles_for(pattern):
    """(block_q, block_k) of this backend's plans for ``pattern``."""
    return (PACKED_BLOCK, PACKED_BLOCK) if isinstance(pattern, Packed) else (BLOCK_Q, BLOCK_K)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _padded(x, index, n):
    """x (B, H, L, D) in a sub-pass's layout with zero rows up to n, each row
    contiguous (a view when nothing moves)."""
    x = to_layout(x, index)
    if x.shape[2] != n:
        x = F.pad(x, (0, 0, 0, n - x.shape[2]))
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.contiguous()
    return x


class _Chunk:
    """Schedule rows of one schedule head ``sh`` that all visit n key blocks:
    query blocks ``qb`` (R,), with the bias and positions of their tiles."""

    def __init__(self, sp, sh, qb, n, bq, bk):
        self.sh, self.n, self.R, self.nbk, self.tiles = sh, n, qb.numel(), n * bk, qb.numel() * n
        q0 = int(qb[0])
        # a run of consecutive query blocks is a slice: a view, not a gather
        self.qb = slice(q0, q0 + self.R) if int(qb[-1]) - q0 == self.R - 1 else qb
        kb = sp.kv_blocks[sh, qb, :n].long()
        part = sp.kv_partial[sh, qb, :n].long()
        dev = kb.device
        # key blocks kb0 + step*r + j: the keys are a strided view
        self.step, self.kb0 = None, int(kb[0, 0])
        step = int(kb[1, 0]) - self.kb0 if self.R > 1 else 1
        if step >= 1 and torch.equal(kb, self.kb0 + step * torch.arange(self.R, device=dev).view(-1, 1)
                                     + torch.arange(n, device=dev)):
            self.step = step
        qpos = qb.view(-1, 1) * bq + torch.arange(bq, device=dev)                     # (R, bq) layout positions
        kpos = kb.unsqueeze(-1) * bk + torch.arange(bk, device=dev)                   # (R, n, bk)
        self.kpos = kpos.view(self.R, self.nbk)
        # positions that partial tiles forbid, or past the sequences' ends
        allowed = (qpos < sp.lq).view(self.R, 1, bq, 1) & (kpos < sp.lk).view(self.R, n, 1, bk)
        if sp.num_partial:
            allowed = torch.where((part >= 0).view(self.R, n, 1, 1), sp.partial_masks[part.clamp(min=0)] & allowed,
                                  allowed)
        blocked = ~allowed                                                            # (R, n, bq, bk)
        # per tile column that masks anything: (j, what it blocks (R or 1, bq, bk)), one tile when
        # every row's is the same (windows); full tiles inside the sequences cost nothing
        self.blocked = []
        for j in blocked.flatten(2).any(-1).any(0).nonzero().flatten().tolist():
            bj = blocked[:, j]
            self.blocked.append((j, bj[:1] if bool((bj == bj[:1]).all()) else bj))
        self.biases = {}
        # a query row with every key blocked has no softmax
        self.may_empty = bool(blocked.all(-1).all(1).any())
        # original positions, for attn_mask and dropout
        self.q_orig = qpos.clamp(max=sp.lq - 1)
        self.k_orig = self.kpos.clamp(max=sp.lk - 1)
        if sp.q_index is not None:
            self.q_orig = sp.q_index[self.q_orig]
        if sp.kv_index is not None:
            self.k_orig = sp.kv_index[self.k_orig]

    def bias(self, dtype):
        """[(tile column j, its 0/-inf bias (R or 1, 1, bq, bk) in dtype)]: adding
        is several times faster than a bool masked_fill on CPU."""
        if dtype not in self.biases:
            self.biases[dtype] = [(j, torch.zeros(b.shape, dtype=dtype, device=b.device).masked_fill_(b, -math.inf)
                                   .unsqueeze(1)) for j, b in self.blocked]
        return self.biases[dtype]


_CHUNKS = {}  # (id(sub-pass), G): (sub-pass, chunks, empty rows); a few recent plans


def _chunks(sp, G, bq, bk):
    """Chunks of each schedule head's rows, grouped by tile count, each within
    CHUNK_ELEMENTS scores; and the rows that visit nothing, as (schedule
    head, query blocks)."""
    key = (id(sp), G)
    if key in _CHUNKS and _CHUNKS[key][0] is sp:
        return _CHUNKS[key][1:]
    chunks, empty = [], []
    for sh in range(sp.kv_count.shape[0]):
        count = sp.kv_count[sh].long()
        for n in sorted(set(count.tolist())):
            qb = (count == n).nonzero().flatten()
            if n == 0:
                empty.append((sh, qb))
                continue
            rows = max(1, CHUNK_ELEMENTS // (G * bq * n * bk))
            for run in _strided_runs(sp.kv_blocks[sh, qb, :n], qb):
                chunks += [_Chunk(sp, sh, run[r:r + rows], n, bq, bk) for r in range(0, run.numel(), rows)]
    while len(_CHUNKS) >= 8:
        del _CHUNKS[next(iter(_CHUNKS))]
    _CHUNKS[key] = (sp, chunks, empty)
    return chunks, empty


def _strided_runs(kb, qb):
    """Rows ``qb`` split into runs whose key blocks ``kb`` (rows, n) a strided
    view reads (each row consecutive blocks, the first advancing by a fixed
    step), when every row's blocks are consecutive but the rows together are
    not strided (packed sequences: each row in its own sequence's blocks):
    chunks of such runs read and add their keys in place, where one gathered
    chunk would copy them and add them back by index. Else [qb]."""
    n = kb.shape[1]
    first = kb[:, :1]
    if qb.numel() < 2 or not bool((kb == first + torch.arange(n, device=kb.device)).all()):
        return [qb]
    step = first[1:, 0] - first[:-1, 0]
    if bool((step == step[0]).all()) and int(step[0]) >= 1:
        return [qb]
    # a run continues while the step repeats the run's first step
    cuts = [0]
    for r in range(1, qb.numel()):
        if r - cuts[-1] >= 2 and int(step[r - 1]) != int(step[cuts[-1]]) or int(step[r - 1]) < 1:
            cuts.append(r)
    return [qb[a:b] for a, b in zip(cuts, cuts[1:] + [qb.numel()])]


_POOL = {}  # (threads, process id): executor


def _run_units(units, scores, fn, device):
    """fn(*item) for every item of every unit. On CPU, a call that computes
    enough scores runs its units concurrently on torch's intra-op thread
    count, each op on one thread: one fork and join per call, where intra-op
    threads would pay one per op (more than these small ops gain, and much
    more on a busy machine). A unit's items run in order on one thread."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1 or len(units) == 1 or scores < PARALLEL_SCORES:
        for unit in units:
            for item in unit:
                fn(*item)
        return
    key = (n, os.getpid())  # a forked child has none of its parent's threads
    if key not in _POOL:
        for pool in _POOL.values():
            pool.shutdown(wait=False)
        _POOL.clear()
        _POOL[key] = ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,))
    inference = torch.is_inference_mode_enabled()  # grad modes are per thread

    def run(unit):
        with torch.inference_mode(inference), torch.no_grad():
            for item in unit:
                fn(*item)
    try:
        for f in [_POOL[key].submit(run, unit) for unit in units]:
            f.result()
    finally:
        torch.set_num_threads(n)  # a worker's setting is also the default for threads started later


class _Engine:
    """Everything one call needs, in the compute dtype and the plan's layouts.

    A chunk is computed per (batch b, query heads hq, key head hk): with a
    schedule shared by every head, hq are the G = H // Hkv query heads of key
    head hk, stacked along the rows of each matmul; with per-head schedules hq
    is the chunk's own head (G = 1)."""

    def __init__(self, q, k, v, plan, attn_mask, scale, dropout_p, seed, window=drop.WHOLE, mods=None):
        self.dtype = _compute_dtype(q.dtype)
        self.q, self.k, self.v = (t.to(self.dtype) for t in (q, k, v))
        self.plan, self.scale, self.dropout_p, self.seed = plan, scale, dropout_p, seed
        self.window = window
        self.mods = _Mods(mods, self.dtype, plan) if mods is not None and not mods.empty else None
        self.B, self.H, self.Lq, self.D = q.shape
        self.Hkv, self.Lk = k.shape[1], k.shape[2]
        self.Dv = v.shape[-1]
        self.bq, self.bk = plan.block_q, plan.block_k
        self.mask = None
        if attn_mask is not None:
            self.mask = attn_mask.expand(self.B, self.H, self.Lq, self.Lk)
        self.zero = torch.zeros(1, 1, 1, dtype=self.dtype, device=q.device)  # baddbmm's input, unused (beta=0)

    def setup(self, sp):
        """Per sub-pass: head groups, chunks, lengths padded to whole blocks."""
        self.sp = sp
        self.shared = sp.kv_count.shape[0] == 1
        self.G = self.H // self.Hkv if self.shared else 1
        self.nqb, self.nkb = sp.kv_count.shape[1], sp.q_count.shape[1]
        self.nqp, self.nkp = self.nqb * self.bq, self.nkb * self.bk
        self.chunks, self.empty = _chunks(sp, self.G, self.bq, self.bk)
        for c in self.chunks:
            c.bias(self.dtype)  # made here, not by the worker threads

    def units(self, pass_name):
        """The work (b, hq, hk, chunk) in units of one (batch, key head), whose
        key gradients add up in the same rows, and its number of scores.
        Counts the tiles it scores."""
        units = {}
        for c in self.chunks:
            if self.shared:
                heads = [(slice(x * self.G, (x + 1) * self.G), x) for x in range(self.Hkv)]
            else:
                heads = [(slice(c.sh, c.sh + 1), c.sh // (self.H // self.Hkv))]
            for b in range(self.B):
                for hq, hk in heads:
                    units.setdefault((b, hk), []).append((b, hq, hk, c))
        tiles = self.B * (self.H if self.shared else 1) * sum(c.tiles for c in self.chunks)
        backends.add_tiles(pass_name, tiles)
        return list(units.values()), tiles * self.bq * self.bk

    def query_side(self, x, index):
        """x (B, H, L, D) in the layout, padded, as blocks (B, H, nqb, bq, D)."""
        return _padded(x, index, self.nqp).view(self.B, self.H, self.nqb, self.bq, -1)

    def rows(self, t, b, hq, c):
        """Chunk c's query rows of t (B, H, nqb, bq, D): (R, G*bq, D), a view
        when they are contiguous."""
        if self.G == 1:
            return t[b, hq.start, c.qb]
        return t[b, hq, c.qb].transpose(0, 1).reshape(c.R, self.G * self.bq, -1)

    def put_rows(self, t, b, hq, c, val):
        """Write val (R, G*bq, D) at chunk c's rows of t (B, H, nqb, bq, D)."""
        if self.G == 1:
            t[b, hq.start, c.qb] = val
        else:
            t[b, hq, c.qb] = val.view(c.R, self.G, self.bq, -1).transpose(0, 1)

    def direct(self, t, b, hq, c):
        """The view of chunk c's rows of t to write a result in, or None."""
        return t[b, hq.start, c.qb] if self.G == 1 and isinstance(c.qb, slice) else None

    def keys(self, t, b, hk, c):
        """Chunk c's keys of t (B, Hkv, nkp, D) with contiguous rows: (R, n*bk, D)."""
        if c.step is None:
            return t[b, hk, c.kpos]
        return self._strided_keys(t[b, hk], c)

    def _strided_keys(self, t, c):
        """Chunk c's keys of t (nkp, D), rows contiguous, as a strided view (R, n*bk, D)."""
        D = t.shape[-1]
        return t.as_strided((c.R, c.nbk, D), (c.step * self.bk * D, D, 1), t.storage_offset() + c.kb0 * self.bk * D)

    def add_keys(self, t, b, hk, c, val):
        """Add val (R, n*bk, D) at chunk c's keys of t (B, Hkv, nkp, D)."""
        t = t[b, hk]
        if c.step is None:
            t.index_add_(0, c.kpos.flatten(), val.flatten(0, 1))
            return
        if c.R == 1 or c.step >= c.n:  # the rows' keys do not overlap: one add through the view
            self._strided_keys(t, c).add_(val)
            return
        blocks, val = t.view(self.nkb, self.bk, -1), val.view(c.R, c.n, self.bk, -1)
        for j in range(c.n):  # tile column j of every row: blocks kb0 + j + step*r
            blocks[c.kb0 + j:c.kb0 + j + c.step * (c.R - 1) + 1:c.step].add_(val[:, j])

    def scores(self, qc, kc, b, hq, c, qvc=None):
        """Masked base-2 scores (R, G*bq, n*bk) of chunk c at batch b, heads hq,
        from query rows qc and keys kc (and Transformer-XL's qvc); the dropout
        multiplier (or None); and, under a softcap, tanh of the raw scores
        over the cap (else None)."""
        mods, capped = self.mods, None
        if mods is None:
            s = torch.baddbmm(self.zero, qc, kc.transpose(1, 2), beta=0, alpha=self.scale * LOG2E)
        else:
            s = torch.bmm(qc, kc.transpose(1, 2))
            if mods.r is not None:
                s.add_(mods.relative_scores(qvc, hq, c, self))
            if mods.cap:
                capped = s.mul_(self.scale / mods.cap).tanh_()
                s = capped.mul(mods.cap * LOG2E)
            else:
                s.mul_(self.scale * LOG2E)
        s4 = s.view(c.R, self.G, self.bq, c.nbk)
        for j, bias in c.bias(s.dtype):
            s4[..., j * self.bk:(j + 1) * self.bk].add_(bias)
        if mods is not None and mods.bias2 is not None:
            s4.add_(mods.distance_bias(hq, c, self.sp))
        mult = None
        if self.mask is not None or self.dropout_p > 0:
            h = torch.arange(hq.start, hq.stop, device=s.device).view(1, -1, 1, 1)
            i, j = c.q_orig.view(c.R, 1, self.bq, 1), c.k_orig.view(c.R, 1, 1, c.nbk)
            if self.mask is not None:
                m = self.mask[b, h, i, j]
                if m.dtype == torch.bool:
                    s4.masked_fill_(~m, -math.inf)
                else:
                    s4.add_(m.to(s.dtype) * LOG2E)
            if self.dropout_p > 0:
                kept = drop.keep(self.seed, b, h, i, j, self.H, self.dropout_p, self.window)
                mult = (kept.to(s.dtype) / (1.0 - self.dropout_p)).view(s.shape)
        return s, mult, capped

    # -- forward --------------------------------------------------------------

    def forward(self):
        out = lse = None
        B, H, dev = self.B, self.H, self.q.device
        for sp in self.plan.subpasses:
            self.setup(sp)
            ql = self.query_side(self.q, sp.q_index)
            qvl = self.mods.query_side(self, sp) if self.mods is not None else None
            kl, vl = _padded(self.k, sp.kv_index, self.nkp), _padded(self.v, sp.kv_index, self.nkp)
            o_l = backends.new_output((B, H, self.nqb, self.bq, self.Dv), self.dtype, dev)
            lse_l = backends.new_output((B, H, self.nqb, self.bq, 1), self.dtype, dev)
            for sh, qb in self.empty:  # rows that visit no key block
                hq = slice(None) if self.shared else slice(sh, sh + 1)
                o_l[:, hq, qb] = 0
                lse_l[:, hq, qb] = -math.inf

            def item(b, hq, hk, c):
                qvc = None if qvl is None else self.rows(qvl, b, hq, c)
                s, mult, _ = self.scores(self.rows(ql, b, hq, c), self.keys(kl, b, hk, c), b, hq, c, qvc)
                m = s.amax(-1, keepdim=True)
                check = c.may_empty or self.mask is not None or self.mods is not None and self.mods.may_mask
                if check:  # a row that saw no key: exp2(-inf - 0) = 0 and lse = log 0
                    m.masked_fill_(torch.isneginf(m), 0)
                e = s.sub_(m).exp2_()
                l = e.sum(-1, keepdim=True)
                row_lse = m.add_(torch.log2(l)).mul_(math.log(2))
                if mult is not None:
                    e.mul_(mult)
                if check:
                    l.masked_fill_(l == 0, 1)
                o = self.direct(o_l, b, hq, c)
                if o is None:
                    self.put_rows(o_l, b, hq, c, torch.bmm(e, self.keys(vl, b, hk, c)).div_(l))
                else:
                    torch.bmm(e, self.keys(vl, b, hk, c), out=o).div_(l)
                self.put_rows(lse_l, b, hq, c, row_lse)
            _run_units(*self.units("forward"), item, dev)
            # queries outside this sub-pass's layout saw none of its keys
            o_sp = from_layout(o_l.view(B, H, self.nqp, self.Dv)[:, :, :sp.lq], sp.q_index, self.Lq, 0.0)
            lse_sp = from_layout(lse_l.view(B, H, self.nqp)[:, :, :sp.lq], sp.q_index, self.Lq, -math.inf)
            if out is None:
                out, lse = o_sp, lse_sp
            else:
                out, lse = merge_partials(out, lse, o_sp, lse_sp)
        if out is None:  # nothing allowed anywhere (or an empty sequence)
            out = torch.zeros(B, H, self.Lq, self.Dv, dtype=self.dtype, device=dev)
            lse = torch.full((B, H, self.Lq), -math.inf, dtype=self.dtype, device=dev)
        return out.contiguous(), lse.contiguous()  # not views of padded buffers

    # -- backward -------------------------------------------------------------

    def backward(self, out, lse, dout, dlse):
        dout = dout.to(self.dtype)
        # dlse enters as an extra term: d lse / d s = p (undropped).
        delta = (dout * out.to(self.dtype)).sum(-1, keepdim=True) - dlse.to(self.dtype).unsqueeze(-1)
        # base 2; rows that saw no key score -inf everywhere: exp2(s - 0) = 0
        lse2 = lse.to(self.dtype).unsqueeze(-1) * LOG2E
        lse2 = lse2.masked_fill(torch.isneginf(lse2), 0)
        # in the inputs' strides, as the op's fake implementation says
        dq, dk, dv = torch.zeros_like(self.q), torch.zeros_like(self.k), torch.zeros_like(self.v)
        B, dev = self.B, self.q.device
        if self.mods is not None:
            self.mods.start_backward(self)
        for sp in self.plan.subpasses:
            self.setup(sp)
            ql, dol = self.query_side(self.q, sp.q_index), self.query_side(dout, sp.q_index)
            lse_l, delta_l = self.query_side(lse2, sp.q_index), self.query_side(delta, sp.q_index)
            kl, vl = _padded(self.k, sp.kv_index, self.nkp), _padded(self.v, sp.kv_index, self.nkp)
            # gradients add up in place where the layout is the identity, else in padded buffers
            direct_q = sp.q_index is None and self.nqp == self.Lq and dq.is_contiguous()
            direct_k = sp.kv_index is None and self.nkp == self.Lk and dk.is_contiguous() and dv.is_contiguous()
            dq_l = dq.view(ql.shape) if direct_q else torch.zeros(ql.shape, dtype=self.dtype, device=dev)
            dk_l = dk if direct_k else torch.zeros(kl.shape, dtype=self.dtype, device=dev)
            dv_l = dv if direct_k else torch.zeros(vl.shape, dtype=self.dtype, device=dev)

            mods = self.mods
            qvl = mods.query_side(self, sp) if mods is not None else None

            def item(b, hq, hk, c):
                qc, doc = self.rows(ql, b, hq, c), self.rows(dol, b, hq, c)
                kc, vc = self.keys(kl, b, hk, c), self.keys(vl, b, hk, c)
                qvc = None if qvl is None else self.rows(qvl, b, hq, c)
                s, mult, capped = self.scores(qc, kc, b, hq, c, qvc)
                p = s.sub_(self.rows(lse_l, b, hq, c)).exp2_()
                if mult is None:
                    pd, dp = p, torch.baddbmm(self.rows(delta_l, b, hq, c), doc, vc.transpose(1, 2), beta=-1)
                else:
                    pd = p * mult
                    dp = torch.bmm(doc, vc.transpose(1, 2)).mul_(mult).sub_(self.rows(delta_l, b, hq, c))
                ds = dp.mul_(p)   # the gradient of the final (natural-log) scores
                if mods is not None:
                    ds = mods.backward(ds, capped, qvc, b, hq, c, self.sp, self)   # of the raw scores q.k (and XL's term)
                dqc = self.direct(dq_l, b, hq, c)
                if dqc is None:
                    self.put_rows(dq_l, b, hq, c, torch.baddbmm(self.rows(dq_l, b, hq, c), ds, kc, alpha=self.scale))
                else:
                    dqc.baddbmm_(ds, kc, alpha=self.scale)
                self.add_keys(dv_l, b, hk, c, torch.bmm(pd.transpose(1, 2), doc))
                self.add_keys(dk_l, b, hk, c, torch.bmm(ds.transpose(1, 2), qc))  # scaled once at the end
            _run_units(*self.units("backward"), item, dev)
            if not direct_q:
                dq_l = dq_l.view(B, self.H, self.nqp, self.D)[:, :, :sp.lq]
                if sp.q_index is None:
                    dq += dq_l
                else:
                    dq.index_add_(2, sp.q_index, dq_l)
            if not direct_k:
                dk_l, dv_l = dk_l[:, :, :sp.lk], dv_l[:, :, :sp.lk]
                if sp.kv_index is None:
                    dk += dk_l
                    dv += dv_l
                else:
                    dk.index_add_(2, sp.kv_index, dk_l)
                    dv.index_add_(2, sp.kv_index, dv_l)
        return dq, dk.mul_(self.scale), dv


def _forward(q, k, v, plan, mask, scale, dropout_p, seed, window=drop.WHOLE, mods=None):
    out, lse = _Engine(q, k, v, plan, mask, scale, dropout_p, seed, window, mods).forward()
    return out.to(q.dtype), lse


def _backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p, seed, window=drop.WHOLE, mods=None):
    """dq, dk, dv; with score modifiers (tfk.scores.Fused) also their
    gradients (d qv, d r, d bias), None where absent."""
    engine = _Engine(q, k, v, plan, mask, scale, dropout_p, seed, window, mods)
    dq, dk, dv = engine.backward(out, lse, dout, dlse)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
    if mods is None:
        return grads
    return grads + ((None, None, None) if engine.mods is None else engine.mods.grads(),)


# out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) (float64 for float64
# inputs, else float32); dq, dk, dv. A custom op like the kernel backends',
# so torch.compile(fullgraph=True) traces through this backend too.
torch_attention_fwd = attention_ops("torch_attention", _forward, _backward)


class TorchBackend(Backend):
    name = "torch"
    priority = 10
    score_mods = True

    def reasons(self, call):
        why = []
        if call.attn_mask is not None and call.attn_mask.requires_grad and torch.is_grad_enabled():
            why.append("no gradient with respect to attn_mask (detach it, or use backend='reference')")
        return why

    def run(self, call: AttentionCall):
        q, k, v = call.q, call.k, call.v
        ident = plan_id(call.pattern, q.shape[2], k.shape[2], *tiles_for(call.pattern), q.device)
        seed = drop.draw_seed() if call.dropout_p > 0 else 0
        if call.score_mod:
            return run_modified(call, plan_by_id(ident), _forward, _backward, seed)
        return torch_attention_fwd(q, k, v, call.attn_mask, ident, call.scale, call.dropout_p, seed)

    def block_functions(self, call):
        return tiles_for(call.pattern), _forward, _backward


register_backend(TorchBackend())
