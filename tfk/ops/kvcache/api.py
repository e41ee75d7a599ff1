"""tfk.attention_with_kvcache: validation, the in-place append, backend
selection (family "kvcache"), and the "reference" and "torch" backends."""
from __future__ import annotations

import math
import numbers

import torch

from ...backends import register_backend, select_backend
from ...patterns import Causal, Pattern
from .call import KVCacheBackend, KVCacheCall, band_of
from .reference import kvcache_reference
from .torch_backend import TorchBackend, acc_dtype

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ReferenceBackend(KVCacheBackend):
    """The float64 oracle (reference.py) as a backend. Never chosen by "auto"."""
    name = "reference"
    priority = 0

    def auto_for(self, call):
        return False

    def run(self, call):
        d = torch.float64
        out, lse = kvcache_reference(call.q.to(d), call.k_cache, call.v_cache, call.cache_seqlens, call.pattern,
                                     call.scale, call.block_table)
        return out.to(call.q.dtype), lse.to(acc_dtype(call.q.dtype))


register_backend(ReferenceBackend())
register_backend(TorchBackend())


# --------------------------------------------------------------- validation

def _check_4d(name, t, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {dims}, got {t.dim()}-D of shape {tuple(t.shape)}")


def _check_like(name, t, query):
    if t.dtype != query.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected query's dtype {query.dtype}")
    if t.device != query.device:
        raise ValueError(f"{name} is on {t.device}, expected query's device {query.device}")


def _check_int_tensor(name, t, shape, device, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor {what}, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 {what}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected query's device {device}")


def _check_tensors(query, k_cache, v_cache, key, value, block_table):
    """Ranks, dtypes, devices and sizes; returns (paged, capacity per sequence)."""
    paged = block_table is not None
    cache_dims = "(num_blocks, Hkv, page, {})" if paged else "(B, Hkv, Lmax, {})"
    _check_4d("query", query, "(B, H, Lq, D)")
    _check_4d("k_cache", k_cache, cache_dims.format("D"))
    _check_4d("v_cache", v_cache, cache_dims.format("Dv"))
    if query.dtype not in _DTYPES:
        raise TypeError(f"query must be float16, bfloat16, float32 or float64, got {query.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_like(name, t, query)
    B, H, Lq, D = query.shape
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache's first three dims {tuple(v_cache.shape[:3])} differ from k_cache's "
                         f"{tuple(k_cache.shape[:3])}")
    Hkv = k_cache.shape[1]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache's head dim {k_cache.shape[3]} differs from query's D = {D}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads H = {H} must be a multiple of the caches' key/value heads Hkv = {Hkv}")
    if D == 0 or v_cache.shape[3] == 0:
        raise ValueError(f"head dims must be >= 1, got D = {D}, Dv = {v_cache.shape[3]}")
    if (key is None) != (value is None):
        raise ValueError("pass key and value together (the new entries to append), or neither")
    if key is not None:
        for name, t, d, dim in (("key", key, D, "D"), ("value", value, v_cache.shape[3], "Dv")):
            _check_4d(name, t, f"(B, Hkv, Lq, {dim})")
            _check_like(name, t, query)
            if tuple(t.shape) != (B, Hkv, Lq, d):
                raise ValueError(f"{name} must be (B, Hkv, Lq, {dim}) = {(B, Hkv, Lq, d)}, got shape "
                                 f"{tuple(t.shape)}")
    if not paged:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]}, expected query's B = {B} "
                             "(pass block_table for a paged cache)")
        return False, k_cache.shape[2]
    num_blocks, _, page, _ = k_cache.shape
    if page == 0 or page % 16:
        raise ValueError(f"the paged caches' page size (dim 2) must be a positive multiple of 16, got {page}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise ValueError("block_table must be an int32 tensor (B, max_pages), got "
                         + (f"shape {tuple(block_table.shape)}" if isinstance(block_table, torch.Tensor)
                            else type(block_table).__name__))
    _check_int_tensor("block_table", block_table, (B, block_table.shape[1]), query.device, "(B, max_pages)")
    return True, block_table.shape[1] * page


def _check_values(cache_seqlens, Lq, capacity, block_table, num_blocks, page):
    """The checks that read device values, in one host sync: cache_seqlens
    >= 0 and + Lq within the capacity, and the block-table entries the call
    reads or writes in [0, num_blocks). Returns int(cache_seqlens.max())."""
    stats = [cache_seqlens.min(), cache_seqlens.max()]
    if block_table is not None:
        # only the pages a sequence reaches: unused entries may hold anything (vLLM pads with -1)
        pages = (cache_seqlens.long() + Lq + page - 1) // page
        used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages[:, None]
        entries = torch.where(used, block_table.long(), 0)
        stats += [entries.min(), entries.max()]
    lo, hi, *pages_range = torch.stack([x.long() for x in stats]).tolist()
    if lo < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got a minimum of {lo}")
    if hi + Lq > capacity:
        where = "max_pages * page" if block_table is not None else "Lmax (k_cache's dim 2)"
        raise ValueError(f"cache_seqlens + Lq must be <= {where} = {capacity}: the longest sequence needs "
                         f"{hi} + {Lq} = {hi + Lq} positions")
    if pages_range and (pages_range[0] < 0 or pages_range[1] >= num_blocks):
        raise ValueError(f"block_table entries must be in [0, num_blocks = {num_blocks}) for the pages the call "
                         f"reads or writes, got values in [{pages_range[0]}, {pages_range[1]}]")
    return hi


def _append(call: KVCacheCall, key, value):
    """Write key/value (B, Hkv, Lq, D / Dv) at positions cache_seqlens[b] + t,
    in place, one index_put per cache (through the block table when paged)."""
    B, _, Lq, _ = call.q.shape
    pos = call.cache_seqlens.long()[:, None] + torch.arange(Lq, device=call.q.device)[None, :]   # (B, Lq)
    if call.paged:
        page = call.k_cache.shape[2]
        where = (call.block_table.long().gather(1, pos // page), pos % page)
    else:
        where = (torch.arange(B, device=call.q.device)[:, None].expand(B, Lq), pos)
    # (B or num_blocks, Lmax or page, Hkv, D) views of the caches: the index picks (block, row)
    call.k_cache.transpose(1, 2)[where] = key.transpose(1, 2)
    call.v_cache.transpose(1, 2)[where] = value.transpose(1, 2)


# ------------------------------------------------------------------- public

def attention_with_kvcache(query, k_cache, v_cache, cache_seqlens, *, key=None, value=None, pattern=None,
                           block_table=None, scale=None, backend="auto", return_lse=False):
    """Attention of new queries over a KV cache (decoding), forward only.

    query (B, H, Lq, D). Caches as Hugging Face's: k_cache (B, Hkv, Lmax, D),
    v_cache (B, Hkv, Lmax, Dv); or paged: k_cache (num_blocks, Hkv, page, D),
    v_cache (num_blocks, Hkv, page, Dv) with ``block_table`` int32
    (B, max_pages), page a multiple of 16: position j of sequence b is row
    j % page of block block_table[b, j // page]. ``cache_seqlens`` int32 (B,)
    on query's device: s_b, the keys already cached for sequence b. H must be
    a multiple of Hkv (grouped-query attention).

    key (B, Hkv, Lq, D) / value (B, Hkv, Lq, Dv), when given, are written into
    the caches in place at positions s_b .. s_b + Lq - 1 before attending.
    ``cache_seqlens`` is not changed: the caller advances it (by Lq).

    Query t of sequence b sits at absolute position s_b + t and reads cache
    positions j < n = s_b + Lq. pattern None: causal, j <= s_b + t. A
    ``tfk.patterns`` pattern applies at absolute positions: query t may read
    key j when pattern.mask(h, s_b + t, j, n, n) (``sliding_window(w)``
    reads the last w + 1 keys; ``DENSE`` all n). Lq may be 0.

    Returns out (B, H, Lq, Dv) in query's dtype, or (out, lse) when
    ``return_lse``, lse (B, H, Lq) float32 (float64 for float64 inputs),
    natural log; a query with no allowed key gets lse -inf and out 0.
    scale: default 1 / sqrt(D). backend: "auto" (the "triton" split-KV kernel
    for CUDA tensors, "torch" otherwise), "torch", "triton", "reference"
    (float64, never auto).

    Forward only: the call runs under ``torch.no_grad()``, so out and lse
    carry no autograd graph even when the inputs require grad.
    Validation reads cache_seqlens (and the block-table entries in use) on the
    host once per call: one device sync. A call that raises writes nothing.
    """
    with torch.no_grad():
        return _attention_with_kvcache(query, k_cache, v_cache, cache_seqlens, key, value, pattern, block_table,
                                       scale, backend, return_lse)


def _attention_with_kvcache(query, k_cache, v_cache, cache_seqlens, key, value, pattern, block_table, scale,
                            backend, return_lse):
    _, capacity = _check_tensors(query, k_cache, v_cache, key, value, block_table)
    B, H, Lq, D = query.shape
    _check_int_tensor("cache_seqlens", cache_seqlens, (B,), query.device, "(B,)")
    if pattern is None:
        pattern = Causal()
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a tfk.patterns Pattern or None (causal), got {type(pattern).__name__}")
    if pattern.heads not in (None, 1, H):
        raise ValueError(f"pattern has {pattern.heads} heads but query has H = {H}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    max_seqlen = 0
    if B:
        max_seqlen = _check_values(cache_seqlens, Lq, capacity, block_table, k_cache.shape[0], k_cache.shape[2])
    call = KVCacheCall(query, k_cache, v_cache, cache_seqlens, block_table, pattern, band_of(pattern),
                       float(scale), return_lse, max_seqlen)
    chosen = select_backend(backend, call, "kvcache")
    if key is not None and B and Lq:
        _append(call, key, value)
    if B == 0 or Lq == 0:
        out = query.new_zeros(B, H, Lq, v_cache.shape[-1])
        lse = query.new_zeros(B, H, Lq, dtype=acc_dtype(query.dtype))
    else:
        out, lse = chosen.run(call)
    return (out, lse) if return_lse else out
