"""Backends "cuda" and "cuda-sim" of the linear-attention family: the CUDA C++
kernels of csrc/linear/ (through cuda_kernels.py's launchers) as the core of
torch_backend.py's op.

"cuda" runs them on a GPU through tfk._C; "cuda-sim" runs the same sources,
compiled for the host (tfk._sim), on CPU tensors through the host-execution
layer: for tests and debugging, never chosen by "auto", and slow.

The kernels take mapped features, so the feature maps (all four, and
callables), the key padding mask, V' = [v, 1], S'_0, the normalisation and dO'
are torch_backend.py's, in float32; the core O' = phi_q S (chunked causal or
non-causal) and its backward run in the kernels. Features go in in the
inputs' dtype (fp16/bf16 on tensor cores, fp32 by FMA); the state and O' are
float32. One launch takes the whole call (no slicing by KV heads).
"""
from __future__ import annotations

import torch

from ...backends import cuda_kernel_reasons, register_backend
from . import cuda_kernels as ck
from . import torch_backend
from .api import LinearBackend
from .functions import linear_ops

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CudaCore:
    """torch_backend.TorchCore's interface on the CUDA kernels: Q (B, Hkv, G, L, D)
    folds into the kernels' (B, H, L, D), query head h reading KV head h // G."""
    slice_elements = None

    def forward(self, Q, K, V, S0, causal, dtype):
        B, Hkv, G, L, D = Q.shape
        o1, state = ck.forward(Q.reshape(B, Hkv * G, L, D).to(dtype), K.to(dtype), V.to(dtype), causal=causal,
                               state0=S0)
        return o1.view(B, Hkv, G, L, -1), state

    def backward(self, dO, Q, K, V, S0, dS, causal):
        B, Hkv, G, L, D = Q.shape
        dq, dk, dv1, ds0 = ck.backward(Q.reshape(B, Hkv * G, L, D), K, V, dO.reshape(B, Hkv * G, L, -1),
                                       causal=causal, state0=S0, dstate=dS)
        return dq.view(Q.shape), dk, dv1, ds0


_CORE = CudaCore()


def _forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale):
    return torch_backend.linear_forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps,
                                        scale, core=_CORE)


def _backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den, feature_map, causal, normalize, eps,
              scale):
    return torch_backend.linear_backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den, feature_map,
                                         causal, normalize, eps, scale, core=_CORE)


class CudaBackend(LinearBackend):
    """csrc/linear/ through tfk._C, on a GPU."""
    name = "cuda"
    priority = 15  # below "triton" under "auto" until measured on a GPU, as the other families
    module = "_C"

    def __init__(self):
        # Made here, not on first use, so a first call under torch.compile finds the ops.
        self._op = linear_ops(self.name.replace("-", "_"), _forward, _backward)

    def reasons(self, call):
        q = call.query
        why = cuda_kernel_reasons(self.module, q)
        if q.dtype not in _DTYPES:
            why.append(f"dtype {q.dtype} (supports float16, bfloat16, float32)")
        D, Dv = q.shape[3], call.value.shape[3]
        if max(D, Dv) > ck.MAX_DIM - 1:
            why.append(f"head dims D = {D}, Dv = {Dv} (the kernels take at most {ck.MAX_DIM - 1})")
        return why

    def auto_for(self, call):
        return call.query.is_cuda

    def run(self, call):
        kv0, z0 = call.initial_state if call.initial_state is not None else (None, None)
        out, kv, z, _ = self._op(call.query, call.key, call.value, call.key_padding_mask, kv0, z0, call.feature_map,
                                 call.causal, call.normalize, call.eps, call.scale)
        return out, kv, z


class CudaSimBackend(CudaBackend):
    """The same kernels on CPU tensors through the host-execution layer (tfk._sim); never "auto"."""
    name = "cuda-sim"
    priority = 0
    module = "_sim"

    def auto_for(self, call):
        return False


register_backend(CudaBackend())
register_backend(CudaSimBackend())
