"""Backends "cuda" and "cuda-sim": the FlashAttention-2 style CUDA kernels of
csrc/attention/ (ldmatrix + mma.sync, cp.async double buffering, online
softmax) over the engine's plans.

"cuda" runs them on a GPU through tfk._C (built for sm_80 and sm_90).
"cuda-sim" runs the same sources, compiled for the host (tfk._sim), on CPU
tensors through tfk's host-execution layer: for tests and debugging, never
chosen by "auto", and slow (a 4-warp block's threads are fibers).

Both take float16 and bfloat16, head dims up to 128 (the kernels are built for
64 and 128; smaller head dims are padded with zeros), any D != Dv, GQA,
Lq != Lk, every pattern, user masks and dropout (tfk.dropout's counter hash,
the same keep mask as every backend), and the score modifiers softcap, alibi,
relative_bias and adaptive_span (tfk.scores: a softcap float and one distance
bias vector, fused in the kernels; not Transformer-XL). Tiles are 64 x 64.
"""
from __future__ import annotations

import dataclasses
import importlib

import torch
import torch.nn.functional as F

from ... import backends
from ... import dropout as drop
from ...backends import AttentionCall, Backend, register_backend
from ...plan import Plan, get_plan
from .engine import (attention_ops, backward_over_plan, delta_of, forward_over_plan, kernel_reasons, op_plan,
                     run_modified, sum_by_index)

BLOCK = 64            # kBlockM = kBlockN in csrc/attention/attention.h
HEAD_DIMS = (64, 128)  # the instantiated kernels
_DTYPES = (torch.float16, torch.bfloat16)

def _ops(device):
    """torch.ops.tfk (tfk._C) for CUDA tensors, torch.ops.tfk_sim (tfk._sim) for CPU tensors."""
    if device.type == "cuda":
        importlib.import_module("tfk._C")
        return torch.ops.tfk
    importlib.import_module("tfk._sim")
    return torch.ops.tfk_sim


def kernel_head_dim(d: int) -> int:
    """The instantiated head dim that holds ``d`` (<= 128)."""
    for h in HEAD_DIMS:
        if d <= h:
            return h
    raise ValueError(f"head dim {d} > {HEAD_DIMS[-1]}")


def _pad(x, hd):
    """x with its last dim zero-padded to hd, contiguous (zeros change no dot product)."""
    return x.contiguous() if x.shape[-1] == hd else F.pad(x, (0, hd - x.shape[-1]))


def _kernel_mask(mask, shape):
    """A (B, H, Lq, Lk) view the kernels read through strides: bool as uint8, else float32."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.expand(shape).view(torch.uint8)
    return mask.to(torch.float32).expand(shape)


_DROPOUT_ARGS = ("drop_key", "drop_threshold", "drop_scale")
_NO_DROPOUT = dict(zip(_DROPOUT_ARGS, drop.kernel_args(0, 0.0)))  # threshold 0: the kernels skip dropout


def _dropout_args(dropout_p, seed, window=drop.WHOLE):
    """The ops' drop_key, drop_threshold, drop_scale (tfk.dropout's hash), and
    drop_window: the call's place in the grid whose mask it draws."""
    if dropout_p == 0:
        return _NO_DROPOUT
    args = dict(zip(_DROPOUT_ARGS, drop.kernel_args(seed, dropout_p)))
    if window != drop.WHOLE:
        args["drop_window"] = [window.head_offset, window.heads or 0, window.q_offset, window.k_offset]
    return args


def _schedules(sp, backward):
    """The sub-pass's schedule tensors in the ops' argument order."""
    kv = (sp.kv_count, sp.kv_blocks, sp.kv_partial)
    return kv + (sp.q_count, sp.q_blocks, sp.q_partial) if backward else kv


def _subpass_options(sp):
    """The sub-pass's position predicates and dropout rounds, as the ops take them."""
    return dict(predicates=sp.predicates, drop_rounds=sp.rounds, drop_round=sp.round)


def _prepare(q, k, v, mask):
    """The kernels' head dim, the ops for q's device, the mask as they read
    it, and the tile counters the kernels fill (forward, dQ, dK/dV), None
    unless a tfk.backends.count_tiles() block is open."""
    hd = kernel_head_dim(max(q.shape[-1], v.shape[-1]))
    m = None if mask is None else _kernel_mask(mask, (*q.shape[:3], k.shape[2]))
    tiles = torch.zeros(3, dtype=torch.int32, device=q.device) if backends.counting_tiles() else None
    return hd, _ops(q.device), m, tiles


def _count(tiles):
    if tiles is not None:
        backends.add_kernel_tiles(tiles)


def _mod_args(mods, q, k):
    """The ops' softcap, bias and bias_offset for ``mods`` (tfk.scores.Fused
    or None): the bias (H, Lq + Lk - 1) as float32, natural units (the
    kernels take it to base 2), entry j - i + Lq - 1."""
    if mods is None:
        return {}
    if mods.qv is not None or mods.r is not None:
        raise NotImplementedError("cuda: Transformer-XL's relative term is not fused in these kernels "
                                  "(backend='torch' runs it)")
    args = {}
    if mods.softcap:
        args["softcap"] = float(mods.softcap)
    if mods.bias is not None:
        Lq, Lk = q.shape[2], k.shape[2]
        if tuple(mods.bias.shape) != (q.shape[1], Lq + Lk - 1):
            raise ValueError(f"cuda: the distance bias must be (H, Lq + Lk - 1) = ({q.shape[1]}, {Lq + Lk - 1}), "
                             f"got {tuple(mods.bias.shape)}")
        args["bias"] = mods.bias.detach().to(device=q.device, dtype=torch.float32).contiguous()
        args["bias_offset"] = Lq - 1
    return args


DIAGONALS = 2 * BLOCK - 1   # kDiagonals: a tile's diagonals, the per-tile bias gradient in natural order


def _dbias_buffers(sp, B, H, lq, device):
    """The dQ kernel's bias-gradient shares for sub-pass ``sp`` (zero-filled:
    unvisited slots add 0), one slot per (batch, head, query block, kv
    schedule entry): (values, index, diagonal). In natural order (sp.q_index,
    sp.kv_index None) a tile's diagonals are distances: DIAGONALS sums and one
    base index per slot; in a permuted layout a value and an index per
    element of the tile (BLOCK * BLOCK per slot)."""
    slots = B * H * -(-lq // BLOCK) * sp.kv_blocks.shape[-1]
    diagonal = sp.q_index is None and sp.kv_index is None
    values = torch.zeros(slots * (DIAGONALS if diagonal else BLOCK * BLOCK), dtype=torch.float32, device=device)
    index = torch.zeros(slots if diagonal else slots * BLOCK * BLOCK, dtype=torch.int32, device=device)
    return values, index, diagonal


def _share_indices(index, diagonal, n):
    """Flat int64 indices into the (H * (Lq + Lk - 1)) bias of one sub-pass's
    shares: per element as given, or per tile its base + 0 .. DIAGONALS - 1,
    clamped into range (diagonals outside the head's row hold no pair: 0)."""
    if not diagonal:
        return index.long()
    steps = torch.arange(DIAGONALS, dtype=torch.long, device=index.device)
    return (index.long()[:, None] + steps).clamp_(0, n - 1).view(-1)


def attention_forward(q, k, v, plan, mask, scale, dropout_p=0.0, seed=0, window=drop.WHOLE, mods=None):
    """out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32 over ``plan``
    (64 x 64 tiles). q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv);
    mask None, or bool/float broadcastable to (B, H, Lq, Lk); dropout on the
    probabilities with ``seed`` (tfk.dropout), drawing ``window`` of a larger call's mask;
    ``mods`` (tfk.scores.Fused, not Transformer-XL): softcap and the distance bias."""
    hd, ops, m, tiles = _prepare(q, k, v, mask)
    dropout = _dropout_args(dropout_p, seed, window)
    mod_args = _mod_args(mods, q, k)

    def run(sp, q_l, k_l, v_l, o, l):
        ops.attention_fwd_(q_l, k_l, v_l, m, sp.q_index, sp.kv_index, *_schedules(sp, False),
                           sp.partial_masks.view(torch.uint8), scale, o, l, **dropout, tiles=tiles,
                           **_subpass_options(sp), **mod_args)

    out, lse = forward_over_plan(plan, _pad(q, hd), _pad(k, hd), _pad(v, hd), hd, run)
    _count(tiles)
    Dv = v.shape[-1]
    return (out if Dv == hd else out[..., :Dv].contiguous()), lse


def attention_backward(dout, dlse, q, k, v, out, lse, plan, mask, scale, dropout_p=0.0, seed=0, window=drop.WHOLE,
                       mods=None):
    """dq, dk, dv for ``attention_forward``'s result, given dout and lse's
    gradient dlse. With ``mods`` (tfk.scores.Fused) also their gradients
    (d qv, d r, d bias): d qv and d r None (no Transformer-XL here), d bias
    (H, Lq + Lk - 1) float32 (None without a bias), summed on the host in a
    fixed order from the dQ kernel's shares of every sub-pass (per tile
    diagonal in natural order, per element in a permuted layout)."""
    hd, ops, m, tiles = _prepare(q, k, v, mask)
    dropout = _dropout_args(dropout_p, seed, window)
    mod_args = _mod_args(mods, q, k)
    shares = []   # (values, indices, diagonal) of the bias's gradient, per sub-pass

    def run(sp, q_l, k_l, v_l, do_l, lse_l, delta_l, dq_l, dk_l, dv_l):
        extra = {}
        if "bias" in mod_args:
            B, H, lq = q_l.shape[:3]
            values, index, diagonal = _dbias_buffers(sp, B, H, lq, q_l.device)
            extra = {"dbias": values, "dbias_index": index, "dbias_diagonal": diagonal}
            shares.append((values, index, diagonal))
        ops.attention_bwd_(do_l, q_l, k_l, v_l, lse_l, delta_l, m, sp.q_index, sp.kv_index,
                           *_schedules(sp, True), sp.partial_masks.view(torch.uint8), scale, dq_l, dk_l, dv_l,
                           **dropout, tiles=tiles, **_subpass_options(sp), **mod_args, **extra)

    dq, dk, dv = backward_over_plan(plan, _pad(q, hd), _pad(k, hd), _pad(v, hd), _pad(dout, hd), lse,
                                    delta_of(out, dout, dlse), run)
    _count(tiles)
    D, Dv = q.shape[-1], v.shape[-1]
    grads = dq[..., :D].to(q.dtype), dk[..., :D].to(k.dtype), dv[..., :Dv].to(v.dtype)
    if mods is None:
        return grads
    dbias = None
    if "bias" in mod_args:
        H, nbias = mod_args["bias"].shape
        if shares:
            values = torch.cat([x for x, _, _ in shares])
            index = torch.cat([_share_indices(i, d, H * nbias) for _, i, d in shares])
            dbias = sum_by_index(values, index, H * nbias).view(H, nbias)
        else:   # no tile visited
            dbias = torch.zeros(H, nbias, dtype=torch.float32, device=q.device)
    return grads + ((None, None, dbias),)


# out (B, H, Lq, Dv) in q's dtype and lse (B, H, Lq) float32; dq, dk, dv.
attention_fwd = attention_ops("cuda_attention", attention_forward, attention_backward)


class CudaBackend(Backend):
    """The CUDA kernels on a GPU (tfk._C)."""
    name = "cuda"
    # Below "triton" under "auto" until the kernels are measured on a GPU.
    priority = 15
    module = "_C"
    # fused in the kernels: a softcap float and the distance bias (alibi,
    # relative_bias, adaptive_span summed); Transformer-XL is refused
    score_mods = frozenset({"softcap", "alibi", "relative_bias", "adaptive_span"})

    def reasons(self, call):
        q = call.q
        why = backends.cuda_kernel_reasons(self.module, q)
        if q.dtype not in _DTYPES:
            why.append(f"dtype {q.dtype} (supports float16, bfloat16)")
        return why + kernel_reasons(call, HEAD_DIMS[-1])

    def auto_for(self, call):
        return call.q.is_cuda

    def run(self, call: AttentionCall):
        q, k, v = call.q.contiguous(), call.k.contiguous(), call.v.contiguous()
        plan = op_plan(call.pattern, q.shape[2], k.shape[2], BLOCK, BLOCK, q.device)
        seed = drop.draw_seed() if call.dropout_p > 0 else 0
        if call.score_mod:
            if not isinstance(plan, Plan):   # under torch.compile op_plan gives an id: run_modified takes a Plan
                plan = get_plan(call.pattern, q.shape[2], k.shape[2], BLOCK, BLOCK, q.device)
            return run_modified(dataclasses.replace(call, q=q, k=k, v=v), plan, attention_forward,
                                attention_backward, seed)
        return attention_fwd(q, k, v, call.attn_mask, plan, call.scale, call.dropout_p, seed)

    def block_functions(self, call):
        return (BLOCK, BLOCK), attention_forward, attention_backward


class CudaSimBackend(CudaBackend):
    """The same kernels on CPU tensors through the host-execution layer (tfk._sim)."""
    name = "cuda-sim"
    priority = 0
    module = "_sim"

    def auto_for(self, call):
        return False


register_backend(CudaBackend())
register_backend(CudaSimBackend())
