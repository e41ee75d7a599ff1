"""Backend "cuda-sim" specifics: the CUDA attention kernels (csrc/attention/),
compiled for the host (tfk._sim) and run by the host-execution layer with
mma.sync, ldmatrix and cp.async following PTX's fragment layouts. Its
numerics (every pattern, dtype, mask, dropout, head dim) run in the shared
matrix of test_attention.py and test_sdpa.py; here: schedules long enough to
cycle the cp.async double buffer, the ops' argument checks, and the kernels'
shared-memory synchronization under the layer's race check."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import tfk
from tfk import patterns as P
from tfk.ops.attention import cuda_backend
from tfk.plan import get_plan
from helpers import BACKEND_DTYPES, check_against_reference, make_qkv, pattern_mask, patterns_for_tests, require_backend

ROOT = Path(__file__).resolve().parents[2]
DTYPES = BACKEND_DTYPES["cuda-sim"]


@pytest.fixture(autouse=True)
def _sim_exists():
    # skips only without a C++ compiler; a missing or broken tfk._sim fails
    require_backend("cuda-sim")


def _check(pattern, shape, dtype):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q, k, v, dout = make_qkv(B, H, Hkv, Lq, Lk, D, Dv)
    fn = lambda q_, k_, v_: tfk.attention(q_, k_, v_, pattern, backend="cuda-sim", return_lse=True)
    check_against_reference(fn, q, k, v, dout, dtype, allowed=pattern_mask(pattern, Lq, Lk))


@pytest.mark.parametrize("pattern_id", ["dense", "causal", "window_dilated", "longformer"])
def test_many_tiles_and_gqa_groups(pattern_id):
    """Several tiles per schedule row (the cp.async double buffer cycles), and
    dK/dV blocks that walk the schedules of 4 query heads."""
    shape = (1, 8, 2, 300, 257, 64, 64)
    _check(patterns_for_tests(8, 300, 257)[pattern_id], shape, torch.float16)


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
