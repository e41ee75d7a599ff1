"""Backends "cuda" and "cuda-sim" of the KV-cache family: the split-KV
("flash-decoding") CUDA kernels of csrc/kvcache/.

"cuda" runs them on a GPU through tfk._C (built for sm_80 and sm_90).
"cuda-sim" runs the same sources, compiled for the host (tfk._sim), on CPU
tensors through tfk's host-execution layer: for tests and debugging, never
chosen by "auto", and slow.

The kernel: one block per (batch, key head, split) over the G = H / Hkv query
heads x Lq queries of the key head (GQA packed, 16 rows a block: a key tile is
read once per group when G * Lq <= 16), the split's share of its sequence's
key range in whole 64-key tiles (the range from cache_seqlens on the device:
call.py's key_range), K and V rows read through block_table when paged, the
scores and P V on mma.sync, online softmax in fp32; a second kernel merges the
splits' partial (out, lse) by log-sum-exp.

Both take float16 and bfloat16, head dims up to 128 (kernels for 64 and 128;
q is zero-padded here, the caches are read as they are and zero-filled in the
kernel past D and Dv: a cache whose head dim is not a multiple of 8 is
copied, padded to one), Lq <= SPLIT_KV_MAX_LQ, any D != Dv, GQA, the band
patterns (causal, dense, sliding windows without dilation) and pages that are
a multiple of 16 rows. Other calls (longer query blocks, other patterns) run
on the attention engine's CUDA kernels (engine_path.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ... import backends
from ...backends import register_backend
from .call import KVCacheBackend, KVCacheCall, num_splits as split_count
from ..attention.cuda_backend import HEAD_DIMS, _ops, kernel_head_dim   # the same head dims and modules
from .engine_path import engine_forward
from .triton_backend import split_kv_takes

BLOCK_N = 64           # keys per tile: kBlockN in csrc/kvcache/kvcache.h
ROWS = 16              # query rows (G heads x Lq queries) per block: kRows
PAGE_MULTIPLE = 16
_DTYPES = (torch.float16, torch.bfloat16)


def _pad(x, width):
    """x contiguous with its last dim zero-padded to ``width`` and its data
    16-byte aligned (the kernel copies 16-byte chunks)."""
    if x.shape[-1] != width:
        x = F.pad(x, (0, width - x.shape[-1]))
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _cache(x):
    """A cache as the kernel reads it: head dim a multiple of 8 (else a padded copy)."""
    return _pad(x, -(-x.shape[-1] // 8) * 8)


def default_splits(q, k_cache, block_table, band):
    """call.num_splits for this call, from sizes only (cache_seqlens stay on
    the device): the most keys a sequence may read, the cache's capacity or
    the band's left side plus Lq."""
    B, H, Lq, _ = q.shape
    Hkv = k_cache.shape[1]
    capacity = k_cache.shape[2] * (block_table.shape[1] if block_table is not None else 1)
    max_keys = capacity if band[0] is None else min(capacity, band[0] + Lq)
    row_blocks = math.ceil(H // Hkv * Lq / ROWS)
    return split_count(B * Hkv * row_blocks, max_keys, BLOCK_N)


def decode_forward(q, k_cache, v_cache, cache_seqlens, block_table, band, scale, num_splits=None):
    """out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32 (natural log;
    -inf and out 0 for a row with no allowed key) of ``tfk.attention_with_kvcache``
    (tfk/ops/kvcache/call.py): q (B, H, Lq, D) fp16/bf16, Lq <= 16; k_cache,
    v_cache (B, Hkv, Lmax, D / Dv), or paged (num_blocks, Hkv, page, D / Dv)
    with block_table int32 (B, max_pages); cache_seqlens int32 (B,); band
    (left, right) with None for an unbounded side; num_splits None: call.py's
    num_splits. Adds the key tiles computed per (batch, key head) to the
    "forward" tile counters."""
    B, H, Lq, D = q.shape
    Dv = v_cache.shape[-1]
    hd = kernel_head_dim(max(D, Dv))
    if num_splits is None:
        num_splits = default_splits(q, k_cache, block_table, band)
    out = backends.new_output((B, H, Lq, Dv), q.dtype, q.device)
    lse = backends.new_output((B, H, Lq), torch.float32, q.device)
    if out.numel() == 0 or H == 0:  # no query (Lq 0, B 0): nothing to launch
        return out, lse
    tiles = torch.zeros(1, dtype=torch.int32, device=q.device) if backends.counting_tiles() else None
    bt = None if block_table is None else block_table.to(torch.int32).contiguous()
    _ops(q.device).kvcache_fwd_(_pad(q, hd), _cache(k_cache), _cache(v_cache),
                                cache_seqlens.to(torch.int32).contiguous(), bt, band[0], band[1], float(scale),
                                int(num_splits), out, lse, tiles=tiles)
    if tiles is not None:
        backends.add_tiles("forward", int(tiles.item()))
    return out, lse


class CudaBackend(KVCacheBackend):
    """The split-KV kernels on a GPU (tfk._C)."""
    name = "cuda"
    priority = 15  # below "triton" under "auto" until measured on a GPU, as the other families
    module = "_C"

    def reasons(self, call: KVCacheCall) -> list[str]:
        q, k, v = call.q, call.k_cache, call.v_cache
        why = backends.cuda_kernel_reasons(self.module, q)
        if q.dtype not in _DTYPES:
            why.append(f"dtype {q.dtype} (supports float16, bfloat16)")
        elif k.dtype != q.dtype or v.dtype != q.dtype:
            why.append(f"caches in {k.dtype} / {v.dtype} with q in {q.dtype} (one dtype)")
        if max(q.shape[-1], v.shape[-1]) > HEAD_DIMS[-1]:
            why.append(f"head dims {q.shape[-1]} / {v.shape[-1]} (supports up to {HEAD_DIMS[-1]})")
        if call.band is not None and any(s is not None and s < 0 for s in call.band):
            why.append(f"band {call.band} with a negative side")
        if call.paged and k.shape[2] % PAGE_MULTIPLE:
            why.append(f"page of {k.shape[2]} rows (must be a multiple of {PAGE_MULTIPLE})")
        return why

    def auto_for(self, call: KVCacheCall) -> bool:
        return call.q.is_cuda

    def run(self, call: KVCacheCall):
        if not split_kv_takes(call):     # Lq > SPLIT_KV_MAX_LQ, or not a band: the attention engine's kernels
            return engine_forward(call, self.name)
        return decode_forward(call.q, call.k_cache, call.v_cache, call.cache_seqlens, call.block_table, call.band,
                              call.scale)


class CudaSimBackend(CudaBackend):
    """The same kernels on CPU tensors through the host-execution layer (tfk._sim); never "auto"."""
    name = "cuda-sim"
    priority = 0
    module = "_sim"

    def auto_for(self, call: KVCacheCall) -> bool:
        return False


register_backend(CudaBackend())
register_backend(CudaSimBackend())
