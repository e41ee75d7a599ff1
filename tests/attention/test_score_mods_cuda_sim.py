"""Score modifiers (tfk.scores) fused in the CUDA kernels of csrc/attention/
(softcap and the distance bias: alibi, relative_bias, adaptive_span), run by
backend "cuda-sim" (the kernels compiled for the host): out, lse and the
gradients of q, k, v and of every modifier's parameters against the float64
reference (score_mod_cases), the distance bias's gradient deterministic,
Transformer-XL refused by name. Outputs start as NaN (conftest's poison): an
unwritten element fails. Small shapes: the host-execution layer is slow."""
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
    "dilated": P.sliding_window(12, 12, dilation=2),   # planned in a reordered layout (q_index, kv_index)
    "causal|global": P.causal() | P.global_tokens(2),
}
SMALL = dict(B=1, H=4, Hkv=2, Lq=70, Lk=70, D=16)

MOD_KINDS = [k for k in KINDS if k not in XL_KINDS]


# every kind x every pattern x both dtypes: ~0.3 s each on the host
@pytest.mark.parametrize("backend", ["cuda-sim"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("pattern_id", list(PATTERNS))
@pytest.mark.parametrize("kind", MOD_KINDS)
def test_cuda_sim_score_mod(backend, kind, pattern_id, dtype):
    assert backends.POISON_OUTPUTS
    check_score_mod(backend, dtype, kind, PATTERNS[pattern_id], **SMALL)


@pytest.mark.parametrize("backend", ["cuda-sim"])
@pytest.mark.parametrize("kind,Lq,Lk,pattern", [
    ("alibi+softcap", 20, 83, P.causal(bottom_right=True)),   # Lq != Lk: the bias's index offset
    ("relative_bias", 83, 20, None),
    ("adaptive_span", 1, 1, None),
])
def test_cuda_sim_score_mod_lengths(backend, kind, Lq, Lk, pattern):
    check_score_mod(backend, torch.float16, kind, pattern, B=1, H=4, Hkv=2, Lq=Lq, Lk=Lk, D=16)


# wider: two batches, head dim 96 (the 128 kernels), schedules of 3 key blocks
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda-sim"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("pattern_id", list(PATTERNS))
@pytest.mark.parametrize("kind", MOD_KINDS)
def test_cuda_sim_score_mod_wide(backend, kind, pattern_id, dtype):
    check_score_mod(backend, dtype, kind, PATTERNS[pattern_id], B=2, H=4, Hkv=1, Lq=150, Lk=150, D=96)


def _bias_grads(backend, pattern):
    """Gradients of alibi's slopes and T5's table (the distance bias's gradient,
    twice through the fused sum) from one forward and backward."""
    g = torch.Generator().manual_seed(5)
    B, H, L, D = 1, 4, 70, 16
    q, k, v = (torch.randn(B, h, L, D, generator=g).half().requires_grad_() for h in (H, 2, 2))
    slopes = S.alibi_slopes(H).requires_grad_()
    table = torch.randn(16, H, generator=g).requires_grad_()
    out, lse = tfk.attention(q, k, v, pattern, backend=backend, return_lse=True,
                             score_mod=[S.alibi(slopes), S.relative_bias(table, 16, 40), S.softcap(3.0)])
    (out.float().square().sum() + lse.sum()).backward()
    return slopes.grad, table.grad


@pytest.mark.parametrize("backend", ["cuda-sim"])
@pytest.mark.parametrize("pattern_id", ["causal", "dilated"])
def test_cuda_sim_bias_grad_is_deterministic(backend, pattern_id):
    a, b = _bias_grads(backend, PATTERNS[pattern_id]), _bias_grads(backend, PATTERNS[pattern_id])
    for x, y in zip(a, b):
        assert x is not None and not torch.isnan(x).any()
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["cuda-sim"])
def test_cuda_sim_refuses_transformer_xl_by_name(backend):
    H, L, D = 2, 8, 16
    q, k, v = (torch.randn(1, H, L, D).half() for _ in range(3))
    xl = S.transformer_xl(torch.randn(H, 2 * L - 1, D).half(), torch.randn(H, D).half(), torch.randn(H, D).half())
    with pytest.raises(tfk.BackendUnavailable, match="transformer_xl"):
        tfk.attention(q, k, v, score_mod=xl, backend=backend)


@pytest.mark.parametrize("backend", ["cuda-sim"])
def test_cuda_sim_ops_check_the_bias(backend):
    """The op refuses a bias of the wrong head count, and dbias without a bias."""
    from tfk.ops.attention import cuda_backend
    from tfk.plan import get_plan
    B, H, L = 1, 2, 8
    q, k, v = (torch.randn(B, H, L, 64).half() for _ in range(3))
    sp = get_plan(None, L, L, 64, 64, q.device).subpasses[0]
    ops = cuda_backend._ops(q.device)
    out, lse = torch.empty_like(q), torch.empty(B, H, L)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.attention_fwd_(q, k, v, None, None, None, sp.kv_count, sp.kv_blocks, sp.kv_partial,
                           sp.partial_masks.view(torch.uint8), 0.125, out, lse,
                           bias=torch.zeros(H + 1, 2 * L - 1), bias_offset=L - 1)


@pytest.mark.parametrize("backend", ["cuda-sim"])
@pytest.mark.parametrize("case", ["dilated", "float_mask"])
def test_cuda_sim_score_mod_with_dropout(backend, case):
    """Dropout (the same keep mask on every engine for one seed) with softcap
    and alibi, over a reordered layout or with a float user mask: the kernels
    match the torch engine run in float32 on the same half inputs, out and
    every gradient."""
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, L, D = 1, 4, 2, 70, 16
    base = [torch.randn(B, h, L, D, generator=g).half() for h in (H, Hkv, Hkv)]
    mask = torch.randn(1, 1, L, L, generator=g) * 0.5
    dout = torch.randn(B, H, L, D, generator=g)

    def run(be, dt):
        q, k, v = (x.to(dt).requires_grad_() for x in base)
        slopes = S.alibi_slopes(H).requires_grad_()
        mods = [S.alibi(slopes), S.softcap(2.5)]
        torch.manual_seed(11)
        if case == "dilated":
            out = tfk.attention(q, k, v, PATTERNS["dilated"], dropout_p=0.25, backend=be, score_mod=mods)
        else:
            out = tfk.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(dt), dropout_p=0.25, enable_gqa=True,
                                                   backend=be, score_mod=mods)
        grads = torch.autograd.grad((out.float() * dout).sum(), [q, k, v, slopes])
        return [out.float().detach(), *(x.float() for x in grads)]

    got, ref = run(backend, torch.float16), run("torch", torch.float32)
    for name, a, r in zip(("out", "dq", "dk", "dv", "d slopes"), got, ref):
        assert not torch.isnan(a).any(), name
        err = float((a - r).abs().max())
        assert err <= 2e-2 * max(1.0, float(r.abs().max())), f"{name}: err {err:.3g} (max {float(r.abs().max()):.3g})"


@pytest.mark.parametrize("backend", ["cuda-sim"])
def test_cuda_sim_bias_grad_partials_are_per_diagonal(backend, monkeypatch):
    """In natural order the dQ kernel reduces each visited tile to its 127
    diagonal sums (one base index per tile): the backward's bias-gradient
    buffers are O(tiles * 127), not O(tiles * 64 * 64) (nothing of the size of
    the scores); a reordered layout (dilated) keeps the per-element shares."""
    from tfk.ops.attention import cuda_backend
    made = []
    real = cuda_backend._dbias_buffers

    def spy(sp, B, H, lq, device):
        values, index, diagonal = real(sp, B, H, lq, device)
        slots = B * H * -(-lq // 64) * sp.kv_blocks.shape[-1]
        assert diagonal == (sp.q_index is None and sp.kv_index is None)
        made.append((slots, values.numel(), index.numel(), diagonal))
        return values, index, diagonal

    monkeypatch.setattr(cuda_backend, "_dbias_buffers", spy)
    for pattern_id, diagonal in (("causal", True), ("dense", True), ("dilated", False)):
        made.clear()
        grads = _bias_grads(backend, PATTERNS[pattern_id])
        assert all(x is not None and not torch.isnan(x).any() for x in grads)
        assert made, pattern_id
        assert any(d == diagonal for *_, d in made), pattern_id
        for slots, n_values, n_index, diag in made:
            if diag:
                assert (n_values, n_index) == (slots * 127, slots), pattern_id
            else:
                assert (n_values, n_index) == (slots * 64 * 64, slots * 64 * 64), pattern_id
