"""tfk.lsh_attention: the torch backend against the float64 reference (forward,
lse and gradients, tests/tolerances.py's rule), hashing, seeds, buckets,
dropout, errors, the custom op (opcheck) and torch.compile."""
import pytest
import torch

import tfk
from tfk.ops.lsh import dense_keep, draw_rotations, hash_buckets, lsh_attention_reference, sorted_order
from tfk.ops.lsh.api import LshCall, TorchBackend
from lsh_cases import Case, check_case, check_compile_fullgraph, make_inputs, op_args

CASES = {
    "d40-n2": Case(),
    "d72-n4-causal-mask-after1": Case(D=72, n_hashes=4, after=1, causal=True, mask=True),
    "n1-no-neighbours-dv24": Case(n_hashes=1, before=0, after=0, Dv=24, n_buckets=8),
    "before2-after1-causal-factorised": Case(L=128, n_hashes=2, before=2, after=1, causal=True, n_buckets=[2, 4]),
    "full-path-L=chunk": Case(L=32, chunk_size=32, causal=True, mask=True),
    "full-path-L<chunk": Case(L=20, chunk_size=64),
    "scale-wide-window": Case(L=48, chunk_size=16, n_hashes=4, before=1, after=1, scale=0.5, mask=True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp32", "fp16", "bf16", "fp64"])
def test_torch_backend_matches_reference(name, dtype):
    check_case(CASES[name], dtype, "torch")


@pytest.mark.parametrize("name", ["d72-n4-causal-mask-after1", "before2-after1-causal-factorised",
                                  "scale-wide-window"])
@pytest.mark.parametrize("block", [1, 3])
def test_torch_backend_in_blocks_of_chunks(name, block, monkeypatch):
    """Blocks of 1 and 3 chunks (a partial last block; windows that wrap across
    blocks and rounds) give the reference's forward and gradients."""
    from tfk.ops.lsh import torch_backend as tb
    c = CASES[name]
    W = 1 + c.before + c.after
    monkeypatch.setattr(tb, "BLOCK_ELEMENTS", block * c.B * c.H * c.chunk_size ** 2 * W)
    N = c.n_hashes * c.L // c.chunk_size
    assert [b - a for a, b in tb._blocks(c.B, c.H, N, c.chunk_size, W)][0] == block < N
    check_case(c, torch.float32, "torch")


def test_reference_backend_is_the_reference():
    check_case(CASES["d72-n4-causal-mask-after1"], torch.float64, "reference")


def test_auto_is_torch_on_cpu():
    from tfk.backends import record_choices
    qk, v = torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
    with record_choices() as names:
        tfk.lsh_attention(qk, v, chunk_size=16)
    assert names == ["torch"]


# ------------------------------------------------------------------ hashing

def test_hashing_matches_a_loop_over_rounds():
    g = torch.Generator().manual_seed(0)
    qk = torch.randn(2, 3, 32, 8, generator=g)
    rot = torch.randn(3, 8, 2, 6, generator=g)
    mask = torch.rand(2, 32, generator=g) < 0.7
    got = hash_buckets(qk, rot, [4, 8], mask)
    for b in range(2):
        for h in range(3):
            for r in range(2):
                x = qk[b, h] @ rot[h, :, r]                     # (L, 6)
                b1 = torch.cat([x[:, :2], -x[:, :2]], -1).argmax(-1)
                b2 = torch.cat([x[:, 2:], -x[:, 2:]], -1).argmax(-1)
                want = torch.where(mask[b], b1 + 4 * b2, torch.tensor(32))
                assert torch.equal(got[b, h, r], want)


def test_seed_reproducible_and_rotations_equivalent():
    qk, v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    kw = dict(n_hashes=2, n_buckets=8, chunk_size=16)
    a = tfk.lsh_attention(qk, v, seed=7, **kw)
    assert torch.equal(a, tfk.lsh_attention(qk, v, seed=7, **kw))
    rot = torch.Generator().manual_seed(7)
    rot = torch.randn(2, 16, 2, 4, generator=rot)
    assert torch.equal(a, tfk.lsh_attention(qk, v, rotations=rot, **kw))
    assert not torch.equal(a, tfk.lsh_attention(qk, v, seed=8, **kw))
    torch.manual_seed(3)
    b = tfk.lsh_attention(qk, v, **kw)
    torch.manual_seed(3)
    assert torch.equal(b, tfk.lsh_attention(qk, v, **kw))
    # one rotation shared by every head (H or 1)
    shared = tfk.lsh_attention(qk, v, rotations=rot[:1], **kw)
    assert torch.equal(shared, tfk.lsh_attention(qk, v, rotations=rot[:1].expand(2, -1, -1, -1), **kw))


def test_buckets_given_only_order_matters():
    c = Case(n_hashes=3, mask=True)
    qk, v, mask, buckets, _ = make_inputs(c)
    kw = dict(n_hashes=3, chunk_size=16, key_padding_mask=mask, return_lse=True)
    out, lse = tfk.lsh_attention(qk, v, buckets=buckets, **kw)
    # Hugging Face's offsets (round r's buckets + r * (n_buckets + 1)) and int32 give the same call
    offset = buckets + torch.arange(3).view(1, 1, 3, 1) * 5
    for bk in (offset, offset.to(torch.int32)):
        o2, l2 = tfk.lsh_attention(qk, v, buckets=bk, **kw)
        assert torch.equal(out, o2) and torch.equal(lse, l2)
    # hashing inside the call with the same rotations gives the same buckets
    rot = draw_rotations(2, 40, 3, 4, seed=1)
    assert torch.equal(tfk.lsh_attention(qk, v, rotations=rot, n_buckets=4, **kw)[0], out)


def test_no_gradient_into_rotations_or_buckets_and_hash_is_detached():
    qk = torch.randn(1, 2, 32, 8, requires_grad=True)
    rot = torch.randn(2, 8, 2, 2, requires_grad=True)
    b = hash_buckets(qk, rot, 4)
    assert not b.requires_grad and b.dtype == torch.int64
    out = tfk.lsh_attention(qk, torch.randn(1, 2, 32, 8), n_hashes=2, n_buckets=4, chunk_size=16, rotations=rot)
    out.sum().backward()
    assert rot.grad is None and qk.grad is not None


def test_default_n_buckets_rule():
    from tfk.ops.lsh import default_n_buckets
    assert [default_n_buckets(L, 64) for L in (128, 192, 256, 1024, 4096)] == [4, 4, 8, 32, 128]
    assert default_n_buckets(64, 64) == 2
    qk, v = torch.randn(1, 1, 256, 8), torch.randn(1, 1, 256, 8)
    assert torch.equal(tfk.lsh_attention(qk, v, seed=1), tfk.lsh_attention(qk, v, seed=1, n_buckets=8))


# ------------------------------------------------------------------ dropout

def test_dropout_matches_reference_given_its_keep_mask():
    c = Case(D=16, n_hashes=2, causal=True, mask=True)
    qk, v, mask, buckets, (dout, dlse) = make_inputs(c)
    res = {}
    for backend in ("torch", "reference"):
        q, vv = qk.clone().requires_grad_(), v.clone().requires_grad_()
        out, lse = tfk.lsh_attention(q, vv, n_hashes=2, chunk_size=16, causal=True, key_padding_mask=mask,
                                     buckets=buckets, dropout_p=0.3, seed=11, backend=backend, return_lse=True)
        grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, vv))
        res[backend] = (out, lse) + grads
    for name, a, b in zip(("out", "lse", "dqk", "dv"), res["torch"], res["reference"]):
        assert (a - b).abs().max() < 1e-10, name
    # the keep mask is the reference's, built independently from the counter hash
    call = LshCall(qk, v, buckets, 16, 1, 0, True, mask, 1.0, 0.3, 11, True)
    keep = dense_keep(call)
    assert 0.6 < keep.double().mean() < 0.8
    want, _ = lsh_attention_reference(qk, v, buckets, chunk_size=16, causal=True, key_padding_mask=mask,
                                      dropout_p=0.3, keep=keep)
    assert (res["torch"][0] - want).abs().max() < 1e-10
    no_drop = tfk.lsh_attention(qk, v, n_hashes=2, chunk_size=16, causal=True, key_padding_mask=mask,
                                buckets=buckets)
    assert (no_drop - want).abs().max() > 1e-3


# ------------------------------------------------------------------- errors

def _bad(**kw):
    qk, v = kw.pop("qk", torch.randn(2, 2, 64, 8)), kw.pop("value", torch.randn(2, 2, 64, 8))
    kw.setdefault("chunk_size", 16)
    return lambda: tfk.lsh_attention(qk, v, **kw)


ERRORS = {
    "L-not-multiple": (_bad(chunk_size=24), ValueError, "multiple of chunk_size"),
    "odd-n_buckets": (_bad(n_buckets=5), ValueError, "n_buckets must be an even"),
    "odd-factor": (_bad(n_buckets=[2, 3]), ValueError, "factors must be even"),
    "rotations-shape": (_bad(n_buckets=4, rotations=torch.randn(2, 8, 1, 4)), ValueError, "rotations must be"),
    "rotations-heads": (_bad(n_buckets=4, rotations=torch.randn(3, 8, 1, 2)), ValueError, "rotations must be"),
    "rotations-dtype": (_bad(n_buckets=4, rotations=torch.ones(2, 8, 1, 2, dtype=torch.int64)), TypeError,
                        "rotations must be a floating"),
    "rotations-device": (_bad(n_buckets=4, rotations=torch.randn(2, 8, 1, 2, device="meta")), ValueError,
                         "rotations is on"),
    "buckets-shape": (_bad(buckets=torch.zeros(2, 2, 2, 64, dtype=torch.int64)), ValueError, "buckets must be"),
    "buckets-dtype": (_bad(buckets=torch.zeros(2, 2, 1, 64)), TypeError, "buckets must be an int64"),
    "buckets-device": (_bad(buckets=torch.zeros(2, 2, 1, 64, dtype=torch.int64, device="meta")), ValueError,
                       "buckets is on"),
    "both": (_bad(n_buckets=4, buckets=torch.zeros(2, 2, 1, 64, dtype=torch.int64),
                  rotations=torch.randn(2, 8, 1, 2)), ValueError, "not both"),
    "gqa": (_bad(value=torch.randn(2, 1, 64, 8)), ValueError, "GQA"),
    "batch": (_bad(value=torch.randn(1, 2, 64, 8)), ValueError, "batch sizes differ"),
    "length": (_bad(value=torch.randn(2, 2, 32, 8)), ValueError, "value's length"),
    "rank": (_bad(qk=torch.randn(2, 64, 8)), ValueError, "qk must be 4-D"),
    "value-rank": (_bad(value=torch.randn(2, 2, 64)), ValueError, "value must be 4-D"),
    "dtype": (_bad(qk=torch.zeros(2, 2, 64, 8, dtype=torch.int32)), TypeError, "qk must be float16"),
    "value-dtype": (_bad(value=torch.randn(2, 2, 64, 8, dtype=torch.float64)), TypeError, "value has dtype"),
    "dropout-1": (_bad(dropout_p=1.0), ValueError, "dropout_p"),
    "dropout-neg": (_bad(dropout_p=-0.1), ValueError, "dropout_p"),
    "n_hashes-0": (_bad(n_hashes=0), ValueError, "n_hashes"),
    "chunks_before": (_bad(chunks_before=-1), ValueError, "chunks_before"),
    "mask-dtype": (_bad(key_padding_mask=torch.ones(2, 64)), TypeError, "key_padding_mask must be bool"),
    "mask-shape": (_bad(key_padding_mask=torch.ones(2, 32, dtype=torch.bool)), ValueError, "key_padding_mask must"),
    "backend": (_bad(backend="nope"), ValueError, "backend must be"),
    "causal": (_bad(causal=1), TypeError, "causal must be a bool"),
    "seed": (_bad(seed=-1), ValueError, "seed"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_named_error(name):
    fn, exc, match = ERRORS[name]
    with pytest.raises(exc, match=match):
        fn()


# --------------------------------------------------------- op and compile

def _op_args(dropout_p=0.0):
    return op_args(Case(B=1, L=32, D=8, n_hashes=2, chunk_size=8, after=1, causal=True, mask=True),
                   dropout_p=dropout_p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck(dropout_p):
    op = TorchBackend._op
    torch.library.opcheck(op.op, _op_args(dropout_p=dropout_p))
    qk, v, order, mask, *rest = _op_args(dropout_p=dropout_p)
    out, lse, lse_slots = (t.detach() for t in op.op(qk, v, order, mask, *rest))
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    saved = (qk.detach(), v.detach(), order, mask, out, lse, lse_slots)
    torch.library.opcheck(op.backward_op, (dout, dlse, *saved, *rest))
    torch.library.opcheck(op.backward_op, (dout, None, *saved, *rest))


def test_torch_compile_fullgraph():
    # hashing inside the traced call (rotations given)
    check_compile_fullgraph(n_buckets=4, rotations=draw_rotations(2, 16, 2, 4, seed=0))


def test_torch_backend_memory_is_never_quadratic():
    # every tensor the torch backend's forward and backward create, recorded by a
    # dispatch mode: the largest is O(n·L·chunk·window), far below L×L per head
    from torch.utils._python_dispatch import TorchDispatchMode
    from tfk.ops.lsh import torch_backend as tb

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    B, H, L, D, n, C = 1, 1, 2048, 8, 2, 32
    qk, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    order = sorted_order(hash_buckets(qk, torch.randn(H, D, n, 8), 16))
    opts = (C, 1, 0, True, 1.0, 0.1, 3)
    with Largest():
        out, lse, lse_slots = tb.lsh_forward(qk, v, order, None, *opts)
        tb.lsh_backward(torch.randn(B, H, L, D), torch.randn(B, H, L), qk, v, order, None, out, lse, lse_slots,
                        *opts)
    window = n * L * C * 2                   # (n·L / C chunks) × C queries × 2·C keys
    assert Largest.numel <= window < L * L // 8
