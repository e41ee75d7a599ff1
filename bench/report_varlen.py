"""The report's packed-sequence section: tfk.attention_varlen on small packed
batches (mixed and empty documents, GQA, queries and keys of different
lengths, patterns with layouts) against the float64 reference
(tfk/ops/attention/varlen.py ``varlen_reference``: a loop over documents of
dense masked attention), with its time. Run by ``python -m bench.report``;
checked and formatted as the MoE rows (bench/report_moe.py): "err grads" is
the largest error over the gradients of query, key and value. The ops with
head dims up to 128 also run on cuda-sim (fp16, bf16)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import tfk
from tfk import patterns as P
from tfk.ops.attention.varlen import varlen_reference

from . import report_moe


@dataclass(frozen=True)
class VarlenOp:
    name: str
    lens_q: tuple
    lens_k: tuple
    H: int
    Hkv: int
    D: int
    Dv: int
    pattern: object = None

    def describe(self):
        return (f"attention_varlen({len(self.lens_q)} docs, {sum(self.lens_q)} queries, {sum(self.lens_k)} keys, "
                f"H={self.H}, Hkv={self.Hkv}, D={self.D}, Dv={self.Dv}, {self.pattern!r})")


_MIXED = (37, 0, 130, 1, 64, 77, 200, 9)
OPS = [
    VarlenOp("varlen_causal_gqa", _MIXED, _MIXED, 4, 2, 64, 64, P.causal()),
    VarlenOp("varlen_dilated_global", _MIXED, _MIXED, 2, 2, 48, 32, P.sliding_window(24, 0, dilation=2)
             | P.global_tokens(3)),
    VarlenOp("varlen_dense_q_ne_k", (5, 70, 0, 33), (9, 64, 12, 40), 2, 1, 32, 40, P.causal(bottom_right=True)),
]


def _cu(lens, device):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _case(op, device):
    """(leaves in float64, fn(*leaves, backend=) -> out, ref(*leaves) -> out)."""
    g = torch.Generator().manual_seed(sum(map(ord, op.name)))
    q = torch.randn(sum(op.lens_q), op.H, op.D, generator=g, dtype=torch.float64)
    k = torch.randn(sum(op.lens_k), op.Hkv, op.D, generator=g, dtype=torch.float64)
    v = torch.randn(sum(op.lens_k), op.Hkv, op.Dv, generator=g, dtype=torch.float64)
    cu_q, cu_k = _cu(op.lens_q, device), _cu(op.lens_k, device)

    def fn(q, k, v, backend):
        return tfk.attention_varlen(q, k, v, cu_q, cu_k, max(op.lens_q), max(op.lens_k), op.pattern,
                                    backend=backend)

    def ref(q, k, v):
        return varlen_reference(q, k, v, op.lens_q, op.lens_k, op.pattern)[0]

    return [t.to(device) for t in (q, k, v)], fn, ref


def cuda_kernels_take(op):
    return max(op.D, op.Dv) <= 128


def check_all(ops, device, dtypes, **kw):
    return report_moe.check_all(ops, device, dtypes, case=_case, **kw)
