"""The CUDA attention kernels (csrc/attention/) run on the CPU by backend
"cuda-sim": the same sources as tfk._C, compiled for the host (tfk._sim) and
executed by the host-execution layer, with mma.sync, ldmatrix and cp.async
following PTX's fragment layouts. Forward, lse and every gradient against the
float64 reference in float16 and bfloat16 (the host layer computes bf16 as
the GPU does), for every pattern, GQA/MQA, odd sizes, padded head dims, user
masks and dropout. The kernels' shared-memory synchronization (the cp.async
double buffer) is checked by the layer's race check on a separately built
copy."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import tfk
from tfk import dropout as drop
from tfk import patterns as P
from tfk.backends import AttentionCall, select_backend
from tfk.ops.attention import attention_reference, cuda_backend
from tfk.plan import get_plan, plan_id
from tolerances import assert_close
from helpers import (PATTERN_IDS, VISIT_PATTERN_IDS, check_against_reference, check_kernels_visit_the_plan,
                     make_qkv, mask_cases, pattern_mask, patterns_for_tests)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(cuda_backend._import_error("_sim") is not None,
                                reason="tfk._sim is not built (no C++ compiler when tfk was installed)")

SHAPES = {  # B, H, Hkv, Lq, Lk, D, Dv
    "gqa_97_d40": (2, 4, 2, 97, 97, 40, 40),
    "mqa_63x130_d80_dv24": (1, 3, 1, 63, 130, 80, 24),
}


def _check(pattern, shape, dtype, backend="cuda-sim"):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q, k, v, dout = make_qkv(B, H, Hkv, Lq, Lk, D, Dv)
    fn = lambda q_, k_, v_: tfk.attention(q_, k_, v_, pattern, backend=backend, return_lse=True)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=pattern_mask(pattern, Lq, Lk))


# the long tier adds bigger shapes (TFK_LONG_TESTS=1)
LONG_SHAPES = {
    "1025_d64": (1, 2, 2, 1025, 1025, 64, 64),
    "gqa_300x257_d128": (2, 8, 2, 300, 257, 128, 128),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES) + [pytest.param(n, marks=pytest.mark.slow) for n in LONG_SHAPES])
@pytest.mark.parametrize("pattern_id", PATTERN_IDS)
def test_patterns(pattern_id, shape, dtype):
    shape = {**SHAPES, **LONG_SHAPES}[shape]
    H, Lq, Lk = shape[1], shape[3], shape[4]
    _check(patterns_for_tests(H, Lq, Lk)[pattern_id], shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (16, 16), (128, 96), (72, 40)], ids=str)
def test_head_dims(D, Dv, dtype):
    """64 and 128 natively; others zero-padded to them (D != Dv included)."""
    _check(P.sliding_window(40, 9), (1, 2, 1, 70, 100, D, Dv), dtype)


@pytest.mark.parametrize("pattern_id", ["dense", "causal", "window_dilated", "longformer"])
def test_many_tiles_and_gqa_groups(pattern_id):
    """Several tiles per schedule row (the cp.async double buffer cycles), and
    dK/dV blocks that walk the schedules of 4 query heads."""
    shape = (1, 8, 2, 300, 257, 64, 64)
    _check(patterns_for_tests(8, 300, 257)[pattern_id], shape, torch.float16)


@pytest.mark.parametrize("pattern_id", VISIT_PATTERN_IDS)
def test_kernels_visit_exactly_the_plan(pattern_id, monkeypatch):
    """Counted by the kernels themselves, as test_triton.py does for Triton's."""
    check_kernels_visit_the_plan("cuda-sim", cuda_backend, pattern_id, torch.float16, 64,
                                 (cuda_backend.BLOCK, cuda_backend.BLOCK), monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_id", [m for m in mask_cases(1, 1, 4, 4) if m != "none"])
def test_user_masks(mask_id, dtype):
    """Masks read through broadcast strides, alone and under a sparse pattern
    (where kernels index the mask by original positions from a permuted layout)."""
    B, H, Lq, Lk, D = 2, 3, 65, 47, 64
    q, k, v, dout = make_qkv(B, H, H, Lq, Lk, D)
    mask = mask_cases(B, H, Lq, Lk)[mask_id]
    allowed = mask if mask.dtype == torch.bool else None
    bias = mask if mask.is_floating_point() else None
    fn = lambda q_, k_, v_: tfk.scaled_dot_product_attention(
        q_, k_, v_, attn_mask=mask if allowed is not None else mask.to(q_.dtype), backend="cuda-sim")
    check_against_reference(fn, q, k, v, dout, dtype, allowed=allowed, bias=bias)

    # The public functions take a pattern or a mask; the engine takes both.
    pattern = P.sliding_window(20, 0, dilation=2) | P.global_tokens(3)
    pat = pattern_mask(pattern, Lq, Lk)
    fn = lambda q_, k_, v_: cuda_backend.CudaSimBackend().run(_call(
        q_, k_, v_, pattern=pattern, attn_mask=mask if allowed is not None else mask.to(q_.dtype),
        scale=D ** -0.5))
    check_against_reference(fn, q, k, v, dout, dtype, allowed=pat if allowed is None else pat & allowed,
                            bias=bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_sdpa_and_scale(dtype):
    q, k, v, dout = make_qkv(1, 2, 2, 57, 90, 64)
    fn = lambda q_, k_, v_: tfk.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=0.3,
                                                             backend="cuda-sim")
    check_against_reference(fn, q, k, v, dout, dtype, allowed=torch.ones(57, 90, dtype=torch.bool).tril(),
                            scale=0.3)


def test_rows_with_no_key_give_zero_and_no_nan():
    pattern = P.causal(bottom_right=True)
    q, k, v, dout = make_qkv(1, 2, 2, 40, 20, 64)  # queries 0..19 see nothing
    leaves = [t.half().requires_grad_() for t in (q, k, v)]
    out, lse = tfk.attention(*leaves, pattern, backend="cuda-sim", return_lse=True)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    out.backward(dout.half())
    assert torch.equal(leaves[0].grad[:, :, :20], torch.zeros_like(leaves[0].grad[:, :, :20]))
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_gradient_through_lse():
    """lse's gradient enters the backward through delta."""
    q, k, v, dout = make_qkv(1, 2, 1, 50, 70, 64)
    pattern = P.sliding_window(16)
    grads = []
    for backend, dtype in (("cuda-sim", torch.float16), ("reference", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = tfk.attention(*leaves, pattern, backend=backend, return_lse=True)
        (out.float() * dout.float()).sum().add((lse.float() * lse.float().cos()).sum()).backward()
        grads.append([t.grad.double() for t in leaves])
    for got, want in zip(*grads):
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern_id", ["dense", "longformer", "window_dilated"])
def test_dropout_equals_reference_given_its_mask(pattern_id, dtype):
    """The kernels draw tfk.dropout's keep mask, bit for bit (at original
    positions under permuted layouts): out and grads match the float64
    reference given that mask, within the dtype's rounding."""
    B, H, Hkv, Lq, Lk, p = 2, 4, 2, 97, 130, 0.25
    pattern = patterns_for_tests(H, Lq, Lk)[pattern_id]
    q, k, v, dout = make_qkv(B, H, Hkv, Lq, Lk, 64)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    out = tfk.attention(*leaves, pattern, dropout_p=p, backend="cuda-sim")
    out.backward(dout.to(dtype))
    torch.manual_seed(11)
    keep = drop.dense_keep_mask(drop.draw_seed(), B, H, Lq, Lk, p)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    r_out, _ = attention_reference(*ref, pattern_mask(pattern, Lq, Lk), dropout_p=p, keep=keep)
    r_out.backward(dout)
    # the reference itself in this dtype, same mask, sets the rounding scale
    base = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    b_out, _ = attention_reference(*base, pattern_mask(pattern, Lq, Lk), dropout_p=p, keep=keep)
    b_out.backward(dout.to(dtype))
    for name, got, want, low in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves],
                                    [r_out] + [t.grad for t in ref], [b_out] + [t.grad for t in base]):
        assert_close(name, got, want, low, dtype)


def test_empty_and_one_token():
    for Lq, Lk in ((1, 1), (1, 70), (70, 1)):
        _check(None, (1, 2, 1, Lq, Lk, 64, 64), torch.float16)


def test_torch_compile_fullgraph():
    """The same custom ops carry backend "cuda" on a GPU."""
    pattern = P.sliding_window(20) | P.global_tokens(2)
    f = lambda q, k, v: tfk.attention(q, k, v, pattern, backend="cuda-sim")
    q, k, v = (torch.randn(1, 2, 70, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = torch.compile(f, fullgraph=True)(q, k, v)
    out.float().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = f(q, k, v)
    want.float().sum().backward()
    torch.testing.assert_close(out, want)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


def test_opcheck():
    q, k, v = (torch.randn(1, 2, 40, 64, dtype=torch.float16) for _ in range(3))
    pid = plan_id(P.sliding_window(8, 2), 40, 40, 64, 64, q.device)
    mask = torch.rand(40, 40) < 0.9
    for args in [(q, k, v, None, pid, 0.25, 0.0, 0), (q.requires_grad_(), k, v, mask, pid, 0.25, 0.0, 0)]:
        torch.library.opcheck(torch.ops.tfk.cuda_attention_fwd.default, args)


def _call(q, k=None, v=None, **kw):
    return AttentionCall(**dict(dict(q=q, k=q if k is None else k, v=q if v is None else v, pattern=None,
                                     attn_mask=None, scale=1.0, dropout_p=0.0, return_lse=False), **kw))


def test_refusals_and_auto():
    sim = cuda_backend.CudaSimBackend()
    q = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    assert sim.reasons(_call(q)) == []
    assert any("float32" in r for r in sim.reasons(_call(q.float())))
    big = torch.randn(1, 1, 8, 136, dtype=torch.float16)
    assert any("head dim 136 > 128" in r for r in sim.reasons(_call(big)))
    assert any("needs CUDA tensors" in r for r in cuda_backend.CudaBackend().reasons(_call(q)))
    # "auto" never takes the simulator
    assert select_backend("auto", _call(q)).name != "cuda-sim"
    with pytest.raises(tfk.BackendUnavailable, match="float32"):
        tfk.scaled_dot_product_attention(q.float(), q.float(), q.float(), backend="cuda-sim")


def _op_args(q, k, v, lq=40, lk=40):
    sp = get_plan(None, lq, lk, 64, 64, "cpu").subpasses[0]
    B, H = q.shape[:2]
    out = torch.empty(B, H, lq, 64)
    lse = torch.empty(B, H, lq)
    return [q, k, v, None, None, None, sp.kv_count, sp.kv_blocks, sp.kv_partial,
            sp.partial_masks.view(torch.uint8), 0.125, out, lse]


def test_ops_name_bad_arguments():
    """The ops check what the kernels assume and say which argument is wrong."""
    import tfk._sim  # noqa: F401
    op = torch.ops.tfk_sim.attention_fwd_
    h = lambda *s: torch.randn(*s, dtype=torch.float16)
    op(*_op_args(h(1, 2, 40, 64), h(1, 1, 40, 64), h(1, 1, 40, 64)))  # valid
    cases = [
        ((h(1, 2, 40, 80), h(1, 1, 40, 80), h(1, 1, 40, 80)), "head_dim must be 64 or 128"),
        ((h(1, 2, 40, 64).float(), h(1, 1, 40, 64), h(1, 1, 40, 64)), "q must be float16 or bfloat16"),
        ((h(1, 2, 40, 64), h(1, 1, 40, 64).bfloat16(), h(1, 1, 40, 64)), "k must be Half"),
        ((h(1, 3, 40, 64), h(1, 2, 40, 64), h(1, 2, 40, 64)), "not a multiple"),
        ((h(1, 2, 40, 64), h(1, 1, 40, 64), h(1, 1, 41, 64)), "v must have shape"),
        ((h(1, 2, 40, 64), h(1, 1, 40, 64).transpose(2, 3).contiguous().transpose(2, 3), h(1, 1, 40, 64)),
         "k must be contiguous"),
    ]
    for (q, k, v), message in cases:
        args = _op_args(q, k, v)
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    args = _op_args(h(1, 2, 40, 64), h(1, 1, 40, 64), h(1, 1, 40, 64))
    args[6] = args[6].long()
    with pytest.raises(RuntimeError, match="kv schedule must be Int"):
        op(*args)
    args = _op_args(h(1, 2, 40, 64), h(1, 1, 40, 64), h(1, 1, 40, 64))
    args[-1] = torch.empty(1, 2, 39)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        op(*args)
    args = _op_args(h(1, 2, 40, 64), h(1, 1, 40, 64), h(1, 1, 40, 64))
    with pytest.raises(RuntimeError, match="tiles must be Int"):
        op(*args, tiles=torch.zeros(3))
    with pytest.raises(RuntimeError, match="drop_key and drop_threshold must be uint32"):
        op(*args, drop_key=1, drop_threshold=1 << 32, drop_scale=2.0)


# ---------------------------------------------------------------------------
# Race check: tfk._sim's bindings linked against the kernels compiled with
# -fsanitize=thread (instrumentation only) and TFK_HOST_RACECHECK=1, as ops in
# a namespace of their own. Every shared-memory access of every thread is
# recorded; a read of a byte another thread wrote since the last barrier, a
# write over one another thread read, or an access to a byte a cp.async has not
# delivered, raises.

RACE_NS = "tfk_sim_racecheck"


@pytest.fixture(scope="module")
def race_ops(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("the race check needs g++ (-fsanitize=thread instrumentation)")
    from torch.utils import cpp_extension
    out = tmp_path_factory.mktemp("sim_racecheck")
    obj = out / "kernels_racecheck.o"
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-fsanitize=thread", "-fno-gnu-unique",
                           "-DTFK_HOST_RACECHECK=1", f"-I{ROOT / 'csrc'}", "-c", str(ROOT / "csrc/sim/kernels.cpp"),
                           "-o", str(obj)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    os.environ.setdefault("MAX_JOBS", "2")
    cpp_extension.load(name=RACE_NS, sources=[str(ROOT / "csrc/sim/bindings.cpp")],
                       extra_cflags=["-O1", f"-DTFK_SIM_NAMESPACE={RACE_NS}"],
                       extra_include_paths=[str(ROOT / "csrc")], extra_ldflags=[str(obj)],
                       build_directory=str(out), is_python_module=False)
    return getattr(torch.ops, RACE_NS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hd", [64, 128])
def test_no_shared_memory_races(race_ops, hd, dtype, monkeypatch):
    """Forward and backward kernels over a schedule with full and partial
    tiles, several tiles per row and a GQA group, with dropout, under the race
    check; the results still match the regular build."""
    monkeypatch.setattr(cuda_backend, "_ops", lambda device: race_ops)
    pattern = P.sliding_window(70, 10) | P.global_tokens(2)
    q, k, v, dout = (t.to(dtype) for t in make_qkv(1, 4, 2, 150, 140, hd))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    out, lse = tfk.attention(*leaves, pattern, dropout_p=0.1, backend="cuda-sim", return_lse=True)
    out.backward(dout)
    got = [out, lse] + [t.grad for t in leaves]
    monkeypatch.undo()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    out, lse = tfk.attention(*leaves, pattern, dropout_p=0.1, backend="cuda-sim", return_lse=True)
    out.backward(dout)
    for a, b in zip(got, [out, lse] + [t.grad for t in leaves]):
        assert torch.equal(a, b)


def test_race_check_catches_a_missing_barrier(race_ops, tmp_path):
    """The check is live on these kernels: the same build with the barrier
    after each tile's math removed (the next prefetch then overwrites a buffer
    other warps may still read) must fail."""
    src = (ROOT / "csrc/attention/attention_fwd.cu").read_text()
    marker = "    __syncthreads();  // the next iteration's prefetch overwrites this buffer\n"
    assert src.count(marker) == 1
    broken = tmp_path / "attention"
    broken.mkdir()
    (broken / "attention_fwd.cu").write_text(src.replace(marker, ""))
    for name in ("attention.h", "tile.cuh"):
        shutil.copy(ROOT / "csrc/attention" / name, broken / name)
    # a standalone program: the broken forward on a 3-tile row, race check on
    main = tmp_path / "main.cpp"
    main.write_text(r'''
#include <cstdio>
#include <vector>
#include "attention/attention_fwd.cu"
int main() {
  using namespace tfk::attention;
  const int L = 192, HD = 64;
  std::vector<__half> x(L * HD, __float2half_rn(0.5f));
  std::vector<int32_t> count{3, 3, 3}, blocks{0, 1, 2, 0, 1, 2, 0, 1, 2}, partial(9, -1);
  std::vector<float> out(L * HD), lse(L);
  FwdParams p;
  p.head_dim = HD; p.batch = p.heads = p.kv_heads = 1; p.lq = p.lk = L;
  p.q = p.k = p.v = x.data();
  p.kv_schedule.count = count.data(); p.kv_schedule.blocks = blocks.data();
  p.kv_schedule.partial = partial.data(); p.kv_schedule.width = 3;
  p.out = out.data(); p.out_f32 = true; p.lse = lse.data();
  try { fwd_launch(p, nullptr); } catch (const std::exception& e) { std::puts(e.what()); return 3; }
  return 0;
}
''')
    exe = tmp_path / "broken"
    proc = subprocess.run(["g++", "-std=c++17", "-O1", "-fsanitize=thread", "-fno-gnu-unique",
                           "-DTFK_HOST_RACECHECK=1", f"-I{tmp_path}", f"-I{ROOT / 'csrc'}", str(main), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "WAR" in run.stdout, run.stdout + run.stderr
