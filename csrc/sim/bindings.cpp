// tfk._sim: the CUDA kernels of tfk._C compiled for the host and run on CPU
// tensors by the host-execution layer (common/host_exec.h), as torch ops in
// the namespace tfk_sim with the same schemas as tfk's. Backend "cuda-sim"
// uses them to test and debug the CUDA kernels on machines without a GPU.
// Host mode is synchronous and single-threaded per launch.
#include <Python.h>

#include <torch/library.h>

#include "attention/ops.h"
#include "kvcache/ops.h"
#include "linear/ops.h"
#include "moe/ops.h"

namespace tfk {
namespace {

// The attention ops on CPU tensors (csrc/attention/ops.h): host mode runs a
// launch to completion before returning, so there is no stream to wait on.
struct Sim {
  static constexpr const char* kFwdName = "tfk_sim::attention_fwd_";
  static constexpr const char* kBwdName = "tfk_sim::attention_bwd_";
  static constexpr const char* kNamespace = "tfk_sim";  // for the MoE and linear ops' messages
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void* stream(const at::Tensor& q) {
    TORCH_CHECK(q.device().is_cpu(), "tfk_sim: tensors must be on the CPU, got ", q.device());
    return nullptr;
  }
  static void after_launch() {}
};

}  // namespace
}  // namespace tfk

// The namespace is tfk_sim; the race-check build (tests/test_cuda_sim.py)
// names another, so both can be loaded at once. TORCH_LIBRARY pastes its
// argument unexpanded: one more macro level expands TFK_SIM_NAMESPACE first.
#ifndef TFK_SIM_NAMESPACE
#define TFK_SIM_NAMESPACE tfk_sim
#endif
#define TFK_SIM_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define TFK_SIM_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

TFK_SIM_LIBRARY(TFK_SIM_NAMESPACE, m) {
  m.def(tfk::attention::kFwdSchema);
  m.def(tfk::attention::kBwdSchema);
  TFK_MOE_DEFS(m);
  TFK_LINEAR_DEFS(m);
  TFK_KVCACHE_DEFS(m);
}

TFK_SIM_LIBRARY_IMPL(TFK_SIM_NAMESPACE, m) {
  m.impl("attention_fwd_", &tfk::attention::ops::attention_fwd<tfk::Sim>);
  m.impl("attention_bwd_", &tfk::attention::ops::attention_bwd<tfk::Sim>);
  TFK_MOE_IMPLS(m, tfk::Sim);
  TFK_LINEAR_IMPLS(m, tfk::Sim);
  TFK_KVCACHE_IMPLS(m, tfk::Sim);
}

static PyModuleDef tfk_sim_module = {PyModuleDef_HEAD_INIT, "_sim",
                                     "tfk's CUDA kernels run on the CPU; ops live in torch.ops.tfk_sim.", -1,
                                     nullptr};

PyMODINIT_FUNC PyInit__sim(void) { return PyModule_Create(&tfk_sim_module); }
