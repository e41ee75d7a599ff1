// torch bindings of the CUDA kernels: schemas (TORCH_LIBRARY) and CUDA
// implementations (TORCH_LIBRARY_IMPL). Only this file sees torch headers; it
// is compiled by the host compiler, the kernels by nvcc without torch.
// Headers kept minimal for build time (no torch/extension.h), and
// c10/cuda/CUDAStream.h instead of ATen/cuda/CUDAContext.h, which needs
// cuSPARSE headers that a minimal toolkit lacks.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "attention/ops.h"
#include "kvcache/ops.h"
#include "linear/ops.h"
#include "merge/merge_lse.h"
#include "moe/ops.h"

namespace tfk {
namespace {

void check_cuda_f32_contiguous(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "tfk::merge_lse_: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "tfk::merge_lse_: ", name, " is on ", t.device(),
              " but out_acc is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "tfk::merge_lse_: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "tfk::merge_lse_: ", name, " must be contiguous");
}

// out_acc (..., D), lse_acc (...), out_i like out_acc, lse_i like lse_acc.
void merge_lse_cuda(const at::Tensor& out_acc, const at::Tensor& lse_acc, const at::Tensor& out_i,
                    const at::Tensor& lse_i) {
  check_cuda_f32_contiguous(out_acc, "out_acc", out_acc);
  check_cuda_f32_contiguous(lse_acc, "lse_acc", out_acc);
  check_cuda_f32_contiguous(out_i, "out_i", out_acc);
  check_cuda_f32_contiguous(lse_i, "lse_i", out_acc);
  TORCH_CHECK(out_acc.dim() >= 1, "tfk::merge_lse_: out_acc must have a last (head) dimension");
  TORCH_CHECK(lse_acc.sizes() == out_acc.sizes().slice(0, out_acc.dim() - 1),
              "tfk::merge_lse_: lse_acc must have shape out_acc.shape[:-1] = ",
              out_acc.sizes().slice(0, out_acc.dim() - 1), ", got ", lse_acc.sizes());
  TORCH_CHECK(out_i.sizes() == out_acc.sizes(), "tfk::merge_lse_: out_i must have the shape of out_acc ",
              out_acc.sizes(), ", got ", out_i.sizes());
  TORCH_CHECK(lse_i.sizes() == lse_acc.sizes(), "tfk::merge_lse_: lse_i must have the shape of lse_acc ",
              lse_acc.sizes(), ", got ", lse_i.sizes());
  TORCH_CHECK(!out_acc.is_same(out_i) && !lse_acc.is_same(lse_i),
              "tfk::merge_lse_: the accumulator and the partial must be different tensors");
  const int64_t rows = lse_acc.numel();
  const int64_t dim = out_acc.size(-1);
  // The launcher's grids index rows with 32-bit block counts.
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "tfk::merge_lse_: too many rows (", rows, ")");
  if (rows == 0) return;

  const c10::cuda::CUDAGuard guard(out_acc.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out_acc.get_device()).stream();
  merge_lse_launch(out_acc.data_ptr<float>(), lse_acc.data_ptr<float>(), out_i.data_ptr<float>(),
                   lse_i.data_ptr<float>(), rows, dim, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The attention ops on CUDA tensors (csrc/attention/ops.h).
struct Cuda {
  static constexpr const char* kFwdName = "tfk::attention_fwd_";
  static constexpr const char* kBwdName = "tfk::attention_bwd_";
  static constexpr const char* kNamespace = "tfk";  // for the MoE and linear ops' messages
  using Guard = c10::cuda::CUDAGuard;
  static void* stream(const at::Tensor& q) {
    TORCH_CHECK(q.is_cuda(), "tfk: tensors must be on a CUDA device, got ", q.device());
    return c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  }
  static void after_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
};

}  // namespace
}  // namespace tfk

TORCH_LIBRARY(tfk, m) {
  m.def("merge_lse_(Tensor(a!) out_acc, Tensor(b!) lse_acc, Tensor out_i, Tensor lse_i) -> ()");
  m.def(tfk::attention::kFwdSchema);
  m.def(tfk::attention::kBwdSchema);
  TFK_MOE_DEFS(m);
  TFK_LINEAR_DEFS(m);
  TFK_KVCACHE_DEFS(m);
}

TORCH_LIBRARY_IMPL(tfk, CUDA, m) {
  m.impl("merge_lse_", &tfk::merge_lse_cuda);
  m.impl("attention_fwd_", &tfk::attention::ops::attention_fwd<tfk::Cuda>);
  m.impl("attention_bwd_", &tfk::attention::ops::attention_bwd<tfk::Cuda>);
  TFK_MOE_IMPLS(m, tfk::Cuda);
  TFK_LINEAR_IMPLS(m, tfk::Cuda);
  TFK_KVCACHE_IMPLS(m, tfk::Cuda);
}

// `import tfk._C` loads this library, which runs the registrations above; the
// module itself is empty (ops are reached through torch.ops.tfk).
static PyModuleDef tfk_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                   "tfk CUDA kernels; ops live in torch.ops.tfk.", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tfk_c_module); }
