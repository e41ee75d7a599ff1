// The MoE kernels that are not GEMMs (csrc/moe/moe.h):
//   moe_combine_kernel   out[t] = sum over slots s < k, in order, of
//                        y[index[t * k + s]] (index -1 adds nothing), fp32
//                        accumulation: deterministic, no atomics. A thread per
//                        (token, chunk of 8 columns).
//   moe_act_bwd_kernel   the gradient of h = act(gate) * up w.r.t. [gate | up],
//                        in fp32: a thread per (row, column of h).
// Both walk their grid stride by stride, so any size fits a capped grid.
#include "moe/moe.h"
#include "moe/moe_tile.cuh"

namespace tfk {
namespace moe {
namespace elementwise {

constexpr int64_t kMaxBlocks = 65535;

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * kThreads; }

template <typename T>
__global__ void __launch_bounds__(kThreads) moe_combine_kernel(const CombineParams p) {
  const int64_t chunks = p.h / 8, total = p.tokens * chunks;
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out);
  for (int64_t e = global_thread(); e < total; e += grid_threads()) {
    const int64_t tok = e / chunks, col = (e % chunks) * 8;
    float acc[8] = {};
    for (int64_t s = 0; s < p.k; ++s) {
      const int64_t row = p.index[tok * p.k + s];
      if (row < 0) continue;
      const T* src = y + row * p.h + col;
      TFK_UNROLL
      for (int i = 0; i < 8; ++i) acc[i] += to_f32(src[i]);
    }
    T* dst = out + tok * p.h + col;
    TFK_UNROLL
    for (int i = 0; i < 8; ++i) dst[i] = from_f32<T>(acc[i]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) moe_act_bwd_kernel(const ActBwdParams p) {
  const int64_t total = p.m * p.i;
  const T* gate_up = static_cast<const T*>(p.gate_up);
  const T* grad_h = static_cast<const T*>(p.grad_h);
  T* out = static_cast<T*>(p.out);
  for (int64_t e = global_thread(); e < total; e += grid_threads()) {
    const int64_t row = e / p.i, col = e % p.i, base = row * 2 * p.i;
    const float gate = to_f32(gate_up[base + col]), up = to_f32(gate_up[base + p.i + col]);
    const float dh = to_f32(grad_h[e]);
    out[base + col] = from_f32<T>(dh * up * activate_grad(p.act, gate));
    out[base + p.i + col] = from_f32<T>(dh * activate(p.act, gate));
  }
}

inline dim3 grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks));
}

struct CombineLauncher {
  template <typename T>
  static void run(const CombineParams& p, void* stream) {
    launch(moe_combine_kernel<T>, grid_for(p.tokens * (p.h / 8)), dim3(kThreads), 0,
           static_cast<stream_t>(stream), p);
  }
};

struct ActBwdLauncher {
  template <typename T>
  static void run(const ActBwdParams& p, void* stream) {
    launch(moe_act_bwd_kernel<T>, grid_for(p.m * p.i), dim3(kThreads), 0, static_cast<stream_t>(stream), p);
  }
};

}  // namespace elementwise

void combine_launch(const CombineParams& p, void* stream) {
  if (p.tokens <= 0 || p.h <= 0) return;
  dispatch<elementwise::CombineLauncher>(p, stream);
}

void act_backward_launch(const ActBwdParams& p, void* stream) {
  if (p.m <= 0 || p.i <= 0) return;
  dispatch<elementwise::ActBwdLauncher>(p, stream);
}

}  // namespace moe
}  // namespace tfk
