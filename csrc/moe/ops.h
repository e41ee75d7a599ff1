// Torch side of the MoE kernels, shared by the CUDA bindings (csrc/bindings.cpp,
// namespace tfk) and the host-execution bindings (csrc/sim/bindings.cpp,
// namespace tfk_sim): op schemas, argument checks, and kernel parameters
// filled from tensors. Include from .cpp files only.
//
// The Python launchers (tfk/ops/moe/cuda_kernels.py) refuse bad arguments
// with a ValueError first; these checks keep the kernels memory-safe when the
// ops are called directly. Value checks (offsets in order, gathered ids in
// range) need the data on the host: they are made for CPU tensors only (on
// CUDA they would synchronise; they are the caller's there).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "moe/moe.h"

namespace tfk {
namespace moe {

constexpr const char* kGemmSchema =
    "moe_grouped_gemm(Tensor a, Tensor b, Tensor offs, Tensor? gather=None, bool trans_b=False, "
    "str act='none', Tensor? row_scale=None) -> Tensor";
constexpr const char* kGemmOutSchema =
    "moe_grouped_gemm.out(Tensor a, Tensor b, Tensor offs, Tensor? gather=None, bool trans_b=False, "
    "str act='none', Tensor? row_scale=None, *, Tensor(a!) out) -> Tensor(a!)";
constexpr const char* kGemmTnSchema =
    "moe_grouped_gemm_tn(Tensor a, Tensor b, Tensor offs, Tensor? gather_a=None) -> Tensor";
constexpr const char* kGemmTnOutSchema =
    "moe_grouped_gemm_tn.out(Tensor a, Tensor b, Tensor offs, Tensor? gather_a=None, *, Tensor(a!) out) "
    "-> Tensor(a!)";
constexpr const char* kCombineSchema = "moe_combine(Tensor y, Tensor index, int k) -> Tensor";
constexpr const char* kCombineOutSchema =
    "moe_combine.out(Tensor y, Tensor index, int k, *, Tensor(a!) out) -> Tensor(a!)";
constexpr const char* kActBwdSchema = "moe_act_backward(Tensor gate_up, Tensor grad_h, str act) -> Tensor";
constexpr const char* kActBwdOutSchema =
    "moe_act_backward.out(Tensor gate_up, Tensor grad_h, str act, *, Tensor(a!) out) -> Tensor(a!)";
constexpr const char* kRouteSchema =
    "moe_route(Tensor logits, int top_k, str score='softmax', bool normalize=True, Tensor? bias=None, "
    "int n_group=0, int topk_group=0, float scaling=1.0) -> (Tensor, Tensor, Tensor)";
constexpr const char* kRouteOutSchema =
    "moe_route.out(Tensor logits, int top_k, str score='softmax', bool normalize=True, Tensor? bias=None, "
    "int n_group=0, int topk_group=0, float scaling=1.0, *, Tensor(a!) weights, Tensor(b!) experts, "
    "Tensor(c!) counts) -> (Tensor(a!), Tensor(b!), Tensor(c!))";

namespace ops {

struct Checker {
  std::string op;
  c10::Device device;

  void tensor(const at::Tensor& t, const char* name, int dims) const {
    TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.dim() == dims, op, ": ", name, " must have ", dims, " dims, got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  void dtype(const at::Tensor& t, const char* name, at::ScalarType expected) const {
    TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ", t.scalar_type());
  }
  void shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) const {
    TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
  }
  // The 16-bit kernels read rows in 16-byte chunks (cp.async).
  void aligned(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
                "'s data must be 16-byte aligned");
  }
  void multiple_of_8(int64_t x, const char* name) const {
    TORCH_CHECK(x % 8 == 0, op, ": ", name, " = ", x, " must be a multiple of 8 (rows move in 16-byte chunks)");
  }
  // On the op's device, contiguous, of dtype `expected` and shape `sizes`.
  void exact(const at::Tensor& t, const char* name, at::ScalarType expected, at::IntArrayRef sizes) const {
    tensor(t, name, static_cast<int>(sizes.size()));
    dtype(t, name, expected);
    shape(t, name, sizes);
  }
  void out(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef sizes) const {
    exact(t, "out", like.scalar_type(), sizes);
  }
  // The 16-bit kernels' operands and output.
  void aligned_16bit(Dtype d, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) const {
    if (d == Dtype::kFloat) return;
    aligned(a, "a");
    aligned(b, "b");
    aligned(out, "out");
  }
};

inline Dtype kernel_dtype(const Checker& c, const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kFloat: return Dtype::kFloat;
    default: TORCH_CHECK(false, c.op, ": ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
  return Dtype::kFloat;
}

inline Act parse_act(const Checker& c, c10::string_view act) {
  if (act == "none") return Act::kNone;
  if (act == "silu") return Act::kSilu;
  if (act == "gelu_tanh") return Act::kGeluTanh;
  if (act == "relu") return Act::kRelu;
  TORCH_CHECK(false, c.op, ": act must be 'none', 'silu', 'gelu_tanh' or 'relu', got '", std::string(act), "'");
  return Act::kNone;
}

// offs (G,) int64 cumulative row ends over `rows` rows; on CPU: in order and in range.
inline void check_offs(const Checker& c, const at::Tensor& offs, int64_t groups, int64_t rows) {
  c.tensor(offs, "offs", 1);
  c.dtype(offs, "offs", at::kLong);
  TORCH_CHECK(offs.size(0) == groups && groups >= 1, c.op, ": offs must have shape (", groups,
              ",) with at least one group, got ", offs.sizes());
  if (!offs.device().is_cpu()) return;
  const int64_t* o = offs.data_ptr<int64_t>();
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(o[g] >= (g ? o[g - 1] : 0) && o[g] <= rows, c.op,
                ": offs must be non-decreasing cumulative row ends in [0, ", rows, "], got offs[", g, "] = ", o[g]);
  }
}

// gather (rows,) int64; on CPU: the ids of the first `used` rows in [0, sources).
inline const int64_t* check_gather(const Checker& c, const c10::optional<at::Tensor>& gather, const char* name,
                                   int64_t used, int64_t sources) {
  if (!gather) return nullptr;
  c.tensor(*gather, name, 1);
  c.dtype(*gather, name, at::kLong);
  const int64_t* ids = gather->data_ptr<int64_t>();
  if (gather->device().is_cpu()) {
    for (int64_t r = 0; r < used; ++r) {
      TORCH_CHECK(ids[r] >= 0 && ids[r] < sources, c.op, ": ", name, "[", r, "] = ", ids[r],
                  " is outside [0, ", sources, ")");
    }
  }
  return ids;
}

inline int64_t last_offset(const at::Tensor& offs) {
  return offs.device().is_cpu() ? offs.data_ptr<int64_t>()[offs.size(0) - 1] : 0;
}

// The ops' implementations for one kind of device. Device supplies
//   kNamespace           "tfk" or "tfk_sim", for messages
//   stream(t)            checks t's device, returns the stream to launch on
//   Guard(device)        makes `device` current while the op runs
//   after_launch()       surfaces launch errors
template <typename Device>
at::Tensor& grouped_gemm_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                             const c10::optional<at::Tensor>& gather, bool trans_b, c10::string_view act,
                             const c10::optional<at::Tensor>& row_scale, at::Tensor& out) {
  const Checker c{std::string(Device::kNamespace) + "::moe_grouped_gemm", a.device()};
  void* const stream = Device::stream(a);
  const typename Device::Guard guard(a.device());
  GemmParams p;
  p.dtype = kernel_dtype(c, a, "a");
  p.act = parse_act(c, act);
  p.trans_b = trans_b;
  c.tensor(a, "a", 2);
  c.tensor(b, "b", 3);
  c.dtype(b, "b", a.scalar_type());
  const int64_t G = b.size(0), K = a.size(1);
  const int64_t bk = trans_b ? b.size(2) : b.size(1), N = trans_b ? b.size(1) : b.size(2);
  TORCH_CHECK(bk == K, c.op, ": b's K dimension is ", bk, ", a has K = ", K, " columns (trans_b=", trans_b, ")");
  c.multiple_of_8(K, "K");
  c.multiple_of_8(N, "N");
  const int64_t n_out = p.act == Act::kNone ? N : N / 2;
  if (p.act != Act::kNone) c.multiple_of_8(n_out, "N / 2 (the gate and up halves)");
  const int64_t M = gather ? gather->numel() : a.size(0);
  TORCH_CHECK(M < std::numeric_limits<int32_t>::max() - kBlockM, c.op, ": too many rows (", M, ")");
  TORCH_CHECK((n_out + kBlockN - 1) / kBlockN <= 65535, c.op, ": too many columns (", n_out, ")");
  check_offs(c, offs, G, M);
  p.gather = check_gather(c, gather, "gather", last_offset(offs), a.size(0));
  if (row_scale) {
    c.exact(*row_scale, "row_scale", at::kFloat, {M});
    p.row_scale = row_scale->data_ptr<float>();
  }
  c.out(out, a, {M, n_out});
  c.aligned_16bit(p.dtype, a, b, out);
  p.m = M;
  p.k = K;
  p.n = N;
  p.groups = G;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.offs = offs.data_ptr<int64_t>();
  p.c = out.data_ptr();
  if (M == 0 || n_out == 0) return out;
  const at::Tensor tile_map = at::empty({max_row_tiles(M, G), 2}, a.options().dtype(at::kInt));
  p.tile_map = tile_map.data_ptr<int32_t>();
  grouped_gemm_launch(p, stream);
  Device::after_launch();
  return out;
}

template <typename Device>
at::Tensor grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                        const c10::optional<at::Tensor>& gather, bool trans_b, c10::string_view act,
                        const c10::optional<at::Tensor>& row_scale) {
  const int64_t M = gather ? gather->numel() : a.size(0);
  const int64_t N = b.dim() == 3 ? (trans_b ? b.size(1) : b.size(2)) : 0;
  at::Tensor out = at::empty({M, act == "none" ? N : N / 2}, a.options());
  return grouped_gemm_out<Device>(a, b, offs, gather, trans_b, act, row_scale, out);
}

template <typename Device>
at::Tensor& grouped_gemm_tn_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                                const c10::optional<at::Tensor>& gather_a, at::Tensor& out) {
  const Checker c{std::string(Device::kNamespace) + "::moe_grouped_gemm_tn", a.device()};
  void* const stream = Device::stream(a);
  const typename Device::Guard guard(a.device());
  GemmTnParams p;
  p.dtype = kernel_dtype(c, a, "a");
  c.tensor(a, "a", 2);
  c.tensor(b, "b", 2);
  c.dtype(b, "b", a.scalar_type());
  const int64_t M = b.size(0), K = a.size(1), N = b.size(1);
  c.multiple_of_8(K, "K");
  c.multiple_of_8(N, "N");
  TORCH_CHECK(K <= 65535LL * 64 && N <= 65535LL * 64, c.op, ": K and N must be at most ", 65535LL * 64);
  TORCH_CHECK(offs.dim() == 1, c.op, ": offs must be 1-D, got shape ", offs.sizes());
  const int64_t G = offs.size(0);
  check_offs(c, offs, G, M);
  if (gather_a) {
    c.shape(*gather_a, "gather_a", {M});
  } else {
    TORCH_CHECK(a.size(0) == M, c.op, ": a has ", a.size(0), " rows, b has ", M,
                " (without gather_a they must match)");
  }
  p.gather_a = check_gather(c, gather_a, "gather_a", last_offset(offs), a.size(0));
  c.out(out, a, {G, K, N});
  c.aligned_16bit(p.dtype, a, b, out);
  p.m = M;
  p.k = K;
  p.n = N;
  p.groups = G;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.offs = offs.data_ptr<int64_t>();
  p.c = out.data_ptr();
  grouped_gemm_tn_launch(p, stream);
  Device::after_launch();
  return out;
}

template <typename Device>
at::Tensor grouped_gemm_tn(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                           const c10::optional<at::Tensor>& gather_a) {
  at::Tensor out = at::empty({offs.size(0), a.size(1), b.size(1)}, a.options());
  return grouped_gemm_tn_out<Device>(a, b, offs, gather_a, out);
}

template <typename Device>
at::Tensor& combine_out(const at::Tensor& y, const at::Tensor& index, int64_t k, at::Tensor& out) {
  const Checker c{std::string(Device::kNamespace) + "::moe_combine", y.device()};
  void* const stream = Device::stream(y);
  const typename Device::Guard guard(y.device());
  CombineParams p;
  p.dtype = kernel_dtype(c, y, "y");
  c.tensor(y, "y", 2);
  c.tensor(index, "index", 1);
  c.dtype(index, "index", at::kLong);
  TORCH_CHECK(k >= 1, c.op, ": k must be positive, got ", k);
  TORCH_CHECK(index.size(0) % k == 0, c.op, ": index's length ", index.size(0), " is not a multiple of k = ", k);
  const int64_t T = index.size(0) / k, H = y.size(1);
  c.multiple_of_8(H, "H");
  if (index.device().is_cpu()) {
    const int64_t* ids = index.data_ptr<int64_t>();
    for (int64_t i = 0; i < index.size(0); ++i) {
      TORCH_CHECK(ids[i] >= -1 && ids[i] < y.size(0), c.op, ": index[", i, "] = ", ids[i],
                  " must be -1 or lie in [0, ", y.size(0), ")");
    }
  }
  c.out(out, y, {T, H});
  p.tokens = T;
  p.k = k;
  p.h = H;
  p.y_rows = y.size(0);
  p.y = y.data_ptr();
  p.index = index.data_ptr<int64_t>();
  p.out = out.data_ptr();
  combine_launch(p, stream);
  Device::after_launch();
  return out;
}

template <typename Device>
at::Tensor combine(const at::Tensor& y, const at::Tensor& index, int64_t k) {
  TORCH_CHECK(k >= 1, Device::kNamespace, "::moe_combine: k must be positive, got ", k);
  at::Tensor out = at::empty({index.numel() / k, y.dim() == 2 ? y.size(1) : 0}, y.options());
  return combine_out<Device>(y, index, k, out);
}

template <typename Device>
at::Tensor& act_backward_out(const at::Tensor& gate_up, const at::Tensor& grad_h, c10::string_view act,
                             at::Tensor& out) {
  const Checker c{std::string(Device::kNamespace) + "::moe_act_backward", gate_up.device()};
  void* const stream = Device::stream(gate_up);
  const typename Device::Guard guard(gate_up.device());
  ActBwdParams p;
  p.dtype = kernel_dtype(c, gate_up, "gate_up");
  p.act = parse_act(c, act);
  TORCH_CHECK(p.act != Act::kNone, c.op, ": act must be 'silu', 'gelu_tanh' or 'relu'");
  c.tensor(gate_up, "gate_up", 2);
  c.tensor(grad_h, "grad_h", 2);
  c.dtype(grad_h, "grad_h", gate_up.scalar_type());
  const int64_t M = gate_up.size(0), N = gate_up.size(1);
  TORCH_CHECK(N % 2 == 0, c.op, ": gate_up must have an even number of columns, got ", N);
  c.shape(grad_h, "grad_h", {M, N / 2});
  c.out(out, gate_up, {M, N});
  p.m = M;
  p.i = N / 2;
  p.gate_up = gate_up.data_ptr();
  p.grad_h = grad_h.data_ptr();
  p.out = out.data_ptr();
  act_backward_launch(p, stream);
  Device::after_launch();
  return out;
}

template <typename Device>
at::Tensor act_backward(const at::Tensor& gate_up, const at::Tensor& grad_h, c10::string_view act) {
  at::Tensor out = at::empty(gate_up.sizes(), gate_up.options());
  return act_backward_out<Device>(gate_up, grad_h, act, out);
}

// weights (T, k) float32, experts (T, k) int64, counts (E,) int64 (zeroed here).
template <typename Device>
std::tuple<at::Tensor&, at::Tensor&, at::Tensor&> route_out(
    const at::Tensor& logits, int64_t top_k, c10::string_view score, bool normalize,
    const c10::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group, double scaling,
    at::Tensor& weights, at::Tensor& experts, at::Tensor& counts) {
  const Checker c{std::string(Device::kNamespace) + "::moe_route", logits.device()};
  void* const stream = Device::stream(logits);
  const typename Device::Guard guard(logits.device());
  RouteParams p;
  p.dtype = kernel_dtype(c, logits, "logits");
  c.tensor(logits, "logits", 2);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= kRouteMaxExperts, c.op, ": logits has E = ", E, " experts; the kernel takes 1 to ",
              kRouteMaxExperts);
  TORCH_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(E, kRouteMaxTopK), c.op, ": top_k = ", top_k,
              " must lie in [1, ", std::min<int64_t>(E, kRouteMaxTopK), "]");
  TORCH_CHECK(score == "softmax" || score == "sigmoid", c.op, ": score must be 'softmax' or 'sigmoid', got '",
              std::string(score), "'");
  if (n_group != 0) {
    TORCH_CHECK(n_group >= 1 && E % n_group == 0 && E / n_group >= 2, c.op, ": n_group = ", n_group,
                " must divide E = ", E, " into groups of at least 2 experts (0: no group limit)");
    TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, c.op, ": topk_group = ", topk_group,
                " must lie in [1, n_group = ", n_group, "]");
    TORCH_CHECK(top_k <= topk_group * (E / n_group), c.op, ": top_k = ", top_k, " exceeds the ",
                topk_group * (E / n_group), " experts of the kept groups");
  }
  if (bias) {
    c.exact(*bias, "bias", at::kFloat, {E});
    p.bias = bias->data_ptr<float>();
  }
  c.exact(weights, "weights", at::kFloat, {T, top_k});
  c.exact(experts, "experts", at::kLong, {T, top_k});
  c.exact(counts, "counts", at::kLong, {E});
  p.tokens = T;
  p.experts = static_cast<int>(E);
  p.top_k = static_cast<int>(top_k);
  p.sigmoid = score == "sigmoid";
  p.normalize = normalize;
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.scaling = static_cast<float>(scaling);
  p.logits = logits.data_ptr();
  p.weights = weights.data_ptr<float>();
  p.expert_ids = experts.data_ptr<int64_t>();
  p.counts = counts.data_ptr<int64_t>();
  route_launch(p, stream);
  Device::after_launch();
  return {weights, experts, counts};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& logits, int64_t top_k,
                                                      c10::string_view score, bool normalize,
                                                      const c10::optional<at::Tensor>& bias, int64_t n_group,
                                                      int64_t topk_group, double scaling) {
  const int64_t T = logits.dim() == 2 ? logits.size(0) : 0, E = logits.dim() == 2 ? logits.size(1) : 0;
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor experts = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  at::Tensor counts = at::empty({E}, logits.options().dtype(at::kLong));
  route_out<Device>(logits, top_k, score, normalize, bias, n_group, topk_group, scaling, weights, experts, counts);
  return {weights, experts, counts};
}

}  // namespace ops
}  // namespace moe
}  // namespace tfk

// The schemas and implementations of the MoE ops, for a TORCH_LIBRARY block
// (m) and a TORCH_LIBRARY_IMPL block (m) of one device.
#define TFK_MOE_DEFS(m)                                  \
  do {                                                   \
    (m).def(tfk::moe::kGemmSchema);                      \
    (m).def(tfk::moe::kGemmOutSchema);                   \
    (m).def(tfk::moe::kGemmTnSchema);                    \
    (m).def(tfk::moe::kGemmTnOutSchema);                 \
    (m).def(tfk::moe::kCombineSchema);                   \
    (m).def(tfk::moe::kCombineOutSchema);                \
    (m).def(tfk::moe::kActBwdSchema);                    \
    (m).def(tfk::moe::kActBwdOutSchema);                 \
    (m).def(tfk::moe::kRouteSchema);                     \
    (m).def(tfk::moe::kRouteOutSchema);                  \
  } while (0)

#define TFK_MOE_IMPLS(m, Device)                                                          \
  do {                                                                                    \
    (m).impl("moe_grouped_gemm", &tfk::moe::ops::grouped_gemm<Device>);                   \
    (m).impl("moe_grouped_gemm.out", &tfk::moe::ops::grouped_gemm_out<Device>);           \
    (m).impl("moe_grouped_gemm_tn", &tfk::moe::ops::grouped_gemm_tn<Device>);             \
    (m).impl("moe_grouped_gemm_tn.out", &tfk::moe::ops::grouped_gemm_tn_out<Device>);     \
    (m).impl("moe_combine", &tfk::moe::ops::combine<Device>);                             \
    (m).impl("moe_combine.out", &tfk::moe::ops::combine_out<Device>);                     \
    (m).impl("moe_act_backward", &tfk::moe::ops::act_backward<Device>);                   \
    (m).impl("moe_act_backward.out", &tfk::moe::ops::act_backward_out<Device>);           \
    (m).impl("moe_route", &tfk::moe::ops::route<Device>);                                 \
    (m).impl("moe_route.out", &tfk::moe::ops::route_out<Device>);                         \
  } while (0)
