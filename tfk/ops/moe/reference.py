"""The MoE oracle: the simplest correct torch code, a loop over experts, in the
inputs' dtype (the tests and the "reference" backend call it in float64). It
shares nothing with the other backends: they are checked against it."""
import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def kept_assignments(experts, num_experts, capacity=None):
    """bool (T, k): the (token, slot) assignments an expert computes. Ids
    outside [0, E) (the sentinels E and -1) are not; with ``capacity``, an
    expert keeps its first ``capacity`` assignments counted in (slot, token)
    order: every token's first choice before any second choice."""
    keep = (experts >= 0) & (experts < num_experts)
    if capacity is None:
        return keep
    by_slot = experts.t()                                   # (k, T): slot-major
    for e in range(num_experts):
        hit = by_slot == e
        seen_so_far = hit.reshape(-1).cumsum(0).reshape(hit.shape)   # 1-based rank in (slot, token) order
        keep &= ~(hit & (seen_so_far > capacity)).t()
    return keep


def experts_reference(hidden_states, experts, weights, gate_up_proj, down_proj, activation="silu", capacity=None):
    """out (T, H) = sum over kept (token, slot) of weight * act(gate) * up @ down_proj[e]^T,
    with gate, up the halves of x @ gate_up_proj[e]^T. Differentiable by autograd."""
    x = hidden_states
    E, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    act = ACTIVATIONS[activation]
    keep = kept_assignments(experts, E, capacity)
    out = torch.zeros_like(x)
    for e in range(E):
        # an expert with no rows still runs (on 0 rows): every input stays in the graph
        token, slot = torch.nonzero(keep & (experts == e), as_tuple=True)
        h = x[token] @ gate_up_proj[e].t()
        gate, up = h[:, :inter], h[:, inter:]
        y = (act(gate) * up) @ down_proj[e].t()
        out = out.index_add(0, token, y * weights[token, slot].to(x.dtype)[:, None])
    return out


def grouped_mm_reference(a, b, offs):
    """out (M, N): rows offs[g-1]:offs[g] of ``a`` times b[g]; rows past offs[-1] are 0."""
    pieces, start = [], 0
    for g, end in enumerate(offs.tolist()):
        pieces.append(a[start:end] @ b[g])
        start = end
    pieces.append(a.new_zeros(a.shape[0] - start, b.shape[2]))
    return torch.cat(pieces)
