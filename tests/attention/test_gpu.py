"""The triton and cuda backends on a real GPU: forward and gradients of every
pattern in fp16, bf16 and (triton) fp32 with tf32 dots, against the float64
reference, at a tolerance set by torch's own error in the same dtype. Skipped
without a GPU (where Triton runs under its interpreter instead,
test_attention.py, and the CUDA kernels under the host-execution layer,
test_cuda_sim.py)."""
import pytest
import torch

import tfk
from helpers import PATTERN_IDS, make_qkv, pattern_mask, patterns_for_tests
from tfk.ops.attention import attention_reference, torch_sdpa
from tolerances import FACTOR, FLOOR, max_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _grads(fn, leaves, dout):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
def test_triton_on_gpu(pattern_id, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    _check_on_gpu("triton", pattern_id, dtype, D=80)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
def test_cuda_on_gpu(pattern_id, D, dtype):
    _check_on_gpu("cuda", pattern_id, dtype, D=D)


def _check_on_gpu(backend, pattern_id, dtype, D):
    B, H, Hkv, Lq, Lk = 2, 4, 2, 1025, 777
    pattern = patterns_for_tests(H, Lq, Lk)[pattern_id]
    q, k, v, dout = make_qkv(B, H, Hkv, Lq, Lk, D)
    allowed = pattern_mask(pattern, Lq, Lk)
    ref = _grads(lambda *a: attention_reference(*a, allowed)[0], (q, k, v), dout)
    cuda = lambda t: t.to("cuda", dtype)
    mask = None if allowed is None else allowed.cuda()
    base = _grads(lambda *a: torch_sdpa(*a, attn_mask=mask, enable_gqa=True), [cuda(t) for t in (q, k, v)],
                  cuda(dout))
    got = _grads(lambda *a: tfk.attention(*a, pattern, backend=backend), [cuda(t) for t in (q, k, v)], cuda(dout))
    # tf32 dots: torch's fp32 baseline is exact, so fp32 takes the fp16-class floor
    floor = FLOOR[torch.float16 if dtype == torch.float32 else dtype]
    for name, g, b, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        err, torch_err = max_err(g.cpu(), r), max_err(b.cpu(), r)
        assert err <= FACTOR * torch_err + floor[name] * 4, f"{name}: {err:.3g} vs torch {torch_err:.3g}"
