"""tfk.linear_attention: validation, the call the backends see, and the
reference and torch backends of the "linear" family."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ...backends import Backend, register_backend, select_backend
from ..checks import check_key_padding_mask
from . import torch_backend
from .functions import linear_ops
from .reference import linear_attention_reference
from .torch_backend import FEATURE_MAPS, acc_dtype

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class LinearCall:
    """A validated linear-attention call.

    query (B, H, L, D'), key (B, Hkv, S, D'), value (B, Hkv, S, Dv), H % Hkv == 0;
    feature_map one of FEATURE_MAPS (a callable map has already been applied to
    query and key, which then hold phi(query), phi(key), and feature_map is
    "identity"); key_padding_mask None or bool (B, S); initial_state None or
    (kv (B, Hkv, D', Dv), z (B, Hkv, D')) in the state dtype (float32, float64
    for float64 inputs). L == S when causal.
    """
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    causal: bool
    feature_map: str
    normalize: bool
    eps: float
    scale: float
    key_padding_mask: torch.Tensor | None
    initial_state: tuple | None
    return_state: bool

    @property
    def state_dtype(self):
        return acc_dtype(self.query.dtype)


class LinearBackend(Backend):
    """A backend of the linear-attention family: ``run(call)`` returns
    (out (B, H, L, Dv) in query's dtype, kv (B, Hkv, D', Dv), z (B, Hkv, D') in
    the state dtype), differentiable w.r.t. query, key, value and the initial
    state. A kernel backend gives forward/backward functions with
    torch_backend.linear_forward/linear_backward's signatures, wraps them with
    functions.linear_ops(name, ...) (custom ops + autograd), and says in
    ``reasons`` what it refuses (device, dtype, head dims)."""
    family = "linear"

    def reasons(self, call: LinearCall) -> list[str]:
        return []

    def run(self, call: LinearCall):
        raise NotImplementedError


class ReferenceBackend(LinearBackend):
    """The float64 oracle as a backend (quadratic memory): autograd for the
    gradients. Never chosen by "auto"."""
    name = "reference"
    priority = 0

    def auto_for(self, call):
        return False

    def run(self, call):
        d = torch.float64
        state = None if call.initial_state is None else tuple(s.to(d) for s in call.initial_state)
        out, (kv, z) = linear_attention_reference(
            call.query.to(d), call.key.to(d), call.value.to(d), causal=call.causal, feature_map=call.feature_map,
            normalize=call.normalize, eps=call.eps, scale=call.scale, key_padding_mask=call.key_padding_mask,
            initial_state=state)
        return out.to(call.query.dtype), kv.to(call.state_dtype), z.to(call.state_dtype)


class TorchBackend(LinearBackend):
    """The chunked causal form and the non-causal reductions in torch ops
    (torch_backend.py), O(L) memory, as a custom-op pair with an explicit
    backward. The CPU default."""
    name = "torch"
    priority = 10

    _op = staticmethod(linear_ops("torch", torch_backend.linear_forward, torch_backend.linear_backward))

    def run(self, call):
        kv0, z0 = call.initial_state if call.initial_state is not None else (None, None)
        out, kv, z, _ = self._op(call.query, call.key, call.value, call.key_padding_mask, kv0, z0, call.feature_map,
                                 call.causal, call.normalize, call.eps, call.scale)
        return out, kv, z


register_backend(ReferenceBackend())
register_backend(TorchBackend())


# --------------------------------------------------------------- validation

def _check_qkv(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, dims in (("query", query, "(B, H, L, D)"), ("key", key, "(B, Hkv, S, D)"),
                          ("value", value, "(B, Hkv, S, Dv)")):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {dims}, got {t.dim()}-D of shape {tuple(t.shape)}")
    if query.dtype not in _DTYPES:
        raise TypeError(f"query must be float16, bfloat16, float32 or float64, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected query's dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, expected query's device {query.device}")
    (B, H, L, D), (Bk, Hkv, S, Dk), (Bv, Hv, Sv, Dv) = query.shape, key.shape, value.shape
    if B != Bk or B != Bv:
        raise ValueError(f"batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if Dk != D:
        raise ValueError(f"key's head dim {Dk} does not match query's {D}")
    if Hv != Hkv or Sv != S:
        raise ValueError(f"value must be (B, Hkv, S, Dv) with Hkv = {Hkv} and S = {S} as key, "
                         f"got shape {tuple(value.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads H = {H} must be a multiple of key/value heads Hkv = {Hkv}")
    for name, n in (("query's length L", L), ("key's length S", S), ("head dim D", D), ("value's head dim Dv", Dv)):
        if n == 0:
            raise ValueError(f"{name} must be >= 1, got 0")


def _check_options(causal, feature_map, normalize, eps, scale, return_state, initial_state, L, S):
    for name, flag in (("causal", causal), ("normalize", normalize), ("return_state", return_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if not callable(feature_map) and feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS} or a callable, got {feature_map!r}")
    if feature_map == "softmax":
        if causal:
            raise ValueError("feature_map='softmax' needs causal=False: phi(k) is a softmax over all S positions, "
                             "so no prefix of the keys has it")
        if initial_state is not None or return_state:
            raise ValueError("feature_map='softmax' carries no state (initial_state, return_state): phi(k) is a "
                             "softmax over the positions of one call, so the sums of two calls do not add up; "
                             "pass every key in one call")
    for name, x, low in (("eps", eps, 0.0), ("scale", scale, None)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or \
                (low is not None and x < low):
            raise ValueError(f"{name} must be a finite number{' >= 0' if low is not None else ''}, got {x!r}")
    if causal and L != S:
        raise ValueError(f"causal=True needs as many queries as keys (L == S), got L = {L} and S = {S}; "
                         f"carry the earlier keys in initial_state, or pass causal=False")


def _check_state(state, B, Hkv, Dp, Dv, query):
    if state is None:
        return None
    if not isinstance(state, (tuple, list)) or len(state) != 2 or \
            not all(isinstance(t, torch.Tensor) for t in state):
        raise TypeError("initial_state must be None or a pair of tensors (kv, z), as return_state gives")
    want_dtype = acc_dtype(query.dtype)
    for name, t, shape in (("initial_state[0] (kv)", state[0], (B, Hkv, Dp, Dv)),
                           ("initial_state[1] (z)", state[1], (B, Hkv, Dp))):
        if tuple(t.shape) != shape:
            dims = "(B, Hkv, D', Dv)" if len(shape) == 4 else "(B, Hkv, D')"
            raise ValueError(f"{name} must be {dims} = {shape}, got shape {tuple(t.shape)}")
        if t.dtype != want_dtype:
            raise TypeError(f"{name} must be {want_dtype} (the state is {want_dtype} for {query.dtype} inputs), "
                            f"got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, expected query's device {query.device}")
    return tuple(state)


def _apply_callable(feature_map, query, key):
    """phi(query), phi(key) for a callable map: same dtype as query, the same last dim D'."""
    pq, pk = feature_map(query), feature_map(key)
    for name, t, x in (("query", pq, query), ("key", pk, key)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:3] != x.shape[:3] or t.shape[3] == 0:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            want = ", ".join(str(n) for n in x.shape[:3])
            raise ValueError(f"feature_map({name}) must be ({want}, D') (only the last dim may change), got {got}")
        if t.dtype != query.dtype:
            raise TypeError(f"feature_map({name}) has dtype {t.dtype}, expected query's dtype {query.dtype}")
    if pq.shape[3] != pk.shape[3]:
        raise ValueError(f"feature_map gave query {pq.shape[3]} features and key {pk.shape[3]}: they must match")
    return pq, pk


# ------------------------------------------------------------------- public

def linear_attention(query, key, value, *, causal=True, feature_map="elu1", normalize=True, eps=1e-6, scale=1.0,
                     key_padding_mask=None, initial_state=None, return_state=False, backend="auto"):
    """Linear attention (Katharopoulos et al.; Efficient Attention, Shen et al.).

    query (B, H, L, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv), H a multiple
    of Hkv (grouped-query: query head h reads key/value head h // (H // Hkv),
    K/V are never repeated). Returns out (B, H, L, Dv) in query's dtype, or
    (out, (kv, z)) when ``return_state``.

    With phi_q = scale * phi(query), phi_k = phi(key) (0 where
    ``key_padding_mask`` (B, S) bool is False) and (kv0, z0) the initial state
    (zeros when None):

        out_i = phi_q_i (kv0 + sum_{j in S(i)} phi_k_j v_j^T)
                / (phi_q_i . (z0 + sum_{j in S(i)} phi_k_j) + eps)      (no division unless normalize)

    S(i) = {j <= i} when causal (L == S required), all j otherwise.

    feature_map: "identity"; "elu1" (elu(x) + 1); "relu"; "softmax" (Efficient
        Attention: phi(q) a softmax over q's D channels, phi(k) a softmax over
        the S positions per channel, masked keys left out; causal=False only,
        and no state: phi(k) depends on every key of the call); or a callable
        applied to query and key in torch (autograd) before the core, mapping
        (..., D) to (..., D') in the same dtype: D' is then the state's feature dim.
    State: kv (B, Hkv, D', Dv) = sum_j phi_k_j v_j^T and z (B, Hkv, D') = sum_j phi_k_j,
        float32 (float64 for float64 inputs), accumulated after ``initial_state``.
        A causal prompt in chunks, then decode steps of L = 1, each passing the
        last call's state, gives the outputs of one call over the whole sequence;
        non-causally the state is the whole sum over every key seen.
    Differentiable w.r.t. query, key, value and initial_state (and through the
    returned state). The torch backend keeps O(L) memory; "reference" is the
    float64 quadratic form.
    """
    _check_qkv(query, key, value)
    B, H, L, D = query.shape
    Hkv, S, Dv = key.shape[1], key.shape[2], value.shape[3]
    _check_options(causal, feature_map, normalize, eps, scale, return_state, initial_state, L, S)
    check_key_padding_mask(key_padding_mask, B, S, query.device)
    if callable(feature_map):
        query, key = _apply_callable(feature_map, query, key)
        feature_map = "identity"
    state = _check_state(initial_state, B, Hkv, query.shape[3], Dv, query)
    call = LinearCall(query, key, value, causal, feature_map, normalize, float(eps), float(scale), key_padding_mask,
                      state, return_state)
    out, kv, z = select_backend(backend, call, "linear").run(call)
    return (out, (kv, z)) if return_state else out
