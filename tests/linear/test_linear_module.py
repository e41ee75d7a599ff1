"""tfk.nn.LinearAttention: the generation path (prompt, then one token at a
time with the state) equals a full forward; padding; gradients; the
non-causal softmax module; bad configurations."""
import pytest
import torch

import tfk


def _module(**kw):
    torch.manual_seed(0)
    return tfk.nn.LinearAttention(48, 6, **kw)


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2, bias=True), dict(feature_map="relu", num_kv_heads=3)])
def test_generation_equals_full_forward(kw):
    m = _module(**kw)
    x = torch.randn(2, 150, 48, generator=torch.Generator().manual_seed(1))   # the prompt spans 3 chunks
    y_full, (kv_full, z_full) = m(x)
    assert y_full.shape == x.shape
    assert kv_full.shape == (2, m.num_kv_heads, 8, 8) and z_full.shape == (2, m.num_kv_heads, 8)
    y, state = m(x[:, :137])
    ys = [y]
    for t in range(137, 150):
        y_t, state = m(x[:, t:t + 1], state)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[0], kv_full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(state[1], z_full, rtol=1e-5, atol=1e-4)


def test_padding_tokens_add_nothing():
    """Left padding (False in key_padding_mask) leaves the real tokens' outputs
    as without it, and adds nothing to the state."""
    m = _module(num_kv_heads=2)
    x = torch.randn(1, 20, 48, generator=torch.Generator().manual_seed(2))
    pad = torch.randn(1, 5, 48)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 20, dtype=torch.bool)], 1)
    y_pad, (kv_pad, z_pad) = m(torch.cat([pad, x], 1), key_padding_mask=mask)
    y, (kv, z) = m(x)
    torch.testing.assert_close(y_pad[:, 5:], y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv_pad, kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_pad, z, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter():
    m = _module(num_kv_heads=2, bias=True)
    x = torch.randn(2, 30, 48, requires_grad=True)
    y, _ = m(x)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_noncausal_softmax_module_has_no_state():
    m = _module(feature_map="softmax", causal=False)
    x = torch.randn(2, 30, 48)
    y, state = m(x)
    assert y.shape == x.shape and state is None
    with pytest.raises(ValueError, match="carries no state"):
        m(x, (torch.zeros(2, 6, 8, 8), torch.zeros(2, 6, 8)))


@pytest.mark.parametrize("kw,match", [(dict(embed_dim=50, num_heads=6), "embed_dim"),
                                      (dict(num_kv_heads=4), "num_kv_heads"),
                                      (dict(feature_map="softmax"), "causal=False"),
                                      (dict(feature_map="tanh"), "feature_map must be one of")])
def test_bad_configurations(kw, match):
    args = dict(embed_dim=48, num_heads=6)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        tfk.nn.LinearAttention(args.pop("embed_dim"), args.pop("num_heads"), **args)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"x must be \(B, L, embed_dim = 48\)"):
        _module()(torch.randn(2, 30, 40))
