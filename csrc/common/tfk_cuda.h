// Portability layer: the same kernel source compiles with nvcc for the GPU and
// with a plain host C++ compiler (as C++, `-x c++`) to run on the CPU, which is
// how kernels are tested on machines without a GPU.
//
// Include it from .cu files only. Bindings (.cpp compiled with torch and CUDA
// headers) must not include it: in host mode it defines dim3 and __global__.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#if defined(__CUDACC__)

#include <cuda_runtime.h>

namespace tfk {

using stream_t = cudaStream_t;

// The one way kernels are launched, so host mode can replace it.
template <typename Kernel, typename... Args>
inline void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, stream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}

}  // namespace tfk

#else  // host mode: kernels run on the CPU

#include <cmath>  // expf, logf, log1pf, fmaxf, fabsf, INFINITY: same names as CUDA's
#include <stdexcept>

// CUDA has unqualified isinf/isnan in device code; <cmath> only has std:: ones.
using std::isinf;
using std::isnan;

#define TFK_HOST_MODE 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// Deliberately NOT defined here: __syncthreads, __shfl_*_sync, __shared__,
// atomics. Threads of a block run one after another to completion, so a
// barrier cannot be honoured; a kernel that needs one must fail to compile in
// host mode instead of computing garbage. (A later layer runs threads as
// fibers that switch at barriers.)

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};

// Per OS thread, so separate host launches on separate threads do not collide.
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace tfk {

using stream_t = void*;  // opaque: there is no stream on the host

template <typename Kernel, typename... Args>
inline void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, stream_t /*stream*/,
                   Args&&... args) {
  if (smem != 0) {
    throw std::invalid_argument("tfk host mode: dynamic shared memory is not supported");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 ||
      block.z == 0) {
    throw std::invalid_argument("tfk host mode: empty grid or block");
  }
  gridDim = grid;
  blockDim = block;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        for (unsigned int tz = 0; tz < block.z; ++tz)
          for (unsigned int ty = 0; ty < block.y; ++ty)
            for (unsigned int tx = 0; tx < block.x; ++tx) {
              threadIdx = {tx, ty, tz};
              kernel(args...);  // not forwarded: every thread gets the same arguments
            }
      }
}

}  // namespace tfk

#endif  // __CUDACC__
