"""KV-cache calls the split-KV kernels do not take (Lq > SPLIT_KV_MAX_LQ, or a
pattern that is not one band) run on the attention engine's kernels: each
sequence's queries and the cache positions they may read, packed as a
varlen call (tfk/ops/attention/varlen.py) whose pattern places the queries at
the end of their keys (``AtEnd``), so every sequence has its own plan and
reads only its own tiles."""
from __future__ import annotations

import torch

from ...backends import AttentionCall, select_backend
from ..attention.varlen import AtEnd, Packed, packed_input
from .call import KVCacheCall, key_range
from .torch_backend import read_keys


def engine_forward(call: KVCacheCall, backend: str):
    """(out (B, H, Lq, Dv), lse (B, H, Lq) float32) of ``call`` on the attention
    backend ``backend``. A band reads only the positions it can reach (a
    band depends on i - j alone, so the cut keys keep their meaning); other
    patterns read every position before the queries' end. Copies the keys
    read (one packed tensor), and reads cache_seqlens on the host."""
    B, H, Lq, D = call.q.shape
    keys, values, lens_k = [], [], []
    for b, s in enumerate(call.cache_seqlens.tolist()):
        lo, hi = key_range(s, Lq, call.band) if call.band is not None else (0, s + Lq)
        k, v = (read_keys(cache, b, lo, hi, call.block_table) for cache in (call.k_cache, call.v_cache))
        keys.append(k)
        values.append(v)
        lens_k.append(hi - lo)
    k, v = (torch.cat(x, 1).transpose(0, 1) for x in (keys, values))          # (total_k, Hkv, D)
    q = call.q.transpose(1, 2).reshape(B * Lq, H, D)
    pattern = Packed(AtEnd(call.pattern), [Lq] * B, lens_k)
    acall = AttentionCall(packed_input(q), packed_input(k), packed_input(v), pattern, None, call.scale, 0.0, True)
    out, lse = select_backend(backend, acall).run(acall)
    Dv = out.shape[-1]
    out = out[0, :, :B * Lq].reshape(H, B, Lq, Dv).transpose(0, 1)
    return out, lse[0, :, :B * Lq].reshape(H, B, Lq).transpose(0, 1)
