"""The CUDA C++ MoE kernels (csrc/moe/) through their launchers
(tfk/ops/moe/cuda_kernels.py), against float64 oracles written here.

On CPU tensors the kernels run through the host-execution layer (tfk._sim,
torch.ops.tfk_sim): fp16 and bf16 on the emulated mma.sync / ldmatrix /
cp.async, fp32 on the FMA path. The GPU tests at the end run the same cases
on CUDA tensors (torch.ops.tfk) and skip without a GPU.

Each oracle is the operation's definition, a loop over groups or slots in
torch ops; the kernel's error must stay within twice torch's own error in the
same dtype (the oracle run in that dtype) plus a floor (tests/tolerances.py's
rule). Outputs start as NaN; inputs that must not be read are NaN or
sentinel ids.
"""
import importlib
import inspect
import os

import pytest
import torch
import torch.nn.functional as F

from tfk import backends
from tfk.ops.moe import cuda_kernels as ck
from helpers import require_backend
from tolerances import max_err

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float32, id="fp32")]
ACTS = [None, "silu", "gelu_tanh", "relu"]


@pytest.fixture(autouse=True)
def _sim(monkeypatch):
    require_backend("cuda-sim")  # skips only without a C++ compiler; a broken build fails
    monkeypatch.setattr(backends, "POISON_OUTPUTS", True)  # outputs start as NaN
    # TFK_MOE_SIM_LIBRARY=path:namespace runs this file against another build
    # of the kernels (how the planted bugs were shown to fail it).
    alt = os.environ.get("TFK_MOE_SIM_LIBRARY")
    if alt:
        path, ns = alt.rsplit(":", 1)
        torch.ops.load_library(path)
        monkeypatch.setattr(ck, "ops", lambda device: getattr(torch.ops, ns))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def check(name, got, ref64, lowp, dtype):
    """got within 2x torch's error in dtype (``lowp``: the oracle run in
    dtype) plus a floor, of the float64 oracle; no NaN."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert got.dtype == lowp.dtype, f"{name}: dtype {got.dtype} != {lowp.dtype}"
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten or wrongly read element)"
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    bound = 2 * max_err(lowp, ref64) + FLOOR[dtype] * scale
    err = max_err(got, ref64)
    assert err <= bound, f"{name}: err {err:.3g} > bound {bound:.3g}"


# -----------------------------------------------------------------------------
# Oracles (definitions, in any dtype)
# -----------------------------------------------------------------------------

ACT_FN = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def gemm_oracle(a, b, offs, gather, trans_b, act, row_scale):
    """Row r < offs[-1] of group g: act(A[r] @ W_g) * row_scale[r]; rows past offs[-1]: 0."""
    ends = [int(e) for e in offs]
    M = gather.shape[0] if gather is not None else a.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(M, N // 2 if act else N, dtype=a.dtype)
    start = 0
    for g, end in enumerate(ends):
        rows = gather[start:end] if gather is not None else torch.arange(start, end)
        w = b[g].t() if trans_b else b[g]
        y = a[rows] @ w
        if act:
            y = ACT_FN[act](y[:, : N // 2]) * y[:, N // 2:]
        if row_scale is not None:
            y = y * row_scale[start:end, None].to(a.dtype)
        out[start:end] = y
        start = end
    return out


def gemm_tn_oracle(a, b, offs, gather_a):
    """c[g] = A[rows_g]^T @ b[rows_g]; an empty group gives zeros."""
    G, K, N = len(offs), a.shape[1], b.shape[1]
    out = torch.zeros(G, K, N, dtype=a.dtype)
    start = 0
    for g, end in enumerate(int(e) for e in offs):
        rows = gather_a[start:end] if gather_a is not None else torch.arange(start, end)
        out[g] = a[rows].t() @ b[start:end]
        start = end
    return out


def combine_oracle(y, index, k):
    """out[t] = sum over slots s, in order, of y[index[t*k+s]] (-1: nothing)."""
    T = index.shape[0] // k
    out = torch.zeros(T, y.shape[1], dtype=y.dtype)
    for t in range(T):
        for s in range(k):
            i = int(index[t * k + s])
            if i >= 0:
                out[t] = out[t] + y[i]
    return out


def act_bwd_oracle(gate_up, grad_h, act):
    x = gate_up.detach().clone().requires_grad_()
    I = x.shape[1] // 2
    (ACT_FN[act](x[:, :I]) * x[:, I:]).backward(grad_h)
    return x.grad


# -----------------------------------------------------------------------------
# Cases
# -----------------------------------------------------------------------------

# name: (M rows of C, source rows of a (gather) or None, group counts, K,
# columns of C, trans_b, row_scale). Counts summing below M leave a tail of
# rows past offs[-1] (written 0, gather ids there are sentinels -1).
GEMM_CASES = {
    "M1_G1": (1, None, [1], 40, 24, False, False),
    "M7_G3_empty_gather_transb_scale": (7, 5, [3, 0, 4], 40, 16, True, True),
    "M301_G8_empties_tail_gather_scale": (301, 280, [40, 0, 100, 0, 0, 61, 50, 0], 72, 72, False, True),
    "M130_G3_all_in_one_transb": (130, None, [0, 130, 0], 24, 80, True, False),
}


def gemm_inputs(case, dtype, act, seed=0):
    M, src, counts, K, n_out, trans_b, scaled = GEMM_CASES[case]
    g = gen(seed)
    N = 2 * n_out if act else n_out
    G = len(counts)
    a = torch.randn(src or M, K, generator=g, dtype=torch.float64)
    b = torch.randn(G, N, K, generator=g, dtype=torch.float64) / K ** 0.5
    if not trans_b:
        b = b.transpose(1, 2).contiguous()
    offs = torch.tensor(counts).cumsum(0)
    used = int(offs[-1])
    gather = None
    if src is not None:
        gather = torch.randint(0, src, (M,), generator=g)
        gather[used:] = -1  # sentinels: never read
    row_scale = torch.rand(M, generator=g, dtype=torch.float32) + 0.5 if scaled else None
    return a, b, offs, gather, trans_b, row_scale


@pytest.mark.parametrize("case", list(GEMM_CASES))
@pytest.mark.parametrize("act", ACTS, ids=lambda a: str(a))
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm(case, act, dtype):
    a, b, offs, gather, trans_b, row_scale = gemm_inputs(case, dtype, act)
    got = ck.grouped_gemm(a.to(dtype), b.to(dtype), offs, gather=gather, trans_b=trans_b, act=act,
                          row_scale=row_scale)
    ref = gemm_oracle(a, b, offs, gather, trans_b, act, row_scale)
    lowp = gemm_oracle(a.to(dtype), b.to(dtype), offs, gather, trans_b, act, row_scale)
    check("c", got, ref, lowp, dtype)
    used = int(offs[-1])
    assert torch.equal(got[used:], torch.zeros_like(got[used:])), "rows past offs[-1] must be 0"


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_op_writes_every_element_of_a_poisoned_buffer(dtype):
    """The op itself (no launcher) over a NaN buffer: rows past offs[-1] are
    exactly 0, every other element written; int32 offsets and gather ids pass
    through the launcher as int64."""
    a, b, offs, gather, trans_b, row_scale = gemm_inputs("M301_G8_empties_tail_gather_scale", dtype, "silu", 3)
    out = torch.full((301, 72), float("nan"), dtype=dtype)
    ck.ops(a.device).moe_grouped_gemm.out(a.to(dtype), b.to(dtype), offs, gather, trans_b, "silu", row_scale,
                                          out=out)
    ref = gemm_oracle(a, b, offs, gather, trans_b, "silu", row_scale)
    lowp = gemm_oracle(a.to(dtype), b.to(dtype), offs, gather, trans_b, "silu", row_scale)
    check("c", out, ref, lowp, dtype)
    assert torch.equal(out[251:], torch.zeros(50, 72, dtype=dtype))
    got32 = ck.grouped_gemm(a.to(dtype), b.to(dtype), offs.int(), gather=gather.int(), act="silu",
                            row_scale=row_scale)
    assert torch.equal(got32, out)


# name: (rows of b, source rows of a (gather_a) or None, group counts, K, N)
TN_CASES = {
    "M1_G1": (1, None, [1], 8, 16),
    "M7_G3_empty_gather": (7, 5, [3, 0, 4], 40, 24),
    "M301_G8_empties_tail_gather": (301, 280, [40, 0, 100, 0, 0, 61, 50, 0], 72, 80),
    "M130_G3_all_in_one": (130, None, [0, 130, 0], 16, 24),
}


@pytest.mark.parametrize("case", list(TN_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_tn(case, dtype):
    M, src, counts, K, N = TN_CASES[case]
    g = gen(1)
    a = torch.randn(src or M, K, generator=g, dtype=torch.float64)
    b = torch.randn(M, N, generator=g, dtype=torch.float64)
    offs = torch.tensor(counts).cumsum(0)
    used = int(offs[-1])
    b[used:] = float("nan")  # rows past offs[-1] must not be read
    gather = None
    if src is not None:
        gather = torch.randint(0, src, (M,), generator=g)
        gather[used:] = -1
    got = ck.grouped_gemm_tn(a.to(dtype), b.to(dtype), offs, gather_a=gather)
    ref = gemm_tn_oracle(a, b, offs, gather)
    lowp = gemm_tn_oracle(a.to(dtype), b.to(dtype), offs, gather)
    check("c", got, ref, lowp, dtype)
    for gi, c in enumerate(counts):
        if c == 0:
            assert torch.equal(got[gi], torch.zeros_like(got[gi])), f"empty group {gi} must give zeros"
    again = ck.grouped_gemm_tn(a.to(dtype), b.to(dtype), offs, gather_a=gather)
    assert torch.equal(got, again), "not deterministic"


# name: (tokens, k, H, rows of y)
COMBINE_CASES = {"T1_k1": (1, 1, 8, 3), "T7_k2": (7, 2, 24, 14), "T301_k8": (301, 8, 40, 2000)}


@pytest.mark.parametrize("case", list(COMBINE_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine(case, dtype):
    T, k, H, My = COMBINE_CASES[case]
    g = gen(2)
    y = torch.randn(My, H, generator=g, dtype=torch.float64)
    index = torch.randperm(My, generator=g)[: T * k] if My >= T * k else torch.randint(0, My, (T * k,), generator=g)
    drop = torch.rand(T * k, generator=g) < 0.3
    if T * k > 1:
        index[drop] = -1
        index[0] = -1  # at least one dropped slot
    unused = torch.ones(My, dtype=torch.bool)
    unused[index[index >= 0]] = False
    y[unused] = float("nan")  # rows no slot names must not be read
    got = ck.combine(y.to(dtype), index, k)
    ref = combine_oracle(y, index, k)
    lowp = combine_oracle(y.to(dtype), index, k)
    check("out", got, ref, lowp, dtype)
    assert torch.equal(got, ck.combine(y.to(dtype), index, k)), "not deterministic"


@pytest.mark.parametrize("act", ACTS[1:])
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_backward(act, dtype):
    g = gen(4)
    gate_up = 3 * torch.randn(7, 48, generator=g, dtype=torch.float64)
    grad_h = torch.randn(7, 24, generator=g, dtype=torch.float64)
    got = ck.act_backward(gate_up.to(dtype), grad_h.to(dtype), act)
    ref = act_bwd_oracle(gate_up, grad_h, act)
    lowp = act_bwd_oracle(gate_up.to(dtype), grad_h.to(dtype), act)
    check("grad", got, ref, lowp, dtype)


# -----------------------------------------------------------------------------
# route
# -----------------------------------------------------------------------------

def route_oracle(logits, k, score, normalize, bias, n_group, topk_group, scaling):
    """Routing by its definition in float64, choices by a stable descending
    sort: (weights, experts, margin), margin the least relative gap between
    the ranked scores that decide the result (a float32 kernel agrees where
    it is not tiny)."""
    x = logits.double()
    s = torch.softmax(x, -1) if score == "softmax" else torch.sigmoid(x)
    choice = s + bias.double() if bias is not None else s.clone()
    T, E = x.shape
    margin = float("inf")

    def ranked(v, n):
        vals, ids = torch.sort(v, dim=-1, descending=True, stable=True)
        head = vals[:, :n + 1]
        gaps = (head[:, :-1] - head[:, 1:]) / head[:, :-1].abs().clamp_min(1e-30)  # relative: fp32 resolves it
        return ids[:, :n], float(gaps.min()) if gaps.numel() else float("inf")

    if n_group is not None and topk_group < n_group:
        gs = E // n_group
        gscore = choice.view(T, n_group, gs).topk(2, dim=-1).values.sum(-1)
        kept, margin = ranked(gscore, topk_group)
        keep = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, kept, True)
        choice = choice.masked_fill(~keep.repeat_interleave(gs, 1), float("-inf"))
    experts, gap = ranked(choice, k)
    w = s.gather(1, experts)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if score == "sigmoid" else 0.0))
    return w * scaling, experts, min(margin, gap)


# (T, E, k, score, normalize, bias, n_group, topk_group, scaling)
ROUTE_CASES = {
    "T1_E1_k1": (1, 1, 1, "softmax", True, False, None, None, 1.0),
    "T7_E8_k2": (7, 8, 2, "softmax", True, False, None, None, 1.0),
    "T301_E64_k8_raw": (301, 64, 8, "softmax", False, False, None, None, 1.0),
    "T7_E60_k4_bias": (7, 60, 4, "softmax", True, True, None, None, 1.0),
    "T9_E8_k1_sigmoid_scaled": (9, 8, 1, "sigmoid", False, False, None, None, 3.0),
    "T37_E64_k6_deepseek": (37, 64, 6, "sigmoid", True, True, 8, 3, 2.5),
    "T7_E256_k8_deepseek": (7, 256, 8, "sigmoid", True, True, 8, 4, 2.5),
    "T7_E256_k2_groups_of_2": (7, 256, 2, "sigmoid", True, True, 128, 3, 1.0),
    "T7_E24_k4_groups_softmax": (7, 24, 4, "softmax", True, False, 6, 2, 1.0),
    "T7_E16_k2_all_groups_kept": (7, 16, 2, "sigmoid", True, True, 4, 4, 1.0),
    "T7_E64_k8_large_logits": (7, 64, 8, "softmax", True, False, None, None, 1.0),
}
LOGIT_SCALE = {"T7_E64_k8_large_logits": 40.0}  # logits to +-160: exp overflows without the row max


def route_logits(T, E, g, dtype, scale=1.0):
    """(T, E): each row distinct multiples of 1/32 or 1/8 within [-4, 4) or
    [-E/16, E/16), times ``scale``, exact in fp16 and bf16 (no ties made by
    rounding), in a range where sigmoid does not saturate to near ties."""
    step = min(1 / 8, 8 / E) * scale
    return ((torch.stack([torch.randperm(E, generator=g) for _ in range(T)]) - E // 2) * step).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_route(case, dtype):
    """Weights, ids and per-expert counts (== bincount of the ids) against the
    float64 oracle; ids and counts start poisoned (-1)."""
    T, E, k, score, normalize, use_bias, n_group, topk_group, scaling = ROUTE_CASES[case]
    g = gen(len(case) * 7 + E)
    logits = route_logits(T, E, g, dtype, LOGIT_SCALE.get(case, 1.0))
    bias = torch.randn(E, generator=g) * 0.5 if use_bias else None
    w, ex, counts = ck.route(logits, k, score=score, normalize=normalize, bias=bias, n_group=n_group,
                             topk_group=topk_group, scaling=scaling)
    assert w.dtype == torch.float32 and ex.dtype == torch.int64 and counts.dtype == torch.int64
    rw, rex, margin = route_oracle(logits, k, score, normalize, bias, n_group, topk_group, scaling)
    assert margin > 1e-5, "the inputs hold a near tie: pick another seed"
    assert torch.equal(ex, rex), "experts (or their order)"
    torch.testing.assert_close(w.double(), rw, rtol=2e-6, atol=2e-7 * scaling)
    assert torch.equal(counts, torch.bincount(ex.reshape(-1), minlength=E))


def test_route_ties_go_to_the_lower_index():
    """Equal choice scores: the lower expert first; equal group scores: the lower group."""
    T, E = 3, 16
    w, ex, counts = ck.route(torch.zeros(T, E), 4)
    assert ex.tolist() == [[0, 1, 2, 3]] * T and torch.equal(w, torch.full((T, 4), 0.25))
    assert counts.tolist() == [T] * 4 + [0] * 12
    _, ex, _ = ck.route(torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0]]), 3)
    assert ex.tolist() == [[1, 2, 4]]
    _, ex, counts = ck.route(torch.zeros(T, E), 6, score="sigmoid", n_group=4, topk_group=2)
    assert ex.tolist() == [[0, 1, 2, 3, 4, 5]] * T and counts.tolist() == [T] * 6 + [0] * 10
    # 4 groups of 2 with equal scores: groups 0 and 1 kept, then by choice score
    _, ex, _ = ck.route(torch.tensor([[3.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0, 3.0]]), 3, score="sigmoid", n_group=4,
                        topk_group=2)
    assert ex.tolist() == [[0, 3, 1]]


def test_route_without_tokens_zeroes_the_counts():
    w, ex, counts = ck.route(torch.zeros(0, 12), 2)
    assert w.shape == (0, 2) and ex.shape == (0, 2) and counts.tolist() == [0] * 12


def test_route_refuses_bad_arguments_by_name():
    lg = torch.randn(5, 16)
    with pytest.raises(ValueError, match=r"^logits: E = 300 experts; the kernel takes 1 to 256"):
        ck.route(torch.randn(2, 300), 2)
    with pytest.raises(ValueError, match=r"^top_k: 9; must be an int in \[1, 8\]"):
        ck.route(lg, 9)
    with pytest.raises(ValueError, match=r"^score: 'tanh'"):
        ck.route(lg, 2, score="tanh")
    with pytest.raises(ValueError, match=r"^n_group: 16 groups of 1 expert"):
        ck.route(lg, 2, n_group=16, topk_group=1)
    with pytest.raises(ValueError, match=r"^bias: expected shape \(16,\)"):
        ck.route(lg, 2, bias=torch.zeros(8))
    with pytest.raises(TypeError, match=r"^logits: dtype torch.float64"):
        ck.route(lg.double(), 2)
    op = ck.ops(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="logits has E = 300 experts; the kernel takes 1 to 256"):
        op.moe_route(torch.randn(2, 300), 2)
    with pytest.raises(RuntimeError, match=r"top_k = 9 must lie in \[1, 8\]"):
        op.moe_route(lg, 9)
    with pytest.raises(RuntimeError, match="n_group = 16 must divide E = 16 into groups of at least 2"):
        op.moe_route(lg, 2, "sigmoid", True, None, 16, 1)
    with pytest.raises(RuntimeError, match="bias must be Float"):
        op.moe_route(lg, 2, "softmax", True, torch.zeros(16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="counts must have shape"):
        op.moe_route.out(lg, 2, weights=torch.empty(5, 2), experts=torch.empty(5, 2).long(),
                         counts=torch.empty(8).long())


def test_launchers_refuse_bad_arguments_by_name():
    h = lambda *s: torch.randn(*s).half()
    offs = torch.tensor([3])
    with pytest.raises(ValueError, match=r"^K = 12 is not a multiple of 8"):
        ck.grouped_gemm(h(3, 12), h(1, 12, 16), offs)
    with pytest.raises(ValueError, match=r"^N = 20 is not a multiple of 8"):
        ck.grouped_gemm(h(3, 16), h(1, 16, 20), offs)
    with pytest.raises(ValueError, match=r"^N / 2 .* is not a multiple of 8"):
        ck.grouped_gemm(h(3, 16), h(1, 16, 24), offs, act="silu")
    with pytest.raises(ValueError, match=r"^b: its K dimension"):
        ck.grouped_gemm(h(3, 16), h(1, 16, 24), offs, trans_b=True)
    with pytest.raises(ValueError, match=r"^act:"):
        ck.grouped_gemm(h(3, 16), h(1, 16, 32), offs, act="gelu")
    with pytest.raises(ValueError, match=r"^offs:"):
        ck.grouped_gemm(h(3, 16), h(2, 16, 16), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match=r"^gather:"):
        ck.grouped_gemm(h(3, 16), h(1, 16, 16), offs, gather=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"^row_scale:"):
        ck.grouped_gemm(h(3, 16), h(1, 16, 16), offs, row_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"^K = 12 is not a multiple of 8"):
        ck.grouped_gemm_tn(h(3, 12), h(3, 16), offs)
    with pytest.raises(ValueError, match=r"^N = 4 is not a multiple of 8"):
        ck.grouped_gemm_tn(h(3, 16), h(3, 4), offs)
    with pytest.raises(ValueError, match=r"^H = 12 is not a multiple of 8"):
        ck.combine(h(3, 12), torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match=r"^index: entries"):
        ck.combine(h(3, 16), torch.tensor([0, 3]), 1)
    with pytest.raises(TypeError, match=r"^a: dtype torch.float64"):
        ck.grouped_gemm(h(3, 16).double(), h(1, 16, 16), offs)


def test_ops_refuse_what_the_kernels_cannot_take():
    """Called directly (no launcher), the ops still refuse what would read out
    of bounds, naming the argument."""
    op = ck.ops(torch.device("cpu"))
    h = lambda *s: torch.randn(*s).half()
    offs = torch.tensor([3])
    with pytest.raises(RuntimeError, match="K = 12 must be a multiple of 8"):
        op.moe_grouped_gemm(h(3, 12), h(1, 12, 16), offs)
    with pytest.raises(RuntimeError, match="offs must be non-decreasing"):
        op.moe_grouped_gemm(h(3, 16), h(2, 16, 16), torch.tensor([2, 1]))
    with pytest.raises(RuntimeError, match=r"gather\[2\] = 3 is outside"):
        op.moe_grouped_gemm(h(3, 16), h(1, 16, 16), offs, torch.tensor([0, 1, 3]))
    with pytest.raises(RuntimeError, match="offs must be Long"):
        op.moe_grouped_gemm(h(3, 16), h(1, 16, 16), offs.int())
    with pytest.raises(RuntimeError, match="act must be"):
        op.moe_grouped_gemm(h(3, 16), h(1, 16, 16), offs, None, False, "gelu")
    with pytest.raises(RuntimeError, match=r"index\[1\] = 3 must be -1 or lie in"):
        op.moe_combine(h(3, 16), torch.tensor([0, 3]), 1)
    with pytest.raises(RuntimeError, match="out must have shape"):
        op.moe_grouped_gemm.out(h(3, 16), h(1, 16, 16), offs, out=h(3, 8))


def test_signatures_match_the_triton_launchers():
    """The backends are interchangeable: the same names and signatures."""
    try:
        tk = importlib.import_module("tfk.triton_kernels.moe")
    except ImportError as e:
        pytest.skip(f"triton is not importable ({e})")
    for name in ("grouped_gemm", "grouped_gemm_tn", "combine", "act_backward", "route"):
        assert inspect.signature(getattr(ck, name)) == inspect.signature(getattr(tk, name)), name


# -----------------------------------------------------------------------------
# GPU: torch.ops.tfk on CUDA tensors
# -----------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch.ops.tfk needs one")


def _on_cuda(*xs):
    return [x.cuda() if isinstance(x, torch.Tensor) else x for x in xs]


@gpu
@pytest.mark.parametrize("case", list(GEMM_CASES))
@pytest.mark.parametrize("act", ACTS, ids=lambda a: str(a))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_grouped_gemm(case, act, dtype):
    a, b, offs, gather, trans_b, row_scale = gemm_inputs(case, dtype, act)
    ac, bc, oc, gc, sc = _on_cuda(a.to(dtype), b.to(dtype), offs, gather, row_scale)
    got = ck.grouped_gemm(ac, bc, oc, gather=gc, trans_b=trans_b, act=act, row_scale=sc).cpu()
    ref = gemm_oracle(a, b, offs, gather, trans_b, act, row_scale)
    lowp = gemm_oracle(a.to(dtype), b.to(dtype), offs, gather, trans_b, act, row_scale)
    check("c", got, ref, lowp, dtype)
    sim = ck.grouped_gemm(a.to(dtype), b.to(dtype), offs, gather=gather, trans_b=trans_b, act=act,
                          row_scale=row_scale)
    check("c (against cuda-sim)", got, sim.double(), lowp, dtype)


@gpu
@pytest.mark.parametrize("case", list(TN_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_grouped_gemm_tn(case, dtype):
    M, src, counts, K, N = TN_CASES[case]
    g = gen(1)
    a = torch.randn(src or M, K, generator=g, dtype=torch.float64)
    b = torch.randn(M, N, generator=g, dtype=torch.float64)
    offs = torch.tensor(counts).cumsum(0)
    gather = torch.randint(0, src, (M,), generator=g) if src is not None else None
    ac, bc, oc, gc = _on_cuda(a.to(dtype), b.to(dtype), offs, gather)
    got = ck.grouped_gemm_tn(ac, bc, oc, gather_a=gc).cpu()
    check("c", got, gemm_tn_oracle(a, b, offs, gather), gemm_tn_oracle(a.to(dtype), b.to(dtype), offs, gather),
          dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_combine_and_act_backward(dtype):
    g = gen(2)
    y = torch.randn(600, 40, generator=g, dtype=torch.float64)
    index = torch.randint(-1, 600, (301 * 4,), generator=g)
    got = ck.combine(*_on_cuda(y.to(dtype), index), 4).cpu()
    check("out", got, combine_oracle(y, index, 4), combine_oracle(y.to(dtype), index, 4), dtype)
    gate_up = 3 * torch.randn(301, 48, generator=g, dtype=torch.float64)
    grad_h = torch.randn(301, 24, generator=g, dtype=torch.float64)
    for act in ACTS[1:]:
        got = ck.act_backward(*_on_cuda(gate_up.to(dtype), grad_h.to(dtype)), act).cpu()
        check(f"grad {act}", got, act_bwd_oracle(gate_up, grad_h, act),
              act_bwd_oracle(gate_up.to(dtype), grad_h.to(dtype), act), dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["T301_E64_k8_raw", "T7_E256_k8_deepseek", "T7_E24_k4_groups_softmax"])
def test_gpu_route(case, dtype):
    """torch.ops.tfk's route equals the host-run kernel (tfk._sim) on the same inputs."""
    T, E, k, score, normalize, use_bias, n_group, topk_group, scaling = ROUTE_CASES[case]
    g = gen(E)
    logits = route_logits(T, E, g, dtype)
    bias = torch.randn(E, generator=g) * 0.5 if use_bias else None
    kw = dict(score=score, normalize=normalize, n_group=n_group, topk_group=topk_group, scaling=scaling)
    want = ck.route(logits, k, bias=bias, **kw)
    got = ck.route(*_on_cuda(logits, k), bias=None if bias is None else bias.cuda(), **kw)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-6, atol=1e-7)


@gpu
def test_gpu_offsets_past_2_31():
    """A gathered row whose element offset (row * K) passes 2^31, and a weight
    group whose offset (g * K * N) does: int64 offsets in the kernels."""
    dev = "cuda"
    K = 8
    rows = (1 << 31) // K + 64
    a = torch.zeros(rows, K, dtype=torch.float16, device=dev)
    a[-3:] = torch.randn(3, K, device=dev).half()
    b = torch.randn(1, K, 16, device=dev).half()
    gather = torch.tensor([rows - 1, rows - 2, rows - 3], device=dev)
    got = ck.grouped_gemm(a, b, torch.tensor([3], device=dev), gather=gather).float()
    ref = a[gather].float() @ b[0].float()
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()
    del a
    K, N = 1 << 16, 1 << 15  # b[1] starts at element K * N = 2^31
    b = torch.randn(2, K, N, dtype=torch.float16, device=dev)
    a = torch.randn(3, K, dtype=torch.float16, device=dev)
    got = ck.grouped_gemm(a, b, torch.tensor([0, 3], device=dev)).float()
    ref = a.float() @ b[1].float()
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()
    del a, b, got, ref
    torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# Shared-memory race check of the GEMM kernels (common/host_exec.h's, as
# tests/attention/test_cuda_sim.py runs it for attention): a standalone program built
# with -fsanitize=thread instrumentation and TFK_HOST_RACECHECK=1; a race
# (RAW, WAR, WAW, an access to bytes a cp.async has not delivered) throws.
# -----------------------------------------------------------------------------

RACE_MAIN = r'''
#include <cstdio>
#include <stdexcept>
#include <vector>
#include "moe/moe_gemm.cu"
#include "moe/moe_gemm_tn.cu"
#include "moe/moe_route.cu"
using namespace tfk::moe;
template <typename T> void run(Dtype dt, T one) {
  const int64_t M = 150, K = 72, N = 160, G = 3;  // 3 k-steps, 2 column tiles, a tail
  std::vector<T> a(M * K, one), b(G * K * N, one), c(M * N), ct(G * K * N);
  std::vector<int64_t> offs{50, 50, 140}, gather(M);
  for (int64_t r = 0; r < M; ++r) gather[r] = (r * 7) % M;
  std::vector<int32_t> map(2 * max_row_tiles(M, G));
  for (int gated = 0; gated < 2; ++gated) {
    for (int trans = 0; trans < 2; ++trans) {
      GemmParams p;
      p.dtype = dt; p.act = gated ? Act::kSilu : Act::kNone; p.trans_b = trans;
      p.m = M; p.k = K; p.n = N; p.groups = G;
      p.a = a.data(); p.b = b.data(); p.offs = offs.data(); p.gather = gather.data();
      p.c = c.data(); p.tile_map = map.data();
      grouped_gemm_launch(p, nullptr);
    }
  }
  GemmTnParams q;
  q.dtype = dt; q.m = M; q.k = K; q.n = N / 2; q.groups = G;
  q.a = a.data(); q.b = b.data(); q.offs = offs.data(); q.gather_a = gather.data(); q.c = ct.data();
  grouped_gemm_tn_launch(q, nullptr);
  // route: 9 rows over 64 experts in 8 groups (shared memory: the group scores)
  const int rows = 9, E = 64, k = 6;
  std::vector<T> logits(rows * E);
  std::vector<float> bias(E), w(rows * k);
  std::vector<int64_t> ids(rows * k), counts(E);
  for (int i = 0; i < rows * E; ++i) logits[i] = tfk::from_f32<T>(((i * 37) % 61) / 8.f - 4.f);
  for (int e = 0; e < E; ++e) bias[e] = ((e * 13) % 7) / 16.f;
  RouteParams r;
  r.dtype = dt; r.tokens = rows; r.experts = E; r.top_k = k; r.sigmoid = true; r.n_group = 8; r.topk_group = 3;
  r.scaling = 2.5f; r.logits = logits.data(); r.bias = bias.data(); r.weights = w.data();
  r.expert_ids = ids.data(); r.counts = counts.data();
  route_launch(r, nullptr);
  int64_t total = 0;
  for (int e = 0; e < E; ++e) total += counts[e];
  if (total != rows * k) throw std::runtime_error("route: counts do not add up to T * k");
}
int main() {
  try {
    run<__half>(Dtype::kHalf, __float2half_rn(0.5f));
    run<__nv_bfloat16>(Dtype::kBFloat16, __float2bfloat16_rn(0.5f));
    run<float>(Dtype::kFloat, 0.5f);
  } catch (const std::exception& e) { std::puts(e.what()); return 3; }
  return 0;
}
'''


def _race_program(tmp_path, edit=None):
    """Builds RACE_MAIN against csrc/moe (or a copy with ``edit`` = (file,
    old, new) applied) and runs it; returns (exit code, output)."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("g++") is None:
        pytest.skip("the race check needs g++ (-fsanitize=thread instrumentation)")
    root = Path(__file__).resolve().parents[2]
    inc = []
    if edit is not None:
        moe = tmp_path / "moe"
        shutil.copytree(root / "csrc/moe", moe)
        name, old, new = edit
        src = (moe / name).read_text()
        assert src.count(old) == 1, old
        (moe / name).write_text(src.replace(old, new))
        inc = [f"-I{tmp_path}"]
    (tmp_path / "main.cpp").write_text(RACE_MAIN)
    exe = tmp_path / "race"
    proc = subprocess.run(["g++", "-std=c++17", "-O1", "-fsanitize=thread", "-fno-gnu-unique",
                           "-DTFK_HOST_RACECHECK=1", *inc, f"-I{root / 'csrc'}", str(tmp_path / "main.cpp"),
                           "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


def test_route_race_check_catches_a_missing_syncwarp(tmp_path):
    """The check is live on the route kernel: without the __syncwarp after the
    choice scores go to shared memory, lanes read other lanes' unsynchronised writes."""
    marker = "  __syncwarp();\n  // A group's score: the sum of its two best choice scores.\n"
    rc, out = _race_program(tmp_path, ("moe_route.cu", marker, "  // A group's score\n"))
    assert rc == 3 and "RAW" in out, out


def test_gemm_kernels_have_no_shared_memory_races(tmp_path):
    rc, out = _race_program(tmp_path)
    assert rc == 0, out


def test_race_check_catches_a_missing_barrier_in_the_gemm(tmp_path):
    """The check is live on these kernels: without the barrier after each
    k-step's math, the next prefetch overwrites a buffer other warps read."""
    marker = "    __syncthreads();  // the next step's prefetch overwrites this buffer\n"
    rc, out = _race_program(tmp_path, ("moe_gemm.cu", marker, ""))
    assert rc == 3 and "WAR" in out, out
