"""tfk.linear_attention's "triton" backend (triton_kernels/linear.py) against
the float64 reference, in Triton's interpreter on CPU tensors (fp32, fp16;
the interpreter's bf16 is wrong): identity/elu1/relu causal and not, softmax
(non-causal, in-kernel: the keys' statistics over S, the queries' over D, and
their Jacobians in dq and dk), normalize on and off, GQA, key padding (a fully
masked batch row), initial state and the returned state with their gradients,
odd sizes, the decode kernel (L, S <= 16); every output starts as NaN
(tests/conftest.py); state carry-over on this backend, through decode steps;
its refusals. Long sweeps: TFK_LONG_TESTS=1."""
import collections
import itertools
import os

import pytest
import torch

import tfk
from tfk.backends import BackendUnavailable
from linear_cases import Case, check_case, check_pieces_equal_one_call

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]

# Small B and H: the interpreter runs every program in Python.
CASES = {
    "causal_elu1_gqa_mask_state_D40_Dv24": Case(B=1, H=4, Hkv=2, L=97, D=40, Dv=24, mask=True, state=True),
    "causal_relu_unnormalised_scale_state": Case(B=1, H=2, Hkv=2, L=63, feature_map="relu", normalize=False,
                                                  scale=0.5, state=True),
    "causal_identity_positive_eps": Case(B=1, H=2, Hkv=1, L=97, feature_map="identity", inputs="positive",
                                         eps=1e-3, mask=True),
    "causal_L1_decode_gqa_D80": Case(B=1, H=4, Hkv=2, L=1, D=80, state=True),
    "noncausal_elu1_L40_S63_gqa_mask_state": Case(B=2, H=4, Hkv=2, L=40, S=63, causal=False, mask=True,
                                                  state=True),
    "noncausal_relu_eps_scale_D80_Dv40": Case(B=1, H=2, Hkv=1, L=40, S=63, D=80, Dv=40, causal=False,
                                              feature_map="relu", eps=0.1, scale=2.0),
    "noncausal_identity_unnormalised_state": Case(B=1, H=2, Hkv=2, L=40, S=63, causal=False,
                                                  feature_map="identity", normalize=False, state=True),
    "noncausal_softmax_gqa_mask": Case(B=2, H=4, Hkv=2, L=33, S=40, causal=False, feature_map="softmax",
                                       mask=True),
    # softmax: eps large enough that dq's sum_d dphi phi = delta eps / den matters; a fully masked row (B = 2)
    "noncausal_softmax_S63_eps_mask": Case(B=2, H=2, Hkv=2, L=20, S=63, causal=False, feature_map="softmax",
                                           eps=0.1, mask=True),
    "noncausal_softmax_S97_D80_Dv24_unnormalised_scale": Case(B=1, H=2, Hkv=1, L=40, S=97, D=80, Dv=24,
                                                              causal=False, feature_map="softmax",
                                                              normalize=False, scale=0.5),
    "noncausal_softmax_S1_gqa_mask": Case(B=2, H=4, Hkv=2, L=23, S=1, causal=False, feature_map="softmax",
                                          mask=True),
    # the decode kernel (L, S <= 16): causal with a state, non-causal, softmax over S in its one tile
    "causal_L5_decode_gqa_mask_state_Dv24": Case(B=2, H=4, Hkv=2, L=5, D=40, Dv=24, mask=True, state=True),
    "noncausal_L3_S16_decode_relu_unnormalised_state": Case(B=1, H=2, Hkv=1, L=3, S=16, causal=False,
                                                            feature_map="relu", normalize=False, state=True),
    "noncausal_softmax_decode_L5_S9_gqa_mask_D80": Case(B=2, H=4, Hkv=2, L=5, S=9, D=80, causal=False,
                                                        feature_map="softmax", mask=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    with tfk.backends.record_choices() as names:
        check_case(CASES[case], dtype, backend="triton")
    assert set(names) == {"triton"}


# Other chunk and state-tile sizes (the default chunk at D = 24, 32, already
# puts chunk boundaries into L = 97): whole chunks only (L = 64) and a partial last one.
@pytest.mark.parametrize("L", [64, 97])
def test_other_chunk_sizes(L, monkeypatch):
    from tfk.triton_kernels import linear as kernels
    monkeypatch.setattr(kernels, "CHUNK", 16)
    monkeypatch.setattr(kernels, "STATE_TILE", 32)
    check_case(Case(B=1, H=4, Hkv=2, L=L, D=24, Dv=20, mask=True, state=True), torch.float32, backend="triton")


def test_wide_heads():
    """D = Dv = 256 (narrow chunks, tiled state) and D = 16 < Dv = 130 (padded to 256)."""
    check_case(Case(B=1, H=1, Hkv=1, L=40, D=256, state=True, mask=True), torch.float32, backend="triton")
    check_case(Case(B=1, H=2, Hkv=1, L=23, S=33, D=16, Dv=130, causal=False, state=True), torch.float32,
               backend="triton")


@pytest.mark.parametrize("feature_map", ["elu1", pytest.param("relu", marks=pytest.mark.slow)])
def test_causal_chunks_then_decode_equal_one_call(feature_map):
    """A prompt in pieces (one spanning a chunk boundary), then decode steps of
    L = 1, each passing the last state: everything equals one call's, on this backend."""
    check_pieces_equal_one_call("triton", 1, 4, 2, 150, 24, 16,
                                [(0, 70), (70, 145)] + [(i, i + 1) for i in range(145, 150)], feature_map)


@pytest.fixture
def launches(monkeypatch):
    """Counts the launches of each kernel of triton_kernels/linear.py, by name."""
    from tfk.triton_kernels import linear as kernels
    counts = collections.Counter()

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            counts[self.name] += 1
            return self.fn[grid]

    for name in kernels.KERNELS:
        monkeypatch.setattr(kernels, name, Recorder(name, getattr(kernels, name)))
    return counts


def test_prefix_then_decode_steps_match_reference(launches):
    """From an initial state, a prompt of 40 (the chunked kernel), then decode
    steps of L = 1, 5, 1, 5 (the decode kernel), each passing the last state:
    outputs, the final state and every gradient (through the chain of states,
    to the initial state too) equal the float64 reference's one call."""
    from tfk.ops.linear import linear_attention_reference
    B, H, Hkv, L, D, Dv = 2, 4, 2, 52, 24, 20
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, v = 0.5 * r(B, H, L, D), 0.5 * r(B, Hkv, L, D), r(B, Hkv, L, Dv)
    kv0, z0 = r(B, Hkv, D, Dv), torch.rand(B, Hkv, D, generator=g, dtype=torch.float64) * 10
    mask = torch.rand(B, L, generator=g) < 0.8
    pieces = [(0, 40), (40, 41), (41, 46), (46, 47), (47, 52)]
    seeds = (r(B, H, L, Dv), r(B, Hkv, D, Dv), r(B, Hkv, D))

    def grads(dtype, fn):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, kv0, z0)]
        out, (kv, z) = fn(*leaves)
        loss = (out.double() * seeds[0]).sum() + (kv.double() * seeds[1]).sum() + (z.double() * seeds[2]).sum()
        return [out, kv, z] + list(torch.autograd.grad(loss, leaves))

    def chained(q, k, v, kv0, z0):
        outs, state = [], (kv0, z0)
        for a, b in pieces:
            out, state = tfk.linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], initial_state=state,
                                              key_padding_mask=mask[:, a:b], return_state=True, backend="triton")
            outs.append(out)
        return torch.cat(outs, 2), state

    got = grads(torch.float32, chained)
    want = grads(torch.float64, lambda *a: linear_attention_reference(*a[:3], key_padding_mask=mask,
                                                                      initial_state=a[3:]))
    assert launches["_linear_decode"] == 4 and launches["_linear_fwd"] == 1
    for name, a, b in zip(("out", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_softmax_in_kernel(launches):
    """The softmax map runs in the kernels: the keys' statistics once per forward
    and once per backward, and a causal softmax call is refused by the launcher."""
    from tfk.triton_kernels import linear as kernels
    check_case(Case(B=1, H=2, Hkv=1, L=20, S=33, D=24, causal=False, feature_map="softmax", mask=True),
               torch.float32, backend="triton")
    assert launches["_softmax_k_stats"] == 2 and launches["_linear_fwd"] == 1
    q = torch.randn(1, 1, 20, 16)
    with pytest.raises(ValueError, match="softmax"):
        kernels.forward(q, q, q, None, None, None, "softmax", True, True, 1e-6, 1.0, torch.empty_like(q),
                        q.new_empty(1, 1, 20), q.new_empty(1, 1, 16, 16), q.new_empty(1, 1, 16))


@pytest.mark.parametrize("S", [40, 9])
def test_softmax_large_logits(S):
    """q and k of magnitude ~100 (exp overflows float32 past 88): the statistics
    subtract their max, over D for q and over the unmasked S positions for k
    (the chunked kernels, S = 40, and the decode kernel, S = 9); a fully masked
    batch row gives phi(k) = 0. Forward and every gradient against float64."""
    from tfk.ops.linear import linear_attention_reference
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, L, D, Dv = 2, 2, 1, 13, 24, 16
    q, k = 30 * torch.randn(B, H, L, D, generator=g, dtype=torch.float64) + 80, \
        30 * torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64) + 80
    v, dout = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64), \
        torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64)
    mask = torch.rand(B, S, generator=g) < 0.7
    mask[0, :2] = True
    mask[1] = False
    kw = dict(causal=False, feature_map="softmax", key_padding_mask=mask, eps=1e-3)
    res = []
    for dtype, fn in ((torch.float32, lambda *a: tfk.linear_attention(*a, backend="triton", **kw)),
                      (torch.float64, lambda *a: linear_attention_reference(*a, **kw)[0])):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        res.append([out] + list(torch.autograd.grad((out.double() * dout).sum(), leaves)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *res):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_no_grad_and_poisoned_outputs():
    """Outputs come from new_output (NaN here): every element is written, with
    and without gradients, the returned state too."""
    assert tfk.backends.POISON_OUTPUTS
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 37, 20, generator=g), torch.randn(2, 2, 37, 20, generator=g), \
        torch.randn(2, 2, 37, 12, generator=g)
    for causal in (True, False):
        with torch.no_grad():
            out, (kv, z) = tfk.linear_attention(q, k, v, causal=causal, return_state=True, backend="triton")
        for t in (out, kv, z):
            assert not torch.isnan(t).any()


def test_auto_on_cpu_is_torch():
    """"auto" picks triton for CUDA tensors only; CPU calls stay on torch."""
    q = torch.randn(1, 2, 5, 16)
    with tfk.backends.record_choices() as names:
        tfk.linear_attention(q, q, q)
    assert names == ["torch"]
    assert "triton" in tfk.backend_names("linear")


@pytest.mark.parametrize("dtype,D,match", [
    (torch.float64, 16, "dtype torch.float64"),
    (torch.bfloat16, 16, "bfloat16 arithmetic is wrong in Triton's interpreter"),
    (torch.float32, 264, "head dims D = 264"),
])
def test_refusals_named(dtype, D, match):
    q = torch.randn(1, 1, 3, D, dtype=dtype)
    with pytest.raises(BackendUnavailable, match=match):
        tfk.linear_attention(q, q, q, backend="triton")


def test_opcheck():
    backend = tfk.backends.get_backend("triton", "linear")
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 1, 20, 16, generator=g), \
        torch.randn(1, 1, 20, 16, generator=g)
    kv0, z0 = torch.randn(1, 1, 16, 16, generator=g), torch.rand(1, 1, 16, generator=g)
    args = [t.requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(backend._op.op, (*args, torch.rand(1, 20, generator=g) < 0.8, kv0.requires_grad_(),
                                           z0.requires_grad_(), "elu1", True, True, 1e-6, 0.5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep(dtype):
    """Long tier: sizes x maps x causal x normalize."""
    for L, D, fm, causal, norm in itertools.product((1, 2, 63, 64, 65, 130), (16, 40, 64, 80, 128),
                                                     ("identity", "elu1", "relu", "softmax"), (True, False),
                                                     (True, False)):
        if fm == "softmax" and causal:
            continue
        c = Case(B=1, H=4, Hkv=2, L=L, S=L if causal else max(1, L // 2 + 3), D=D, feature_map=fm, causal=causal,
                 normalize=norm, mask=True, state=fm != "softmax",
                 inputs="positive" if fm == "identity" and norm else "normal")
        check_case(c, dtype, backend="triton", seed=L * 7 + D)
