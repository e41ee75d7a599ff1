"""LSH attention's kernel backends on a real GPU: backend "triton" in fp16,
bf16 and fp32 (tf32 dots), "cuda" in fp16 and bf16, head dims 64 and 128,
forward, lse and gradients against the float64 reference at torch's own
error in the dtype (tests/lsh/lsh_cases.py), and the tiles each kernel
visits. Skipped without a GPU (there Triton runs in its interpreter,
test_lsh_kernels.py, and the CUDA kernels on the host, test_lsh_cuda_sim.py)."""
import pytest
import torch

import tfk
from lsh_cases import Case, check_case, make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {
    "d64-n4-causal-mask": Case(B=2, H=2, L=512, D=64, n_hashes=4, chunk_size=64, causal=True, mask=True,
                               n_buckets=8),
    "d128-n2-after1": Case(B=1, H=3, L=384, D=128, n_hashes=2, chunk_size=64, after=1, n_buckets=6),
    "d80-dv48-one-pass": Case(B=2, H=2, L=61, D=80, Dv=48, chunk_size=64, causal=True, mask=True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_triton_on_gpu(name, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    # tf32 dots: torch's float32 baseline is exact, so float32 takes float16's floor
    check_case(CASES[name], dtype, "triton", device="cuda",
               floor_dtype=torch.float16 if dtype == torch.float32 else None)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_on_gpu(name, dtype):
    check_case(CASES[name], dtype, "cuda", device="cuda")


def test_cuda_visits_exactly_the_band():
    c = CASES["d64-n4-causal-mask"]
    qk, v, mask, buckets, _ = make_inputs(c)
    qk, v = qk.to("cuda", torch.float16).requires_grad_(), v.to("cuda", torch.float16).requires_grad_()
    with tfk.backends.count_tiles() as counts:
        out = tfk.lsh_attention(qk, v, n_hashes=c.n_hashes, chunk_size=64, causal=True, key_padding_mask=mask.cuda(),
                                buckets=buckets.cuda(), backend="cuda")
        out.float().sum().backward()
    want = c.B * c.H * c.n_hashes * c.L // 64 * (1 + c.before + c.after)
    assert dict(counts) == {"forward": want, "backward_dq": want, "backward_dkdv": want}
