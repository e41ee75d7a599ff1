"""tfk.moe.grouped_mm against the float64 reference and torch's grouped_mm;
opcheck; the named errors of every MoE entry point."""
import re

import pytest
import torch

import tfk
from tfk.ops.moe import torch_backend
from moe_cases import MODES, check_grouped_mm, force_mode, make_experts_inputs

GMM_BACKENDS = {"torch": [torch.float32, torch.float16, torch.bfloat16], "triton": [torch.float32, torch.float16],
                "cuda-sim": [torch.float32, torch.float16, torch.bfloat16]}

# (group sizes, M (>= their sum), K, N)
GMM_CASES = {
    "three_groups": ([3, 0, 4], 7, 16, 8),
    "rows_past_end": ([5, 2], 12, 8, 24),
    "leading_and_trailing_empty": ([0, 0, 9, 0], 9, 8, 8),
    "one_group": ([13], 13, 24, 16),
    "all_empty": ([0, 0], 6, 8, 8),
    "many_small": ([1, 2, 0, 3, 1, 0, 2, 5] * 8, 120, 16, 8),
}


def _gmm_inputs(sizes, M, K, N, offs_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g, dtype=torch.float64)
    b = torch.randn(len(sizes), K, N, generator=g, dtype=torch.float64) / K ** 0.5
    offs = torch.cumsum(torch.tensor(sizes), 0).to(offs_dtype)
    return a, b, offs, torch.randn(M, N, generator=g, dtype=torch.float64)


def gmm_params():
    """The torch backend in both of its modes; a kernel backend has one."""
    return [pytest.param(b, d, m, id=f"{b}-{str(d).split('.')[-1]}" + (f"-{m}" if m else ""))
            for b, ds in GMM_BACKENDS.items() for d in ds for m in (MODES if b == "torch" else [None])]


@pytest.mark.parametrize("case", list(GMM_CASES))
@pytest.mark.parametrize("backend,dtype,mode", gmm_params())
def test_grouped_mm_matches_reference(backend, dtype, case, mode, monkeypatch):
    if mode:
        force_mode(monkeypatch, mode)
    sizes, M, K, N = GMM_CASES[case]
    a, b, offs, dout = _gmm_inputs(sizes, M, K, N, torch.int32 if len(sizes) % 2 else torch.int64)
    out, da, db = check_grouped_mm(lambda x, y, o: tfk.moe.grouped_mm(x, y, o, backend=backend), a, b, offs, dout,
                                   dtype)
    end = sum(sizes)
    assert torch.count_nonzero(out[end:]) == 0 and torch.count_nonzero(da[end:]) == 0
    empty = [g for g, n in enumerate(sizes) if n == 0]
    assert torch.count_nonzero(db[empty]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_mm_agrees_with_torch(dtype):
    """torch.nn.functional.grouped_mm on CPU (int32 offs), on the rows it defines
    (it leaves rows past offs[-1] uninitialised; tfk returns 0 there)."""
    F = torch.nn.functional
    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    a, b, offs, _ = _gmm_inputs([4, 0, 6, 3], 15, 16, 8, torch.int32, seed=2)
    a, b = a.to(dtype), b.to(dtype)
    want = F.grouped_mm(a, b, offs=offs)
    got = tfk.moe.grouped_mm(a, b, offs)
    torch.testing.assert_close(got[:13], want[:13])
    assert torch.count_nonzero(got[13:]) == 0


def test_grouped_mm_opcheck():
    a, b, offs, _ = _gmm_inputs([3, 0, 4], 9, 8, 8)
    op = torch.ops.tfk.moe_grouped_mm_torch_fwd.default
    torch.library.opcheck(op, (a.float(), b.float(), offs))
    torch.library.opcheck(op, (a.float().requires_grad_(), b.float().requires_grad_(), offs.int()))


# ----------------------------------------------------------------- named errors

def _experts_args(**over):
    inp = make_experts_inputs(6, 4, 2, 8, 8, seed=1)
    args = dict(hidden_states=inp["x"].float(), experts=inp["ids"], weights=inp["weights"].float(),
                gate_up_proj=inp["w1"].float(), down_proj=inp["w2"].float())
    args.update(over)
    return args


def _bad_ids(value):
    ids = make_experts_inputs(6, 4, 2, 8, 8, seed=1)["ids"].clone()
    ids[2, 1] = value
    return ids


EXPERTS_ERRORS = {
    "hidden_3d": (dict(hidden_states=torch.randn(1, 6, 8)), ValueError, r"hidden_states must be \(T, H\)"),
    "hidden_int": (dict(hidden_states=torch.ones(6, 8, dtype=torch.int32)), TypeError, "hidden_states must be float"),
    "gate_up_H": (dict(gate_up_proj=torch.randn(4, 16, 7)), ValueError, r"gate_up_proj must be \(E, 2I, H\) with H = 8"),
    "gate_up_odd": (dict(gate_up_proj=torch.randn(4, 15, 8)), ValueError, r"gate_up_proj must be \(E, 2I, H\)"),
    "down_shape": (dict(down_proj=torch.randn(4, 8, 9)), ValueError, r"down_proj must be \(E, H, I\) = \(4, 8, 8\)"),
    "down_dtype": (dict(down_proj=torch.randn(4, 8, 8, dtype=torch.float64)), TypeError,
                   "down_proj has dtype torch.float64, expected hidden_states' dtype torch.float32"),
    "experts_T": (dict(experts=torch.zeros(5, 2, dtype=torch.long)), ValueError, r"experts must be \(T, k\) with T = 6"),
    "experts_float": (dict(experts=torch.zeros(6, 2)), TypeError, "experts must be an integer tensor"),
    "weights_shape": (dict(weights=torch.ones(6, 3)), ValueError, r"weights must be \(T, k\) = \(6, 2\)"),
    "weights_int": (dict(weights=torch.ones(6, 2, dtype=torch.long)), TypeError, "weights must be a float tensor"),
    "id_too_big": (dict(experts=_bad_ids(5)), ValueError, r"experts\[2, 1\] = 5 is out of range.*num_experts = 4"),
    "id_too_small": (dict(experts=_bad_ids(-2)), ValueError, r"experts\[2, 1\] = -2 is out of range"),
    "activation": (dict(activation="tanh"), ValueError, "activation must be one of"),
    "capacity_negative": (dict(capacity=-1), ValueError, "capacity must be >= 0, got -1"),
    "capacity_float": (dict(capacity=2.5), TypeError, "capacity must be an int"),
    "not_tensor": (dict(weights=[[1.0, 1.0]] * 6), TypeError, "weights must be a torch.Tensor"),
    "backend": (dict(backend="nope"), ValueError, "backend must be 'auto' or one of"),
}


@pytest.mark.parametrize("case", list(EXPERTS_ERRORS))
def test_experts_errors(case):
    over, exc, pattern = EXPERTS_ERRORS[case]
    over = dict(over)
    kw = {k: over.pop(k) for k in ("activation", "capacity", "backend") if k in over}
    args = _experts_args(**over)
    with pytest.raises(exc, match=pattern):
        tfk.moe.experts(*args.values(), **kw)


def test_experts_error_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device (CUDA)")
    args = _experts_args()
    args["weights"] = args["weights"].cuda()
    with pytest.raises(ValueError, match="weights is on cuda"):
        tfk.moe.experts(*args.values())


GMM_ERRORS = {
    "a_3d": (torch.randn(1, 4, 8), torch.randn(2, 8, 4), torch.tensor([1, 4]), ValueError, r"a must be \(M, K\)"),
    "b_K": (torch.randn(4, 8), torch.randn(2, 7, 4), torch.tensor([1, 4]), ValueError, r"b must be \(G, K, N\) with K = 8"),
    "offs_len": (torch.randn(4, 8), torch.randn(2, 8, 4), torch.tensor([4]), ValueError, r"offs must be \(G,\) with G = 2"),
    "offs_float": (torch.randn(4, 8), torch.randn(2, 8, 4), torch.tensor([1.0, 4.0]), TypeError,
                   "offs must be int32 or int64"),
    "offs_decreasing": (torch.randn(4, 8), torch.randn(2, 8, 4), torch.tensor([3, 1]), ValueError,
                        "offs must be nondecreasing row ends in"),
    "offs_past_M": (torch.randn(4, 8), torch.randn(2, 8, 4), torch.tensor([1, 5]), ValueError, r"\[0, M = 4\]"),
    "dtype": (torch.randn(4, 8), torch.randn(2, 8, 4, dtype=torch.float16), torch.tensor([1, 4]), TypeError,
              "b has dtype torch.float16, expected a's dtype torch.float32"),
}


@pytest.mark.parametrize("case", list(GMM_ERRORS))
def test_grouped_mm_errors(case):
    a, b, offs, exc, pattern = GMM_ERRORS[case]
    with pytest.raises(exc, match=pattern):
        tfk.moe.grouped_mm(a, b, offs)


ROUTE_ERRORS = {
    "top_k_gt_E": (dict(top_k=9), ValueError, r"top_k must be in \[1, 8\], got 9"),
    "top_k_zero": (dict(top_k=0), ValueError, r"top_k must be in \[1, 8\], got 0"),
    "logits_1d": (dict(router_logits=torch.randn(8)), ValueError, r"router_logits must be \(T, E\)"),
    "score": (dict(score="relu"), ValueError, "score must be 'softmax' or 'sigmoid'"),
    "bias_shape": (dict(bias=torch.zeros(7)), ValueError, r"bias must be \(E,\) = \(8,\)"),
    "group_alone": (dict(n_group=2), ValueError, "n_group and topk_group go together"),
    "group_divides": (dict(n_group=3, topk_group=1), ValueError, "n_group = 3 must divide"),
    "group_too_few": (dict(top_k=5, n_group=4, topk_group=2), ValueError, "top_k = 5 exceeds the 4 experts"),
}


@pytest.mark.parametrize("case", list(ROUTE_ERRORS))
def test_route_errors(case):
    over, exc, pattern = ROUTE_ERRORS[case]
    kw = dict(router_logits=torch.randn(5, 8), top_k=2)
    kw.update(over)
    with pytest.raises(exc, match=pattern):
        tfk.moe.route(kw.pop("router_logits"), kw.pop("top_k"), **kw)


def test_kernel_reasons_name_the_sizes():
    """What kernel backends refuse (torch and reference take any size)."""
    from tfk.ops.moe import ExpertsCall, kernel_reasons
    from tfk.backends import get_backend
    args = _experts_args(hidden_states=torch.randn(6, 12), gate_up_proj=torch.randn(4, 10, 12),
                         down_proj=torch.randn(4, 12, 5))
    call = ExpertsCall(*args.values(), "silu", None)
    assert kernel_reasons(call) == ["hidden size H = 12 is not a multiple of 8",
                                    "intermediate size I = 5 is not a multiple of 8"]
    assert get_backend("torch", "moe").reasons(call) == [] == get_backend("reference", "moe").reasons(call)
    assert re.search("triton", " ".join(tfk.backend_names())) and "sdpa" not in tfk.backend_names("moe")
