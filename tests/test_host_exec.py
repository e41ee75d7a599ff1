"""The host-execution layer (csrc/common/host_exec.h) on the CPU, through the
test kernels in csrc/host_exec_tests/ and the C entry points in
csrc/host/host_exec_api.cpp.

(a) shared memory and barriers; (b) warp shuffles and votes; (c) ldmatrix and
mma.sync fragments against Python models of the PTX layouts, and a tiled GEMM
(cp.async + ldmatrix + mma) against torch; (d) misuse the layer refuses;
(e) the race check, in a separate build with -fsanitize=thread; (f)
determinism and worker threads.

The CMake project's tfk_host target is built once per session into a temporary
folder (without the cubins: tests/test_build.py covers ptxas).
"""
import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from bench import compile_report

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
P = ctypes.c_void_p
I32, I64 = ctypes.c_int, ctypes.c_int64

# name: argument types (every entry point returns int, 0 on success)
SIGNATURES = {
    "tfk_host_exec_set_workers": [I32],
    "tfk_host_exec_last_stats": [P],
    "tfk_host_exec_block_sum": [P, I64, P, I32, I32, I32],
    "tfk_host_exec_rotate": [P, P, I32, I32, I32, I32],
    "tfk_host_exec_sync_votes": [P, P, I32],
    "tfk_host_exec_atomics": [P, I64, P, I32, P, P, P, I32, I32],
    "tfk_host_exec_barrier_spin": [P, I32, I32, I32],
    "tfk_host_exec_block_scan": [P, P, I64, I32],
    "tfk_host_exec_partial_warp_sum": [P, P, I32],
    "tfk_host_exec_warp_ops": [P, P, P, P, I32],
    "tfk_host_exec_syncwarp_exchange": [P, P, I32],
    "tfk_host_exec_ldmatrix_probe": [P, P, P, P],
    "tfk_host_exec_mma_probe": [P, P, P, P, I32],
    "tfk_host_exec_convert": [P, P, P, P, I64],
    "tfk_host_exec_gemm": [P, P, P, I32, I32, I32, I32, I32],
    "tfk_host_exec_hazard": [P, P, I32, I32],
    "tfk_host_exec_misuse": [I32, I32, P],
}
WARP_OPS = 13  # kWarpOps in host_exec_tests.h


def _tool(name: str) -> str:
    try:
        return compile_report._tool(name)
    except RuntimeError as e:
        pytest.skip(str(e))


class Lib:
    """ctypes wrapper: lib.name(*args) raises RuntimeError with the layer's message."""

    def __init__(self, path: Path):
        self.dll = ctypes.CDLL(str(path))
        self.dll.tfk_host_exec_last_error.restype = ctypes.c_char_p
        for name, argtypes in SIGNATURES.items():
            fn = getattr(self.dll, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int

    def __getattr__(self, name):
        fn = getattr(self.dll, "tfk_host_exec_" + name)

        def call(*args):
            args = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
            if fn(*args) != 0:
                raise RuntimeError(self.dll.tfk_host_exec_last_error().decode())

        return call

    def stats(self):
        out = torch.zeros(4, dtype=torch.int64)
        self.last_stats(out)
        return dict(zip(("blocks", "resumes", "barriers", "collectives"), out.tolist()))


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    """libtfk_host.so from the CMake project (target tfk_host only), or the
    library named by TFK_HOST_EXEC_LIB (a variant build: -O0, ucontext, ...)."""
    if os.environ.get("TFK_HOST_EXEC_LIB"):
        return Lib(Path(os.environ["TFK_HOST_EXEC_LIB"]))
    build = tmp_path_factory.mktemp("cmake_host_exec")
    cmake = _tool("cmake")
    steps = [[cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"],
             [cmake, "--build", str(build), "--target", "tfk_host", "-j1"]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(step)} failed:\n{proc.stdout}\n{proc.stderr}"
    return Lib(build / "libtfk_host.so")


@pytest.fixture(scope="session")
def race_lib(tmp_path_factory):
    """The same kernels and entry points built with the race check: compiled with
    -fsanitize=thread (instrumentation only) and linked without libtsan."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("the race check needs g++ (-fsanitize=thread instrumentation)")
    out = tmp_path_factory.mktemp("racecheck")
    flags = ["-std=c++17", "-O1", "-fPIC", "-fsanitize=thread", "-fno-gnu-unique", "-DTFK_HOST_RACECHECK=1",
             f"-I{CSRC}"]
    objs = []
    for src in sorted((CSRC / "host_exec_tests").glob("*.cu")) + [CSRC / "host" / "host_exec_api.cpp"]:
        obj = out / (src.name + ".o")
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        proc = subprocess.run([cxx, *flags, *lang, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        objs.append(str(obj))
    so = out / "libtfk_host_racecheck.so"
    proc = subprocess.run([cxx, "-shared", *objs, "-o", str(so)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    undefined = subprocess.run(["nm", "-u", str(so)], capture_output=True, text=True).stdout
    assert "__tsan" not in undefined, "race-check build must not need libtsan"
    return Lib(so)


def _i32(values):
    """Unsigned 32-bit values (Python ints) as an int32 tensor, bit for bit."""
    t = torch.as_tensor(values, dtype=torch.int64)
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)


def _u32(t):
    return t.to(torch.int64) & 0xFFFFFFFF


# ------------------------------------------------------- (a) shared memory, barriers

@pytest.mark.parametrize("n, blocks, threads, dynamic", [
    (1, 1, 1, False), (97, 3, 97, False), (1000, 2, 128, True), (4099, 5, 33, False), (12345, 4, 1024, True),
    (63, 7, 5, True),
])
def test_block_sum(lib, n, blocks, threads, dynamic):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    partial = torch.full((blocks,), float("nan"))
    lib.block_sum(x, n, partial, blocks, threads, int(dynamic))
    stride = blocks * threads
    ref = torch.stack([x.double()[torch.arange(n) % stride // threads == b].sum() for b in range(blocks)])
    torch.testing.assert_close(partial.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads, blocks, rounds", [(1, 1, 3), (37, 2, 5), (128, 3, 8), (1024, 1, 2)])
def test_barrier_rotation(lib, threads, blocks, rounds):
    x = torch.arange(blocks * threads, dtype=torch.float32) * 3 + 1
    out = torch.full_like(x, float("nan"))
    lib.rotate(x, out, blocks, threads, rounds, 1)
    shift = rounds * (rounds + 1) // 2
    ref = x.view(blocks, threads).roll(-shift, dims=1).reshape(-1) + rounds
    assert torch.equal(out, ref)


def test_rotation_without_barrier_is_wrong(lib):
    """The barrier test can fail: without __syncthreads the rotation reads
    values not yet written (the fibers then run to completion in order)."""
    threads, rounds = 64, 3
    x = torch.arange(threads, dtype=torch.float32)
    out = torch.full_like(x, float("nan"))
    lib.rotate(x, out, 1, threads, rounds, 0)
    ref = x.roll(-rounds * (rounds + 1) // 2) + rounds
    assert not torch.equal(out, ref)
    assert out.isnan().any()  # dynamic shared memory is poisoned with NaN before each block


@pytest.mark.parametrize("threads", [1, 45, 256])
def test_syncthreads_count_and_or(lib, threads):
    g = torch.Generator().manual_seed(threads)
    for pred in (torch.randint(0, 3, (threads,), generator=g, dtype=torch.int32),
                 torch.ones(threads, dtype=torch.int32), torch.zeros(threads, dtype=torch.int32)):
        out = torch.full((threads, 3), -7, dtype=torch.int32)
        lib.sync_votes(pred, out, threads)
        nz = int((pred != 0).sum())
        assert torch.equal(out[:, 0], torch.full((threads,), nz, dtype=torch.int32))
        assert torch.equal(out[:, 1], torch.full((threads,), int(nz == threads), dtype=torch.int32))
        assert torch.equal(out[:, 2], torch.full((threads,), int(nz > 0), dtype=torch.int32))


@pytest.mark.parametrize("workers", [1, 2])
def test_atomics(lib, workers):
    n, bins = 20_000, 37
    v = torch.randint(-100, 100, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    hist = torch.zeros(bins, dtype=torch.int32)
    max_min = torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32)
    total = torch.zeros(1)
    counter = torch.zeros(1, dtype=torch.int64)
    try:
        lib.set_workers(workers)  # 2: blocks on two OS threads, contending for real
        lib.atomics(v, n, hist, bins, max_min, total, counter, 6, 160)
    finally:
        lib.set_workers(1)
    assert torch.equal(hist, torch.bincount(v.long() % bins, minlength=bins).to(torch.int32))
    assert max_min.tolist() == [int(v.max()), int(v.min())]
    assert total.item() == float(v.sum())  # exact: integers far below 2^24
    assert counter.item() == n


# ------------------------------------------------------- (b) warp collectives

@pytest.mark.parametrize("n, threads", [(1, 32), (1000, 256), (4096, 1024), (77, 64)])
def test_block_scan(lib, n, threads):
    x = torch.randint(-50, 50, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    out = torch.zeros_like(x)
    lib.block_scan(x, out, n, threads)
    pad = (-n) % threads
    ref = torch.cat([x, x.new_zeros(pad)]).view(-1, threads).cumsum(1).reshape(-1)[:n].to(torch.int32)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("threads", [1, 20, 48, 97, 128])
def test_partial_warp_sum(lib, threads):
    x = torch.randint(-9, 9, (threads,), dtype=torch.int32, generator=torch.Generator().manual_seed(threads))
    nw = (threads + 31) // 32
    out = torch.full((nw,), -1, dtype=torch.int32)
    lib.partial_warp_sum(x, out, threads)
    ref = torch.stack([x[32 * w:32 * w + 32].sum() for w in range(nw)]).to(torch.int32)
    assert torch.equal(out, ref)


def _warp_ops_model(v, src):
    """CUDA's documented semantics of each primitive in warp_ops_kernel, per warp."""
    def shfl(j_of):
        return [v[j_of(lane)] for lane in range(32)]

    def idx(width):
        return shfl(lambda l: l // width * width + src[l] % width)

    def up(d, width):
        return shfl(lambda l: l - d if l % width >= d else l)

    def down(d, width):
        return shfl(lambda l: l + d if l % width + d < width else l)

    def xor(m, width):  # earlier groups are reachable, later ones give the own value
        return shfl(lambda l: (l ^ m) if (l ^ m) < (l // width + 1) * width else l)

    ballot = sum(1 << l for l in range(32) if v[l] & 1)
    ballot = ballot - 2**32 if ballot >= 2**31 else ballot
    halves = [v[l ^ 1] if l < 16 else (v[l + 2] if l % 16 + 2 < 16 else v[l]) for l in range(32)]
    f = [float(x) * 0.5 for x in xor(16, 32)]
    f_bits = torch.tensor(f, dtype=torch.float32).view(torch.int32).tolist()
    cols = [idx(32), idx(8), up(3, 32), up(2, 16), down(5, 32), down(3, 8), xor(6, 32), xor(9, 8),
            [ballot] * 32, [int(any(x == 12345 for x in v))] * 32, [int(all(x >= 0 for x in v))] * 32,
            halves, f_bits]
    wide = [v[l] * 2**32 + l * 7 for l in range(32)]
    wide64 = [wide[l + 1] if l < 31 else wide[l] for l in range(32)]
    return [list(r) for r in zip(*cols)], wide64


@pytest.mark.parametrize("threads, seed", [(32, 0), (96, 1)])
def test_warp_ops(lib, threads, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 1000, (threads,), dtype=torch.int32, generator=g)
    if threads > 64:  # warp 1: negatives, so __all_sync(v >= 0) is false there
        v[40:64] = torch.randint(-5, 5, (24,), dtype=torch.int32, generator=g)
    v[5] = 12345                                                            # warp 0: any() true
    src = torch.randint(-70, 70, (threads,), dtype=torch.int32, generator=g)
    out = torch.zeros(threads, WARP_OPS, dtype=torch.int32)
    out64 = torch.zeros(threads, dtype=torch.int64)
    lib.warp_ops(v, src, out, out64, threads)
    for w in range(threads // 32):
        sl = slice(32 * w, 32 * w + 32)
        ref, ref64 = _warp_ops_model(v[sl].tolist(), src[sl].tolist())
        assert out[sl].tolist() == ref, f"warp {w}"
        assert out64[sl].tolist() == ref64, f"warp {w}"


def test_syncwarp_exchange(lib):
    x = torch.arange(128, dtype=torch.int32) * 5
    out = torch.zeros_like(x)
    lib.syncwarp_exchange(x, out, 128)
    assert torch.equal(out, x.view(4, 32).roll(-1, dims=1).reshape(-1))


# ------------------------------------------------------- (c) ldmatrix, mma.sync, GEMM

def _ldmatrix_model(tile, rows, chunks, num, trans):
    """PTX ldmatrix.m8n8.x{num}{.trans}.b16: lanes 8i..8i+7 address rows 0..7 of
    matrix i; lane l receives M_i[l/4][2(l%4)+{0,1}] (.trans: M_i[2(l%4)+{0,1}][l/4])."""
    out = [[0] * 4 for _ in range(32)]
    for lane in range(32):
        r, c = lane // 4, 2 * (lane % 4)
        for m in range(num):
            def elem(i, j):
                src = 8 * m + i
                return tile[rows[src]][8 * chunks[src] + j]
            lo, hi = (elem(r, c), elem(r, c + 1)) if not trans else (elem(c, r), elem(c + 1, r))
            out[lane][m] = lo | (hi << 16)
    return out


def test_ldmatrix_layouts(lib):
    g = torch.Generator().manual_seed(3)
    tile = torch.randperm(32768, generator=g)[:64 * 16].to(torch.int16).view(64, 16)  # distinct 15-bit ids
    rows = torch.randint(0, 64, (32,), dtype=torch.int32, generator=g)
    chunks = torch.randint(0, 2, (32,), dtype=torch.int32, generator=g)
    out = torch.full((6, 32, 4), -1, dtype=torch.int32)
    lib.ldmatrix_probe(tile, rows, chunks, out)
    got = _u32(out).tolist()
    t, r, c = tile.tolist(), rows.tolist(), chunks.tolist()
    for v, (num, trans) in enumerate([(1, False), (2, False), (4, False), (1, True), (2, True), (4, True)]):
        assert got[v] == _ldmatrix_model(t, r, c, num, trans), f"ldmatrix.x{num}{'.trans' if trans else ''}"


def test_half_bfloat16_conversions(lib):
    """Round to nearest even, subnormals, overflow, ties, NaN: bit for bit as torch
    (NaN only as NaN: CUDA's canonical NaN is 0x7fff, torch's is not)."""
    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.99, 65520.0, -70000.0, float("inf"), float("-inf"),
               float("nan"), 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 3 * 2.0**-25, 2.0**-14, 2.0**-14 - 2.0**-25,
               1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.3895314e38, 1e-40, -1e-45, 2.0**-133]
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.tensor(special), torch.randn(4000, generator=g) * torch.logspace(-9, 6, 4000, base=2.0),
                   torch.randn(1000, generator=g) * 1e-6])
    x = torch.cat([x, x.new_zeros(x.numel() % 2)])
    pairs = x.numel() // 2
    h2, b2 = torch.zeros(pairs, dtype=torch.int32), torch.zeros(pairs, dtype=torch.int32)
    back = torch.zeros(4 * pairs)
    lib.convert(x, h2, b2, back, pairs)
    nan = x.isnan()
    for packed, dtype, round_trip in ((h2, torch.float16, back[:2 * pairs]), (b2, torch.bfloat16, back[2 * pairs:])):
        ref = x.to(dtype)
        got = packed.view(torch.int16)
        assert torch.equal(got[~nan], ref.view(torch.int16)[~nan]), dtype
        assert got.view(dtype)[nan].isnan().all()
        assert torch.equal(round_trip[~nan], ref.float()[~nan]) and round_trip[nan].isnan().all()


def _bits16(x, dtype):
    return x.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def _mma_fragments(A, B, C, dtype):
    """Per-lane registers of mma.m16n8k16 (PTX ISA, floating point fragments):
    a[r] = A[g+8(r&1)][2t+8(r>>1)+{0,1}], b[r] = B[2t+8r+{0,1}][g],
    c[i] = C[g+8(i>>1)][2t+(i&1)], g = lane/4, t = lane%4."""
    a16, b16 = _bits16(A, dtype), _bits16(B, dtype)
    a, b, c = [], [], []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(4):
            row, col = g + 8 * (r & 1), 2 * t + 8 * (r >> 1)
            a.append(int(a16[row, col]) | int(a16[row, col + 1]) << 16)
        for r in range(2):
            k = 2 * t + 8 * r
            b.append(int(b16[k, g]) | int(b16[k + 1, g]) << 16)
        for i in range(4):
            c.append(float(C[g + 8 * (i >> 1), 2 * t + (i & 1)]))
    return _i32(a), _i32(b), torch.tensor(c, dtype=torch.float32)


def _unpack_d(d):
    D = torch.empty(16, 8, dtype=torch.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            D[g + 8 * (i >> 1), 2 * t + (i & 1)] = d[lane * 4 + i]
    return D


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_fragments(lib, dtype):
    g = torch.Generator().manual_seed(11)
    A = torch.randn(16, 16, generator=g).to(dtype).float()
    B = torch.randn(16, 8, generator=g).to(dtype).float()
    C = torch.randn(16, 8, generator=g)
    a, b, c = _mma_fragments(A, B, C, dtype)
    d = torch.full((128,), float("nan"))
    lib.mma_probe(a, b, c, d, int(dtype == torch.bfloat16))
    ref = (A.double() @ B.double() + C.double()).float()
    torch.testing.assert_close(_unpack_d(d), ref, rtol=1e-6, atol=1e-6)
    # A single element per row/column, to pin the layout exactly (no tolerance).
    A, B = torch.zeros(16, 16), torch.zeros(16, 8)
    A[torch.arange(16), torch.arange(16).flip(0)] = torch.arange(1, 17, dtype=torch.float32)
    B[torch.arange(16), torch.arange(16) % 8] = 1.0
    a, b, c = _mma_fragments(A, B, torch.zeros(16, 8), dtype)
    lib.mma_probe(a, b, c, d, int(dtype == torch.bfloat16))
    assert torch.equal(_unpack_d(d), A @ B)


def _gemm(lib, A, Bmat, dtype, b_kn):
    M, K = A.shape
    N = Bmat.shape[1]
    Bstore = Bmat.contiguous() if b_kn else Bmat.t().contiguous()
    C = torch.full((M, N), float("nan"))
    lib.gemm(A.to(dtype).view(torch.int16), Bstore.to(dtype).view(torch.int16), C, M, N, K,
             int(dtype == torch.bfloat16), int(b_kn))
    return C


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, N, K, b_kn", [(16, 8, 16, False), (16, 8, 16, True), (50, 40, 72, False),
                                           (50, 40, 72, True), (64, 64, 128, True), (130, 33, 40, False)])
def test_gemm_cp_async_ldmatrix_mma(lib, dtype, M, N, K, b_kn):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    A = torch.randn(M, K, generator=g).to(dtype)
    Bmat = torch.randn(K, N, generator=g).to(dtype)
    C = _gemm(lib, A, Bmat, dtype, b_kn)
    assert not C.isnan().any()
    # fp32 accumulation of products of the rounded inputs: torch's float32 matmul.
    ref = A.float() @ Bmat.float()
    torch.testing.assert_close(C, ref, rtol=1e-5, atol=1e-5 * K ** 0.5)


def test_gemm_rejects_unaligned_k(lib):
    with pytest.raises(RuntimeError, match="multiples of 8"):
        lib.gemm(torch.zeros(16, 12, dtype=torch.int16), torch.zeros(12, 8, dtype=torch.int16),
                 torch.zeros(16, 8), 16, 8, 12, 0, 1)


# ------------------------------------------------------- (d) misuse

@pytest.mark.parametrize("which, threads, message", [
    (0, 32, r"returned while 16 thread\(s\) wait at __syncthreads"),
    (1, 32, r"thread \(3,0,0\): returned while lanes 0-2 wait for it in __shfl_xor_sync"),
    (2, 32, r"__shfl_xor_sync with mask 0xffffffff while lanes 0 of that mask wait in __ballot_sync"),
    (3, 32, r"deadlock in block \(0,0,0\): 16 thread\(s\) wait at __syncthreads; warp 0: lanes 0-15 wait in "
            r"__shfl_xor_sync \(mask 0xffffffff\) for lanes 16-31, which are at __syncthreads"),
    (4, 48, r"thread \(32,0,0\): mma.sync.m16n8k16.f32.f16 needs a full warp of 32 threads; warp 1 of this "
            r"block has 16"),
    (5, 32, r"ldmatrix: lane 0's row address 0x[0-9a-f]+ is not (in shared memory|16-byte aligned)"),
    (6, 48, r"thread \(32,0,0\): __shfl_xor_sync: mask 0xffffffff names lanes 16-31 that do not exist \(warp 1 "
            r"of a 48-thread block has lanes 0-15\)"),
])
def test_misuse_is_refused(lib, which, threads, message):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message) as e:
        lib.misuse(which, threads, out)
    assert "tfk::host_exec_tests::misuse_kernel" in str(e.value)


def test_launch_limits(lib):
    with pytest.raises(RuntimeError, match="threads must be"):
        lib.block_sum(torch.zeros(4), 4, torch.zeros(1), 1, 1025, 0)


# ------------------------------------------------------- (e) race check

def _hazard(lib, mode, threads=64):
    x = torch.arange(threads, dtype=torch.float32) + 1
    out = torch.full_like(x, float("nan"))
    lib.hazard(x, out, threads, mode)
    return x, out


def test_hazard_kernels_without_race_check(lib):
    """Correct modes compute the exchange; the seeded bugs show as wrong values
    here too (fibers run to the next barrier in order; cp.async is deferred)."""
    x, out = _hazard(lib, 0)
    assert torch.equal(out, x.roll(-1))
    x, out = _hazard(lib, 6)
    assert torch.equal(out, x.view(-1, 2).flip(1).reshape(-1))
    _, out = _hazard(lib, 1)
    assert out[:-1].isnan().all()      # read before the neighbour wrote (poisoned dynamic smem)
    _, out = _hazard(lib, 3)
    assert out.isnan().all()           # read before cp_async_wait: the copy had not landed


@pytest.mark.parametrize("mode, kind", [(1, "RAW"), (2, "WAR"), (3, "ASYNC"), (4, "UNINIT"), (5, "RAW"), (7, "RAW"),
                                        (8, "WAR")])
def test_race_check_catches_seeded_hazard(race_lib, mode, kind):
    with pytest.raises(RuntimeError, match=rf"racecheck: \d+ racy shared-memory access\(es\)[\s\S]*\n  {kind}:") as e:
        _hazard(race_lib, mode)
    msg = str(e.value)
    assert "hazard_kernel" in msg and "block (0,0,0) thread (" in msg
    assert ("dynamic smem+" in msg) == (mode != 7)


def test_race_check_passes_correct_kernels(race_lib):
    """No false alarms on the correct kernels (barriers, __syncwarp, cp.async
    double buffering with ldmatrix), and the results are unchanged."""
    x, out = _hazard(race_lib, 0)
    assert torch.equal(out, x.roll(-1))
    x, out = _hazard(race_lib, 6)
    assert torch.equal(out, x.view(-1, 2).flip(1).reshape(-1))
    x = torch.randn(3000)
    partial = torch.zeros(3)
    race_lib.block_sum(x, 3000, partial, 3, 100, 0)
    race_lib.block_sum(x, 3000, partial, 3, 100, 1)
    v = torch.arange(96, dtype=torch.int32)
    out = torch.zeros(96, dtype=torch.int32)
    race_lib.block_scan(v, out, 96, 96)
    race_lib.syncwarp_exchange(v, out, 96)
    dst = torch.zeros(3, 37)
    race_lib.rotate(torch.zeros(3 * 37), dst, 3, 37, 4, 1)
    A, Bmat = torch.randn(50, 40).half(), torch.randn(40, 24).half()
    for b_kn in (False, True):
        C = _gemm(race_lib, A, Bmat, torch.float16, b_kn)
        torch.testing.assert_close(C, A.float() @ Bmat.float(), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------- (f) determinism, workers, speed

def test_deterministic(lib):
    g = torch.Generator().manual_seed(5)
    A, Bmat = torch.randn(130, 64, generator=g).bfloat16(), torch.randn(64, 72, generator=g).bfloat16()
    c1 = _gemm(lib, A, Bmat, torch.bfloat16, True)
    c2 = _gemm(lib, A, Bmat, torch.bfloat16, True)
    assert torch.equal(c1.view(torch.int32), c2.view(torch.int32))
    x = torch.randn(100_000, generator=g)
    p1, p2 = torch.zeros(7), torch.zeros(7)
    lib.block_sum(x, x.numel(), p1, 7, 96, 1)
    lib.block_sum(x, x.numel(), p2, 7, 96, 1)
    assert torch.equal(p1.view(torch.int32), p2.view(torch.int32))


def test_workers_match_serial(lib):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(9))
    serial, parallel = torch.zeros(9), torch.zeros(9)
    lib.block_sum(x, x.numel(), serial, 9, 128, 0)
    try:
        lib.set_workers(3)
        lib.block_sum(x, x.numel(), parallel, 9, 128, 0)
    finally:
        lib.set_workers(1)
    assert torch.equal(serial.view(torch.int32), parallel.view(torch.int32))


def test_speed_block_reduction_1m(lib, capsys):
    """128-thread blocks reducing 1M floats (grid stride, 64 blocks): time per
    launch and per fiber resume, printed with -s."""
    n, blocks, threads = 1 << 20, 64, 128
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    partial = torch.zeros(blocks)
    lib.block_sum(x, n, partial, blocks, threads, 0)  # warm: stacks mapped
    t0 = time.perf_counter()
    lib.block_sum(x, n, partial, blocks, threads, 0)
    dt = time.perf_counter() - t0
    st = lib.stats()
    torch.testing.assert_close(partial.double().sum(), x.double().sum(), rtol=1e-4, atol=1e-2)
    spin = torch.zeros(128)
    t0 = time.perf_counter()
    lib.barrier_spin(spin, 1, 128, 2000)
    dt_spin = time.perf_counter() - t0
    st_spin = lib.stats()
    # 8 barriers per block (1 + log2(128) tree rounds); each resumes the 127 threads that waited.
    assert st == {"blocks": 64, "resumes": 64 * (128 + 8 * 127), "barriers": 64 * 8, "collectives": 0}
    with capsys.disabled():
        print(f"\n  block_sum 1M floats, {blocks}x{threads} threads: {dt * 1e3:.1f} ms "
              f"({st['resumes']} fiber resumes, {st['barriers']} barriers)"
              f"\n  barrier_spin 128 threads x 2000 __syncthreads: {dt_spin * 1e3:.1f} ms, "
              f"{dt_spin / st_spin['resumes'] * 1e9:.0f} ns per fiber resume")
    assert dt < 5.0
