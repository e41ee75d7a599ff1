"""Score modifiers: functions of a score's position that attention kernels
apply in place, for ``tfk.attention(..., score_mod=...)``.

    s_ij = scale * q_i . k_j                      (Transformer-XL: its own form)
    s_ij = cap * tanh(s_ij / cap)                 softcap(cap)
    s_ij += slopes[h] * (j - i)                   alibi(slopes)
    s_ij += table[bucket(j - i), h]               relative_bias(table, ...)   (T5)
    s_ij += log m_h(i - j)                        adaptive_span(z, ramp)
    then attn_mask and the pattern, and the softmax.

Every modifier's parameters get their gradients. ``score_mod`` takes one
modifier or a sequence of them, at most one of each kind.

How the kernels fuse them: ALiBi, T5's bias and the adaptive span all add a
per-head function of the distance j - i, so they are summed, from their
parameters and with autograd, into one ``(H, Lq + Lk - 1)`` vector per head
(``distance_bias``); every engine adds its entry for each score it computes
and, in the backward, sums each diagonal's score gradients into the vector's
gradient, from which autograd reaches the slopes, the table and z. Nothing of
size Lq x Lk is made. Softcap is a float the kernels apply to the raw scores;
Transformer-XL's relative term is computed per tile from a band of r.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["alibi", "alibi_slopes", "relative_bias", "softcap", "adaptive_span", "transformer_xl", "ScoreMod",
           "t5_buckets"]


class ScoreMod:
    """Base of the modifiers; ``kind`` names the modifier (one of each per call)."""
    kind = "?"

    def check(self, H, Lq, Lk, D, q):
        """Raise ValueError/TypeError naming the modifier when it does not fit
        queries q (B, H, Lq, D) against Lk keys."""


def _check_param(what, t, shape_text, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{what} must be {shape_text}, got shape {tuple(t.shape)}")


def _check_device(what, t, q):
    if t.device != q.device:
        raise ValueError(f"{what} is on {t.device}, expected query's device {q.device}")


def _positive(what, x):
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)) or float(x) <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {x!r}")
    return float(x)


class Alibi(ScoreMod):
    kind = "alibi"

    def __init__(self, slopes):
        _check_param("alibi: slopes", slopes, "(H,)", 1)
        self.slopes = slopes

    def check(self, H, Lq, Lk, D, q):
        if self.slopes.shape[0] != H:
            raise ValueError(f"alibi: slopes has {self.slopes.shape[0]} entries, expected one per query head ({H})")
        _check_device("alibi: slopes", self.slopes, q)

    def distance_bias(self, dist):
        """(H, len(dist)) for distances j - i."""
        return self.slopes.to(dist.dtype).view(-1, 1) * dist

    def __repr__(self):
        return f"alibi(slopes of {self.slopes.shape[0]} heads)"


def alibi(slopes):
    """ALiBi (Press et al.): s_ij += slopes[h] * (j - i). slopes (H,), float,
    learnable or fixed (``alibi_slopes(H)`` gives the paper's)."""
    return Alibi(slopes)


def alibi_slopes(H):
    """The geometric slopes of the ALiBi paper for H heads, float32 (H,): for a
    power of two, 2^(-8/H), 2^(-16/H), ...; otherwise those of the largest
    power of two below H, then every other slope of twice that many."""
    if isinstance(H, bool) or not isinstance(H, int) or H < 1:
        raise ValueError(f"alibi_slopes: H must be an int >= 1, got {H!r}")

    def power_of_2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    p = 1 << (H.bit_length() - 1)
    slopes = power_of_2(p) if p == H else power_of_2(p) + power_of_2(2 * p)[0::2][:H - p]
    return torch.tensor(slopes, dtype=torch.float32)


def t5_buckets(relative_position, num_buckets=32, max_distance=128, bidirectional=True):
    """T5's bucket (int64) of each relative position j - i, exactly as T5
    computes it: exact buckets for small distances, logarithmic ones up to
    max_distance, the last bucket beyond; with ``bidirectional`` half the
    buckets serve keys after the query."""
    n = num_buckets
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        n //= 2
        buckets += (relative_position > 0).long() * n
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = n // 2
    small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (n - max_exact)).long()
    large = torch.clamp(large, max=n - 1)
    return buckets + torch.where(small, relative_position, large)


class RelativeBias(ScoreMod):
    kind = "relative_bias"

    def __init__(self, table, num_buckets, max_distance, bidirectional):
        _check_param("relative_bias: table", table, "(num_buckets, H)", 2)
        for name, x, least in (("num_buckets", num_buckets, 4 if bidirectional else 2),
                               ("max_distance", max_distance, 1)):
            if isinstance(x, bool) or not isinstance(x, int) or x < least:
                raise ValueError(f"relative_bias: {name} must be an int >= {least}, got {x!r}")
        if table.shape[0] != num_buckets:
            raise ValueError(f"relative_bias: table has {table.shape[0]} rows, expected num_buckets={num_buckets}")
        half = num_buckets // 2 if bidirectional else num_buckets
        if max_distance <= half // 2:
            raise ValueError(f"relative_bias: max_distance={max_distance} must exceed the exact buckets "
                             f"({half // 2})")
        self.table, self.num_buckets, self.max_distance = table, num_buckets, max_distance
        self.bidirectional = bool(bidirectional)

    def check(self, H, Lq, Lk, D, q):
        if self.table.shape[1] != H:
            raise ValueError(f"relative_bias: table has {self.table.shape[1]} columns, expected one per query "
                             f"head ({H})")
        _check_device("relative_bias: table", self.table, q)

    def distance_bias(self, dist):
        buckets = t5_buckets(dist.long(), self.num_buckets, self.max_distance, self.bidirectional)
        return self.table.to(dist.dtype)[buckets].t()

    def __repr__(self):
        return (f"relative_bias(num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional})")


def relative_bias(table, num_buckets=32, max_distance=128, bidirectional=True):
    """T5's bucketed relative position bias: s_ij += table[bucket(j - i), h]
    (``t5_buckets``). table (num_buckets, H), float, gets its gradient."""
    return RelativeBias(table, num_buckets, max_distance, bidirectional)


class Softcap(ScoreMod):
    kind = "softcap"

    def __init__(self, cap):
        self.cap = _positive("softcap: cap", cap)

    def __repr__(self):
        return f"softcap({self.cap})"


def softcap(cap):
    """Gemma 2's logit soft-capping: s = cap * tanh(s / cap), on the scaled
    scores, before the other modifiers and the masks."""
    return Softcap(cap)


class AdaptiveSpan(ScoreMod):
    kind = "adaptive_span"

    def __init__(self, z, ramp):
        _check_param("adaptive_span: z", z, "(H,)", 1)
        self.z, self.ramp = z, _positive("adaptive_span: ramp", ramp)

    def check(self, H, Lq, Lk, D, q):
        if self.z.shape[0] != H:
            raise ValueError(f"adaptive_span: z has {self.z.shape[0]} entries, expected one per query head ({H})")
        _check_device("adaptive_span: z", self.z, q)

    def span(self):
        """Keys at i - j >= span have m = 0 for every head: the plan's window."""
        return max(1, math.ceil(float(self.z.detach().max()) + self.ramp))

    def distance_bias(self, dist):
        # log m with m = clamp((ramp + z - x) / ramp, 0, 1), x = i - j; -inf where m = 0,
        # with a zero gradient there (where() passes none to the branch it does not take)
        m = ((self.ramp + self.z.to(dist.dtype).view(-1, 1) + dist) / self.ramp).clamp(0, 1)
        return torch.where(m > 0, torch.log(m.clamp(min=torch.finfo(dist.dtype).tiny)), -math.inf)

    def __repr__(self):
        return f"adaptive_span(z of {self.z.shape[0]} heads, ramp={self.ramp})"


def adaptive_span(z, ramp):
    """Adaptive attention span (Sukhbaatar et al. 2019): the attention weights
    of head h are multiplied by m(x) = clamp((ramp + z[h] - x) / ramp, 0, 1),
    x = i - j, before renormalisation (s_ij += log m). z (H,) gets its
    gradient; keys beyond max(z) + ramp are not visited."""
    return AdaptiveSpan(z, ramp)


class TransformerXL(ScoreMod):
    kind = "transformer_xl"

    def __init__(self, r, u, v):
        _check_param("transformer_xl: r", r, "(H or 1, Lq + Lk - 1, D)", 3)
        _check_param("transformer_xl: u", u, "(H, D)", 2)
        _check_param("transformer_xl: v", v, "(H, D)", 2)
        self.r, self.u, self.v = r, u, v

    def check(self, H, Lq, Lk, D, q):
        if self.r.shape[0] not in (1, H) or self.r.shape[1] != Lq + Lk - 1 or self.r.shape[2] != D:
            raise ValueError(f"transformer_xl: r must be (H or 1, Lq + Lk - 1, D) = ({H} or 1, {Lq + Lk - 1}, {D}), "
                             f"got {tuple(self.r.shape)}")
        for name, t in (("u", self.u), ("v", self.v)):
            if tuple(t.shape) != (H, D):
                raise ValueError(f"transformer_xl: {name} must be (H, D) = ({H}, {D}), got {tuple(t.shape)}")
        for name, t in (("r", self.r), ("u", self.u), ("v", self.v)):
            _check_device(f"transformer_xl: {name}", t, q)
            if t.dtype != q.dtype:
                raise TypeError(f"transformer_xl: {name} has dtype {t.dtype}, expected query's {q.dtype}")

    def __repr__(self):
        return f"transformer_xl(r {tuple(self.r.shape)})"


def transformer_xl(r, u, v):
    """Transformer-XL's relative attention (Dai et al. 2019):
    s_ij = scale * ((q_i + u_h) . k_j + (q_i + v_h) . r[h, d_ij + Lq - 1]),
    d_ij = (i + Lk - Lq) - j: the Lk - Lq keys before the queries are the
    memory segment. r (H or 1, Lq + Lk - 1, D): projected relative embeddings,
    row d + Lq - 1 for distance d; u, v (H, D). All in query's dtype, all get
    gradients. The relative shift happens per tile, never as an Lq x Lk tensor."""
    return TransformerXL(r, u, v)


def canonical(score_mod):
    """{kind: modifier} of a modifier or a sequence of them (None: {})."""
    if score_mod is None:
        return {}
    mods = list(score_mod) if isinstance(score_mod, (list, tuple)) else [score_mod]
    out = {}
    for m in mods:
        if not isinstance(m, ScoreMod):
            raise TypeError("score_mod must be a tfk.scores modifier or a sequence of them, "
                            f"got {type(m).__name__}")
        if m.kind in out:
            raise ValueError(f"score_mod has two {m.kind} modifiers: pass at most one of each kind")
        out[m.kind] = m
    return out


@dataclass
class Fused:
    """What the engines take: ``softcap`` (0.0: none); ``bias`` (H, Lq + Lk - 1)
    in the compute dtype, entry j - i + Lq - 1 added to s_ij, or None;
    ``qv`` (B, H, Lq, D) = q + v_h and ``r`` (H or 1, Lq + Lk - 1, D) for
    Transformer-XL's term (q is then q + u_h), or None. Plain tensors: the
    autograd of the parameters lives in the API around the engines."""
    softcap: float = 0.0
    bias: torch.Tensor | None = None
    qv: torch.Tensor | None = None
    r: torch.Tensor | None = None

    @property
    def empty(self):
        return self.softcap == 0.0 and self.bias is None and self.qv is None


def distance_bias(mods, Lq, Lk, dtype, device):
    """The sum of the distance modifiers' (H, Lq + Lk - 1) vectors (entry
    d + Lq - 1 for j - i = d), differentiable in their parameters; or None."""
    parts = [m for k, m in mods.items() if k in ("alibi", "relative_bias", "adaptive_span")]
    if not parts:
        return None
    dist = torch.arange(-(Lq - 1), Lk, dtype=dtype, device=device)
    total = None
    for m in parts:
        b = m.distance_bias(dist)
        total = b if total is None else total + b
    return total
