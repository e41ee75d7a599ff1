// Split-KV decoding attention over a KV cache (csrc/kvcache/kvcache.h).
//
// kvcache_fwd_kernel: a block of 4 warps per (batch, key head, row block,
// split), grid (B * Hkv * row blocks, splits). Its rows are the G query heads
// x Lq queries of the key head (GQA packed: a key tile is read once for the
// whole group), kRows = 16 of them per row block (one when G * Lq <= 16, the
// decoding case). The block computes its sequence's key range [lo, hi) from
// cache_seqlens on the device (call.py's key_range), cuts it into 64-key tiles
// aligned to absolute positions, and takes its split's share of them, whole
// tiles. Per tile: K and V rows are copied to shared memory by cp.async (paged
// caches: each row through block_table; rows outside [lo, hi) and columns
// past D / Dv are zero-filled, never read), each warp computes the scores of
// its 16 keys on mma.sync (16 rows x 16 keys), masks them by the band at
// absolute positions, runs its own online softmax in fp32 (log2 units) and
// accumulates P V on mma.sync. The next tile's K streams in during this
// tile's P V, its V during the next scores. At the end the 4 warps' (max, sum,
// O) merge through shared memory into the split's partial out (float32,
// normalised) and lse (natural log; -inf and out 0 for a split or row
// without an allowed key).
//
// kvcache_merge_kernel: out and lse of each row from its splits' partials by
// log-sum-exp (a split with lse -inf weighs 0; a row with none gets out 0 and
// lse -inf), out rounded to the input dtype.
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention/tile.cuh"
#include "common/elem.cuh"
#include "common/tfk_cuda.h"
#include "common/warp_primitives.h"
#include "kvcache/kvcache.h"

namespace tfk {
namespace kvcache {
// Named (not anonymous) so kernel names in ptxas reports are stable.
namespace fwd {

using attention::kLn2;
using attention::kLog2e;
using attention::quad_max;
using attention::quad_sum;
using attention::tile_offset;

constexpr int kWarps = kThreads / 32;
constexpr int kMergeThreads = 256;

// cp.async of the kBlockN cache rows j0 .. j0 + kBlockN of (batch b, key head
// hk) into a swizzled tile (row stride HD); rows outside [lo, hi) and 16-byte
// chunks past `width` columns are zero-filled without reading. Not committed.
template <int HD, typename T>
__device__ __forceinline__ void load_cache_tile(T* tile, const T* cache, int width, const Params& p, int b, int hk,
                                                int j0, int lo, int hi) {
  constexpr int kChunks = HD / 8;
  const int c = threadIdx.x % kChunks;  // the same chunk column on every row of this thread
  const bool col_ok = c * 8 < width;
  TFK_UNROLL_N(1)
  for (int r = threadIdx.x / kChunks; r < kBlockN; r += kThreads / kChunks) {
    const int j = j0 + r;
    const bool ok = col_ok && j >= lo && j < hi;
    const T* src = cache;
    if (ok) {
      const int blk = p.block_table ? p.block_table[b * p.max_pages + j / p.page] : b;
      src = cache + ((static_cast<int64_t>(blk) * p.kv_heads + hk) * p.page + j % p.page) * width + c * 8;
    }
    cp_async_16(tile + tile_offset<HD>(r, c), src, ok ? 16u : 0u);
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads) kvcache_fwd_kernel(const Params p) {
  constexpr int kChunks = HD / 8;
  constexpr int kQBytes = kRows * HD * static_cast<int>(sizeof(T));
  constexpr int kKVBytes = 2 * kBlockN * HD * static_cast<int>(sizeof(T));
  static_assert(kWarps * kRows * HD * 4 <= kKVBytes, "the warps' O must fit where K and V were");
  __shared__ __align__(16) unsigned char smem[kQBytes + kKVBytes];
  __shared__ float s_max[kWarps][kRows], s_sum[kWarps][kRows];
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = reinterpret_cast<T*>(smem + kQBytes);
  T* const sV = sK + kBlockN * HD;
  float* const sO = reinterpret_cast<float*>(smem + kQBytes);  // after the last tile: [warp][row][HD]

  const int G = p.heads / p.kv_heads, rows = G * p.lq, nrb = (rows + kRows - 1) / kRows;
  const int rb = static_cast<int>(blockIdx.x % nrb);
  const int bh = static_cast<int>(blockIdx.x / nrb);
  const int hk = bh % p.kv_heads, b = bh / p.kv_heads, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = lane_id(), g = lane >> 2, t = lane & 3;

  // The sequence's key range and this split's tiles.
  // Positions are int: the ops check capacity + kBlockN < 2^31.
  const int seqlen = p.seqlens[b] > 0 ? (p.seqlens[b] < p.capacity ? p.seqlens[b] : p.capacity) : 0;
  const int hi = seqlen + p.lq < p.capacity ? seqlen + p.lq : p.capacity;
  const int lo = p.left < 0 || seqlen < p.left ? 0 : seqlen - p.left;
  const int t0 = lo / kBlockN;
  const int ntiles = hi > lo ? (hi + kBlockN - 1) / kBlockN - t0 : 0;
  const int per = (ntiles + p.num_splits - 1) / p.num_splits;
  const int first = t0 + split * per;
  const int last = first + per < t0 + ntiles ? first + per : t0 + ntiles;  // this split: tiles [first, last)

  // The row (B, H, Lq) of tile row r, or -1 past the group's rows.
  const auto row_index = [&](int r) -> int64_t {
    const int gr = rb * kRows + r;
    if (gr >= rows) return -1;
    return (static_cast<int64_t>(b) * p.heads + hk * G + gr / p.lq) * p.lq + gr % p.lq;
  };

  const T* const q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const int64_t row = row_index(r);
    cp_async_16(sQ + tile_offset<HD>(r, c), row >= 0 ? q + row * HD + c * 8 : q, row >= 0 ? 16u : 0u);
  }
  cp_async_commit();
  const T* const kc = static_cast<const T*>(p.k);
  const T* const vc = static_cast<const T*>(p.v);
  if (first < last) {
    load_cache_tile<HD>(sK, kc, p.dim, p, b, hk, first * kBlockN, lo, hi);
    cp_async_commit();
    load_cache_tile<HD>(sV, vc, p.vdim, p, b, hk, first * kBlockN, lo, hi);
    cp_async_commit();
  }

  // This thread's two rows (g and g + 8): absolute query positions, or -1.
  int qpos[2];
  TFK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int gr = rb * kRows + g + 8 * r;
    qpos[r] = gr < rows ? seqlen + gr % p.lq : -1;
  }
  const float scale_log2 = p.scale * kLog2e;
  float o[HD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY};  // running row max (log2 units)
  float l[2] = {0.f, 0.f};              // running row sum, this thread's columns

  for (int tile = first; tile < last; ++tile) {
    const bool more = tile + 1 < last;
    const int j0 = tile * kBlockN;
    cp_async_wait<1>();  // Q and this tile's K
    __syncthreads();
    if (p.tiles && threadIdx.x == 0 && rb == 0) atomicAdd(p.tiles, 1);

    float s[2][4] = {};
    attention::gemm_abt<HD, 2>(s, sQ, 0, sK, 16 * warp);
    TFK_UNROLL
    for (int n = 0; n < 2; ++n) {
      TFK_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int j = j0 + 16 * warp + 8 * n + 2 * t + (i & 1);
        const int pos = qpos[i >> 1];
        const bool ok = pos >= 0 && j >= lo && j < hi && (p.left < 0 || j >= pos - p.left) &&
                        (p.right < 0 || j <= pos + p.right);
        s[n][i] = ok ? s[n][i] * scale_log2 : -INFINITY;
      }
    }
    TFK_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      const float m_new = fmaxf(m[r], quad_max(mx));
      // A row with nothing allowed yet keeps m = -inf: subtract 0 instead (no NaN).
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[r] - base);
      m[r] = m_new;
      l[r] *= alpha;
      TFK_UNROLL
      for (int d = 0; d < HD / 8; ++d) {
        o[d][2 * r] *= alpha;
        o[d][2 * r + 1] *= alpha;
      }
      TFK_UNROLL
      for (int n = 0; n < 2; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] - base);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
        l[r] += s[n][2 * r] + s[n][2 * r + 1];
      }
    }
    __syncthreads();  // every warp is done with sK
    if (more) {
      load_cache_tile<HD>(sK, kc, p.dim, p, b, hk, j0 + kBlockN, lo, hi);
      cp_async_commit();
      cp_async_wait<1>();  // this tile's V
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    attention::gemm_pb<HD, 1>(o, s, sV, 16 * warp);
    __syncthreads();  // every warp is done with sV
    if (more) {
      load_cache_tile<HD>(sV, vc, p.vdim, p, b, hk, j0 + kBlockN, lo, hi);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();  // nothing in flight (no tile: the Q copy)

  // Merge the warps: each row's max and sum over the 4 warps' keys.
  TFK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(l[r]);
    if (t == 0) {
      s_max[warp][g + 8 * r] = m[r];
      s_sum[warp][g + 8 * r] = sum;
    }
  }
  __syncthreads();  // sK and sV are free, s_max and s_sum written
  const auto row_stats = [&](int row, float& mx, float& sum) {
    mx = -INFINITY;
    TFK_UNROLL
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_max[w][row]);
    sum = 0.f;
    if (mx == -INFINITY) return;
    TFK_UNROLL
    for (int w = 0; w < kWarps; ++w) {
      if (s_max[w][row] != -INFINITY) sum += s_sum[w][row] * exp2f(s_max[w][row] - mx);
    }
  };
  TFK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    float mx, sum;
    row_stats(row, mx, sum);
    const float f = (sum > 0.f && m[r] != -INFINITY) ? exp2f(m[r] - mx) / sum : 0.f;
    float* dst = sO + (warp * kRows + row) * HD + 2 * t;
    TFK_UNROLL
    for (int d = 0; d < HD / 8; ++d) {
      *reinterpret_cast<float2*>(dst + 8 * d) = make_float2(o[d][2 * r] * f, o[d][2 * r + 1] * f);
    }
  }
  __syncthreads();
  const int64_t all_rows = static_cast<int64_t>(p.batch) * p.heads * p.lq;
  const int vq = p.vdim / 4;  // float4 columns written (vdim is a multiple of 8)
  for (int i = threadIdx.x; i < kRows * vq; i += kThreads) {
    const int r = i / vq, c = 4 * (i % vq);
    const int64_t row = row_index(r);
    if (row < 0) continue;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    TFK_UNROLL
    for (int w = 0; w < kWarps; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(sO + (w * kRows + r) * HD + c);
      acc.x += x.x;
      acc.y += x.y;
      acc.z += x.z;
      acc.w += x.w;
    }
    *reinterpret_cast<float4*>(p.out_part + (split * all_rows + row) * HD + c) = acc;
  }
  if (threadIdx.x < kRows) {
    const int64_t row = row_index(threadIdx.x);
    if (row >= 0) {
      float mx, sum;
      row_stats(threadIdx.x, mx, sum);
      p.lse_part[split * all_rows + row] = sum > 0.f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

// One thread per (row, column < out_dim) of out: the log-sum-exp merge of the splits.
template <typename T, int HD>
__global__ void __launch_bounds__(kMergeThreads) kvcache_merge_kernel(const Params p) {
  const int64_t all_rows = static_cast<int64_t>(p.batch) * p.heads * p.lq;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (i >= all_rows * p.out_dim) return;
  const int64_t row = i / p.out_dim;
  const int c = static_cast<int>(i % p.out_dim);
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_part[s * all_rows + row]);
  float sum = 0.f, acc = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = expf(p.lse_part[s * all_rows + row] - mx);  // 0 for a split without keys
      sum += w;
      acc += w * p.out_part[(s * all_rows + row) * HD + c];
    }
  }
  static_cast<T*>(p.out)[row * p.out_dim + c] = from_f32<T>(sum > 0.f ? acc / sum : 0.f);
  if (c == 0) p.lse[row] = sum > 0.f ? mx + logf(sum) : -INFINITY;
}

template <typename T, int HD>
void run(const Params& p, void* stream) {
  const stream_t s = static_cast<stream_t>(stream);
  const dim3 grid(static_cast<unsigned>(p.batch * p.kv_heads * row_blocks(p)), static_cast<unsigned>(p.num_splits));
  launch(kvcache_fwd_kernel<T, HD>, grid, dim3(kThreads), 0, s, p);
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * p.lq * p.out_dim;
  launch(kvcache_merge_kernel<T, HD>, dim3(static_cast<unsigned>((total + kMergeThreads - 1) / kMergeThreads)),
         dim3(kMergeThreads), 0, s, p);
}

}  // namespace fwd

void fwd_launch(const Params& p, void* stream) {
  if (p.batch <= 0 || p.heads <= 0 || p.lq <= 0) return;
  const bool bf16 = p.dtype == Dtype::kBFloat16;
  if (p.head_dim == 64) {
    bf16 ? fwd::run<__nv_bfloat16, 64>(p, stream) : fwd::run<__half, 64>(p, stream);
  } else if (p.head_dim == 128) {
    bf16 ? fwd::run<__nv_bfloat16, 128>(p, stream) : fwd::run<__half, 128>(p, stream);
  } else {
    throw std::invalid_argument("tfk kvcache: head_dim " + std::to_string(p.head_dim) + " (kernels take 64 or 128)");
  }
}

}  // namespace kvcache
}  // namespace tfk
