// Torch side of the linear-attention kernels, shared by the CUDA bindings
// (csrc/bindings.cpp, namespace tfk) and the host-execution bindings
// (csrc/sim/bindings.cpp, namespace tfk_sim): op schemas, argument checks and
// kernel parameters filled from tensors. Include from .cpp files only.
//
// The Python launchers (tfk/ops/linear/cuda_kernels.py) refuse bad arguments
// with a ValueError first; these checks keep the kernels memory-safe when the
// ops are called directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "linear/linear.h"

namespace tfk {
namespace linear {

// feature_map: FeatureMap (0 identity, 1 elu1, 2 relu, 3 softmax: non-causal,
// with kstats from linear_softmax_stats); keep (B, S) bool or none;
// ones: v is (B, Hkv, S, E - 1) and V' = [v, 1].
constexpr const char* kFwdSchema =
    "linear_fwd(Tensor q, Tensor k, Tensor v, Tensor? s0, bool causal, int feature_map=0, Tensor? keep=None, "
    "bool ones=False, Tensor? kstats=None) -> (Tensor, Tensor)";
constexpr const char* kFwdOutSchema =
    "linear_fwd.out(Tensor q, Tensor k, Tensor v, Tensor? s0, bool causal, int feature_map=0, Tensor? keep=None, "
    "bool ones=False, Tensor? kstats=None, *, Tensor(a!) o, Tensor(b!) s) -> (Tensor(a!), Tensor(b!))";
// k (B, Hkv, S, D), keep (B, S) bool or none -> (B, Hkv, 2, D) float32: per
// channel the max over the kept keys and 1 / sum exp(k - max) (linear.h).
constexpr const char* kStatsSchema = "linear_softmax_stats(Tensor k, Tensor? keep=None) -> Tensor";
constexpr const char* kStatsOutSchema =
    "linear_softmax_stats.out(Tensor k, Tensor? keep=None, *, Tensor(a!) out) -> Tensor(a!)";

namespace ops {

struct Checker {
  std::string op;
  c10::Device device;

  void exact(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) const {
    TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
};

// q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, E) (ones: E - 1 columns), s0 (B, Hkv, D, E)
// float32 or none, keep (B, S) bool or none; o (B, H, L, E) float32, s (B, Hkv, D, E) float32.
template <typename Device>
std::tuple<at::Tensor&, at::Tensor&> fwd_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const c10::optional<at::Tensor>& s0, bool causal, int64_t feature_map,
                                             const c10::optional<at::Tensor>& keep, bool ones,
                                             const c10::optional<at::Tensor>& kstats, at::Tensor& o,
                                             at::Tensor& s) {
  const Checker c{std::string(Device::kNamespace) + "::linear_fwd", q.device()};
  void* const stream = Device::stream(q);
  const typename Device::Guard guard(q.device());
  FwdParams p;
  switch (q.scalar_type()) {
    case at::kHalf: p.dtype = Dtype::kHalf; break;
    case at::kBFloat16: p.dtype = Dtype::kBFloat16; break;
    case at::kFloat: p.dtype = Dtype::kFloat; break;
    default: TORCH_CHECK(false, c.op, ": q must be float16, bfloat16 or float32, got ", q.scalar_type());
  }
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, c.op, ": q, k and v must have 4 dims, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), E = v.size(3) + (ones ? 1 : 0);
  TORCH_CHECK(feature_map >= 0 && feature_map <= 3, c.op, ": feature_map must be 0 (identity), 1 (elu1), 2 (relu) "
              "or 3 (softmax), got ", feature_map);
  TORCH_CHECK(feature_map != 3 || !causal, c.op, ": the softmax feature map is non-causal only");
  TORCH_CHECK(feature_map != 3 || kstats.has_value(), c.op, ": the softmax feature map needs kstats "
              "(linear_softmax_stats of k)");
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, c.op, ": H = ", H, " must be a multiple of Hkv = ", Hkv);
  TORCH_CHECK(D >= 1 && D <= kMaxDim, c.op, ": D = ", D, " must lie in [1, ", kMaxDim, "]");
  TORCH_CHECK(E >= 1 && E <= kMaxDim, c.op, ": E = Dv + 1 = ", E, " must lie in [1, ", kMaxDim, "]");
  TORCH_CHECK(!causal || S == L, c.op, ": causal needs as many keys as queries, got S = ", S, ", L = ", L);
  TORCH_CHECK(B * Hkv <= std::numeric_limits<int32_t>::max(), c.op, ": too many (batch, KV head) pairs");
  c.exact(q, "q", q.scalar_type(), {B, H, L, D});
  c.exact(k, "k", q.scalar_type(), {B, Hkv, S, D});
  c.exact(v, "v", q.scalar_type(), {B, Hkv, S, ones ? E - 1 : E});
  if (keep) {
    c.exact(*keep, "keep", at::kBool, {B, S});
    p.keep = reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>());
  }
  if (kstats && feature_map == 3) {
    c.exact(*kstats, "kstats", at::kFloat, {B, Hkv, 2, D});
    p.kstats = kstats->data_ptr<float>();
  }
  p.fmap = static_cast<FeatureMap>(feature_map);
  p.ones = ones;
  if (s0) {
    c.exact(*s0, "s0", at::kFloat, {B, Hkv, D, E});
    p.s0 = s0->data_ptr<float>();
  }
  c.exact(o, "o", at::kFloat, {B, H, L, E});
  c.exact(s, "s", at::kFloat, {B, Hkv, D, E});
  p.causal = causal;
  p.batch = B;
  p.heads = H;
  p.kv_heads = Hkv;
  p.len_q = L;
  p.len_k = S;
  p.dim = static_cast<int>(D);
  p.vdim = static_cast<int>(E);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr<float>();
  p.s = s.data_ptr<float>();
  fwd_launch(p, stream);
  Device::after_launch();
  return {o, s};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const c10::optional<at::Tensor>& s0, bool causal, int64_t feature_map,
                                       const c10::optional<at::Tensor>& keep, bool ones,
                                       const c10::optional<at::Tensor>& kstats) {
  const bool ok = q.dim() == 4 && k.dim() == 4 && v.dim() == 4;
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t E = ok ? v.size(3) + (ones ? 1 : 0) : 0;
  at::Tensor o = at::empty(ok ? std::vector<int64_t>{q.size(0), q.size(1), q.size(2), E}
                              : std::vector<int64_t>{0}, f32);
  at::Tensor s = at::empty(ok ? std::vector<int64_t>{k.size(0), k.size(1), k.size(3), E}
                              : std::vector<int64_t>{0}, f32);
  fwd_out<Device>(q, k, v, s0, causal, feature_map, keep, ones, kstats, o, s);
  return {o, s};
}

// k (B, Hkv, S, D) fp16/bf16/fp32, keep (B, S) bool or none; out (B, Hkv, 2, D) float32.
template <typename Device>
at::Tensor& softmax_stats_out(const at::Tensor& k, const c10::optional<at::Tensor>& keep, at::Tensor& out) {
  const Checker c{std::string(Device::kNamespace) + "::linear_softmax_stats", k.device()};
  void* const stream = Device::stream(k);
  const typename Device::Guard guard(k.device());
  StatsParams p;
  switch (k.scalar_type()) {
    case at::kHalf: p.dtype = Dtype::kHalf; break;
    case at::kBFloat16: p.dtype = Dtype::kBFloat16; break;
    case at::kFloat: p.dtype = Dtype::kFloat; break;
    default: TORCH_CHECK(false, c.op, ": k must be float16, bfloat16 or float32, got ", k.scalar_type());
  }
  TORCH_CHECK(k.dim() == 4, c.op, ": k must have 4 dims, got ", k.sizes());
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3);
  TORCH_CHECK(D >= 1 && D <= kMaxDim, c.op, ": D = ", D, " must lie in [1, ", kMaxDim, "]");
  TORCH_CHECK(B * Hkv <= std::numeric_limits<int32_t>::max(), c.op, ": too many (batch, KV head) pairs");
  c.exact(k, "k", k.scalar_type(), {B, Hkv, S, D});
  if (keep) {
    c.exact(*keep, "keep", at::kBool, {B, S});
    p.keep = reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>());
  }
  c.exact(out, "out", at::kFloat, {B, Hkv, 2, D});
  p.batch = B;
  p.kv_heads = Hkv;
  p.len_k = S;
  p.dim = static_cast<int>(D);
  p.k = k.data_ptr();
  p.stats = out.data_ptr<float>();
  softmax_stats_launch(p, stream);
  Device::after_launch();
  return out;
}

template <typename Device>
at::Tensor softmax_stats(const at::Tensor& k, const c10::optional<at::Tensor>& keep) {
  const bool ok = k.dim() == 4;
  at::Tensor out = at::empty(ok ? std::vector<int64_t>{k.size(0), k.size(1), 2, k.size(3)} : std::vector<int64_t>{0},
                             k.options().dtype(at::kFloat));
  softmax_stats_out<Device>(k, keep, out);
  return out;
}

}  // namespace ops
}  // namespace linear
}  // namespace tfk

#define TFK_LINEAR_DEFS(m)                                                                \
  do {                                                                                    \
    (m).def(tfk::linear::kFwdSchema);                                                     \
    (m).def(tfk::linear::kFwdOutSchema);                                                  \
    (m).def(tfk::linear::kStatsSchema);                                                   \
    (m).def(tfk::linear::kStatsOutSchema);                                                \
  } while (0)

#define TFK_LINEAR_IMPLS(m, Device)                                                       \
  do {                                                                                    \
    (m).impl("linear_fwd", &tfk::linear::ops::fwd<Device>);                               \
    (m).impl("linear_fwd.out", &tfk::linear::ops::fwd_out<Device>);                       \
    (m).impl("linear_softmax_stats", &tfk::linear::ops::softmax_stats<Device>);           \
    (m).impl("linear_softmax_stats.out", &tfk::linear::ops::softmax_stats_out<Device>);   \
  } while (0)
