"""tfk._cpu's small-group experts kernel (csrc/moe/experts_cpu.cpp), the
torch backend's CPU forward at decode sizes: its rows op against a float64
definition row by row (every block size, odd H and I for the vector tails,
each activation, float32, bfloat16 and float16), the exact widening of every
16-bit pattern, the backend's choice of its forward op (whose permutation,
capacity, sentinels and combine test_moe_experts.py checks in mode "rows"),
and the ops' named errors."""
import pytest
import torch

import tfk
from tfk.ops.moe import experts_reference, torch_backend
from moe_cases import assert_moe_close, force_mode, make_experts_inputs, run_experts, seed_of

from helpers import sim_missing_reason

if sim_missing_reason():
    pytest.skip(sim_missing_reason(), allow_module_level=True)
import tfk._cpu  # noqa: E402,F401  (built wherever it can be: an ImportError here is a failure)

OP = torch.ops.tfk_cpu.moe_experts_rows
ACTS = {"silu": torch.nn.functional.silu, "relu": torch.nn.functional.relu,
        "gelu": lambda g: torch.nn.functional.gelu(g, approximate="tanh")}


def _rows_inputs(counts, T, H, I, seed):
    """float64 x (T, H), token (M,), ends (E,), row_weight (M,), w1, w2 for
    groups of ``counts`` rows, tokens drawn at random (repeats allowed)."""
    g = torch.Generator().manual_seed(seed)
    E, M = len(counts), sum(counts)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    token = torch.randint(0, T, (M,), generator=g)
    ends = torch.cumsum(torch.tensor(counts, dtype=torch.long), 0)
    return r(T, H), token, ends, torch.rand(M, generator=g, dtype=torch.float64) + 0.1, \
        r(E, 2 * I, H) / H ** 0.5, r(E, H, I) / I ** 0.5


def _rows_definition(x, token, ends, row_weight, w1, w2, act):
    """Each row from the definition, one at a time, in x's dtype."""
    expert = torch.repeat_interleave(torch.arange(len(ends)), torch.diff(ends, prepend=ends.new_zeros(1)))
    rows = []
    for m, e in enumerate(expert.tolist()):
        h = x[token[m]] @ w1[e].t()
        inter = h.shape[0] // 2
        rows.append(row_weight[m] * ((ACTS[act](h[:inter]) * h[inter:]) @ w2[e].t()))
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("H,I", [(16, 8), (20, 13), (7, 3), (40, 24)])
def test_rows_match_the_definition(H, I, act, dtype):
    """Groups of 0..9 rows (blocks of 4, 3, 2, 1 and their sums); H and I with
    vector tails (20 = 16 + 4, 13 = 8 + 5, 7, 3). Against the definition in
    float64 on the same (rounded) inputs; tolerance from the definition run
    in ``dtype`` (the kernel's sums and rows are float32)."""
    counts = [3, 0, 1, 9, 2, 4, 0, 5, 8, 6, 7]
    x, token, ends, rw, w1, w2 = _rows_inputs(counts, 11, H, I, seed_of(H, I, act))
    x, w1, w2 = (t.to(dtype) for t in (x, w1, w2))
    rw = rw.float()
    got = OP(x, token, ends, rw, w1, w2, act)
    assert got.dtype == torch.float32
    ref = _rows_definition(x.double(), token, ends, rw.double(), w1.double(), w2.double(), act)
    lowp = _rows_definition(x, token, ends, rw.to(dtype), w1, w2, act)
    assert_moe_close("out", got, ref, lowp, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,hot", [(16, 3), (9, 8)])
def test_every_16_bit_weight_widens_exactly(dtype, H, hot):
    """All 65536 bit patterns as up-projection weights, one expert each, read
    by the vector loads (column 3 of 16) and the scalar tail (column 8 of 9):
    with a one-hot token, gate 1, relu and a unit down weight, each row's
    first element is the weight itself: equal to torch's widening, Inf and
    subnormals included, NaN where it is NaN."""
    vals = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    E = vals.numel()
    w1 = torch.zeros(E, 2, H, dtype=dtype)
    w1[:, 0, hot] = 1
    w1[:, 1, hot] = vals
    w2 = torch.zeros(E, H, 1, dtype=dtype)
    w2[:, 0, 0] = 1
    x = torch.zeros(1, H, dtype=dtype)
    x[0, hot] = 1
    got = OP(x, torch.zeros(E, dtype=torch.long), torch.arange(1, E + 1), torch.ones(E), w1, w2, "relu")[:, 0]
    want = vals.float()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], want[~nan])


def test_rows_empty_and_nan():
    """No rows at all gives (0, H); a NaN gate weight makes its expert's rows
    NaN through every activation (relu too, as torch's) and no other rows."""
    x, token, ends, rw, w1, w2 = (t.float() if t.is_floating_point() else t
                                  for t in _rows_inputs([0, 0], 3, 8, 8, 1))
    assert OP(x, token, ends, rw, w1, w2, "silu").shape == (0, 8)
    x, token, ends, rw, w1, w2 = (t.float() if t.is_floating_point() else t
                                  for t in _rows_inputs([2, 3], 4, 8, 8, 2))
    w1[0, 0, 0] = float("nan")   # expert 0's first gate unit
    for act in ACTS:
        rows = OP(x, token, ends, rw, w1, w2, act)
        assert torch.isnan(rows[:2]).all() and not torch.isnan(rows[2:]).any(), act


def test_decode_shapes_take_the_kernel(monkeypatch):
    """CPU calls with few rows per expert run the kernel (counted), in float32,
    bfloat16 and float16; larger groups, float64 and strided weights do not;
    the result is the reference's, H and I not multiples of 8 included (the
    torch backend takes any size)."""
    calls = []
    real = torch_backend._cpu_kernel_ok
    monkeypatch.setattr(torch_backend, "_cpu_kernel_ok", lambda *a: calls.append(real(*a)) or calls[-1])
    inp = make_experts_inputs(32, 64, 6, 20, 12, seed=5)
    x, w, w1, w2 = (inp[n].float() for n in ("x", "weights", "w1", "w2"))
    with torch.no_grad():
        out = tfk.moe.experts(x, inp["ids"], w, w1, w2)
        assert calls == [True]
        ref = experts_reference(inp["x"], inp["ids"], inp["weights"], inp["w1"], inp["w2"])
        lowp = experts_reference(x, inp["ids"], w, w1, w2)
        assert_moe_close("out", out, ref, lowp, torch.float32)
        for dtype in (torch.bfloat16, torch.float16):
            out = tfk.moe.experts(x.to(dtype), inp["ids"], w, w1.to(dtype), w2.to(dtype))
            lowp = experts_reference(x.to(dtype), inp["ids"], w.to(dtype), w1.to(dtype), w2.to(dtype))
            assert_moe_close("out", out, ref, lowp, dtype)
        tfk.moe.experts(x.double(), inp["ids"], w.double(), w1.double(), w2.double())
        tfk.moe.experts(x, inp["ids"], w, w1.transpose(1, 2).contiguous().transpose(1, 2), w2)
        big = make_experts_inputs(300, 4, 2, 16, 8, seed=6)    # 150 rows per expert
        tfk.moe.experts(*(big[n].float() if n != "ids" else big[n] for n in ("x", "ids", "weights", "w1", "w2")))
    assert calls == [True, True, True, False, False, False]


def test_rows_mode_gradients(monkeypatch):
    """Forward on the kernel, backward on torch's GEMMs: every gradient against
    the float64 reference (moe_cases' check through run_experts)."""
    force_mode(monkeypatch, "rows")
    inp = make_experts_inputs(9, 8, 3, 20, 12, "sentinels", seed=7)
    fn = lambda x, i, w, a, b: tfk.moe.experts(x, i, w, a, b, activation="gelu", capacity=2)  # noqa: E731
    ref = lambda x, i, w, a, b: experts_reference(x, i, w, a, b, "gelu", 2)  # noqa: E731
    out, grads = run_experts(fn, inp, torch.float32)
    r_out, r_grads = run_experts(ref, inp, torch.float64)
    l_out, l_grads = run_experts(ref, inp, torch.float32)
    assert_moe_close("out", out, r_out, l_out, torch.float32)
    for name, g, r, low in zip(("dx", "dweights", "dgate_up", "ddown"), grads, r_grads, l_grads):
        assert_moe_close(name, g, r, low, torch.float32)


def test_op_errors_name_the_argument():
    x, token, ends, rw, w1, w2 = (t.float() if t.is_floating_point() else t
                                  for t in _rows_inputs([2, 3], 4, 8, 8, 3))
    cases = [
        ((x.double(), token, ends, rw, w1, w2, "silu"), "x must be float32, bfloat16 or float16, got Double"),
        ((x, token, ends, rw, w1.half(), w2, "silu"), "gate_up_proj must be Float, got Half"),
        ((x, token.int(), ends, rw, w1, w2, "silu"), "token must be Long"),
        ((x, token, ends[:1], rw, w1, w2, "silu"), r"ends must have shape \[2\]"),
        ((x, token, ends, rw[:2], w1, w2, "silu"), r"row_weight must have shape \[5\]"),
        ((x, token, ends, rw, w1, w2[:, :, :4], "silu"), r"down_proj must have shape \[2, 8, 8\]"),
        ((x, token, torch.tensor([3, 2]), rw, w1, w2, "silu"), "ends must rise"),
        ((x, token, torch.tensor([2, 4]), rw, w1, w2, "silu"), "ends\\[E-1\\] must be M"),
        ((x, token.clone().fill_(4), ends, rw, w1, w2, "silu"), r"token\[0\] = 4 is outside \[0, T = 4\)"),
        ((x, token, ends, rw, w1, w2, "tanh"), "act must be silu, gelu or relu"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            OP(*args)
    forward = torch.ops.tfk_cpu.moe_experts_forward
    ids, w = torch.tensor([[0, 1], [1, 2], [-1, 0], [1, 1]]), torch.rand(4, 2)
    assert forward(x, ids, w, w1, w2, "silu", -1).shape == (4, 8)   # 2 is E: a sentinel
    cases = [
        ((x, ids.clone().fill_(3), w, w1, w2, "silu", -1), r"experts has id 3; ids must be in \[0, E = 2\)"),
        ((x, ids.clone().fill_(-2), w, w1, w2, "silu", -1), "experts has id -2"),
        ((x, ids.int(), w, w1, w2, "silu", -1), "experts must be Long"),
        ((x, ids, w.double(), w1, w2, "silu", -1), "weights must be Float"),
        ((x, ids[:3], w, w1, w2, "silu", -1), r"experts must have shape \[4, 2\]"),
        ((x, ids, w, w1, w2[:1], "silu", -1), r"down_proj must have shape \[2, 8, 8\]"),
        ((x, ids, w, w1, w2, "gelu_new", -1), "act must be silu, gelu or relu"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            forward(*args)
