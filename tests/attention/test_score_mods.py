"""Score modifiers (tfk.scores): the reference against their definitions, the
torch engine against the float64 reference (every gradient, parameters
included), composition with patterns, the adaptive span's window, errors."""
import math

import pytest
import torch

import tfk
from tfk import patterns as P
from tfk import scores as S
from tfk.ops.attention import attention_reference
from score_mod_cases import KINDS, XL_KINDS, check_score_mod

PATTERNS = {
    "dense": None,
    "causal": P.causal(),
    "window": P.sliding_window(16),
    "dilated": P.sliding_window(12, 12, dilation=2),   # planned in a reordered layout
    "causal|global": P.causal() | P.global_tokens(2),
}


# Transformer-XL refuses plans in a reordered layout (test_errors_name_the_modifier checks that)
CASES = [(kind, p) for kind in KINDS for p in PATTERNS if not (kind in XL_KINDS and p == "dilated")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("kind,pattern_id", CASES)
def test_torch_engine(kind, pattern_id, dtype):
    check_score_mod("torch", dtype, kind, PATTERNS[pattern_id])


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (37, 37), (20, 83), (83, 20)])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_engine_odd_lengths(kind, Lq, Lk):
    pattern = P.causal(bottom_right=True) if Lq <= Lk else None
    check_score_mod("torch", torch.float32, kind, pattern, B=1, Lq=Lq, Lk=Lk)


@pytest.mark.parametrize("kind", ["alibi", "relative_bias", "adaptive_span"])
@pytest.mark.parametrize("pattern", [P.sliding_window(16), P.sliding_window(70, 30), P.causal()], ids=str)
def test_torch_engine_chunks_of_many_rows(kind, pattern):
    """Longer sequences: chunks of several query blocks whose key runs step by
    a block (windows) or grow (causal), in both the bias's forward gather and
    its per-diagonal gradient."""
    check_score_mod("torch", torch.float32, kind, pattern, B=1, H=4, Hkv=1, Lq=300, Lk=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_torch_engine_long(kind):
    check_score_mod("torch", torch.float32, kind, P.causal(), B=1, H=4, Hkv=1, Lq=700, Lk=700, D=32)


def _loops(q, k, scale, kind, params, Lq, Lk):
    """Scores (H, Lq, Lk) of one batch by Python loops over the definitions."""
    from transformers.models.t5.modeling_t5 import T5Attention
    H = q.shape[0]
    s = torch.zeros(H, Lq, Lk, dtype=torch.float64)
    for h in range(H):
        for i in range(Lq):
            for j in range(Lk):
                if kind == "transformer_xl":
                    r, u, v = params
                    d = (i + Lk - Lq) - j
                    x = scale * (float((q[h, i] + u[h]) @ k[h, j]) + float((q[h, i] + v[h]) @ r[h, d + Lq - 1]))
                else:
                    x = scale * float(q[h, i] @ k[h, j])
                if kind == "softcap":
                    x = 1.5 * math.tanh(x / 1.5)
                if kind == "alibi":
                    x += float(params[0][h]) * (j - i)
                if kind == "relative_bias":
                    bucket = T5Attention._relative_position_bucket(torch.tensor(j - i), True, 16, 40)
                    x += float(params[0][int(bucket), h])
                if kind == "adaptive_span":
                    m = min(max((8.0 + float(params[0][h]) - (i - j)) / 8.0, 0.0), 1.0)
                    x = x + math.log(m) if m > 0 else -math.inf
                s[h, i, j] = x
    return s


@pytest.mark.parametrize("kind", ["alibi", "relative_bias", "softcap", "adaptive_span", "transformer_xl"])
def test_reference_is_the_definition(kind):
    """The oracle itself, against loops over each modifier's definition (T5's
    buckets from transformers' own function), Lq != Lk."""
    from score_mod_cases import _modifier, _params
    g = torch.Generator().manual_seed(3)
    H, Lq, Lk, D = 4, 5, 9, 3
    q, k, v = (torch.randn(1, H, n, D, generator=g, dtype=torch.float64) for n in (Lq, Lk, Lk))
    params = _params(kind, H, Lq, Lk, D, g)
    if kind == "adaptive_span":
        params = [torch.tensor([0.5, 2.0, 5.5, -9.0], dtype=torch.float64)]   # the last head's m is 0 everywhere
    s = _loops(q[0], k[0], 0.7, kind, params, Lq, Lk)
    out, lse = attention_reference(q, k, v, scale=0.7, score_mod=S.canonical(_modifier(kind, params)))
    want_lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    torch.testing.assert_close(lse[0], want_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0], p @ v[0], rtol=1e-12, atol=1e-12)


def test_t5_buckets_are_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-700, 700)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (16, 40), (8, 20)):
            want = T5Attention._relative_position_bucket(rel, bidirectional, nb, md)
            assert torch.equal(S.t5_buckets(rel, nb, md, bidirectional), want)


def test_alibi_slopes():
    # the paper's values: 8 heads 1/2 ... 1/256; 6 heads: the 4-head ones then every other of 8
    assert torch.allclose(S.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    four, eight = [2.0 ** (-2 * (i + 1)) for i in range(4)], [2.0 ** -(i + 1) for i in range(8)]
    assert torch.allclose(S.alibi_slopes(6), torch.tensor(four + eight[0::2][:2]))


def test_adaptive_span_visits_only_the_span():
    """Keys beyond max(z) + ramp are not visited: the tiles scored are the
    span window's, far fewer than the dense call's, and the result is the
    reference's."""
    L, H = 1024, 2
    q, k, v = (torch.randn(1, H, L, 16) for _ in range(3))
    z = torch.tensor([20.0, 90.0])
    with tfk.backends.count_tiles() as counts:
        out = tfk.attention(q, k, v, score_mod=S.adaptive_span(z, 16.0), backend="torch")
    ref = attention_reference(q.double(), k.double(), v.double(),
                              score_mod=S.canonical(S.adaptive_span(z.double(), 16.0)))[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # max(z) + ramp = 106, rounded up to 128: the plan holds the tiles with a
    # pair at i - j < 128 (later keys have m = 1 and stay), by definition:
    nb = L // 64
    window_tiles = H * sum(1 for a in range(nb) for b in range(nb) if a * 64 - (b * 64 + 63) < 128)
    assert counts["forward"] == window_tiles < H * nb * nb


def test_causal_span_tiles():
    L = 1024
    q, k, v = (torch.randn(1, 2, L, 16) for _ in range(3))
    with tfk.backends.count_tiles() as counts:
        tfk.attention(q, k, v, P.causal(), score_mod=S.adaptive_span(torch.tensor([10.0, 40.0]), 8.0),
                      backend="torch")
    assert counts["forward"] == 2 * (L // 64 * 2 - 1)   # the diagonal and the one block behind it


def test_sdpa_drop_in_takes_score_mod():
    q, k, v = (torch.randn(2, 4, 33, 16, dtype=torch.float64) for _ in range(3))
    slopes = S.alibi_slopes(4).double()
    mask = torch.rand(2, 1, 33, 33) > 0.2
    mask[..., 0] = True
    got = tfk.scaled_dot_product_attention(q, k, v, attn_mask=mask, score_mod=S.alibi(slopes))
    i, j = torch.arange(33).view(-1, 1), torch.arange(33)
    bias = (slopes.view(-1, 1, 1) * (j - i)).masked_fill(~mask, -math.inf)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(got, want)


def test_errors_name_the_modifier():
    q, k, v = (torch.randn(1, 4, 10, 8) for _ in range(3))
    cases = [
        (S.alibi(torch.ones(3)), ValueError, "alibi: slopes has 3 entries"),
        (lambda: S.relative_bias(torch.ones(30, 4)), ValueError, "num_buckets=32"),
        (S.relative_bias(torch.ones(32, 2)), ValueError, "relative_bias: table has 2 columns"),
        (lambda: S.softcap(0.0), ValueError, "softcap: cap"),
        (lambda: S.adaptive_span(torch.ones(4), -1.0), ValueError, "adaptive_span: ramp"),
        (S.adaptive_span(torch.ones(2), 4.0), ValueError, "adaptive_span: z has 2"),
        (S.transformer_xl(torch.ones(4, 10, 8), torch.ones(4, 8), torch.ones(4, 8)), ValueError,
         r"transformer_xl: r must be \(H or 1, Lq \+ Lk - 1, D\)"),
        (S.transformer_xl(torch.ones(4, 19, 8), torch.ones(3, 8), torch.ones(4, 8)), ValueError,
         "transformer_xl: u must be"),
        (S.transformer_xl(torch.ones(4, 19, 8, dtype=torch.float64), torch.ones(4, 8), torch.ones(4, 8)), TypeError,
         "transformer_xl: r has dtype"),
        ([S.softcap(2.0), S.softcap(3.0)], ValueError, "two softcap modifiers"),
        ("alibi", TypeError, "score_mod must be a tfk.scores modifier"),
        (lambda: S.alibi(torch.ones(4, dtype=torch.int64)), TypeError, "alibi: slopes must be a floating-point"),
    ]
    for mod, exc, text in cases:
        with pytest.raises(exc, match=text):
            tfk.attention(q, k, v, score_mod=mod() if callable(mod) else mod)
    xl = S.transformer_xl(torch.ones(4, 19, 8), torch.ones(4, 8), torch.ones(4, 8))
    with pytest.raises(ValueError, match="transformer_xl: the pattern's plan reorders tokens"):
        tfk.attention(q, k, v, P.sliding_window(4, 4, dilation=2), score_mod=xl, backend="torch")


def test_backends_without_modifiers_say_so():
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float16) for _ in range(3))
    with pytest.raises(tfk.BackendUnavailable, match=r"score_mod \(softcap\) is not fused in this backend"):
        tfk.attention(q, k, v, score_mod=S.softcap(5.0), backend="sdpa")
