"""tfk.attention_varlen on a GPU: backends "triton" and "cuda" against the
per-sequence float64 reference in fp16 and bf16, forward and backward, and
the kernels' tiles equal to the sum of each sequence's plan. Skipped without
a CUDA GPU (none here: they run where one is)."""
import pytest
import torch

import tfk
from tfk import patterns as P
from tfk.ops.attention.varlen import varlen_reference
from helpers import plan_tiles
from test_varlen import SEQLENS_K, SEQLENS_Q, cu, packed_inputs, run, torch_same_dtype
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("pattern", [P.causal(), P.sliding_window(8, 0, dilation=2) | P.global_tokens(2)],
                         ids=["causal", "dilated_global"])
def test_gpu_varlen_matches_reference(pattern, backend, dtype):
    q, k, v, dout = packed_inputs(4, 2, 64, 64, 3)
    r_out, r_lse, r_grads = run(lambda *x: varlen_reference(*x, SEQLENS_Q, SEQLENS_K, pattern), q, k, v, dout,
                                torch.float64)
    t_out, t_lse, t_grads = torch_same_dtype(q, k, v, pattern, dtype, dout)

    def on_gpu(q_, k_, v_):
        out, lse = tfk.attention_varlen(q_.cuda(), k_.cuda(), v_.cuda(), cu(SEQLENS_Q).cuda(), cu(SEQLENS_K).cuda(),
                                        max(SEQLENS_Q), max(SEQLENS_K), pattern, backend=backend, return_lse=True)
        return out.cpu(), lse.cpu()
    out, lse, grads = run(on_gpu, q, k, v, dout, dtype)
    assert_close("out", out, r_out, t_out, dtype)
    assert_close("lse", lse, r_lse, t_lse, dtype)
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, r_grads, t_grads):
        assert_close(name, g, rg, tg, dtype)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_tiles_are_the_sum_of_each_sequences_plan(backend):
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(0, 300, (1000,), generator=g).tolist()
    q = torch.randn(sum(lens), 2, 64, dtype=torch.float16, device="cuda", requires_grad=True)
    with tfk.backends.count_tiles() as counts:
        out = tfk.attention_varlen(q, q, q, cu(lens).cuda(), cu(lens).cuda(), max(lens), max(lens), P.causal(),
                                   backend=backend)
        out.float().sum().backward()
    tiles = plan_tiles(backend, 64, torch.float16)
    per_sequence = sum(tfk.plan.compile_plan(P.causal(), n, n, *tiles).num_tiles for n in lens if n)
    assert dict(counts) == {name: 2 * per_sequence for name in ("forward", "backward_dq", "backward_dkdv")}
