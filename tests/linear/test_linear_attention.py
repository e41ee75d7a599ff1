"""tfk.linear_attention: the torch backend against the float64 reference, every
feature map, causal and not, normalize on and off, eps, scale, GQA, key
padding, odd sizes, fp32/fp16, forward and every gradient (the initial
state's and through the returned state); state carry-over; named errors;
opcheck, torch.compile; what the backward keeps; the reference against a
token-by-token recurrence."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import tfk
from tfk.ops.linear import linear_attention_reference, torch_backend
from tfk.ops.linear.api import TorchBackend
from linear_cases import Case, check_case, check_pieces_equal_one_call

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]

CASES = {
    "causal_elu1_state": Case(L=97, state=True),
    "causal_elu1_gqa_mask_state_D80": Case(B=2, H=6, Hkv=2, L=63, D=80, Dv=48, mask=True, state=True),
    "causal_elu1_eps_scale": Case(L=63, eps=0.5, scale=0.25, state=True),
    "causal_elu1_unnormalised": Case(L=97, normalize=False),
    "causal_relu": Case(L=97, feature_map="relu", H=4, Hkv=2, mask=True),
    "causal_relu_unnormalised_scale": Case(L=63, feature_map="relu", normalize=False, scale=0.5, state=True),
    "causal_identity_unnormalised": Case(L=97, feature_map="identity", normalize=False, scale=0.3, state=True),
    "causal_identity_positive": Case(L=63, feature_map="identity", inputs="positive", eps=1e-3),
    "causal_L1_decode_gqa": Case(L=1, H=8, Hkv=2, D=80, state=True),
    "noncausal_elu1_L63_S97_gqa_mask_state": Case(L=63, S=97, H=4, Hkv=2, causal=False, mask=True, state=True),
    "noncausal_relu_eps": Case(L=97, S=40, causal=False, feature_map="relu", eps=0.1, scale=2.0),
    "noncausal_identity_unnormalised": Case(L=40, S=63, causal=False, feature_map="identity", normalize=False,
                                            state=True),
    "noncausal_softmax_gqa_mask": Case(L=97, S=63, H=6, Hkv=3, causal=False, feature_map="softmax", mask=True),
    "noncausal_softmax_unnormalised_scale": Case(L=63, causal=False, feature_map="softmax", normalize=False,
                                                 scale=3.0, D=80, Dv=40),
    "noncausal_L1_S1": Case(L=1, S=1, causal=False, state=True),
    "causal_L1025": Case(B=1, H=2, Hkv=1, L=1025, D=64, mask=True, state=True),
    "noncausal_L1025": Case(B=1, H=2, Hkv=2, L=1025, D=64, causal=False, feature_map="softmax"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    check_case(CASES[case], dtype)


# Small chunks put many chunk boundaries into a short sequence: C = 16 with L =
# 97 is 6 full chunks and a partial one; L = 128 is whole chunks (no padding).
@pytest.mark.parametrize("L", [16, 97, 128])
@pytest.mark.parametrize("case", ["causal_elu1_gqa_mask_state_D80", "causal_relu_unnormalised_scale"])
def test_many_chunks(case, L, monkeypatch):
    monkeypatch.setattr(torch_backend, "CHUNK", 16)
    check_case(CASES[case].with_(L=L), torch.float32)


# Large calls run one slice of KV heads (of one batch element) at a time; tiny
# slices here put every (batch, head) in its own.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["causal_elu1_gqa_mask_state_D80", "noncausal_softmax_gqa_mask",
                                  "noncausal_elu1_L63_S97_gqa_mask_state"])
def test_head_slices(case, dtype, monkeypatch):
    monkeypatch.setattr(torch_backend, "SLICE_ELEMENTS", 5000)
    check_case(CASES[case], dtype)


def test_bf16():
    check_case(Case(L=97, H=4, Hkv=2, mask=True, state=True), torch.bfloat16)


def test_float64_is_exact():
    check_case(Case(L=97, H=4, Hkv=2, mask=True, state=True), torch.float64)


def test_reference_backend():
    check_case(Case(L=63, state=True, mask=True), torch.float32, backend="reference")


def _pair(x, y):
    return torch.cat([F.relu(x), F.elu(-y) + 1], -1)


def test_callable_feature_map():
    """A callable runs in torch before the core (autograd through it); D' = 2D here."""
    fm = lambda x: _pair(x, x)
    check_case(Case(L=97, H=4, Hkv=2, feature_map=fm, mask=True, state=True), torch.float32)
    check_case(Case(L=63, S=40, causal=False, feature_map=fm, state=True), torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep(dtype):
    """Long tier: sizes x maps x causal x normalize."""
    for L, D, fm, causal, norm in itertools.product((1, 2, 63, 64, 65, 97, 1025), (16, 40, 64, 80, 128),
                                                     ("identity", "elu1", "relu", "softmax"), (True, False),
                                                     (True, False)):
        if fm == "softmax" and causal:
            continue
        c = Case(B=1, H=4, Hkv=2, L=L, S=L if causal else max(1, L // 2 + 3), D=D, feature_map=fm, causal=causal,
                 normalize=norm, mask=True, state=fm != "softmax",
                 inputs="positive" if fm == "identity" and norm else "normal")
        check_case(c, dtype, seed=L * 7 + D)


# --------------------------------------------------------------- carry-over

def _qkv(B, H, Hkv, L, D, Dv, seed=0, S=None):
    g = torch.Generator().manual_seed(seed)
    S = L if S is None else S
    return (0.5 * torch.randn(B, H, L, D, generator=g), 0.5 * torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, Dv, generator=g))


@pytest.mark.parametrize("feature_map", ["elu1", "relu"])
def test_causal_chunks_then_decode_equal_one_call(feature_map):
    """A prompt in pieces (one spanning chunk boundaries), then 16 decode steps of
    L = 1, each passing the last state: the outputs, final state and every
    gradient (through the chain of states) equal one call's."""
    check_pieces_equal_one_call("torch", 2, 4, 2, 230, 24, 16,
                                [(0, 70), (70, 134), (134, 214)] + [(i, i + 1) for i in range(214, 230)], feature_map)


def test_noncausal_state_is_the_sum_over_every_key():
    """Keys in three calls, the state carried; queries against the last: equals
    one call over every key."""
    B, H, Hkv, L, S, D, Dv = 2, 4, 4, 50, 150, 16, 24
    q, k, v = _qkv(B, H, Hkv, L, D, Dv, S=S)
    one, (kv1, z1) = tfk.linear_attention(q, k, v, causal=False, return_state=True)
    state = None
    for a, b in ((0, 40), (40, 100), (100, 150)):
        out, state = tfk.linear_attention(q, k[:, :, a:b], v[:, :, a:b], causal=False, initial_state=state,
                                          return_state=True)
    torch.testing.assert_close(out, one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[0], kv1, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(state[1], z1, rtol=1e-5, atol=1e-4)


def test_reference_equals_token_recurrence():
    """The reference's quadratic form against the recurrence it stands for,
    computed token by token in float64: kv_t = kv_{t-1} + phi_k_t v_t^T."""
    B, H, Hkv, L, D, Dv = 2, 4, 2, 9, 5, 3
    q, k, v = (t.double() for t in _qkv(B, H, Hkv, L, D, Dv, seed=11))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    kv0, z0 = torch.randn(B, Hkv, D, Dv, dtype=torch.float64), torch.rand(B, Hkv, D, dtype=torch.float64)
    scale, eps = 0.7, 0.01
    pq, pk = scale * (F.elu(q) + 1), (F.elu(k) + 1) * mask[:, None, :, None]
    out = torch.empty(B, H, L, Dv, dtype=torch.float64)
    kv, z = kv0.clone(), z0.clone()
    for t in range(L):
        kv = kv + pk[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + pk[:, :, t]
        for h in range(H):
            kh = h // (H // Hkv)
            num = torch.einsum("bd,bde->be", pq[:, h, t], kv[:, kh])
            out[:, h, t] = num / ((pq[:, h, t] * z[:, kh]).sum(-1, keepdim=True) + eps)
    ref, (rkv, rz) = linear_attention_reference(q, k, v, causal=True, scale=scale, eps=eps, key_padding_mask=mask,
                                                initial_state=(kv0, z0))
    torch.testing.assert_close(ref, out)
    torch.testing.assert_close(rkv, kv)
    torch.testing.assert_close(rz, z)
    # non-causal: every query reads the final sums
    ref, _ = linear_attention_reference(q, k, v, causal=False, scale=scale, eps=eps, key_padding_mask=mask,
                                        initial_state=(kv0, z0))
    G = H // Hkv
    want = torch.einsum("bhld,bhde->bhle", pq, kv.repeat_interleave(G, 1)) / \
        ((pq * z.repeat_interleave(G, 1)[:, :, None]).sum(-1, keepdim=True) + eps)
    torch.testing.assert_close(ref, want)


def test_reference_softmax_maps():
    """Efficient Attention's maps by hand: phi(q) over D, phi(k) over the unmasked positions."""
    q, k, v = (t.double() for t in _qkv(1, 2, 2, 6, 4, 3, S=5))
    mask = torch.tensor([[1, 0, 1, 1, 0]], dtype=torch.bool)
    out, _ = linear_attention_reference(q, k, v, causal=False, feature_map="softmax", normalize=False,
                                        key_padding_mask=mask)
    kept = mask[0]
    pk = k[:, :, kept].softmax(-2)                        # over the 3 kept positions only
    want = q.softmax(-1) @ (pk.transpose(-1, -2) @ v[:, :, kept])
    torch.testing.assert_close(out, want)


# ------------------------------------------------------------------- errors

def _args(**over):
    q, k, v = _qkv(2, 4, 2, 8, 8, 6)
    base = dict(query=q, key=k, value=v)
    base.update(over)
    return base


ERRORS = {
    "query_rank": (dict(query=torch.zeros(2, 4, 8)), ValueError, "query must be 4-D"),
    "value_rank": (dict(value=torch.zeros(2, 2, 8)), ValueError, "value must be 4-D"),
    "not_a_tensor": (dict(key=[1, 2]), TypeError, "key must be a torch.Tensor"),
    "int_query": (dict(query=torch.zeros(2, 4, 8, 8, dtype=torch.int32)), TypeError, "query must be float16"),
    "dtype_mismatch": (dict(value=torch.zeros(2, 2, 8, 6, dtype=torch.float64)), TypeError,
                       "value has dtype torch.float64, expected query's dtype torch.float32"),
    "heads_not_multiple": (dict(query=torch.zeros(2, 3, 8, 8)), ValueError, "multiple of key/value heads"),
    "head_dim_mismatch": (dict(key=torch.zeros(2, 2, 8, 7), value=torch.zeros(2, 2, 8, 6)), ValueError,
                          "key's head dim 7"),
    "value_length": (dict(value=torch.zeros(2, 2, 9, 6)), ValueError, "value must be"),
    "batch_mismatch": (dict(key=torch.zeros(3, 2, 8, 8)), ValueError, "batch sizes differ"),
    "causal_L_ne_S": (dict(key=torch.zeros(2, 2, 9, 8), value=torch.zeros(2, 2, 9, 6)), ValueError,
                      r"causal=True needs .*\(L == S\)"),
    "softmax_causal": (dict(feature_map="softmax"), ValueError, "feature_map='softmax' needs causal=False"),
    "softmax_state": (dict(feature_map="softmax", causal=False, return_state=True), ValueError,
                      "feature_map='softmax' carries no state"),
    "unknown_feature_map": (dict(feature_map="gelu"), ValueError, "feature_map must be one of"),
    "mask_shape": (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError,
                   r"key_padding_mask must be \(B, S\) = \(2, 8\)"),
    "mask_dtype": (dict(key_padding_mask=torch.ones(2, 8)), TypeError, "key_padding_mask must be bool"),
    "state_not_pair": (dict(initial_state=torch.zeros(2, 2, 8, 6)), TypeError, "initial_state must be None or a pair"),
    "state_kv_shape": (dict(initial_state=(torch.zeros(2, 4, 8, 6), torch.zeros(2, 2, 8))), ValueError,
                       r"initial_state\[0\] \(kv\) must be"),
    "state_z_shape": (dict(initial_state=(torch.zeros(2, 2, 8, 6), torch.zeros(2, 2, 6))), ValueError,
                      r"initial_state\[1\] \(z\) must be"),
    "state_dtype": (dict(initial_state=(torch.zeros(2, 2, 8, 6, dtype=torch.float16), torch.zeros(2, 2, 8))),
                    TypeError, r"initial_state\[0\] \(kv\) must be torch.float32"),
    "eps_negative": (dict(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    "scale_nan": (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    "causal_not_bool": (dict(causal=1), TypeError, "causal must be a bool"),
    "callable_bad_shape": (dict(feature_map=lambda x: x[..., :3, :]), ValueError, r"feature_map\(query\) must be"),
    "callable_dims_differ": (dict(feature_map=lambda x: torch.cat([x, x[..., :x.shape[1]]], -1)), ValueError,
                             "feature_map gave query"),
    "callable_state_dim": (dict(feature_map=lambda x: torch.cat([x, x], -1),
                                initial_state=(torch.zeros(2, 2, 8, 6), torch.zeros(2, 2, 8))), ValueError,
                           r"\(B, Hkv, D', Dv\) = \(2, 2, 16, 6\)"),
    "unknown_backend": (dict(backend="nope"), ValueError, "backend must be 'auto' or one of"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_named_errors(name):
    over, exc, match = ERRORS[name]
    args = _args(**over)
    with pytest.raises(exc, match=match):
        tfk.linear_attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)


# ------------------------------------------------ custom ops, compile, memory

def _op_args(causal, fm, mask, state, requires_grad=True):
    q, k, v = _qkv(2, 4, 2, 70 if causal else 30, 8, 6, S=70)
    m = torch.rand(2, 70, generator=torch.Generator().manual_seed(1)) < 0.8 if mask else None
    kv0, z0 = (torch.randn(2, 2, 8, 6), torch.rand(2, 2, 8)) if state else (None, None)
    ts = [t.requires_grad_(requires_grad) if t is not None else None for t in (q, k, v, kv0, z0)]
    return (ts[0], ts[1], ts[2], m, ts[3], ts[4], fm, causal, True, 1e-6, 0.5)


@pytest.mark.parametrize("causal,fm,mask,state", [(True, "elu1", True, True), (False, "relu", False, True),
                                                  (False, "softmax", True, False), (True, "identity", False, False)])
def test_opcheck(causal, fm, mask, state):
    torch.library.opcheck(TorchBackend._op.op, _op_args(causal, fm, mask, state))


def test_torch_compile_fullgraph():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 70, 8, 6))
    mask = torch.rand(2, 70, generator=torch.Generator().manual_seed(2)) < 0.8
    state = (torch.randn(2, 2, 8, 6, requires_grad=True), torch.rand(2, 2, 8, requires_grad=True))

    def f(q, k, v, kv0, z0):
        out, (kv, z) = tfk.linear_attention(q, k, v, key_padding_mask=mask, initial_state=(kv0, z0),
                                            return_state=True)
        nc = tfk.linear_attention(q, k, v, causal=False, feature_map="softmax")
        return (out * out).sum() + kv.sum() + z.sum() + nc.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = compiled(q, k, v, *state)
    ga = torch.autograd.grad(a, [q, k, v, *state])
    b = f(q, k, v, *state)
    gb = torch.autograd.grad(b, [q, k, v, *state])
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_backward_keeps_only_inputs_out_and_den():
    """Between forward and backward the torch backend keeps q, k, v, the mask,
    the state, out and den (B, H, L): no per-chunk state, nothing quadratic."""
    B, H, L, D = 1, 2, 512, 16
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, H, L, D, D))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        out = tfk.linear_attention(q, k, v, key_padding_mask=torch.ones(B, L, dtype=torch.bool))
    allowed = sum(t.numel() * t.element_size() for t in (q, k, v, out)) + B * L + B * H * L * 4
    assert sum(saved) <= allowed, f"saved {sum(saved)} bytes, inputs + out + den are {allowed}"


def test_auto_picks_torch_and_env(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 5, 4, 4)
    with tfk.backends.record_choices() as names:
        tfk.linear_attention(q, k, v)
        monkeypatch.setenv("TFK_BACKEND", "reference")
        tfk.linear_attention(q, k, v)
        monkeypatch.setenv("TFK_BACKEND", "sdpa")       # another family's backend: this family's auto
        tfk.linear_attention(q, k, v)
    assert names == ["torch", "reference", "torch"]
    assert tfk.backend_names("linear") == ["triton", "cuda", "torch", "reference", "cuda-sim"]


def test_no_grad_path_and_poisoned_buffer():
    """Without gradients the op runs directly; out comes from new_output (NaN in
    tests) and every element is written."""
    assert tfk.backends.POISON_OUTPUTS
    q, k, v = _qkv(2, 4, 2, 97, 40, 24)
    with torch.no_grad():
        for causal in (True, False):
            out = tfk.linear_attention(q, k, v, causal=causal)
            assert not torch.isnan(out).any()
