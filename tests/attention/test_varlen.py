"""tfk.attention_varlen: packed sequences on every backend against a loop of
per-sequence float64 attention, tiles visited equal to the sum of each
sequence's own plan (counted by the kernels), and named errors."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import tfk
from tfk import dropout as drop
from tfk import patterns as P
from tfk.ops.attention import torch_blocks
from tfk.ops.attention.varlen import AtEnd, Packed, varlen_reference
from conftest import LONG
from helpers import backend_params, plan_tiles, stable_seed
from tolerances import assert_close

# a zero-length query sequence, keys without queries, queries without keys,
# odd lengths, a sequence exactly one block of 64, one over a block
SEQLENS_Q = [5, 0, 37, 70, 1, 64, 3]
SEQLENS_K = [9, 3, 37, 0, 2, 64, 3]

PATTERNS = {
    "dense": None,
    "causal": P.causal(),
    "causal_bottom_right": P.causal(bottom_right=True),
    "window": P.sliding_window(6, 2),
    "dilated_global": P.sliding_window(8, 0, dilation=2) | P.global_tokens(2),  # sub-passes with layouts
    "fixed": P.fixed(16, 3),
}


def cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def packed_inputs(H, Hkv, D, Dv, seed, lens_q=SEQLENS_Q, lens_k=SEQLENS_K):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(sum(lens_q), H, D), r(sum(lens_k), Hkv, D), r(sum(lens_k), Hkv, Dv), r(sum(lens_q), H, Dv)


def run(fn, q, k, v, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def torch_same_dtype(q, k, v, pattern, dtype, dout):
    """torch's own error in ``dtype``: per-sequence SDPA (outputs, gradients)
    and, for lse, the reference in float32 on inputs rounded to ``dtype``."""
    def sdpa_loop(q_, k_, v_):
        outs, sq, sk = [], 0, 0
        for n_q, n_k in zip(SEQLENS_Q, SEQLENS_K):
            x = [t.transpose(0, 1).unsqueeze(0) for t in (q_[sq:sq + n_q], k_[sk:sk + n_k], v_[sk:sk + n_k])]
            if n_q and n_k:
                mask = None if pattern is None else pattern.dense_mask(n_q, n_k)
                o = F.scaled_dot_product_attention(*x, attn_mask=mask, enable_gqa=True)
                if mask is not None:  # torch's math path gives rows with no key NaN on some versions
                    o = torch.nan_to_num(o)
            else:
                o = x[0].new_zeros(1, x[0].shape[1], n_q, v_.shape[-1])
            outs.append(o[0].transpose(0, 1))
            sq, sk = sq + n_q, sk + n_k
        return torch.cat(outs), torch.zeros(())
    out, _, grads = run(sdpa_loop, q, k, v, dout, dtype)
    lse = varlen_reference(*(t.to(dtype).float() for t in (q, k, v)), SEQLENS_Q, SEQLENS_K, pattern)[1]
    return out, lse, grads


@pytest.mark.parametrize("pattern_id", list(PATTERNS))
@pytest.mark.parametrize("backend,dtype", backend_params())
def test_varlen_matches_per_sequence_reference(backend, dtype, pattern_id):
    pattern = PATTERNS[pattern_id]
    H, Hkv = 2, (1 if pattern_id == "window" else 2)    # GQA on one pattern
    D, Dv = (24, 40) if backend == "cuda-sim" else (12, 20)
    q, k, v, dout = packed_inputs(H, Hkv, D, Dv, stable_seed(backend, str(dtype), pattern_id))
    ref = lambda *x: varlen_reference(*x, SEQLENS_Q, SEQLENS_K, pattern)  # noqa: E731
    r_out, r_lse, r_grads = run(ref, q, k, v, dout, torch.float64)
    t_out, t_lse, t_grads = torch_same_dtype(q, k, v, pattern, dtype, dout)

    def tfk_fn(q_, k_, v_):
        return tfk.attention_varlen(q_, k_, v_, cu(SEQLENS_Q), cu(SEQLENS_K), max(SEQLENS_Q), max(SEQLENS_K),
                                    pattern, backend=backend, return_lse=True)
    out, lse, grads = run(tfk_fn, q, k, v, dout, dtype)
    assert out.dtype == dtype and out.shape == (sum(SEQLENS_Q), H, Dv) and lse.shape == (H, sum(SEQLENS_Q))
    assert_close("out", out, r_out, t_out, dtype)
    assert_close("lse", lse, r_lse, t_lse, dtype)
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, r_grads, t_grads):
        assert_close(name, g, rg, tg, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_dropout_draws_the_packed_keep_mask(backend):
    """Dropout keeps what the (1, H, total_q, total_k) counter hash keeps, at
    packed positions: the reference with that mask, sequence by sequence."""
    H, D = 2, 16
    q, k, v, dout = packed_inputs(H, H, D, D, 5)
    pattern, p = P.causal(), 0.3
    torch.manual_seed(11)
    seed = drop.draw_seed()
    keep = drop.dense_keep_mask(seed, 1, H, q.shape[0], k.shape[0], p)[0]
    ref = lambda *x: varlen_reference(*x, SEQLENS_Q, SEQLENS_K, pattern, keep=keep, dropout_p=p)  # noqa: E731
    r_out, _, r_grads = run(ref, q, k, v, dout, torch.float64)
    torch.manual_seed(11)   # the backend draws the same seed

    def tfk_fn(q_, k_, v_):
        return tfk.attention_varlen(q_, k_, v_, cu(SEQLENS_Q), cu(SEQLENS_K), 70, 64, pattern, dropout_p=p,
                                    backend=backend, return_lse=True)
    out, _, grads = run(tfk_fn, q, k, v, dout, torch.float32)
    torch.testing.assert_close(out.double(), r_out, atol=2e-5, rtol=1e-4)
    for g, rg in zip(grads, r_grads):
        torch.testing.assert_close(g.double(), rg, atol=5e-5, rtol=1e-4)


def random_lengths(n, most, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, most + 1, (n,), generator=g)
    lens[::7] = 0   # empty sequences among them
    return lens.tolist()


# the interpreter takes minutes over the backward of 1,000 sequences: the long tier
TRITON_PASSES = ("forward", "backward_dq", "backward_dkdv") if LONG else ("forward",)


@pytest.mark.parametrize("backend,dtype,passes", [("torch", torch.float32, ("forward", "backward")),
                                                  ("triton", torch.float32, TRITON_PASSES),
                                                  ("cuda-sim", torch.float16, ("forward",))])
def test_tiles_visited_are_the_sum_of_each_sequences_plan(backend, dtype, passes):
    """1,000 sequences of mixed lengths: every pass visits exactly the sum over
    sequences of that sequence's own plan's tiles, counted by the kernels
    (no tile straddles two sequences, none is visited for padding)."""
    lens = random_lengths(1000, 40 if backend == "triton" else 150, 3)
    H, D = 1, (64 if backend == "cuda-sim" else 16)
    pattern = P.causal()
    q = torch.randn(sum(lens), H, D).to(dtype)
    backward = len(passes) > 1
    with tfk.backends.count_tiles() as counts:
        q.requires_grad_(backward)
        out = tfk.attention_varlen(q, q, q, cu(lens), cu(lens), max(lens), max(lens), pattern, backend=backend)
        if backward:
            out.float().sum().backward()
    tiles = torch_blocks.tiles_for(Packed(pattern, lens, lens)) if backend == "torch" else plan_tiles(backend, D, dtype)
    per_sequence = sum(tfk.plan.compile_plan(pattern, n, n, *tiles).num_tiles for n in lens if n)
    assert {name: n for name, n in counts.items() if n} == {name: H * per_sequence for name in passes}


def test_packed_plan_is_the_sequences_plans_side_by_side():
    """The packed plan of several sequences, sub-pass by sub-pass, lists each
    sequence's own tiles at its own blocks, partial where its short key blocks
    hold padding, and covers exactly the sequences' allowed pairs."""
    pattern = P.sliding_window(8, 0, dilation=2) | P.global_tokens(2)
    lens = [5, 0, 37, 70, 16]
    packed = Packed(pattern, lens, lens)
    total = sum(lens)
    plan = packed.plan(total + 1, total + 1, 16, 16, "cpu")
    # every allowed pair of the packed tensors is covered exactly once over the sub-passes
    covered = torch.zeros(total + 1, total + 1, dtype=torch.int64)
    for sp in plan.subpasses:
        for qb in range(sp.kv_count.shape[1]):
            for s in range(int(sp.kv_count[0, qb])):
                kb, part = int(sp.kv_blocks[0, qb, s]), int(sp.kv_partial[0, qb, s])
                rows = sp.q_index[qb * 16:(qb + 1) * 16]
                cols = sp.kv_index[kb * 16:(kb + 1) * 16]
                allowed = torch.ones(16, 16, dtype=torch.bool) if part < 0 else sp.partial_masks[part]
                covered.index_put_((rows.view(-1, 1).expand(16, 16)[allowed], cols.view(1, -1).expand(16, 16)[allowed]),
                                   torch.ones(1, dtype=torch.int64), accumulate=True)
    # padding query rows (all on the padding row, index total) are not masked: their output is dropped
    want = packed.dense_mask(total + 1, total + 1)
    assert torch.equal(covered[:total], want[:total].long())
    assert not covered[:, total].any(), "a padding key is never allowed"
    assert plan.num_tiles == sum(tfk.plan.compile_plan(pattern, n, n, 16, 16).num_tiles for n in lens if n)


def test_at_end_places_queries_at_the_end_of_the_keys():
    """AtEnd(p) on (lq, lk) is p's mask on the lk x lk square's last lq rows,
    and its compiled plan lists the tiles of that mask."""
    for pattern in (P.causal(), P.sliding_window(5), P.sliding_window(9, 0, dilation=2) | P.global_tokens(3)):
        for lq, lk in ((1, 40), (7, 70), (70, 70)):
            got = AtEnd(pattern).dense_mask(lq, lk)
            assert torch.equal(got, pattern.dense_mask(lk, lk)[lk - lq:]), (pattern, lq, lk)
            fast = tfk.plan.compile_plan(AtEnd(pattern), lq, lk, 16, 16)
            slow = tfk.plan.compile_plan_exhaustive(AtEnd(pattern), lq, lk, 16, 16)
            assert fast.num_tiles == slow.num_tiles


def test_varlen_named_errors():
    q = torch.randn(10, 2, 8)
    ok = cu([4, 6])
    call = lambda **kw: tfk.attention_varlen(**{**dict(query=q, key=q, value=q, cu_seqlens_q=ok,  # noqa: E731
                                                       cu_seqlens_k=ok, max_seqlen_q=6, max_seqlen_k=6), **kw})
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        call(cu_seqlens_q=ok.long())
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        call(cu_seqlens_k=torch.tensor([0, 7, 6, 10], dtype=torch.int32), cu_seqlens_q=cu([3, 3, 4]))
    with pytest.raises(ValueError, match="cu_seqlens_q ends at 9, but the packed tensors hold 10"):
        call(cu_seqlens_q=cu([4, 5]))
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        call(cu_seqlens_q=torch.tensor([1, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q has 3 sequences and cu_seqlens_k 2"):
        call(cu_seqlens_q=cu([4, 6, 0]))
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be 1-D \(batch \+ 1,\)"):
        call(cu_seqlens_q=ok.view(1, -1))
    with pytest.raises(ValueError, match="max_seqlen_k is 5, less than the longest key sequence"):
        call(max_seqlen_k=5)
    with pytest.raises(ValueError, match=r"query must be 3-D \(total, heads, head_dim\)"):
        call(query=q.unsqueeze(0))
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        call(query=torch.randn(10, 3, 8))
    with pytest.raises(TypeError, match="key has dtype"):
        call(key=q.half())
    with pytest.raises(TypeError, match="pattern must be a tfk.patterns pattern"):
        call(pattern="causal")
