"""tfk.moe.route and the router losses against Hugging Face's routers and
load_balancing_loss_func, values and gradients; z_loss by its formula.
tfk.moe.route on every backend against an independent float64 oracle:
weights, ids, d logits; ties, refusals and the fallback, torch.compile."""
import os

import pytest
import torch

import tfk
from tfk.ops.moe import cuda_kernels as ck

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _sim_library(monkeypatch):
    # TFK_MOE_SIM_LIBRARY=path:namespace runs backend "cuda-sim" on another build
    # of the kernels (how planted bugs are shown to fail these tests).
    alt = os.environ.get("TFK_MOE_SIM_LIBRARY")
    if alt:
        path, ns = alt.rsplit(":", 1)
        torch.ops.load_library(path)
        monkeypatch.setattr(ck, "ops", lambda device: getattr(torch.ops, ns))


def _hidden(T, H, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g, dtype=dtype), g


def _grads(fn, h):
    """Weights and ids of fn(h), and d h of a fixed weighted sum of the weights."""
    h = h.clone().requires_grad_()
    w, ids = fn(h)
    c = torch.arange(1, w.shape[1] + 1, dtype=w.dtype)
    (w * c).sum().backward()
    return w.detach(), ids, h.grad


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (37, 8, 2), (64, 64, 6), (9, 4, 4)])
def test_mixtral_router(T, E, k):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    cfg = transformers.MixtralConfig(hidden_size=16, num_local_experts=E, num_experts_per_tok=k)
    router = MixtralTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    h, _ = _hidden(T, 16, T * E + k)

    def hf(x):
        _, w, ids = router(x)
        return w, ids

    def ours(x):
        r = tfk.moe.route(torch.nn.functional.linear(x, router.weight), k)
        return r.weights, r.experts

    (hw, hids, hg), (w, ids, g) = _grads(hf, h), _grads(ours, h)
    assert torch.equal(ids, hids) and ids.dtype == torch.int64
    assert torch.equal(w, hw) and w.dtype == torch.float32
    torch.testing.assert_close(g, hg, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm", [True, False])
def test_qwen2_moe_router(norm):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    cfg = transformers.Qwen2MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=4, norm_topk_prob=norm)
    router = Qwen2MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    h, _ = _hidden(33, 16, 3)
    _, hw, hids = router(h)
    r = tfk.moe.route(torch.nn.functional.linear(h, router.weight), 4, normalize=norm)
    assert torch.equal(r.experts, hids) and torch.equal(r.weights, hw)


DEEPSEEK = {
    # E, k, n_group, topk_group, norm, scaling
    "v3_like": (32, 6, 8, 4, True, 2.5),
    "one_group": (16, 4, 1, 1, True, 1.0),
    "no_norm": (16, 2, 4, 2, False, 1.5),
    "groups_of_2": (16, 4, 8, 2, True, 1.0),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda-sim", "reference"])
@pytest.mark.parametrize("case", list(DEEPSEEK))
def test_deepseek_v3_router(case, backend):
    """Sigmoid scores, the correction bias for the choice only, group-limited
    top-k, normalisation with + 1e-20, scaling, on every backend. HF returns
    its choice unsorted: compared as sets (sorted by id), weights following
    their ids; weights to float32 rounding (the kernels sum in another order)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    E, k, n_group, topk_group, norm, scaling = DEEPSEEK[case]
    cfg = transformers.DeepseekV3Config(hidden_size=16, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group,
                                        topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scaling)
    router = DeepseekV3TopkRouter(cfg)
    g = torch.Generator().manual_seed(E + k)
    with torch.no_grad():
        router.weight.normal_(generator=g)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.5)
    h, _ = _hidden(41, 16, E * k)

    def by_id(w, ids):
        ids, perm = ids.sort(-1)
        return w.gather(1, perm), ids

    def hf(x):
        _, w, ids = router(x)
        return by_id(w, ids)

    def ours(x):
        r = tfk.moe.route(torch.nn.functional.linear(x, router.weight), k, score="sigmoid", normalize=norm,
                          bias=router.e_score_correction_bias, n_group=n_group, topk_group=topk_group,
                          scaling=scaling, backend=backend)
        return by_id(r.weights, r.experts)

    (hw, hids, hg), (w, ids, g_) = _grads(hf, h), _grads(ours, h)
    assert torch.equal(ids, hids)
    torch.testing.assert_close(w, hw, rtol=1e-6 if backend == "torch" else 2e-6, atol=1e-7)
    torch.testing.assert_close(g_, hg, rtol=1e-5, atol=1e-6)


def test_route_order_and_choice_bias():
    """Descending by choice score; the bias changes the choice, not the weights."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    r = tfk.moe.route(logits, 2, score="sigmoid", normalize=False)
    assert r.experts.tolist() == [[3, 2]]
    torch.testing.assert_close(r.weights, torch.sigmoid(torch.tensor([[3.0, 2.0]])))
    r = tfk.moe.route(logits, 2, score="sigmoid", normalize=False, bias=torch.tensor([5.0, 0.0, 0.0, 0.0]))
    assert r.experts.tolist() == [[0, 3]]
    torch.testing.assert_close(r.weights, torch.sigmoid(torch.tensor([[0.0, 3.0]])))
    # group-limited: groups {0,1} and {2,3}; by the sum of its top-2 sigmoids {2,3} is best
    # (0.73 + 0.82 > 0.98 + 0.0001) though expert 0 alone scores highest
    r = tfk.moe.route(torch.tensor([[4.0, -9.0, 1.0, 1.5]]), 2, score="sigmoid", n_group=2, topk_group=1)
    assert r.experts.tolist() == [[3, 2]]
    assert isinstance(r, tfk.moe.Routing) and r._fields == ("weights", "experts")


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (50, 8, 2), (64, 16, 4)])
def test_load_balancing_loss(T, E, k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    g = torch.Generator().manual_seed(T + E)
    logits = torch.randn(T, E, generator=g)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want = load_balancing_loss_func((a,), E, k)
    got = tfk.moe.load_balancing_loss(b, tfk.moe.route(b, k).experts, E)
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    torch.testing.assert_close(b.grad, a.grad)


def test_load_balancing_loss_by_hand():
    logits = torch.zeros(4, 2)          # uniform probabilities 1/2
    ids = torch.tensor([[0], [0], [0], [1]])
    # E * sum_e (n_e / T) * 1/2 = 2 * (3/4 + 1/4) / 2 = 1; sentinels count for none
    assert float(tfk.moe.load_balancing_loss(logits, ids, 2)) == pytest.approx(1.0)
    ids = torch.tensor([[0], [0], [2], [-1]])
    assert float(tfk.moe.load_balancing_loss(logits, ids, 2)) == pytest.approx(0.5)


def test_z_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(13, 8, generator=g, dtype=torch.float64)
    lf = logits.float().requires_grad_()
    got = tfk.moe.z_loss(lf)
    want = torch.log(torch.exp(logits).sum(-1)).pow(2).mean()
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-6)
    got.backward()
    lse = torch.logsumexp(logits, -1, keepdim=True)
    want_grad = 2 * lse * torch.softmax(logits, -1) / 13
    torch.testing.assert_close(lf.grad.double(), want_grad, rtol=1e-5, atol=1e-7)


# -----------------------------------------------------------------------------
# Every backend against an independent float64 oracle and Hugging Face
# -----------------------------------------------------------------------------

# Backends under test with their dtypes: Triton's interpreter computes bf16
# wrongly (its bf16 is checked on a GPU); "cuda" needs a GPU and skips without.
ROUTE_BACKENDS = {"torch": [torch.float32, torch.float16, torch.bfloat16],
                  "triton": [torch.float32, torch.float16],
                  "cuda-sim": [torch.float32, torch.float16, torch.bfloat16],
                  "cuda": [torch.float32, torch.float16, torch.bfloat16]}


def route_params():
    return [pytest.param(b, dt, id=f"{b}-{str(dt).split('.')[-1]}") for b, dts in ROUTE_BACKENDS.items() for dt in dts]


def device_of(backend):
    if backend == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU: backend 'cuda' runs on one (cuda-sim runs the same kernel here)")
        return "cuda"
    return "cpu"


def route_oracle(logits, k, score, normalize, bias, n_group, topk_group, scaling):
    """Routing by its definition, row by row in float64: (weights (T, k)
    differentiable w.r.t. ``logits`` (a float64 leaf), experts (T, k), margin:
    the least relative gap between consecutive ranked choice (and group)
    scores that decide the result; a kernel in float32 agrees when it is not
    tiny)."""
    s = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    T, E = logits.shape
    b = bias.double().tolist() if bias is not None else [0.0] * E
    s_rows = s.detach().tolist()
    rows, margin = [], float("inf")

    def ranked(values, ids, n):
        order = sorted(ids, key=lambda i: (-values[i], i))  # descending, ties to the lower id
        head = order[:n + 1]
        gaps = [(values[head[j]] - values[head[j + 1]]) / max(abs(values[head[j]]), 1e-30)
                for j in range(len(head) - 1)]  # relative: what float32 resolves
        return order[:n], min(gaps, default=float("inf"))

    for t in range(T):
        choice = [s_rows[t][e] + b[e] for e in range(E)]
        allowed = list(range(E))
        if n_group is not None and topk_group < n_group:
            size = E // n_group
            gscore = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
            kept, gap = ranked(gscore, range(n_group), topk_group)
            margin = min(margin, gap)
            allowed = [e for e in allowed if e // size in kept]
        ids, gap = ranked(choice, allowed, k)
        margin = min(margin, gap)
        rows.append(ids)
    experts = torch.tensor(rows, dtype=torch.int64).view(T, k)
    w = s.gather(1, experts)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if score == "sigmoid" else 0.0))
    return w * scaling, experts, margin


# (T, E, k, score, normalize, bias, n_group, topk_group, scaling)
ROUTE_CASES = {
    "mixtral_T7_E8_k2": (7, 8, 2, "softmax", True, False, None, None, 1.0),
    "T1_E1_k1": (1, 1, 1, "softmax", True, False, None, None, 1.0),
    "T301_E64_k8_raw": (301, 64, 8, "softmax", False, False, None, None, 1.0),
    "T7_E8_k2_bias_scaled": (7, 8, 2, "softmax", True, True, None, None, 0.5),
    "T7_E8_k1_sigmoid_raw": (7, 8, 1, "sigmoid", False, False, None, None, 1.0),
    "T37_E64_k6_deepseek": (37, 64, 6, "sigmoid", True, True, 8, 3, 2.5),
    "T7_E256_k8_deepseek": (7, 256, 8, "sigmoid", True, True, 8, 4, 2.5),
    "T7_E64_k2_groups_softmax": (7, 64, 2, "softmax", False, False, 4, 1, 1.0),
    "T7_E16_k4_groups_of_1": (7, 16, 4, "sigmoid", True, True, 16, 5, 1.0),
    "T7_E16_k2_all_groups_kept": (7, 16, 2, "sigmoid", True, True, 4, 4, 1.0),
}
# The error of a gradient element in dtype: rounding of the result.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def route_inputs(case, dtype, device="cpu"):
    """Logits (T, E) in dtype, distinct per row on a grid exact in fp16 and
    bf16; bias (E,) float32 or None."""
    T, E, k, score, normalize, use_bias, n_group, topk_group, scaling = ROUTE_CASES[case]
    g = torch.Generator().manual_seed(len(case) * 31 + E)
    logits = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float()
    logits = (logits - E / 2) * (8.0 / E)
    bias = torch.randn(E, generator=g) * 0.5 if use_bias else None
    return logits.to(dtype).to(device), None if bias is None else bias.to(device)


@pytest.mark.parametrize("backend,dtype", route_params())
@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_route_backends_against_oracle(case, backend, dtype):
    """Weights, ids and d logits against the float64 oracle; the logits as
    given in dtype are the oracle's input too."""
    T, E, k, score, normalize, use_bias, n_group, topk_group, scaling = ROUTE_CASES[case]
    logits, bias = route_inputs(case, dtype, device_of(backend))
    leaf = logits.clone().requires_grad_()
    r = tfk.moe.route(leaf, k, score=score, normalize=normalize, bias=bias, n_group=n_group,
                      topk_group=topk_group, scaling=scaling, backend=backend)
    assert isinstance(r, tfk.moe.Routing) and r.weights.dtype == torch.float32 and r.experts.dtype == torch.int64
    x64 = logits.detach().cpu().double().requires_grad_()
    ow, oe, margin = route_oracle(x64, k, score, normalize, None if bias is None else bias.cpu(), n_group,
                                  topk_group, scaling)
    assert margin > 1e-5, "the inputs hold a near tie: pick another seed"
    assert torch.equal(r.experts.cpu(), oe), "experts (or their order)"
    torch.testing.assert_close(r.weights.detach().cpu().double(), ow.detach(), rtol=2e-6, atol=2e-7 * scaling)

    c = torch.randn(T, k, generator=torch.Generator().manual_seed(T * k), dtype=torch.float64)
    (r.weights * c.float().to(leaf.device)).sum().backward()
    (ow * c).sum().backward()
    assert leaf.grad is not None and leaf.grad.dtype == dtype
    scale = float(x64.grad.abs().max()) or 1.0
    torch.testing.assert_close(leaf.grad.cpu().double(), x64.grad, rtol=GRAD_RTOL[dtype],
                               atol=GRAD_RTOL[dtype] * 0.1 * scale)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda-sim", "cuda", "reference"])
def test_route_ties_go_to_the_lower_index(backend):
    """Equal choice scores: the lower expert first; equal group scores: the lower group."""
    dev = device_of(backend)
    T, E = 3, 16
    r = tfk.moe.route(torch.zeros(T, E, device=dev), 4, backend=backend)
    assert r.experts.tolist() == [[0, 1, 2, 3]] * T
    torch.testing.assert_close(r.weights.cpu(), torch.full((T, 4), 0.25))
    r = tfk.moe.route(torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0]], device=dev), 3, backend=backend)
    assert r.experts.tolist() == [[1, 2, 4]]
    r = tfk.moe.route(torch.zeros(T, E, device=dev), 6, score="sigmoid", n_group=4, topk_group=2, backend=backend)
    assert r.experts.tolist() == [[0, 1, 2, 3, 4, 5]] * T
    # 4 groups of 2 with equal scores: groups 0 and 1 kept, then by choice score
    logits = torch.tensor([[3.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0, 3.0]], device=dev)
    r = tfk.moe.route(logits, 3, score="sigmoid", n_group=4, topk_group=2, backend=backend)
    assert r.experts.tolist() == [[0, 3, 1]]


@pytest.mark.parametrize("backend", ["triton", "cuda-sim"])
def test_route_refusals_name_the_reason(backend):
    """A forced kernel backend refuses E > 256 and top_k > 8 with the reason."""
    unavailable = tfk.backends.BackendUnavailable
    with pytest.raises(unavailable, match=r"E = 300 experts \(the routing kernel takes at most 256\)"):
        tfk.moe.route(torch.randn(3, 300), 2, backend=backend)
    with pytest.raises(unavailable, match=r"top_k = 9 \(the routing kernel takes at most 8\)"):
        tfk.moe.route(torch.randn(3, 16), 9, backend=backend)
    with pytest.raises(unavailable, match=r"dtype torch.float64"):
        tfk.moe.route(torch.randn(3, 16, dtype=torch.float64), 2, backend=backend)


def test_route_auto_falls_back_to_torch(monkeypatch):
    """On CPU tensors "auto" is torch; where a kernel backend is "auto"'s
    choice (a GPU, here Triton made so), E > 256 and top_k > 8 fall back to
    torch with the reason, and the results are torch's."""
    from tfk.ops.moe.kernel_backends import TritonBackend
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    with tfk.backends.record_choices() as names:
        tfk.moe.route(logits, 2)
    assert names == ["torch"]
    monkeypatch.setattr(TritonBackend, "auto_for", lambda self, call: True)
    big = torch.randn(5, 300, generator=torch.Generator().manual_seed(4))
    with tfk.backends.record_choices() as names:
        tfk.moe.route(logits, 2)
        with pytest.warns(tfk.backends.FallbackWarning, match="E = 300"):
            r300 = tfk.moe.route(big, 2)
        with pytest.warns(tfk.backends.FallbackWarning, match="top_k = 9"):
            r9 = tfk.moe.route(logits, 9)
    assert names == ["triton", "torch", "torch"]
    for got, want in ((r300, tfk.moe.route(big, 2, backend="torch")), (r9, tfk.moe.route(logits, 9, backend="torch"))):
        assert torch.equal(got.experts, want.experts) and torch.equal(got.weights, want.weights)


def _mixtral(T, E, k):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    cfg = transformers.MixtralConfig(hidden_size=16, num_local_experts=E, num_experts_per_tok=k)
    router = MixtralTopKRouter(cfg)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(T * E + k))
    return router


@pytest.mark.parametrize("backend", ["triton", "cuda-sim", "reference"])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (37, 8, 2), (64, 64, 6)])
def test_mixtral_router_kernel_backends(T, E, k, backend):
    """Each backend against Hugging Face's router: ids exactly, weights and
    d hidden_states to float32 rounding (the kernels sum in another order)."""
    router = _mixtral(T, E, k)
    h, _ = _hidden(T, 16, T * E + k)

    def hf(x):
        _, w, ids = router(x)
        return w, ids

    def ours(x):
        r = tfk.moe.route(torch.nn.functional.linear(x, router.weight), k, backend=backend)
        return r.weights, r.experts

    (hw, hids, hg), (w, ids, g) = _grads(hf, h), _grads(ours, h)
    assert torch.equal(ids, hids)
    torch.testing.assert_close(w, hw, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(g, hg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cuda-sim"])
def test_route_torch_compile_fullgraph(backend):
    """route traces without a graph break (the kernel backends' custom ops),
    forward and backward, and matches eager."""
    torch._dynamo.reset()
    logits = torch.randn(9, 16, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(16, generator=torch.Generator().manual_seed(6))

    def f(x):
        r = tfk.moe.route(x, 3, score="sigmoid", bias=bias, n_group=4, topk_group=2, scaling=1.5, backend=backend)
        return (r.weights * torch.arange(1.0, 4.0)).sum(), r.experts

    got, want = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out, ids = torch.compile(f, fullgraph=True, backend="aot_eager")(got)
    out.backward()
    ref, ref_ids = f(want)
    ref.backward()
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got.grad, want.grad)


def test_route_opcheck():
    op = torch.ops.tfk.moe_route_cuda_sim_fwd.default
    logits = torch.randn(7, 16, generator=torch.Generator().manual_seed(7))
    for args in [(logits, None, 2, "softmax", True, 0, 0, 1.0),
                 (logits.clone().requires_grad_(), torch.randn(16), 4, "sigmoid", True, 4, 2, 2.5),
                 (logits.half().requires_grad_(), None, 3, "sigmoid", False, 0, 0, 1.0)]:
        torch.library.opcheck(op, args)
