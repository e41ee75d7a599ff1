"""tfk.lsh_attention: validation, hashing, the call the backends see, and the
reference and torch backends of the "lsh" family."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ... import dropout as drop
from ...backends import Backend, register_backend, select_backend
from ..checks import check_key_padding_mask
from . import torch_backend
from .functions import lsh_ops
from .reference import lsh_attention_reference
from .torch_backend import acc_dtype

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------ hashing

def default_n_buckets(L, chunk_size):
    """The largest power of two <= 2·L / chunk_size, at least 2 (Hugging Face's
    ``_set_num_buckets`` without its factorisation)."""
    return max(2, 2 ** ((2 * (L // chunk_size)).bit_length() - 1))


def _factors(n_buckets):
    return [int(n_buckets)] if isinstance(n_buckets, numbers.Integral) else [int(f) for f in n_buckets]


def rotation_size(n_buckets):
    """The last dim of the rotations is rotation_size(n_buckets) // 2: n_buckets, or
    the sum of the factors of a factorised list."""
    return sum(_factors(n_buckets))


def draw_rotations(H, D, n_hashes, n_buckets, seed=None):
    """(H, D, n_hashes, rotation_size / 2) float32 on the CPU, ``torch.randn`` of
    that shape from a generator seeded by ``seed`` (torch's generator when None):
    with ``seed`` it is what Hugging Face draws with ``hash_seed=seed`` on the CPU."""
    shape = (H, D, n_hashes, rotation_size(n_buckets) // 2)
    g = None if seed is None else torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def hash_buckets(qk, rotations, n_buckets, key_padding_mask=None):
    """Buckets (B, H, n_hashes, L) int64 of the detached qk (B, H, L, D) under
    ``rotations`` (H or 1, D, n_hashes, rotation_size / 2): round r's bucket is
    argmax(cat([x R_r, -x R_r])), per factor of a factorised ``n_buckets``
    combined as Hugging Face does (bucket = Σ_f argmax_f · Π_{g<f} n_g). Positions
    that ``key_padding_mask`` drops go to one extra last bucket (as Hugging Face).
    Slices of positions, each one GEMM for every (batch, head, round) and the
    argmaxes (_argmax_signed): no loop over batch, head or round."""
    def _argmax_signed(part):
        """argmax(cat([part, -part], -1)), first occurrence, without the concatenation
        and without a full-size argmax (argmax reduces element by element on the
        CPU, several times slower than amax): the last dim cut into groups of g, the
        group maxima of part and of -part (-amin) in cat's order, the first group
        holding the maximum, then the first maximum inside it."""
        h = part.shape[-1]
        g = 1                           # about h / 4: amax over short rows (< 32) is slow too
        while h % (2 * g) == 0 and 8 * g <= h:
            g *= 2
        ng = h // g
        grp = part.unflatten(-1, (ng, g))                               # (..., ng, g)
        gi = torch.cat([grp.amax(-1), grp.amin(-1).neg_()], -1).argmax(-1)   # (...): a group of cat([part, -part])
        # the winning group's g values by whole rows (index_select; gather goes
        # element by element), negated where it is one of -part's
        rows = torch.arange(gi.numel(), device=gi.device) * ng + (gi % ng).reshape(-1)
        inside = grp.reshape(-1, g).index_select(0, rows)
        inside.mul_((1 - 2 * (gi >= ng)).reshape(-1, 1).to(inside.dtype))
        return gi * g + inside.argmax(-1).view(gi.shape)

    # rotated values (positions x rounds x rotations) hashed at once: a few
    # MiB reused slice by slice, not the whole (B, H, n, L, rotation_size / 2)
    hash_elements = 1 << 21
    acc = acc_dtype(qk.dtype)
    B, H, L, D = qk.shape
    n, half = rotations.shape[2], rotations.shape[3]
    x = qk.detach().to(acc)
    R = rotations.detach().to(device=qk.device, dtype=acc).expand(H, -1, -1, -1).reshape(1, H, D, n * half) \
        .expand(B, -1, -1, -1).reshape(B * H, D, n * half)
    buckets = torch.empty(B, H, n, L, dtype=torch.int64, device=qk.device)
    step = max(1, hash_elements // (B * H * n * half))
    buf = torch.empty(B * H * min(step, L) * n * half, dtype=acc, device=qk.device)
    for l0 in range(0, L, step):
        l1 = min(L, l0 + step)
        xs = x[:, :, l0:l1].reshape(B * H, l1 - l0, D)
        rotated = torch.bmm(xs, R, out=buf[:xs.shape[0] * xs.shape[1] * n * half].view(B * H, l1 - l0, n * half))
        rotated = rotated.view(B, H, l1 - l0, n, half)
        b, start, product = None, 0, 1
        for f in _factors(n_buckets):
            a = _argmax_signed(rotated[..., start:start + f // 2])
            start += f // 2
            b = a if b is None else b + product * a
            product *= f
        buckets[:, :, :, l0:l1] = b.transpose(-1, -2)
    if key_padding_mask is not None:
        buckets = torch.where(key_padding_mask[:, None, None, :], buckets, buckets.new_full((), product))
    return buckets


def sorted_order(buckets):
    """(B, H, n, L) positions of each round sorted by (bucket, position): a stable
    argsort of bucket·L + position."""
    L = buckets.shape[-1]
    pos = torch.arange(L, device=buckets.device)
    return torch.argsort(buckets * L + pos, dim=-1, stable=True)


# ------------------------------------------------------------------ the call

@dataclass
class LshCall:
    """A validated LSH-attention call.

    qk (B, H, L, D), value (B, H, L, Dv); buckets (B, H, n_hashes, L) int64, or
    None for the full-attention path (L <= chunk_size: one round, every key);
    key_padding_mask None or bool (B, L), True = keep; dropout_seed the counter
    hash's seed (used when dropout_p > 0)."""
    qk: torch.Tensor
    value: torch.Tensor
    buckets: torch.Tensor | None
    chunk_size: int
    chunks_before: int
    chunks_after: int
    causal: bool
    key_padding_mask: torch.Tensor | None
    scale: float
    dropout_p: float
    dropout_seed: int
    return_lse: bool

    @property
    def n_rounds(self):
        return 1 if self.buckets is None else self.buckets.shape[2]


class LshBackend(Backend):
    """A backend of the LSH family: ``run(call)`` returns (out (B, H, L, Dv) in
    qk's dtype, lse (B, H, L) float32, float64 for float64 inputs),
    differentiable w.r.t. qk and value."""
    family = "lsh"

    def reasons(self, call: LshCall) -> list[str]:
        return []

    def run(self, call: LshCall):
        raise NotImplementedError


def dense_keep(call: LshCall):
    """The (B, H, n, L, L) keep mask of a call's dropout: (batch, head, round,
    query position, key position), the counter hash of tfk.dropout with the
    (head, round) pair as its head index h·n + r."""
    B, H, L, _ = call.qk.shape
    n = call.n_rounds
    return drop.dense_keep_mask(call.dropout_seed, B, H * n, L, L, call.dropout_p,
                                device=call.qk.device).view(B, H, n, L, L)


class ReferenceBackend(LshBackend):
    """The float64 dense oracle as a backend (L×L memory per round): autograd for
    the gradients. Never chosen by "auto"."""
    name = "reference"
    priority = 0

    def auto_for(self, call):
        return False

    def run(self, call):
        d = torch.float64
        keep = dense_keep(call) if call.dropout_p > 0 else None
        out, lse = lsh_attention_reference(
            call.qk.to(d), call.value.to(d), call.buckets, chunk_size=call.chunk_size,
            chunks_before=call.chunks_before, chunks_after=call.chunks_after, causal=call.causal,
            key_padding_mask=call.key_padding_mask, scale=call.scale, dropout_p=call.dropout_p, keep=keep)
        return out.to(call.qk.dtype), lse.to(acc_dtype(call.qk.dtype))


class OpBackend(LshBackend):
    """A backend whose ``_op`` (functions.lsh_ops) takes the sorted layout."""

    def run(self, call):
        B, H, L, _ = call.qk.shape
        if call.buckets is None:    # the full-attention path: one chunk of every position
            order = torch.arange(L, device=call.qk.device).expand(B, H, 1, L).contiguous()
            chunk, before, after = L, 0, 0
        else:
            order = sorted_order(call.buckets)
            chunk, before, after = call.chunk_size, call.chunks_before, call.chunks_after
        return self._op(call.qk, call.value, order, call.key_padding_mask, chunk, before, after, call.causal,
                        call.scale, call.dropout_p, call.dropout_seed)


class TorchBackend(OpBackend):
    """The sorted, chunked form in torch ops (torch_backend.py), O(n·L·chunk·window)
    memory, as a custom-op pair with an explicit backward. The CPU default."""
    name = "torch"
    priority = 10

    _op = staticmethod(lsh_ops("torch", torch_backend.lsh_forward, torch_backend.lsh_backward))


register_backend(ReferenceBackend())
register_backend(TorchBackend())


# --------------------------------------------------------------- validation

def _check_int(name, x, low):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < low:
        raise ValueError(f"{name} must be an int >= {low}, got {x!r}")
    return int(x)


def _check_tensors(qk, value):
    for name, t in (("qk", qk), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, dims in (("qk", qk, "(B, H, L, D)"), ("value", value, "(B, H, L, Dv)")):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {dims}, got {t.dim()}-D of shape {tuple(t.shape)}")
    if qk.dtype not in _DTYPES:
        raise TypeError(f"qk must be float16, bfloat16, float32 or float64, got {qk.dtype}")
    if value.dtype != qk.dtype:
        raise TypeError(f"value has dtype {value.dtype}, expected qk's dtype {qk.dtype}")
    if value.device != qk.device:
        raise ValueError(f"value is on {value.device}, expected qk's device {qk.device}")
    (B, H, L, D), (Bv, Hv, Lv, Dv) = qk.shape, value.shape
    if Bv != B:
        raise ValueError(f"batch sizes differ: qk {B}, value {Bv}")
    if Hv != H:
        raise ValueError(f"value has {Hv} heads and qk {H}: LSH attention shares qk as query and key, so value "
                         f"needs one head per qk head (grouped-query / GQA-shaped inputs are not supported)")
    if Lv != L:
        raise ValueError(f"value's length {Lv} differs from qk's length {L}")
    for name, n in (("batch B", B), ("heads H", H), ("length L", L), ("head dim D", D), ("value's head dim Dv", Dv)):
        if n == 0:
            raise ValueError(f"{name} must be >= 1, got 0")


def _check_n_buckets(n_buckets):
    if isinstance(n_buckets, numbers.Integral) and not isinstance(n_buckets, bool):
        if n_buckets < 2 or n_buckets % 2:
            raise ValueError(f"n_buckets must be an even int >= 2 (or a list of even factors), got {n_buckets!r}")
        return int(n_buckets)
    if isinstance(n_buckets, (list, tuple)) and n_buckets:
        for f in n_buckets:
            if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 2 or f % 2:
                raise ValueError(f"n_buckets factors must be even ints >= 2, got {list(n_buckets)!r}")
        return [int(f) for f in n_buckets]
    raise ValueError(f"n_buckets must be None, an even int or a non-empty list of even ints, got {n_buckets!r}")


def _check_rotations(rotations, H, D, n_hashes, n_buckets, device):
    if not isinstance(rotations, torch.Tensor):
        raise TypeError(f"rotations must be a torch.Tensor or None, got {type(rotations).__name__}")
    if not rotations.is_floating_point():
        raise TypeError(f"rotations must be a floating-point tensor (torch.randn), got {rotations.dtype}")
    half = rotation_size(n_buckets) // 2
    if rotations.dim() != 4 or rotations.shape[0] not in (1, H) or tuple(rotations.shape[1:]) != (D, n_hashes, half):
        raise ValueError(f"rotations must be (H or 1, D, n_hashes, rotation_size / 2) = ({H} or 1, {D}, {n_hashes}, "
                         f"{half}) for n_buckets={n_buckets!r}, got shape {tuple(rotations.shape)}")
    if rotations.device != device:
        raise ValueError(f"rotations is on {rotations.device}, expected qk's device {device}")


def _check_buckets(buckets, B, H, n_hashes, L, device):
    if not isinstance(buckets, torch.Tensor):
        raise TypeError(f"buckets must be a torch.Tensor or None, got {type(buckets).__name__}")
    if buckets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"buckets must be an int64 (or int32) tensor, got {buckets.dtype}")
    if tuple(buckets.shape) != (B, H, n_hashes, L):
        raise ValueError(f"buckets must be (B, H, n_hashes, L) = {(B, H, n_hashes, L)}, got shape "
                         f"{tuple(buckets.shape)}")
    if buckets.device != device:
        raise ValueError(f"buckets is on {buckets.device}, expected qk's device {device}")


# ------------------------------------------------------------------- public

def lsh_attention(qk, value, *, n_hashes=1, n_buckets=None, chunk_size=64, chunks_before=1, chunks_after=0,
                  causal=False, key_padding_mask=None, rotations=None, buckets=None, seed=None, scale=1.0,
                  dropout_p=0.0, backend="auto", return_lse=False):
    """LSH attention (Reformer, Kitaev et al.), with Hugging Face's
    ``LSHSelfAttention`` semantics (which follow trax).

    qk (B, H, L, D) is shared: it is the query, and the keys are
    ``qk * rsqrt(mean(qk², -1) + 1e-6) / sqrt(D)``; value (B, H, L, Dv) (as many
    heads as qk: no grouped-query form). Returns out (B, H, L, Dv) in qk's dtype,
    or (out, lse) when ``return_lse``, lse (B, H, L) float32 (float64 for float64
    inputs), natural log.

    Hashing: ``rotations`` (H or 1, D, n_hashes, rotation_size / 2), rotation_size
        = n_buckets or the sum of a factorised list's factors; round r's bucket is
        argmax(cat([x R_r, -x R_r])) of the detached qk (per factor, combined as
        Hugging Face does). ``rotations=None`` draws ``torch.randn`` of that shape
        (float32, CPU) from a generator seeded by ``seed`` (torch's generator when
        None): seed=s hashes as Hugging Face with hash_seed=s. ``n_buckets`` an even
        int or a list of even factors; None: the largest power of two <=
        2·L / chunk_size (at least 2). Positions ``key_padding_mask`` drops go to an
        extra last bucket (as Hugging Face). ``buckets`` (B, H, n_hashes, L) int64
        skips hashing (only their order within a round matters: Hugging Face's
        round offsets are accepted); pass rotations or buckets, not both.
    Layout: per round, positions sorted by (bucket, position); the rounds are
        concatenated (n_hashes·L) and cut into chunks of ``chunk_size`` (L must be
        a multiple when L > chunk_size). Each chunk attends to itself,
        ``chunks_before`` previous and ``chunks_after`` next chunks, circularly (the
        first chunk of round r sees the last of round r-1); a key present twice in
        a window counts twice.
    Logits: scale·q·k; -inf where the key is masked (``key_padding_mask`` (B, L)
        bool, True = keep; causal compares original positions); the query's own
        position always has the finite logit -1e5 (it takes the weight only when
        nothing else is allowed). Softmax per round (lse_r), rounds merged by
        log-sum-exp: out = Σ_r softmax_r(lse_r) · out_r, lse = logsumexp_r lse_r.
    L <= chunk_size: Hugging Face's full-attention path, one round over every key
        (no hashing; rotations, buckets and n_hashes are not used).
    dropout_p: dropout on the probabilities by tfk's counter hash, keyed by
        (batch, head, round, query position, key position) (see ``dense_keep``),
        seeded by ``seed`` (a fresh seed from torch's generator when None).
    Gradients flow into qk (query and key roles) and value; none into rotations
    or buckets. backend: "auto" (the torch backend on CPU), "torch", "reference".
    """
    _check_tensors(qk, value)
    B, H, L, D = qk.shape
    n_hashes = _check_int("n_hashes", n_hashes, 1)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    chunks_before = _check_int("chunks_before", chunks_before, 0)
    chunks_after = _check_int("chunks_after", chunks_after, 0)
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
    check_key_padding_mask(key_padding_mask, B, L, qk.device, length="L", lead="qk")
    full = L <= chunk_size
    if not full and L % chunk_size:
        raise ValueError(f"the length L = {L} must be a multiple of chunk_size = {chunk_size} when L > chunk_size "
                         f"(pad the sequence, and mask the padding with key_padding_mask)")
    if rotations is not None and buckets is not None:
        raise ValueError("pass rotations or buckets, not both (buckets skip the hashing)")
    if n_buckets is None:
        n_buckets = default_n_buckets(L, chunk_size)
    else:
        n_buckets = _check_n_buckets(n_buckets)
    if rotations is not None:
        _check_rotations(rotations, H, D, n_hashes, n_buckets, qk.device)
    if buckets is not None:
        _check_buckets(buckets, B, H, n_hashes, L, qk.device)
    call_buckets = None
    if not full:
        if buckets is not None:
            call_buckets = buckets.to(torch.int64)
        else:
            if rotations is None:
                rotations = draw_rotations(H, D, n_hashes, n_buckets, seed).to(qk.device)
            call_buckets = hash_buckets(qk, rotations, n_buckets, key_padding_mask)
    dropout_seed = 0
    if dropout_p > 0:
        dropout_seed = int(seed) if seed is not None else drop.draw_seed()
    call = LshCall(qk, value, call_buckets, chunk_size, chunks_before, chunks_after, causal, key_padding_mask,
                   float(scale), float(dropout_p), dropout_seed, return_lse)
    out, lse = select_backend(backend, call, "lsh").run(call)
    return (out, lse) if return_lse else out
