// C entry points to the host-compiled kernels (CMake target tfk_host), for
// tests that call them through ctypes on CPU tensors' data_ptr().
// Return 0 on success, nonzero on error; tfk_host_last_error() says why.
#include <cstdint>
#include <cstring>

#include "attention/attention.h"
#include "host/host_api_guard.h"
#include "merge/merge_lse.h"

using tfk::host_api::fail;
using tfk::host_api::guarded;

TFK_HOST_EXPORT const char* tfk_host_last_error() { return tfk::host_api::last_error.c_str(); }

TFK_HOST_EXPORT int tfk_host_merge_lse(float* out_acc, float* lse_acc, const float* out_i,
                                       const float* lse_i, int64_t rows, int64_t dim) {
  if (rows < 0 || dim < 0) return fail(1, "tfk_host_merge_lse: negative rows or dim");
  if (rows > 0 && (!lse_acc || !lse_i || (dim > 0 && (!out_acc || !out_i))))
    return fail(2, "tfk_host_merge_lse: null pointer");
  return guarded([&] { tfk::merge_lse_launch(out_acc, lse_acc, out_i, lse_i, rows, dim, nullptr); });
}

// Dynamic shared memory (bytes) a launch of `kernel` (its name without
// namespace or template arguments) requests at `head_dim`; -1 if unknown.
// The compile report adds it to ptxas's static figure.
TFK_HOST_EXPORT int64_t tfk_host_dynamic_smem_bytes(const char* kernel, int head_dim) {
  namespace a = tfk::attention;
  if (!kernel) return -1;
  if (!std::strcmp(kernel, "attention_fwd_kernel")) return a::fwd_smem_bytes(head_dim);
  if (!std::strcmp(kernel, "attention_bwd_dq_kernel")) return a::bwd_dq_smem_bytes(head_dim);
  if (!std::strcmp(kernel, "attention_bwd_dkdv_kernel")) return a::bwd_dkdv_smem_bytes(head_dim);
  return -1;
}
