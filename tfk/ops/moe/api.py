"""MoE public functions: routing, the router losses, grouped_mm and experts;
validation, the calls the backends see, and the reference and torch backends."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ...backends import Backend, register_backend, select_backend
from . import torch_backend
from .functions import experts_ops, grouped_mm_ops
from .reference import ACTIVATIONS, experts_reference, grouped_mm_reference

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# -------------------------------------------------------------------- calls

@dataclass
class ExpertsCall:
    """A validated experts call: hidden_states (T, H), experts (T, k) int ids,
    weights (T, k) float, gate_up_proj (E, 2I, H), down_proj (E, H, I)."""
    hidden_states: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    activation: str
    capacity: int | None

    @property
    def hidden_size(self):
        return self.hidden_states.shape[1]

    @property
    def intermediate_size(self):
        return self.down_proj.shape[2]


@dataclass
class GroupedMMCall:
    """A validated grouped_mm call: a (M, K), b (G, K, N), offs (G,) int row ends."""
    a: torch.Tensor
    b: torch.Tensor
    offs: torch.Tensor


@dataclass
class RouteCall:
    """A validated route call: logits (T, E) float; 1 <= top_k <= E; score
    "softmax" or "sigmoid"; bias (E,) or None; n_group and topk_group both
    None (no group limit) or n_group dividing E, 1 <= topk_group <= n_group."""
    logits: torch.Tensor
    top_k: int
    score: str
    normalize: bool
    bias: torch.Tensor | None
    n_group: int | None
    topk_group: int | None
    scaling: float

    @property
    def num_experts(self):
        return self.logits.shape[1]

    def group_limit(self):
        """(n_group, topk_group) when groups limit the choice, else None: one
        group, every group kept, or groups of one expert (the topk_group best
        experts hold the top_k best: the plain top-k) limit nothing."""
        if self.n_group is None or self.topk_group == self.n_group or self.num_experts // self.n_group < 2:
            return None
        return self.n_group, self.topk_group


class MoEBackend(Backend):
    """A backend of the MoE family: ``experts(call)`` and ``grouped_mm(call)``
    return differentiable results in the inputs' dtype; ``route(call)`` a
    Routing whose weights are float32 and differentiable w.r.t. the logits."""
    family = "moe"

    def reasons(self, call) -> list[str]:
        return []

    def experts(self, call: ExpertsCall) -> torch.Tensor:
        raise NotImplementedError

    def grouped_mm(self, call: GroupedMMCall) -> torch.Tensor:
        raise NotImplementedError

    def route(self, call: RouteCall) -> Routing:
        raise NotImplementedError


def kernel_reasons(call) -> list[str]:
    """What every fused-kernel backend refuses (torch and reference take any size):
    sizes that are not multiples of 8 (16-byte rows in half precision)."""
    if isinstance(call, ExpertsCall):
        sizes = (("hidden size H", call.hidden_size), ("intermediate size I", call.intermediate_size))
    else:
        sizes = (("K", call.a.shape[1]), ("N", call.b.shape[2]))
    return [f"{name} = {n} is not a multiple of 8" for name, n in sizes if n % 8]


class ReferenceBackend(MoEBackend):
    """The float64 oracle as a backend: a loop over experts, autograd for the
    gradients. Never chosen by "auto"."""
    name = "reference"
    priority = 0

    def auto_for(self, call):
        return False

    def experts(self, call):
        d = torch.float64
        out = experts_reference(call.hidden_states.to(d), call.experts, call.weights.to(d),
                                call.gate_up_proj.to(d), call.down_proj.to(d), call.activation, call.capacity)
        return out.to(call.hidden_states.dtype)

    def grouped_mm(self, call):
        return grouped_mm_reference(call.a.double(), call.b.double(), call.offs).to(call.a.dtype)

    def route(self, call):
        return _route_torch(call, torch.float64)


class TorchBackend(MoEBackend):
    """Sort by expert, grouped matmuls (per expert, or batched over padded
    groups when they are small), combine by gather; custom ops with autograd."""
    name = "torch"
    priority = 10

    _experts = staticmethod(experts_ops("torch", torch_backend.experts_forward, torch_backend.experts_backward))
    _grouped_mm = staticmethod(grouped_mm_ops("torch", torch_backend.grouped_mm_forward,
                                              torch_backend.grouped_mm_backward))

    def experts(self, call):
        return self._experts(call.hidden_states, call.experts, call.weights, call.gate_up_proj, call.down_proj,
                             call.activation, -1 if call.capacity is None else call.capacity)

    def grouped_mm(self, call):
        return self._grouped_mm(call.a, call.b, call.offs)

    def route(self, call):
        return _route_torch(call, torch.float32)


register_backend(ReferenceBackend())
register_backend(TorchBackend())


# --------------------------------------------------------------- validation

def _tensor(name, t):
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _same_device(ref_name, ref, **others):
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, expected {ref_name}'s device {ref.device}")


def _int(name, v, low, high=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < low or (high is not None and v > high):
        where = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {where}, got {v}")
    return v


def _check_experts(x, experts, weights, gate_up_proj, down_proj, activation, capacity, num_experts=None,
                   where=""):
    """Validates an experts call; returns the capacity as an int or None.
    ``num_experts``: the id range when it is not gate_up_proj's E (expert
    parallel: the global E = P * E_loc; ``where`` says so in the message)."""
    for name, t in (("hidden_states", x), ("experts", experts), ("weights", weights),
                    ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        _tensor(name, t)
    if x.dim() != 2:
        raise ValueError(f"hidden_states must be (T, H), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"hidden_states must be float16, bfloat16, float32 or float64, got {x.dtype}")
    T, H = x.shape
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != H or gate_up_proj.shape[1] % 2:
        raise ValueError(f"gate_up_proj must be (E, 2I, H) with H = {H} (hidden_states' last dim), "
                         f"got shape {tuple(gate_up_proj.shape)}")
    E, inter = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    if tuple(down_proj.shape) != (E, H, inter):
        raise ValueError(f"down_proj must be (E, H, I) = {(E, H, inter)} to match gate_up_proj "
                         f"{tuple(gate_up_proj.shape)}, got shape {tuple(down_proj.shape)}")
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected hidden_states' dtype {x.dtype}")
    if experts.dim() != 2 or experts.shape[0] != T:
        raise ValueError(f"experts must be (T, k) with T = {T}, got shape {tuple(experts.shape)}")
    if experts.dtype not in _INTS:
        raise TypeError(f"experts must be an integer tensor of expert ids, got {experts.dtype}")
    if tuple(weights.shape) != tuple(experts.shape):
        raise ValueError(f"weights must be (T, k) = {tuple(experts.shape)} like experts, "
                         f"got shape {tuple(weights.shape)}")
    if weights.dtype not in _FLOATS:
        raise TypeError(f"weights must be a float tensor, got {weights.dtype}")
    _same_device("hidden_states", x, experts=experts, weights=weights, gate_up_proj=gate_up_proj,
                 down_proj=down_proj)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if capacity is not None:
        capacity = _int("capacity", capacity, 0)
    if num_experts is not None:
        E = num_experts
    if not torch.compiler.is_compiling() and experts.numel():
        bad = (experts < -1) | (experts > E)
        if bool(bad.any()):
            t, s = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"experts[{t}, {s}] = {int(experts[t, s])} is out of range: ids must be in [0, {E}) "
                             f"(num_experts = {E}{where}), or the sentinels {E} and -1 for no expert")
    return capacity


def _check_grouped_mm(a, b, offs):
    for name, t in (("a", a), ("b", b), ("offs", offs)):
        _tensor(name, t)
    if a.dim() != 2:
        raise ValueError(f"a must be (M, K), got shape {tuple(a.shape)}")
    if b.dim() != 3 or b.shape[1] != a.shape[1]:
        raise ValueError(f"b must be (G, K, N) with K = {a.shape[1]} (a's last dim), got shape {tuple(b.shape)}")
    if offs.dim() != 1 or offs.shape[0] != b.shape[0]:
        raise ValueError(f"offs must be (G,) with G = {b.shape[0]} (b's first dim), got shape {tuple(offs.shape)}")
    if offs.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offs must be int32 or int64 cumulative row ends, got {offs.dtype}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"a must be float16, bfloat16, float32 or float64, got {a.dtype}")
    if b.dtype != a.dtype:
        raise TypeError(f"b has dtype {b.dtype}, expected a's dtype {a.dtype}")
    _same_device("a", a, b=b, offs=offs)
    if not torch.compiler.is_compiling() and offs.numel():
        ends = offs.long()
        if bool((ends[1:] < ends[:-1]).any()) or int(ends[0]) < 0 or int(ends[-1]) > a.shape[0]:
            raise ValueError(f"offs must be nondecreasing row ends in [0, M = {a.shape[0]}], got {offs.tolist()}")


# ------------------------------------------------------------------ routing

class Routing(NamedTuple):
    """weights (T, k) float32, differentiable w.r.t. the logits; experts (T, k)
    int64; each row descending by choice score."""
    weights: torch.Tensor
    experts: torch.Tensor


def _top_stable(x, k):
    """Column ids of the k greatest entries of each row of x, descending, equal
    values in ascending id order (torch.topk breaks ties in no fixed order)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]


def _route_torch(call, dtype):
    """Routing in torch ops, computed in ``dtype``; weights float32,
    differentiable through autograd."""
    T, E = call.logits.shape
    logits = call.logits.to(dtype)
    scores = logits.softmax(-1) if call.score == "softmax" else logits.sigmoid()
    choice = scores.detach()
    if call.bias is not None:
        choice = choice + call.bias.to(dtype)
    if call.n_group is not None and call.n_group > 1:
        size = E // call.n_group
        grouped = choice.view(T, call.n_group, size)
        group_scores = grouped.topk(min(2, size), dim=-1).values.sum(-1)
        best = _top_stable(group_scores, call.topk_group)
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(size, dim=1), float("-inf"))
    chosen = _top_stable(choice, call.top_k)
    weights = scores.gather(1, chosen)
    if call.normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if call.score == "sigmoid" else 0.0))
    if call.scaling != 1.0:
        weights = weights * call.scaling
    return Routing(weights.float(), chosen)


def route(router_logits, top_k, *, score="softmax", normalize=True, bias=None, n_group=None, topk_group=None,
          scaling=1.0, backend="auto") -> Routing:
    """Top-k routing of logits (T, E), computed in float32.

    score: "softmax" (Mixtral, Qwen-MoE, OLMoE) or "sigmoid" (DeepSeek-V3).
    bias: (E,) added to the scores for the choice only (DeepSeek-V3's
        e_score_correction_bias); the weights are the unbiased scores.
    n_group, topk_group: group-limited choice: the experts split into
        n_group contiguous groups, a group scored by the sum of its top-2
        choice scores, experts chosen only from the best topk_group groups.
    normalize: weights renormalised to sum 1 (sigmoid: + 1e-20 in the
        denominator, as Hugging Face), then times ``scaling``.
    backend: "auto" (torch on CPU tensors; the routing kernels on CUDA, for
        E <= 256 and top_k <= 8), or "torch", "triton", "cuda", "cuda-sim",
        "reference" (float64).
    Experts are taken in descending choice score, equal scores (and equal
    group scores) in ascending index order. Equals Hugging Face's
    MixtralTopKRouter and DeepseekV3TopkRouter for their configs (DeepSeek's
    order aside: tfk's is descending by choice score). weights (T, top_k)
    float32, differentiable w.r.t. router_logits; experts (T, top_k) int64.
    """
    _tensor("router_logits", router_logits)
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be (T, E), got shape {tuple(router_logits.shape)}")
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be a float tensor, got {router_logits.dtype}")
    T, E = router_logits.shape
    top_k = _int("top_k", top_k, 1, E)
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    if bias is not None:
        _tensor("bias", bias)
        if tuple(bias.shape) != (E,):
            raise ValueError(f"bias must be (E,) = ({E},), got shape {tuple(bias.shape)}")
        _same_device("router_logits", router_logits, bias=bias)
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group go together: give both or neither")
    if n_group is not None:
        n_group = _int("n_group", n_group, 1, E)
        if E % n_group:
            raise ValueError(f"n_group = {n_group} must divide the number of experts E = {E}")
        topk_group = _int("topk_group", topk_group, 1, n_group)
        if top_k > topk_group * (E // n_group):
            raise ValueError(f"top_k = {top_k} exceeds the {topk_group * (E // n_group)} experts of the "
                             f"topk_group = {topk_group} groups of {E // n_group}")
    if not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a number, got {type(scaling).__name__}")
    call = RouteCall(router_logits, top_k, score, bool(normalize), bias, n_group, topk_group, float(scaling))
    return select_backend(backend, call, "moe").route(call)


def load_balancing_loss(router_logits, experts, num_experts):
    """E * sum_e (n_e / T) * mean_t softmax(logits)_e, n_e the (token, slot)
    assignments to e (sentinels count for none): Hugging Face's
    load_balancing_loss_func for one layer. router_logits (T, E), experts (T, k)."""
    _tensor("router_logits", router_logits)
    _tensor("experts", experts)
    num_experts = _int("num_experts", num_experts, 1)
    if router_logits.dim() != 2 or router_logits.shape[1] != num_experts:
        raise ValueError(f"router_logits must be (T, E) with E = num_experts = {num_experts}, "
                         f"got shape {tuple(router_logits.shape)}")
    if experts.dim() != 2 or experts.shape[0] != router_logits.shape[0]:
        raise ValueError(f"experts must be (T, k) with T = {router_logits.shape[0]}, got shape {tuple(experts.shape)}")
    if experts.dtype not in _INTS:
        raise TypeError(f"experts must be an integer tensor of expert ids, got {experts.dtype}")
    T = router_logits.shape[0]
    probs = router_logits.float().softmax(-1)
    ids = experts.reshape(-1).long()
    ids = ids[(ids >= 0) & (ids < num_experts)]
    counts = torch.bincount(ids, minlength=num_experts).float()
    return num_experts * torch.sum(counts / T * probs.mean(0))


def z_loss(router_logits):
    """mean_t logsumexp(logits_t)^2 (ST-MoE's router z-loss), in float32."""
    _tensor("router_logits", router_logits)
    if router_logits.dim() < 1 or not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be a float tensor (..., E), got {router_logits.dtype} "
                         f"{tuple(router_logits.shape)}")
    return torch.logsumexp(router_logits.float(), -1).square().mean()


# -------------------------------------------------------- grouped_mm, experts

def grouped_mm(a, b, offs, *, backend="auto"):
    """out (M, N): rows offs[g-1]:offs[g] of a (M, K) times b[g] (b (G, K, N)),
    offs (G,) int32 or int64 cumulative row ends (empty groups allowed); rows
    past offs[-1] are 0. fp16, bf16, fp32 (and fp64); differentiable w.r.t. a and b."""
    _check_grouped_mm(a, b, offs)
    call = GroupedMMCall(a, b, offs)
    return select_backend(backend, call, "moe").grouped_mm(call)


def experts(hidden_states, experts, weights, gate_up_proj, down_proj, *, activation="silu", capacity=None,
            backend="auto", group=None):
    """Mixture-of-experts feed-forward, Hugging Face 5.x layout.

    hidden_states (T, H); experts (T, k) int ids; weights (T, k) float;
    gate_up_proj (E, 2I, H); down_proj (E, H, I). For each (token, slot) with
    expert e: gate, up = halves of x @ gate_up_proj[e]^T;
    y = act(gate) * up @ down_proj[e]^T; out = sum over slots of weight * y,
    (T, H) in hidden_states' dtype.
    activation: "silu", "gelu" (tanh approximation) or "relu".
    Ids E and -1 are expert-parallel sentinels and contribute 0.
    capacity: per expert; assignments are kept in (slot, token) order (all
    first choices before second choices) until an expert has ``capacity``,
    the rest contribute 0. None is dropless.
    Differentiable w.r.t. hidden_states, weights, gate_up_proj and down_proj.

    group: None (one process), or a torch.distributed process group
    (``torch.distributed.group.WORLD`` for the default one) of P ranks for
    expert parallelism (tfk/distributed/expert_parallel.py). Rank r then
    holds experts [r*E_loc, (r+1)*E_loc): gate_up_proj (E_loc, 2I, H) and
    down_proj (E_loc, H, I) are its own, the global E = P * E_loc;
    hidden_states (T_r, H), experts (T_r, k) GLOBAL ids in [0, E) or the
    sentinels E and -1, weights (T_r, k): rank r's tokens (T_r may differ
    per rank, and be 0). Every rank of the group must call it (and run the
    backward): the tokens go to their experts' ranks and back by
    all_to_all_single. out (T_r, H) and the gradients are rank r's rows (and
    expert slices) of this op on every rank's tokens concatenated in rank
    order and the experts concatenated in rank order; the capacity order
    counts global token indices (rank r's start after the lower ranks').
    """
    if group is not None:
        return _experts_parallel(hidden_states, experts, weights, gate_up_proj, down_proj, activation, capacity,
                                 backend, group)
    capacity = _check_experts(hidden_states, experts, weights, gate_up_proj, down_proj, activation, capacity)
    call = ExpertsCall(hidden_states, experts, weights, gate_up_proj, down_proj, activation, capacity)
    return select_backend(backend, call, "moe").experts(call)


def _experts_parallel(hidden_states, experts, weights, gate_up_proj, down_proj, activation, capacity, backend,
                      group):
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("experts: group is given but torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group first (or pass group=None for one process)")
    _tensor("gate_up_proj", gate_up_proj)
    world = dist.get_world_size(group)
    E_loc = gate_up_proj.shape[0] if gate_up_proj.dim() == 3 else 0
    capacity = _check_experts(hidden_states, experts, weights, gate_up_proj, down_proj, activation, capacity,
                              num_experts=world * E_loc,
                              where=f" over the group: {E_loc} local experts x {world} ranks")
    from ...distributed.expert_parallel import experts_parallel
    return experts_parallel(hidden_states, experts, weights, gate_up_proj, down_proj, activation=activation,
                            capacity=capacity, backend=backend, group=group)
