"""Linear attention with torch ops: the CPU default, and the host-side math the
kernel backends will share.

Everything runs in float32 (float64 for float64 inputs), whatever the inputs'
dtype. The normaliser rides along as one more value column: with
V' = [v, 1] (E = Dv + 1 columns) and the state S' = [kv, z] (D', E),

    O'_i = phi_q_i (S'_0 + sum_{j in S(i)} phi_k_j^T V'_j)   =  [num_i, den_i]
    out_i = num_i / (den_i + eps)   (num_i when not normalize)

so one core computes both, and one core backward differentiates both.

The core (query head h reads key/value head h // G, G = H // Hkv; the G query
heads of a KV head are folded into the rows of one matrix, never a copy of K/V):

  causal, chunked (CHUNK positions a chunk, N = ceil(L / CHUNK) chunks):
      U_n  = K_n^T V'_n                          per chunk, (N, D', E)
      S_n  = S'_0 + sum_{m<n} U_m                exclusive cumsum over chunks
      O_n  = Q_n S_n + tril(Q_n K_n^T) V'_n      inter-chunk + intra-chunk
  non-causal:  S = S'_0 + K^T V',  O = Q S.

  Backward, with dO' = [dout / den, -(dout . out) / den] (normalize) and dS the
  gradient of the returned state (0 when unused):
      dQ_n = dO'_n S_n^T + tril(dO'_n V'_n^T) K_n
      R_n  = dS + sum_{m>n} Q_m^T dO'_m          reverse exclusive cumsum
      dK_n = tril(dO'_n V'_n^T)^T Q_n + V'_n R_n^T
      dV_n = tril(Q_n K_n^T)^T dO'_n + K_n R_n,     dS'_0 = dS + sum_m Q_m^T dO'_m

The states S_n are recomputed in the backward, not saved: between forward and
backward only the inputs, out and den (B, H, L) are kept (for fp16/bf16
inputs the backward recomputes out in float32 too, one more forward: the
rounded out would reach dq and dk amplified by 1/den). There is no loop
over tokens or chunks; every step is one batched matmul or cumsum. Large calls
run one slice of KV heads at a time (SLICE_ELEMENTS), so the temporaries are
O(slice·L·(D + Dv + CHUNK) + slice·N·D'·E) and peak memory is the inputs,
outputs and gradients plus one slice's temporaries: linear in L.

Feature maps run here too, with explicit derivatives (what the kernels fuse):
    identity: x                      d = 1
    elu1:     x + 1 (x > 0), e^x     d = 1 (x > 0), e^x = phi
    relu:     max(x, 0)              d = [x > 0]
    softmax:  of q over its D channels, of k over the unmasked S positions
              d = phi * (dphi - sum(dphi * phi)) along that axis
phi_q = scale * phi(q); phi_k = phi(k) * keep (keep = key_padding_mask).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backends import new_output

# Positions per chunk of the causal form: the intra-chunk product costs
# O(L·CHUNK·D), the states O(L/CHUNK·D·Dv); 64 balances them at D = 64.
CHUNK = 64

FEATURE_MAPS = ("identity", "elu1", "relu", "softmax")


def acc_dtype(dtype):
    """Where the math and the state live: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------- feature maps

def feature_map(x, name, dim, keep=None):
    """phi(x); ``dim`` is the softmax axis (-1 for q, -2 for k); ``keep`` (B, 1, S, 1)
    bool zeroes masked positions (and leaves them out of the softmax)."""
    if name == "identity":
        phi = x
    elif name == "elu1":   # elu(x) + 1 = exp(min(x, 0)) + max(x, 0): a third faster than F.elu here
        phi = x.clamp(max=0).exp_().add_(x.clamp(min=0))
    elif name == "relu":
        phi = F.relu(x)
    elif name == "softmax":
        phi = (x if keep is None else x.masked_fill(~keep, float("-inf"))).softmax(dim)
    else:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS} or a callable, got {name!r}")
    if keep is not None:
        # also turns the NaN of an all-masked softmax into 0
        phi = torch.where(keep, phi, phi.new_zeros(()))
    return phi


def feature_map_grad(x, phi, dphi, name, dim, keep=None):
    """d loss / d x from d loss / d phi (phi = feature_map(x, ...)). Overwrites phi
    and dphi (both the caller's scratch)."""
    if keep is not None:
        dphi = dphi.mul_(keep)
    if name == "identity":
        return dphi
    if name == "elu1":
        return dphi.mul_(phi.clamp_(max=1))     # phi' = 1 where x > 0 (phi > 1), e^x = phi elsewhere
    if name == "relu":
        return dphi.mul_(phi > 0)
    return dphi.sub_((dphi * phi).sum(dim, keepdim=True)).mul_(phi)   # softmax; phi = 0 where masked


# -------------------------------------------------------------------- core

def _to_chunks(x, C, G=1):
    """(B, Hkv, G, L, F) or (B, Hkv, L, F) -> (B, Hkv, N, G*C, F), zero-padded to N*C
    (a view when G = 1 and C divides L)."""
    if x.dim() == 4:
        x = x.unsqueeze(2)
    B, Hkv, _, L, Fd = x.shape
    N = -(-L // C)
    if N * C != L:
        x = F.pad(x, (0, 0, 0, N * C - L))
    return x.view(B, Hkv, G, N, C, Fd).transpose(2, 3).reshape(B, Hkv, N, G * C, Fd)


def _from_chunks(x, G, L):
    """(B, Hkv, N, G*C, F) -> (B, Hkv, G, L, F)."""
    B, Hkv, N, GC, Fd = x.shape
    C = GC // G
    return x.view(B, Hkv, N, G, C, Fd).transpose(2, 3).reshape(B, Hkv, G, N * C, Fd)[:, :, :, :L]


def _tril_(A, G):
    """Zeroes A (..., G*C, C) where row g*C + i may not see column j (j > i), in place
    (tril_ on a (..., G, C, C) view: ten times a masked_fill_ with a bool mask here)."""
    C = A.shape[-1]
    A.view(*A.shape[:-2], G, C, C).tril_()
    return A


def _add_mm_(acc, a, b):
    """acc += a @ b in the matmul itself (baddbmm: no extra pass over acc); acc contiguous."""
    acc.view(-1, *acc.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return acc


def _chunk_states(Kc, Vc, S0):
    """(states, final): states[:, :, n] = S0 + sum over chunks m < n of K_m^T V_m
    (B, Hkv, N, D, E), and the state after the last chunk (B, Hkv, D, E)."""
    U = Kc.transpose(-1, -2) @ Vc                              # per chunk, (B, Hkv, N, D, E)
    states = U.cumsum(2)
    final = states[:, :, -1].clone()
    states -= U                                                # inclusive -> exclusive
    if S0 is not None:
        states += S0.unsqueeze(2)
        final += S0
    return states, final


def core_forward(Q, K, V, S0, causal):
    """O (B, Hkv, G, L, E), S (B, Hkv, D, E) for Q (B, Hkv, G, L, D), K (B, Hkv, S, D),
    V (B, Hkv, S, E), S0 (B, Hkv, D, E) or None (see the module doc)."""
    B, Hkv, G, L, D = Q.shape
    if not causal:
        S = K.transpose(-1, -2) @ V
        if S0 is not None:
            S += S0
        return (Q.reshape(B, Hkv, G * L, D) @ S).view(B, Hkv, G, L, -1), S
    C = min(CHUNK, L)   # a short call (a decode step) is one chunk of its own length
    Qc, Kc, Vc = _to_chunks(Q, C, G), _to_chunks(K, C), _to_chunks(V, C)
    states, final = _chunk_states(Kc, Vc, S0)
    A = _tril_(Qc @ Kc.transpose(-1, -2), G)
    O = _add_mm_(A @ Vc, Qc, states)                           # intra-chunk + inter-chunk
    return _from_chunks(O, G, L), final


def core_backward(dO, Q, K, V, S0, dS, causal):
    """(dQ, dK, dV, dS0) of core_forward for the output gradient dO (B, Hkv, G, L, E)
    and dS (B, Hkv, D, E) or None, the gradient of the returned state."""
    B, Hkv, G, L, D = Q.shape
    if not causal:
        S = K.transpose(-1, -2) @ V
        if S0 is not None:
            S += S0
        Qf, dOf = Q.reshape(B, Hkv, G * L, D), dO.reshape(B, Hkv, G * L, -1)
        R = Qf.transpose(-1, -2) @ dOf                          # (B, Hkv, D, E)
        if dS is not None:
            R += dS
        dQ = (dOf @ S.transpose(-1, -2)).view(Q.shape)
        return dQ, V @ R.transpose(-1, -2), K @ R, R
    C = min(CHUNK, L)
    Qc, Kc, Vc, dOc = _to_chunks(Q, C, G), _to_chunks(K, C), _to_chunks(V, C), _to_chunks(dO, C, G)
    states, _ = _chunk_states(Kc, Vc, S0)                      # recomputed, not saved by the forward
    Bm = _tril_(dOc @ Vc.transpose(-1, -2), G)               # [i, j] = dO'_i . V'_j for j <= i
    dQ = _add_mm_(Bm @ Kc, dOc, states.transpose(-1, -2))
    del states
    R = (Qc.transpose(-1, -2) @ dOc).cumsum(2)                # inclusive sums of Q_m^T dO'_m
    dS0 = R[:, :, -1].clone()
    torch.sub(dS0.unsqueeze(2), R, out=R)                      # R_n = sum over m > n
    if dS is not None:
        R += dS.unsqueeze(2)
        dS0 += dS
    dK = _add_mm_(Bm.transpose(-1, -2) @ Qc, Vc, R.transpose(-1, -2))
    del Bm
    A = _tril_(Qc @ Kc.transpose(-1, -2), G)
    dV = _add_mm_(A.transpose(-1, -2) @ dOc, Kc, R)
    Lk = K.shape[2]
    flat = lambda x: x.view(B, Hkv, -1, x.shape[-1])[:, :, :Lk]
    return _from_chunks(dQ, G, L), flat(dK), flat(dV), dS0


# ----------------------------------------------------------------- the op

def _prepare(q, k, v, key_padding_mask, kv0, z0, feature_map_name):
    """phi(q) (B, Hkv, G, L, D') without the scale, phi_k (B, Hkv, S, D'), V' (B, Hkv, S, Dv+1),
    S'_0, keep, and the float32/64 q, k, all in the accumulation dtype. O' is linear
    in phi_q, so the scale multiplies O' (forward) and dO' (backward) instead."""
    acc = acc_dtype(q.dtype)
    B, H, L, _ = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    qf, kf = q.to(acc), k.to(acc)
    pq = feature_map(qf, feature_map_name, -1)
    pk = feature_map(kf, feature_map_name, -2, keep)
    v1 = v.new_empty(B, Hkv, S, Dv + 1, dtype=acc)
    v1[..., :Dv] = v
    v1[..., Dv] = 1
    S0 = None
    if kv0 is not None:
        S0 = kv0.new_empty(*kv0.shape[:-1], Dv + 1, dtype=acc)
        S0[..., :Dv] = kv0
        S0[..., Dv] = z0
    return pq.view(B, Hkv, H // Hkv, L, -1), pk, v1, S0, keep, qf, kf


# Calls with more than this many operand elements run one slice of KV heads (of
# one batch) at a time: each temporary then stays a few MiB, which the
# allocator reuses from call to call, where whole-call temporaries of 32 MiB and
# more are mapped fresh from the OS on every call and page-faulted in (glibc's
# mmap threshold), a third of the time at L = 16384, H = 8, D = 64.
SLICE_ELEMENTS = 1 << 21


def _slices(B, Hkv, G, per_head, limit):
    """(batch, KV-head, query-head) index slices covering (B, Hkv): the whole call when
    small (or ``limit`` is None), else about limit // per_head KV heads of one batch
    element each."""
    if limit is None or B * Hkv * per_head <= limit:
        yield slice(None), slice(None), slice(None)
        return
    step = max(1, limit // per_head)
    for b in range(B):
        for h in range(0, Hkv, step):
            h1 = min(Hkv, h + step)
            yield slice(b, b + 1), slice(h, h1), slice(h * G, h1 * G)


def _at(t, *index):
    return None if t is None else t[index]


class TorchCore:
    """The core in torch ops: O' and its gradients on mapped features (above).
    A kernel backend passes its own core to linear_forward/linear_backward and
    shares everything else here (feature maps, V' and S'_0, normalisation, dO')."""
    slice_elements = SLICE_ELEMENTS   # a kernel core's None: one launch takes the whole call

    def forward(self, Q, K, V, S0, causal, dtype):
        """core_forward; ``dtype`` (the inputs') is unused: torch computes in Q's."""
        return core_forward(Q, K, V, S0, causal)

    def backward(self, dO, Q, K, V, S0, dS, causal):
        return core_backward(dO, Q, K, V, S0, dS, causal)


TORCH_CORE = TorchCore()


def linear_forward(q, k, v, key_padding_mask, kv0, z0, feature_map_name, causal, normalize, eps, scale,
                   core=TORCH_CORE):
    """(out (B, H, L, Dv) in q's dtype, kv (B, Hkv, D', Dv), z (B, Hkv, D'), den (B, H, L)),
    the last three in the accumulation dtype; den = phi_q . z_i + eps (kept for the backward)."""
    B, H, L, Dp = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, acc = H // Hkv, acc_dtype(q.dtype)
    out = new_output((B, H, L, Dv), q.dtype, q.device)
    kv, z = new_output((B, Hkv, Dp, Dv), acc, q.device), new_output((B, Hkv, Dp), acc, q.device)
    den = new_output((B, H, L), acc, q.device)
    for b, h, hq in _slices(B, Hkv, G, (G * L + S) * (Dp + Dv + 1), core.slice_elements):
        _forward_slice(q[b, hq], k[b, h], v[b, h], _at(key_padding_mask, b), _at(kv0, b, h), _at(z0, b, h),
                       feature_map_name, causal, normalize, eps, scale, out[b, hq], kv[b, h], z[b, h], den[b, hq],
                       core)
    return out, kv, z, den


def _forward_slice(q, k, v, key_padding_mask, kv0, z0, feature_map_name, causal, normalize, eps, scale,
                   out, kv, z, den, core):
    """linear_forward on one slice, written into out, kv, z, den (views)."""
    B, H, L, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    pq, pk, v1, S0, *_ = _prepare(q, k, v, key_padding_mask, kv0, z0, feature_map_name)
    O, S = core.forward(pq, pk, v1, S0, causal, q.dtype)     # (B, Hkv, G, L, Dv + 1)
    den = torch.mul(O[..., Dv], scale, out=den.view(B, Hkv, G, L)).add_(eps)
    ratio = scale / den if normalize else torch.full_like(den, scale)
    torch.mul(O[..., :Dv], ratio.unsqueeze(-1), out=out.view(B, Hkv, G, L, Dv))
    kv.copy_(S[..., :Dv])
    z.copy_(S[..., Dv])


def linear_backward(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den, feature_map_name, causal,
                    normalize, eps, scale, core=TORCH_CORE):
    """(dq, dk, dv, dkv0, dz0) in the dtypes of q, k, v and the state; dkv, dz (the
    gradients of the returned state) may be None."""
    B, H, L, Dp = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    sd = acc_dtype(q.dtype) if kv0 is None else kv0.dtype
    dq, dk, dv = (new_output(t.shape, t.dtype, t.device) for t in (q, k, v))
    dkv0, dz0 = new_output((B, Hkv, Dp, Dv), sd, q.device), new_output((B, Hkv, Dp), sd, q.device)
    for b, h, hq in _slices(B, Hkv, G, (G * L + S) * (Dp + Dv + 1), core.slice_elements):
        _backward_slice(dout[b, hq], _at(dkv, b, h), _at(dz, b, h), q[b, hq], k[b, h], v[b, h],
                        _at(key_padding_mask, b), _at(kv0, b, h), _at(z0, b, h), out[b, hq], den[b, hq],
                        feature_map_name, causal, normalize, scale, dq[b, hq], dk[b, h], dv[b, h], dkv0[b, h],
                        dz0[b, h], core)
    return dq, dk, dv, dkv0, dz0


def _backward_slice(dout, dkv, dz, q, k, v, key_padding_mask, kv0, z0, out, den, feature_map_name, causal,
                    normalize, scale, dq_out, dk_out, dv_out, dkv0_out, dz0_out, core):
    """linear_backward on one slice, written into the *_out views."""
    B, H, L, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    pq, pk, v1, S0, keep, qf, kf = _prepare(q, k, v, key_padding_mask, kv0, z0, feature_map_name)
    acc = pq.dtype
    dout = dout.to(acc)
    # dO' = scale * [dout / den, -(dout . out) / den]: the scale because O' is linear in phi_q
    dO = dout.new_empty(B, H, L, Dv + 1)
    if normalize:
        ratio = (scale / den).unsqueeze(-1)
        torch.mul(dout, ratio, out=dO[..., :Dv])
        if out.dtype != acc:
            # A half-precision out's rounding reaches dq and dk amplified by 1/den
            # (large where phi_q . z is small): recompute it in acc, one forward.
            out = core.forward(pq, pk, v1, S0, causal, q.dtype)[0].reshape(B, H, L, Dv + 1)[..., :Dv] * ratio
        dot = (dout.unsqueeze(-2) @ out.to(acc).unsqueeze(-1)).squeeze(-1)    # (B, H, L, 1)
        torch.mul(dot, ratio, out=dO[..., Dv:]).neg_()
    else:
        torch.mul(dout, scale, out=dO[..., :Dv])
        dO[..., Dv] = 0
    dS = None
    if dkv is not None or dz is not None:
        dS = pk.new_zeros(B, Hkv, pk.shape[-1], Dv + 1)
        if dkv is not None:
            dS[..., :Dv] = dkv
        if dz is not None:
            dS[..., Dv] = dz
    dpq, dpk, dv1, dS0 = core.backward(dO.view(B, Hkv, H // Hkv, L, Dv + 1), pq, pk, v1, S0, dS, causal)
    dq_out.copy_(feature_map_grad(qf, pq.reshape(B, H, L, -1), dpq.reshape(B, H, L, -1), feature_map_name, -1))
    dk_out.copy_(feature_map_grad(kf, pk, dpk, feature_map_name, -2, keep))
    dv_out.copy_(dv1[..., :Dv])
    dkv0_out.copy_(dS0[..., :Dv])
    dz0_out.copy_(dS0[..., Dv])
