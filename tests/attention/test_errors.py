"""Bad input gets a clear error naming the argument and what was expected."""
import pytest
import torch

import tfk
from tfk import patterns as P


def qkv(B=1, H=2, Hkv=2, L=16, S=16, D=8, dtype=torch.float32):
    return torch.randn(B, H, L, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype), \
        torch.randn(B, Hkv, S, D, dtype=dtype)


SDPA_ERRORS = {
    "rank_1": (lambda q, k, v: (q[0, 0, 0], k, v), {}, "query must have at least 2 dims"),
    "gqa_without_heads": (lambda q, k, v: (q[0, 0], k[0, 0], v[0, 0]), {"enable_gqa": True}, "enable_gqa needs"),
    "key_dtype": (lambda q, k, v: (q, k.double(), v), {}, "key has dtype torch.float64"),
    "int_query": (lambda q, k, v: (q.int(), k, v), {}, "query must be float16"),
    "value_device": (lambda q, k, v: (q, k, v.to("meta")), {}, "value is on meta"),
    "head_dim": (lambda q, k, v: (q, k[..., :4], v), {}, "head dim"),
    "value_length": (lambda q, k, v: (q, k, v[:, :, :5]), {}, "value has 5 positions"),
    "batch": (lambda q, k, v: (torch.cat([q, q]), torch.cat([k] * 3), torch.cat([v] * 3)), {}, "do not broadcast"),
    "heads_without_gqa": (lambda q, k, v: (torch.cat([q, q], 1), k, v), {}, "enable_gqa"),
    "gqa_not_multiple": (lambda q, k, v: (torch.cat([q, q[:, :1]], 1), k, v), {"enable_gqa": True}, "multiple"),
    "mask_shape": (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(3, 16, dtype=torch.bool)}, "attn_mask of shape"),
    "mask_dtype": (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(16, 16, dtype=torch.int32)}, "attn_mask must be bool"),
    "mask_float_dtype": (lambda q, k, v: (q, k, v), {"attn_mask": torch.zeros(16, 16, dtype=torch.float64)},
                         "attn_mask must be bool, float32 or query's dtype"),
    "mask_and_causal": (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(16, 16, dtype=torch.bool),
                                                    "is_causal": True}, "cannot both"),
    "dropout_range": (lambda q, k, v: (q, k, v), {"dropout_p": 1.0}, "dropout_p"),
    "scale_nan": (lambda q, k, v: (q, k, v), {"scale": float("nan")}, "scale"),
    "backend_name": (lambda q, k, v: (q, k, v), {"backend": "nope"}, "backend must be"),
}


@pytest.mark.parametrize("case", list(SDPA_ERRORS))
def test_sdpa_errors(case):
    make, kwargs, match = SDPA_ERRORS[case]
    with pytest.raises((ValueError, TypeError), match=match):
        tfk.scaled_dot_product_attention(*make(*qkv()), **kwargs)


ATTENTION_ERRORS = {
    "not_4d": (lambda q, k, v: (q[0], k[0], v[0]), {}, "must be 4-D"),
    "not_tensor": (lambda q, k, v: (q.tolist(), k, v), {}, "query must be a torch.Tensor"),
    "pattern_type": (lambda q, k, v: (q, k, v), {"pattern": "causal"}, "pattern must be"),
    "layout_shape": (lambda q, k, v: (q, k, v), {"pattern": P.block_layout(torch.ones(1, 2, 3, dtype=torch.bool), 8)},
                     "block_layout"),
    "gqa_heads": (lambda q, k, v: (q, torch.cat([k] * 3, 1)[:, :3], torch.cat([v] * 3, 1)[:, :3]), {}, "multiple"),
}


@pytest.mark.parametrize("case", list(ATTENTION_ERRORS))
def test_attention_errors(case):
    make, kwargs, match = ATTENTION_ERRORS[case]
    with pytest.raises((ValueError, TypeError), match=match):
        tfk.attention(*make(*qkv()), **kwargs)
