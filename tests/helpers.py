"""Inputs, the float64 oracle and torch's same-dtype baseline for tests, the
backends under test and the dtypes each is tested in."""
import importlib
import os
import shutil
import zlib

import pytest
import torch

import tfk
from tfk.ops.attention import attention_reference, cuda_backend, torch_blocks, torch_sdpa
from tolerances import assert_close

# Every backend under test, with the dtypes it is checked in here: the
# interpreter computes bf16 wrongly (triton's bf16 is checked on a GPU), and
# the CUDA kernels take fp16 and bf16 only. The reference is the oracle, not a
# backend under test (tests/attention/test_reference.py checks it by other means).
BACKEND_DTYPES = {
    "torch": [torch.float32, torch.float16],
    "triton": [torch.float32, torch.float16],
    "cuda-sim": [torch.float16, torch.bfloat16],
}


def stable_seed(*parts):
    """A seed that is the same in every process (Python's hash() is not)."""
    return zlib.crc32(repr(parts).encode()) % 1000


def sim_missing_reason():
    """Why tfk's host extensions (tfk._sim, backend "cuda-sim"; tfk._cpu, the
    native CPU kernels) cannot exist on this machine (no C++ compiler), or
    None. Where they can exist they must import: a missing or broken build
    fails the tests that need them instead of skipping them."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build tfk._sim and tfk._cpu"
    return None


def require_backend(backend):
    """Skip only where the backend cannot exist here; fail where it should and does not."""
    if backend == "cuda-sim":
        reason = sim_missing_reason()
        if reason:
            pytest.skip(reason)
        importlib.import_module("tfk._sim")  # an ImportError here is a failure


def backend_params(names=tuple(BACKEND_DTYPES)):
    """pytest params (backend, dtype) for the named backends, with readable ids."""
    return [pytest.param(b, dt, id=f"{b}-{str(dt).split('.')[-1]}") for b in names for dt in BACKEND_DTYPES[b]]


def make_qkv(B, H, Hkv, Lq, Lk, D, Dv=None, seed=0):
    """float64 leaves q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), and dout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return r(B, H, Lq, D), r(B, Hkv, Lk, D), r(B, Hkv, Lk, Dv or D), r(B, H, Lq, Dv or D)


def forward_backward(fn, q, k, v, dout, dtype):
    """Run fn on leaves cast to dtype; returns out, lse (or None) and grads."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    res = fn(*leaves)
    out, lse = res if isinstance(res, tuple) else (res, None)
    out.backward(dout.to(dtype))
    return out.detach(), None if lse is None else lse.detach(), [t.grad for t in leaves]


def check_against_reference(tfk_fn, q, k, v, dout, dtype, allowed=None, bias=None, scale=None):
    """Compare tfk_fn (taking q, k, v in dtype) with the float64 reference, at a
    tolerance set by torch SDPA's own error in dtype. ``allowed`` (bool) and
    ``bias`` (float) broadcast to (B, H, Lq, Lk)."""
    ref = lambda q_, k_, v_: attention_reference(q_, k_, v_, allowed, bias, scale)
    r_out, r_lse, r_grads = forward_backward(ref, q, k, v, dout, torch.float64)

    mask = allowed
    if bias is not None:
        mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
    gqa = q.shape[1] != k.shape[1]
    t_fn = lambda q_, k_, v_: torch_sdpa(q_, k_, v_, attn_mask=None if mask is None else mask.to(
        q_.dtype if mask.is_floating_point() else torch.bool), scale=scale, enable_gqa=gqa)
    t_out, _, t_grads = forward_backward(t_fn, q, k, v, dout, dtype)
    t_lse = None
    if dtype != torch.float64:
        # torch exposes no lse: its error is that of a same-dtype reference
        _, t_lse, _ = forward_backward(lambda *a: attention_reference(*(x.float() for x in a), allowed, bias,
                                                                        scale), q.to(dtype), k.to(dtype),
                                       v.to(dtype), dout, torch.float32)

    out, lse, grads = forward_backward(tfk_fn, q, k, v, dout, dtype)
    assert out.dtype == dtype
    assert_close("out", out, r_out, t_out, dtype)
    if lse is not None:
        assert_close("lse", lse, r_lse, t_lse, dtype)
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, r_grads, t_grads):
        assert g is not None, f"{name}: no gradient"
        assert_close(name, g, rg, tg, dtype)


def pattern_mask(pattern, Lq, Lk):
    """The pattern's dense mask, broadcastable to (B, H, Lq, Lk)."""
    if pattern is None:
        return None
    m = pattern.dense_mask(Lq, Lk)
    return m.unsqueeze(0) if m.dim() == 3 else m


def patterns_for_tests(H, Lq, Lk):
    """Every pattern kind, compositions included, keyed by a readable id."""
    P = tfk.patterns
    g = torch.Generator().manual_seed(7)
    per_head = torch.rand(H, -(-Lq // 40), -(-Lk // 40), generator=g) < 0.4
    return {
        "dense": None,
        "causal": P.causal(),
        "causal_bottom_right": P.causal(bottom_right=True),
        "window": P.sliding_window(37, 5),
        "window_dilated": P.sliding_window(60, 10, dilation=3),
        "global_first3": P.global_tokens(3),
        "longformer": P.sliding_window(20, 20) | P.global_tokens(torch.tensor([0, 50, 96, 500])),
        "dilated_global": P.sliding_window(40, 0, dilation=2) | P.global_tokens(2),
        "strided": P.strided(16),
        "fixed": P.fixed(32, 5),
        "bigbird": P.bigbird(32, 3, 1, 2, seed=3),
        "block_layout_per_head": P.block_layout(per_head, 40),
        "strided_or_global": P.strided(9) | P.global_tokens(4),
        "causal_and_window": P.causal() & P.sliding_window(50, 50),
    }


PATTERN_IDS = list(patterns_for_tests(1, 1, 1))


# Patterns for the tile-count tests: dense, per-head, permuted layouts, unions.
VISIT_PATTERN_IDS = ["dense", "causal", "window_dilated", "longformer", "fixed", "bigbird",
                     "block_layout_per_head", "strided_or_global"]


def plan_tiles(backend, head_dim, dtype):
    """(block_q, block_k): the tiles ``backend`` compiles its plans for."""
    if backend == "triton":
        from tfk.triton_kernels import attention as kernels
        return kernels.tile_config(head_dim, dtype)
    if backend.startswith("cuda"):
        return (cuda_backend.BLOCK, cuda_backend.BLOCK)
    return (torch_blocks.BLOCK_Q, torch_blocks.BLOCK_K)


def check_backend_visits_the_plan(backend, pattern, dtype, B, H, Hkv, L, D):
    """Forward and backward on ``backend`` counting, where scores are computed,
    the tiles visited: every pass (the forward, and each backward kernel or
    the torch engine's single backward pass) visits exactly the plan's tiles,
    for every (batch, head)."""
    q, k, v, _ = make_qkv(B, H, Hkv, L, L, D)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    with tfk.backends.count_tiles() as counts:
        out, _ = tfk.attention(*leaves, pattern, backend=backend, return_lse=True)
        out.float().sum().backward()
    plan = tfk.get_plan(pattern, L, L, *plan_tiles(backend, D, dtype))
    per_call = B * (H if plan.heads == 1 else 1) * plan.num_tiles
    backward = {"torch": ["backward"]}.get(backend, ["backward_dq", "backward_dkdv"])
    assert dict(counts) == {name: per_call for name in ["forward"] + backward}, \
        f"plan: {per_call} (batch, head, tile) triples per pass"


def mask_cases(B, H, Lq, Lk):
    """attn_mask kinds keyed by id: none, bool and float (float64, to cast),
    broadcast in several ways, with a fully masked row and -inf entries."""
    g = torch.Generator().manual_seed(1)
    bool_full = torch.rand(B, H, Lq, Lk, generator=g) < 0.7
    bool_full[0, 0, 3] = False  # a fully masked row
    return {
        "none": None,
        "bool_LS": torch.rand(Lq, Lk, generator=g) < 0.6,
        "bool_B1LS": torch.rand(B, 1, Lq, Lk, generator=g) < 0.6,
        "bool_1H1S": torch.rand(1, H, 1, Lk, generator=g) < 0.8,
        "bool_full_with_empty_row": bool_full,
        "float_LS": torch.randn(Lq, Lk, generator=g, dtype=torch.float64),
        "float_with_neg_inf": torch.randn(B, 1, Lq, Lk, generator=g, dtype=torch.float64).masked_fill(
            torch.rand(B, 1, Lq, Lk, generator=g) < 0.3, float("-inf")),
    }


class CountingTimer:
    """Stands in for bench.peak.CudaTimer in the benches' GPU-mode tests on the
    CPU: runs each step once, counts the calls, reports fixed figures (2 ms,
    5 MiB)."""

    def __init__(self):
        self.calls = 0

    def time(self, fn):
        self.calls += 1
        fn()
        return 2e-3

    def peak_bytes(self, fn):
        fn()
        return 5 * 2 ** 20
