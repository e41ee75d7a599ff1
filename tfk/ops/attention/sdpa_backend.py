"""Backend "sdpa": torch's own fused kernel, for the calls it computes exactly
as tfk defines them: dense or top-left causal, or (on CPU) under an attn_mask,
with no dropout and no lse. On CPU it is the fastest path for those calls, so
"auto" takes it there and leaves every other call to the block engine
("torch"). Its attn_mask may require grad: torch differentiates it.

On CPU torch's kernel gives a query with no allowed key output 0 and zero
gradients, tfk's rule (tests/attention/test_sdpa.py checks it against the reference);
other devices' kernels are not relied on for that, so masks stay on CPU."""
from __future__ import annotations

from ...backends import AttentionCall, Backend, register_backend
from .api import torch_sdpa


class SdpaBackend(Backend):
    name = "sdpa"
    priority = 12   # above "torch" (its calls run faster here), below the GPU kernels
    routes_only = True  # its refusals send a call to the block engine: no fallback

    def reasons(self, call):
        why = []
        if call.pattern is not None and call.pattern.key != ("causal", False):
            why.append(f"pattern {call.pattern!r}: torch's kernel knows only dense and top-left causal attention")
        if call.attn_mask is not None and call.q.device.type != "cpu":
            why.append(f"attn_mask on {call.q.device} (tfk's rule for rows with no allowed key is checked "
                       "against torch's CPU kernel only)")
        if call.dropout_p > 0:
            why.append("dropout (tfk's keep mask is its own counter hash, not torch's generator)")
        if call.return_lse:
            why.append("return_lse (torch's kernel does not return lse)")
        return why

    def run(self, call: AttentionCall):
        out = torch_sdpa(call.q, call.k, call.v, attn_mask=call.attn_mask, is_causal=call.pattern is not None,
                         scale=call.scale, enable_gqa=call.q.shape[1] != call.k.shape[1])
        return out, None


register_backend(SdpaBackend())
