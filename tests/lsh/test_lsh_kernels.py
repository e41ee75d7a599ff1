"""LSH attention on the fused-attention engine's kernels (backend "triton",
in Triton's interpreter here): forward, lse and gradients against the float64
reference, the tiles the kernels visit (counted by the kernels), dropout
given its keep mask, the custom op and torch.compile."""
import math

import pytest
import torch

import tfk
from tfk.ops.lsh import dense_keep, lsh_attention_reference
from tfk.ops.lsh.api import LshCall
from tfk.ops.lsh.kernel_backends import TritonBackend, lsh_plan, tiles_for
from lsh_cases import Case, check_case, check_compile_fullgraph, make_inputs, op_args
from test_lsh_attention import CASES

TRITON = "triton"
pytestmark = pytest.mark.skipif(TritonBackend().device_reasons(torch.zeros(1)) != [],
                                reason="the Triton backend cannot run here (no triton, or no GPU and no interpreter)")

KERNEL_CASES = dict(CASES, **{
    "chunk32-d64-n3-causal-mask": Case(L=96, D=64, n_hashes=3, chunk_size=32, causal=True, mask=True, n_buckets=6),
    "odd-d20-dv36-wrap-twice": Case(B=1, L=32, D=20, Dv=36, n_hashes=1, chunk_size=16, before=1, after=1),
})


@pytest.mark.parametrize("name", list(KERNEL_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_reference(name, dtype):
    check_case(KERNEL_CASES[name], dtype, TRITON)


def _visited(c, dtype):
    """Tiles per pass the kernels must visit: every round's query blocks, each
    over the key tiles of 1 + before + after chunks (all keys on the one-pass
    path), per (batch, head)."""
    default = tfk.triton_kernels.attention.tile_config(max(c.D, c.vdim), dtype, predicates=1)
    bq, bk = tiles_for(c.chunk_size, c.full, default)
    if c.full:
        per_head = math.ceil(c.L / bq) * math.ceil(c.L / bk)
    else:
        per_head = c.n_hashes * (c.L // bq) * (1 + c.before + c.after) * (c.chunk_size // bk)
    return c.B * c.H * per_head


@pytest.mark.parametrize("c, dtype", [
    (Case(B=1, H=2, L=256, D=96, n_hashes=2, chunk_size=64, causal=True, mask=True), torch.float16),
    (CASES["before2-after1-causal-factorised"], torch.float32),
    (CASES["full-path-L<chunk"], torch.float32),
], ids=["chunk64-fp16", "chunk16-fp32", "one-pass"])
def test_kernels_visit_exactly_the_band(c, dtype):
    qk, v, mask, buckets, _ = make_inputs(c)
    qk, v = qk.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
    with tfk.backends.count_tiles() as counts:
        out = tfk.lsh_attention(qk, v, n_hashes=c.n_hashes, chunk_size=c.chunk_size, chunks_before=c.before,
                                chunks_after=c.after, causal=c.causal, key_padding_mask=mask, buckets=buckets,
                                backend=TRITON)
        out.float().sum().backward()
    want = _visited(c, dtype)
    assert dict(counts) == {"forward": want, "backward_dq": want, "backward_dkdv": want}


def test_band_schedule_wraps_across_rounds():
    """Round r's first chunk sees the previous round's last chunk: the plan's
    key blocks, read back from its tables."""
    order = torch.arange(64).expand(1, 1, 2, 64).contiguous()     # n = 2, L = 64, chunk 16: N = 8 chunks
    plan = lsh_plan(order, 16, 1, 1, False, 16, 16)
    for r, sp in enumerate(plan.subpasses):
        for j in range(4):                                         # round r's query block j is chunk 4r + j
            c = 4 * r + j
            assert sp.kv_count[0, j] == 3
            assert sp.kv_blocks[0, j].tolist() == [(c - 1) % 8, c, (c + 1) % 8]
        # the transposed tables list, per key block, the query blocks that visit it
        pairs = {(int(q), kb) for kb in range(8) for q in sp.q_blocks[0, kb, :int(sp.q_count[0, kb])]}
        assert pairs == {(j, int(k)) for j in range(4) for k in sp.kv_blocks[0, j]}


def test_unsupported_chunk_falls_back_with_a_reason():
    qk = torch.randn(1, 1, 48, 8)
    call = LshCall(qk, qk, torch.zeros(1, 1, 1, 48, dtype=torch.int64), 24, 1, 0, False, None, 1.0, 0.0, 0, False)
    assert any("multiple of 16" in w for w in TritonBackend().reasons(call))
    with pytest.raises(tfk.backends.BackendUnavailable, match="multiple of 16"):
        tfk.lsh_attention(qk, qk, chunk_size=24, backend=TRITON)


def test_dropout_matches_reference_given_its_keep_mask():
    # no row sees only itself (its lse near -1e5 merges rounds at float32's 0.008 steps)
    c = Case(B=1, D=16, n_hashes=2, mask=True)
    qk, v, mask, buckets, (dout, dlse) = make_inputs(c)
    call = LshCall(qk, v, buckets, 16, 1, 0, False, mask, 1.0, 0.3, 11, True)
    ref_q, ref_v = qk.clone().requires_grad_(), v.clone().requires_grad_()
    want = lsh_attention_reference(ref_q, ref_v, buckets, chunk_size=16, key_padding_mask=mask, dropout_p=0.3,
                                   keep=dense_keep(call))
    want_grads = torch.autograd.grad((want[0] * dout).sum() + (want[1] * dlse).sum(), (ref_q, ref_v))
    q, vv = qk.float().requires_grad_(), v.float().requires_grad_()
    out, lse = tfk.lsh_attention(q, vv, n_hashes=2, chunk_size=16, key_padding_mask=mask, buckets=buckets,
                                 dropout_p=0.3, seed=11, backend=TRITON, return_lse=True)
    grads = torch.autograd.grad((out.double() * dout).sum() + (lse.double() * dlse).sum(), (q, vv))
    want = tuple(t.detach() for t in want)
    for name, a, b in zip(("out", "lse", "dqk", "dv"), (out, lse) + grads, want + want_grads):
        assert (a.double() - b).abs().max() < 1e-4 * max(1.0, float(b.abs().max())), name
    no_drop = tfk.lsh_attention(q.detach(), vv.detach(), n_hashes=2, chunk_size=16, key_padding_mask=mask,
                                buckets=buckets, backend=TRITON)
    assert (no_drop.double() - want[0]).abs().max() > 1e-2


def _op_args(dropout_p=0.0):
    return op_args(Case(B=1, L=64, D=16, n_hashes=2, chunk_size=16, causal=True, mask=True), dropout_p=dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck(dropout_p):
    op = TritonBackend._op
    torch.library.opcheck(op.op, _op_args(dropout_p=dropout_p))
    qk, v, order, mask, *rest = _op_args(dropout_p=dropout_p)
    out, lse, lse_slots = (t.detach() for t in op.op(qk, v, order, mask, *rest))
    assert lse_slots.shape == (1, 2, 0)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    saved = (qk.detach(), v.detach(), order, mask, out, lse, lse_slots)
    torch.library.opcheck(op.backward_op, (dout, dlse, *saved, *rest))


def test_torch_compile_fullgraph():
    check_compile_fullgraph(buckets=make_inputs(Case(B=1, L=64, D=16, n_hashes=2, mask=True))[3], backend=TRITON)
