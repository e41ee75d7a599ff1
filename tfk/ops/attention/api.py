"""Public attention entry points: validation, canonical form, dispatch."""
from __future__ import annotations

import math
import numbers
import os

import torch
import torch.nn.functional as F

from ...backends import _BACKENDS, _RECORDERS, AttentionCall, Backend, register_backend, select_backend
from ...patterns import Pattern, _Diagonals, causal
from ... import scores
from ... import dropout as drop
from .reference import attention_reference

# torch's own function, kept before anyone (tfk.patch_torch included) replaces it.
torch_sdpa = F.scaled_dot_product_attention

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Built once, outside any torch.compile trace (a pattern built while tracing
# cannot be handed to the plan cache as a constant).
_CAUSAL = causal()

# The backend registry as tfk ships it, filled by tfk.ops.attention once every
# built-in backend is registered. While the registry equals it, "auto" sends
# every call _direct accepts to "sdpa" (the backends ranked above it take CUDA
# tensors only), so such calls skip building and selecting.
SHIPPED_BACKENDS: dict = {}
_MASK_DTYPES = (torch.bool, torch.float32)


def _check_tensors(q, k, v):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtype, device = q.dtype, q.device
    if dtype not in _DTYPES:
        raise TypeError(f"query must be float16, bfloat16, float32 or float64, got {dtype}")
    for name, t in (("key", k), ("value", v)):
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected query's dtype {dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected query's device {device}")


def _check_shapes(q, k, v, gqa):
    """q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), all 4-D."""
    (B, H, _, D), (Bk, Hkv, Lk, Dk), (Bv, Hv, Lv, _) = q.shape, k.shape, v.shape
    if D == 0:
        raise ValueError("query's head dim must be > 0")
    if Dk != D:
        raise ValueError(f"key's head dim {Dk} does not match query's {D}")
    if Lv != Lk:
        raise ValueError(f"value has {Lv} positions, expected key's {Lk}")
    if B != Bk or Bv != Bk:
        raise ValueError(f"batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if Hv != Hkv:
        raise ValueError(f"value has {Hv} heads, expected key's {Hkv}")
    if gqa:
        if Hkv == 0 or H % Hkv:
            raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    elif H != Hkv:
        raise ValueError(f"query has {H} heads and key {Hkv}: pass enable_gqa=True for grouped-query attention")


def _check_common(scale, dropout_p, D):
    if not (type(dropout_p) is float or isinstance(dropout_p, numbers.Real)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if not (type(scale) is float or isinstance(scale, numbers.Real)) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _run(call, backend, return_lse):
    out, lse = select_backend(backend, call).run(call)
    return (out, lse) if return_lse else out


# adaptive_span's plan window is rounded up to this many keys, so a span
# that moves while it learns keeps its cached plan
SPAN_QUANTUM = 64


def _score_mods(score_mod, q, k, pattern):
    """{kind: modifier} of ``score_mod``, checked against q and k, and the
    pattern narrowed to an adaptive span's window; (None, pattern) without
    modifiers."""
    mods = scores.canonical(score_mod)
    if not mods:
        return None, pattern
    B, H, Lq, D = q.shape
    for m in mods.values():
        m.check(H, Lq, k.shape[2], D, q)
    if "adaptive_span" in mods:   # m = 0 at i - j >= span for every head: those keys are not visited
        span = -(-mods["adaptive_span"].span() // SPAN_QUANTUM) * SPAN_QUANTUM
        window = _Diagonals(hi=span - 1)
        pattern = window if pattern is None else pattern & window
    return mods, pattern


def attention(query, key, value, pattern=None, *, scale=None, dropout_p=0.0, backend="auto", return_lse=False,
              score_mod=None):
    """Attention under a pattern.

    Args:
        query: (B, H, Lq, D); key: (B, Hkv, Lk, D); value: (B, Hkv, Lk, Dv),
            with H a multiple of Hkv (grouped-query attention).
        pattern: a ``tfk.patterns`` pattern, or None for dense attention.
        scale: defaults to 1/sqrt(D).
        dropout_p: dropout on the attention probabilities, from a counter-based
            RNG seeded by torch's generator.
        backend: "auto", or a name from ``tfk.backend_names()``.
        return_lse: also return lse (B, H, Lq), the natural log of each row's
            softmax denominator (float32; float64 for float64 inputs).
        score_mod: a ``tfk.scores`` modifier (alibi, relative_bias, softcap,
            adaptive_span, transformer_xl) or a sequence of them, one of each
            kind at most, fused into the kernels with gradients to their
            parameters.
    Returns:
        out (B, H, Lq, Dv), or (out, lse). A query that may attend to no key
        gets out = 0 and lse = -inf.
    """
    _check_tensors(query, key, value)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got {t.dim()}-D of shape {tuple(t.shape)}")
    _check_shapes(query, key, value, gqa=True)
    if pattern is not None:
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a tfk.patterns pattern or None, got {type(pattern).__name__}")
        if pattern.heads not in (None, 1, query.shape[1]):
            raise ValueError(f"pattern has {pattern.heads} heads but query has {query.shape[1]}")
        pattern.check_lengths(query.shape[2], key.shape[2])
    scale = _check_common(scale, dropout_p, query.shape[-1])
    mods, pattern = _score_mods(score_mod, query, key, pattern)
    call = AttentionCall(query, key, value, pattern, None, scale, float(dropout_p), bool(return_lse), mods)
    return _run(call, backend, return_lse)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, backend="auto", score_mod=None):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes as torch's: query (..., L, E), key (..., S, E), value (..., S, Ev)
    -> (..., L, Ev), the leading dims broadcast against each other as torch
    broadcasts them (query (4, 3, 8) with key (4, 4, 6, 8) gives
    (4, 4, 3, 8)); with ``enable_gqa``, dim -3 holds H query heads over Hkv
    key/value heads, H % Hkv == 0. ``attn_mask`` is bool (True = may attend)
    or float (added to the scores; float32 or query's dtype), broadcastable to
    (..., L, S). ``is_causal`` is top-left aligned (key j for query i when
    j <= i) and excludes ``attn_mask``. A query with no allowed key gets 0, as
    with torch. ``backend`` picks the implementation ("auto" by default);
    ``score_mod`` takes ``tfk.scores`` modifiers, as ``tfk.attention``.
    """
    if backend == "auto" and score_mod is None and _direct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        for names in _RECORDERS:
            names.append("sdpa")
        return torch_sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                          enable_gqa=query.shape[1] != key.shape[1])
    _check_tensors(query, key, value)
    q, k, v, lead = _canonical_qkv(query, key, value, bool(enable_gqa))
    _check_shapes(q, k, v, gqa=bool(enable_gqa))
    mask = None
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask and is_causal cannot both be set (as in torch)")
        mask = _canonical_mask(attn_mask, query, (*lead, q.shape[2], k.shape[2]))
    scale = _check_common(scale, dropout_p, q.shape[-1])
    mods, pattern = _score_mods(score_mod, q, k, _CAUSAL if is_causal else None)
    call = AttentionCall(q, k, v, pattern, mask, scale, float(dropout_p), False, mods)
    out = _run(call, backend, False)
    return out if out.shape[:2] == lead else out.reshape(*lead, *out.shape[2:])


def _direct(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    """Whether the call is one "auto" would run on "sdpa" unchanged, by checks
    cheaper than the full path's: plain 4-D CPU tensors of one float dtype,
    valid shapes, scale and mask, no dropout, the registry as shipped, no
    TFK_BACKEND, and not under torch.compile (which traces the full path).
    Anything else, errors included, takes the full path."""
    if torch.compiler.is_compiling() or not (type(q) is torch.Tensor and type(k) is torch.Tensor
                                             and type(v) is torch.Tensor and q.is_cpu and k.is_cpu and v.is_cpu):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return False
    dtype = q.dtype
    if dtype not in _DTYPES or k.dtype is not dtype or v.dtype is not dtype:
        return False
    B, H, L, E = qs
    _, Hkv, S, _ = ks
    if not (ks[0] == vs[0] == B and vs[1] == Hkv and vs[2] == S and ks[3] == E and E > 0 and Hkv > 0):
        return False
    if not (H == Hkv and enable_gqa is False or enable_gqa is True and H % Hkv == 0):
        return False
    if not (type(dropout_p) in (float, int) and dropout_p == 0 and (is_causal is False or is_causal is True)):
        return False
    if scale is not None and not (type(scale) is float and math.isfinite(scale)):
        return False
    if mask is not None:
        if is_causal or type(mask) is not torch.Tensor or not mask.is_cpu \
                or (mask.dtype not in _MASK_DTYPES and mask.dtype is not dtype):
            return False
        ms = mask.shape
        if not 2 <= len(ms) <= 4:
            return False
        for m, f in zip(ms, (B, H, L, S)[4 - len(ms):]):
            if m != 1 and m != f:
                return False
    # TFK_BACKEND is read on every call (tests and users set it at run time),
    # last: an unset variable costs os.environ.get a raised KeyError (~1 us)
    return _BACKENDS == SHIPPED_BACKENDS and not os.environ.get("TFK_BACKEND")


def _broadcast(what, *shapes):
    """The broadcast of ``shapes`` (right-aligned, as torch's), or a ValueError naming ``what``."""
    n = max(map(len, shapes))
    out = []
    for dims in zip(*((1,) * (n - len(s)) + tuple(s) for s in shapes)):
        sizes = set(dims) - {1}
        if len(sizes) > 1:
            raise ValueError(f"{what} {' and '.join(str(tuple(s)) for s in shapes)} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _canonical_qkv(query, key, value, enable_gqa):
    """query, key, value as (B, H, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)
    (views where the shapes allow), and ``lead``, the output's leading dims
    ((..., L, Ev) = (*lead, L, Ev))."""
    qs, ks, vs = query.shape, key.shape, value.shape
    if len(qs) == len(ks) == len(vs) == 4 and qs[0] == ks[0] == vs[0] and (enable_gqa or qs[1] == ks[1] == vs[1]):
        return query, key, value, (qs[0], qs[1])  # the common case: no broadcast
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
        if enable_gqa and t.dim() < 3:
            raise ValueError(f"enable_gqa needs dim -3 to hold the heads: {name} has shape {tuple(t.shape)}")
    gqa = enable_gqa and min(query.dim(), key.dim(), value.dim()) >= 3 and query.shape[-3] != key.shape[-3]
    if gqa:  # dim -3 holds the heads: H over Hkv; only the dims before it broadcast
        batch = _broadcast("query, key and value batch dims", query.shape[:-3], key.shape[:-3], value.shape[:-3])
        lead = batch + (query.shape[-3],)
        heads = (query.shape[-3], key.shape[-3], value.shape[-3])
    else:
        try:
            lead = _broadcast("query, key and value leading dims", query.shape[:-2], key.shape[:-2],
                              value.shape[:-2])
        except ValueError as e:
            if min(query.dim(), key.dim()) >= 3 and query.shape[-3] % max(key.shape[-3], 1) == 0:
                raise ValueError(f"{e}: query has {query.shape[-3]} heads and key {key.shape[-3]}: pass "
                                 "enable_gqa=True for grouped-query attention") from None
            raise
        # (..., H, L, E) keeps its last leading dim as the heads; (N, L, E) and (L, E) have one head
        batch = lead[:-1] if len(lead) >= 2 else lead
        heads = (lead[-1] if len(lead) >= 2 else 1,) * 3
    head_dim = gqa or len(lead) >= 2  # whether the inputs' dim -3 is the heads
    B = math.prod(batch)

    def to4(t, h):
        return t.expand(*batch, *((h,) if head_dim else ()), *t.shape[-2:]).reshape(B, h, *t.shape[-2:])

    return (*(to4(t, h) for t, h in zip((query, key, value), heads)), lead)


def _canonical_mask(attn_mask, query, full):
    """attn_mask as a 4-D tensor broadcastable to (B, H, L, S), for the output
    shape ``full`` = (*lead, L, S); without copying where a view will do."""
    if not torch.is_tensor(attn_mask):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise TypeError(f"attn_mask must be bool, float32 or query's dtype {query.dtype} (as torch requires), "
                        f"got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, expected query's device {query.device}")
    if not all(m in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full))):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(..., L, S) = {full}")
    if attn_mask.dim() > len(full):
        raise ValueError(f"attn_mask has {attn_mask.dim()} dims, more than the {len(full)} of (..., L, S)")
    if len(full) == 4 and attn_mask.dim() == 4:
        return attn_mask
    m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
    if len(full) <= 3:  # (B, L, S) or (L, S): one head
        return m.reshape((1,) * (3 - len(full)) + tuple(m.shape)).unsqueeze(1)
    lead = m.shape[:-3]
    if all(s == 1 for s in lead):
        return m.reshape(1, *m.shape[-3:])
    return m.expand(*full[:-3], *m.shape[-3:]).reshape(math.prod(full[:-3]), *m.shape[-3:])


class ReferenceBackend(Backend):
    """Dense masked attention with torch autograd: simple and slow, O(Lq * Lk)
    memory. Chosen by "auto" only when nothing else can run."""
    name = "reference"
    priority = 0
    score_mods = True

    def reasons(self, call):
        return []

    def run(self, call: AttentionCall):
        q, k, v = call.q, call.k, call.v
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        allowed = None
        if call.pattern is not None:
            allowed = call.pattern.dense_mask(Lq, Lk, device=q.device)
            allowed = allowed.unsqueeze(0) if allowed.dim() == 3 else allowed
        bias = None
        if call.attn_mask is not None:
            if call.attn_mask.dtype == torch.bool:
                allowed = call.attn_mask if allowed is None else allowed & call.attn_mask
            else:
                bias = call.attn_mask
        keep = None
        if call.dropout_p > 0:
            keep = drop.dense_keep_mask(drop.draw_seed(), B, H, Lq, Lk, call.dropout_p, device=q.device)
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), allowed, bias,
                                       call.scale, call.dropout_p, keep, call.score_mod)
        return out.to(q.dtype), lse


register_backend(ReferenceBackend())
