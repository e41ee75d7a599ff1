// Exact in-place merge of a partial attention result into an accumulator, by
// log-sum-exp (the semantics of tfk/ops/attention/merge.py::merge_partials).
//
// Free of CUDA and torch headers: it is included by the torch bindings (host
// compiler), by the host test API, and by the kernel itself.
#pragma once

#include <cstdint>

namespace tfk {

// out_acc (rows, dim), lse_acc (rows), out_i (rows, dim), lse_i (rows): all
// contiguous float32, on the device in CUDA builds (host memory in host mode);
// the accumulator must not overlap the partial.
//   lse     = logaddexp(lse_acc, lse_i)
//   out_acc = out_acc * exp(lse_acc - lse) + out_i * exp(lse_i - lse)
//   lse_acc = lse
// A row with lse = -inf on both sides takes weight 0 from both (stays 0, -inf).
// `stream` is a cudaStream_t passed as void* so this header needs no CUDA
// headers; it is ignored in host mode. Errors surface through
// cudaGetLastError() (CUDA) or exceptions (host mode).
void merge_lse_launch(float* out_acc, float* lse_acc, const float* out_i, const float* lse_i,
                      int64_t rows, int64_t dim, void* stream);

}  // namespace tfk
