"""tfk.attention_with_kvcache: every backend against the float64 oracle,
paged = contiguous, the in-place append, Lq = 0, poisoned outputs, no
autograd, backend selection and every named error."""
import pytest
import torch

import tfk
import tfk.ops.kvcache as kv
from tfk import backends
from tfk import patterns as P
from kvcache_cases import Case, check_case, layout, make_inputs

DTYPES = [torch.float32, torch.float16]

# band patterns, Lq <= 16: every backend
BAND_CASES = {
    "decode_gqa": Case(),
    "odd_dims_three_seqs": Case(B=3, Lq=3, D=24, Dv=20, Lmax=70, seqlens=(5, 0, 60)),
    "window": Case(Lq=4, Lmax=60, seqlens=(50, 3), pattern=P.sliding_window(7)),
    "window_both_sides": Case(Lq=5, Lmax=60, seqlens=(20, 0), pattern=P.sliding_window(5, 2)),
    "dense": Case(Lq=2, seqlens=(9, 33), pattern=P.DENSE),
    "paged_window": Case(Lq=3, Lmax=96, seqlens=(70, 17), pattern=P.sliding_window(20), page=16),
    "paged_causal_g4": Case(H=4, Hkv=1, Lq=2, Lmax=64, seqlens=(0, 45), page=32),
    "no_append_scale": Case(Lq=2, seqlens=(12, 30), scale=0.7, append=False),
    "lq16": Case(Lq=16, Lmax=48, seqlens=(1, 32), D=32),
}
# beyond the split-KV kernels (Lq > 16, non-band patterns): "torch", and "triton" through the attention engine
TORCH_CASES = {
    "lq20": Case(Lq=20, Lmax=64, seqlens=(0, 40)),
    "lq20_paged_window": Case(Lq=20, Lmax=64, seqlens=(3, 44), pattern=P.sliding_window(9), page=16),
    "global_or_window": Case(Lq=3, seqlens=(30, 60), pattern=P.global_tokens(2) | P.sliding_window(3)),
    "dilated_window": Case(Lq=4, seqlens=(25, 2), pattern=P.sliding_window(6, dilation=2), page=16),
    # Dv != D: the matmul path (torch's CPU flash kernel needs D == Dv), with a mask
    "dilated_window_dv": Case(Lq=4, Dv=8, seqlens=(25, 2), pattern=P.sliding_window(6, dilation=2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(BAND_CASES) + list(TORCH_CASES))
def test_torch_backend(name, dtype):
    check_case({**BAND_CASES, **TORCH_CASES}[name], dtype, "torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(BAND_CASES) + list(TORCH_CASES))
def test_triton_backend(name, dtype):
    check_case({**BAND_CASES, **TORCH_CASES}[name], dtype, "triton")


@pytest.mark.parametrize("name", ["lq20_paged_window", "window_both_sides", "dense", "global_or_window"])
def test_torch_backend_in_row_chunks(name, monkeypatch):
    """Long query blocks go in row chunks (SCORE_BUDGET), each over its own
    key range: one query a chunk here gives the oracle's result."""
    from tfk.ops.kvcache import torch_backend
    monkeypatch.setattr(torch_backend, "SCORE_BUDGET", 1)
    check_case({**BAND_CASES, **TORCH_CASES}[name], torch.float32, "torch")


def test_reference_backend_float64():
    check_case(TORCH_CASES["global_or_window"], torch.float64, "reference")
    check_case(BAND_CASES["paged_window"], torch.float64, "torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_equals_contiguous(backend):
    """The same values in shuffled pages give the same out and lse, bit for bit."""
    c = Case(Lq=3, Lmax=64, seqlens=(40, 7), pattern=P.sliding_window(12))
    inputs = make_inputs(c)
    res = []
    for page in (0, 16):
        q, kc, vc, seqlens, kw = layout(c.with_(page=page), *inputs, torch.float32)
        res.append(kv.attention_with_kvcache(q, kc, vc, seqlens, backend=backend, return_lse=True, **kw))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


@pytest.mark.parametrize("page", [0, 16])
def test_append_writes_only_the_new_positions(page):
    """After the call the caches hold key/value at s_b..s_b+Lq-1 and are
    untouched elsewhere (spare pages included); cache_seqlens is unchanged."""
    c = Case(B=3, Lq=3, Lmax=64, seqlens=(0, 20, 61), page=page)
    inputs = make_inputs(c)
    q, kc, vc, seqlens, kw = layout(c, *inputs, torch.float32)
    before_k, before_v, before_s = kc.clone(), vc.clone(), seqlens.clone()
    kv.attention_with_kvcache(q, kc, vc, seqlens, **kw)
    assert torch.equal(seqlens, before_s)
    for cache, before, new in ((kc, before_k, kw["key"]), (vc, before_v, kw["value"])):
        want = before.clone()
        for b, s in enumerate(c.seqlens):
            for t in range(c.Lq):
                if page:
                    blk = int(kw["block_table"][b, (s + t) // page])
                    want[blk, :, (s + t) % page] = new[b, :, t]
                else:
                    want[b, :, s + t] = new[b, :, t]
        assert torch.equal(cache, want)


def test_appended_keys_are_attended():
    """The queries see the keys written by the same call (the append happens first)."""
    c = Case(Lq=2, seqlens=(0, 10), pattern=P.sliding_window(0))      # each query sees its own key only
    inputs = make_inputs(c)
    q, kc, vc, seqlens, kw = layout(c, *inputs, torch.float64)
    out = kv.attention_with_kvcache(q, kc, vc, seqlens, backend="torch", **kw)
    torch.testing.assert_close(out, kw["value"].repeat_interleave(2, 1))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_lq_zero_and_empty_batch(backend):
    q = torch.randn(2, 2, 0, 16)
    kc = torch.randn(2, 2, 32, 16)
    out, lse = kv.attention_with_kvcache(q, kc, kc, torch.tensor([3, 32], dtype=torch.int32), key=q[:, :, :0],
                                         value=q[:, :, :0], backend=backend, return_lse=True)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)
    out = kv.attention_with_kvcache(torch.randn(0, 2, 1, 16), kc[:0], kc[:0], torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 2, 1, 16)


@pytest.mark.parametrize("dv", [16, 8])
def test_query_with_no_key_gets_zero_and_minus_inf(dv):
    """global_tokens(0) allows nothing (torch backend: the flash path, D ==
    Dv, and the matmul path). A band always allows the query's own position:
    the kernel's keyless case is an empty split (test_kvcache_triton)."""
    q, kc, vc = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, dv)
    out, lse = kv.attention_with_kvcache(q, kc, vc, torch.tensor([4], dtype=torch.int32),
                                         pattern=P.global_tokens(0), backend="torch", return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_outputs_are_poisoned_while_testing():
    """The conftest poisons every backend output (NaN until written): the
    torch backend's buffers come from new_output."""
    assert backends.POISON_OUTPUTS
    assert torch.isnan(backends.new_output((2,), torch.float32, "cpu")).all()


def test_poisoned_output_catches_an_unwritten_row(monkeypatch):
    """Planted: the torch backend skips its last sequence: the NaN it leaves fails the check."""
    from tfk.ops.kvcache import torch_backend
    real = torch_backend.kvcache_forward
    monkeypatch.setattr(torch_backend.TorchBackend, "run",
                        lambda self, call: real(call, seqlens=call.cache_seqlens.tolist()[:-1]))
    with pytest.raises(AssertionError, match="NaN"):
        check_case(BAND_CASES["decode_gqa"], torch.float32, "torch")


def test_forward_only_no_grad():
    q = torch.randn(1, 2, 1, 16, requires_grad=True)
    kc = torch.randn(1, 2, 8, 16, requires_grad=True)
    out = kv.attention_with_kvcache(q, kc, kc, torch.tensor([3], dtype=torch.int32),
                                    key=torch.randn(1, 2, 1, 16, requires_grad=True),
                                    value=torch.randn(1, 2, 1, 16))
    assert not out.requires_grad and out.grad_fn is None


def test_auto_is_torch_on_cpu():
    c = Case()
    q, kc, vc, seqlens, kw = layout(c, *make_inputs(c), torch.float32)
    with backends.record_choices() as names:
        kv.attention_with_kvcache(q, kc, vc, seqlens, **kw)
    assert names == ["torch"]


def test_triton_refuses_with_reasons():
    q, kc = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 40, 16)
    s = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(backends.BackendUnavailable, match="float64"):
        kv.attention_with_kvcache(q.double(), kc.double(), kc.double(), s, backend="triton")


@pytest.mark.parametrize("name", ["lq20_paged_window", "global_or_window"])
def test_triton_beyond_split_kv_visits_each_sequences_plan(name):
    """Calls the split-KV kernel does not take run on the attention engine's
    kernels, each sequence over its own plan (queries at the end of the keys
    it may read): the kernels' tiles are the sum of those plans', and a band
    reads only the keys it reaches."""
    from tfk.ops.attention.varlen import AtEnd
    from tfk.triton_kernels import attention as kernels
    c = TORCH_CASES[name]
    q, kc, vc, seqlens, kw = layout(c, *make_inputs(c), torch.float32)
    with backends.count_tiles() as counts:
        kv.attention_with_kvcache(q, kc, vc, seqlens, backend="triton", **kw)
    tiles = kernels.tile_config(max(c.D, c.vdim), torch.float32)
    band = kv.band_of(c.pattern)
    plans = 0
    for s in seqlens.tolist():
        lo, hi = kv.key_range(s, c.Lq, band) if band else (0, s + c.Lq)
        plans += tfk.plan.compile_plan(AtEnd(c.pattern), c.Lq, hi - lo, *tiles).num_tiles
    assert {k: n for k, n in counts.items() if n} == {"forward": c.H * plans}


# ----------------------------------------------------------------- errors

def _args(**over):
    """Valid arguments of a small paged or contiguous call, with overrides."""
    a = dict(query=torch.randn(2, 4, 2, 16), k_cache=torch.randn(2, 2, 32, 16), v_cache=torch.randn(2, 2, 32, 8),
             cache_seqlens=torch.tensor([3, 10], dtype=torch.int32))
    a.update(over)
    return a


def _paged(**over):
    a = dict(query=torch.randn(2, 4, 2, 16), k_cache=torch.randn(5, 2, 16, 16), v_cache=torch.randn(5, 2, 16, 8),
             cache_seqlens=torch.tensor([3, 20], dtype=torch.int32),
             block_table=torch.tensor([[4, 0], [1, 2]], dtype=torch.int32))
    a.update(over)
    return a


def _call(a):
    a = dict(a)
    return kv.attention_with_kvcache(a.pop("query"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"),
                                     **a)


ERRORS = {
    "query_rank": (_args(query=torch.randn(4, 2, 16)), ValueError, "query must be 4-D"),
    "query_type": (_args(query=[1.0]), TypeError, "query must be a torch.Tensor"),
    "cache_rank": (_args(k_cache=torch.randn(2, 32, 16)), ValueError, "k_cache must be 4-D"),
    "int_query": (_args(query=torch.ones(2, 4, 2, 16, dtype=torch.int32)), TypeError, "query must be float16"),
    "cache_dtype": (_args(v_cache=torch.randn(2, 2, 32, 8).double()), TypeError, "v_cache has dtype"),
    "key_dtype": (_args(key=torch.randn(2, 2, 2, 16).half(), value=torch.randn(2, 2, 2, 8)), TypeError,
                  "key has dtype"),
    "key_shape": (_args(key=torch.randn(2, 2, 3, 16), value=torch.randn(2, 2, 3, 8)), ValueError,
                  r"key must be \(B, Hkv, Lq, D\)"),
    "value_alone": (_args(value=torch.randn(2, 2, 2, 8)), ValueError, "key and value together"),
    "cache_batch": (_args(k_cache=torch.randn(3, 2, 32, 16), v_cache=torch.randn(3, 2, 32, 8)), ValueError,
                    "k_cache has batch 3"),
    "v_cache_dims": (_args(v_cache=torch.randn(2, 2, 31, 8)), ValueError, "v_cache's first three dims"),
    "head_dim": (_args(k_cache=torch.randn(2, 2, 32, 12)), ValueError, "k_cache's head dim 12"),
    "gqa": (_args(k_cache=torch.randn(2, 3, 32, 16), v_cache=torch.randn(2, 3, 32, 8)), ValueError,
            "multiple of the caches' key/value heads"),
    "seqlens_dtype": (_args(cache_seqlens=torch.tensor([3, 10])), TypeError, "cache_seqlens must be int32"),
    "seqlens_len": (_args(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError,
                    r"cache_seqlens must have shape \(B,\)"),
    "seqlens_negative": (_args(cache_seqlens=torch.tensor([3, -1], dtype=torch.int32)), ValueError,
                         "cache_seqlens must be >= 0"),
    "seqlens_overflow": (_args(cache_seqlens=torch.tensor([3, 31], dtype=torch.int32)), ValueError,
                         r"cache_seqlens \+ Lq must be <= Lmax"),
    "paged_overflow": (_paged(cache_seqlens=torch.tensor([3, 31], dtype=torch.int32)), ValueError,
                       r"<= max_pages \* page = 32"),
    "table_dtype": (_paged(block_table=torch.tensor([[4, 0], [1, 2]])), TypeError, "block_table must be int32"),
    "table_batch": (_paged(block_table=torch.tensor([[4, 0]], dtype=torch.int32)), ValueError,
                    r"block_table must have shape \(B, max_pages\)"),
    "table_entry": (_paged(block_table=torch.tensor([[4, 0], [1, 5]], dtype=torch.int32)), ValueError,
                    r"block_table entries must be in \[0, num_blocks = 5\)"),
    "table_negative": (_paged(block_table=torch.tensor([[-1, 0], [1, 2]], dtype=torch.int32)), ValueError,
                       "block_table entries"),
    "page_size": (_paged(k_cache=torch.randn(5, 2, 8, 16), v_cache=torch.randn(5, 2, 8, 8)), ValueError,
                  "multiple of 16"),
    "pattern_type": (_args(pattern="causal"), TypeError, "pattern must be a tfk.patterns Pattern"),
    "pattern_heads": (_args(pattern=P.block_layout(torch.ones(3, 1, 1, dtype=torch.bool), 16)), ValueError,
                      "pattern has 3 heads"),
    "scale_nan": (_args(scale=float("nan")), ValueError, "scale must be a finite number"),
    "scale_inf": (_args(scale=float("inf")), ValueError, "scale must be a finite number"),
    "backend_name": (_args(backend="nope"), ValueError, "backend must be 'auto' or one of"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_named_errors(name):
    args, exc, match = ERRORS[name]
    with pytest.raises(exc, match=match):
        _call(args)


def test_unused_block_table_entries_may_hold_anything():
    """Only the pages a sequence reaches are checked (vLLM pads with -1)."""
    a = _paged(block_table=torch.tensor([[4, -1], [1, 2]], dtype=torch.int32))
    assert _call(a).shape == (2, 4, 2, 8)


def test_a_bad_call_writes_nothing():
    """Validation comes before the append: a call that raises leaves the caches as they were."""
    a = _args(key=torch.randn(2, 2, 2, 16), value=torch.randn(2, 2, 2, 8), scale=float("nan"))
    before = a["k_cache"].clone()
    with pytest.raises(ValueError):
        _call(a)
    assert torch.equal(a["k_cache"], before)


def test_per_head_pattern_on_torch():
    """A per-head pattern (a block layout of H heads, every sequence at n =
    64 positions, as the layout requires) masks each query head on its own."""
    g = torch.Generator().manual_seed(3)
    layout_ = torch.rand(4, 4, 4, generator=g) < 0.5
    layout_[:, torch.arange(4), torch.arange(4)] = True          # every query block sees its own block
    c = Case(B=2, H=4, Hkv=2, Lq=3, Lmax=64, seqlens=(61, 61), pattern=P.block_layout(layout_, 16))
    check_case(c, torch.float32, "torch")
    check_case(c.with_(Dv=8), torch.float32, "torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["lq20_paged_window", "global_or_window"])
def test_cuda_sim_beyond_split_kv(name, dtype):
    """Longer query blocks and non-band patterns run on the attention engine's
    CUDA kernels (cuda-sim here), each sequence over its own plan."""
    from helpers import require_backend
    require_backend("cuda-sim")
    check_case(TORCH_CASES[name], dtype, "cuda-sim")
