"""The report's KV-cache section: tfk.attention_with_kvcache (forward only:
decoding) at small, odd sizes (GQA, several sequences at different cache
lengths, an empty cache, a sliding window, a paged cache, a query block over
the split-KV limit, a non-band pattern) against the float64 reference
(tfk/ops/kvcache/reference.py: per sequence, dense masked attention over
its keys), with its time. Run by ``python -m bench.report``; formatted as
the MoE rows (bench/report_moe.py), with no gradients. The ops the CUDA
split-KV kernels take (Lq <= 16, band patterns, head dims up to 128) also
run on cuda-sim (fp16, bf16)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import tfk
from tfk import patterns as P
from tfk.ops.kvcache import SPLIT_KV_MAX_LQ, band_of, kvcache_reference

from . import report_moe


@dataclass(frozen=True)
class KVCacheOp:
    name: str
    seqlens: tuple
    H: int
    Hkv: int
    Lq: int
    D: int
    Dv: int
    Lmax: int
    pattern: object = None
    page: int = 0      # > 0: a paged cache with pages of this size, in shuffled blocks

    def describe(self):
        layout = f"paged, page {self.page}" if self.page else f"Lmax={self.Lmax}"
        return (f"attention_with_kvcache(cache_seqlens={list(self.seqlens)}, H={self.H}, Hkv={self.Hkv}, "
                f"Lq={self.Lq}, D={self.D}, Dv={self.Dv}, {layout}, {self.pattern or P.causal()!r})")


OPS = [
    KVCacheOp("kv_decode_gqa", (0, 300, 1023), 8, 2, 1, 64, 64, 1024),
    KVCacheOp("kv_window_paged", (700, 45), 4, 1, 3, 80, 80, 768, P.sliding_window(100), page=32),
    KVCacheOp("kv_block_over_split", (250, 7), 4, 2, 37, 64, 40, 320, P.sliding_window(64, 3)),
    KVCacheOp("kv_global_window", (500, 90), 4, 2, 2, 48, 48, 512, P.sliding_window(32) | P.global_tokens(4)),
]


def cuda_kernels_take(op):
    return op.Lq <= SPLIT_KV_MAX_LQ and band_of(op.pattern or P.causal()) is not None and max(op.D, op.Dv) <= 128


def _inputs(op, device, dtype):
    """query, k_cache, v_cache, cache_seqlens and the block_table (or None), in ``dtype``."""
    g = torch.Generator().manual_seed(sum(map(ord, op.name)))
    B = len(op.seqlens)
    q = torch.randn(B, op.H, op.Lq, op.D, generator=g, dtype=torch.float64)
    kc = torch.randn(B, op.Hkv, op.Lmax, op.D, generator=g, dtype=torch.float64)
    vc = torch.randn(B, op.Hkv, op.Lmax, op.Dv, generator=g, dtype=torch.float64)
    seqlens = torch.tensor(op.seqlens, dtype=torch.int32)
    table = None
    if op.page:   # the same values in shuffled blocks: block table[b, p] holds positions p*page.. of sequence b
        pages = op.Lmax // op.page
        table = torch.randperm(B * pages, generator=g).view(B, pages).to(torch.int32)

        def paged(c):
            blocks = c.view(B, c.shape[1], pages, op.page, -1).transpose(1, 2).reshape(B * pages, c.shape[1], op.page, -1)
            out = torch.empty_like(blocks)
            out[table.flatten().long()] = blocks
            return out
        kc, vc = paged(kc), paged(vc)
    return [x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in (q, kc, vc, seqlens)] + [
        None if table is None else table.to(device)]


def check_op(op, device, dtype, *, backend="auto", repeat=3, time_it=True, timer=None):
    q, kc, vc, seqlens, table = _inputs(op, device, dtype)
    kw = dict(pattern=op.pattern, block_table=table)
    with tfk.backends.record_choices() as names:
        out = tfk.attention_with_kvcache(q, kc, vc, seqlens, backend=backend, **kw)
    ref, _ = kvcache_reference(q.double(), kc, vc, seqlens, op.pattern or P.causal(), op.D ** -0.5, table)
    err = report_moe._rel_err(out, ref)
    if dtype == torch.float32:
        tol = report_moe.TOL_FP32
    else:   # twice the reference's own error in the dtype, plus a floor
        low, _ = kvcache_reference(q.float(), kc.float(), vc.float(), seqlens, op.pattern or P.causal(),
                                   op.D ** -0.5, table)
        tol = 2 * report_moe._rel_err(low.to(dtype), ref) + report_moe.FLOOR[dtype]
    row = {"op": op.name, "what": op.describe(), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "backend": names[-1] if names else "?", "err_out": err, "err_grads": None, "tol": tol,
           "ok": err <= tol, "fwd_ms": None, "fwdbwd_ms": None}
    if time_it:
        row["fwd_ms"] = timer(lambda: tfk.attention_with_kvcache(q, kc, vc, seqlens, backend=backend, **kw),
                              repeat, device)
    return row


def check_all(ops, device, dtypes, **kw):
    return report_moe.check_all(ops, device, dtypes, check=check_op, **kw)
