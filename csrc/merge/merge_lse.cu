// Log-sum-exp merge of attention partials, in place, float32.
// No torch headers here: this file is compiled by nvcc for the extension and
// the ptxas report, and by the host C++ compiler for CPU tests.
#include "common/tfk_cuda.h"
#include "merge/merge_lse.h"

namespace tfk {
// Named (not anonymous) so kernel names in ptxas reports and profilers are stable.
namespace merge {

constexpr unsigned kThreadsD = 32;      // threads over D within a row
constexpr unsigned kRowsPerBlock = 8;   // rows per block (threadIdx.y)
constexpr unsigned kThreadsLse = 256;   // threads over rows in the lse kernel

// torch.logaddexp, including its special case: equal infinities return
// themselves (so -inf, -inf gives -inf rather than -inf - -inf = NaN).
__device__ __forceinline__ float logaddexp(float a, float b) {
  if (isinf(a) && a == b) return a;
  const float m = fmaxf(a, b);
  return m + log1pf(expf(-fabsf(a - b)));
}

// out_acc <- out_acc * w_acc + out_i * w_i for one row per threadIdx.y.
// Reads lse_acc; never writes it (see merge_lse_launch).
__global__ void __launch_bounds__(kThreadsD * kRowsPerBlock)
merge_lse_out_kernel(float* __restrict__ out_acc, const float* __restrict__ lse_acc,
                     const float* __restrict__ out_i, const float* __restrict__ lse_i,
                     int64_t rows, int64_t dim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const float a = lse_acc[row];
  const float b = lse_i[row];
  const float lse = logaddexp(a, b);
  // A row empty on both sides: weight 0 from both, as merge_partials does.
  float w_acc = 0.f, w_i = 0.f;
  if (lse != -INFINITY) {
    w_acc = expf(a - lse);
    w_i = expf(b - lse);
  }
  const int64_t base = row * dim;  // int64: rows * dim can pass 2^31
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    out_acc[base + d] = out_acc[base + d] * w_acc + out_i[base + d] * w_i;
  }
}

__global__ void __launch_bounds__(kThreadsLse)
merge_lse_lse_kernel(float* __restrict__ lse_acc, const float* __restrict__ lse_i,
                     int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < rows) lse_acc[row] = logaddexp(lse_acc[row], lse_i[row]);
}

}  // namespace merge

void merge_lse_launch(float* out_acc, float* lse_acc, const float* out_i, const float* lse_i,
                      int64_t rows, int64_t dim, void* stream) {
  if (rows <= 0) return;
  using namespace merge;
  const stream_t s = static_cast<stream_t>(stream);
  if (dim > 0) {
    const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
    launch(merge_lse_out_kernel, grid, dim3(kThreadsD, kRowsPerBlock), 0, s, out_acc, lse_acc,
           out_i, lse_i, rows, dim);
  }
  // lse_acc is overwritten by a second launch: every thread of a row reads the
  // old value, so one kernel would need a barrier between those reads and the
  // write. Stream order does the job.
  const dim3 grid(static_cast<unsigned>((rows + kThreadsLse - 1) / kThreadsLse));
  launch(merge_lse_lse_kernel, grid, dim3(kThreadsLse), 0, s, lse_acc, lse_i, rows);
}

}  // namespace tfk
