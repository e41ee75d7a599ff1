"""Backend "triton" of the linear-attention family: torch_backend.py's math run
by the kernels of triton_kernels/linear.py (a "cuda" backend can subclass
_KernelBackend with a kernels module of the same launchers):

    forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale,
            out, den, kv, z)                                   writes the outputs
    backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, den, delta, feature_map,
             causal, normalize, scale, dq, dk, dv, dkv0, dz0)  writes the gradients

The host side here allocates the outputs (new_output), makes the operands
contiguous, computes delta = dout . out (B, H, L) with torch ops (from out
recomputed in float32 by one more forward for half inputs, as the torch
backend does; the "softmax" map needs delta unnormalised too), and passes
eps to the backward (the softmax map's dq needs it). Every named feature map,
softmax included, is applied in the kernels.
"""
from __future__ import annotations

import importlib

import torch

from ...backends import new_output, register_backend, triton_device_reasons
from .api import LinearBackend
from .functions import linear_ops

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256   # triton_kernels/linear.py's MAX_HEAD_DIM (not imported here: triton may be missing)


def _contig(t):
    return None if t is None else t.contiguous()


def _forward(get_kernels):
    def forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale, out_dtype=None):
        kernels = get_kernels()
        B, H, L, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        q, k, v, key_padding_mask, kv0, z0 = map(_contig, (q, k, v, key_padding_mask, kv0, z0))
        out = new_output((B, H, L, Dv), out_dtype or q.dtype, q.device)
        kv, z = new_output((B, Hkv, D, Dv), torch.float32, q.device), new_output((B, Hkv, D), torch.float32, q.device)
        den = new_output((B, H, L), torch.float32, q.device)
        kernels.forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale,
                        out, den, kv, z)
        return out, kv, z, den
    return forward


def _backward(get_kernels, forward):
    def backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den, feature_map, causal, normalize,
                 eps, scale):
        kernels = get_kernels()
        B, H, L, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        sd = torch.float32 if kv0 is None else kv0.dtype
        dout, q, k, v, key_padding_mask, kv0, z0, den = map(
            _contig, (dout, q, k, v, key_padding_mask, kv0, z0, den))
        if normalize or feature_map == "softmax":   # softmax: sum_d dphi_q phi_q comes from delta
            if out.dtype != torch.float32:
                # a half out's rounding would reach dq and dk amplified by 1/den: recompute it in fp32
                out = forward(q, k, v, key_padding_mask, kv0, z0, feature_map, causal, normalize, eps, scale,
                              out_dtype=torch.float32)[0]
            delta = (dout.float() * out.float()).sum(-1)                       # (B, H, L)
        else:
            delta = den        # unread
        if dkv is not None or dz is not None:   # the kernels take both or neither
            dkv = torch.zeros(B, Hkv, D, Dv, dtype=torch.float32, device=q.device) if dkv is None \
                else dkv.float().contiguous()
            dz = torch.zeros(B, Hkv, D, dtype=torch.float32, device=q.device) if dz is None \
                else dz.float().contiguous()
        dv = new_output(v.shape, v.dtype, v.device)
        dkv0, dz0 = new_output((B, Hkv, D, Dv), torch.float32, q.device), \
            new_output((B, Hkv, D), torch.float32, q.device)
        dq, dk = new_output(q.shape, q.dtype, q.device), new_output(k.shape, k.dtype, k.device)
        kernels.backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, den, delta, feature_map, causal,
                         normalize, scale, dq, dk, dv, dkv0, dz0, eps=eps)
        return dq, dk, dv, dkv0.to(sd), dz0.to(sd)
    return backward


class _KernelBackend(LinearBackend):
    """The shared host side; a subclass names its kernels module and where it runs
    (device_reasons). Kernels with other launchers (tfk/ops/linear/cuda_kernels.py
    takes already-mapped features) override ``functions``."""
    kernels_module = None

    def __init__(self):
        # Made here, not on first use, so a first call under torch.compile finds the ops.
        self.forward, self.backward = self.functions()
        self._op = linear_ops(self.name.replace("-", "_"), self.forward, self.backward)

    def functions(self):
        """(forward, backward) with torch_backend.linear_forward/linear_backward's
        signatures, for a kernels module with this file's launchers (module doc)."""
        forward = _forward(self.kernels)
        return forward, _backward(self.kernels, forward)

    def kernels(self):
        return importlib.import_module(self.kernels_module, __package__)

    def device_reasons(self, t):
        raise NotImplementedError

    def reasons(self, call):
        q = call.query
        why = self.device_reasons(q)
        if q.dtype not in _DTYPES:
            why.append(f"dtype {q.dtype} (supports float16, bfloat16, float32)")
        D, Dv = q.shape[3], call.value.shape[3]
        if max(D, Dv) > MAX_HEAD_DIM:
            why.append(f"head dims D = {D}, Dv = {Dv} (the kernels take at most {MAX_HEAD_DIM})")
        return why

    def run(self, call):
        kv0, z0 = call.initial_state if call.initial_state is not None else (None, None)
        out, kv, z, _ = self._op(call.query, call.key, call.value, call.key_padding_mask, kv0, z0, call.feature_map,
                                 call.causal, call.normalize, call.eps, call.scale)
        return out, kv, z


class TritonBackend(_KernelBackend):
    """triton_kernels/linear.py: on CUDA tensors, or CPU tensors in Triton's interpreter."""
    name = "triton"
    priority = 20
    kernels_module = "...triton_kernels.linear"

    def device_reasons(self, t):
        return triton_device_reasons(t)

    def auto_for(self, call):
        return call.query.is_cuda


register_backend(TritonBackend())
