"""tfk.moe.experts: every backend under test against the float64 reference,
forward and every gradient, odd sizes, special routings, capacity, sentinels;
determinism, torch.compile, opcheck, the MoE module, Hugging Face's experts."""
import itertools
import os

import pytest
import torch

import tfk
from tfk.ops.moe import experts_reference, torch_backend
from tfk.ops.moe.reference import kept_assignments
from moe_cases import EXPERTS_MODES, check_experts, force_mode, make_experts_inputs, run_experts, seed_of

# Backends under test with the dtypes each is checked in (the reference is the oracle).
MOE_BACKENDS = {"torch": [torch.float32, torch.float16], "triton": [torch.float32, torch.float16],
                "cuda-sim": [torch.float32, torch.float16, torch.bfloat16]}

# (T, E, k, H, I, activation, capacity, ids kind)
CASES = {
    "T1_E8_k2": (1, 8, 2, 16, 24, "silu", None, "topk"),
    "T7_E8_k2_gelu": (7, 8, 2, 16, 8, "gelu", None, "topk"),
    "T301_E8_k2": (301, 8, 2, 16, 24, "silu", None, "topk"),
    "T33_E64_k6": (33, 64, 6, 24, 16, "silu", None, "topk"),
    "T20_E1_k1": (20, 1, 1, 8, 16, "silu", None, "topk"),
    "T16_E8_k8_relu": (16, 8, 8, 16, 24, "relu", None, "topk"),
    "T25_E8_k4_capacity5": (25, 8, 4, 16, 24, "silu", 5, "topk"),
    "T40_E8_k2_capacity0": (40, 8, 2, 8, 8, "silu", 0, "topk"),
    "empty_experts": (19, 8, 2, 16, 24, "silu", None, "empty_experts"),
    "one_expert": (23, 8, 2, 16, 24, "silu", None, "one_expert"),
    "one_expert_capacity7": (23, 8, 2, 16, 24, "gelu", 7, "one_expert"),
    "sentinels": (31, 8, 3, 16, 24, "silu", None, "sentinels"),
    "sentinels_capacity4": (31, 8, 3, 16, 24, "silu", 4, "sentinels"),
    "all_sentinels": (9, 8, 2, 16, 24, "silu", None, "all_sentinels"),
}


def backend_dtypes():
    return [pytest.param(b, dt, id=f"{b}-{str(dt).split('.')[-1]}") for b, dts in MOE_BACKENDS.items() for dt in dts]


def experts_fn(backend, activation, capacity):
    return lambda x, i, w, a, b: tfk.moe.experts(x, i, w, a, b, activation=activation, capacity=capacity,
                                                 backend=backend)


def backend_dtype_modes():
    """The torch backend in each of its modes; a kernel backend has one."""
    return [pytest.param(b, dt, m, id=f"{b}-{str(dt).split('.')[-1]}" + (f"-{m}" if m else ""))
            for b, dts in MOE_BACKENDS.items() for dt in dts for m in (EXPERTS_MODES if b == "torch" else [None])]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,dtype,mode", backend_dtype_modes())
def test_experts_matches_reference(backend, dtype, case, mode, monkeypatch):
    T, E, k, H, I, act, cap, kind = CASES[case]
    if mode:
        force_mode(monkeypatch, mode)
    inp = make_experts_inputs(T, E, k, H, I, kind, seed=seed_of(case))
    check_experts(experts_fn(backend, act, cap), inp, dtype, act, cap)


@pytest.mark.slow
@pytest.mark.parametrize("backend,dtype", backend_dtypes())
def test_experts_sweep(backend, dtype):
    """Long tier: T x E x k x activation x capacity."""
    for T, E, k, act, cap in itertools.product((1, 7, 301), (1, 8, 64), (1, 2, 4, 8), ("silu", "gelu", "relu"),
                                               (None, 3)):
        if k > E:
            continue
        inp = make_experts_inputs(T, E, k, 24, 40, seed=seed_of(T, E, k, act, cap))
        check_experts(experts_fn(backend, act, cap), inp, dtype, act, cap)


def test_modes_are_chosen_by_cost():
    """Small groups over many experts run padded, large groups loop."""
    assert torch_backend.Groups([3] * 64, 6 * 256 * 128, "cpu").padded
    assert torch_backend.Groups([0, 2, 0, 3, 1], 6 * 256 * 128, "cpu").used.tolist() == [1, 3, 4]
    assert not torch_backend.Groups([1000] * 7 + [1], 6 * 1024 * 2048, "cpu").padded
    assert not torch_backend.Groups([0, 5, 0], 100, "cpu").padded   # one non-empty group: nothing to batch


def test_capacity_keeps_first_choices_first():
    """Capacity counts (slot, token) order: every first choice before any second."""
    ids = torch.tensor([[1, 0], [0, 1], [0, 1]])
    keep = kept_assignments(ids, 2, capacity=2)
    # expert 0 takes the first choices of tokens 1 and 2, so token 0's second choice drops;
    # expert 1 takes token 0's first choice, then token 1's second; token 2's second drops.
    # (Token order would instead drop token 2's first choice.)
    assert keep.tolist() == [[True, False], [True, True], [True, False]]
    order, offsets, inverse, counts = torch_backend.permute(ids, 2, capacity=2)
    assert counts == [2, 2] and offsets.tolist() == [2, 4]
    assert sorted(order[:2].tolist()) == [2, 4] and sorted(order[2:].tolist()) == [0, 3]  # t*k+s
    assert inverse.tolist() == [2, 4, 0, 3, 1, 4]


def test_permutation_facts():
    """order / offsets / inverse: sorted by expert, int64, sentinels removed, inverse inverts order."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 9, (50, 3), generator=g)
    order, offsets, inverse, counts = torch_backend.permute(ids, 8)
    flat = ids.reshape(-1)
    assert order.dtype == offsets.dtype == inverse.dtype == torch.int64
    assert torch.equal(flat[order], torch.sort(flat[(flat >= 0) & (flat < 8)]).values)
    assert offsets.tolist() == torch.cumsum(torch.bincount(flat[(flat >= 0) & (flat < 8)], minlength=8), 0).tolist()
    M = order.numel()
    assert torch.equal(inverse[order], torch.arange(M))
    assert torch.equal((inverse == M), (flat < 0) | (flat >= 8))


@pytest.mark.parametrize("backend,dtype", backend_dtypes())
def test_gradients_through_route(backend, dtype):
    """d router_logits through route's weights, against the reference backend in float64."""
    T, E, k, H, I = 29, 8, 2, 16, 24
    inp = make_experts_inputs(T, E, k, H, I, seed=5)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def grad(b, d):
        lg = logits.clone().requires_grad_()
        r = tfk.moe.route(lg, k)
        out = tfk.moe.experts(inp["x"].to(d), r.experts, r.weights, inp["w1"].to(d), inp["w2"].to(d), backend=b)
        out.backward(inp["dout"].to(d))
        return r.experts, lg.grad

    ids_ref, g_ref = grad("reference", torch.float64)
    ids, g = grad(backend, dtype)
    assert torch.equal(ids, ids_ref)
    _, g_lowp = grad("reference", dtype)
    from moe_cases import assert_moe_close
    assert_moe_close("dlogits", g, g_ref, g_lowp, dtype)


@pytest.mark.parametrize("backend", list(MOE_BACKENDS))
def test_float32_weights_with_half_hidden(backend):
    """Routers give float32 weights; the output stays in hidden_states' dtype
    and d weights in the weights' dtype."""
    inp = make_experts_inputs(13, 8, 2, 16, 24, seed=3)
    out, grads = run_experts(experts_fn(backend, "silu", None), inp, torch.float16, weights_dtype=torch.float32)
    assert out.dtype == torch.float16 and grads[1].dtype == torch.float32
    ref, rgrads = run_experts(experts_fn("reference", "silu", None), inp, torch.float64)
    assert torch.allclose(out.double(), ref, atol=2e-2) and torch.allclose(grads[1].double(), rgrads[1], atol=2e-2)


@pytest.mark.parametrize("mode", list(EXPERTS_MODES))
def test_deterministic_and_empty_experts_exactly_zero(mode, monkeypatch):
    """Two runs give bitwise equal results; experts with no rows get exact-zero weight gradients."""
    force_mode(monkeypatch, mode)
    inp = make_experts_inputs(57, 8, 2, 16, 24, "empty_experts", seed=9)
    a_out, a_grads = run_experts(experts_fn("torch", "silu", None), inp, torch.float32)
    b_out, b_grads = run_experts(experts_fn("torch", "silu", None), inp, torch.float32)
    assert torch.equal(a_out, b_out) and all(torch.equal(x, y) for x, y in zip(a_grads, b_grads))
    empty = [e for e in range(8) if e not in (1, 3)]
    assert torch.count_nonzero(a_grads[2][empty]) == 0 and torch.count_nonzero(a_grads[3][empty]) == 0
    assert torch.count_nonzero(a_grads[2][[1, 3]]) > 0


def test_no_grad_and_partial_requires_grad():
    inp = make_experts_inputs(11, 8, 2, 16, 24, seed=2)
    x, w1, w2 = (inp[n].float() for n in ("x", "w1", "w2"))
    with torch.no_grad():
        out = tfk.moe.experts(x, inp["ids"], inp["weights"].float(), w1, w2, backend="torch")
    ref = experts_reference(inp["x"], inp["ids"], inp["weights"], inp["w1"], inp["w2"])
    assert torch.allclose(out.double(), ref, atol=1e-5)
    w2 = w2.requires_grad_()
    tfk.moe.experts(x, inp["ids"], inp["weights"].float(), w1, w2, backend="torch").sum().backward()
    assert w2.grad is not None and not torch.isnan(w2.grad).any()


def test_auto_is_torch_on_cpu():
    inp = make_experts_inputs(5, 4, 2, 8, 8, seed=1)
    with tfk.backends.record_choices() as names:
        tfk.moe.experts(inp["x"].float(), inp["ids"], inp["weights"].float(), inp["w1"].float(), inp["w2"].float())
    assert names == ["torch"]


@pytest.mark.parametrize("mode,compiler", [(m, "aot_eager") for m in EXPERTS_MODES] + [("grouped", "inductor")])
def test_torch_compile_fullgraph(mode, compiler, monkeypatch):
    """The experts and grouped_mm ops trace without a graph break, forward and
    backward; inductor (generated C++ around the ops) once, it compiles for ~15 s."""
    force_mode(monkeypatch, mode)
    torch._dynamo.reset()
    inp = make_experts_inputs(21, 8, 2, 16, 24, seed=4)

    def f(x, logits, w1, w2, b):
        r = tfk.moe.route(logits, 2)
        y = tfk.moe.experts(x, r.experts, r.weights, w1, w2, backend="torch")
        offs = torch.tensor([5, 5, 12], dtype=torch.int32)
        return y.sum() + tfk.moe.grouped_mm(x, b, offs, backend="torch").sum()

    logits = torch.randn(21, 8)
    leaves = [inp["x"].float(), logits, inp["w1"].float(), inp["w2"].float(), torch.randn(3, 16, 5)]
    got = [t.clone().requires_grad_() for t in leaves]
    want = [t.clone().requires_grad_() for t in leaves]
    out = torch.compile(f, fullgraph=True, backend=compiler)(*got)
    out.backward()
    ref = f(*want)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", ["triton", "cuda-sim"])
def test_kernel_backend_traces_on_its_first_call(backend):
    """A fresh process whose first experts call on a kernel backend is under
    torch.compile(fullgraph=True): the backend's ops exist before any call."""
    import subprocess
    import sys
    from helpers import require_backend
    require_backend(backend)
    code = f"""
import torch, tfk
x, w1, w2 = torch.randn(6, 16), torch.randn(4, 48, 16) / 4, torch.randn(4, 16, 24) / 4
ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 2], [1, 3], [0, 0]]); w = torch.rand(6, 2)
f = lambda *a: tfk.moe.experts(*a, backend="{backend}")
out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ids, w, w1, w2)
ref = tfk.moe.experts(x.double(), ids, w.double(), w1.double(), w2.double(), backend="reference")
torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_opcheck():
    inp = make_experts_inputs(13, 8, 2, 16, 24, "sentinels", seed=8)
    x, w, w1, w2 = (inp[n].float() for n in ("x", "weights", "w1", "w2"))
    op = torch.ops.tfk.moe_experts_torch_fwd.default
    for args in [(x, inp["ids"], w, w1, w2, "silu", -1),
                 (x.requires_grad_(), inp["ids"], w.requires_grad_(), w1.requires_grad_(), w2.requires_grad_(),
                  "gelu", 3)]:
        torch.library.opcheck(op, args)


def test_matches_hf_mixtral_experts():
    """Hugging Face's own eager experts loop (MixtralExperts) in float64."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=8,
                                     num_experts_per_tok=2, hidden_act="silu")
    hf = MixtralExperts(cfg).double()
    inp = make_experts_inputs(37, 8, 2, 16, 24, "sentinels", seed=12)
    inp["ids"] = inp["ids"].masked_fill(inp["ids"] < 0, 8)   # HF takes the sentinel E, not -1
    with torch.no_grad():
        hf.gate_up_proj.copy_(inp["w1"])
        hf.down_proj.copy_(inp["w2"])
    want = hf(inp["x"], inp["ids"], inp["weights"])
    got = tfk.moe.experts(inp["x"].float(), inp["ids"], inp["weights"].float(), inp["w1"].float(),
                          inp["w2"].float(), backend="torch")
    assert torch.allclose(got.double(), want, atol=1e-5), float((got.double() - want).abs().max())


# ------------------------------------------------------------------- MoE module

def test_moe_module():
    torch.manual_seed(0)
    layer = tfk.moe.MoE(16, 24, 8, 2, shared_expert=12, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(2, 9, 16)
    out = layer(x)
    assert out.shape == x.shape
    assert set(layer.losses) == {"load_balancing", "z"}
    (out.square().mean() + layer.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the same computation written out, on the reference backend
    flat = x.reshape(-1, 16)
    logits = layer.gate(flat)
    r = tfk.moe.route(logits, 2)
    y = tfk.moe.experts(flat, r.experts, r.weights, layer.gate_up_proj, layer.down_proj, backend="reference")
    mlp = layer.shared_expert
    y = y + torch.sigmoid(layer.shared_expert_gate(flat)) * mlp["down_proj"](
        torch.nn.functional.silu(mlp["gate_proj"](flat)) * mlp["up_proj"](flat))
    torch.testing.assert_close(out, y.reshape(x.shape), atol=1e-5, rtol=1e-5)
    lb = 0.01 * tfk.moe.load_balancing_loss(logits, r.experts, 8)
    torch.testing.assert_close(layer.losses["load_balancing"], lb)


def test_moe_module_sigmoid_groups_capacity():
    torch.manual_seed(1)
    layer = tfk.moe.MoE(16, 8, 16, 4, score="sigmoid", n_group=4, topk_group=2, scaling=2.5, capacity_factor=1.0)
    x = torch.randn(30, 16)
    out = layer(x)
    assert layer.capacity(30) == 8 and layer.aux_loss == 0.0 and layer.losses == {}
    r = layer.routing
    want = tfk.moe.experts(x, r.experts, r.weights, layer.gate_up_proj, layer.down_proj, capacity=8,
                           backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.weights.sum(-1), torch.full((30,), 2.5))
