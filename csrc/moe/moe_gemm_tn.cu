// Per-group A^T B of the MoE weight gradients: c[g] = A[rows_g]^T @ B[rows_g]
// (csrc/moe/moe.h), c (G, K, N) in the inputs' dtype, fp32 accumulation.
//
// A block of 4 warps per (group, 64-row tile of K, 64-column tile of N)
// walks its group's rows in steps of 32, in order (deterministic, no
// atomics): 16-bit inputs stream through two shared buffers by cp.async, A's
// rows through gather_a, and feed mma.sync m16n8k16 with A^T's fragments read
// by ldmatrix.trans; each warp owns 16 rows of K x 64 columns. fp32 inputs
// take an FMA kernel with the same tiles (steps of 16 rows). An empty group
// writes zeros.
#include "moe/moe.h"
#include "moe/moe_tile.cuh"

namespace tfk {
namespace moe {
namespace gemm_tn {

constexpr int kTileK = 64;  // rows of c[g] (columns of a) per block
constexpr int kTileN = 64;  // columns of c[g] per block
constexpr int kStep = 32;   // rows of the reduction per step (16-bit)

// The rows [start, end) of the block's group, offsets clamped to [0, m].
__device__ __forceinline__ void group_rows(const GemmTnParams& p, int64_t g, int64_t& start, int64_t& end) {
  const auto clamp = [&p](int64_t x) { return x < 0 ? int64_t{0} : (x > p.m ? p.m : x); };
  start = g > 0 ? clamp(p.offs[g - 1]) : 0;
  end = clamp(p.offs[g]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) moe_gemm_tn_kernel(const GemmTnParams p) {
  constexpr int kChunks = 8;  // tile rows of 64 elements
  // uint16_t storage: see moe_gemm_kernel.
  __shared__ __align__(16) uint16_t sA_[2][kStep * kTileK];
  __shared__ __align__(16) uint16_t sB_[2][kStep * kTileN];
  const auto sA = [&](int buf) { return reinterpret_cast<T*>(sA_[buf]); };
  const auto sB = [&](int buf) { return reinterpret_cast<T*>(sB_[buf]); };
  const int64_t g = blockIdx.x, k0 = static_cast<int64_t>(blockIdx.y) * kTileK,
                n0 = static_cast<int64_t>(blockIdx.z) * kTileN;
  const int64_t K = p.k, N = p.n;
  int64_t start, end;
  group_rows(p, g, start, end);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int tid = threadIdx.x;

  const auto load_step = [&](int s) {
    const int64_t r0 = start + static_cast<int64_t>(s) * kStep;
    const int buf = s & 1;
    for (int i = tid; i < kStep * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int64_t row = r0 + r;
      const bool in = row < end;
      const int64_t src = in ? (p.gather_a ? p.gather_a[row] : row) : 0;
      const bool ok_a = in && k0 + c * 8 < K, ok_b = in && n0 + c * 8 < N;
      cp_async_16(sA(buf) + swz<kChunks>(r, c), ok_a ? a + src * K + k0 + c * 8 : a, ok_a ? 16u : 0u);
      cp_async_16(sB(buf) + swz<kChunks>(r, c), ok_b ? b + row * N + n0 + c * 8 : b, ok_b ? 16u : 0u);
    }
  };

  const int warp = tid / 32, lane = lane_id(), gq = lane >> 2, t = lane & 3;
  constexpr int kN = kTileN / 8;
  float acc[kN][4] = {};
  const int steps = static_cast<int>((end - start + kStep - 1) / kStep);
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
    for (int kk = 0; kk < kStep / 16; ++kk) {
      uint32_t af[4];
      load_a_trans<kChunks>(af, sA(buf), 16 * kk, warp * 16);
      TFK_UNROLL
      for (int n = 0; n < kN; n += 2) {
        uint32_t bf[4];
        load_b_kmajor<kChunks>(bf, sB(buf), 16 * kk, 8 * n);
        Elem<T>::mma(acc[n], af, bf[0], bf[1]);
        Elem<T>::mma(acc[n + 1], af, bf[2], bf[3]);
      }
    }
    __syncthreads();  // the next step's prefetch overwrites this buffer
  }
  cp_async_wait<0>();  // nothing in flight at exit (an empty group)

  T* c = static_cast<T*>(p.c) + g * K * N;
  TFK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t row = k0 + warp * 16 + gq + 8 * r;
    if (row >= K) continue;
    TFK_UNROLL
    for (int n = 0; n < kN; ++n) {
      const int64_t col = n0 + 8 * n + 2 * t;
      if (col < N) store2(c + row * N + col, acc[n][2 * r], acc[n][2 * r + 1]);
    }
  }
}

// fp32 on FMA: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 8i
// (i < 8) of K and columns tx + 16j (j < 4) of N.
__global__ void __launch_bounds__(kThreads) moe_gemm_tn_f32_kernel(const GemmTnParams p) {
  constexpr int kRows = 16;
  __shared__ float sA[kRows][kTileK];
  __shared__ float sB[kRows][kTileN];
  const int64_t g = blockIdx.x, k0 = static_cast<int64_t>(blockIdx.y) * kTileK,
                n0 = static_cast<int64_t>(blockIdx.z) * kTileN;
  const int64_t K = p.k, N = p.n;
  int64_t start, end;
  group_rows(p, g, start, end);
  const float* a = static_cast<const float*>(p.a);
  const float* b = static_cast<const float*>(p.b);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  float acc[8][4] = {};
  for (int64_t r0 = start; r0 < end; r0 += kRows) {
    for (int i = tid; i < kRows * kTileK; i += kThreads) {
      const int r = i / kTileK, c = i % kTileK;
      const int64_t row = r0 + r;
      const bool in = row < end;
      const int64_t src = in ? (p.gather_a ? p.gather_a[row] : row) : 0;
      sA[r][c] = in && k0 + c < K ? a[src * K + k0 + c] : 0.f;
      sB[r][c] = in && n0 + c < N ? b[row * N + n0 + c] : 0.f;
    }
    __syncthreads();
    TFK_UNROLL_N(4)
    for (int r = 0; r < kRows; ++r) {
      float av[8], bv[4];
      TFK_UNROLL
      for (int i = 0; i < 8; ++i) av[i] = sA[r][ty + 8 * i];
      TFK_UNROLL
      for (int j = 0; j < 4; ++j) bv[j] = sB[r][tx + 16 * j];
      TFK_UNROLL
      for (int i = 0; i < 8; ++i) {
        TFK_UNROLL
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  float* c = static_cast<float*>(p.c) + g * K * N;
  TFK_UNROLL
  for (int i = 0; i < 8; ++i) {
    const int64_t row = k0 + ty + 8 * i;
    if (row >= K) continue;
    TFK_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col < N) c[row * N + col] = acc[i][j];
    }
  }
}

struct Launcher {
  template <typename T>
  static void run(const GemmTnParams& p, void* stream) {
    const dim3 grid(static_cast<unsigned>(p.groups), static_cast<unsigned>((p.k + kTileK - 1) / kTileK),
                    static_cast<unsigned>((p.n + kTileN - 1) / kTileN));
    if constexpr (std::is_same<T, float>::value) {
      launch(moe_gemm_tn_f32_kernel, grid, dim3(kThreads), 0, static_cast<stream_t>(stream), p);
    } else {
      launch(moe_gemm_tn_kernel<T>, grid, dim3(kThreads), 0, static_cast<stream_t>(stream), p);
    }
  }
};

}  // namespace gemm_tn

void grouped_gemm_tn_launch(const GemmTnParams& p, void* stream) {
  if (p.groups <= 0 || p.k <= 0 || p.n <= 0) return;
  dispatch<gemm_tn::Launcher>(p, stream);
}

}  // namespace moe
}  // namespace tfk
