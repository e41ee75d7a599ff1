"""Launchers of the CUDA C++ linear-attention kernels (csrc/linear/):
torch.ops.tfk (tfk._C) for CUDA tensors, torch.ops.tfk_sim (tfk._sim, the same
kernels run by the host-execution layer) for CPU tensors.

The forward kernel takes mapped features, or applies the map itself:

- ``forward(phi_q, phi_k, v1, *, causal=True, state0=None, feature_map="identity",
  key_padding_mask=None, append_ones=False)`` -> (o1, state)
- ``softmax_stats(k, key_padding_mask=None)`` -> (B, Hkv, 2, D) float32: the
  "softmax" map's key statistics (below); ``forward`` runs it for that map
- ``backward(phi_q, phi_k, v1, do1, *, causal=True, state0=None, dstate=None)``
  -> (dq, dk, dv1, dstate0) on mapped features, composed from the forward
  kernel (its docstring)

    phi_q   (B, H, L, D)     phi(q), or q with feature_map "elu1", "relu" or
                             "softmax" (mapped on load in fp32, then rounded
                             to the dtype)
    phi_k   (B, Hkv, S, D)   phi(k), or k (feature_map); keys where
                             key_padding_mask (B, S) bool is False count as 0
    v1      (B, Hkv, S, E)   V' = [v, 1]: the normaliser is one more value
                             column (E = Dv + 1; ``with_ones(v)`` builds it), so
                             one product gives numerator and denominator; with
                             append_ones, v (B, Hkv, S, Dv) and the kernel
                             supplies the ones
    state0  (B, Hkv, D, E)   float32 S'_0 = [kv0, z0], or None (zeros)
    o1      (B, H, L, E)     float32 O' = [num, den]: out = num / (den + eps)
    state   (B, Hkv, D, E)   float32 S'_0 + sum over all keys of phi_k^T V'

  phi_q, phi_k and v1 share one dtype: float16 or bfloat16 (the intra-chunk
  Q K^T and the state update K^T V' on tensor cores, mma.sync m16n8k16 with
  fp32 accumulation) or float32 (FMA); the rest (tril(Q K^T) V' and Q S, whose
  left operands are fp32) is FMA in float32, and the state is float32. Query head h reads KV head
  h // (H // Hkv). Causal needs S == L (query i sees keys j <= i); D and E lie
  in [1, 257]. The result is deterministic (a fixed summation order, no
  atomics): a block per (batch, KV head, 64 value columns) walks 32-position
  chunks in order, carrying its slice of the state in shared memory; the G
  query heads of a KV head share the block (csrc/linear/linear_fwd.cu).

feature_map "softmax" (Efficient Attention's; non-causal only, causal is a
ValueError): phi(q) = softmax of each q row over its D channels, phi(k) =
softmax of k over the S positions per channel, masked keys left out and 0.
Two launches: linear_softmax_stats (csrc/linear/linear_stats.cu: per (batch,
KV head, channel) the max over the kept keys and 1 / sum exp(k - max), two
fixed-order passes over S; max 0 and 1 / sum 0 for a batch row with every key
masked, so its phi(k) is 0), then the forward, which maps key tiles as
exp(k - max) * (1 / sum) and each loaded q row by its own max and sum, in fp32,
rounded to the dtype.

Bad arguments are refused with TypeError (dtypes) or ValueError (shapes,
sizes, devices) naming the argument.
"""
from __future__ import annotations

import importlib

import torch

from ... import backends

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FEATURE_MAPS = {"identity": 0, "elu1": 1, "relu": 2, "softmax": 3}   # csrc/linear/linear.h FeatureMap
MAX_DIM = 257  # D and E = Dv + 1 (csrc/linear/linear.h kMaxDim): head dims up to 256


def ops(device):
    """torch.ops.tfk (tfk._C) for CUDA tensors, torch.ops.tfk_sim (tfk._sim) for CPU tensors."""
    if device.type == "cuda":
        importlib.import_module("tfk._C")
        return torch.ops.tfk
    if device.type != "cpu":
        raise ValueError(f"the CUDA linear-attention kernels take CUDA tensors, or CPU tensors (cuda-sim), "
                         f"not {device}")
    importlib.import_module("tfk._sim")
    return torch.ops.tfk_sim


def with_ones(v):
    """V' = [v, 1]: (..., Dv) -> (..., Dv + 1) in v's dtype."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _check_features(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (float16, bfloat16 or float32)")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected 4 dimensions, got shape {tuple(x.shape)}")


def _check(phi_q, phi_k, v1, causal, state0, append_ones=False):
    """Refuses bad arguments (module doc); returns state0 contiguous (or None)."""
    _check_features("phi_q", phi_q)
    _check_features("phi_k", phi_k)
    _check_features("v1", v1)
    for name, x in (("phi_k", phi_k), ("v1", v1)):
        if x.dtype != phi_q.dtype:
            raise TypeError(f"{name}: dtype {x.dtype} differs from phi_q's {phi_q.dtype}")
        if x.device != phi_q.device:
            raise ValueError(f"{name}: on {x.device}, phi_q on {phi_q.device}")
    B, H, L, D = phi_q.shape
    Hkv, S = phi_k.shape[1], phi_k.shape[2]
    E = v1.shape[3] + int(append_ones)
    if phi_k.shape[0] != B or phi_k.shape[3] != D:
        raise ValueError(f"phi_k: expected shape ({B}, Hkv, S, {D}) to match phi_q {tuple(phi_q.shape)}, "
                         f"got {tuple(phi_k.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"phi_k: Hkv = {Hkv} KV heads must divide phi_q's H = {H} query heads")
    if tuple(v1.shape[:3]) != (B, Hkv, S):
        raise ValueError(f"v1: expected shape ({B}, {Hkv}, {S}, {'Dv' if append_ones else 'Dv + 1'}) to match "
                         f"phi_k {tuple(phi_k.shape)}, got {tuple(v1.shape)}")
    if not 1 <= D <= MAX_DIM:
        raise ValueError(f"phi_q: feature dimension D = {D} must lie in [1, {MAX_DIM}]")
    if not 1 <= E <= MAX_DIM:
        raise ValueError(f"v1: E = Dv + 1 = {E} columns must lie in [1, {MAX_DIM}] (Dv <= {MAX_DIM - 1})")
    if append_ones and E < 2:
        raise ValueError("v1: append_ones needs at least one value column")
    if causal and S != L:
        raise ValueError(f"phi_k: causal needs as many keys as queries, got S = {S}, L = {L}")
    if state0 is not None:
        if not isinstance(state0, torch.Tensor) or state0.dtype != torch.float32:
            raise TypeError(f"state0: must be a float32 tensor, got "
                            f"{state0.dtype if isinstance(state0, torch.Tensor) else type(state0).__name__}")
        if tuple(state0.shape) != (B, Hkv, D, E):
            raise ValueError(f"state0: expected shape ({B}, {Hkv}, {D}, {E}), got {tuple(state0.shape)}")
        if state0.device != phi_q.device:
            raise ValueError(f"state0: on {state0.device}, phi_q on {phi_q.device}")
        state0 = state0.contiguous()
    dev = phi_q.device
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"phi_q: the CUDA linear-attention kernels take CUDA tensors, or CPU tensors "
                         f"(cuda-sim), not {dev}")
    return state0


def _check_keep(keep, B, S, dev):
    """key_padding_mask (B, S) bool on dev, contiguous, or None."""
    if keep is None:
        return None
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: must be a bool tensor, got "
                        f"{keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__}")
    if tuple(keep.shape) != (B, S) or keep.device != dev:
        raise ValueError(f"key_padding_mask: expected shape ({B}, {S}) on {dev}, got {tuple(keep.shape)} "
                         f"on {keep.device}")
    return keep.contiguous()


def softmax_stats(k, key_padding_mask=None):
    """The "softmax" map's key statistics, (B, Hkv, 2, D) float32: [:, :, 0, d]
    the max of k[:, :, :, d] over the kept positions, [:, :, 1, d] 1 / sum of
    exp(k - max) over them (both 0 where every key is masked), so that
    phi_k = exp(k - max) * inv (masked keys 0). k (B, Hkv, S, D) fp16, bf16 or fp32."""
    _check_features("k", k)
    B, Hkv, S, D = k.shape
    if not 1 <= D <= MAX_DIM:
        raise ValueError(f"k: feature dimension D = {D} must lie in [1, {MAX_DIM}]")
    if k.device.type not in ("cpu", "cuda"):
        raise ValueError(f"k: the CUDA linear-attention kernels take CUDA tensors, or CPU tensors "
                         f"(cuda-sim), not {k.device}")
    keep = _check_keep(key_padding_mask, B, S, k.device)
    out = backends.new_output((B, Hkv, 2, D), torch.float32, k.device)
    if B * Hkv == 0:
        return out
    return ops(k.device).linear_softmax_stats.out(k.contiguous(), keep, out=out)


def forward(phi_q, phi_k, v1, *, causal=True, state0=None, feature_map="identity", key_padding_mask=None,
            append_ones=False):
    """O' = [num, den] (B, H, L, E) float32 and the final state (B, Hkv, D, E)
    float32 of linear attention (see the module doc).

    causal:      O'_i = phi_q_i (S'_0 + sum_{j <= i} phi_k_j^T V'_j)
    non-causal:  O'_i = phi_q_i (S'_0 + sum_j phi_k_j^T V'_j)

    feature_map "softmax" (non-causal only) runs softmax_stats on phi_k (= k)
    first, then the forward with those statistics.
    """
    state0 = _check(phi_q, phi_k, v1, causal, state0, append_ones)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map: must be one of {tuple(FEATURE_MAPS)} (the kernel's maps), got {feature_map!r}")
    if feature_map == "softmax" and causal:
        raise ValueError("feature_map: 'softmax' (a softmax of k over all S positions) is non-causal only; "
                         "pass causal=False or another map")
    B, H, L, D = phi_q.shape
    Hkv, S, E = phi_k.shape[1], phi_k.shape[2], v1.shape[3] + int(append_ones)
    dev = phi_q.device
    keep = _check_keep(key_padding_mask, B, S, dev)
    o1 = backends.new_output((B, H, L, E), torch.float32, dev)
    state = backends.new_output((B, Hkv, D, E), torch.float32, dev)
    if B * Hkv == 0:
        return o1, state
    phi_k = phi_k.contiguous()
    kstats = softmax_stats(phi_k, keep) if feature_map == "softmax" else None
    return ops(dev).linear_fwd.out(phi_q.contiguous(), phi_k, v1.contiguous(), state0, bool(causal),
                                   FEATURE_MAPS[feature_map], keep, bool(append_ones), kstats, o=o1, s=state)


def backward(phi_q, phi_k, v1, do1, *, causal=True, state0=None, dstate=None):
    """Gradients of ``forward`` for dO' = d loss / d O' (B, H, L, E) float32 and
    dstate (B, Hkv, D, E) float32 or None (the returned state's gradient):
    (dq (B, H, L, D), dk (B, Hkv, S, D), dv1 (B, Hkv, S, E), dstate0 (B, Hkv, D, E)),
    all float32 (dv1's last column is the normaliser's: drop it for dv).

    Composed from the forward kernel, each a chunked pass that recomputes its
    state in fp32 (torch_backend.py's formulas), inputs upcast to float32
    (exact) because dO' is float32:
      dQ   = dO' S_n^T + tril(dO' V'^T) K:   forward(dO', V', K, state0 = S'_0^T)
      dV'  = K R_n + tril(Q K^T)^T dO':      forward(K, Q_g, dO'_g, state0 = dS) per query head g of
                                             the KV head, summed over g; causal runs on reversed
                                             positions, which turns the reverse sum R_n into the
                                             forward kernel's carried state
      dK   = V' R_n^T + tril(dO' V'^T)^T Q:  forward(V', dO'_g, Q_g, state0 = dS^T), the same way
      dS'_0 = the final states of the dV' passes (dS + sum Q^T dO').
    Deterministic: fixed-order sums, the G heads added in order. No tensor
    cores here (a fused 16-bit backward kernel is future work).
    """
    _check(phi_q, phi_k, v1, causal, state0)
    B, H, L, D = phi_q.shape
    Hkv, S, E = phi_k.shape[1], phi_k.shape[2], v1.shape[3]
    G = H // Hkv
    dev = phi_q.device
    for name, x, shape in (("do1", do1, (B, H, L, E)), ("dstate", dstate, (B, Hkv, D, E))):
        if x is None and name == "dstate":
            continue
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            raise TypeError(f"{name}: must be a float32 tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
        if x.device != dev:
            raise ValueError(f"{name}: on {x.device}, phi_q on {dev}")
    f32 = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
    rev = (lambda x: x.flip(2)) if causal else (lambda x: x)  # noqa: E731
    t = lambda x: None if x is None else x.transpose(-1, -2).contiguous()  # noqa: E731
    Q, K, V, dO = f32(phi_q), f32(phi_k), f32(v1), f32(do1)
    dq, _ = forward(dO, V, K, causal=causal, state0=t(state0))
    Kr, Vr = rev(K).contiguous(), rev(V).contiguous()
    Qg, dOg = Q.view(B, Hkv, G, L, D), dO.view(B, Hkv, G, L, E)
    ds = None if dstate is None else dstate.contiguous()
    dk = dv = ds0 = None
    for g in range(G):
        qg, dog = rev(Qg[:, :, g]).contiguous(), rev(dOg[:, :, g]).contiguous()
        dv_g, r_g = forward(Kr, qg, dog, causal=causal, state0=ds if g == 0 else None)
        dk_g, _ = forward(Vr, dog, qg, causal=causal, state0=t(ds) if g == 0 else None)
        dv, dk, ds0 = (dv_g, dk_g, r_g) if g == 0 else (dv + dv_g, dk + dk_g, ds0 + r_g)
    return dq, rev(dk).contiguous(), rev(dv).contiguous(), ds0
