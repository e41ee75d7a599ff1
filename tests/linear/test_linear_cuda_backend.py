"""tfk.linear_attention's "cuda-sim" backend (the CUDA kernels of csrc/linear/
run on CPU tensors by the host-execution layer, with torch_backend.py's host
side) against the float64 reference: fp32, fp16 and bf16, causal and not,
every feature map, normalize on and off, GQA, key padding, initial and
returned state with their gradients, odd sizes and 256-wide heads; every
output starts as NaN (tests/conftest.py); state carry-over; the custom ops
(opcheck, torch.compile); the refusals of "cuda" and "cuda-sim"."""
import pytest
import torch

import tfk
from tfk.backends import BackendUnavailable, import_error
import linear_cases
from linear_cases import Case, check_case, check_pieces_equal_one_call

pytestmark = pytest.mark.skipif(import_error("_sim") is not None,
                                reason="tfk._sim (the CUDA kernels built for the host) is not built")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]

# Small B and H: the host-execution layer runs a block's threads as fibers.
# The kernels' chunk is 32 positions, their value tile 64 columns.
CASES = {
    "causal_elu1_gqa_mask_state_D40_Dv24": Case(B=1, H=4, Hkv=2, L=71, D=40, Dv=24, mask=True, state=True),
    "causal_relu_unnormalised_scale_state": Case(B=1, H=2, Hkv=2, L=33, feature_map="relu", normalize=False,
                                                  scale=0.5, state=True),
    "causal_identity_positive_eps_Dv80": Case(B=1, H=2, Hkv=1, L=40, D=24, Dv=80, feature_map="identity",
                                              inputs="positive", eps=1e-3, mask=True),
    "causal_L1_decode_gqa_D80": Case(B=1, H=4, Hkv=2, L=1, D=80, state=True),
    "noncausal_elu1_L40_S63_gqa_mask_state": Case(B=2, H=4, Hkv=2, L=40, S=63, causal=False, mask=True,
                                                  state=True),
    "noncausal_softmax_gqa_mask_scale": Case(B=2, H=4, Hkv=2, L=33, S=40, causal=False, feature_map="softmax",
                                             mask=True, scale=2.0),
}


def _large_logits(make_inputs):
    """make_inputs with q and k ~ 80 +- 30 (0.5 N(0, 1) * 60 + 80): exp overflows
    float32 past 88.7 unless the softmax subtracts its max first."""
    def make(c, seed=0):
        q, k, *rest = make_inputs(c, seed)
        return (80 + 60 * q, 80 + 60 * k, *rest)
    return make


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_large_logits_all_masked_row(dtype, monkeypatch):
    """The softmax map in the kernels on logits ~ 80 +- 30, with key padding and
    batch row 1 entirely masked (Case.mask, non-causal), odd D and S, L = 37."""
    monkeypatch.setattr(linear_cases, "make_inputs", _large_logits(linear_cases.make_inputs))
    c = Case(B=2, H=4, Hkv=2, L=37, S=45, D=40, Dv=24, causal=False, feature_map="softmax", mask=True, scale=0.5)
    with tfk.backends.record_choices() as names:
        check_case(c, dtype, backend="cuda-sim")
    assert set(names) == {"cuda-sim"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    with tfk.backends.record_choices() as names:
        check_case(CASES[case], dtype, backend="cuda-sim")
    assert set(names) == {"cuda-sim"}


def test_wide_heads():
    """D = Dv = 256 (E = 257 value columns: five tiles, the largest shared memory)."""
    check_case(Case(B=1, H=1, Hkv=1, L=35, D=256, state=True), torch.float16, backend="cuda-sim")


def test_callable_feature_map():
    """A callable map runs in torch before the kernels (D' = 2 D here)."""
    fm = lambda x: torch.cat([x.relu(), (-x).relu()], -1)  # noqa: E731
    check_case(Case(B=1, H=2, Hkv=1, L=37, D=16, feature_map=fm, state=True), torch.float32, backend="cuda-sim")


def test_causal_chunks_then_decode_equal_one_call():
    """A prompt in two pieces (one spanning a chunk boundary), then decode steps
    of L = 1 passing the last state: everything equals one call's, on this backend."""
    check_pieces_equal_one_call("cuda-sim", 1, 4, 2, 75, 24, 16,
                                [(0, 20), (20, 72)] + [(i, i + 1) for i in range(72, 75)])


def _op_args(causal, fm, mask, state):
    g = torch.Generator().manual_seed(1)
    L, S = (40, 40) if causal else (24, 40)
    q, k, v = 0.5 * torch.randn(2, 4, L, 8, generator=g), 0.5 * torch.randn(2, 2, S, 8, generator=g), \
        torch.randn(2, 2, S, 6, generator=g)
    m = torch.rand(2, S, generator=g) < 0.8 if mask else None
    kv0, z0 = (torch.randn(2, 2, 8, 6, generator=g), torch.rand(2, 2, 8, generator=g)) if state else (None, None)
    ts = [t.requires_grad_() if t is not None else None for t in (q, k, v, kv0, z0)]
    return (ts[0], ts[1], ts[2], m, ts[3], ts[4], fm, causal, True, 1e-6, 0.5)


@pytest.mark.parametrize("causal,fm,mask,state", [(True, "elu1", True, True), (False, "softmax", True, False)])
def test_opcheck(causal, fm, mask, state):
    op = tfk.backends.get_backend("cuda-sim", "linear")._op.op
    torch.library.opcheck(op, _op_args(causal, fm, mask, state))


def test_torch_compile_fullgraph():
    q, k, v, m, kv0, z0, *_ = _op_args(True, "elu1", True, True)

    def f(q, k, v, kv0, z0):
        out, (kv, z) = tfk.linear_attention(q, k, v, key_padding_mask=m, initial_state=(kv0, z0),
                                            return_state=True, backend="cuda-sim")
        return (out * out).sum() + kv.sum() + z.sum()

    a = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, kv0, z0)
    ga = torch.autograd.grad(a, [q, k, v, kv0, z0])
    b = f(q, k, v, kv0, z0)
    gb = torch.autograd.grad(b, [q, k, v, kv0, z0])
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend,kw,match", [
    ("cuda", {}, "needs CUDA tensors"),
    ("cuda-sim", dict(dtype=torch.float64), "dtype torch.float64"),
    ("cuda-sim", dict(D=257), "head dims D = 257"),
    ("cuda-sim", dict(Dv=257), "Dv = 257"),
])
def test_refusals(backend, kw, match):
    dtype, D, Dv = kw.get("dtype", torch.float32), kw.get("D", 8), kw.get("Dv", 8)
    q, k, v = torch.randn(1, 2, 4, D, dtype=dtype), torch.randn(1, 2, 4, D, dtype=dtype), \
        torch.randn(1, 2, 4, Dv, dtype=dtype)
    with pytest.raises(BackendUnavailable, match=match):
        tfk.linear_attention(q, k, v, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (backend 'cuda')")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype):
    for c in (Case(B=2, H=8, Hkv=2, L=1025, D=64, mask=True, state=True),
              Case(B=2, H=4, Hkv=4, L=300, S=1025, D=128, causal=False, feature_map="softmax", mask=True)):
        check_case(c, dtype, backend="cuda", device="cuda")
