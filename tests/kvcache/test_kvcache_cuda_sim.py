"""The split-KV CUDA kernels of csrc/kvcache/ (backend "cuda-sim": the same
sources compiled for the host, tfk._sim) through
tfk/ops/kvcache/cuda_backend.py's decode_forward, against a float64 oracle
written here: per sequence, dense attention over the cache positions
j < s_b + Lq, masked by the band at absolute positions.

Tolerances are torch's own error in the dtype (tests/tolerances.py): SDPA in
the dtype for out, a float32 computation on the dtype-rounded inputs for
lse. Outputs start as NaN (tests/conftest.py). Cache positions no query may
read (past s_b + Lq, before the band's reach, unused pages and blocks) hold
NaN: a kernel that reads one gives NaN.

TFK_KVCACHE_SIM_LIBRARY=path:namespace runs this file against another build
of the kernels (how the planted bugs were shown to fail it).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tfk import backends
from tfk import patterns as P
from tfk.ops.kvcache import cuda_backend as cb
from tfk.ops.kvcache.call import KVCacheCall, key_range
from helpers import require_backend
from tolerances import assert_close

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
CAUSAL, DENSE = (None, 0), (None, None)


@pytest.fixture(autouse=True)
def _sim(monkeypatch):
    require_backend("cuda-sim")  # skips only without a C++ compiler; a broken build fails
    monkeypatch.setattr(backends, "POISON_OUTPUTS", True)  # outputs start as NaN
    alt = os.environ.get("TFK_KVCACHE_SIM_LIBRARY")
    if alt:
        path, ns = alt.rsplit(":", 1)
        torch.ops.load_library(path)
        monkeypatch.setattr(cb, "_ops", lambda device: getattr(torch.ops, ns))


def make_case(B, H, Hkv, Lq, D, Dv, Lmax, seqlens, band, dtype, seed=0):
    """float64 q (B, H, Lq, D) and a logical cache k (B, Hkv, Lmax, D), v (..., Dv),
    rounded to dtype (so the oracle and the kernel see the same inputs), and
    the caches the kernel gets: the same with NaN wherever no query may read."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64).to(dtype).double()
    k = torch.randn(B, Hkv, Lmax, D, generator=g, dtype=torch.float64).to(dtype).double()
    v = torch.randn(B, Hkv, Lmax, Dv, generator=g, dtype=torch.float64).to(dtype).double()
    kc, vc = k.to(dtype), v.to(dtype)
    for b, s in enumerate(seqlens):
        lo, hi = key_range(s, Lq, band)
        for c in (kc, vc):
            c[b, :, hi:] = float("nan")
            c[b, :, :lo] = float("nan")
    return q, k, v, kc, vc


def allowed(s, Lq, band):
    """(Lq, s + Lq) bool: query t (at s + t) may read cache position j."""
    p = s + torch.arange(Lq).unsqueeze(1)
    j = torch.arange(s + Lq).unsqueeze(0)
    ok = torch.ones(Lq, s + Lq, dtype=torch.bool)
    if band[0] is not None:
        ok &= j >= p - band[0]
    if band[1] is not None:
        ok &= j <= p + band[1]
    return ok


def oracle(q, k, v, seqlens, band, scale, dtype=torch.float64):
    """out (B, H, Lq, Dv), lse (B, H, Lq) in ``dtype``: per sequence, attention
    over its first s_b + Lq cache positions under the band, heads h reading
    key head h // G; a row without a key: out 0, lse -inf."""
    B, H, Lq, _ = q.shape
    G = H // k.shape[1]
    outs, lses = [], []
    for b, s in enumerate(seqlens):
        n = s + Lq
        kb = k[b, :, :n].repeat_interleave(G, 0).to(dtype)
        vb = v[b, :, :n].repeat_interleave(G, 0).to(dtype)
        sc = (q[b].to(dtype) @ kb.transpose(-1, -2)) * scale
        sc = sc.masked_fill(~allowed(s, Lq, band), float("-inf"))
        lse = torch.logsumexp(sc, -1)
        p = torch.exp(sc - lse.unsqueeze(-1).masked_fill(lse.unsqueeze(-1) == float("-inf"), 0))
        outs.append(p @ vb)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def torch_lowp(q, k, v, seqlens, band, scale, dtype):
    """torch's own result in dtype: SDPA per sequence with the band as a bool mask."""
    B, H, Lq, _ = q.shape
    G = H // k.shape[1]
    outs = []
    for b, s in enumerate(seqlens):
        n = s + Lq
        kb, vb = (x[b, :, :n].repeat_interleave(G, 0).to(dtype) for x in (k, v))
        outs.append(F.scaled_dot_product_attention(q[b].to(dtype), kb, vb, attn_mask=allowed(s, Lq, band),
                                                   scale=scale))
    return torch.stack(outs)


def band_tiles(seqlens, Lq, band, Hkv):
    """Key tiles (64 positions, aligned) the band reads, summed over (batch, key head)."""
    total = 0
    for s in seqlens:
        lo, hi = key_range(s, Lq, band)
        total += Hkv * (math.ceil(hi / cb.BLOCK_N) - lo // cb.BLOCK_N if hi > lo else 0)
    return total


def paged(cache, page, seed=1, extra=3):
    """(pool (num_blocks, Hkv, page, D), block_table int32 (B, Lmax / page)):
    the logical cache's pages in shuffled blocks; the `extra` blocks are NaN,
    and pages wholly past position `ends[b]` point at one of them."""
    B, Hkv, Lmax, D = cache.shape
    n = Lmax // page
    perm = torch.randperm(B * n + extra, generator=torch.Generator().manual_seed(seed))
    pool = torch.full((B * n + extra, Hkv, page, D), float("nan"), dtype=cache.dtype)
    table = perm[:B * n].view(B, n).to(torch.int32)
    for b in range(B):
        for i in range(n):
            pool[table[b, i]] = cache[b, :, i * page:(i + 1) * page]
    return pool, table


def run(q, kc, vc, seqlens, band, scale, dtype, block_table=None, num_splits=None, device="cpu"):
    """decode_forward on ``device`` (CPU: the cuda-sim kernels; CUDA: tfk._C), results on the CPU."""
    lens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    bt = None if block_table is None else block_table.to(device)
    out, lse = cb.decode_forward(q.to(dtype).to(device), kc.to(device), vc.to(device), lens, bt, band, scale,
                                 num_splits)
    return out.cpu(), lse.cpu()


def check(case, dtype, num_splits=None, seed=0, device="cpu"):
    B, H, Hkv, Lq, D, Dv, Lmax, seqlens, band = case
    scale = D ** -0.5
    q, k, v, kc, vc = make_case(B, H, Hkv, Lq, D, Dv, Lmax, seqlens, band, dtype, seed)
    with backends.count_tiles() as counts:
        out, lse = run(q, kc, vc, seqlens, band, scale, dtype, num_splits=num_splits, device=device)
    assert out.dtype == dtype and lse.dtype == torch.float32
    r_out, r_lse = oracle(q, k, v, seqlens, band, scale)
    _, t_lse = oracle(q, k, v, seqlens, band, scale, torch.float32)
    assert_close("out", out, r_out, torch_lowp(q, k, v, seqlens, band, scale, dtype), dtype)
    assert_close("lse", lse, r_lse, t_lse, dtype)
    assert counts["forward"] == band_tiles(seqlens, Lq, band, Hkv), (counts, band_tiles(seqlens, Lq, band, Hkv))
    return out, lse


# name: (B, H, Hkv, Lq, D, Dv, Lmax, seqlens, band), num_splits (None: call.py's num_splits)
CASES = {
    # one query, MHA, s_b = 0 next to a long sequence, causal
    "mha_Lq1_D64_causal": ((2, 2, 2, 1, 64, 64, 200, [0, 150], CAUSAL), None),
    # G = 4, Lq 5: 20 rows (two row blocks); D 40, Dv 24 (head dim 64: zero-filled); sliding window 30
    "gqa4_Lq5_D40_Dv24_window": ((2, 4, 1, 5, 40, 24, 160, [37, 140], (30, 0)), 2),
    # G = 2, Lq 16, dense: queries read the keys after them; D 80 != Dv 128 (head dim 128)
    "gqa2_Lq16_D80_Dv128_dense": ((1, 4, 2, 16, 80, 128, 130, [100], DENSE), 3),
    # D 20, Dv 36: caches padded to multiples of 8 on the host; window with a right side
    "mha_Lq3_D20_Dv36_band": ((2, 2, 2, 3, 20, 36, 96, [70, 5], (17, 1)), None),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(case, dtype):
    shape, splits = CASES[case]
    check(shape, dtype, num_splits=splits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (backend 'cuda', tfk._C)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_matches_oracle(case, dtype, monkeypatch):
    """The same kernels through tfk._C on a GPU (skipped without one)."""
    monkeypatch.setattr(cb, "_ops", _GPU_OPS)
    shape, splits = CASES[case]
    check(shape, dtype, num_splits=splits, device="cuda")
    check(shape, dtype, num_splits=4, device="cuda")


_GPU_OPS = cb._ops  # the real ops (the fixture may point cb._ops at another CPU build)


@pytest.mark.parametrize("splits", [1, 3, 6])
def test_splits(splits):
    """Any split count gives the same attention: s_b = 0 (one tile) and s_b =
    190 (3 tiles, one a split with 3 or 6 splits): every split past a
    sequence's tiles has no key (lse -inf, out 0) and must merge without NaN."""
    case = (2, 4, 2, 2, 64, 64, 200, [0, 190], CAUSAL)
    check(case, torch.float16, num_splits=splits)


def test_splits_window_gqa_bf16():
    """A window whose range starts mid-tile (lo = 81), 4 splits, G = 4, bf16."""
    check((1, 4, 1, 4, 64, 64, 200, [181, ], (100, 0)), torch.bfloat16, num_splits=4)


@pytest.mark.parametrize("page", [16, 32])
def test_paged_equals_contiguous(page):
    """The same cache in shuffled pages (unused blocks and table entries past
    the sequence NaN) gives bit for bit the contiguous result and tiles."""
    B, H, Hkv, Lq, D, Dv, Lmax = 2, 4, 2, 3, 64, 40, 192
    seqlens, band, dtype = [45, 170], (50, 0), torch.float16
    q, k, v, kc, vc = make_case(B, H, Hkv, Lq, D, Dv, Lmax, seqlens, band, dtype, seed=3)
    with backends.count_tiles() as c1:
        ref = run(q, kc, vc, seqlens, band, D ** -0.5, dtype, num_splits=2)
    kp, table = paged(kc, page)
    vp, table_v = paged(vc, page)
    assert torch.equal(table, table_v)
    pages_used = [math.ceil((s + Lq) / page) for s in seqlens]
    table = table.clone()
    for b, n in enumerate(pages_used):
        table[b, n:] = int(table.max()) + 1  # an extra (NaN) block
    with backends.count_tiles() as c2:
        got = run(q, kp, vp, seqlens, band, D ** -0.5, dtype, block_table=table, num_splits=2)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert c1 == c2 and c1["forward"] == band_tiles(seqlens, Lq, band, Hkv)
    r_out, r_lse = oracle(q, k, v, seqlens, band, D ** -0.5)
    assert_close("out", got[0], r_out, torch_lowp(q, k, v, seqlens, band, D ** -0.5, dtype), dtype)
    assert_close("lse", got[1], r_lse, oracle(q, k, v, seqlens, band, D ** -0.5, torch.float32)[1], dtype)


def test_every_output_written():
    """Outputs start as NaN; the kernels write every element, rows of every
    row block, and only finite values here."""
    B, H, Hkv, Lq = 2, 4, 2, 9  # 18 rows a key head: two row blocks, the second with 2 rows
    q, k, v, kc, vc = make_case(B, H, Hkv, Lq, 64, 64, 100, [0, 60], CAUSAL, torch.float16)
    out, lse = run(q, kc, vc, [0, 60], CAUSAL, 0.125, torch.float16, num_splits=5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def _call(q, k, v, pattern, band, block_table=None):
    return KVCacheCall(q=q, k_cache=k, v_cache=v, cache_seqlens=torch.zeros(q.shape[0], dtype=torch.int32),
                       block_table=block_table, pattern=pattern, band=band, scale=1.0, return_lse=True)


def test_reasons():
    """The backends refuse what the kernels do not take, saying why; cuda-sim takes CPU tensors only."""
    sim = backends.get_backend("cuda-sim", "kvcache")
    h = lambda *s, dt=torch.float16: torch.zeros(*s, dtype=dt)
    ok = _call(h(1, 2, 1, 64), h(1, 1, 32, 64), h(1, 1, 32, 64), P.Causal(), (None, 0))
    assert sim.reasons(ok) == []
    table = torch.zeros(1, 2, dtype=torch.int32)
    cases = [
        (_call(h(1, 2, 1, 64, dt=torch.float32), h(1, 1, 32, 64, dt=torch.float32),
               h(1, 1, 32, 64, dt=torch.float32), P.Causal(), (None, 0)), "dtype torch.float32"),
        (_call(h(1, 2, 1, 160), h(1, 1, 32, 160), h(1, 1, 32, 64), P.Causal(), (None, 0)), "head dims"),
        (_call(h(1, 2, 1, 64), h(1, 1, 32, 64), h(1, 1, 32, 192), P.Causal(), (None, 0)), "head dims"),
        (_call(h(1, 2, 1, 64), h(3, 1, 24, 64), h(3, 1, 24, 64), P.Causal(), (None, 0), table), "page of 24"),
        (_call(h(1, 2, 1, 64).cuda() if torch.cuda.is_available() else h(1, 2, 1, 64, dt=torch.float16).to("meta"),
               h(1, 1, 32, 64), h(1, 1, 32, 64), P.Causal(), (None, 0)), "runs on CPU tensors"),
    ]
    for call, message in cases:
        why = "; ".join(sim.reasons(call))
        assert message in why, (message, why)
    cuda = backends.get_backend("cuda", "kvcache")
    assert cuda.priority == 15 and not sim.auto_for(ok) and not cuda.auto_for(ok)
    assert cuda.reasons(ok), "backend 'cuda' must refuse CPU tensors"


def test_op_checks_arguments():
    """The op checks what the kernel assumes and names the bad argument."""
    op = cb._ops(torch.device("cpu")).kvcache_fwd_
    h = lambda *s, dt=torch.float16: torch.zeros(*s, dtype=dt)
    lens = torch.zeros(1, dtype=torch.int32)

    def args(q=None, k=None, v=None, lens_=lens, table=None, splits=1, out=None, lse=None):
        return [h(1, 2, 1, 64) if q is None else q, h(1, 1, 32, 64) if k is None else k,
                h(1, 1, 32, 64) if v is None else v, lens_, table, None, 0, 1.0, splits,
                h(1, 2, 1, 64) if out is None else out, h(1, 2, 1, dt=torch.float32) if lse is None else lse]

    op(*args())  # valid
    cases = [
        (args(q=h(1, 2, 1, 40)), "head dim must be 64 or 128"),
        (args(q=h(1, 2, 17, 64), out=h(1, 2, 17, 64), lse=h(1, 2, 17, dt=torch.float32)), "Lq must lie"),
        (args(k=h(1, 1, 32, 20)), "multiple of 8"),
        (args(v=h(1, 1, 31, 64)), "v_cache must have shape"),
        (args(lens_=lens.long()), "cache_seqlens must be Int"),
        (args(table=torch.zeros(2, 1, dtype=torch.int32)), "block_table must be"),
        (args(splits=0), "num_splits"),
        (args(out=h(1, 2, 2, 32)), "out must have shape"),
        (args(out=h(1, 2, 1, 72)), "Dv' <= v_cache's"),
        (args(q=h(1, 3, 1, 64), k=h(1, 2, 32, 64), v=h(1, 2, 32, 64), out=h(1, 3, 1, 64),
              lse=h(1, 3, 1, dt=torch.float32)), "not a multiple"),
    ]
    for a, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*a)
            print("no error:", message)


# ---------------------------------------------------------------------------
# Race check (long tier: about a minute to build): the kernels compiled with
# -fsanitize=thread instrumentation and TFK_HOST_RACECHECK=1 (the host layer
# records every shared-memory access: a read of a byte another thread wrote
# since the last barrier, a write over one another thread read, or an access
# a cp.async has not delivered, raises), behind a binding of their own.

RACE_NS = "tfk_kvcache_racecheck"
_RACE_BINDING = r'''
#include <torch/library.h>
#include "kvcache/ops.h"
namespace {
struct Sim {
  static constexpr const char* kNamespace = "%(ns)s";
  struct Guard { explicit Guard(c10::Device) {} };
  static void* stream(const at::Tensor&) { return nullptr; }
  static void after_launch() {}
};
}  // namespace
TORCH_LIBRARY(%(ns)s, m) { TFK_KVCACHE_DEFS(m); }
TORCH_LIBRARY_IMPL(%(ns)s, CPU, m) { TFK_KVCACHE_IMPLS(m, Sim); }
'''


@pytest.mark.slow
@pytest.mark.parametrize("hd", [64, 128])
def test_no_shared_memory_races(hd, tmp_path_factory, monkeypatch):
    """Several tiles per split (the staggered K/V copies cycle), two row
    blocks, paged, under the race check; results equal the regular build's."""
    import shutil
    import subprocess
    from pathlib import Path

    from torch.utils import cpp_extension
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("the race check needs g++ (-fsanitize=thread instrumentation)")
    root = Path(__file__).resolve().parents[2]
    ops = getattr(torch.ops, RACE_NS, None)
    if not hasattr(ops, "kvcache_fwd_"):
        out = tmp_path_factory.mktemp("kvcache_racecheck")
        # TFK_KVCACHE_RACE_SOURCE: another kernel source (how a planted missing barrier was shown to fail)
        source = os.environ.get("TFK_KVCACHE_RACE_SOURCE", "kvcache/kvcache_fwd.cu")
        (out / "kernels.cpp").write_text(f'#include "{source}"\n')
        (out / "binding.cpp").write_text(_RACE_BINDING % dict(ns=RACE_NS))
        obj = out / "kernels_racecheck.o"
        proc = subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-fsanitize=thread", "-fno-gnu-unique",
                               "-DTFK_HOST_RACECHECK=1", f"-I{root / 'csrc'}", "-c", str(out / "kernels.cpp"),
                               "-o", str(obj)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        os.environ.setdefault("MAX_JOBS", "2")
        cpp_extension.load(name=RACE_NS, sources=[str(out / "binding.cpp")], extra_cflags=["-O1"],
                           extra_include_paths=[str(root / "csrc")], extra_ldflags=[str(obj)],
                           build_directory=str(out), is_python_module=False)
        ops = getattr(torch.ops, RACE_NS)
    B, H, Hkv, Lq, D, Lmax, seqlens, band = 2, 4, 1, 5, hd, 320, [250, 3], (200, 0)
    q, k, v, kc, vc = make_case(B, H, Hkv, Lq, D, D, Lmax, seqlens, band, torch.float16)
    kp, table = paged(kc, 32)
    vp, _ = paged(vc, 32)
    want = run(q, kp, vp, seqlens, band, 0.1, torch.float16, block_table=table, num_splits=2)
    monkeypatch.setattr(cb, "_ops", lambda device: ops)
    got = run(q, kp, vp, seqlens, band, 0.1, torch.float16, block_table=table, num_splits=2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_no_query():
    """Lq = 0 launches nothing and returns empty outputs."""
    q, k, v, kc, vc = make_case(2, 2, 1, 1, 64, 64, 32, [3, 4], CAUSAL, torch.float16)
    with backends.count_tiles() as counts:
        out, lse = run(q[:, :, :0], kc, vc, [3, 4], CAUSAL, 0.125, torch.float16)
    assert out.shape == (2, 2, 0, 64) and lse.shape == (2, 2, 0) and counts["forward"] == 0


def test_cuda_op_shares_the_schema():
    """tfk._C registers kvcache_fwd_ with tfk._sim's schema, for CUDA tensors only
    (skipped where tfk._C is not built)."""
    if backends.import_error("_C") is not None:
        pytest.skip(f"tfk._C is not built: {backends.import_error('_C')}")
    import tfk._sim  # noqa: F401
    cuda, sim = torch.ops.tfk.kvcache_fwd_.default, torch.ops.tfk_sim.kvcache_fwd_.default
    assert str(cuda._schema).split("(", 1)[1] == str(sim._schema).split("(", 1)[1]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(cuda.name(), "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(cuda.name(), "CPU")
