// Torch side of the split-KV decoding kernels (csrc/kvcache/kvcache.h),
// shared by the CUDA bindings (csrc/bindings.cpp, namespace tfk) and the
// host-execution bindings (csrc/sim/bindings.cpp, namespace tfk_sim): the op
// schema, argument checks and kernel parameters filled from tensors. Include
// from .cpp files only.
//
// The Python side (tfk/ops/kvcache/cuda_backend.py) pads q to the kernels'
// head dim and the caches to a multiple of 8 columns; these checks keep the
// kernels memory-safe when the op is called directly. The cache_seqlens
// values stay on the device: the kernel reads only positions in [0, capacity)
// whatever they are (whether they are valid, s_b + Lq <= capacity, is the
// caller's business), and trusts block_table's entries for the pages it reads.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <limits>
#include <string>

#include "kvcache/kvcache.h"

namespace tfk {
namespace kvcache {

// q (B, H, Lq, head_dim 64 or 128) fp16/bf16; k_cache (B, Hkv, Lmax, D) and
// v_cache (B, Hkv, Lmax, Dv), or paged (num_blocks, Hkv, page, D / Dv) with
// block_table int32 (B, max_pages); cache_seqlens int32 (B,); left / right
// the band's sides (None: unbounded); out (B, H, Lq, Dv') in q's dtype with
// Dv' <= Dv (the columns of a padded v_cache that are not padding), lse
// (B, H, Lq) float32, written in full; tiles int32 (1,) or None: += the key
// tiles computed per (batch, key head).
constexpr const char* kFwdSchema =
    "kvcache_fwd_(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
    "int? left, int? right, float scale, int num_splits, Tensor(a!) out, Tensor(b!) lse, "
    "Tensor(c!)? tiles=None) -> ()";

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
  void aligned(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
                " must start at a 16-byte aligned address (the kernel copies 16-byte chunks)");
  }
};

template <typename Device>
void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seqlens,
         const c10::optional<at::Tensor>& block_table, c10::optional<int64_t> left, c10::optional<int64_t> right,
         double scale, int64_t num_splits, const at::Tensor& out, const at::Tensor& lse,
         const c10::optional<at::Tensor>& tiles) {
  const Checker c{std::string(Device::kNamespace) + "::kvcache_fwd_", q.device()};
  void* const stream = Device::stream(q);
  const typename Device::Guard guard(q.device());
  Params p;
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, c.op,
              ": q must be float16 or bfloat16, got ", q.scalar_type());
  p.dtype = q.scalar_type() == at::kHalf ? Dtype::kHalf : Dtype::kBFloat16;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, c.op, ": q, k_cache and v_cache must have 4 dims, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), HD = q.size(3);
  const int64_t Hkv = k.size(1), D = k.size(3), Dv = v.size(3);
  TORCH_CHECK(HD == 64 || HD == 128, c.op, ": q's head dim must be 64 or 128 (pad others), got ", HD);
  TORCH_CHECK(Lq >= 1 && Lq <= kMaxLq, c.op, ": Lq must lie in [1, ", kMaxLq, "], got ", Lq);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, c.op, ": q's ", H, " heads are not a multiple of the cache's ", Hkv);
  TORCH_CHECK(D >= 8 && D <= HD && D % 8 == 0, c.op, ": k_cache's head dim must be a multiple of 8 in [8, ", HD,
              "], got ", D);
  TORCH_CHECK(Dv >= 8 && Dv <= HD && Dv % 8 == 0, c.op, ": v_cache's head dim must be a multiple of 8 in [8, ", HD,
              "], got ", Dv);
  c.exact(q, "q", q.scalar_type(), {B, H, Lq, HD});
  c.exact(k, "k_cache", q.scalar_type(), k.sizes());
  c.exact(v, "v_cache", q.scalar_type(), {k.size(0), Hkv, k.size(2), Dv});
  c.aligned(q, "q");
  c.aligned(k, "k_cache");
  c.aligned(v, "v_cache");
  c.exact(seqlens, "cache_seqlens", at::kInt, {B});
  const int64_t page = k.size(2);
  int64_t capacity = page;
  if (block_table) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.dim() == 2 && bt.size(0) == B, c.op, ": block_table must be (B, max_pages) = (", B,
                ", max_pages), got ", bt.sizes());
    c.exact(bt, "block_table", at::kInt, bt.sizes());
    capacity = page * bt.size(1);
    p.block_table = bt.data_ptr<int32_t>();
    p.max_pages = bt.size(1);
  } else {
    TORCH_CHECK(k.size(0) == B, c.op, ": a contiguous k_cache must be (B, Hkv, Lmax, D) with B = ", B, ", got ",
                k.sizes());
  }
  TORCH_CHECK(page >= 1, c.op, ": the cache holds no position");
  TORCH_CHECK(capacity + 2 * kBlockN < std::numeric_limits<int32_t>::max(), c.op, ": cache capacity ", capacity,
              " too large (positions are int32)");
  TORCH_CHECK(!left || *left >= 0, c.op, ": left must be >= 0 or None, got ", left.value_or(0));
  TORCH_CHECK(!right || *right >= 0, c.op, ": right must be >= 0 or None, got ", right.value_or(0));
  TORCH_CHECK(num_splits >= 1 && num_splits <= 65535, c.op, ": num_splits must lie in [1, 65535], got ", num_splits);
  TORCH_CHECK(out.dim() == 4 && out.size(3) >= 1 && out.size(3) <= Dv, c.op,
              ": out must be (B, H, Lq, Dv') with 1 <= Dv' <= v_cache's ", Dv, " columns, got ", out.sizes());
  c.exact(out, "out", q.scalar_type(), {B, H, Lq, out.size(3)});
  c.exact(lse, "lse", at::kFloat, {B, H, Lq});
  if (tiles) {
    c.exact(*tiles, "tiles", at::kInt, {1});
    p.tiles = tiles->data_ptr<int32_t>();
  }
  p.head_dim = static_cast<int>(HD);
  p.dim = static_cast<int>(D);
  p.vdim = static_cast<int>(Dv);
  p.out_dim = static_cast<int>(out.size(3));
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(Hkv);
  p.lq = static_cast<int>(Lq);
  TORCH_CHECK(B * Hkv * row_blocks(p) <= std::numeric_limits<int32_t>::max() && B * H * Lq * out.size(3) <
              int64_t{std::numeric_limits<int32_t>::max()} * 256, c.op, ": too many rows");
  p.page = static_cast<int>(page);
  p.capacity = static_cast<int>(capacity);
  // A side as long as the cache bounds nothing.
  p.left = left && *left < capacity ? static_cast<int>(*left) : -1;
  p.right = right && *right < capacity ? static_cast<int>(*right) : -1;
  p.num_splits = static_cast<int>(num_splits);
  p.scale = static_cast<float>(scale);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (B * H * Lq == 0) return;
  // The splits' partials: (splits, B, H, Lq, head_dim) and (splits, B, H, Lq).
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out_part = at::empty({num_splits, B, H, Lq, HD}, f32);
  at::Tensor lse_part = at::empty({num_splits, B, H, Lq}, f32);
  p.out_part = out_part.data_ptr<float>();
  p.lse_part = lse_part.data_ptr<float>();
  fwd_launch(p, stream);
  Device::after_launch();
}

}  // namespace ops
}  // namespace kvcache
}  // namespace tfk

#define TFK_KVCACHE_DEFS(m)                                                               \
  do {                                                                                    \
    (m).def(tfk::kvcache::kFwdSchema);                                                    \
  } while (0)

#define TFK_KVCACHE_IMPLS(m, Device)                                                      \
  do {                                                                                    \
    (m).impl("kvcache_fwd_", &tfk::kvcache::ops::fwd<Device>);                            \
  } while (0)
