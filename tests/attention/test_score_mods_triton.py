"""Score modifiers (tfk.scores) fused in the Triton kernels (Triton's
interpreter on CPU here): out, lse and the gradients of q, k, v and of every
modifier's parameters against the float64 reference (score_mod_cases), the
distance bias's gradient deterministic, Transformer-XL refused by name.
Outputs start as NaN (conftest's poison): an unwritten element fails."""
import pytest
import torch

import tfk
from tfk import backends
from tfk import patterns as P
from tfk import scores as S
from score_mod_cases import KINDS, XL_KINDS, check_score_mod

PATTERNS = {
    "dense": None,
    "causal": P.causal(),
    "window": P.sliding_window(16),
    "dilated": P.sliding_window(12, 12, dilation=2),   # planned in a reordered layout: per-element d_bias
    "causal|global": P.causal() | P.global_tokens(2),
}

# (kind, pattern, dtype): every kind, every pattern, both dtypes, a few
# seconds each in the interpreter (B=2, H=4 over Hkv=2, L=70, D=16)
CASES = [
    ("alibi", "dense", torch.float32),
    ("alibi", "dilated", torch.float16),
    ("relative_bias", "causal|global", torch.float32),
    ("relative_bias_causal", "window", torch.float16),
    ("softcap", "causal", torch.float32),
    ("alibi+softcap", "dilated", torch.float32),
    ("alibi+softcap", "causal|global", torch.float16),
    ("adaptive_span", "causal", torch.float32),      # z = 0.25, 3: spans shorter than L
    ("adaptive_span", "window", torch.float16),
]


@pytest.mark.parametrize("kind,pattern_id,dtype", CASES,
                         ids=[f"{k}-{p}-{str(d)[6:]}" for k, p, d in CASES])
def test_triton_score_mod(kind, pattern_id, dtype):
    assert backends.POISON_OUTPUTS
    check_score_mod("triton", dtype, kind, PATTERNS[pattern_id])


@pytest.mark.parametrize("kind,Lq,Lk,pattern", [
    ("alibi", 1, 1, None),
    ("relative_bias", 37, 37, P.causal()),
    ("alibi+softcap", 20, 83, P.causal(bottom_right=True)),   # Lq != Lk: the bias's index offset
    ("adaptive_span", 83, 20, None),
])
def test_triton_score_mod_lengths(kind, Lq, Lk, pattern):
    check_score_mod("triton", torch.float32, kind, pattern, B=1, Lq=Lq, Lk=Lk)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("pattern_id", list(PATTERNS))
@pytest.mark.parametrize("kind", [k for k in KINDS if k not in XL_KINDS])
def test_triton_score_mod_long(kind, pattern_id, dtype):
    check_score_mod("triton", dtype, kind, PATTERNS[pattern_id])


def _bias_grads(pattern):
    """Gradients of alibi's slopes and of T5's table (the distance bias's
    gradient, twice through the fused sum) from one forward and backward."""
    g = torch.Generator().manual_seed(5)
    B, H, L, D = 1, 4, 70, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g).requires_grad_() for h in (H, 2, 2))
    slopes = S.alibi_slopes(H).requires_grad_()
    table = torch.randn(16, H, generator=g).requires_grad_()
    out, lse = tfk.attention(q, k, v, pattern, backend="triton", return_lse=True,
                             score_mod=[S.alibi(slopes), S.relative_bias(table, 16, 40), S.softcap(3.0)])
    (out.square().sum() + lse.sum()).backward()
    return slopes.grad, table.grad


@pytest.mark.parametrize("pattern_id", ["causal", "dilated"])
def test_triton_bias_grad_is_deterministic(pattern_id):
    a, b = _bias_grads(PATTERNS[pattern_id]), _bias_grads(PATTERNS[pattern_id])
    for x, y in zip(a, b):
        assert not torch.isnan(x).any()
        assert torch.equal(x, y)


def test_sum_by_index_sorted_way():
    """The segmented sum taken off CPU (forced here) matches index_add_, and is
    bitwise the same on a second run; indices absent from ``index`` get 0."""
    from tfk.ops.attention.engine import sum_by_index
    g = torch.Generator().manual_seed(1)
    values = torch.randn(5000, generator=g)
    index = torch.randint(0, 40, (5000,), generator=g) * 2   # odd indices never occur
    ref = torch.zeros(81, dtype=torch.float64).index_add_(0, index, values.double())
    got = sum_by_index(values, index, 81, sort=True)
    assert got.shape == (81,)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, sum_by_index(values, index, 81, sort=True))
    assert torch.equal(got[1::2], torch.zeros(40))


def test_triton_refuses_transformer_xl_by_name():
    H, L, D = 2, 8, 16
    q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
    xl = S.transformer_xl(torch.randn(H, 2 * L - 1, D), torch.randn(H, D), torch.randn(H, D))
    with pytest.raises(tfk.BackendUnavailable, match=r"score_mod \(transformer_xl\) is not fused"):
        tfk.attention(q, k, v, score_mod=xl, backend="triton")


def test_triton_refuses_modifiers_past_head_dim_128():
    q, k, v = (torch.randn(1, 2, 8, 160) for _ in range(3))
    with pytest.raises(tfk.BackendUnavailable, match="score_mod with head dim > 128"):
        tfk.attention(q, k, v, score_mod=S.softcap(5.0), backend="triton")
    tfk.attention(q, k, v, backend="triton")   # without modifiers: head dims up to 256
