// Test kernels of the host-execution layer: deliberate shared-memory hazards
// (for the race check) and misuses of barriers and warp collectives (which the
// layer refuses). They compile as valid CUDA; their bugs are the point.
// See host_exec_tests.h.
#include <stdexcept>

#include "common/tfk_cuda.h"
#include "common/warp_primitives.h"
#include "host_exec_tests/host_exec_tests.h"

namespace tfk {
namespace host_exec_tests {

__global__ void __launch_bounds__(256) hazard_kernel(const float* __restrict__ in, float* __restrict__ out, int mode) {
  __shared__ float fixed[256];
  float* s = mode == 7 ? fixed : dynamic_smem<float>();
  const unsigned t = threadIdx.x, n = blockDim.x;
  switch (mode) {
    case 0:
    case 1:
    case 7:  // exchange with a neighbour: correct only with the barrier (mode 0)
      s[t] = in[t];
      if (mode == 0) __syncthreads();
      out[t] = s[(t + 1) % n];
      break;
    case 2: {  // thread t overwrites s[t] while thread t-1 may not have read it yet
      s[t] = in[t];
      __syncthreads();
      const float v = s[(t + 1) % n];
      s[t] = 2.f * v;
      __syncthreads();
      out[t] = s[t];
      break;
    }
    case 3:  // reads the destination of its own cp.async before waiting for it
      cp_async_4(s + t, in + t);
      cp_async_commit();
      out[t] = s[t];
      cp_async_wait<0>();
      break;
    case 4:  // the last element is never written
      if (t + 1 != n) s[t] = in[t];
      __syncthreads();
      out[t] = s[(t + 1) % n];
      break;
    case 5:
    case 6:  // lanes exchange pairs: correct only with the __syncwarp (mode 6)
      s[t] = in[t];
      if (mode == 6) __syncwarp();
      out[t] = s[t ^ 1u];
      break;
    case 8: {  // a cp.async refills s[t] while thread t-1 may still read it (the
               // double-buffering bug: a prefetch without the trailing barrier)
      s[t] = in[t];
      __syncthreads();
      const float v = s[(t + 1) % n];
      cp_async_4(s + t, in + t);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      out[t] = v + s[t];
      break;
    }
    default:
      break;
  }
}

__global__ void __launch_bounds__(64) misuse_kernel(int which, int* __restrict__ out) {
  const int t = static_cast<int>(threadIdx.x);
  switch (which) {
    case 0:  // half of the block returns while the other half waits at a barrier
      if (t < 16) __syncthreads();
      out[t] = t;
      break;
    case 1:  // lane 3 returns; the others shuffle with a mask that names it
      if (t == 3) return;
      out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
      break;
    case 2:  // odd lanes shuffle, even lanes vote, with the same mask
      if (t & 1) {
        out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
      } else {
        out[t] = static_cast<int>(__ballot_sync(0xffffffffu, t));
      }
      break;
    case 3:  // lanes 0-15 wait for 16-31 in a shuffle, 16-31 wait for 0-15 at a barrier
      if (t < 16) {
        out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
      } else {
        __syncthreads();
      }
      break;
    case 4: {  // mma.sync needs 32 lanes; the last warp of a 48-thread block has 16
      const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
      const float c[4] = {0.f, 0.f, 0.f, 0.f};
      float d[4];
      mma_m16n8k16_f16f32(d, a, b, c);
      out[t] = static_cast<int>(d[0]);
      break;
    }
    case 5: {  // ldmatrix from global memory
      uint32_t r;
      ldmatrix_x1(r, out + 4 * (t & 7));
      out[t] = static_cast<int>(r);
      break;
    }
    case 6:  // a full mask in a block whose last warp is partial
      out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
      break;
    default:
      break;
  }
}

void hazard(const float* in, float* out, int threads, int mode, void* stream) {
  if (threads < 2 || threads > 256) throw std::invalid_argument("hazard: threads must be in [2, 256]");
  launch(hazard_kernel, dim3(1), dim3(threads), threads * sizeof(float), static_cast<stream_t>(stream), in, out,
         mode);
}

void misuse(int which, int threads, int* out, void* stream) {
  if (threads < 1 || threads > 64) throw std::invalid_argument("misuse: threads must be in [1, 64]");
  launch(misuse_kernel, dim3(1), dim3(threads), 0, static_cast<stream_t>(stream), which, out);
}

}  // namespace host_exec_tests
}  // namespace tfk
