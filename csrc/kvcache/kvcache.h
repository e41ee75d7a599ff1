// Split-KV ("flash-decoding") attention over a KV cache: a few queries per
// sequence (Lq <= kMaxLq) against a long cache, contiguous or paged, the keys
// of each (batch, key head) split over several blocks whose partial (out, lse)
// a second kernel merges by log-sum-exp. tfk/ops/kvcache/call.py gives the
// semantics; tfk/ops/kvcache/cuda_backend.py is the Python side.
//
// Free of CUDA and torch headers: included by the kernels (nvcc, or the host
// compiler in host mode) and by the torch bindings (csrc/kvcache/ops.h).
//
// Layouts (contiguous, row-major; csrc/kvcache/ops.h checks them):
//   q        (B, H, Lq, head_dim) in T, head_dim 64 or 128 (the host pads q)
//   k_cache  (B, Hkv, Lmax, D) or paged (num_blocks, Hkv, page, D) in T
//   v_cache  the same with Dv; D and Dv multiples of 8 and <= head_dim (the
//            kernel zero-fills columns D..head_dim of its tiles: the cache is
//            never copied to pad it)
//   block_table int32 (B, max_pages), paged only: cache position j of
//            sequence b is row j % page of block block_table[b, j / page]
//   seqlens  int32 (B,): sequence b's query t is at position seqlens[b] + t
//            and reads positions j < seqlens[b] + Lq with p - left <= j
//            <= p + right (a side < 0: unbounded)
//   out      (B, H, Lq, Dv') in T, Dv' <= Dv (v_cache's columns past Dv'
//            are padding); lse (B, H, Lq) float32, natural log; a row
//            with no allowed key gets out 0 and lse -inf
//   out_part (splits, B, H, Lq, head_dim) float32, lse_part (splits, B, H,
//            Lq) float32: the splits' partials (workspace)
// Query head h reads key head h / G, G = H / Hkv.
#pragma once

#include <cstdint>

namespace tfk {
namespace kvcache {

enum class Dtype : int { kHalf = 0, kBFloat16 = 1 };

constexpr int kMaxLq = 16;     // queries per sequence (call.py's SPLIT_KV_MAX_LQ)
constexpr int kBlockN = 64;    // keys per tile (a warp takes 16 of them)
constexpr int kRows = 16;      // query rows (G heads x Lq queries) per block
constexpr int kThreads = 128;  // 4 warps

struct Params {
  Dtype dtype = Dtype::kHalf;
  int head_dim = 64;            // 64 or 128
  int dim = 0, vdim = 0;        // D and Dv of the caches (multiples of 8)
  int out_dim = 0;              // columns of out (<= vdim: a padded v_cache's own Dv)
  int batch = 0, heads = 0, kv_heads = 0, lq = 0;
  // Positions are int: capacity + kBlockN < 2^31 (the ops check it).
  int page = 0;                 // rows per block of the cache (Lmax when contiguous)
  int64_t max_pages = 0;        // columns of block_table
  int capacity = 0;             // cache positions a sequence can hold
  int left = -1, right = -1;    // the band; < 0: unbounded side (the ops map sides >= capacity to -1)
  int num_splits = 1;
  float scale = 1.f;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int32_t* block_table = nullptr;  // null: contiguous (block b is sequence b's)
  const int32_t* seqlens = nullptr;
  float* out_part = nullptr;
  float* lse_part = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int32_t* tiles = nullptr;     // optional int32[1]: key tiles computed per (batch, key head)
};

// Row blocks per (batch, key head): ceil(G * Lq / kRows).
inline int row_blocks(const Params& p) {
  const int rows = p.heads / p.kv_heads * p.lq;
  return (rows + kRows - 1) / kRows;
}

// `stream` is a cudaStream_t (ignored in host mode). Nothing is launched when
// B * H * Lq is 0. Unsupported head dims throw std::invalid_argument.
void fwd_launch(const Params& p, void* stream);

}  // namespace kvcache
}  // namespace tfk
