"""LSH attention on the fused-attention engine: backends "triton", "cuda"
and "cuda-sim".

The sorted layout is a plan (tfk/plan.py) whose layouts differ per (batch,
head): hash round r is a sub-pass whose queries are round r's positions in
sorted order (``order[:, :, r]``) and whose keys are every round's, in the
concatenated sorted order (``order`` flattened, n·L slots). The schedule is
static, a band with wrap-around: the query block of chunk c visits the key
blocks of chunks c - before .. c + after (mod N = n·L / chunk), so a backend
visits exactly n · L/block_q · (1 + before + after) · chunk/block_k tiles per
(batch, head) in each pass (n·L/chunk · (1 + before + after) when the tiles
are the chunk). Causal order and the self logit are position predicates in
the kernels (``SubPass.predicates``), the key padding the engine's bool
mask (B, 1, 1, L): no tile masks. The engine merges the rounds by
log-sum-exp, and its backward runs each round with the merged lse, as for
any plan's sub-passes.

The keys are qk length-normalised (torch_backend.keys_of, in float32, then
in qk's dtype): the engine's dk goes back through the normalisation onto
dqk.
"""
from __future__ import annotations

import functools

import torch

from ... import backends
from ...backends import register_backend
from ...plan import Plan, SubPass
from ..attention import cuda_backend, triton_backend
from .api import OpBackend
from .functions import lsh_ops
from .torch_backend import keys_backward, keys_of


def tiles_for(chunk_size, full, default):
    """(block_q, block_k) of a call: the kernels' defaults, or the largest
    powers of two under them that divide the chunk (a tile never spans two
    chunks, whose windows differ). ``full``: the one-pass path, any tile."""
    if full:
        return default
    return tuple(min(d, chunk_size & -chunk_size) for d in default)


def _table(rows, cols, n_rows):
    """Schedule tables (count (1, n_rows), blocks (1, n_rows, width), partial
    -1) of the pairs (rows[i], cols[i]), in that order per row (a pair may
    repeat: a window can hold a chunk twice). Padding repeats a row's last
    entry, so loads stay in bounds."""
    count = torch.bincount(rows, minlength=n_rows)
    width = max(int(count.max()), 1)
    order = torch.argsort(rows, stable=True)
    rows, cols = rows[order], cols[order]
    first = torch.cumsum(count, 0) - count
    slot = torch.arange(rows.numel()) - first[rows]
    blocks = torch.zeros(n_rows, width, dtype=torch.int64)
    blocks[rows, slot] = cols
    last = blocks.gather(1, (count - 1).clamp(min=0)[:, None])
    blocks = torch.where(torch.arange(width)[None, :] < count[:, None], blocks, last)
    return (count.to(torch.int32)[None], blocks.to(torch.int32)[None],
            torch.full((1, n_rows, width), -1, dtype=torch.int32))


@functools.lru_cache(maxsize=64)
def _band(n, L, chunk, before, after, bq, bk, device):
    """Per round, the schedule tables (kv_count, kv_blocks, kv_partial, q_count,
    q_blocks, q_partial) of its query blocks over the concatenated keys."""
    N = n * L // chunk
    nqb, nkb = -(-L // bq), -(-n * L // bk)
    offsets = torch.arange(-before, after + 1)
    tiles = torch.arange(chunk // bk)
    rounds = []
    for r in range(n):
        j = torch.arange(nqb)
        if N == 1:          # the one-pass path: every key tile
            q_rows, k_cols = j.repeat_interleave(nkb), torch.arange(nkb).repeat(nqb)
        else:
            c = (r * L + j * bq) // chunk                                      # each query block's chunk
            key_chunks = (c[:, None] + offsets[None, :]) % N                   # (nqb, W)
            k_cols = (key_chunks[..., None] * (chunk // bk) + tiles).reshape(-1)
            q_rows = j.repeat_interleave(offsets.numel() * tiles.numel())
        kv = _table(q_rows, k_cols, nqb)
        qs = _table(k_cols, q_rows, nkb)
        rounds.append(tuple(t.to(device) for t in kv + qs))
    return tuple(rounds)


def lsh_plan(order, chunk_size, before, after, causal, block_q, block_k):
    """The plan of an LSH call: ``order`` (B, H, n, L), the positions sorted
    per round; tiles (block_q, block_k) that divide chunk_size."""
    B, H, n, L = order.shape
    kv_index = order.reshape(B, H, n * L)       # one object: the engine gathers k, v once
    empty = torch.zeros(0, block_q, block_k, dtype=torch.bool, device=order.device)
    subpasses = tuple(
        SubPass(q_index=order[:, :, r], kv_index=kv_index, kv_count=t[0], kv_blocks=t[1], kv_partial=t[2],
                q_count=t[3], q_blocks=t[4], q_partial=t[5], partial_masks=empty, lq=L, lk=n * L,
                predicates=2 if causal else 1, round=r, rounds=n)
        for r, t in enumerate(_band(n, L, chunk_size, before, after, block_q, block_k, order.device)))
    return Plan(subpasses=subpasses, lq=L, lk=L, block_q=block_q, block_k=block_k, heads=1)


def one_pass_plan(L, causal, block_q, block_k, device):
    """The one-pass path's plan (L <= chunk_size): every key, natural order."""
    t = _band(1, L, L, 0, 0, block_q, block_k, device)[0]
    empty = torch.zeros(0, block_q, block_k, dtype=torch.bool, device=device)
    sp = SubPass(q_index=None, kv_index=None, kv_count=t[0], kv_blocks=t[1], kv_partial=t[2], q_count=t[3],
                 q_blocks=t[4], q_partial=t[5], partial_masks=empty, lq=L, lk=L,
                 predicates=2 if causal else 1)
    return Plan(subpasses=(sp,), lq=L, lk=L, block_q=block_q, block_k=block_k, heads=1)


def engine_ops(tiles, attention_forward, attention_backward):
    """forward / backward in lsh_ops' contract (functions.py) over an engine
    backend's ``attention_forward(q, k, v, plan, mask, scale, dropout_p,
    seed)`` and ``attention_backward(dout, dlse, q, k, v, out, lse, plan,
    mask, scale, dropout_p, seed)``; ``tiles(head_dim, dtype)`` its default
    (block_q, block_k)."""

    def setup(qk, value, order, key_padding_mask, chunk_size, before, after, causal):
        B, H, L, D = qk.shape
        full = order.shape[2] * L <= chunk_size     # the one-pass path: a single chunk
        bq, bk = tiles_for(chunk_size, full, tiles(max(D, value.shape[-1]), qk.dtype))
        plan = (one_pass_plan(L, causal, bq, bk, qk.device) if full
                else lsh_plan(order, chunk_size, before, after, causal, bq, bk))
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        k = keys_of(qk.float()).to(qk.dtype)
        return plan, mask, k

    def forward(qk, value, order, key_padding_mask, chunk_size, before, after, causal, scale, dropout_p,
                dropout_seed):
        qk, value = qk.contiguous(), value.contiguous()
        plan, mask, k = setup(qk, value, order, key_padding_mask, chunk_size, before, after, causal)
        out, lse = attention_forward(qk, k, value, plan, mask, scale, dropout_p, dropout_seed)
        B, H = qk.shape[:2]
        return out, lse, lse.new_empty(B, H, 0)     # no per-slot lse: the backward takes the merged one

    def backward(dout, dlse, qk, value, order, key_padding_mask, out, lse, lse_slots, chunk_size, before, after,
                 causal, scale, dropout_p, dropout_seed):
        qk, value = qk.contiguous(), value.contiguous()
        plan, mask, k = setup(qk, value, order, key_padding_mask, chunk_size, before, after, causal)
        if dlse is None:
            dlse = torch.zeros_like(lse)
        dq, dk, dv = attention_backward(dout.contiguous(), dlse, qk, k, value, out, lse, plan, mask, scale,
                                        dropout_p, dropout_seed)
        dqk = dq.float() + keys_backward(qk.float(), dk.float())
        return dqk.to(qk.dtype), dv

    return forward, backward


class EngineBackend(OpBackend):
    """An LSH backend on an engine backend's kernels: ``device_reasons(qk)``
    (device, dtype), the largest head dim, and the smallest tile (chunks
    are cut into tiles that divide them)."""
    max_head_dim = 256
    min_tile = 16

    def reasons(self, call):
        why = self.device_reasons(call.qk)
        D, Dv = call.qk.shape[-1], call.value.shape[-1]
        for name, d in (("head dim", D), ("value head dim", Dv)):
            if d > self.max_head_dim:
                why.append(f"{name} {d} > {self.max_head_dim}")
        if call.buckets is not None and call.chunk_size % self.min_tile:
            why.append(f"chunk_size {call.chunk_size} is not a multiple of {self.min_tile} (the kernels' tiles)")
        return why

    def auto_for(self, call):
        return call.qk.is_cuda


def _triton_tiles(head_dim, dtype):
    return triton_backend._kernels().tile_config(head_dim, dtype, predicates=1)


def _triton_forward(*args):
    return triton_backend._kernels().attention_forward(*args)


def _triton_backward(*args):
    return triton_backend._kernels().attention_backward(*args)


class TritonBackend(EngineBackend):
    """The Triton flash-attention kernels (triton_kernels/attention.py) over
    the LSH plan. CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""
    name = "triton"
    priority = 20
    device_reasons = staticmethod(triton_backend.device_reasons)
    _op = staticmethod(lsh_ops("triton", *engine_ops(_triton_tiles, _triton_forward, _triton_backward),
                               slot_lse=False))


def _cuda_device_reasons(qk, module):
    why = backends.cuda_kernel_reasons(module, qk)
    if qk.dtype not in (torch.float16, torch.bfloat16):
        why.append(f"dtype {qk.dtype} (supports float16, bfloat16)")
    return why


class CudaBackend(EngineBackend):
    """The CUDA flash-attention kernels (csrc/attention/, tfk._C) over the LSH
    plan: 64 x 64 tiles, so chunk sizes that are multiples of 64."""
    name = "cuda"
    priority = 15       # below "triton" under "auto", as for attention
    module = "_C"
    max_head_dim = cuda_backend.HEAD_DIMS[-1]
    min_tile = cuda_backend.BLOCK
    _op = staticmethod(lsh_ops("cuda", *engine_ops(lambda head_dim, dtype: (cuda_backend.BLOCK, cuda_backend.BLOCK),
                                                   cuda_backend.attention_forward, cuda_backend.attention_backward),
                               slot_lse=False))

    def device_reasons(self, qk):
        return _cuda_device_reasons(qk, self.module)


class CudaSimBackend(CudaBackend):
    """The same kernels on CPU tensors through the host-execution layer
    (tfk._sim): for tests, never chosen by "auto"."""
    name = "cuda-sim"
    priority = 0
    module = "_sim"

    def auto_for(self, call):
        return False


register_backend(TritonBackend())
register_backend(CudaBackend())
register_backend(CudaSimBackend())
