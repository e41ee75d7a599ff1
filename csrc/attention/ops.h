// Torch side of the attention kernels, shared by the CUDA bindings
// (csrc/bindings.cpp, namespace tfk) and the host-execution bindings
// (csrc/sim/bindings.cpp, namespace tfk_sim): op schemas, argument checks, and
// the kernel parameters filled from tensors. Include from .cpp files only.
//
// The ops run one sub-pass of a plan (tfk/plan.py) on tensors already in its
// token layout; the Python backends (tfk/ops/attention/cuda_backend.py) gather
// layouts, pad head dims and merge sub-passes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "attention/attention.h"

namespace tfk {
namespace attention {

// Shared by both namespaces. Outputs are written in place (every element).
constexpr const char* kFwdSchema =
    "attention_fwd_(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? q_index, Tensor? kv_index, "
    "Tensor kv_count, Tensor kv_blocks, Tensor kv_partial, Tensor partial_masks, float scale, "
    "Tensor(a!) out, Tensor(b!) lse, int drop_key=0, int drop_threshold=0, float drop_scale=1., "
    "Tensor(c!)? tiles=None, int predicates=0, int drop_rounds=1, int drop_round=0, int[] drop_window=[], "
    "float softcap=0., Tensor? bias=None, int bias_offset=0) -> ()";
constexpr const char* kBwdSchema =
    "attention_bwd_(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, Tensor? mask, "
    "Tensor? q_index, Tensor? kv_index, Tensor kv_count, Tensor kv_blocks, Tensor kv_partial, "
    "Tensor q_count, Tensor q_blocks, Tensor q_partial, Tensor partial_masks, float scale, "
    "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, int drop_key=0, int drop_threshold=0, float drop_scale=1., "
    "Tensor(d!)? tiles=None, int predicates=0, int drop_rounds=1, int drop_round=0, int[] drop_window=[], "
    "float softcap=0., Tensor? bias=None, int bias_offset=0, Tensor(e!)? dbias=None, "
    "Tensor(f!)? dbias_index=None, bool dbias_diagonal=False) -> ()";

namespace ops {

struct Checker {
  const char* op;
  c10::Device device;

  void on_device(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  void shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) const {
    TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
  }
  void dtype(const at::Tensor& t, const char* name, at::ScalarType expected) const {
    TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ", t.scalar_type());
  }
  void tensor(const at::Tensor& t, const char* name, at::ScalarType type, at::IntArrayRef sizes) const {
    on_device(t, name);
    dtype(t, name, type);
    shape(t, name, sizes);
  }
};

inline Dtype kernel_dtype(const Checker& c, const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, c.op,
              ": q must be float16 or bfloat16, got ", q.scalar_type());
  return q.scalar_type() == at::kHalf ? Dtype::kHalf : Dtype::kBFloat16;
}

// A schedule: count (Hp, n), blocks and partial (Hp, n, width), int32.
inline Schedule schedule(const Checker& c, const at::Tensor& count, const at::Tensor& blocks,
                         const at::Tensor& partial, int64_t heads, int64_t nblocks, const char* name) {
  TORCH_CHECK(count.dim() == 2 && (count.size(0) == 1 || count.size(0) == heads) && count.size(1) == nblocks,
              c.op, ": ", name, " count must have shape (1 or ", heads, ", ", nblocks, "), got ", count.sizes());
  c.tensor(count, name, at::kInt, count.sizes());
  TORCH_CHECK(blocks.dim() == 3, c.op, ": ", name, " blocks must have 3 dims, got ", blocks.sizes());
  c.tensor(blocks, name, at::kInt, {count.size(0), nblocks, blocks.size(2)});
  c.tensor(partial, name, at::kInt, blocks.sizes());
  Schedule s;
  s.count = count.data_ptr<int32_t>();
  s.blocks = blocks.data_ptr<int32_t>();
  s.partial = partial.data_ptr<int32_t>();
  s.per_head = count.size(0) > 1;
  s.width = blocks.size(2);
  return s;
}

// An index table: (L,) shared by every (batch, head), or (B, heads, L) with
// unit stride along L and one stride over (batch, head) pairs (a round of
// LSH's (B, H, n, L) order is such a view). Returns that stride (0: shared).
inline int64_t index_table(const Checker& c, const at::Tensor& t, const char* name, int64_t B, int64_t heads,
                           int64_t L) {
  TORCH_CHECK(t.device() == c.device, c.op, ": ", name, " is on ", t.device(), ", expected ", c.device);
  c.dtype(t, name, at::kLong);
  if (t.dim() == 1) {
    c.on_device(t, name);
    c.shape(t, name, {L});
    return 0;
  }
  c.shape(t, name, {B, heads, L});
  TORCH_CHECK(t.stride(2) == 1 && t.stride(0) == heads * t.stride(1), c.op, ": ", name,
              " (B, heads, L) must step by one stride over (batch, head) pairs, got strides ", t.strides());
  return t.stride(1);
}

// Checks the arguments both ops share and fills p's common fields.
inline void common(const Checker& c, Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& q_index,
                   const c10::optional<at::Tensor>& kv_index, const at::Tensor& kv_count,
                   const at::Tensor& kv_blocks, const at::Tensor& kv_partial, const at::Tensor& partial_masks,
                   double scale, int64_t drop_key, int64_t drop_threshold, double drop_scale,
                   const c10::optional<at::Tensor>& tiles, int64_t predicates, int64_t drop_rounds,
                   int64_t drop_round, at::IntArrayRef drop_window, double softcap,
                   const c10::optional<at::Tensor>& bias, int64_t bias_offset) {
  p.dtype = kernel_dtype(c, q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, c.op, ": q, k, v must be (B, H, L, head_dim), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), HD = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(HD == 64 || HD == 128, c.op, ": head_dim must be 64 or 128 (pad others), got ", HD);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, c.op, ": q's ", H, " heads are not a multiple of k's ", Hkv);
  c.tensor(q, "q", q.scalar_type(), q.sizes());
  c.tensor(k, "k", q.scalar_type(), {B, Hkv, Lk, HD});
  c.tensor(v, "v", q.scalar_type(), {B, Hkv, Lk, HD});
  // Grid dims y and z (heads, batch) are limited to 65535; rows index with int.
  TORCH_CHECK(H <= 65535 && B <= 65535, c.op, ": at most 65535 heads and 65535 batches, got ", H, " and ", B);
  TORCH_CHECK(Lq <= std::numeric_limits<int32_t>::max() / 2 && Lk <= std::numeric_limits<int32_t>::max() / 2,
              c.op, ": sequence too long");
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(Hkv);
  p.lq = static_cast<int>(Lq);
  p.lk = static_cast<int>(Lk);
  p.head_dim = static_cast<int>(HD);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.scale = static_cast<float>(scale);

  if (q_index) {
    p.q_index_stride = index_table(c, *q_index, "q_index", B, H, Lq);
    p.q_index = q_index->data_ptr<int64_t>();
  }
  if (kv_index) {
    p.kv_index_stride = index_table(c, *kv_index, "kv_index", B, Hkv, Lk);
    p.kv_index = kv_index->data_ptr<int64_t>();
  }
  TORCH_CHECK(predicates >= 0 && predicates <= 2, c.op, ": predicates must be 0, 1 or 2, got ", predicates);
  p.predicates = static_cast<int>(predicates);
  TORCH_CHECK(drop_rounds >= 1 && drop_round >= 0 && drop_round < drop_rounds, c.op,
              ": drop_round must be in [0, drop_rounds), got ", drop_round, " of ", drop_rounds);
  p.drop_rounds = static_cast<int>(drop_rounds);
  p.drop_round = static_cast<int>(drop_round);
  // (head offset, heads, query offset, key offset): the call's place in the
  // larger call whose dropout mask it draws (tfk.dropout.Window); empty: none
  TORCH_CHECK(drop_window.empty() || (drop_window.size() == 4 && drop_window[0] >= 0 && drop_window[1] >= 0 &&
                                      drop_window[2] >= 0 && drop_window[3] >= 0),
              c.op, ": drop_window must be empty or 4 offsets >= 0, got ", drop_window);
  if (!drop_window.empty()) {
    TORCH_CHECK(drop_window[1] == 0 || drop_window[0] + H <= drop_window[1], c.op, ": drop_window's heads ",
                drop_window[1], " do not hold heads ", drop_window[0], " + ", H);
    p.drop_head0 = static_cast<int>(drop_window[0]);
    p.drop_heads = static_cast<int>(drop_window[1]);
    p.drop_q0 = static_cast<uint32_t>(drop_window[2]);
    p.drop_k0 = static_cast<uint32_t>(drop_window[3]);
  }
  // Score modifiers: softcap (0: none) on the scaled scores; the distance
  // bias (H, Lq + Lk - 1 of the whole call) float32, entry j - i + bias_offset
  // for original positions i, j (every original position must index inside it).
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), c.op, ": softcap must be finite and >= 0 (0: none), got ",
              softcap);
  p.softcap = static_cast<float>(softcap);
  if (bias) {
    const at::Tensor& t = *bias;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == H, c.op, ": bias must be (", H, ", Lq + Lk - 1), got ", t.sizes());
    c.tensor(t, "bias", at::kFloat, t.sizes());
    TORCH_CHECK(bias_offset >= 0 && bias_offset < t.size(1), c.op, ": bias_offset ", bias_offset,
                " outside the bias's ", t.size(1), " entries");
    TORCH_CHECK(q_index || bias_offset + 1 >= Lq, c.op, ": bias_offset ", bias_offset, " below Lq - 1 = ", Lq - 1);
    TORCH_CHECK(kv_index || t.size(1) - bias_offset >= Lk, c.op, ": bias has ", t.size(1),
                " entries, too few for ", Lk, " keys at offset ", bias_offset);
    TORCH_CHECK(H * t.size(1) <= std::numeric_limits<int32_t>::max(), c.op, ": bias too large for int32 indices");
    p.bias = t.data_ptr<float>();
    p.bias_stride = t.size(1);
    p.bias_offset = bias_offset;
  }
  if (mask) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device() == c.device, c.op, ": mask is on ", m.device(), ", expected ", c.device);
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == H, c.op,
                ": mask must be a (B, H, Lq, Lk) view (broadcast strides allowed), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kByte || m.scalar_type() == at::kFloat, c.op,
                ": mask must be uint8 (a bool mask's view) or float32, got ", m.scalar_type());
    // Indices (original positions) must fall inside the mask.
    TORCH_CHECK(q_index || m.size(2) == Lq, c.op, ": mask has ", m.size(2), " query rows, q has ", Lq);
    TORCH_CHECK(kv_index || m.size(3) == Lk, c.op, ": mask has ", m.size(3), " key columns, k has ", Lk);
    p.mask_kind = m.scalar_type() == at::kByte ? 1 : 2;
    p.mask = m.data_ptr();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = m.stride(i);
  }
  TORCH_CHECK(partial_masks.dim() == 3, c.op, ": partial_masks must be (n, 64, 64), got ", partial_masks.sizes());
  c.tensor(partial_masks, "partial_masks", at::kByte, {partial_masks.size(0), kBlockM, kBlockN});
  p.partial_masks = partial_masks.data_ptr<uint8_t>();
  p.kv_schedule = schedule(c, kv_count, kv_blocks, kv_partial, H, (Lq + kBlockM - 1) / kBlockM, "kv schedule");
  constexpr int64_t k32 = int64_t{1} << 32;
  TORCH_CHECK(drop_key >= 0 && drop_key < k32 && drop_threshold >= 0 && drop_threshold < k32, c.op,
              ": drop_key and drop_threshold must be uint32 values (tfk.dropout.seed_key / threshold), got ",
              drop_key, " and ", drop_threshold);
  p.drop_key = static_cast<uint32_t>(drop_key);
  p.drop_threshold = static_cast<uint32_t>(drop_threshold);
  p.drop_scale = static_cast<float>(drop_scale);
  if (tiles) {
    c.tensor(*tiles, "tiles", at::kInt, {3});
    p.tiles = tiles->data_ptr<int32_t>();
  }
}

inline FwdParams fwd_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& q_index,
                            const c10::optional<at::Tensor>& kv_index, const at::Tensor& kv_count,
                            const at::Tensor& kv_blocks, const at::Tensor& kv_partial,
                            const at::Tensor& partial_masks, double scale, const at::Tensor& out,
                            const at::Tensor& lse, int64_t drop_key, int64_t drop_threshold, double drop_scale,
                            const c10::optional<at::Tensor>& tiles, int64_t predicates, int64_t drop_rounds,
                            int64_t drop_round, at::IntArrayRef drop_window, double softcap,
                            const c10::optional<at::Tensor>& bias, int64_t bias_offset) {
  const Checker c{op, q.device()};
  FwdParams p;
  common(c, p, q, k, v, mask, q_index, kv_index, kv_count, kv_blocks, kv_partial, partial_masks, scale, drop_key,
         drop_threshold, drop_scale, tiles, predicates, drop_rounds, drop_round, drop_window, softcap, bias,
         bias_offset);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == q.scalar_type(), c.op,
              ": out must be float32 or q's dtype, got ", out.scalar_type());
  c.tensor(out, "out", out.scalar_type(), q.sizes());
  c.tensor(lse, "lse", at::kFloat, q.sizes().slice(0, 3));
  p.out = out.data_ptr();
  p.out_f32 = out.scalar_type() == at::kFloat;
  p.lse = lse.data_ptr<float>();
  return p;
}

inline BwdParams bwd_params(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                            const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& q_index,
                            const c10::optional<at::Tensor>& kv_index, const at::Tensor& kv_count,
                            const at::Tensor& kv_blocks, const at::Tensor& kv_partial, const at::Tensor& q_count,
                            const at::Tensor& q_blocks, const at::Tensor& q_partial,
                            const at::Tensor& partial_masks, double scale, const at::Tensor& dq,
                            const at::Tensor& dk, const at::Tensor& dv, int64_t drop_key, int64_t drop_threshold,
                            double drop_scale, const c10::optional<at::Tensor>& tiles, int64_t predicates,
                            int64_t drop_rounds, int64_t drop_round, at::IntArrayRef drop_window, double softcap,
                            const c10::optional<at::Tensor>& bias, int64_t bias_offset,
                            const c10::optional<at::Tensor>& dbias, const c10::optional<at::Tensor>& dbias_index,
                            bool dbias_diagonal) {
  const Checker c{op, q.device()};
  BwdParams p;
  common(c, p, q, k, v, mask, q_index, kv_index, kv_count, kv_blocks, kv_partial, partial_masks, scale, drop_key,
         drop_threshold, drop_scale, tiles, predicates, drop_rounds, drop_round, drop_window, softcap, bias,
         bias_offset);
  c.tensor(dout, "dout", q.scalar_type(), q.sizes());
  c.tensor(lse, "lse", at::kFloat, q.sizes().slice(0, 3));
  c.tensor(delta, "delta", at::kFloat, q.sizes().slice(0, 3));
  c.tensor(dq, "dq", at::kFloat, q.sizes());
  c.tensor(dk, "dk", at::kFloat, k.sizes());
  c.tensor(dv, "dv", at::kFloat, v.sizes());
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  p.q_schedule = schedule(c, q_count, q_blocks, q_partial, q.size(1), (k.size(2) + kBlockN - 1) / kBlockN,
                          "q schedule");
  TORCH_CHECK(q_count.size(0) == kv_count.size(0), c.op, ": the kv and q schedules disagree on heads");
  // The bias's gradient shares (BwdParams::dbias), per (batch, head, query
  // block, kv schedule slot): one (64, 64) tile of values and indices, or with
  // dbias_diagonal (natural order only) kDiagonals values and one base index;
  // both or neither, with a bias.
  TORCH_CHECK(dbias.has_value() == dbias_index.has_value(), c.op, ": pass both dbias and dbias_index, or neither");
  if (dbias) {
    TORCH_CHECK(bias, c.op, ": dbias needs a bias");
    TORCH_CHECK(!dbias_diagonal || (!q_index && !kv_index), c.op,
                ": dbias_diagonal needs the natural order (no q_index, kv_index)");
    const int64_t slots = q.size(0) * q.size(1) * ((q.size(2) + kBlockM - 1) / kBlockM) * p.kv_schedule.width;
    c.tensor(*dbias, "dbias", at::kFloat, {slots * (dbias_diagonal ? kDiagonals : kBlockM * kBlockN)});
    c.tensor(*dbias_index, "dbias_index", at::kInt, {dbias_diagonal ? slots : slots * kBlockM * kBlockN});
    p.dbias = dbias->data_ptr<float>();
    p.dbias_index = dbias_index->data_ptr<int32_t>();
    p.dbias_diagonal = dbias_diagonal;
  } else {
    TORCH_CHECK(!dbias_diagonal, c.op, ": dbias_diagonal needs dbias");
  }
  return p;
}

// The ops' implementations for one kind of device. Device supplies
//   kFwdName, kBwdName   the ops' names, for messages
//   stream(q)            checks q's device, returns the stream to launch on
//   Guard(device)        makes `device` current while the op runs
//   after_launch()       surfaces launch errors
template <typename Device>
void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& q_index,
                   const c10::optional<at::Tensor>& kv_index, const at::Tensor& kv_count, const at::Tensor& kv_blocks,
                   const at::Tensor& kv_partial, const at::Tensor& partial_masks, double scale, const at::Tensor& out,
                   const at::Tensor& lse, int64_t drop_key, int64_t drop_threshold, double drop_scale,
                   const c10::optional<at::Tensor>& tiles, int64_t predicates, int64_t drop_rounds,
                   int64_t drop_round, at::IntArrayRef drop_window, double softcap,
                   const c10::optional<at::Tensor>& bias, int64_t bias_offset) {
  void* const stream = Device::stream(q);
  const typename Device::Guard guard(q.device());
  const auto p = fwd_params(Device::kFwdName, q, k, v, mask, q_index, kv_index, kv_count, kv_blocks, kv_partial,
                            partial_masks, scale, out, lse, drop_key, drop_threshold, drop_scale, tiles, predicates,
                            drop_rounds, drop_round, drop_window, softcap, bias, bias_offset);
  fwd_launch(p, stream);
  Device::after_launch();
}

template <typename Device>
void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& lse, const at::Tensor& delta, const c10::optional<at::Tensor>& mask,
                   const c10::optional<at::Tensor>& q_index, const c10::optional<at::Tensor>& kv_index,
                   const at::Tensor& kv_count, const at::Tensor& kv_blocks, const at::Tensor& kv_partial,
                   const at::Tensor& q_count, const at::Tensor& q_blocks, const at::Tensor& q_partial,
                   const at::Tensor& partial_masks, double scale, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv, int64_t drop_key, int64_t drop_threshold, double drop_scale,
                   const c10::optional<at::Tensor>& tiles, int64_t predicates, int64_t drop_rounds,
                   int64_t drop_round, at::IntArrayRef drop_window, double softcap,
                   const c10::optional<at::Tensor>& bias, int64_t bias_offset, const c10::optional<at::Tensor>& dbias,
                   const c10::optional<at::Tensor>& dbias_index, bool dbias_diagonal) {
  void* const stream = Device::stream(q);
  const typename Device::Guard guard(q.device());
  const auto p = bwd_params(Device::kBwdName, dout, q, k, v, lse, delta, mask, q_index, kv_index, kv_count,
                            kv_blocks, kv_partial, q_count, q_blocks, q_partial, partial_masks, scale, dq, dk, dv,
                            drop_key, drop_threshold, drop_scale, tiles, predicates, drop_rounds, drop_round, drop_window,
                            softcap, bias, bias_offset, dbias, dbias_index, dbias_diagonal);
  bwd_launch(p, stream);
  Device::after_launch();
}

}  // namespace ops
}  // namespace attention
}  // namespace tfk
