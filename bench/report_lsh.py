"""The report's LSH-attention section: tfk.lsh_attention at small, odd sizes
(causal and not, key padding, several hashes, a factorised n_buckets, a wide
window, the full-attention path L <= chunk_size) against the float64
reference (tfk/ops/lsh/reference.py: dense per round), with its time. Run by
``python -m bench.report``; checked and formatted as the MoE rows
(bench/report_moe.py): "err grads" is the larger error of the gradients of qk
and value. The buckets are hashed once, from the float64 qk with fixed
rotations, and given to both sides (the layout is then the same whatever the
dtype's rounding does to the argmax). The ops the CUDA attention kernels
take (chunks of 64, or the full-attention path; head dims up to 128) also
run on cuda-sim (fp16, bf16).

The causal op hashes once (n_hashes=1): under causal masking position 0
(at least) attends to itself only, in every round, and with n >= 2 rounds
its lse, -1e5 + log n, is held by float32 to 2^-7, so the definition
evaluated in float32 (tfk's and Hugging Face's alike) is off by ~3e-3 in that
row, beyond the report's fixed float32 tolerance. tests/lsh/ check those cases
against the formula in float32 (tests/tolerances.py's rule).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import tfk
from tfk.ops.lsh import draw_rotations, hash_buckets, lsh_attention_reference

from . import report_moe


@dataclass(frozen=True)
class LshOp:
    name: str
    B: int
    H: int
    L: int
    D: int
    Dv: int
    n_hashes: int
    chunk: int
    n_buckets: object = 4
    before: int = 1
    after: int = 0
    causal: bool = True
    padding: bool = False   # a key_padding_mask with some keys off

    def describe(self):
        extras = ["causal" if self.causal else "non-causal", "key padding" if self.padding else "",
                  "full-attention path" if self.L <= self.chunk else ""]
        return (f"lsh_attention(B={self.B}, H={self.H}, L={self.L}, D={self.D}, Dv={self.Dv}, "
                f"n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, chunk={self.chunk}, "
                f"before={self.before}, after={self.after}, {', '.join(e for e in extras if e)})")


OPS = [
    LshOp("lsh_causal_pad_n1", 2, 3, 320, 64, 64, 1, 32, n_buckets=8, causal=True, padding=True),  # module doc
    LshOp("lsh_noncausal_n2_after1", 1, 2, 384, 40, 24, 2, 64, n_buckets=[2, 4], before=2, after=1, causal=False),
    LshOp("lsh_noncausal_pad_n4", 2, 2, 256, 64, 64, 4, 32, n_buckets=8, causal=False, padding=True),
    LshOp("lsh_full_path_pad", 2, 2, 57, 72, 40, 2, 64, causal=True, padding=True),
]


def cuda_kernels_take(op):
    """Whether the CUDA kernels (64 x 64 tiles, head dims up to 128) run op."""
    return (op.L <= op.chunk or op.chunk % 64 == 0) and max(op.D, op.Dv) <= 128


def _case(op, device):
    """(leaves in float64, fn(*leaves, backend=) -> out, ref(*leaves) -> out)."""
    g = torch.Generator().manual_seed(sum(map(ord, op.name)))
    qk = torch.randn(op.B, op.H, op.L, op.D, generator=g, dtype=torch.float64)
    v = torch.randn(op.B, op.H, op.L, op.Dv, generator=g, dtype=torch.float64)
    mask = None
    if op.padding:
        mask = torch.rand(op.B, op.L, generator=g) > 0.15
        mask[:, 0] = True
        mask = mask.to(device)
    qk, v = qk.to(device), v.to(device)
    buckets = None
    if op.L > op.chunk:
        R = draw_rotations(op.H, op.D, op.n_hashes, op.n_buckets, seed=sum(map(ord, op.name)))
        buckets = hash_buckets(qk, R.to(device), op.n_buckets, mask)
    kw = dict(chunk_size=op.chunk, chunks_before=op.before, chunks_after=op.after, causal=op.causal,
              key_padding_mask=mask)

    def fn(qk, v, backend):
        return tfk.lsh_attention(qk, v, n_hashes=op.n_hashes, buckets=buckets, backend=backend, **kw)

    def ref(qk, v):
        # half precision (the GPU rows' tolerance baseline): the formula in float32 on the rounded inputs,
        # out rounded back, as tests/lsh/lsh_cases.py's baseline (-1e5, the self logit, overflows float16)
        if qk.dtype in (torch.float16, torch.bfloat16):
            return lsh_attention_reference(qk.float(), v.float(), buckets, **kw)[0].to(qk.dtype)
        return lsh_attention_reference(qk, v, buckets, **kw)[0]

    return [qk, v], fn, ref


def check_all(ops, device, dtypes, **kw):
    return report_moe.check_all(ops, device, dtypes, case=_case, **kw)
