"""The CUDA C++ linear-attention kernels (csrc/linear/) through their
launchers (tfk/ops/linear/cuda_kernels.py), against the float64 core of the
torch backend (torch_backend.core_forward) applied to the same features.

On CPU tensors the kernels run through the host-execution layer (tfk._sim,
torch.ops.tfk_sim): fp16 and bf16 on the emulated mma.sync, fp32 on FMA. The
GPU tests at the end run the same cases on CUDA tensors and skip without one.

The features are rounded to the dtype first, so the oracle and the kernel see
the same inputs and the kernel's only error is its float32 arithmetic: it must
stay within twice torch's float32 error on those features (core_forward in
float32) plus a floor of 1e-5 * max(1, max |reference|). Outputs start as NaN.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tfk import backends
from tfk.ops.linear import cuda_kernels as ck
from tfk.ops.linear import torch_backend as tb
from helpers import require_backend
from tolerances import max_err

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float32, id="fp32")]
FLOOR = 1e-5
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _sim(monkeypatch):
    require_backend("cuda-sim")  # skips only without a C++ compiler; a broken build fails
    monkeypatch.setattr(backends, "POISON_OUTPUTS", True)  # outputs start as NaN
    # TFK_LINEAR_SIM_LIBRARY=path:namespace runs this file against another build
    # of the kernels (how the planted bugs were shown to fail it).
    alt = os.environ.get("TFK_LINEAR_SIM_LIBRARY")
    if alt:
        path, ns = alt.rsplit(":", 1)
        torch.ops.load_library(path)
        monkeypatch.setattr(ck, "ops", lambda device: getattr(torch.ops, ns))


def make_features(B, H, Hkv, L, S, D, Dv, dtype, state, seed=0, device="cpu"):
    """phi_q, phi_k (elu + 1 of normals: positive, as a feature map gives), V' = [v, 1]
    rounded to dtype, and a float32 initial state or None."""
    g = torch.Generator().manual_seed(seed)
    pq = F.elu(torch.randn(B, H, L, D, generator=g, dtype=torch.float64)) + 1
    pk = F.elu(torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)) + 1
    v = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64)
    s0 = None
    if state:
        s0 = torch.randn(B, Hkv, D, Dv + 1, generator=g, dtype=torch.float64)
        s0[..., -1] = s0[..., -1].abs() * 4  # z0 > 0: a plausible normaliser
        s0 = s0.float().to(device)
    return (pq.to(dtype).to(device), pk.to(dtype).to(device), ck.with_ones(v.to(dtype)).to(device), s0)


def oracle(pq, pk, v1, s0, causal, dtype=torch.float64):
    """torch_backend.core_forward in ``dtype`` on the same features: O' (B, H, L, E), state."""
    B, H, L, D = pq.shape
    Hkv = pk.shape[1]
    Q = pq.to(dtype).reshape(B, Hkv, H // Hkv, L, D)
    o, s = tb.core_forward(Q, pk.to(dtype), v1.to(dtype), None if s0 is None else s0.to(dtype), causal)
    return o.reshape(B, H, L, -1), s


def check(name, got, ref64, ref32):
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert got.dtype == torch.float32, f"{name}: dtype {got.dtype}"
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten or wrongly read element)"
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    bound = 2 * max_err(ref32, ref64) + FLOOR * scale
    err = max_err(got.cpu(), ref64)
    assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g} (max |ref| {scale:.3g})"


def run_case(B, H, Hkv, L, S, D, Dv, dtype, state, causal, device="cpu"):
    pq, pk, v1, s0 = make_features(B, H, Hkv, L, S, D, Dv, dtype, state, device=device)
    o, s = ck.forward(pq, pk, v1, causal=causal, state0=s0)
    pq, pk, v1 = pq.cpu(), pk.cpu(), v1.cpu()
    s0 = None if s0 is None else s0.cpu()
    o64, s64 = oracle(pq, pk, v1, s0, causal)
    o32, s32 = oracle(pq, pk, v1, s0, causal, torch.float32)
    check("o1", o, o64, o32)
    check("state", s, s64, s32)
    return o, s


# name: (B, H, Hkv, L, D, Dv, initial state). Non-causal runs use S = L + 10 keys.
CASES = {
    "L1": (1, 2, 1, 1, 40, 40, False),
    "L63_D40_Dv24_gqa_state": (2, 4, 2, 63, 40, 24, True),
    "L97_D80_Dv80_state": (1, 2, 2, 97, 80, 80, True),  # E = 81: two 64-column tiles
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_core(case, causal, dtype):
    B, H, Hkv, L, D, Dv, state = CASES[case]
    run_case(B, H, Hkv, L, L if causal else L + 10, D, Dv, dtype, state, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("feature_map", ["identity", "elu1", "relu"])
def test_forward_fuses_map_padding_and_ones(feature_map, causal, dtype):
    """feature_map, key_padding_mask and append_ones done by the kernel equal the
    features made outside it (mapped in float32 from the dtype-rounded inputs,
    rounded to dtype, masked keys zero, V' = [v, 1]) through the float64 core.
    E = 71: the column of ones falls in the second 64-column tile."""
    B, H, Hkv, L, D, Dv = 2, 4, 2, 45, 24, 70
    S = L if causal else L + 7
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(B, H, L, D, generator=g).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, Dv, generator=g).to(dtype)
    mask = torch.rand(B, S, generator=g) < 0.7
    s0 = torch.rand(B, Hkv, D, Dv + 1, generator=g) * 4
    o, s = ck.forward(q, k, v, causal=causal, state0=s0, feature_map=feature_map, key_padding_mask=mask,
                      append_ones=True)
    pq = tb.feature_map(q.float(), feature_map, -1).to(dtype)
    pk = (tb.feature_map(k.float(), feature_map, -2) * mask[:, None, :, None]).to(dtype)
    v1 = ck.with_ones(v)
    o64, s64 = oracle(pq, pk, v1, s0, causal)
    o32, s32 = oracle(pq, pk, v1, s0, causal, torch.float32)
    check("o1", o, o64, o32)
    check("state", s, s64, s32)


# ------------------------------------------------------- the softmax map

def softmax_inputs(B, H, Hkv, L, S, D, Dv, dtype, logits, seed=11):
    """q, k, v in dtype, a key mask (B, S) with batch row B - 1 all masked, and a
    float32 initial state. logits "large": q and k ~ 80 +- 30, where exp
    overflows float32 (past 88.7) unless the max is subtracted first."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    if logits == "large":
        q, k = 80 + 30 * q, 80 + 30 * k
    v = torch.randn(B, Hkv, S, Dv, generator=g).to(dtype)
    mask = torch.rand(B, S, generator=g) < 0.7
    mask[-1] = False
    s0 = torch.rand(B, Hkv, D, Dv + 1, generator=g) * 4
    return q.to(dtype), k.to(dtype), v, mask, s0


def torch_softmax_features(q, k, mask, dtype):
    """torch_backend.feature_map "softmax" in float32 on the dtype-rounded
    inputs, rounded to dtype (masked keys, and an all-masked row, 0)."""
    pq = tb.feature_map(q.float(), "softmax", -1).to(dtype)
    pk = tb.feature_map(k.float(), "softmax", -2, keep=mask[:, None, :, None]).to(dtype)
    return pq, pk


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits", ["normal", "large"])
def test_softmax_stats_match_torch(logits, dtype):
    """linear_softmax_stats: per channel the max over the kept keys and 1 / sum
    exp(k - max) (float32 on the dtype-rounded k), 0 and 0 where every key of
    the batch row is masked. S = 45 (not a multiple of the 4 position groups'
    32-row stride), D = 40 (two channel tiles, the second partial)."""
    _, k, _, mask, _ = softmax_inputs(3, 2, 2, 1, 45, 40, 8, dtype, logits)
    st = ck.softmax_stats(k, mask)
    assert st.shape == (3, 2, 2, 40) and st.dtype == torch.float32 and not torch.isnan(st).any()
    kf = k.float().masked_fill(~mask[:, None, :, None], float("-inf"))
    mx = kf[:2].amax(2)                                          # rows with a kept key
    inv = 1 / (kf[:2] - mx[:, :, None]).exp().sum(2)
    torch.testing.assert_close(st[:2, :, 0], mx, rtol=0, atol=0)
    torch.testing.assert_close(st[:2, :, 1], inv, rtol=1e-5, atol=0)
    assert (st[2] == 0).all(), "a batch row with every key masked: max 0 and 1 / sum 0"
    assert torch.equal(ck.softmax_stats(k, None)[:, :, 0], k.float().amax(2)), "no mask: every key counts"


# One rounding of a feature computed in float32 by another formula (the
# kernel's exp(k - max) * (1 / sum) and its own exp, torch's softmax) may land
# one unit in the last place of the dtype away: 2 u relative.
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}


def kernel_softmax_features(q, k, mask, dtype):
    """The kernel's phi_q and phi_k, read back exactly: phi_k from the state with
    V' = I (S columns: state[d, j] = phi_k[j, d], one product a sum), phi_q
    from O' with every key masked and S'_0 = I (O'[i, e] = phi_q[i, e])."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    eye_s = torch.eye(S).to(dtype).expand(B, Hkv, S, S).contiguous()
    _, st = ck.forward(q, k, eye_s, causal=False, feature_map="softmax", key_padding_mask=mask)
    eye_d = torch.eye(D).expand(B, Hkv, D, D).contiguous()
    o, _ = ck.forward(q, k, torch.zeros(B, Hkv, S, D, dtype=dtype), causal=False, state0=eye_d,
                      feature_map="softmax", key_padding_mask=torch.zeros_like(mask))
    return o.to(dtype), st.transpose(-1, -2).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits", ["normal", "large"])
@pytest.mark.parametrize("D", [40, 80])
def test_softmax_features_match_torch(D, logits, dtype):
    """The kernel's softmax features equal torch's (feature_map in float32 on
    the dtype-rounded inputs, rounded to dtype) within one unit in the last
    place: q rows over D channels, k over the kept positions of each channel
    (masked keys 0, batch row 2 all masked), S = 45, L = 37."""
    q, k, _, mask, _ = softmax_inputs(3, 4, 2, 37, 45, D, 8, dtype, logits)
    kq, kk = kernel_softmax_features(q, k, mask, dtype)
    pq, pk = torch_softmax_features(q, k, mask, dtype)
    rtol = 2 * UNIT[dtype] if dtype != torch.float32 else 2.0 ** -20   # fp32: a few ulps of exp
    for name, got, want in (("phi_q", kq, pq), ("phi_k", kk, pk)):
        assert not torch.isnan(got).any() and not torch.isinf(got).any(), f"{name}: NaN or inf"
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=1e-38, msg=lambda m: f"{name}: {m}")
    assert (kk[2] == 0).all() and (kk.masked_select(~mask[:, None, :, None]) == 0).all(), "masked keys: 0"
    torch.testing.assert_close(kq.double().sum(-1), torch.ones(3, 4, 37, dtype=torch.float64),
                               rtol=0, atol=D * UNIT[dtype] * 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits", ["normal", "large"])
@pytest.mark.parametrize("D", [40, 80])
def test_forward_fuses_softmax_map(D, logits, dtype):
    """feature_map "softmax" in the kernels (key statistics, then the forward
    mapping k tiles by them and q rows by their own softmax) equals torch's
    features through the float64 core: key padding with batch row 2 all masked
    (its phi_k is 0: O' = phi_q S'_0), S = 45 and L = 37 (partial chunks), GQA,
    an initial state, E = 25. The bound is check()'s plus, per element, what a
    one-ulp difference in any feature (UNIT) can move it."""
    B, H, Hkv, L, S, Dv = 3, 4, 2, 37, 45, 24
    q, k, v, mask, s0 = softmax_inputs(B, H, Hkv, L, S, D, Dv, dtype, logits)
    o, s = ck.forward(q, k, v, causal=False, state0=s0, feature_map="softmax", key_padding_mask=mask,
                      append_ones=True)
    pq, pk = torch_softmax_features(q, k, mask, dtype)
    v1 = ck.with_ones(v)
    o64, s64 = oracle(pq, pk, v1, s0, False)
    o32, s32 = oracle(pq, pk, v1, s0, False, torch.float32)
    u = 2 * UNIT[dtype]
    kv_abs = pk.double().abs().transpose(-1, -2) @ v1.double().abs()           # (B, Hkv, D, E)
    slack_s = u * kv_abs
    G = H // Hkv
    st_abs = (s0.double().abs() + 2 * kv_abs).repeat_interleave(G, 1)          # (B, H, D, E)
    slack_o = u * (pq.double().abs() @ st_abs)
    for name, got, r64, r32, slack in (("o1", o, o64, o32, slack_o), ("state", s, s64, s32, slack_s)):
        assert not torch.isnan(got).any(), f"{name}: NaN"
        scale = max(1.0, float(r64.abs().max()))
        bound = 2 * max_err(r32, r64) + FLOOR * scale + slack
        excess = (got.double() - r64).abs() - bound
        assert (excess <= 0).all(), f"{name}: err exceeds the bound by {float(excess.max()):.3g}"
    assert torch.equal(s[2], s0[2]), "every key masked: the state stays S'_0"
    again = ck.forward(q, k, v, causal=False, state0=s0, feature_map="softmax", key_padding_mask=mask,
                       append_ones=True)
    assert torch.equal(again[0], o) and torch.equal(again[1], s), "not deterministic"


def test_softmax_map_refusals():
    q, k, v, mask, _ = softmax_inputs(1, 2, 1, 8, 8, 16, 8, torch.float32, "normal")
    with pytest.raises(ValueError, match="'softmax' .* is non-causal only"):
        ck.forward(q, k, v, causal=True, feature_map="softmax", append_ones=True)
    import tfk._sim  # noqa: F401
    with pytest.raises(RuntimeError, match="the softmax feature map is non-causal only"):
        torch.ops.tfk_sim.linear_fwd(q, k, v, None, True, 3, None, True, ck.softmax_stats(k))
    with pytest.raises(RuntimeError, match="the softmax feature map needs kstats"):
        torch.ops.tfk_sim.linear_fwd(q, k, v, None, False, 3, None, True)
    with pytest.raises(RuntimeError, match="kstats must have shape"):
        torch.ops.tfk_sim.linear_fwd(q, k, v, None, False, 3, None, True, torch.zeros(1, 1, 2, 8))
    with pytest.raises(RuntimeError, match="keep must have shape"):
        torch.ops.tfk_sim.linear_softmax_stats(k, torch.ones(1, 7, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_largest_dims(dtype):
    """D = Dv = 256 (E = 257): the largest state tile and shared memory."""
    run_case(1, 1, 1, 37, 37, 256, 256, dtype, True, True)


def test_gqa_heads_read_their_kv_head():
    """Query heads 0-2 read KV head 0, 3-5 KV head 1: zeroing KV head 1's values
    zeroes exactly the numerators of heads 3-5."""
    pq, pk, v1, _ = make_features(1, 6, 2, 40, 40, 16, 8, torch.float32, False)
    v1[:, 1, :, :-1] = 0
    o, _ = ck.forward(pq, pk, v1, causal=True)
    assert (o[:, 3:, :, :-1] == 0).all() and (o[:, :3, :, :-1] != 0).all()


def test_deterministic():
    pq, pk, v1, s0 = make_features(1, 2, 1, 70, 70, 40, 40, torch.bfloat16, True)
    for causal in (True, False):
        a = ck.forward(pq, pk, v1, causal=causal, state0=s0)
        b = ck.forward(pq, pk, v1, causal=causal, state0=s0)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_empty_sequence_returns_the_initial_state():
    pq, pk, v1, s0 = make_features(1, 2, 2, 0, 0, 16, 8, torch.float16, True)
    o, s = ck.forward(pq, pk, v1, causal=True, state0=s0)
    assert o.shape == (1, 2, 0, 9) and torch.equal(s, s0)


# ----------------------------------------------------------------- refusals

def _args(**over):
    pq, pk, v1, s0 = make_features(1, 4, 2, 8, 8, 16, 8, torch.float16, True)
    kw = dict(phi_q=pq, phi_k=pk, v1=v1, state0=s0, causal=True)
    kw.update(over)
    return kw


def _call(kw):
    return ck.forward(kw["phi_q"], kw["phi_k"], kw["v1"], causal=kw["causal"], state0=kw["state0"])


h = torch.float16
REFUSALS = {
    "q_float64": (dict(phi_q=torch.ones(1, 4, 8, 16, dtype=torch.float64)), TypeError, "phi_q: dtype"),
    "q_int": (dict(phi_q=torch.ones(1, 4, 8, 16, dtype=torch.int32)), TypeError, "phi_q: dtype"),
    "k_dtype_differs": (dict(phi_k=torch.ones(1, 2, 8, 16)), TypeError, "phi_k: dtype .* differs"),
    "q_3d": (dict(phi_q=torch.ones(4, 8, 16, dtype=h)), ValueError, "phi_q: expected 4 dimensions"),
    "k_D_mismatch": (dict(phi_k=torch.ones(1, 2, 8, 24, dtype=h)), ValueError, "phi_k: expected shape"),
    "heads_not_multiple": (dict(phi_k=torch.ones(1, 3, 8, 16, dtype=h)), ValueError, "phi_k: Hkv = 3"),
    "v_length": (dict(v1=torch.ones(1, 2, 7, 9, dtype=h)), ValueError, "v1: expected shape"),
    "D_over_257": (dict(phi_q=torch.ones(1, 4, 8, 258, dtype=h), phi_k=torch.ones(1, 2, 8, 258, dtype=h),
                        state0=None), ValueError, r"D = 258 must lie in \[1, 257\]"),
    "E_over_257": (dict(v1=torch.ones(1, 2, 8, 258, dtype=h), state0=None), ValueError, r"v1: E = Dv \+ 1 = 258"),
    "causal_S_ne_L": (dict(phi_k=torch.ones(1, 2, 9, 16, dtype=h), v1=torch.ones(1, 2, 9, 9, dtype=h)),
                      ValueError, "causal needs as many keys"),
    "state_dtype": (dict(state0=torch.ones(1, 2, 16, 9, dtype=h)), TypeError, "state0: must be a float32"),
    "state_shape": (dict(state0=torch.ones(1, 2, 16, 8)), ValueError, r"state0: expected shape \(1, 2, 16, 9\)"),
    "meta_device": (dict(phi_q=torch.ones(1, 4, 8, 16, dtype=h, device="meta"),
                         phi_k=torch.ones(1, 2, 8, 16, dtype=h, device="meta"),
                         v1=torch.ones(1, 2, 8, 9, dtype=h, device="meta"), state0=None),
                    ValueError, "take CUDA tensors, or CPU tensors"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals(name):
    over, exc, msg = REFUSALS[name]
    with pytest.raises(exc, match=msg):
        _call(_args(**over))


def test_op_checks_direct_calls():
    """The op itself refuses what would make the kernel read out of bounds."""
    import tfk._sim  # noqa: F401
    pq, pk, v1, _ = make_features(1, 2, 1, 8, 8, 16, 8, torch.float32, False)
    with pytest.raises(RuntimeError, match="D = 300 must lie in"):
        torch.ops.tfk_sim.linear_fwd(torch.ones(1, 2, 8, 300), torch.ones(1, 1, 8, 300), v1, None, True)
    with pytest.raises(RuntimeError, match="v must be Float, got Half"):
        torch.ops.tfk_sim.linear_fwd(pq, pk, v1.half(), None, True)
    with pytest.raises(RuntimeError, match="s0 must have shape"):
        torch.ops.tfk_sim.linear_fwd(pq, pk, v1, torch.zeros(1, 1, 16, 8), True)


# ---------------------------------------------------------- race check
# A standalone program of the kernels built with -fsanitize=thread and
# TFK_HOST_RACECHECK=1 (common/host_exec.h): a shared-memory race (RAW, WAR,
# WAW) throws, as tests/moe/test_cuda_kernels.py runs it for the MoE kernels.

RACE_MAIN = r'''
#include <cstdio>
#include <stdexcept>
#include <vector>
#include "linear/linear_fwd.cu"
#include "linear/linear_stats.cu"
using namespace tfk::linear;
template <typename T> void run(Dtype dt, T one) {
  const int64_t B = 1, H = 2, Hkv = 1, L = 40, D = 24, E = 70;  // 2 chunks, 2 column tiles, G = 2
  std::vector<T> q(B * H * L * D, one), k(B * Hkv * L * D, one), v(B * Hkv * L * E, one);
  std::vector<float> s0(B * Hkv * D * E, 0.5f), o(B * H * L * E), s(B * Hkv * D * E);
  std::vector<uint8_t> keep(B * L, 1);
  keep[3] = 0;
  std::vector<float> kstats(B * Hkv * 2 * D);
  StatsParams sp;  // the softmax map's key statistics
  sp.dtype = dt; sp.batch = B; sp.kv_heads = Hkv; sp.len_k = L; sp.dim = D; sp.k = k.data(); sp.keep = keep.data();
  sp.stats = kstats.data();
  softmax_stats_launch(sp, nullptr);
  // fused 1: elu1, key padding and the ones column on load; 2: the softmax map (non-causal)
  for (int fused = 0; fused < 3; ++fused) {
    for (int causal = 0; causal < (fused == 2 ? 1 : 2); ++causal) {
      FwdParams p;
      p.dtype = dt; p.causal = causal; p.batch = B; p.heads = H; p.kv_heads = Hkv; p.len_q = L; p.len_k = L;
      p.dim = D; p.vdim = E; p.q = q.data(); p.k = k.data(); p.v = v.data(); p.s0 = s0.data();
      p.o = o.data(); p.s = s.data();
      if (fused) { p.fmap = fused == 2 ? FeatureMap::kSoftmax : FeatureMap::kElu1; p.keep = keep.data(); }
      if (fused) p.ones = true;
      if (fused == 2) p.kstats = kstats.data();
      fwd_launch(p, nullptr);
    }
  }
}
int main() {
  for (int dt = 0; dt < 3; ++dt) {  // the largest launch fits sm_80's 163 KiB of shared memory
    FwdParams p;
    p.dtype = static_cast<Dtype>(dt); p.dim = kMaxDim;
    if (fwd_smem_bytes(p) > 163 * 1024) { std::printf("smem %lld > 163 KiB\n", (long long)fwd_smem_bytes(p)); return 4; }
  }
  try {
    run<__half>(Dtype::kHalf, __float2half_rn(0.5f));
    run<float>(Dtype::kFloat, 0.5f);
  } catch (const std::exception& e) { std::puts(e.what()); return 3; }
  return 0;
}
'''


def _race_program(tmp_path, edit=None):
    """Builds RACE_MAIN against csrc/linear (or a copy with ``edit`` = (old,
    new) applied to linear_fwd.cu) and runs it; returns (exit code, output)."""
    if shutil.which("g++") is None:
        pytest.skip("the race check needs g++ (-fsanitize=thread instrumentation)")
    inc = []
    if edit is not None:
        lin = tmp_path / "linear"
        shutil.copytree(ROOT / "csrc/linear", lin)
        old, new = edit
        src = (lin / "linear_fwd.cu").read_text()
        assert src.count(old) == 1, old
        (lin / "linear_fwd.cu").write_text(src.replace(old, new))
        inc = [f"-I{tmp_path}"]
    (tmp_path / "main.cpp").write_text(RACE_MAIN)
    exe = tmp_path / "race"
    proc = subprocess.run(["g++", "-std=c++17", "-O1", "-fsanitize=thread", "-fno-gnu-unique",
                           "-DTFK_HOST_RACECHECK=1", *inc, f"-I{ROOT / 'csrc'}", str(tmp_path / "main.cpp"),
                           "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


def test_forward_has_no_shared_memory_races(tmp_path):
    rc, out = _race_program(tmp_path)
    assert rc == 0, out


@pytest.mark.parametrize("barrier", ["        __syncthreads();  // A complete\n",
                                     "      __syncthreads();  // the raw rows in place\n"],
                         ids=["after_qk", "before_softmax_rows"])
def test_race_check_catches_a_missing_barrier(tmp_path, barrier):
    """The check is live on this kernel: without the barrier after A = Q K^T
    (or the one between loading raw q rows and their softmax), threads read
    entries other warps have not written yet."""
    rc, out = _race_program(tmp_path, (barrier, ""))
    assert rc == 3 and "RAW" in out, out


# ---------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tfk._C on CUDA tensors)")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_forward_matches_core(case, causal, dtype):
    B, H, Hkv, L, D, Dv, state = CASES[case]
    run_case(B, H, Hkv, L, L if causal else L + 10, D, Dv, dtype, state, causal, device="cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_largest_dims_and_long_sequence(dtype):
    """D = Dv = 256 (the opt-in shared memory past 48 KiB) and 1025 positions."""
    run_case(1, 2, 1, 1025, 1025, 256, 256, dtype, True, True, device="cuda")


# ----------------------------------------------------------------- backward

def run_backward(case, causal, dtype, device="cpu"):
    B, H, Hkv, L, D, Dv, state = CASES[case]
    S = L if causal else L + 10
    pq, pk, v1, s0 = make_features(B, H, Hkv, L, S, D, Dv, dtype, state, seed=1)
    g = torch.Generator().manual_seed(2)
    do1 = torch.randn(B, H, L, Dv + 1, generator=g)
    ds = torch.randn(B, Hkv, D, Dv + 1, generator=g) if state else None
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    got = ck.backward(dev(pq), dev(pk), dev(v1), dev(do1), causal=causal, state0=dev(s0), dstate=dev(ds))

    def core(dt):
        G = H // Hkv
        c = lambda x: None if x is None else x.to(dt)  # noqa: E731
        dQ, dK, dV, dS0 = tb.core_backward(c(do1).reshape(B, Hkv, G, L, -1), c(pq).reshape(B, Hkv, G, L, D),
                                           c(pk), c(v1), c(s0), c(ds), causal)
        return dQ.reshape(B, H, L, D), dK, dV, dS0

    ref64, ref32 = core(torch.float64), core(torch.float32)
    for name, x, r64, r32 in zip(("dq", "dk", "dv1", "dstate0"), got, ref64, ref32):
        check(name, x, r64, r32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_core(case, causal, dtype):
    run_backward(case, causal, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gpu_backward_matches_core(causal, dtype):
    run_backward("L63_D40_Dv24_gqa_state", causal, dtype, device="cuda")


def test_backward_refusals():
    kw = _args()
    pq, pk, v1, s0 = kw["phi_q"], kw["phi_k"], kw["v1"], kw["state0"]
    do1 = torch.zeros(1, 4, 8, 9)
    with pytest.raises(TypeError, match="do1: must be a float32 tensor"):
        ck.backward(pq, pk, v1, do1.half(), state0=s0)
    with pytest.raises(ValueError, match=r"do1: expected shape \(1, 4, 8, 9\)"):
        ck.backward(pq, pk, v1, do1[:, :, :7], state0=s0)
    with pytest.raises(ValueError, match=r"dstate: expected shape \(1, 2, 16, 9\)"):
        ck.backward(pq, pk, v1, do1, state0=s0, dstate=torch.zeros(1, 2, 9, 16))
    with pytest.raises(ValueError, match="phi_k: Hkv = 3"):  # the forward's checks apply
        ck.backward(pq, torch.ones(1, 3, 8, 16, dtype=h), v1, do1)
