// Fused attention over one sub-pass of a plan (tfk/plan.py), FlashAttention-2
// style: forward (out, lse) and backward (dq, dk, dv).
//
// Free of CUDA and torch headers: included by the kernels (nvcc, or the host
// compiler in host mode), and by the torch bindings (csrc/attention/ops.h).
//
// Tensors are contiguous, in the sub-pass's token layout (the host gathers it):
//   q, dout (B, H, Lq, head_dim)   k, v (B, Hkv, Lk, head_dim)
// with head_dim 64 or 128, one size for q, k, v and dout: the ops
// (csrc/attention/ops.h) refuse any other. The Python backend
// (tfk/ops/attention/cuda_backend.py, _pad) zero-pads q, k, v and dout to the
// smaller of 64 and 128 that holds max(D, Dv), and slices the results back to
// D and Dv. Key and value heads are shared by H / Hkv query heads.
#pragma once

#include <cstdint>

namespace tfk {
namespace attention {

// The plan's tile, fixed: 4 warps of 16 query rows (or 16 keys in dK/dV).
constexpr int kBlockM = 64;  // queries per tile
constexpr int kBlockN = 64;  // keys per tile
constexpr int kDiagonals = kBlockM + kBlockN - 1;  // diagonals of a tile (the per-tile bias gradient)
constexpr int kThreads = 128;
// Kernels declare __launch_bounds__(kThreads, 1): their shared memory (40-97
// KiB) allows only 1-3 blocks per SM anyway, and without the minimum ptxas
// aims at more and spills at head dim 128.

enum class Dtype : int { kHalf = 0, kBFloat16 = 1 };

// A block schedule (plan.SubPass): per block of one side, the blocks of the
// other side to visit, ascending, and for each a row of partial_masks or -1
// for a full tile. int32 tables of shape (Hp, nblocks) and (Hp, nblocks, width).
struct Schedule {
  const int32_t* count = nullptr;
  const int32_t* blocks = nullptr;
  const int32_t* partial = nullptr;
  bool per_head = false;    // tables per head (Hp = H), else one for every head
  int64_t width = 0;        // blocks per row
};

// What the forward and backward kernels share.
struct Params {
  Dtype dtype = Dtype::kHalf;
  int head_dim = 64;
  int batch = 0, heads = 0, kv_heads = 0;
  int lq = 0, lk = 0;          // layout lengths
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  float scale = 1.f;           // on q.k
  // Original positions of the layout's rows (int64, length lq / lk), or null
  // for the identity: user masks are indexed by original position. A layout
  // per (batch, head) (LSH's sorted rounds) has a table per pair, the pair
  // (b, h) at b * heads + h times the stride (b * kv_heads + h for keys);
  // stride 0: one table for every pair.
  const int64_t* q_index = nullptr;
  const int64_t* kv_index = nullptr;
  int64_t q_index_stride = 0, kv_index_stride = 0;
  // Position predicates (plan.SubPass): 0 none; 1 the query's own position
  // gets the logit -1e5 (Reformer's self mask, over any other mask); 2 that
  // and keys past the query's original position masked (causal by position).
  int predicates = 0;
  // User mask, read through broadcast strides (elements) over (B, H, Lq, Lk)
  // in original positions: 0 none, 1 bool as uint8 (keep where nonzero),
  // 2 float32, added to the scores.
  int mask_kind = 0;
  const void* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  // (n_partial, kBlockM, kBlockN) uint8 tile masks of the partial tiles,
  // indexed [query][key] within the tile; zero outside the sequence.
  const uint8_t* partial_masks = nullptr;
  Schedule kv_schedule;        // per query block: key blocks (forward, dQ)
  // Dropout on the probabilities, bit for bit tfk/dropout.py's: the pair of
  // original positions (i, j) of head h in batch b is kept when
  // mix32(j ^ mix32(i ^ mix32(((b * heads + h) * drop_rounds + drop_round) ^
  // drop_key))) >= drop_threshold, and scaled by drop_scale (hash rounds of
  // LSH draw as heads h * rounds + round). drop_threshold 0: no dropout.
  uint32_t drop_key = 0;
  uint32_t drop_threshold = 0;
  float drop_scale = 1.f;
  int drop_rounds = 1, drop_round = 0;
  // The call's place in a larger call's grid (tfk.dropout.Window; context
  // parallelism): head h hashes as drop_head0 + h of drop_heads (0: heads),
  // positions i and j as drop_q0 + i and drop_k0 + j.
  int drop_head0 = 0, drop_heads = 0;
  uint32_t drop_q0 = 0, drop_k0 = 0;
  // Score modifiers (tfk.scores, fused): softcap s = cap * tanh(s / cap) on
  // the scaled scores (natural units; 0: off), then the distance bias
  // s += bias[h * bias_stride + j - i + bias_offset] (natural units; i, j
  // original positions; null: off; -inf masks the pair), then the masks.
  float softcap = 0.f;
  const float* bias = nullptr;   // (heads, bias_stride) float32
  int64_t bias_stride = 0;       // Lq + Lk - 1 of the whole call
  int64_t bias_offset = 0;       // Lq - 1 of the whole call
  bool mods() const { return softcap > 0.f || bias != nullptr; }
  // Optional int32[3]: tiles visited by the forward, dQ and dK/dV kernels,
  // counted by the kernels (tests prove no tile outside the plan is touched).
  int32_t* tiles = nullptr;
};

struct FwdParams : Params {
  void* out = nullptr;         // (B, H, Lq, head_dim): float32 if out_f32, else q's dtype
  bool out_f32 = false;
  float* lse = nullptr;        // (B, H, Lq), natural log; -inf for a row with no key
};

struct BwdParams : Params {
  const void* dout = nullptr;   // like q
  const float* lse = nullptr;   // (B, H, Lq): the merged forward lse
  const float* delta = nullptr; // (B, H, Lq): rowsum(dout * out) - dlse
  float* dq = nullptr;          // like q, float32
  float* dk = nullptr;          // like k, float32
  float* dv = nullptr;          // like v, float32
  Schedule q_schedule;          // per key block: query blocks (dK/dV)
  // With a bias: the dQ kernel's share of the bias's gradient, per element
  // of each visited tile: dbias[slot * kBlockM * kBlockN + row * kBlockN +
  // col] = dS of (row, col) (natural units; 0 outside the sequence or masked)
  // and dbias_index[...] = h * bias_stride + j - i + bias_offset (0 where the
  // value is 0), slot = ((b * heads + h) * n_qblocks + qb) * kv_schedule
  // width + it. The host sums them in a fixed order (no float atomics).
  // Unvisited slots are left as they are (the host zero-fills).
  // With dbias_diagonal (only for a sub-pass in natural order: q_index and
  // kv_index null, so a tile's diagonals are distances) the kernel reduces
  // each tile instead: dbias[slot * kDiagonals + t] = the sum of dS over the
  // tile's (row, col) with col - row = t - (kBlockM - 1), inside the sequence,
  // in row order, and dbias_index[slot] = the flat index of diagonal 0
  // (h * bias_stride + k0 - q0 - (kBlockM - 1) + bias_offset; diagonal t's is
  // that + t; may fall outside the head's row where no pair of the tile does).
  float* dbias = nullptr;
  int32_t* dbias_index = nullptr;
  bool dbias_diagonal = false;
};

// Dynamic shared memory of each kernel (bytes), for the bindings' checks.
int64_t fwd_smem_bytes(int head_dim);
int64_t bwd_dq_smem_bytes(int head_dim);
int64_t bwd_dkdv_smem_bytes(int head_dim);

// `stream` is a cudaStream_t (ignored in host mode). Errors surface through
// cudaGetLastError() (CUDA) or exceptions (host mode); unsupported head dims
// or dtypes throw std::invalid_argument before launching.
void fwd_launch(const FwdParams& p, void* stream);
void bwd_launch(const BwdParams& p, void* stream);

}  // namespace attention
}  // namespace tfk
