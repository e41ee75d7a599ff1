// Test kernels of the host-execution layer: warp shuffles, votes, __syncwarp.
// See host_exec_tests.h.
#include <stdexcept>

#include "common/tfk_cuda.h"
#include "host_exec_tests/host_exec_tests.h"

namespace tfk {
namespace host_exec_tests {

constexpr unsigned kFull = 0xffffffffu;

// Block-wide inclusive scan: Hillis-Steele within each warp (__shfl_up_sync),
// warp totals through shared memory, scanned by warp 0, added back.
__global__ void __launch_bounds__(1024) block_scan_kernel(const int* __restrict__ in, int* __restrict__ out, int64_t n) {
  __shared__ int warp_total[32];
  const unsigned t = threadIdx.x, lane = t & 31u, warp = t >> 5, nwarps = blockDim.x >> 5;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + t;
  int v = i < n ? in[i] : 0;
  for (unsigned d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(kFull, v, d);
    if (lane >= d) v += up;
  }
  if (lane == 31) warp_total[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? warp_total[lane] : 0;
    for (unsigned d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(kFull, w, d);
      if (lane >= d) w += up;
    }
    if (lane < nwarps) warp_total[lane] = w;  // inclusive scan of the totals
  }
  __syncthreads();
  if (warp > 0) v += warp_total[warp - 1];
  if (i < n) out[i] = v;
}

// Any block size: each warp reduces over the lanes that exist, with their mask.
__global__ void __launch_bounds__(1024) partial_warp_sum_kernel(const int* __restrict__ in, int* __restrict__ out) {
  const unsigned t = threadIdx.x, lane = t & 31u, base = t & ~31u;
  const unsigned lanes = blockDim.x - base < 32u ? blockDim.x - base : 32u;
  const unsigned mask = lanes == 32u ? kFull : ((1u << lanes) - 1u);
  int v = in[t];
  for (unsigned d = 16; d > 0; d >>= 1) {
    const int other = __shfl_down_sync(mask, v, d);
    if (lane + d < lanes) v += other;
  }
  if (lane == 0) out[t >> 5] = v;
}

// One result per primitive and thread (the Python test models each from CUDA's
// documented semantics).
__global__ void __launch_bounds__(1024) warp_ops_kernel(const int* __restrict__ in, const int* __restrict__ src,
                                                        int* __restrict__ out, long long* __restrict__ out64) {
  const unsigned t = threadIdx.x, lane = t & 31u;
  const int v = in[t];
  int* o = out + static_cast<int64_t>(t) * kWarpOps;
  o[0] = __shfl_sync(kFull, v, src[t]);         // any srcLane: taken modulo the width
  o[1] = __shfl_sync(kFull, v, src[t], 8);
  o[2] = __shfl_up_sync(kFull, v, 3);
  o[3] = __shfl_up_sync(kFull, v, 2, 16);
  o[4] = __shfl_down_sync(kFull, v, 5);
  o[5] = __shfl_down_sync(kFull, v, 3, 8);
  o[6] = __shfl_xor_sync(kFull, v, 6);
  o[7] = __shfl_xor_sync(kFull, v, 9, 8);       // reaches earlier groups of 8, not later ones
  o[8] = static_cast<int>(__ballot_sync(kFull, v & 1));
  o[9] = __any_sync(kFull, v == 12345);
  o[10] = __all_sync(kFull, v >= 0);
  // The two halves of the warp in different collectives at the same time.
  if (lane < 16) {
    o[11] = __shfl_xor_sync(0x0000ffffu, v, 1);
  } else {
    o[11] = __shfl_down_sync(0xffff0000u, v, 2, 16);
  }
  o[12] = __float_as_int(__shfl_xor_sync(kFull, static_cast<float>(v) * 0.5f, 16));
  const long long wide = static_cast<long long>(v) * 4294967296LL + static_cast<long long>(lane * 7u);
  out64[t] = __shfl_down_sync(kFull, wide, 1);
}

__global__ void __launch_bounds__(1024) syncwarp_exchange_kernel(const int* __restrict__ in, int* __restrict__ out) {
  __shared__ int buf[1024];
  const unsigned t = threadIdx.x;
  buf[t] = in[t];
  __syncwarp();
  out[t] = buf[(t & ~31u) | ((t + 1) & 31u)];
}

namespace {
void check_warps(int threads) {
  if (threads < 32 || threads > 1024 || threads % 32)
    throw std::invalid_argument("threads must be a multiple of 32 in [32, 1024]");
}
}  // namespace

void block_scan(const int* in, int* out, int64_t n, int threads, void* stream) {
  check_warps(threads);
  if (n <= 0) return;
  const int64_t blocks = (n + threads - 1) / threads;
  launch(block_scan_kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, static_cast<stream_t>(stream), in,
         out, n);
}

void partial_warp_sum(const int* in, int* out, int threads, void* stream) {
  if (threads < 1 || threads > 1024) throw std::invalid_argument("threads must be in [1, 1024]");
  launch(partial_warp_sum_kernel, dim3(1), dim3(threads), 0, static_cast<stream_t>(stream), in, out);
}

void warp_ops(const int* in, const int* src, int* out, long long* out64, int threads, void* stream) {
  check_warps(threads);
  launch(warp_ops_kernel, dim3(1), dim3(threads), 0, static_cast<stream_t>(stream), in, src, out, out64);
}

void syncwarp_exchange(const int* in, int* out, int threads, void* stream) {
  check_warps(threads);
  launch(syncwarp_exchange_kernel, dim3(1), dim3(threads), 0, static_cast<stream_t>(stream), in, out);
}

}  // namespace host_exec_tests
}  // namespace tfk
