// tfk._cpu: tfk's native CPU kernels as torch ops in the namespace tfk_cpu
// (the torch backends call them where they beat torch's own ops). The Python
// callers validate first; these checks keep the kernels memory-safe when an
// op is called directly.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "moe/experts_cpu.h"

namespace tfk {
namespace {

constexpr const char* kExpertsRowsSchema =
    "moe_experts_rows(Tensor x, Tensor token, Tensor ends, Tensor row_weight, Tensor gate_up_proj, "
    "Tensor down_proj, str act) -> Tensor";

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "tfk_cpu::moe_experts_rows: ", name, " is on ", t.device(), ", expected cpu");
  TORCH_CHECK(t.scalar_type() == dtype, "tfk_cpu::moe_experts_rows: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "tfk_cpu::moe_experts_rows: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "tfk_cpu::moe_experts_rows: ", name, " must be contiguous");
}

// rows (M, H): see moe/experts_cpu.h. x (T, H), token (M,) and ends (E,)
// int64, row_weight (M,), gate_up_proj (E, 2I, H), down_proj (E, H, I).
at::Tensor moe_experts_rows(const at::Tensor& x, const at::Tensor& token, const at::Tensor& ends,
                            const at::Tensor& row_weight, const at::Tensor& gate_up_proj,
                            const at::Tensor& down_proj, c10::string_view act) {
  TORCH_CHECK(x.dim() == 2 && gate_up_proj.dim() == 3, "tfk_cpu::moe_experts_rows: x must be (T, H) and "
              "gate_up_proj (E, 2I, H), got shapes ", x.sizes(), " and ", gate_up_proj.sizes());
  const int64_t T = x.size(0), H = x.size(1), E = gate_up_proj.size(0), I = gate_up_proj.size(1) / 2;
  TORCH_CHECK(token.dim() == 1, "tfk_cpu::moe_experts_rows: token must be (M,), got shape ", token.sizes());
  const int64_t M = token.size(0);
  check(x, "x", at::kFloat, {T, H});
  check(token, "token", at::kLong, {M});
  check(ends, "ends", at::kLong, {E});
  check(row_weight, "row_weight", at::kFloat, {M});
  check(gate_up_proj, "gate_up_proj", at::kFloat, {E, 2 * I, H});
  check(down_proj, "down_proj", at::kFloat, {E, H, I});
  moe::cpu::Act a;
  if (act == "silu") {
    a = moe::cpu::Act::kSilu;
  } else if (act == "gelu") {
    a = moe::cpu::Act::kGelu;
  } else if (act == "relu") {
    a = moe::cpu::Act::kRelu;
  } else {
    TORCH_CHECK(false, "tfk_cpu::moe_experts_rows: act must be silu, gelu or relu, got ", std::string(act));
  }
  const int64_t* e_ptr = ends.data_ptr<int64_t>();
  for (int64_t e = 0, start = 0; e < E; start = e_ptr[e++])
    TORCH_CHECK(e_ptr[e] >= start && e_ptr[e] <= M, "tfk_cpu::moe_experts_rows: ends must rise from 0 to M = ",
                M, ", got ends[", e, "] = ", e_ptr[e]);
  TORCH_CHECK(E == 0 ? M == 0 : e_ptr[E - 1] == M, "tfk_cpu::moe_experts_rows: ends[E-1] must be M = ", M);
  const int64_t* t_ptr = token.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(t_ptr[m] >= 0 && t_ptr[m] < T, "tfk_cpu::moe_experts_rows: token[", m, "] = ", t_ptr[m],
                " is outside [0, T = ", T, ")");
  at::Tensor rows = at::empty({M, H}, x.options());
  const moe::cpu::ExpertsRows p{x.data_ptr<float>(), t_ptr, e_ptr, row_weight.data_ptr<float>(),
                                gate_up_proj.data_ptr<float>(), down_proj.data_ptr<float>(),
                                rows.data_ptr<float>(), E, H, I, a};
  moe::cpu::experts_rows(p);
  return rows;
}

}  // namespace
}  // namespace tfk

TORCH_LIBRARY(tfk_cpu, m) { m.def(tfk::kExpertsRowsSchema); }

TORCH_LIBRARY_IMPL(tfk_cpu, CPU, m) { m.impl("moe_experts_rows", &tfk::moe_experts_rows); }

static PyModuleDef tfk_cpu_module = {PyModuleDef_HEAD_INIT, "_cpu",
                                     "tfk's native CPU kernels; ops live in torch.ops.tfk_cpu.", -1, nullptr};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&tfk_cpu_module); }
