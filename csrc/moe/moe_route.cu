// MoE routing in one kernel (csrc/moe/moe.h, RouteParams), the semantics of
// triton_kernels/moe.py's route:
//   scores    softmax or sigmoid of a row of logits, in fp32;
//   choice    score + bias (the bias picks, it never weighs);
//   groups    with n_group: a group scored by the sum of its two best choice
//             scores, only the topk_group best groups' experts may be chosen;
//   top-k     iterated argmax of the choice: descending, ties to the lower
//             expert (and group) index;
//   weights   the chosen unbiased scores, / their sum when normalize (sigmoid:
//             sum + 1e-20), times scaling;
//   counts    each chosen expert's count + 1 (integer atomics: the same in
//             any order).
// A launch is two kernels on one stream: moe_route_zero_counts, then
// moe_route_kernel with a warp per token row (walking the rows stride by
// stride); lane l holds experts l, l + 32, ... (coalesced reads). Group scores
// go through shared memory: lane l scores groups l, l + 32, ...
#include "moe/moe.h"
#include "moe/moe_tile.cuh"

namespace tfk {
namespace moe {
namespace route {

constexpr int kWarps = 4;                         // rows per block
constexpr int kPerLane = kRouteMaxExperts / 32;   // experts per lane
constexpr int kGroupsPerLane = kRouteMaxGroups / 32;
constexpr int kNone = 1 << 30;                    // no candidate (an id past any expert)
constexpr int64_t kMaxBlocks = 65535;

// (v, id) beats (bv, bid): a greater value, or an equal one at a lower id;
// any candidate beats none (so a -inf choice can still be chosen).
__device__ __forceinline__ bool beats(float v, int id, float bv, int bid) {
  return id != kNone && (bid == kNone || v > bv || (v == bv && id < bid));
}

// The warp's best (value, id), carrying the unbiased score; every lane gets it.
__device__ __forceinline__ void warp_best(float& v, int& id, float& score) {
  TFK_UNROLL
  for (int d = 16; d > 0; d >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, d);
    const int oid = __shfl_xor_sync(0xffffffffu, id, d);
    const float os = __shfl_xor_sync(0xffffffffu, score, d);
    if (beats(ov, oid, v, id)) {
      v = ov;
      id = oid;
      score = os;
    }
  }
}

__device__ __forceinline__ float warp_max(float x) {
  TFK_UNROLL
  for (int d = 16; d > 0; d >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  TFK_UNROLL
  for (int d = 16; d > 0; d >>= 1) x += __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

__global__ void __launch_bounds__(256) moe_route_zero_counts(int64_t* counts, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) counts[i] = 0;
}

// Clears the `avail` bits (bit j: expert lane + 32 j) of the experts outside
// the topk_group best groups. choice: this warp's row of shared memory.
__device__ __forceinline__ uint32_t limit_groups(const RouteParams& p, float* choice, uint8_t* kept,
                                                 const float (&c)[kPerLane], uint32_t avail, int lane) {
  const int E = p.experts, size = E / p.n_group;
  TFK_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    if (avail >> j & 1u) choice[lane + 32 * j] = c[j];
  }
  __syncwarp();
  // A group's score: the sum of its two best choice scores.
  float gscore[kGroupsPerLane];
  uint32_t gavail = 0;
  TFK_UNROLL
  for (int q = 0; q < kGroupsPerLane; ++q) {
    const int g = lane + 32 * q;
    float top1 = -INFINITY, top2 = -INFINITY;
    if (g < p.n_group) {
      gavail |= 1u << q;
      for (int e = g * size; e < (g + 1) * size; ++e) {
        const float v = choice[e];
        if (v > top1) {
          top2 = top1;
          top1 = v;
        } else if (v > top2) {
          top2 = v;
        }
      }
    }
    gscore[q] = top1 + top2;
  }
  // Keep the topk_group best groups (ties: the lower group).
  uint32_t keep = 0;
  for (int i = 0; i < p.topk_group; ++i) {
    float bv = -INFINITY, unused = 0.f;
    int bid = kNone;
    TFK_UNROLL
    for (int q = 0; q < kGroupsPerLane; ++q) {
      if ((gavail >> q & 1u) && beats(gscore[q], lane + 32 * q, bv, bid)) {
        bv = gscore[q];
        bid = lane + 32 * q;
      }
    }
    warp_best(bv, bid, unused);
    if ((bid & 31) == lane) {
      gavail &= ~(1u << (bid >> 5));
      keep |= 1u << (bid >> 5);
    }
  }
  TFK_UNROLL
  for (int q = 0; q < kGroupsPerLane; ++q) {
    if (lane + 32 * q < p.n_group) kept[lane + 32 * q] = keep >> q & 1u;
  }
  __syncwarp();
  TFK_UNROLL
  for (int j = 0; j < kPerLane; ++j) {
    if ((avail >> j & 1u) && !kept[(lane + 32 * j) / size]) avail &= ~(1u << j);
  }
  __syncwarp();  // the next row rewrites choice and kept
  return avail;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) moe_route_kernel(const RouteParams p) {
  __shared__ float s_choice[kWarps][kRouteMaxExperts];
  __shared__ uint8_t s_kept[kWarps][kRouteMaxGroups];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int E = p.experts;
  const T* logits = static_cast<const T*>(p.logits);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < p.tokens;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const T* x = logits + row * E;
    float s[kPerLane], c[kPerLane];
    uint32_t avail = 0;
    float m = -INFINITY;
    TFK_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      s[j] = e < E ? to_f32(x[e]) : -INFINITY;
      if (e < E) avail |= 1u << j;
      m = fmaxf(m, s[j]);
    }
    if (p.sigmoid) {
      TFK_UNROLL
      for (int j = 0; j < kPerLane; ++j) s[j] = sigmoid(s[j]);
    } else {
      m = warp_max(m);
      if (m == -INFINITY) m = 0.f;  // a row of -inf: exp gives zeros, not NaN
      float sum = 0.f;
      TFK_UNROLL
      for (int j = 0; j < kPerLane; ++j) {
        s[j] = (avail >> j & 1u) ? expf(s[j] - m) : 0.f;
        sum += s[j];
      }
      sum = warp_sum(sum);
      const float den = sum == 0.f ? 1.f : sum;
      TFK_UNROLL
      for (int j = 0; j < kPerLane; ++j) s[j] /= den;
    }
    TFK_UNROLL
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      c[j] = s[j] + (p.bias && e < E ? p.bias[e] : 0.f);
    }
    if (p.n_group > 0) avail = limit_groups(p, s_choice[warp], s_kept[warp], c, avail, lane);

    // Top-k by iterated argmax; lane i keeps slot i.
    float w = 0.f, wsum = 0.f;
    int id = 0;
    for (int i = 0; i < p.top_k; ++i) {
      float bv = -INFINITY, bs = 0.f;
      int bid = kNone;
      TFK_UNROLL
      for (int j = 0; j < kPerLane; ++j) {
        if ((avail >> j & 1u) && beats(c[j], lane + 32 * j, bv, bid)) {
          bv = c[j];
          bid = lane + 32 * j;
          bs = s[j];
        }
      }
      warp_best(bv, bid, bs);
      if ((bid & 31) == lane) avail &= ~(1u << (bid >> 5));
      if (lane == i) {
        w = bs;
        id = bid;
      }
      wsum += bs;  // in slot order, as torch sums the gathered weights
    }
    if (p.normalize) {
      const float den = wsum + (p.sigmoid ? 1e-20f : 0.f);
      w /= den == 0.f ? 1.f : den;
    }
    if (lane < p.top_k) {
      p.weights[row * p.top_k + lane] = w * p.scaling;
      p.expert_ids[row * p.top_k + lane] = id;
      atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + id), 1ull);
    }
  }
}

struct Launcher {
  template <typename T>
  static void run(const RouteParams& p, void* stream) {
    const int64_t blocks = (p.tokens + kWarps - 1) / kWarps;
    launch(moe_route_kernel<T>, dim3(static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks)),
           dim3(kWarps * 32), 0, static_cast<stream_t>(stream), p);
  }
};

}  // namespace route

void route_launch(const RouteParams& p, void* stream) {
  if (p.experts <= 0) return;
  launch(route::moe_route_zero_counts, dim3(1), dim3(256), 0, static_cast<stream_t>(stream), p.counts,
         p.experts);
  if (p.tokens <= 0) return;
  dispatch<route::Launcher>(p, stream);
}

}  // namespace moe
}  // namespace tfk
