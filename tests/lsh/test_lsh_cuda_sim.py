"""LSH attention on the CUDA flash-attention kernels (csrc/attention/), run by
the host-execution layer (backend "cuda-sim"): forward, lse and gradients
against the float64 reference in fp16 and bf16, the tiles the kernels visit,
dropout given its keep mask, and the refusals that send other calls
elsewhere. The kernels' tiles are 64 x 64: chunk sizes are multiples of 64."""
import pytest
import torch

import tfk
from tfk.ops.lsh import dense_keep, lsh_attention_reference
from tfk.ops.lsh.api import LshCall
from tfk.ops.lsh.kernel_backends import CudaSimBackend
from helpers import require_backend
from lsh_cases import Case, check_case, make_inputs

SIM = "cuda-sim"

CASES = {
    "n2-causal-mask-d64": Case(B=2, H=1, L=128, D=64, n_hashes=2, chunk_size=64, causal=True, mask=True),
    "n1-wrap-both-sides-d40-dv72": Case(B=1, H=2, L=192, D=40, Dv=72, n_hashes=1, chunk_size=64, before=1,
                                        after=1, n_buckets=6),
    "one-pass-L<chunk": Case(B=1, H=2, L=50, D=64, chunk_size=64, causal=True, mask=True),
}


@pytest.fixture(autouse=True)
def _sim_exists():
    require_backend(SIM)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_sim_matches_reference(name, dtype):
    check_case(CASES[name], dtype, SIM)


def test_kernels_visit_exactly_the_band():
    """64-wide tiles are the chunk: n·L/64 · (1 + before + after) tiles per
    (batch, head) in each pass."""
    c = CASES["n2-causal-mask-d64"]
    qk, v, mask, buckets, _ = make_inputs(c)
    qk, v = qk.half().requires_grad_(), v.half().requires_grad_()
    with tfk.backends.count_tiles() as counts:
        out = tfk.lsh_attention(qk, v, n_hashes=2, chunk_size=64, causal=True, key_padding_mask=mask,
                                buckets=buckets, backend=SIM)
        out.float().sum().backward()
    want = c.B * c.H * c.n_hashes * c.L // 64 * (1 + c.before + c.after)
    assert dict(counts) == {"forward": want, "backward_dq": want, "backward_dkdv": want}


def test_dropout_matches_reference_given_its_keep_mask():
    c = Case(B=1, H=1, L=128, D=64, n_hashes=2, chunk_size=64, causal=True, mask=True)
    qk, v, mask, buckets, (dout, dlse) = make_inputs(c)
    call = LshCall(qk, v, buckets, 64, 1, 0, True, mask, 1.0, 0.25, 5, True)
    ref_q, ref_v = qk.clone().requires_grad_(), v.clone().requires_grad_()
    want = lsh_attention_reference(ref_q, ref_v, buckets, chunk_size=64, causal=True, key_padding_mask=mask,
                                   dropout_p=0.25, keep=dense_keep(call))
    want_grads = torch.autograd.grad((want[0] * dout).sum() + (want[1] * dlse).sum(), (ref_q, ref_v))
    q, vv = qk.half().requires_grad_(), v.half().requires_grad_()
    out, lse = tfk.lsh_attention(q, vv, n_hashes=2, chunk_size=64, causal=True, key_padding_mask=mask,
                                 buckets=buckets, dropout_p=0.25, seed=5, backend=SIM, return_lse=True)
    grads = torch.autograd.grad((out.double() * dout).sum() + (lse.double() * dlse).sum(), (q, vv))
    # fp16 inputs: the bound is a few fp16 steps of the outputs' scale
    want = tuple(t.detach() for t in want)
    for name, a, b in zip(("out", "lse", "dqk", "dv"), (out, lse) + grads, want + want_grads):
        assert (a.double() - b).abs().max() < 2e-2 * max(1.0, float(b.abs().max())), name
    no_drop = tfk.lsh_attention(q.detach(), vv.detach(), n_hashes=2, chunk_size=64, causal=True,
                                key_padding_mask=mask, buckets=buckets, backend=SIM)
    assert (no_drop.double() - want[0]).abs().max() > 0.1


def test_refusals_name_what_to_change():
    qk = torch.randn(1, 1, 64, 16, dtype=torch.float16)
    call = LshCall(qk, qk, torch.zeros(1, 1, 1, 64, dtype=torch.int64), 32, 1, 0, False, None, 1.0, 0.0, 0, False)
    assert any("multiple of 64" in w for w in CudaSimBackend().reasons(call))
    big = torch.randn(1, 1, 128, 160, dtype=torch.float16)
    call = LshCall(big, big, torch.zeros(1, 1, 1, 128, dtype=torch.int64), 64, 1, 0, False, None, 1.0, 0.0, 0,
                   False)
    assert any("head dim 160 > 128" in w for w in CudaSimBackend().reasons(call))
    with pytest.raises(tfk.backends.BackendUnavailable, match="float16, bfloat16"):
        tfk.lsh_attention(qk.float(), qk.float(), chunk_size=64, backend=SIM)
