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
constexpr const char* kExpertsForwardSchema =
    "moe_experts_forward(Tensor x, Tensor experts, Tensor weights, Tensor gate_up_proj, Tensor down_proj, "
    "str act, int capacity) -> Tensor";

// The checks of one op: tensors on the CPU, of a dtype and shape, contiguous.
struct Checker {
  const char* op;

  void operator()(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) const {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), ", expected cpu");
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }

  struct Sizes {
    int64_t T, H, E, I;
    moe::cpu::Dtype dtype;
  };

  // x (T, H), gate_up_proj (E, 2I, H) and down_proj (E, H, I) in one of the
  // kernel's dtypes.
  Sizes experts(const at::Tensor& x, const at::Tensor& gate_up_proj, const at::Tensor& down_proj) const {
    TORCH_CHECK(x.dim() == 2 && gate_up_proj.dim() == 3, op, ": x must be (T, H) and gate_up_proj (E, 2I, H), "
                "got shapes ", x.sizes(), " and ", gate_up_proj.sizes());
    const int64_t T = x.size(0), H = x.size(1), E = gate_up_proj.size(0), I = gate_up_proj.size(1) / 2;
    const at::ScalarType st = x.scalar_type();
    moe::cpu::Dtype dtype;
    if (st == at::kFloat) {
      dtype = moe::cpu::Dtype::kFloat32;
    } else if (st == at::kBFloat16) {
      dtype = moe::cpu::Dtype::kBFloat16;
    } else if (st == at::kHalf) {
      dtype = moe::cpu::Dtype::kFloat16;
    } else {
      TORCH_CHECK(false, op, ": x must be float32, bfloat16 or float16, got ", st);
    }
    (*this)(x, "x", st, {T, H});
    (*this)(gate_up_proj, "gate_up_proj", st, {E, 2 * I, H});
    (*this)(down_proj, "down_proj", st, {E, H, I});
    return {T, H, E, I, dtype};
  }

  moe::cpu::Act act(c10::string_view name) const {
    if (name == "silu") return moe::cpu::Act::kSilu;
    if (name == "gelu") return moe::cpu::Act::kGelu;
    if (name == "relu") return moe::cpu::Act::kRelu;
    TORCH_CHECK(false, op, ": act must be silu, gelu or relu, got ", std::string(name));
  }
};

// rows (M, H) float32: see moe/experts_cpu.h. token (M,) and ends (E,)
// int64; row_weight (M,) float32.
at::Tensor moe_experts_rows(const at::Tensor& x, const at::Tensor& token, const at::Tensor& ends,
                            const at::Tensor& row_weight, const at::Tensor& gate_up_proj,
                            const at::Tensor& down_proj, c10::string_view act) {
  const Checker check{"tfk_cpu::moe_experts_rows"};
  const auto [T, H, E, I, dtype] = check.experts(x, gate_up_proj, down_proj);
  TORCH_CHECK(token.dim() == 1, check.op, ": token must be (M,), got shape ", token.sizes());
  const int64_t M = token.size(0);
  check(token, "token", at::kLong, {M});
  check(ends, "ends", at::kLong, {E});
  check(row_weight, "row_weight", at::kFloat, {M});
  const moe::cpu::Act a = check.act(act);
  const int64_t* e_ptr = ends.data_ptr<int64_t>();
  for (int64_t e = 0, start = 0; e < E; start = e_ptr[e++])
    TORCH_CHECK(e_ptr[e] >= start && e_ptr[e] <= M, check.op, ": ends must rise from 0 to M = ", M,
                ", got ends[", e, "] = ", e_ptr[e]);
  TORCH_CHECK(E == 0 ? M == 0 : e_ptr[E - 1] == M, check.op, ": ends[E-1] must be M = ", M);
  const int64_t* t_ptr = token.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(t_ptr[m] >= 0 && t_ptr[m] < T, check.op, ": token[", m, "] = ", t_ptr[m],
                " is outside [0, T = ", T, ")");
  at::Tensor rows = at::empty({M, H}, x.options().dtype(at::kFloat));
  moe::cpu::experts_rows({x.data_ptr(), t_ptr, e_ptr, row_weight.data_ptr<float>(), gate_up_proj.data_ptr(),
                          down_proj.data_ptr(), rows.data_ptr<float>(), E, H, I, a, dtype});
  return rows;
}

// out (T, H) float32: see moe/experts_cpu.h. experts (T, k) int64 ids (E and
// -1 are dropped sentinels; others must be in [0, E)); weights (T, k) float32;
// capacity < 0 keeps every assignment.
at::Tensor moe_experts_forward(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                               const at::Tensor& gate_up_proj, const at::Tensor& down_proj, c10::string_view act,
                               int64_t capacity) {
  const Checker check{"tfk_cpu::moe_experts_forward"};
  const auto [T, H, E, I, dtype] = check.experts(x, gate_up_proj, down_proj);
  TORCH_CHECK(experts.dim() == 2, check.op, ": experts must be (T, k), got shape ", experts.sizes());
  const int64_t k = experts.size(1);
  check(experts, "experts", at::kLong, {T, k});
  check(weights, "weights", at::kFloat, {T, k});
  const moe::cpu::Act a = check.act(act);
  const int64_t* ids = experts.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i)
    TORCH_CHECK(ids[i] >= -1 && ids[i] <= E, check.op, ": experts has id ", ids[i], "; ids must be in [0, E = ",
                E, "), or E or -1 (dropped)");
  at::Tensor out = at::empty({T, H}, x.options().dtype(at::kFloat));
  moe::cpu::experts_forward({x.data_ptr(), ids, weights.data_ptr<float>(), gate_up_proj.data_ptr(),
                             down_proj.data_ptr(), out.data_ptr<float>(), T, k, E, H, I, capacity, a, dtype});
  return out;
}

}  // namespace
}  // namespace tfk

TORCH_LIBRARY(tfk_cpu, m) {
  m.def(tfk::kExpertsRowsSchema);
  m.def(tfk::kExpertsForwardSchema);
}

TORCH_LIBRARY_IMPL(tfk_cpu, CPU, m) {
  m.impl("moe_experts_rows", &tfk::moe_experts_rows);
  m.impl("moe_experts_forward", &tfk::moe_experts_forward);
}

static PyModuleDef tfk_cpu_module = {PyModuleDef_HEAD_INIT, "_cpu",
                                     "tfk's native CPU kernels; ops live in torch.ops.tfk_cpu.", -1, nullptr};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&tfk_cpu_module); }
