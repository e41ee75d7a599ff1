// Grouped GEMM of the MoE expert layers: C = act(A[gather] @ B[g]) * row_scale
// over row groups given by cumulative offsets (csrc/moe/moe.h).
//
// A launch is two kernels on one stream, with no host synchronisation:
//   moe_tile_map_kernel  one block: scans the groups' tile counts (offsets
//                        clamped to [0, M]) and writes, for each row tile of
//                        the grid, its first row and its group (the tail of
//                        rows past offs[-1]: kTailTile; tiles past the last:
//                        kSpareTile). The grid is max_row_tiles(M, G), an
//                        upper bound known without reading offs.
//   moe_gemm_kernel      a block of 4 warps per (row tile, 64-column tile):
//                        16-bit inputs on mma.sync m16n8k16 with fp32
//                        accumulation, each warp 16 rows x 64 columns (x 2
//                        with an activation: the gate and the up columns);
//                        A rows are read through gather (no permuted copy),
//                        k-steps of 32 stream through two shared buffers
//                        (cp.async of step s + 1 overlaps the math on s); B
//                        k-major (ldmatrix.trans) or n-major with trans_b.
//                        The epilogue applies act(gate) * up and row_scale.
//   moe_gemm_f32_kernel  fp32 inputs: the same tiles on FMA, 8 x 4 outputs
//                        (x 2) per thread, k-steps of 16.
// Tail tiles write zeros; spare tiles return at once.
#include "moe/moe.h"
#include "moe/moe_tile.cuh"

namespace tfk {
namespace moe {
// Named (not anonymous) so kernel names in ptxas reports and profilers are stable.
namespace gemm {

__global__ void __launch_bounds__(kThreads) moe_tile_map_kernel(const int64_t* offs, int64_t groups, int64_t m,
                                                                int32_t* map, int64_t n_tiles) {
  __shared__ int64_t s_scan[kThreads];
  __shared__ int64_t s_carry;
  const int tid = threadIdx.x;
  for (int64_t t = tid; t < n_tiles; t += kThreads) {
    map[2 * t] = 0;
    map[2 * t + 1] = kSpareTile;
  }
  if (tid == 0) s_carry = 0;
  __syncthreads();
  const auto clamp = [m](int64_t x) { return x < 0 ? int64_t{0} : (x > m ? m : x); };
  // Parts 0..groups-1 are the groups, part `groups` the tail [offs[-1], m).
  for (int64_t base = 0; base <= groups; base += kThreads) {
    const int64_t i = base + tid;
    int64_t start = 0, tiles = 0;
    if (i <= groups) {
      start = i > 0 ? clamp(offs[i - 1]) : 0;
      const int64_t end = i < groups ? clamp(offs[i]) : m;
      tiles = end > start ? (end - start + kBlockM - 1) / kBlockM : 0;
    }
    s_scan[tid] = tiles;
    __syncthreads();
    for (int d = 1; d < kThreads; d <<= 1) {  // inclusive scan (Hillis-Steele)
      const int64_t x = tid >= d ? s_scan[tid - d] : 0;
      __syncthreads();
      s_scan[tid] += x;
      __syncthreads();
    }
    const int64_t first = s_carry + s_scan[tid] - tiles;
    // Offsets out of order (refused on CPU, the caller's duty on CUDA) can
    // ask for more tiles than the grid has: those are dropped, never written.
    for (int64_t j = 0; j < tiles && first + j < n_tiles; ++j) {
      map[2 * (first + j)] = static_cast<int32_t>(start + j * kBlockM);
      map[2 * (first + j) + 1] = i < groups ? static_cast<int32_t>(i) : kTailTile;
    }
    __syncthreads();  // every thread has read s_carry
    if (tid == kThreads - 1) s_carry += s_scan[tid];
    __syncthreads();
  }
}

// The block's tile: rows [row0, row0 + rows) of group `group`, columns
// [n0, n0 + kBlockN) of C.
struct Tile {
  int group;
  int64_t row0;
  int rows;
  int64_t n0;
};

__device__ __forceinline__ Tile tile_of(const GemmParams& p) {
  const int32_t* e = p.tile_map + 2 * static_cast<int64_t>(blockIdx.x);
  Tile t;
  t.row0 = e[0];
  t.group = e[1];
  t.n0 = static_cast<int64_t>(blockIdx.y) * kBlockN;
  int64_t end = p.m;
  if (t.group >= 0) {
    end = p.offs[t.group];
    end = end < 0 ? 0 : (end > p.m ? p.m : end);
  }
  const int64_t rows = end - t.row0;
  t.rows = rows < 0 ? 0 : (rows > kBlockM ? kBlockM : static_cast<int>(rows));
  return t;
}

// Zeros over the tile's rows and columns (a tail tile).
template <typename T>
__device__ __forceinline__ void zero_tile(const GemmParams& p, const Tile& t, int64_t n_out) {
  T* c = static_cast<T*>(p.c);
  const T zero = from_f32<T>(0.f);
  for (int i = threadIdx.x; i < kBlockM * kBlockN; i += kThreads) {
    const int r = i / kBlockN, col = i % kBlockN;
    if (r < t.rows && t.n0 + col < n_out) c[(t.row0 + r) * n_out + t.n0 + col] = zero;
  }
}

// The row of a that tile row r reads, or -1 past the group's rows.
__device__ __forceinline__ int64_t source_row(const GemmParams& p, const Tile& t, int r) {
  if (r >= t.rows) return -1;
  return p.gather ? p.gather[t.row0 + r] : t.row0 + r;
}

template <typename T, bool kTransB, bool kGated>
__global__ void __launch_bounds__(kThreads) moe_gemm_kernel(const GemmParams p) {
  constexpr int kHalves = kGated ? 2 : 1;
  constexpr int kAChunks = kBlockK / 8;                    // A tile rows: 4 chunks
  constexpr int kBChunks = kTransB ? kBlockK / 8 : kBlockN / 8;  // n-major 4, k-major 8
  constexpr int kN = kBlockN / 8;                          // n-tiles per warp
  // uint16_t storage: a static array of T would be dynamically initialised
  // in host mode (__half has a constructor there), a write the race check sees.
  __shared__ __align__(16) uint16_t sA_[2][kBlockM * kBlockK];
  __shared__ __align__(16) uint16_t sB_[2][kHalves][kBlockK * kBlockN];
  __shared__ int64_t s_src[kBlockM];
  const auto sA = [&](int buf) { return reinterpret_cast<T*>(sA_[buf]); };
  const auto sB = [&](int buf, int h) { return reinterpret_cast<T*>(sB_[buf][h]); };

  const Tile tile = tile_of(p);
  const int64_t n_cols = kGated ? p.n / 2 : p.n;  // valid columns of each half (= C's)
  if (tile.group == kSpareTile || tile.n0 >= n_cols) return;
  if (tile.group == kTailTile) {
    zero_tile<T>(p, tile, n_cols);
    return;
  }
  if (threadIdx.x < kBlockM) s_src[threadIdx.x] = source_row(p, tile, threadIdx.x);
  __syncthreads();

  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b) + static_cast<int64_t>(tile.group) * p.k * p.n;
  const int64_t K = p.k, N = p.n;
  const int tid = threadIdx.x;

  // cp.async of k-step s into buffer s % 2 (not committed).
  const auto load_step = [&](int s) {
    const int64_t k0 = static_cast<int64_t>(s) * kBlockK;
    const int buf = s & 1;
    for (int i = tid; i < kBlockM * kAChunks; i += kThreads) {
      const int r = i / kAChunks, c = i % kAChunks;
      const int64_t src = s_src[r], col = k0 + c * 8;
      const bool ok = src >= 0 && col < K;
      cp_async_16(sA(buf) + swz<kAChunks>(r, c), ok ? a + src * K + col : a, ok ? 16u : 0u);
    }
    TFK_UNROLL
    for (int h = 0; h < kHalves; ++h) {
      const int64_t nbase = tile.n0 + h * n_cols;  // the up half starts at column n / 2
      for (int i = tid; i < kBlockK * kBlockN / 8; i += kThreads) {
        const int r = i / kBChunks, c = i % kBChunks;
        bool ok;
        const T* src;
        if constexpr (kTransB) {  // b[g] is (N, K): tile rows are columns of C
          ok = tile.n0 + r < n_cols && k0 + c * 8 < K;
          src = b + (nbase + r) * K + k0 + c * 8;
        } else {  // b[g] is (K, N): tile rows are k
          ok = k0 + r < K && tile.n0 + c * 8 < n_cols;
          src = b + (k0 + r) * N + nbase + c * 8;
        }
        cp_async_16(sB(buf, h) + swz<kBChunks>(r, c), ok ? src : b, ok ? 16u : 0u);
      }
    }
  };

  const int warp = tid / 32, lane = lane_id(), g = lane >> 2, t = lane & 3;
  float acc[kHalves][kN][4] = {};
  const int steps = static_cast<int>((K + kBlockK - 1) / kBlockK);
  if (steps > 0) load_step(0);
  cp_async_commit();
  for (int s = 0; s < steps; ++s) {
    if (s + 1 < steps) {
      load_step(s + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int buf = s & 1;
    TFK_UNROLL
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      uint32_t af[4];
      load_a<kAChunks>(af, sA(buf), warp * 16, kk);
      TFK_UNROLL
      for (int h = 0; h < kHalves; ++h) {
        TFK_UNROLL
        for (int n = 0; n < kN; n += 2) {
          uint32_t bf[4];
          if constexpr (kTransB) load_b_nmajor<kBChunks>(bf, sB(buf, h), 8 * n, kk);
          else load_b_kmajor<kBChunks>(bf, sB(buf, h), 16 * kk, 8 * n);
          Elem<T>::mma(acc[h][n], af, bf[0], bf[1]);
          Elem<T>::mma(acc[h][n + 1], af, bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // the next step's prefetch overwrites this buffer
  }
  cp_async_wait<0>();  // nothing in flight at exit (K = 0)

  T* c = static_cast<T*>(p.c);
  TFK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (row >= tile.rows) continue;
    const int64_t grow = tile.row0 + row;
    const float scale = p.row_scale ? p.row_scale[grow] : 1.f;
    TFK_UNROLL
    for (int n = 0; n < kN; ++n) {
      const int64_t col = tile.n0 + 8 * n + 2 * t;
      if (col >= n_cols) continue;
      float x0 = acc[0][n][2 * r], x1 = acc[0][n][2 * r + 1];
      if constexpr (kGated) {
        x0 = activate(p.act, x0) * acc[kHalves - 1][n][2 * r];
        x1 = activate(p.act, x1) * acc[kHalves - 1][n][2 * r + 1];
      }
      store2(c + grow * n_cols + col, x0 * scale, x1 * scale);
    }
  }
}

// fp32: the same tiles on FMA. Thread (ty, tx) = (tid / 16, tid % 16) owns
// rows ty + 8i (i < 8) and columns tx + 16j (j < 4) of the tile.
template <bool kTransB, bool kGated>
__global__ void __launch_bounds__(kThreads) moe_gemm_f32_kernel(const GemmParams p) {
  constexpr int kHalves = kGated ? 2 : 1;
  constexpr int kBK = 16;
  __shared__ float sA[kBK][kBlockM];  // transposed: [k][row]
  __shared__ float sB[kHalves][kBK][kBlockN];
  __shared__ int64_t s_src[kBlockM];

  const Tile tile = tile_of(p);
  const int64_t n_cols = kGated ? p.n / 2 : p.n;
  if (tile.group == kSpareTile || tile.n0 >= n_cols) return;
  if (tile.group == kTailTile) {
    zero_tile<float>(p, tile, n_cols);
    return;
  }
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  if (tid < kBlockM) s_src[tid] = source_row(p, tile, tid);
  __syncthreads();
  const float* a = static_cast<const float*>(p.a);
  const float* b = static_cast<const float*>(p.b) + static_cast<int64_t>(tile.group) * p.k * p.n;
  const int64_t K = p.k, N = p.n;

  float acc[kHalves][8][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    for (int i = tid; i < kBK * kBlockM; i += kThreads) {
      const int r = i / kBK, kc = i % kBK;
      const int64_t src = s_src[r];
      sA[kc][r] = src >= 0 && k0 + kc < K ? a[src * K + k0 + kc] : 0.f;
    }
    TFK_UNROLL
    for (int h = 0; h < kHalves; ++h) {
      const int64_t nbase = tile.n0 + h * n_cols;
      for (int i = tid; i < kBK * kBlockN; i += kThreads) {
        int kc, nc;
        if constexpr (kTransB) kc = i % kBK, nc = i / kBK;
        else kc = i / kBlockN, nc = i % kBlockN;
        const bool ok = k0 + kc < K && tile.n0 + nc < n_cols;
        sB[h][kc][nc] = !ok ? 0.f : kTransB ? b[(nbase + nc) * K + k0 + kc] : b[(k0 + kc) * N + nbase + nc];
      }
    }
    __syncthreads();
    TFK_UNROLL_N(4)
    for (int kc = 0; kc < kBK; ++kc) {
      float av[8], bv[kHalves][4];
      TFK_UNROLL
      for (int i = 0; i < 8; ++i) av[i] = sA[kc][ty + 8 * i];
      TFK_UNROLL
      for (int h = 0; h < kHalves; ++h) {
        TFK_UNROLL
        for (int j = 0; j < 4; ++j) bv[h][j] = sB[h][kc][tx + 16 * j];
      }
      TFK_UNROLL
      for (int h = 0; h < kHalves; ++h) {
        TFK_UNROLL
        for (int i = 0; i < 8; ++i) {
          TFK_UNROLL
          for (int j = 0; j < 4; ++j) acc[h][i][j] = fmaf(av[i], bv[h][j], acc[h][i][j]);
        }
      }
    }
    __syncthreads();
  }

  float* c = static_cast<float*>(p.c);
  TFK_UNROLL
  for (int i = 0; i < 8; ++i) {
    const int row = ty + 8 * i;
    if (row >= tile.rows) continue;
    const int64_t grow = tile.row0 + row;
    const float scale = p.row_scale ? p.row_scale[grow] : 1.f;
    TFK_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int64_t col = tile.n0 + tx + 16 * j;
      if (col >= n_cols) continue;
      float x = acc[0][i][j];
      if constexpr (kGated) x = activate(p.act, x) * acc[kHalves - 1][i][j];
      c[grow * n_cols + col] = x * scale;
    }
  }
}

struct Launcher {
  template <bool kTransB, bool kGated, typename T>
  static void run_one(const GemmParams& p, dim3 grid, stream_t stream) {
    if constexpr (std::is_same<T, float>::value) {
      launch(moe_gemm_f32_kernel<kTransB, kGated>, grid, dim3(kThreads), 0, stream, p);
    } else {
      launch(moe_gemm_kernel<T, kTransB, kGated>, grid, dim3(kThreads), 0, stream, p);
    }
  }

  template <typename T>
  static void run(const GemmParams& p, void* stream) {
    const auto s = static_cast<stream_t>(stream);
    const int64_t n_tiles = max_row_tiles(p.m, p.groups);
    launch(moe_tile_map_kernel, dim3(1), dim3(kThreads), 0, s, p.offs, p.groups, p.m, p.tile_map, n_tiles);
    const int64_t n_out = p.act == Act::kNone ? p.n : p.n / 2;
    const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>((n_out + kBlockN - 1) / kBlockN));
    const bool gated = p.act != Act::kNone;
    if (p.trans_b) gated ? run_one<true, true, T>(p, grid, s) : run_one<true, false, T>(p, grid, s);
    else gated ? run_one<false, true, T>(p, grid, s) : run_one<false, false, T>(p, grid, s);
  }
};

}  // namespace gemm

void grouped_gemm_launch(const GemmParams& p, void* stream) {
  const int64_t n_out = p.act == Act::kNone ? p.n : p.n / 2;
  if (p.m <= 0 || n_out <= 0) return;
  dispatch<gemm::Launcher>(p, stream);
}

}  // namespace moe
}  // namespace tfk
