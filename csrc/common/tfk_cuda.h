// Portability layer: the same kernel source compiles with nvcc for the GPU and
// with a plain host C++ compiler (as C++, `-x c++`) to run on the CPU, which is
// how kernels are tested on machines without a GPU.
//
// Include it from .cu files only. Bindings (.cpp compiled with torch and CUDA
// headers) must not include it: in host mode it defines dim3, __half and
// __global__.
//
// What kernels may use in both builds:
//   * launches through tfk::launch(kernel, grid, block, smem, stream, args...)
//   * threadIdx, blockIdx, blockDim, gridDim, warpSize
//   * __shared__ (static shared memory) and tfk::dynamic_smem<T>() (the
//     launch's dynamic shared memory; do not declare `extern __shared__`)
//   * __syncthreads (+ _count/_and/_or), __syncwarp, __shfl_sync,
//     __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync, __ballot_sync,
//     __any_sync, __all_sync, atomicAdd/Sub/Max/Min/CAS/Exch/And/Or/Xor
//   * __half, __nv_bfloat16 (+ 2-vectors) with explicit conversions
//     (__float2half_rn, __half2float, __float2bfloat16_rn, ...)
//   * tensor-core and async-copy primitives through common/warp_primitives.h
//     (mma.sync, ldmatrix, cp.async), never raw inline asm in kernels.
// In host mode (common/host_exec.h) the threads of a block run as fibers that
// switch at barriers and warp collectives; see that file for the model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#define TFK_PRAGMA(x) _Pragma(#x)

#if defined(__CUDACC__)

// Loop unrolling hints: `#pragma unroll` is nvcc's; g++ 12 warns about it
// under -Wall whatever the diagnostic pragmas say (GCC bug 53431), so kernels
// write TFK_UNROLL / TFK_UNROLL_N(n) before a loop.
#define TFK_UNROLL TFK_PRAGMA(unroll)
#define TFK_UNROLL_N(n) TFK_PRAGMA(unroll n)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace tfk {

using stream_t = cudaStream_t;

// The one way kernels are launched, so host mode can replace it.
// More than 48 KiB of dynamic shared memory needs the kernel's opt-in first.
template <typename Kernel, typename... Args>
inline void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, stream_t stream,
                   Args&&... args) {
  if (smem > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}

// The launch's dynamic shared memory (its `smem` bytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char tfk_dynamic_smem_[];
  return reinterpret_cast<T*>(tfk_dynamic_smem_);
}

__device__ __forceinline__ unsigned dynamic_smem_size() {
  unsigned n;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
  return n;
}

}  // namespace tfk

#else  // host mode: kernels run on the CPU

#define TFK_HOST_MODE 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
// One copy per OS thread, shared by the fibers (threads) of the block running
// on it; a template kernel's copy is an STB_GNU_UNIQUE symbol (see host_exec.h).
#define __shared__ static thread_local

#include "common/host_exec.h"

#define TFK_UNROLL
#define TFK_UNROLL_N(n)
// CUDA's `#pragma unroll` means nothing to the host compiler (g++ >= 13 then
// stays quiet; g++ 12 warns regardless: use TFK_UNROLL).
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

namespace tfk {

using stream_t = void*;  // opaque: there is no stream on the host

// Runs the grid to completion before returning (host mode is synchronous).
// Errors (bad configuration, deadlock, refused collectives, races found by
// the race check) are thrown as std::exception.
template <typename Kernel, typename... Args>
inline void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, stream_t /*stream*/,
                   Args&&... args) {
  // Every thread calls kernel(args...) with the same arguments (not forwarded).
  auto body = [&]() { kernel(args...); };
  const void* id = nullptr;
  if constexpr (std::is_pointer<Kernel>::value) id = reinterpret_cast<const void*>(kernel);
  host::run_grid(id, &host::invoke<decltype(body)>, &body, grid, block, smem);
}

template <typename T>
inline T* dynamic_smem() {
  return static_cast<T*>(host::dynamic_smem_base());
}

inline unsigned dynamic_smem_size() { return static_cast<unsigned>(host::dynamic_smem_size()); }

}  // namespace tfk

#endif  // __CUDACC__
