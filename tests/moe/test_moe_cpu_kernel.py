"""tfk._cpu's small-group experts kernel (csrc/moe/experts_cpu.cpp), the
torch backend's float32 forward at decode sizes: the op against a float64
definition row by row (every block size, odd H and I for the vector tails,
each activation), the backend's choice of it, and its named errors."""
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


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("H,I", [(16, 8), (20, 13), (7, 3), (40, 24)])
def test_rows_match_the_definition(H, I, act):
    """Groups of 0..9 rows (blocks of 4, 3, 2, 1 and their sums); H and I with
    vector tails (20 = 16 + 4, 13 = 8 + 5, 7, 3)."""
    counts = [3, 0, 1, 9, 2, 4, 0, 5, 8, 6, 7]
    x, token, ends, rw, w1, w2 = _rows_inputs(counts, 11, H, I, seed_of(H, I, act))
    f32 = [t.float() for t in (x, rw, w1, w2)]
    got = OP(f32[0], token, ends, f32[1], f32[2], f32[3], act)
    ref = _rows_definition(x, token, ends, rw, w1, w2, act)
    lowp = _rows_definition(f32[0], token, ends, *f32[1:], act)
    assert_moe_close("out", got, ref, lowp, torch.float32)


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
    """float32 CPU calls with few rows per expert run the kernel (counted),
    larger groups, other dtypes and strided weights do not; the result is the
    reference's, H and I not multiples of 8 included (the torch backend takes
    any size)."""
    calls = []
    real = torch_backend._rows_kernel_ok
    monkeypatch.setattr(torch_backend, "_rows_kernel_ok", lambda *a: calls.append(real(*a)) or calls[-1])
    inp = make_experts_inputs(32, 64, 6, 20, 12, seed=5)
    x, w, w1, w2 = (inp[n].float() for n in ("x", "weights", "w1", "w2"))
    with torch.no_grad():
        out = tfk.moe.experts(x, inp["ids"], w, w1, w2)
        assert calls == [True]
        ref = experts_reference(inp["x"], inp["ids"], inp["weights"], inp["w1"], inp["w2"])
        lowp = experts_reference(x, inp["ids"], w, w1, w2)
        assert_moe_close("out", out, ref, lowp, torch.float32)
        tfk.moe.experts(x.half(), inp["ids"], w, w1.half(), w2.half())
        tfk.moe.experts(x, inp["ids"], w, w1.transpose(1, 2).contiguous().transpose(1, 2), w2)
        big = make_experts_inputs(300, 4, 2, 16, 8, seed=6)    # 150 rows per expert
        tfk.moe.experts(*(big[n].float() if n != "ids" else big[n] for n in ("x", "ids", "weights", "w1", "w2")))
    assert calls == [True, False, False, False]


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
        ((x.double(), token, ends, rw, w1, w2, "silu"), "x must be Double|x must be Float"),
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
