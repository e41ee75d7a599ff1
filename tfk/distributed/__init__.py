"""``tfk.distributed``: attention and experts past one device, over
torch.distributed (NCCL on GPUs, gloo on CPU).

    q, k, v = (tfk.distributed.shard(x, layout="zigzag") for x in (q_all, k_all, v_all))
    out = tfk.distributed.context_parallel_attention(q, k, v, tfk.patterns.causal())   # this rank's shard
    y = tfk.moe.experts(x, ids, weights, local_gate_up, local_down, group=ep_group)   # expert parallel
"""
from .context_parallel import context_parallel_attention, count_communication  # noqa: F401
from .layout import shard, unshard  # noqa: F401
from .spawn import RankFailed, free_port, spawn  # noqa: F401

__all__ = ["context_parallel_attention", "count_communication", "shard", "unshard", "spawn", "free_port",
           "RankFailed"]
