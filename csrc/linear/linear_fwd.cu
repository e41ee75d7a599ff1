// Linear-attention forward (csrc/linear/linear.h), on mapped features or with
// the feature map, the key padding and V's column of ones applied on load
// (the "softmax" map: keys by the per-channel statistics of linear_stats.cu,
// each query row by a softmax over its channels once the tile is loaded):
//
//   causal, chunked (kChunk positions a chunk):
//       O_n = Q_n S_n + tril(Q_n K_n^T) V'_n,   S_{n+1} = S_n + K_n^T V'_n
//   non-causal:  S = S'_0 + K^T V' (all key chunks, in order), then O = Q S.
//
// A block per (batch, KV head, kBlockE value columns): it walks the chunks in
// order carrying its D x kBlockE slice of the state in fp32 shared memory, so
// the sum is deterministic (no atomics, one fixed order) and every output
// column tile is independent. The G query heads of the KV head are folded in:
// the chunk's K and V' tiles are loaded once and used by each of the G heads
// before the state moves on.
//
// Per (chunk, query head): A = Q_n K_n^T masked (j > i -> 0) into shared
// memory as fp32 (fp16/bf16: mma.sync m16n8k16 with fp32 accumulation, a warp
// per 16 x 16 quarter of the 32 x 32 tile; fp32: FMA), then
// O = A V' + Q S on FMA in fp32 (A and S stay fp32: rounding them to 16 bits
// would add an error as large as the inputs' own, and S can pass fp16's
// range). The state update K_n^T V'_n takes 16-bit operands as they are:
// mma.sync for fp16/bf16 (fp32 accumulation), FMA in position order for fp32.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "common/elem.cuh"
#include "common/tfk_cuda.h"
#include "common/warp_primitives.h"
#include "linear/linear.h"

namespace tfk {
namespace linear {
// Named (not anonymous) so kernel names in ptxas reports are stable.
namespace fwd {

constexpr int kC = kChunk;

__host__ __device__ inline int round16(int x) { return (x + 15) / 16 * 16; }

// Row stride (elements) of the Q and K tiles: 16-bit rows padded by 8 so the
// eight rows of an mma fragment load fall in distinct banks; fp32 rows by 1.
template <typename T>
__host__ __device__ inline int tile_ld(int dp) {
  return std::is_same<T, float>::value ? dp + 1 : dp + 8;
}

// Row stride of the V' tile: 16-bit rows padded to 144 bytes (16-byte aligned
// for ldmatrix, the eight rows of one phase in distinct banks).
template <typename T>
__host__ __device__ constexpr int v_ld() {
  return std::is_same<T, float>::value ? kBlockE : kBlockE + 8;
}

struct Smem {
  int64_t s, a, q, k, v, total;  // byte offsets, each 16-byte aligned
};

template <typename T>
__host__ __device__ inline Smem smem_layout(int dim) {
  const int dp = round16(dim);
  const auto up = [](int64_t x) { return (x + 15) / 16 * 16; };
  Smem m;
  m.s = 0;
  m.a = m.s + up(int64_t{dp} * kBlockE * 4);
  m.q = m.a + up(int64_t{kC} * (kC + 1) * 4);
  m.k = m.q + up(int64_t{kC} * tile_ld<T>(dp) * sizeof(T));
  m.v = m.k + up(int64_t{kC} * tile_ld<T>(dp) * sizeof(T));
  m.total = m.v + up(int64_t{kC} * v_ld<T>() * sizeof(T));
  return m;
}

// Two adjacent 16-bit elements as one .b32 (the mma's operand register).
template <typename T>
__device__ __forceinline__ uint32_t word(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t r;
  memcpy(&r, p, sizeof r);
  return r;
#endif
}

// The V' tile: rows [pos0, pos0 + kC) x columns [e0, e0 + kBlockE) of V' (row
// stride vw in memory), zero past `len` rows and `ecols` columns. V' is v
// itself (vw = E), or [v, 1] with `ones` (vw = E - 1: column E - 1 is 1).
template <typename T>
__device__ __forceinline__ void load_values(T* tile, const T* src, int64_t pos0, int64_t len, int vw, int e0,
                                            int ecols) {
  for (int i = threadIdx.x; i < kC * kBlockE; i += kThreads) {
    const int r = i / kBlockE, c = i % kBlockE, col = e0 + c;
    T x = from_f32<T>(0.f);
    if (pos0 + r < len && c < ecols) x = col < vw ? src[(pos0 + r) * vw + col] : from_f32<T>(1.f);
    tile[r * v_ld<T>() + c] = x;
  }
}

// kSoftmax maps elsewhere (softmax_rows, or the key statistics): x here.
__device__ __forceinline__ float feature(float x, FeatureMap f) {
  if (f == FeatureMap::kElu1) return x > 0.f ? x + 1.f : expf(x);
  if (f == FeatureMap::kRelu) return fmaxf(x, 0.f);
  return x;
}

// The Q or K tile (rows [0, kC) x cols [0, dp)) from rows [pos0, pos0 + kC)
// of src (row stride dim), mapped by f in fp32; zero past `len` rows, past
// `dim` columns and on rows whose keep[pos] is 0 (keep null: all kept).
// kstat (the softmax map's keys: this KV head's max[dim], inv[dim]) maps
// column c as exp(x - max[c]) * inv[c] instead.
template <typename T>
__device__ __forceinline__ void load_features(T* tile, int ld, const T* src, int64_t pos0, int64_t len, int dim,
                                              int dp, FeatureMap f, const uint8_t* keep,
                                              const float* kstat = nullptr) {
  for (int i = threadIdx.x; i < kC * dp; i += kThreads) {
    const int r = i / dp, c = i % dp;
    const int64_t pos = pos0 + r;
    const bool ok = pos < len && c < dim && (keep == nullptr || keep[pos] != 0);
    float y = 0.f;
    if (ok) {
      const float x = to_f32(src[pos * dim + c]);
      y = kstat ? expf(x - kstat[c]) * kstat[dim + c] : feature(x, f);
    }
    tile[r * ld + c] = from_f32<T>(y);
  }
}

// The softmax map of a loaded (raw) Q tile: each row r < len - pos0 becomes
// softmax(row[0, dim)) in fp32, rounded to T. Four threads per row (lanes
// 4r .. 4r + 3 of one warp), channels strided by 4, combined by shuffles
// (each lane ends with the same max and sum). Call between barriers.
template <typename T>
__device__ __forceinline__ void softmax_rows(T* tile, int ld, int64_t pos0, int64_t len, int dim) {
  static_assert(kThreads == 4 * kC, "softmax_rows: four threads per row");
  const int r = threadIdx.x / 4, t = threadIdx.x % 4;
  T* row = tile + r * ld;
  float m = -INFINITY;
  for (int c = t; c < dim; c += 4) m = fmaxf(m, to_f32(row[c]));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
  float sum = 0.f;
  for (int c = t; c < dim; c += 4) sum += expf(to_f32(row[c]) - m);
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  if (pos0 + r < len) {
    for (int c = t; c < dim; c += 4) row[c] = from_f32<T>(expf(to_f32(row[c]) - m) / sum);
  }
}

// sA = Q K^T (kC x kC, fp32), zero above the diagonal when causal.
template <typename T, bool kCausal>
__device__ __forceinline__ void qk_tile(float* sA, const T* sQ, const T* sK, int ld, int dim, int dp) {
  if constexpr (std::is_same<T, float>::value) {
    for (int i = threadIdx.x; i < kC * kC; i += kThreads) {
      const int r = i / kC, c = i % kC;
      float x = 0.f;
      if (!kCausal || c <= r) {
        for (int d = 0; d < dim; ++d) x = fmaf(sQ[r * ld + d], sK[c * ld + d], x);
      }
      sA[r * (kC + 1) + c] = x;
    }
  } else {
    // Warp w: rows [16 (w / 2), +16), columns [16 (w % 2), +16) as two n-tiles.
    const int warp = threadIdx.x / 32, lane = lane_id(), g = lane >> 2, t = lane & 3;
    const int m0 = 16 * (warp >> 1), n0 = 16 * (warp & 1);
    float acc[2][4] = {};
    for (int k0 = 0; k0 < dp; k0 += 16) {
      // A fragment: a[r] = Q[m0 + g + 8 (r & 1)][k0 + 2t + 8 (r >> 1) + {0, 1}]
      uint32_t a[4];
      TFK_UNROLL
      for (int r = 0; r < 4; ++r) a[r] = word(sQ + (m0 + g + 8 * (r & 1)) * ld + k0 + 2 * t + 8 * (r >> 1));
      TFK_UNROLL
      for (int nn = 0; nn < 2; ++nn) {
        // B = K^T (k = d, n = key): b[r] = K[n + g][k0 + 2t + 8r + {0, 1}], contiguous in K's row.
        const T* kr = sK + (n0 + 8 * nn + g) * ld + k0 + 2 * t;
        Elem<T>::mma(acc[nn], a, word(kr), word(kr + 8));
      }
    }
    TFK_UNROLL
    for (int nn = 0; nn < 2; ++nn) {
      TFK_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int r = m0 + g + 8 * (i >> 1), c = n0 + 8 * nn + 2 * t + (i & 1);
        sA[r * (kC + 1) + c] = (!kCausal || c <= r) ? acc[nn][i] : 0.f;
      }
    }
  }
}

// Min one block an SM: with the bare thread count, ptxas capped these
// kernels near 72-80 registers and spilled up to 36 bytes once the loads
// mapped features; unconstrained they take 71-114 and spill nothing.
template <typename T, bool kCausal>
__global__ void __launch_bounds__(kThreads, 1) linear_fwd_kernel(const FwdParams p) {
  const Smem lay = smem_layout<T>(p.dim);
  unsigned char* base = dynamic_smem<unsigned char>();
  float* sS = reinterpret_cast<float*>(base + lay.s);
  float* sA = reinterpret_cast<float*>(base + lay.a);
  T* sQ = reinterpret_cast<T*>(base + lay.q);
  T* sK = reinterpret_cast<T*>(base + lay.k);
  T* sV = reinterpret_cast<T*>(base + lay.v);

  const int D = p.dim, E = p.vdim, dp = round16(D), ld = tile_ld<T>(dp);
  const int64_t bh = blockIdx.x;  // b * Hkv + kv head
  const int64_t b = bh / p.kv_heads, kvh = bh % p.kv_heads;
  const int64_t G = p.heads / p.kv_heads;
  const int e0 = blockIdx.y * kBlockE;
  const int ecols = E - e0 < kBlockE ? E - e0 : kBlockE;  // valid columns of this tile
  const int tid = threadIdx.x;

  const int vw = p.ones ? E - 1 : E;  // columns of v in memory
  const T* kp = static_cast<const T*>(p.k) + bh * p.len_k * D;
  const T* vp = static_cast<const T*>(p.v) + bh * p.len_k * vw;
  const uint8_t* keep = p.keep ? p.keep + b * p.len_k : nullptr;
  // The softmax map's key statistics (non-causal only: the causal kernel never maps by them).
  const float* kstat = !kCausal && p.fmap == FeatureMap::kSoftmax ? p.kstats + bh * 2 * D : nullptr;
  float* const st = p.s + bh * D * E;

  // The state slice: S'_0 or zeros (rows past D stay zero; they are never read).
  for (int i = tid; i < dp * kBlockE; i += kThreads) {
    const int d = i / kBlockE, c = i % kBlockE;
    sS[i] = (p.s0 && d < D && c < ecols) ? p.s0[bh * D * E + int64_t{d} * E + e0 + c] : 0.f;
  }

  // The output tile: thread (ty, tx) owns rows ty + 8 ii and columns tx + 16 jj.
  const int tx = tid % 16, ty = tid / 16;
  const auto out_tile = [&](int64_t h, int64_t pos0, bool intra) {
    float acc[4][4] = {};
    for (int d = 0; d < D; ++d) {  // Q S: the state before this chunk
      float qv[4], sv[4];
      TFK_UNROLL
      for (int ii = 0; ii < 4; ++ii) qv[ii] = to_f32(sQ[(ty + 8 * ii) * ld + d]);
      TFK_UNROLL
      for (int jj = 0; jj < 4; ++jj) sv[jj] = sS[d * kBlockE + tx + 16 * jj];
      TFK_UNROLL
      for (int ii = 0; ii < 4; ++ii) {
        TFK_UNROLL
        for (int jj = 0; jj < 4; ++jj) acc[ii][jj] = fmaf(qv[ii], sv[jj], acc[ii][jj]);
      }
    }
    if (intra) {  // tril(Q K^T) V': A is zero above the diagonal
      for (int j = 0; j < kC; ++j) {
        float av[4], vv[4];
        TFK_UNROLL
        for (int ii = 0; ii < 4; ++ii) av[ii] = sA[(ty + 8 * ii) * (kC + 1) + j];
        TFK_UNROLL
        for (int jj = 0; jj < 4; ++jj) vv[jj] = to_f32(sV[j * v_ld<T>() + tx + 16 * jj]);
        TFK_UNROLL
        for (int ii = 0; ii < 4; ++ii) {
          TFK_UNROLL
          for (int jj = 0; jj < 4; ++jj) acc[ii][jj] = fmaf(av[ii], vv[jj], acc[ii][jj]);
        }
      }
    }
    float* op = p.o + (b * p.heads + h) * p.len_q * E + e0;
    TFK_UNROLL
    for (int ii = 0; ii < 4; ++ii) {
      const int64_t pos = pos0 + ty + 8 * ii;
      if (pos >= p.len_q) continue;
      TFK_UNROLL
      for (int jj = 0; jj < 4; ++jj) {
        const int c = tx + 16 * jj;
        if (c < ecols) op[pos * E + c] = acc[ii][jj];
      }
    }
  };

  // S += K_n^T V'_n. fp32: one thread per state element, positions in order.
  // fp16/bf16: U = K_n^T V'_n on mma.sync (exact products, fp32 sums; warp w
  // takes the 16-row slices w, w + 4, ... of the state, all kBlockE columns;
  // K^T and V' fragments by ldmatrix.trans from the row-major tiles), then
  // each thread adds its fragment's elements to the state.
  const auto update_state = [&]() {
    if constexpr (std::is_same<T, float>::value) {
      for (int i = tid; i < D * kBlockE; i += kThreads) {
        const int d = i / kBlockE, c = i % kBlockE;
        float x = sS[i];
        for (int j = 0; j < kC; ++j) x = fmaf(sK[j * ld + d], sV[j * kBlockE + c], x);
        sS[i] = x;
      }
    } else {
      const int warp = tid / 32, l = lane_id(), g = l >> 2, t = l & 3;
      for (int m0 = 16 * warp; m0 < dp; m0 += 16 * (kThreads / 32)) {
        float acc[kBlockE / 8][4] = {};
        TFK_UNROLL
        for (int k0 = 0; k0 < kC; k0 += 16) {
          // A = K^T rows [m0, +16) (d), columns [k0, +16) (positions): sK is k-major.
          uint32_t a[4];
          ldmatrix_x4_trans(a, sK + (k0 + (l & 7) + ((l >> 4) << 3)) * ld + m0 + 8 * ((l >> 3) & 1));
          TFK_UNROLL
          for (int n = 0; n < kBlockE / 8; n += 2) {
            // B = V' rows [k0, +16), columns [8n, 8n + 16): n-tiles n and n + 1.
            uint32_t b[4];
            ldmatrix_x4_trans(b, sV + (k0 + (l & 15)) * v_ld<T>() + 8 * n + 8 * (l >> 4));
            Elem<T>::mma(acc[n], a, b[0], b[1]);
            Elem<T>::mma(acc[n + 1], a, b[2], b[3]);
          }
        }
        TFK_UNROLL
        for (int n = 0; n < kBlockE / 8; ++n) {
          TFK_UNROLL
          for (int i = 0; i < 4; ++i) sS[(m0 + g + 8 * (i >> 1)) * kBlockE + 8 * n + 2 * t + (i & 1)] += acc[n][i];
        }
      }
    }
  };

  const auto load_kv = [&](int64_t pos0) {
    load_features(sK, ld, kp, pos0, p.len_k, D, dp, p.fmap, keep, kstat);
    load_values(sV, vp, pos0, p.len_k, vw, e0, ecols);
  };
  const auto load_q = [&](int64_t h, int64_t pos0) {
    const T* qp = static_cast<const T*>(p.q) + (b * p.heads + h) * p.len_q * D;
    load_features(sQ, ld, qp, pos0, p.len_q, D, dp, p.fmap, nullptr);
    if (!kCausal && p.fmap == FeatureMap::kSoftmax) {
      __syncthreads();  // the raw rows in place
      softmax_rows(sQ, ld, pos0, p.len_q, D);
    }
  };

  if constexpr (kCausal) {
    for (int64_t pos0 = 0; pos0 < p.len_q; pos0 += kC) {
      load_kv(pos0);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        load_q(h, pos0);
        __syncthreads();  // Q, K, V' (and, first, the state) in place
        qk_tile<T, true>(sA, sQ, sK, ld, D, dp);
        __syncthreads();  // A complete
        out_tile(h, pos0, true);
        __syncthreads();  // Q and A read before the next head overwrites them
      }
      update_state();
      __syncthreads();  // K, V' read and the state updated before the next chunk
    }
  } else {
    for (int64_t pos0 = 0; pos0 < p.len_k; pos0 += kC) {
      load_kv(pos0);
      __syncthreads();
      update_state();
      __syncthreads();
    }
    for (int64_t pos0 = 0; pos0 < p.len_q; pos0 += kC) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        load_q(h, pos0);
        __syncthreads();
        out_tile(h, pos0, false);
        __syncthreads();
      }
    }
  }
  __syncthreads();  // the state complete (an empty sequence: S'_0 in place)
  for (int i = tid; i < D * kBlockE; i += kThreads) {
    const int d = i / kBlockE, c = i % kBlockE;
    if (c < ecols) st[int64_t{d} * E + e0 + c] = sS[i];
  }
}

struct Launcher {
  template <typename T>
  static void run(const FwdParams& p, void* stream) {
    const dim3 grid(static_cast<unsigned>(p.batch * p.kv_heads), static_cast<unsigned>((p.vdim + kBlockE - 1) / kBlockE));
    const size_t smem = static_cast<size_t>(smem_layout<T>(p.dim).total);
    const auto s = static_cast<stream_t>(stream);
    if (p.causal) launch(linear_fwd_kernel<T, true>, grid, dim3(kThreads), smem, s, p);
    else launch(linear_fwd_kernel<T, false>, grid, dim3(kThreads), smem, s, p);
  }
};

}  // namespace fwd

int64_t fwd_smem_bytes(const FwdParams& p) {
  switch (p.dtype) {
    case Dtype::kHalf: return fwd::smem_layout<__half>(p.dim).total;
    case Dtype::kBFloat16: return fwd::smem_layout<__nv_bfloat16>(p.dim).total;
    default: return fwd::smem_layout<float>(p.dim).total;
  }
}

void fwd_launch(const FwdParams& p, void* stream) {
  if (p.batch * p.kv_heads <= 0 || p.vdim <= 0) return;
  if (p.fmap == FeatureMap::kSoftmax && (p.causal || p.kstats == nullptr)) {
    throw std::invalid_argument("linear fwd: the softmax map is non-causal only and needs kstats");
  }
  switch (p.dtype) {
    case Dtype::kHalf: fwd::Launcher::run<__half>(p, stream); break;
    case Dtype::kBFloat16: fwd::Launcher::run<__nv_bfloat16>(p, stream); break;
    default: fwd::Launcher::run<float>(p, stream); break;
  }
}

}  // namespace linear
}  // namespace tfk
