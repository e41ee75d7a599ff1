"""Backends "triton", "cuda" and "cuda-sim" of the MoE family: the torch
backend's decomposition (torch_backend.py) with its GEMMs, activation and
combine run by kernels. Both kernel sets (triton_kernels/moe.py,
cuda_kernels.py for csrc/moe/) give the same launchers:

    grouped_gemm(a, b, offs, *, gather, trans_b, act, row_scale)   rows by group
    grouped_gemm_tn(a, b, offs, *, gather_a)                        per group a^T b
    act_backward(gate_up, grad_h, act)                              d(act(gate) * up)
    combine(y, index, k)                                            slot-ordered sums

Forward: rows = x[order // k] (read through the permutation, never copied)
@ gate_up[e]^T with act(gate) * up in the epilogue; @ down[e]^T times the
routing weight in the epilogue; each token's k rows summed in slot order.
Backward recomputes the gate_up product (only the inputs are kept):

    dA rows = dout[t] @ down[e]              d weight = rowsum(dA * A)
    dH = act_backward(H, w * dA)             d down[e] = dout_e^T @ (w * A)_e
    d gate_up[e] = (x_e^T @ dH_e)^T          dx rows = dH @ gate_up[e]

Every product is a grouped GEMM over the same expert offsets; empty experts
get zero gradients. The permutation is the kernels' own (triton: histogram,
scan and scatter kernels) when dropless, else torch ops (a stable sort by
expert with the capacity drops).

Routing is one kernel launch forward, ``route(logits, top_k, ...)`` ->
(weights, experts, counts) in both kernel sets (E <= 256, k <= 8); its
backward recomputes the float32 scores from the saved logits and applies,
with torch ops, the transposed chain gather -> normalise -> scale and the
softmax or sigmoid Jacobian (route_backward).
"""
from __future__ import annotations

import importlib

import torch

from ...backends import cuda_kernel_reasons, new_output, register_backend, triton_device_reasons
from . import torch_backend
from .api import MoEBackend, RouteCall, Routing, kernel_reasons
from .functions import experts_ops, grouped_mm_ops, route_ops
from .launch_checks import ROUTE_MAX_EXPERTS, ROUTE_MAX_TOP_K

_KERNEL_ACT = {"silu": "silu", "gelu": "gelu_tanh", "relu": "relu"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows(kernels, experts, num_experts, capacity):
    """(order, offsets, inverse (T*k,) with -1 where an assignment has no row, M):
    by the kernels' own permutation where they have one (dropless), else with
    torch ops (a capacity keeps (slot, token) order; see torch_backend.permute)."""
    if capacity < 0 and hasattr(kernels, "permute"):
        order, offsets, inverse = kernels.permute(experts, num_experts)
        M = int(offsets[-1])   # the rows past it are the sentinels'
        return order[:M], offsets, inverse, M
    order, offsets, inverse, _ = torch_backend.permute(experts, num_experts, None if capacity < 0 else capacity)
    M = order.numel()
    return order, offsets, inverse.masked_fill(inverse == M, -1), M


# The op factories take kernels(), which gives the kernels module at run time
# (inside the op, where torch.compile does not trace the import).

def _experts_forward(get_kernels):
    def forward(x, experts, weights, gate_up_proj, down_proj, activation, capacity):
        kernels = get_kernels()
        T, H = x.shape
        k = experts.shape[1]
        order, offs, inverse, M = _rows(kernels, experts, gate_up_proj.shape[0], capacity)
        if M == 0:
            return new_output((T, H), x.dtype, x.device).zero_()
        wrow = weights.reshape(-1).index_select(0, order).float()
        a = kernels.grouped_gemm(x, gate_up_proj, offs, gather=order // k, trans_b=True, act=_KERNEL_ACT[activation])
        y = kernels.grouped_gemm(a, down_proj, offs, trans_b=True, row_scale=wrow)
        return kernels.combine(y, inverse, k)
    return forward


def _experts_backward(get_kernels):
    def backward(dout, x, experts, weights, gate_up_proj, down_proj, activation, capacity):
        kernels = get_kernels()
        T, H = x.shape
        k = experts.shape[1]
        dout = dout.to(x.dtype)
        order, offs, inverse, M = _rows(kernels, experts, gate_up_proj.shape[0], capacity)
        if M == 0:
            return (torch.zeros_like(x), torch.zeros_like(weights), torch.zeros_like(gate_up_proj),
                    torch.zeros_like(down_proj))
        token = order // k
        wrow = weights.reshape(-1).index_select(0, order).float()
        h = kernels.grouped_gemm(x, gate_up_proj, offs, gather=token, trans_b=True)         # (M, 2I), recomputed
        act = torch_backend._activate(h, activation)                                        # (M, I) float32
        dA = kernels.grouped_gemm(dout, down_proj, offs, gather=token)                      # (M, I)
        drow = (dA.float() * act).sum(-1)
        dh = kernels.act_backward(h, (dA.float() * wrow[:, None]).to(x.dtype), _KERNEL_ACT[activation])
        d_down = kernels.grouped_gemm_tn(dout, (act * wrow[:, None]).to(x.dtype), offs, gather_a=token)
        d_gate_up = kernels.grouped_gemm_tn(x, dh, offs, gather_a=token).transpose(1, 2)
        dx = kernels.combine(kernels.grouped_gemm(dh, gate_up_proj, offs), inverse, k)
        dweights = torch.cat([drow, drow.new_zeros(1)])[inverse].view(T, k).to(weights.dtype)
        return dx, dweights, d_gate_up.contiguous(), d_down
    return backward


def _grouped_mm_forward(get_kernels):
    def forward(a, b, offs):
        return get_kernels().grouped_gemm(a, b, offs)
    return forward


def _grouped_mm_backward(get_kernels):
    def backward(dout, a, b, offs):
        kernels = get_kernels()
        dout = dout.to(a.dtype)
        return kernels.grouped_gemm(dout, b, offs, trans_b=True), kernels.grouped_gemm_tn(a, dout, offs)
    return backward


def _route_forward(get_kernels):
    def forward(logits, bias, top_k, score, normalize, n_group, topk_group, scaling):
        weights, experts, _ = get_kernels().route(logits, top_k, score=score, normalize=normalize, bias=bias,
                                            n_group=n_group or None, topk_group=topk_group or None,
                                            scaling=scaling)
        return weights, experts
    return forward


def route_backward(dweights, logits, experts, score, normalize, scaling):
    """d logits (T, E) in logits' dtype of the routing weights (T, k), from the
    logits and the chosen experts (T, k): w = scaling * g / (sum(g) [+ 1e-20])
    with g = scores.gather(1, experts), scores = softmax or sigmoid(logits) in fp32."""
    x = logits.float()
    s = x.softmax(-1) if score == "softmax" else x.sigmoid()
    g = s.gather(1, experts)
    dw = dweights.float() * scaling
    if normalize:
        den = g.sum(-1, keepdim=True) + (1e-20 if score == "sigmoid" else 0.0)
        # d (g_j / den) / d g_i = (delta_ij - g_j / den) / den
        dw = (dw - (dw * g).sum(-1, keepdim=True) / den) / den
    ds = torch.zeros_like(s).scatter_(1, experts, dw)  # a token's experts are distinct
    if score == "softmax":
        dx = s * (ds - (ds * s).sum(-1, keepdim=True))
    else:
        dx = ds * s * (1.0 - s)
    return dx.to(logits.dtype)


def _lead(call):
    """The tensor whose device and dtype decide where a call can run."""
    if isinstance(call, RouteCall):
        return call.logits
    return call.hidden_states if hasattr(call, "hidden_states") else call.a


class _KernelBackend(MoEBackend):
    """The shared host side; a subclass names its kernels and where they run."""
    kernels_module = None

    def __init__(self):
        # Made here, not on first use, so a first call under torch.compile finds them.
        name = self.name.replace("-", "_")
        self._experts = experts_ops(name, _experts_forward(self.kernels), _experts_backward(self.kernels))
        self._grouped_mm = grouped_mm_ops(name, _grouped_mm_forward(self.kernels),
                                          _grouped_mm_backward(self.kernels))
        self._route = route_ops(name, _route_forward(self.kernels), route_backward)

    def kernels(self):
        return importlib.import_module(self.kernels_module, __package__)

    def device_reasons(self, t):
        raise NotImplementedError

    def reasons(self, call):
        t = _lead(call)
        why = self.device_reasons(t)
        if t.dtype not in _DTYPES:
            why.append(f"dtype {t.dtype} (supports float16, bfloat16, float32)")
        if isinstance(call, RouteCall):
            if call.num_experts > ROUTE_MAX_EXPERTS:
                why.append(f"E = {call.num_experts} experts (the routing kernel takes at most {ROUTE_MAX_EXPERTS})")
            if call.top_k > ROUTE_MAX_TOP_K:
                why.append(f"top_k = {call.top_k} (the routing kernel takes at most {ROUTE_MAX_TOP_K})")
            return why
        return why + kernel_reasons(call)

    def experts(self, call):
        return self._experts(call.hidden_states, call.experts, call.weights, call.gate_up_proj, call.down_proj,
                             call.activation, -1 if call.capacity is None else call.capacity)

    def grouped_mm(self, call):
        return self._grouped_mm(call.a, call.b, call.offs.long())

    def route(self, call):
        n_group, topk_group = call.group_limit() or (0, 0)
        bias = None if call.bias is None else call.bias.detach().float().contiguous()
        weights, experts = self._route(call.logits, bias, call.top_k, call.score, call.normalize, n_group,
                                       topk_group, call.scaling)
        return Routing(weights, experts)


class TritonBackend(_KernelBackend):
    """triton_kernels/moe.py: on CUDA tensors, or CPU tensors in Triton's interpreter."""
    name = "triton"
    priority = 20
    kernels_module = "...triton_kernels.moe"

    def device_reasons(self, t):
        return triton_device_reasons(t)

    def auto_for(self, call):
        return _lead(call).is_cuda


register_backend(TritonBackend())


class CudaBackend(_KernelBackend):
    """csrc/moe/ through tfk._C, on a GPU."""
    name = "cuda"
    priority = 15  # below "triton" under "auto" until measured on a GPU, as attention's
    kernels_module = ".cuda_kernels"
    module = "_C"

    def device_reasons(self, t):
        return cuda_kernel_reasons(self.module, t)

    def auto_for(self, call):
        return _lead(call).is_cuda


class CudaSimBackend(CudaBackend):
    """The same kernels on CPU tensors through the host-execution layer (tfk._sim); never "auto"."""
    name = "cuda-sim"
    priority = 0
    module = "_sim"

    def auto_for(self, call):
        return False


register_backend(CudaBackend())
register_backend(CudaSimBackend())
