"""Backends "cuda" and "cuda-sim" of the linear-attention family: the CUDA C++
kernels of csrc/linear/ (through cuda_kernels.py's launchers) as the core of
torch_backend.py's op.

"cuda" runs them on a GPU through tfk._C; "cuda-sim" runs the same sources,
compiled for the host (tfk._sim), on CPU tensors through the host-execution
layer: for tests and debugging, never chosen by "auto", and slow.

Forward, every named feature map: the kernels on q, k, v as they are (the
map, the key padding and V's column of ones applied as the tiles load; the
softmax map, non-causal only, first runs the key-statistics kernel, then the
forward maps key tiles by them and each query row by its own softmax), then
the scale and the normalisation in one pass over O' = [num, den]. The
backward of every map (and a callable map's forward) runs torch_backend.py's
host side around the kernels: features mapped in float32 and V' = [v, 1]
made there, the core O' = phi_q S (chunked causal or non-causal) and its
backward in the kernels, dO' and the maps' derivatives in torch. Features
go in in the inputs' dtype (fp16/bf16 on tensor cores, fp32 by FMA); the
state and O' are float32. One launch takes the whole call
(no slicing by KV heads).
"""
from __future__ import annotations

import torch

from ...backends import cuda_kernel_reasons, register_backend
from . import cuda_kernels as ck
from . import torch_backend
from .kernel_backends import _KernelBackend


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
    """torch_backend.linear_forward's contract. Named maps: the kernels on q,
    k, v as they are (the map, the key padding and V's column of ones applied
    on load; softmax: the key statistics kernel, then the forward); the scale
    and the normalisation are one pass over O' here. A callable map:
    torch_backend's host side around the kernel."""
    if feature_map not in ck.FEATURE_MAPS:
        return torch_backend.linear_forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize,
                                            eps, scale, core=_CORE)
    Dv = v.shape[-1]
    S0 = None if kv0 is None else torch.cat([kv0, z0.unsqueeze(-1)], -1).float()
    o1, state = ck.forward(q, k, v, causal=causal, state0=S0, feature_map=feature_map,
                           key_padding_mask=key_padding_mask, append_ones=True)
    den = o1[..., Dv].mul_(scale).add_(eps)                               # (B, H, L) float32
    ratio = scale / den if normalize else torch.full_like(den, scale)
    out = (o1[..., :Dv] * ratio.unsqueeze(-1)).to(q.dtype)
    return out, state[..., :Dv].contiguous(), state[..., Dv].contiguous(), den.contiguous()


def _backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den, feature_map, causal, normalize, eps,
              scale):
    return torch_backend.linear_backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den, feature_map,
                                         causal, normalize, eps, scale, core=_CORE)


class CudaBackend(_KernelBackend):
    """csrc/linear/ through tfk._C, on a GPU."""
    name = "cuda"
    priority = 15  # below "triton" under "auto" until measured on a GPU, as the other families
    module = "_C"

    def functions(self):
        return _forward, _backward

    def device_reasons(self, t):
        return cuda_kernel_reasons(self.module, t)

    def auto_for(self, call):
        return call.query.is_cuda


class CudaSimBackend(CudaBackend):
    """The same kernels on CPU tensors through the host-execution layer (tfk._sim); never "auto"."""
    name = "cuda-sim"
    priority = 0
    module = "_sim"

    def auto_for(self, call):
        return False


register_backend(CudaBackend())
register_backend(CudaSimBackend())
