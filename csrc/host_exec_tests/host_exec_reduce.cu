// Test kernels of the host-execution layer: shared memory and __syncthreads.
// See host_exec_tests.h.
#include <stdexcept>

#include "common/tfk_cuda.h"
#include "host_exec_tests/host_exec_tests.h"

namespace tfk {
namespace host_exec_tests {

constexpr int kMaxThreads = 1024;

__device__ __forceinline__ unsigned pow2_ceil(unsigned n) {
  unsigned p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Grid-stride partial sum, then a tree over any block size in shared memory:
// in round s, thread t < s adds buf[t + s] (when it exists) into buf[t].
__device__ __forceinline__ void block_sum_body(float* buf, const float* __restrict__ x, int64_t n,
                                               float* __restrict__ partial) {
  const unsigned t = threadIdx.x, nt = blockDim.x;
  float acc = 0.f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * nt + t; i < n; i += static_cast<int64_t>(gridDim.x) * nt)
    acc += x[i];
  buf[t] = acc;
  __syncthreads();
  for (unsigned s = pow2_ceil(nt) / 2; s > 0; s >>= 1) {
    if (t < s && t + s < nt) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) partial[blockIdx.x] = buf[0];
}

__global__ void __launch_bounds__(kMaxThreads)
block_sum_static_kernel(const float* __restrict__ x, int64_t n, float* __restrict__ partial) {
  __shared__ float buf[kMaxThreads];
  block_sum_body(buf, x, n, partial);
}

__global__ void __launch_bounds__(kMaxThreads)
block_sum_dynamic_kernel(const float* __restrict__ x, int64_t n, float* __restrict__ partial) {
  block_sum_body(dynamic_smem<float>(), x, n, partial);
}

// Two buffers of blockDim.x floats in dynamic shared memory; one barrier per
// round suffices (it also orders this round's writes after the previous
// round's reads of the same buffer).
__global__ void __launch_bounds__(kMaxThreads)
rotate_kernel(const float* __restrict__ in, float* __restrict__ out, int rounds, int use_barrier) {
  const unsigned t = threadIdx.x, nt = blockDim.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * nt;
  float* cur = dynamic_smem<float>();
  float* nxt = cur + nt;
  cur[t] = in[base + t];
  for (int r = 0; r < rounds; ++r) {
    if (use_barrier) __syncthreads();
    nxt[t] = cur[(t + static_cast<unsigned>(r) + 1) % nt] + 1.f;
    float* tmp = cur;
    cur = nxt;
    nxt = tmp;
  }
  out[base + t] = cur[t];
}

__global__ void __launch_bounds__(kMaxThreads) sync_votes_kernel(const int* __restrict__ pred, int* __restrict__ out) {
  const unsigned t = threadIdx.x;
  const int p = pred[t];
  out[3 * t + 0] = __syncthreads_count(p);
  out[3 * t + 1] = __syncthreads_and(p);
  out[3 * t + 2] = __syncthreads_or(p);
}

__global__ void __launch_bounds__(kMaxThreads) barrier_spin_kernel(float* __restrict__ out, int iters) {
  for (int i = 0; i < iters; ++i) __syncthreads();
  out[static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x] = static_cast<float>(threadIdx.x);
}

// Atomics on shared and global memory: a shared histogram of v % bins merged
// into hist, max/min, a float sum, and a 64-bit counter bumped by a CAS loop.
__global__ void __launch_bounds__(kMaxThreads)
atomics_kernel(const int* __restrict__ v, int64_t n, int* __restrict__ hist, int bins, int* __restrict__ max_min,
               float* __restrict__ sum, unsigned long long* __restrict__ counter) {
  __shared__ int local[256];
  const unsigned t = threadIdx.x;
  for (int b = static_cast<int>(t); b < bins; b += static_cast<int>(blockDim.x)) local[b] = 0;
  __syncthreads();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + t; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int x = v[i];
    atomicAdd(&local[((x % bins) + bins) % bins], 1);
    atomicMax(&max_min[0], x);
    atomicMin(&max_min[1], x);
    atomicAdd(sum, static_cast<float>(x));
    unsigned long long old = atomicAdd(counter, 0ull), assumed;
    do {
      assumed = old;
      old = atomicCAS(counter, assumed, assumed + 1ull);
    } while (old != assumed);
  }
  __syncthreads();
  for (int b = static_cast<int>(t); b < bins; b += static_cast<int>(blockDim.x)) atomicAdd(&hist[b], local[b]);
}

namespace {
void check_threads(int threads) {
  if (threads < 1 || threads > kMaxThreads) throw std::invalid_argument("threads must be in [1, 1024]");
}
}  // namespace

void block_sum(const float* x, int64_t n, float* partial, int blocks, int threads, bool dynamic_smem,
               void* stream) {
  check_threads(threads);
  if (blocks < 1) throw std::invalid_argument("blocks must be >= 1");
  const stream_t s = static_cast<stream_t>(stream);
  if (dynamic_smem) {
    launch(block_sum_dynamic_kernel, dim3(blocks), dim3(threads), threads * sizeof(float), s, x, n, partial);
  } else {
    launch(block_sum_static_kernel, dim3(blocks), dim3(threads), 0, s, x, n, partial);
  }
}

void rotate(const float* in, float* out, int blocks, int threads, int rounds, bool use_barrier, void* stream) {
  check_threads(threads);
  launch(rotate_kernel, dim3(blocks), dim3(threads), 2 * threads * sizeof(float), static_cast<stream_t>(stream), in,
         out, rounds, use_barrier ? 1 : 0);
}

void sync_votes(const int* pred, int* out, int threads, void* stream) {
  check_threads(threads);
  launch(sync_votes_kernel, dim3(1), dim3(threads), 0, static_cast<stream_t>(stream), pred, out);
}

void atomics(const int* v, int64_t n, int* hist, int bins, int* max_min, float* sum, unsigned long long* counter,
             int blocks, int threads, void* stream) {
  check_threads(threads);
  if (bins < 1 || bins > 256) throw std::invalid_argument("atomics: bins must be in [1, 256]");
  launch(atomics_kernel, dim3(blocks), dim3(threads), 0, static_cast<stream_t>(stream), v, n, hist, bins, max_min,
         sum, counter);
}

void barrier_spin(float* out, int blocks, int threads, int iters, void* stream) {
  check_threads(threads);
  launch(barrier_spin_kernel, dim3(blocks), dim3(threads), 0, static_cast<stream_t>(stream), out, iters);
}

#if defined(TFK_HOST_MODE)
void host_exec_control(int what, int value, uint64_t* out) {
  if (what == 0) {
    host::set_workers(value);
  } else if (what == 1) {
    const host::Stats s = host::last_stats();
    out[0] = s.blocks, out[1] = s.resumes, out[2] = s.barriers, out[3] = s.collectives;
  } else {
    throw std::invalid_argument("host_exec_control: unknown request");
  }
}
#endif

}  // namespace host_exec_tests
}  // namespace tfk
