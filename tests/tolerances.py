"""Tolerances relative to torch's own error in the same dtype.

A result passes when, against a float64 reference,

    err(tfk) <= FACTOR * err(torch in the same dtype) + FLOOR[dtype][output]

with err the max absolute difference (flash-attention's rule). The floor
covers rounding where torch happens to be exact.
"""
import torch

FACTOR = 2.0
FLOOR = {
    torch.float64: dict(out=1e-12, lse=1e-12, dq=1e-12, dk=1e-12, dv=1e-12),
    torch.float32: dict(out=1e-6, lse=1e-6, dq=4e-6, dk=4e-6, dv=4e-6),
    torch.float16: dict(out=1e-3, lse=1e-4, dq=2e-3, dk=2e-3, dv=2e-3),
    torch.bfloat16: dict(out=8e-3, lse=1e-3, dq=1.6e-2, dk=1.6e-2, dv=1.6e-2),
}


def max_err(x, ref):
    x = x.detach().double()
    ref = ref.detach().double()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    d = torch.where(both_inf, torch.zeros_like(x), (x - ref).abs())
    return float(d.max()) if d.numel() else 0.0


def assert_close(name, got, ref, torch_lowp, dtype):
    """``ref`` is the float64 reference, ``torch_lowp`` torch's result in ``dtype``."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the result (unwritten or broken element)"
    err = max_err(got, ref)
    base = max_err(torch_lowp, ref) if torch_lowp is not None else 0.0
    bound = FACTOR * base + FLOOR[dtype][name]
    assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g} (torch's err in {dtype}: {base:.3g})"
