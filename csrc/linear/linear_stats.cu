// The "softmax" feature map's key statistics (csrc/linear/linear.h,
// softmax_stats_launch): per (batch, KV head, channel d) the max of k over the
// kept positions and 1 / sum_j exp(k[j, d] - max), which the forward kernel
// (linear_fwd.cu, FeatureMap::kSoftmax) uses to map its key tiles on load.
//
// A block per (batch * KV head, kTile channels): thread (ty, tx) takes channel
// tx of the tile and positions ty, ty + kGroups, ... (a warp reads kTile
// adjacent channels of one position: coalesced). Two passes over the keys:
// the max, combined over the kGroups position groups in shared memory, then
// the sum of exp(k - max) against that max, combined the same way. Fixed
// orders throughout, no atomics: deterministic.
#include <cmath>

#include "common/elem.cuh"
#include "common/tfk_cuda.h"
#include "linear/linear.h"

namespace tfk {
namespace linear {
// Named (not anonymous) so kernel names in ptxas reports are stable.
namespace stats {

constexpr int kTile = 32;                    // channels per block (one warp's lanes)
constexpr int kGroups = kThreads / kTile;    // position groups (one per warp)

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_stats_kernel(const StatsParams p) {
  __shared__ float s_part[kGroups][kTile];
  const int D = p.dim;
  const int64_t bh = blockIdx.x, b = bh / p.kv_heads;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int d = blockIdx.y * kTile + tx;
  const bool on = d < D;
  const T* kp = static_cast<const T*>(p.k) + bh * p.len_k * D + d;
  const uint8_t* keep = p.keep ? p.keep + b * p.len_k : nullptr;

  float m = -INFINITY;
  if (on) {
    for (int64_t j = ty; j < p.len_k; j += kGroups) {
      if (keep == nullptr || keep[j] != 0) m = fmaxf(m, to_f32(kp[j * D]));
    }
  }
  s_part[ty][tx] = m;
  __syncthreads();
  m = s_part[0][tx];
  TFK_UNROLL
  for (int g = 1; g < kGroups; ++g) m = fmaxf(m, s_part[g][tx]);
  __syncthreads();  // every max read before the sums overwrite s_part

  float sum = 0.f;
  if (on && m != -INFINITY) {
    for (int64_t j = ty; j < p.len_k; j += kGroups) {
      if (keep == nullptr || keep[j] != 0) sum += expf(to_f32(kp[j * D]) - m);
    }
  }
  s_part[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && on) {
    sum = s_part[0][tx];
    TFK_UNROLL
    for (int g = 1; g < kGroups; ++g) sum += s_part[g][tx];
    float* out = p.stats + bh * 2 * D;
    const bool any = m != -INFINITY;  // some key kept (then sum >= 1)
    out[d] = any ? m : 0.f;
    out[D + d] = any ? 1.f / sum : 0.f;
  }
}

struct Launcher {
  template <typename T>
  static void run(const StatsParams& p, void* stream) {
    const dim3 grid(static_cast<unsigned>(p.batch * p.kv_heads), static_cast<unsigned>((p.dim + kTile - 1) / kTile));
    launch(softmax_stats_kernel<T>, grid, dim3(kThreads), 0, static_cast<stream_t>(stream), p);
  }
};

}  // namespace stats

void softmax_stats_launch(const StatsParams& p, void* stream) {
  if (p.batch * p.kv_heads <= 0 || p.dim <= 0) return;
  switch (p.dtype) {
    case Dtype::kHalf: stats::Launcher::run<__half>(p, stream); break;
    case Dtype::kBFloat16: stats::Launcher::run<__nv_bfloat16>(p, stream); break;
    default: stats::Launcher::run<float>(p, stream); break;
  }
}

}  // namespace linear
}  // namespace tfk
