"""Backend "triton" of the "kvcache" family: the split-KV kernel of
triton_kernels/kvcache.py, for decoding (Lq <= SPLIT_KV_MAX_LQ) under a band
pattern (causal, dense, sliding windows without dilation); longer query
blocks and other patterns run on the attention engine's Triton kernels
(engine_path.py), each sequence with its own plan.

Runs on CUDA tensors (the default there), and on CPU tensors when
TRITON_INTERPRET=1 was set before tfk was imported (the tests). Forward only.
"""
from __future__ import annotations

from ...backends import register_backend
from ..attention.triton_backend import device_reasons
from .call import SPLIT_KV_MAX_LQ, KVCacheBackend, KVCacheCall
from .engine_path import engine_forward

_KERNELS = None


def _kernels():
    """tfk.triton_kernels.kvcache, imported on first use (it imports triton)."""
    global _KERNELS
    if _KERNELS is None:
        from ...triton_kernels import kvcache
        _KERNELS = kvcache
    return _KERNELS


class TritonBackend(KVCacheBackend):
    name = "triton"
    priority = 20

    def reasons(self, call: KVCacheCall):
        why = device_reasons(call.q)
        D, Dv = call.q.shape[-1], call.v_cache.shape[-1]
        if max(D, Dv) > 256:
            why.append(f"head dims D = {D}, Dv = {Dv}: the kernels take at most 256")
        return why

    def auto_for(self, call):
        return call.q.is_cuda

    def run(self, call):
        if split_kv_takes(call):
            return _kernels().kvcache_forward(call)
        return engine_forward(call, "triton")


def split_kv_takes(call: KVCacheCall) -> bool:
    """Whether the split-KV kernels run ``call`` (decoding: Lq <= SPLIT_KV_MAX_LQ
    under a band pattern); other calls run on the attention engine's kernels
    (engine_path.py)."""
    return call.q.shape[2] <= SPLIT_KV_MAX_LQ and call.band is not None


register_backend(TritonBackend())
