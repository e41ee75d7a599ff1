"""tfk.moe.MoE: router + experts (+ an optional shared expert), as a module."""
from __future__ import annotations

import math

import torch
from torch import nn

from .api import experts, load_balancing_loss, route, z_loss
from .reference import ACTIVATIONS


class MoE(nn.Module):
    """A mixture-of-experts feed-forward layer.

    Router: a linear map (E, H) to logits, then ``tfk.moe.route`` (``score``,
    ``normalize``, ``n_group``/``topk_group``, ``scaling``; with score
    "sigmoid" a buffer ``score_correction_bias`` (E,) is the choice bias).
    Experts: ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I), Hugging
    Face's layout. ``shared_expert``: None, or the intermediate size of a
    dense gated MLP added to every token, scaled by sigmoid(a linear map of
    the token) as Qwen2-MoE. ``capacity_factor``: None (dropless) or the
    per-expert capacity ceil(factor * T * k / E).

    ``group``: None, or a torch.distributed process group of P ranks
    (``torch.distributed.group.WORLD`` for the default one) for expert
    parallelism: num_experts must be divisible by P, and rank r holds only
    its E/P experts [r*E/P, (r+1)*E/P): ``gate_up_proj`` (E/P, 2I, H),
    ``down_proj`` (E/P, H, I); tokens reach them by ``tfk.moe.experts(...,
    group=group)``. The router stays full (E logits, global expert ids) and
    replicated, as the shared expert: give it the same weights on every rank
    (same seed, or broadcast) and all_reduce its gradients as data parallel.
    With ``capacity_factor``, T in the capacity is the GLOBAL token count
    (an all_reduce of every rank's T per forward), so the capacity is the one
    a single process holding every rank's tokens would use. Every rank of the
    group must call forward (and backward).

    forward(x (..., H)) -> (..., H). It keeps, from its last call,
    ``router_logits`` (T, E), ``routing`` and ``losses`` (the requested ones:
    "load_balancing" and "z", each times its coefficient) and ``aux_loss``
    (their sum, 0 when none was requested) to add to the training loss.
    """

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, *, score="softmax", normalize=True,
                 n_group=None, topk_group=None, scaling=1.0, activation="silu", shared_expert=None,
                 capacity_factor=None, aux_loss_coef=0.0, z_loss_coef=0.0, backend="auto", device=None,
                 dtype=None, group=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts = {num_experts}], got {top_k}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None or > 0, got {capacity_factor}")
        self.group, self.num_local_experts, self.expert_offset = group, num_experts, 0
        if group is not None:
            import torch.distributed as dist
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("MoE: group is given but torch.distributed is not initialised: call "
                                   "torch.distributed.init_process_group first (or pass group=None)")
            world = dist.get_world_size(group)
            if num_experts % world:
                raise ValueError(f"num_experts = {num_experts} must be divisible by the group's size {world} "
                                 f"(each rank holds num_experts / size experts)")
            self.num_local_experts = num_experts // world
            self.expert_offset = dist.get_rank(group) * self.num_local_experts
        kw = dict(device=device, dtype=dtype)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.score, self.normalize, self.scaling = score, normalize, scaling
        self.n_group, self.topk_group = n_group, topk_group
        self.activation, self.capacity_factor, self.backend = activation, capacity_factor, backend
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        E_here = self.num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(E_here, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(E_here, hidden_size, intermediate_size, **kw))
        if score == "sigmoid":
            self.register_buffer("score_correction_bias", torch.zeros(num_experts, device=device))
        else:
            self.score_correction_bias = None
        self.shared_expert = None
        if shared_expert is not None:
            self.shared_expert = nn.ModuleDict(dict(
                gate_proj=nn.Linear(hidden_size, shared_expert, bias=False, **kw),
                up_proj=nn.Linear(hidden_size, shared_expert, bias=False, **kw),
                down_proj=nn.Linear(shared_expert, hidden_size, bias=False, **kw)))
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **kw)
        self.reset_parameters()
        self.router_logits = self.routing = None
        self.losses = {}
        self.aux_loss = 0.0

    def reset_parameters(self):
        nn.init.normal_(self.gate_up_proj, std=1 / math.sqrt(self.hidden_size))
        nn.init.normal_(self.down_proj, std=1 / math.sqrt(self.intermediate_size))

    def capacity(self, num_tokens):
        """The per-expert capacity for ``num_tokens`` tokens (with a group: the
        global count), or None."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def _global_tokens(self, x):
        if self.group is None or self.capacity_factor is None:
            return x.shape[0]
        import torch.distributed as dist
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        dist.all_reduce(n, group=self.group)
        return int(n)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        logits = self.gate(x)
        routing = route(logits, self.top_k, score=self.score, normalize=self.normalize,
                        bias=self.score_correction_bias, n_group=self.n_group, topk_group=self.topk_group,
                        scaling=self.scaling)
        out = experts(x, routing.experts, routing.weights, self.gate_up_proj, self.down_proj,
                      activation=self.activation, capacity=self.capacity(self._global_tokens(x)),
                      backend=self.backend, group=self.group)
        if self.shared_expert is not None:
            mlp = self.shared_expert
            act = ACTIVATIONS[self.activation]
            shared = mlp["down_proj"](act(mlp["gate_proj"](x)) * mlp["up_proj"](x))
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        self.router_logits, self.routing = logits, routing
        self.losses = {}
        if self.aux_loss_coef:
            self.losses["load_balancing"] = self.aux_loss_coef * load_balancing_loss(
                logits, routing.experts, self.num_experts)
        if self.z_loss_coef:
            self.losses["z"] = self.z_loss_coef * z_loss(logits)
        self.aux_loss = sum(self.losses.values()) if self.losses else 0.0
        return out.reshape(shape)

    def extra_repr(self):
        local = (f", local_experts=[{self.expert_offset}, {self.expert_offset + self.num_local_experts})"
                 if self.group is not None else "")
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}{local}")
