"""tfk.moe.route and the router losses against Hugging Face's routers and
load_balancing_loss_func, values and gradients; z_loss by its formula."""
import pytest
import torch

import tfk

transformers = pytest.importorskip("transformers")


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


@pytest.mark.parametrize("case", list(DEEPSEEK))
def test_deepseek_v3_router(case):
    """Sigmoid scores, the correction bias for the choice only, group-limited
    top-k, normalisation with + 1e-20, scaling. HF returns its choice
    unsorted: compared as sets (sorted by id), weights following their ids."""
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
                          scaling=scaling)
        return by_id(r.weights, r.experts)

    (hw, hids, hg), (w, ids, g_) = _grads(hf, h), _grads(ours, h)
    assert torch.equal(ids, hids)
    torch.testing.assert_close(w, hw, rtol=1e-6, atol=1e-7)
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
