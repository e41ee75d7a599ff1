"""Named, realistic benchmark shapes.

A shape is a frozen record of one attention problem: sizes, dtype, the
pattern (a factory, so a shape stays hashable and picklable), and the tier it
belongs to: "cpu" shapes are sized so that the whole CPU benchmark
(``python -m bench.run``) finishes in a few minutes on a 2-core machine,
"gpu" shapes are the published anchor shapes (see /work/shared/ANCHORS.md)
for the GPU mode.

    from bench.registry import get_shape, shapes_for
    s = get_shape("sliding_window_8k")
    q, k, v, dout = s.make_inputs()
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from tfk import patterns as P

__all__ = ["Shape", "REGISTRY", "register", "get_shape", "shapes_for", "ACCEPTANCE"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass(frozen=True)
class Shape:
    """One benchmark problem.

    q (B, H, Lq, D); k, v (B, Hkv, Lk, D). ``pattern`` is a zero-argument
    callable returning a ``tfk.patterns`` pattern, or None for dense (or for
    plain top-left causal when ``causal`` is True: torch SDPA then runs with
    ``is_causal=True``). ``backward``: whether forward+backward is timed.
    """
    name: str
    B: int
    H: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    dtype: str = "fp32"                       # "fp32" | "fp16" | "bf16"
    pattern: Callable | None = field(default=None, compare=False)
    causal: bool = False
    tier: str = "cpu"                         # "cpu" | "gpu" | "both"
    note: str = ""
    backward: bool = True

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"{self.name}: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.tier not in ("cpu", "gpu", "both"):
            raise ValueError(f"{self.name}: tier must be 'cpu', 'gpu' or 'both', got {self.tier!r}")
        if self.causal and self.pattern is not None:
            raise ValueError(f"{self.name}: give either causal=True or a pattern, not both")
        if self.H % self.Hkv:
            raise ValueError(f"{self.name}: H ({self.H}) must be a multiple of Hkv ({self.Hkv})")

    @property
    def torch_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def gqa(self):
        return self.H != self.Hkv

    def make_pattern(self):
        """The tfk pattern (``causal()`` for a causal shape), or None for dense."""
        if self.causal:
            return P.causal()
        return None if self.pattern is None else self.pattern()

    def describe_pattern(self):
        p = self.make_pattern()
        return "dense" if p is None else repr(p)

    def seed(self):
        return zlib.crc32(self.name.encode())

    def make_inputs(self, device="cpu", requires_grad=False):
        """Deterministic q, k, v (the same in every process) and dout."""
        g = torch.Generator().manual_seed(self.seed())
        mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        q = mk(self.B, self.H, self.Lq, self.D)
        k = mk(self.B, self.Hkv, self.Lk, self.D)
        v = mk(self.B, self.Hkv, self.Lk, self.D)
        dout = mk(self.B, self.H, self.Lq, self.D)
        out = []
        for t in (q, k, v, dout):
            t = t.to(device=device, dtype=self.torch_dtype)
            out.append(t)
        for t in out[:3]:
            t.requires_grad_(requires_grad)
        return tuple(out)

    def in_tier(self, tier):
        return self.tier == "both" or self.tier == tier


REGISTRY: dict[str, Shape] = {}


def register(shape: Shape) -> Shape:
    if shape.name in REGISTRY:
        raise ValueError(f"shape {shape.name!r} is already registered")
    REGISTRY[shape.name] = shape
    return shape


def get_shape(name: str) -> Shape:
    if name not in REGISTRY:
        raise KeyError(f"no shape named {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def shapes_for(tier: str):
    """Registered shapes of a tier ("cpu" or "gpu"), in registration order."""
    return [s for s in REGISTRY.values() if s.in_tier(tier)]


# Pattern factories are functools.partial objects of tfk.patterns functions, or
# module-level functions, so a Shape pickles (bench.run sends shapes to worker
# processes).
_p = functools.partial


def _longformer(window, n_global):
    return P.sliding_window(window, window) | P.global_tokens(n_global)


def _causal_window(window):
    return P.causal() & P.sliding_window(window, window)


# ---------------------------------------------------------------------------
# CPU tier: sized for 2 cores (the dense SDPA baseline is O(L^2)).
# ---------------------------------------------------------------------------

ACCEPTANCE = register(Shape(
    "sliding_window_8k", B=1, H=8, Hkv=8, Lq=8192, Lk=8192, D=64, dtype="fp32",
    pattern=_p(P.sliding_window, 256, 0), tier="cpu",
    note="acceptance shape: causal local window of 256 keys; tfk fwd+bwd must beat dense-mask SDPA"))

register(Shape(
    "causal_4k", B=1, H=8, Hkv=8, Lq=4096, Lk=4096, D=64, causal=True, tier="cpu",
    note="plain causal: tfk's torch backend hands this to torch's fused kernel (expect ratio ~1)"))

register(Shape(
    "longformer_4k", B=1, H=8, Hkv=8, Lq=4096, Lk=4096, D=64,
    pattern=_p(_longformer, 256, 16), tier="cpu",
    note="Longformer: symmetric window 256 | 16 global tokens"))

register(Shape(
    "dilated_window_4k", B=1, H=8, Hkv=8, Lq=4096, Lk=4096, D=64,
    pattern=_p(P.sliding_window, 256, 256, 4), tier="cpu",
    note="NATTEN-style dilated window: |i-j| <= 256, (i-j) % 4 == 0"))

register(Shape(
    "strided_4k", B=1, H=8, Hkv=8, Lq=4096, Lk=4096, D=64,
    pattern=_p(P.strided, 64), tier="cpu",
    note="Sparse Transformer strided, stride 64 = sqrt(L)"))

register(Shape(
    "fixed_4k", B=1, H=8, Hkv=8, Lq=4096, Lk=4096, D=64,
    pattern=_p(P.fixed, 128, 16), tier="cpu",
    note="Sparse Transformer fixed, block 128, 16 summary columns"))

register(Shape(
    "bigbird_4k", B=1, H=8, Hkv=8, Lq=4096, Lk=4096, D=64,
    pattern=_p(P.bigbird, 64, 3, 2, 3, 0), tier="cpu",
    note="BigBird: block 64, window 3 blocks, 2 global blocks, 3 random blocks"))

register(Shape(
    "gqa_causal_window_4k", B=1, H=16, Hkv=4, Lq=4096, Lk=4096, D=64,
    pattern=_p(_causal_window, 512), tier="cpu",
    note="GQA 16/4 heads, causal & window 512 (Mistral-style)"))


# ---------------------------------------------------------------------------
# GPU tier: the published anchors (ANCHORS.md), fp16 and bf16.
# ---------------------------------------------------------------------------

for _dt in ("fp16", "bf16"):
    for _causal in (False, True):
        register(Shape(
            f"fa3_anchor_{'causal' if _causal else 'dense'}_16k_d128_{_dt}", B=1, H=16, Hkv=16,
            Lq=16384, Lk=16384, D=128, dtype=_dt, causal=_causal, tier="gpu",
            note="FA3 anchor (B=1, H=16, L=16384, D=128): 648 TFLOP/s fwd, 561 bwd on H100; "
                 "Triton tutorial 06: 477 TFLOP/s fwd"))

for _L in (1024, 2048, 4096, 8192, 16384):
    for _causal in (False, True):
        for _dt in ("fp16", "bf16"):
            register(Shape(
                f"sweep_{'causal' if _causal else 'dense'}_{_L // 1024}k_d64_{_dt}", B=4, H=32, Hkv=32,
                Lq=_L, Lk=_L, D=64, dtype=_dt, causal=_causal, tier="gpu",
                note="FlashAttention benchmark sweep (B=4, H=32, D=64)"))

for _dt in ("fp16", "bf16"):
    register(Shape(
        f"natten_window_32k_d128_{_dt}", B=1, H=1, Hkv=1, Lq=32768, Lk=32768, D=128, dtype=_dt,
        pattern=_p(P.sliding_window, 1024, 1023), tier="gpu",
        note="NATTEN anchor: L=32768, D=128, window 2048 (1024 behind, 1023 ahead): 94.8 us on H100, "
             "8.3x cuDNN dense. ANCHORS.md gives no B/H; 94.8 us matches B=H=1 (34 GFLOP)"))

del _dt, _causal, _L
