"""The MoE Triton kernels (triton_kernels/moe.py) against float64 oracles
written here, in Triton's interpreter (fp32 and fp16; its bf16 is wrong).

Each oracle is the operation's definition, a loop over groups or slots in
torch ops; the kernel's error must stay within twice torch's own error in the
same dtype (the oracle run in that dtype) plus a floor. Outputs start as NaN,
inputs that must not be read are NaN or sentinel ids.
"""
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tfk import backends  # noqa: E402
from tfk.triton_kernels import moe  # noqa: E402
from tolerances import max_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # outputs start as NaN (tests/conftest.py does it too; this file states it)
    monkeypatch.setattr(backends, "POISON_OUTPUTS", True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def check(name, got, ref64, lowp, dtype):
    """got within 2x torch's error in dtype (``lowp``: the oracle run in
    dtype) plus a floor, of the float64 oracle; no NaN."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten or wrongly read element)"
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    bound = 2 * max_err(lowp, ref64) + FLOOR[dtype] * scale
    err = max_err(got, ref64)
    assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g}"


# -----------------------------------------------------------------------------
# Oracles (definitions, in any dtype)
# -----------------------------------------------------------------------------

ACT_FN = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def ref_grouped_gemm(a, b, offs, gather, trans_b, act, row_scale, dtype):
    a, b = a.to(dtype), b.to(dtype)
    M = gather.shape[0] if gather is not None else a.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    n_out = N // 2 if act else N
    c = torch.zeros(M, n_out, dtype=dtype)
    start = 0
    for g, end in enumerate(offs.tolist()):
        rows = torch.arange(start, end)
        x = a[gather[rows]] if gather is not None else a[rows]
        w = b[g].t() if trans_b else b[g]
        y = x @ w
        if act:
            y = ACT_FN[act](y[:, :n_out]) * y[:, n_out:]
        if row_scale is not None:
            y = y * row_scale[rows].to(dtype)[:, None]
        c[rows] = y
        start = end
    return c


def ref_grouped_gemm_tn(a, b, offs, gather_a, dtype):
    a, b = a.to(dtype), b.to(dtype)
    out = torch.zeros(offs.shape[0], a.shape[1], b.shape[1], dtype=dtype)
    start = 0
    for g, end in enumerate(offs.tolist()):
        rows = torch.arange(start, end)
        x = a[gather_a[rows]] if gather_a is not None else a[rows]
        out[g] = x.t() @ b[rows]
        start = end
    return out


def ref_combine(y, index, k, dtype):
    y = y.to(dtype)
    T = index.shape[0] // k
    out = torch.zeros(T, y.shape[1], dtype=dtype)
    for t in range(T):
        for s in range(k):
            i = int(index[t * k + s])
            if i >= 0:
                out[t] = out[t] + y[i]
    return out


def ref_route(logits, top_k, score, normalize, bias, n_group, topk_group, scaling):
    """float64 routing: (weights, experts) with torch.topk (inputs are drawn
    without ties, so its order is the kernel's)."""
    x = logits.double()
    s = torch.softmax(x, -1) if score == "softmax" else torch.sigmoid(x)
    choice = s + bias.double() if bias is not None else s.clone()
    T, E = x.shape
    if n_group is not None:
        gs = E // n_group
        gscore = choice.view(T, n_group, gs).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros(T, n_group, dtype=torch.bool)
        keep.scatter_(1, gscore.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(gs, 1), float("-inf"))
    experts = choice.topk(top_k, dim=-1, sorted=True).indices
    w = s.gather(1, experts)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if score == "sigmoid" else 0.0))
    return w * scaling, experts


# -----------------------------------------------------------------------------
# grouped_gemm
# -----------------------------------------------------------------------------

def split(M, G, seed, empty=(), tail=0):
    """offs (G,) int64: M - tail rows in G groups, the groups in ``empty``
    empty, random sizes otherwise."""
    g = gen(seed)
    used = M - tail
    full = [i for i in range(G) if i not in empty]
    cuts = torch.sort(torch.randint(0, used + 1, (len(full) - 1,), generator=g)).values.tolist()
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [used])]
    counts = [0] * G
    for i, n in zip(full, sizes):
        counts[i] = n
    return torch.tensor(counts, dtype=torch.int64).cumsum(0)


# (M, G, empty groups, tail rows past offs[-1], K, N, gather, trans_b, act, row_scale)
GEMM_CASES = {
    "M1_G1": (1, 1, (), 0, 16, 16, False, False, None, False),
    "M1_G3_tail": (1, 3, (), 1, 16, 16, True, False, None, False),
    "M7_G3_empty_tail": (7, 3, (1,), 2, 24, 24, False, False, None, False),
    "M7_G3_gather_transb": (7, 3, (0,), 0, 40, 24, True, True, None, True),
    "M301_G8_empty_tail": (301, 8, (0, 3, 7), 20, 24, 40, False, False, None, False),
    "M301_G8_gather_silu_scale": (301, 8, (2, 5), 9, 40, 48, True, True, "silu", True),
    "M301_G3_one_group": (301, 3, (0, 2), 0, 24, 16, True, False, None, False),
    "M301_G3_one_group_tail": (301, 3, (0, 2), 33, 16, 16, False, True, None, True),
    "M7_G1_gelu": (7, 1, (), 0, 24, 48, False, True, "gelu_tanh", False),
    "M7_G3_relu_gather": (7, 3, (), 1, 24, 32, True, False, "relu", True),
    "M301_G8_gelu_wide": (301, 8, (4,), 0, 16, 160, False, False, "gelu_tanh", False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_grouped_gemm(case, dtype):
    M, G, empty, tail, K, N, use_gather, trans_b, act, use_scale = GEMM_CASES[case]
    g = gen(zlib.crc32(case.encode()) % 1000)
    offs = split(M, G, 1 + len(case), empty, tail)
    used = int(offs[-1])
    if use_gather:
        Ma = M + 5
        a = torch.randn(Ma, K, generator=g, dtype=torch.float64)
        gather = torch.randint(0, Ma, (M,), generator=g)
        gather[used:] = -1  # sentinels past offs[-1]: never read
    else:
        a = torch.randn(M, K, generator=g, dtype=torch.float64)
        gather = None
    b = torch.randn(G, N, K, generator=g, dtype=torch.float64) / K ** 0.5
    if not trans_b:
        b = b.transpose(1, 2).contiguous()
    row_scale = torch.rand(M, generator=g) if use_scale else None
    a_in = a.to(dtype)
    if gather is None:
        a_in[used:] = float("nan")  # rows past offs[-1] are not read
    c = moe.grouped_gemm(a_in, b.to(dtype), offs, gather=gather, trans_b=trans_b, act=act, row_scale=row_scale)
    assert c.dtype == dtype
    ref = ref_grouped_gemm(a, b, offs, gather, trans_b, act, row_scale, torch.float64)
    lowp = ref_grouped_gemm(a, b, offs, gather, trans_b, act, row_scale, dtype)
    check("c", c, ref, lowp, dtype)
    assert (c[used:] == 0).all(), "rows past offs[-1] must be written 0"


def test_grouped_gemm_int32_offs_and_strided_inputs():
    """int32 offsets, a non-contiguous a, b given as a transposed view."""
    g = gen(3)
    M, K, N, G = 7, 16, 24, 3
    a = torch.randn(K, M, generator=g, dtype=torch.float64).t()  # strides (1, M)
    b = torch.randn(G, K, N, generator=g, dtype=torch.float64)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    c = moe.grouped_gemm(a.float(), b.float().transpose(1, 2), offs, trans_b=True)
    ref = ref_grouped_gemm(a, b, offs, None, False, None, None, torch.float64)
    check("c", c, ref, ref_grouped_gemm(a, b, offs, None, False, None, None, torch.float32), torch.float32)


@pytest.mark.parametrize("block_m", [1, 16, 64])
@pytest.mark.parametrize("seed", range(4))
def test_tile_map(block_m, seed):
    """Every row in [0, M) lies in exactly one tile, of its group (-1 past
    offs[-1]); the grid bound holds; spare tiles are empty."""
    g = gen(seed)
    M = int(torch.randint(0, 300, (1,), generator=g))
    G = int(torch.randint(1, 9, (1,), generator=g))
    offs = torch.sort(torch.randint(0, M + 1, (G,), generator=g)).values
    if seed == 0:
        offs[:] = M  # everything in group 0
    tm = moe.tile_map(offs, M, block_m)
    assert tm.dtype == torch.int64 and tm.shape[1] <= M // block_m + G + 1
    owner = torch.full((M,), -2, dtype=torch.int64)
    hits = torch.zeros(M, dtype=torch.int64)
    for start, end, grp in tm.t().tolist():
        rows = torch.arange(start, min(start + block_m, end))
        hits[rows] += 1
        owner[rows] = grp
    assert (hits == 1).all()
    expect = torch.searchsorted(offs, torch.arange(M), right=True)
    assert torch.equal(owner, torch.where(expect >= G, -1, expect))


def test_tile_map_int64_rows():
    """Row starts past 2^32 (the map is int64; only its length follows M / block_m)."""
    M = (1 << 33) + 5
    offs = torch.tensor([1 << 32, (1 << 32) + 3, 1 << 33])
    tm = moe.tile_map(offs, M, 1 << 27)
    assert tm.dtype == torch.int64
    starts, ends, groups = tm
    assert set(groups.tolist()) == {0, 1, 2, -1}
    assert int(starts[groups == 1][0]) == 1 << 32 and int(ends[groups == 1][0]) == (1 << 32) + 3
    assert int(starts[groups == -1][0]) == 1 << 33 and int(ends[groups == -1][0]) == M
    assert int(starts[groups == 2][0]) == (1 << 32) + 3


# -----------------------------------------------------------------------------
# grouped_gemm_tn
# -----------------------------------------------------------------------------

# (M, G, empty groups, tail, K, N, gather_a)
TN_CASES = {
    "M1_G1": (1, 1, (), 0, 16, 16, False),
    "M7_G3_empty_tail_gather": (7, 3, (1,), 2, 24, 16, True),
    "M301_G8_empty": (301, 8, (0, 6), 11, 40, 24, False),
    "M301_G8_gather": (301, 8, (3,), 0, 24, 72, True),
    "M301_G3_one_group": (301, 3, (0, 2), 0, 16, 24, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(TN_CASES))
def test_grouped_gemm_tn(case, dtype):
    M, G, empty, tail, K, N, use_gather = TN_CASES[case]
    g = gen(len(case))
    offs = split(M, G, 7 + len(case), empty, tail)
    used = int(offs[-1])
    Ma = M + 3 if use_gather else M
    a = torch.randn(Ma, K, generator=g, dtype=torch.float64)
    b = torch.randn(M, N, generator=g, dtype=torch.float64)
    gather = torch.randint(0, Ma, (M,), generator=g) if use_gather else None
    a_in, b_in = a.to(dtype), b.to(dtype)
    b_in[used:] = float("nan")  # rows past offs[-1] are not read
    if gather is not None:
        gather[used:] = -1
    else:
        a_in[used:] = float("nan")
    c = moe.grouped_gemm_tn(a_in, b_in, offs, gather_a=gather)
    assert c.dtype == dtype
    check("c", c, ref_grouped_gemm_tn(a, b, offs, gather, torch.float64),
          ref_grouped_gemm_tn(a, b, offs, gather, dtype), dtype)
    for e in empty:
        assert (c[e] == 0).all(), "an empty group's product is 0"
    again = moe.grouped_gemm_tn(a_in, b_in, offs, gather_a=gather)
    assert torch.equal(c, again), "not deterministic"


# -----------------------------------------------------------------------------
# Offsets past 2^31
# -----------------------------------------------------------------------------

def row_offsets_past_2_31():
    """Rows whose element offset (row * K) passes 2^31 (int32 would wrap):
    a is allocated lazily (torch.empty of 4 GiB; only the touched pages are
    real) and only its last rows are read, through gather / index."""
    K = 16
    Ma = (1 << 31) // K + 64
    a = torch.empty(Ma, K, dtype=torch.float16)
    rows = torch.tensor([Ma - 1, Ma - 7, 3, Ma - 64])
    vals = torch.randn(4, K, generator=gen(5), dtype=torch.float64)
    a[rows] = vals.half()
    ah = a[rows].double()
    b = torch.randn(2, K, 16, generator=gen(6), dtype=torch.float64)
    offs = torch.tensor([2, 4])

    c = moe.grouped_gemm(a, b.half(), offs, gather=rows)
    ref = torch.cat([ah[:2] @ b[0], ah[2:] @ b[1]])
    check("gemm", c, ref, torch.cat([ah[:2].half() @ b[0].half(), ah[2:].half() @ b[1].half()]), torch.float16)

    y = torch.randn(4, 16, generator=gen(7), dtype=torch.float64)
    tn = moe.grouped_gemm_tn(a, y.half(), offs, gather_a=rows)
    ref = torch.stack([ah[:2].t() @ y[:2], ah[2:].t() @ y[2:]])
    check("tn", tn, ref, torch.stack([ah[:2].half().t() @ y[:2].half(), ah[2:].half().t() @ y[2:].half()]),
          torch.float16)

    out = moe.combine(a, torch.tensor([Ma - 1, -1, Ma - 7, Ma - 64]), 2)
    ref = torch.stack([ah[0], ah[1] + ah[3]])
    check("combine", out, ref, ref.half(), torch.float16)


def test_row_offsets_past_2_31():
    """row_offsets_past_2_31 in a child process: a wrapped int32 offset reads
    outside the buffer and crashes the interpreter, which must fail this test,
    not end the session."""
    here = os.path.dirname(__file__)
    code = (f"import sys; sys.path.insert(0, {here!r}); "
            "import test_triton_kernels as t; t.row_offsets_past_2_31()")
    env = dict(os.environ, TFK_POISON_OUTPUTS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"exit status {r.returncode}:\n{r.stdout[-2000:]}{r.stderr[-3000:]}"


# -----------------------------------------------------------------------------
# act_backward
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
def test_act_backward(act, dtype):
    g = gen(11)
    M, I = 37, 24
    gate_up = torch.randn(M, 2 * I, generator=g, dtype=torch.float64) * 3
    gate_up[0, :I] = torch.linspace(-30, 30, I, dtype=torch.float64)  # the tails (exp over/underflow)
    grad_h = torch.randn(M, I, generator=g, dtype=torch.float64)

    def oracle(dt):
        x = gate_up.to(dt).clone().requires_grad_()
        h = ACT_FN[act](x[:, :I]) * x[:, I:]
        h.backward(grad_h.to(dt))
        return x.grad

    got = moe.act_backward(gate_up.to(dtype), grad_h.to(dtype), act)
    assert got.dtype == dtype
    check("grad_gate_up", got, oracle(torch.float64), oracle(dtype), dtype)


# -----------------------------------------------------------------------------
# combine
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k", [(1, 1), (7, 2), (301, 4), (7, 8)])
def test_combine(T, k, dtype):
    g = gen(T * 10 + k)
    My, H = T * k + 3, 40
    y = torch.randn(My, H, generator=g, dtype=torch.float64)
    index = torch.randperm(My, generator=g)[: T * k]
    index[torch.rand(T * k, generator=g) < 0.2] = -1  # dropped / sentinel slots
    if T > 1:
        index[:k] = -1  # a token with nothing
    out = moe.combine(y.to(dtype), index, k)
    assert out.dtype == dtype
    check("out", out, ref_combine(y, index, k, torch.float64), ref_combine(y, index, k, dtype), dtype)
    assert torch.equal(out, moe.combine(y.to(dtype), index, k)), "not deterministic"


# -----------------------------------------------------------------------------
# route
# -----------------------------------------------------------------------------

# (T, E, k, score, normalize, bias, n_group, topk_group, scaling)
ROUTE_CASES = {
    "mixtral": (7, 8, 2, "softmax", True, False, None, None, 1.0),
    "softmax_raw_E64_k8": (301, 64, 8, "softmax", False, False, None, None, 1.0),
    "E1": (7, 1, 1, "softmax", True, False, None, None, 1.0),
    "softmax_bias_E60": (7, 60, 4, "softmax", True, True, None, None, 1.0),
    "deepseek": (37, 64, 6, "sigmoid", True, True, 8, 3, 2.5),
    "deepseek_E256": (7, 256, 8, "sigmoid", True, True, 8, 4, 2.5),
    "sigmoid_raw": (7, 16, 4, "sigmoid", False, False, None, None, 1.0),
    "grouped_softmax_E24": (7, 24, 4, "softmax", True, False, 6, 2, 1.0),
    "groups_all_kept": (7, 16, 2, "sigmoid", True, True, 4, 4, 1.0),
    "softmax_large_logits": (7, 64, 8, "softmax", True, False, None, None, 1.0),
}
LOGIT_SPREAD = {"softmax_large_logits": 320.0}  # logits in [-160, 160): exp overflows without the max


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_route(case, dtype):
    T, E, k, score, normalize, use_bias, n_group, topk_group, scaling = ROUTE_CASES[case]
    g = gen(len(case) + E)
    # distinct values on a grid exact in fp16: no ties, so torch.topk's order is the kernel's
    logits = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float()
    logits = ((logits - E / 2) * (LOGIT_SPREAD.get(case, 8.0) / E)).to(dtype)
    bias = torch.randn(E, generator=g) * 0.5 if use_bias else None
    w, ex, counts = moe.route(logits, k, score=score, normalize=normalize, bias=bias, n_group=n_group,
                              topk_group=topk_group, scaling=scaling)
    assert w.dtype == torch.float32 and ex.dtype == torch.int64 and counts.dtype == torch.int64
    rw, rex = ref_route(logits, k, score, normalize, bias, n_group, topk_group, scaling)
    assert torch.equal(ex, rex), "experts (or their order)"
    err = max_err(w, rw)
    assert err <= 2e-6 * scaling, f"weights: err {err:.3g}"
    assert torch.equal(counts, torch.bincount(rex.reshape(-1), minlength=E))


def test_route_ties_go_to_the_lower_index():
    """Equal scores: the lower expert wins, and the lower group."""
    T, E = 3, 16
    w, ex, counts = moe.route(torch.zeros(T, E), 4)
    assert torch.equal(ex, torch.arange(4).expand(T, 4))
    assert torch.allclose(w, torch.full((T, 4), 0.25))
    # groups of 4 all tie; keep 2 groups: 0 and 1, then experts 0.. of those
    _, ex, _ = moe.route(torch.zeros(T, E), 6, score="sigmoid", n_group=4, topk_group=2)
    assert torch.equal(ex, torch.arange(6).expand(T, 6))
    assert torch.equal(counts, torch.tensor([T] * 4 + [0] * 12))


# -----------------------------------------------------------------------------
# The kernels composed: an MoE layer forward against a per-token loop
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_forward_composed(dtype):
    """route -> permute -> gate_up GEMM (gather, silu) -> down GEMM
    (routing weights) -> combine equals HF's experts loop, with an
    expert-parallel sentinel id (E) that contributes 0."""
    g = gen(21)
    T, E, k, H, I = 7, 4, 2, 16, 8
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    gate_up = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64) / H ** 0.5
    down = torch.randn(E, H, I, generator=g, dtype=torch.float64) / I ** 0.5
    w, ex, _ = moe.route(torch.randn(T, E, generator=g).to(dtype), k)
    ex[2, 1] = E  # sentinel
    order, offs, inverse = moe.permute(ex, E)
    tok = order // k
    h = moe.grouped_gemm(x.to(dtype), gate_up.to(dtype), offs, gather=tok, trans_b=True, act="silu")
    y = moe.grouped_gemm(h, down.to(dtype), offs, trans_b=True, row_scale=w.reshape(-1)[order])
    out = moe.combine(y, inverse, k)

    def oracle(dt):
        o = torch.zeros(T, H, dtype=dt)
        for t in range(T):
            for s in range(k):
                e = int(ex[t, s])
                if e < E:
                    gu = x[t].to(dt) @ gate_up[e].to(dt).t()
                    o[t] += (F.silu(gu[:I]) * gu[I:]) @ down[e].to(dt).t() * w[t, s].to(dt)
        return o

    check("out", out, oracle(torch.float64), oracle(dtype), dtype)


def test_sort_by_expert():
    ex = torch.tensor([[2, 0], [0, 3], [-1, 2], [1, 0]])
    order, offs, inverse = moe.sort_by_expert(ex, 3)
    assert order.tolist() == [1, 2, 7, 6, 0, 5, 3, 4]  # stable: by expert, then (token, slot); sentinels last
    assert offs.tolist() == [3, 4, 6]
    assert inverse.tolist() == [4, 0, 1, -1, -1, 5, 3, 2]


def ref_permute(ex, E):
    """By definition: expert e's rows are its (token, slot) flat indices in
    ascending order, experts in order, sentinels (outside [0, E)) last."""
    flat = ex.reshape(-1).tolist()
    order = [i for e in range(E) for i, x in enumerate(flat) if x == e]
    offs = torch.tensor([sum(1 for x in flat if x == e) for e in range(E)]).cumsum(0)
    inverse = [-1] * len(flat)
    for r, i in enumerate(order):
        inverse[i] = r
    order += [i for i, x in enumerate(flat) if not 0 <= x < E]
    return torch.tensor(order, dtype=torch.int64), offs, torch.tensor(inverse, dtype=torch.int64)


@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (7, 2, 8), (301, 8, 256), (301, 4, 60), (37, 8, 3), (40, 4, 8)])
def test_permute(T, k, E):
    g = gen(T + k + E)
    ex = torch.randint(-1, E + 1, (T, k), generator=g)  # -1 and E: sentinels
    if (T, k, E) == (40, 4, 8):
        ex[:] = 5  # everything on one expert
    ref = ref_permute(ex, E)
    for name, got, want in zip(("order", "offs", "inverse"), moe.permute(ex, E), ref):
        assert torch.equal(got, want), name
    for name, got, want in zip(("order", "offs", "inverse"), moe.sort_by_expert(ex, E), ref):
        assert torch.equal(got, want), f"sort_by_expert: {name}"


# -----------------------------------------------------------------------------
# Named errors
# -----------------------------------------------------------------------------

def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_errors():
    a, b, offs = torch.randn(7, 16), torch.randn(3, 16, 24), torch.tensor([2, 4, 7])
    gg = moe.grouped_gemm
    _raises(ValueError, r"^K = 12 is not a multiple of 8", gg, torch.randn(7, 12), torch.randn(3, 12, 24), offs)
    _raises(ValueError, r"^N = 20 is not a multiple of 8", gg, a, torch.randn(3, 16, 20), offs)
    _raises(ValueError, r"N / 2 .*act='silu'.* not a multiple of 8", gg, a, torch.randn(3, 16, 24), offs,
            act="silu")
    _raises(TypeError, r"^b: dtype torch.float16 differs", gg, a, b.half(), offs)
    _raises(TypeError, r"^a: dtype torch.float64", gg, a.double(), b.double(), offs)
    _raises(TypeError, r"^offs: must be an int32 or int64", gg, a, b, offs.float())
    _raises(ValueError, r"^offs: expected shape \(3,\)", gg, a, b, offs[:2])
    _raises(ValueError, r"^offs: must be non-decreasing", gg, a, b, torch.tensor([4, 2, 7]))
    _raises(ValueError, r"^offs: must be non-decreasing", gg, a, b, torch.tensor([2, 4, 8]))
    _raises(ValueError, r"^b: its K dimension is 24", gg, a, b, offs, trans_b=True)
    _raises(ValueError, r"^act: 'gelu'", gg, a, b, offs, act="gelu")
    _raises(TypeError, r"^gather: must be an int32 or int64", gg, a, b, offs, gather=torch.zeros(7))
    _raises(ValueError, r"^gather: ids of rows below", gg, a, b, offs, gather=torch.tensor([0, 1, 2, 3, 4, 5, 7]))
    _raises(TypeError, r"^row_scale: must be a float32", gg, a, b, offs, row_scale=torch.ones(7).double())
    _raises(ValueError, r"^row_scale: expected shape \(7,\)", gg, a, b, offs, row_scale=torch.ones(6))

    tn = moe.grouped_gemm_tn
    _raises(ValueError, r"^N = 12 is not a multiple of 8", tn, a, torch.randn(7, 12), offs)
    _raises(ValueError, r"^a: 6 rows, b has 7", tn, a[:6], torch.randn(7, 16), offs)
    _raises(TypeError, r"^offs: must be an int32 or int64", tn, a, torch.randn(7, 16), offs.double())

    lg = torch.randn(5, 16)
    _raises(ValueError, r"^top_k: 9", moe.route, lg, 9)
    _raises(ValueError, r"^top_k: 0", moe.route, lg, 0)
    _raises(ValueError, r"^logits: E = 300", moe.route, torch.randn(2, 300), 2)
    _raises(ValueError, r"^score: 'tanh'", moe.route, lg, 2, score="tanh")
    _raises(ValueError, r"^n_group: 5 must be a positive divisor", moe.route, lg, 2, n_group=5, topk_group=1)
    _raises(ValueError, r"^n_group: 16 groups of 1 expert", moe.route, lg, 2, n_group=16, topk_group=1)
    _raises(ValueError, r"^topk_group: 5", moe.route, lg, 2, n_group=4, topk_group=5)
    _raises(ValueError, r"^n_group and topk_group", moe.route, lg, 2, n_group=4)
    _raises(ValueError, r"^top_k: 6 exceeds the 4 experts", moe.route, lg, 6, n_group=4, topk_group=1)
    _raises(ValueError, r"^bias: expected shape \(16,\)", moe.route, lg, 2, bias=torch.zeros(8))

    _raises(ValueError, r"^act: None", moe.act_backward, torch.randn(3, 16), torch.randn(3, 8), None)
    _raises(ValueError, r"^grad_h: shape", moe.act_backward, torch.randn(3, 16), torch.randn(3, 16), "silu")
    _raises(TypeError, r"^grad_h: dtype", moe.act_backward, torch.randn(3, 16), torch.randn(3, 8).half(), "silu")

    _raises(ValueError, r"^index: length 5 is not a multiple of k = 2", moe.combine, a, torch.zeros(5).long(), 2)
    _raises(ValueError, r"^index: entries must be -1 or lie in \[0, 7\)", moe.combine, a,
            torch.tensor([0, 7]), 1)
    _raises(TypeError, r"^index: must be an int32 or int64", moe.combine, a, torch.zeros(4), 2)

    _raises(TypeError, r"^experts: must be an int32 or int64", moe.permute, torch.zeros(3, 2), 4)
    _raises(ValueError, r"^num_experts: 300", moe.permute, torch.zeros(3, 2).long(), 300)
