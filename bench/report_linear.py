"""The report's linear-attention section: tfk.linear_attention at moderate,
odd sizes (causal and not, every named feature map, GQA, key padding, an
initial state), against the float64 quadratic form
(tfk/ops/linear/reference.py), with its time. Run by ``python -m bench.report``;
checked and formatted as the MoE rows (bench/report_moe.py): "err grads" is
the largest error over the gradients of query, key, value and, where given,
the initial state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import tfk
from tfk.ops.linear.reference import linear_attention_reference

from . import report_moe


@dataclass(frozen=True)
class LinearOp:
    name: str
    B: int
    H: int
    Hkv: int
    L: int
    D: int
    Dv: int
    causal: bool = True
    feature_map: str = "elu1"
    normalize: bool = True
    padding: bool = False   # a key_padding_mask with some keys off
    state: bool = False     # an initial state (differentiated too)

    def describe(self):
        extras = [self.feature_map, "causal" if self.causal else "non-causal",
                  "" if self.normalize else "unnormalised", "key padding" if self.padding else "",
                  "initial state" if self.state else ""]
        return (f"linear_attention(B={self.B}, H={self.H}, Hkv={self.Hkv}, L={self.L}, D={self.D}, "
                f"Dv={self.Dv}, {', '.join(e for e in extras if e)})")


OPS = [
    LinearOp("linear_causal_elu1", 2, 4, 2, 1025, 64, 64),
    LinearOp("linear_causal_state", 1, 4, 1, 301, 40, 48, feature_map="relu", state=True),
    LinearOp("linear_noncausal_identity", 2, 4, 4, 513, 64, 32, causal=False, feature_map="identity",
             normalize=False),
    LinearOp("linear_noncausal_softmax", 2, 4, 2, 777, 80, 64, causal=False, feature_map="softmax", padding=True),
]


def _case(op, device):
    """(leaves in float64, fn(*leaves, backend=) -> out, ref(*leaves) -> out)."""
    g = torch.Generator().manual_seed(sum(map(ord, op.name)))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    leaves = [r(op.B, op.H, op.L, op.D), r(op.B, op.Hkv, op.L, op.D), r(op.B, op.Hkv, op.L, op.Dv)]
    if op.state:   # a state as a prefix would leave it: sums of nonnegative features
        leaves += [r(op.B, op.Hkv, op.D, op.Dv), r(op.B, op.Hkv, op.D).abs() * 8]
    mask = None
    if op.padding:
        mask = torch.rand(op.B, op.L, generator=g) > 0.2
        mask[:, 0] = True
        mask = mask.to(device)
    kw = dict(causal=op.causal, feature_map=op.feature_map, normalize=op.normalize, scale=op.D ** -0.5,
              key_padding_mask=mask)

    def split(xs):
        q, k, v, *state = xs
        return q, k, v, (tuple(s.to(torch.float64 if q.dtype == torch.float64 else torch.float32) for s in state)
                         or None)

    def fn(*xs, backend):
        q, k, v, state = split(xs)
        return tfk.linear_attention(q, k, v, initial_state=state, backend=backend, **kw)

    def ref(*xs):
        q, k, v, state = split(xs)
        return linear_attention_reference(q, k, v, initial_state=state, **kw)[0]

    return [t.to(device) for t in leaves], fn, ref


def check_all(ops, device, dtypes, **kw):
    return report_moe.check_all(ops, device, dtypes, case=_case, **kw)
