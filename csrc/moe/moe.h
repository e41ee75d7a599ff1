// Mixture-of-Experts kernels: the routing (scores, group-limited top-k and the
// per-expert counts), the grouped GEMMs of the expert layers (forward with a
// gathered A and an act(gate) * up epilogue, and the per-group A^T B of the
// weight gradients), the activation's backward and the combine of each token's
// k slots.
//
// Free of CUDA and torch headers: included by the kernels (nvcc, or the host
// compiler in host mode) and by the torch bindings (csrc/moe/ops.h).
//
// Layouts (all contiguous, row-major; the ops in csrc/moe/ops.h check them):
//   grouped GEMM   a (Ma, K); b (G, K, N), or (G, N, K) with trans_b; offs (G,)
//                  int64 cumulative row ends; gather (M,) int64 or null;
//                  row_scale (M,) float32 or null; c (M, N or N / 2).
//   grouped A^T B  a (Ma, K); b (M, N); offs (G,); gather_a (M,) or null;
//                  c (G, K, N).
//   combine        y (My, H); index (T * k,) int64; out (T, H).
//   route          logits (T, E); bias (E,) float32 or null; weights (T, k)
//                  float32; experts (T, k) int64; counts (E,) int64.
// K, N (and N / 2 with an activation) and H are multiples of 8: the 16-bit
// kernels move rows in 16-byte chunks (cp.async, ldmatrix), a chunk either
// wholly inside the matrix or wholly outside (zero-filled).
#pragma once

#include <cstdint>

namespace tfk {
namespace moe {

enum class Dtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };
// The epilogue's activation; the N columns are [gate | up] halves and the
// result act(gate) * up when not kNone.
enum class Act : int { kNone = 0, kSilu = 1, kGeluTanh = 2, kRelu = 3 };

// Grouped GEMM tiles: a block of kThreads threads per (row tile, column tile).
constexpr int kBlockM = 64;   // rows of C per block
constexpr int kBlockN = 64;   // columns of C per block (of the gate and of the up half with act)
constexpr int kBlockK = 32;   // the reduction's step
constexpr int kThreads = 128; // 4 warps
// The tile map's entry of a tile past the last used one (the grid is an upper bound).
constexpr int kSpareTile = -2;
// The tile map's group of a tile of rows offs[G-1] <= r < M (written 0).
constexpr int kTailTile = -1;

// The number of row tiles a grouped GEMM launches: an upper bound of
// sum over groups g (and the tail) of ceil(rows_g / kBlockM), known without
// reading offs (so the GPU never waits for the host).
inline int64_t max_row_tiles(int64_t rows, int64_t groups) {
  return (rows + (groups + 1) * (kBlockM - 1)) / kBlockM;
}

struct GemmParams {
  Dtype dtype = Dtype::kHalf;
  Act act = Act::kNone;
  bool trans_b = false;
  int64_t m = 0;          // rows of C (len(gather) or Ma)
  int64_t k = 0, n = 0;   // the reduction and b's columns (C has n / 2 with act)
  int64_t groups = 0;
  const void* a = nullptr;
  const void* b = nullptr;
  const int64_t* offs = nullptr;
  const int64_t* gather = nullptr;
  const float* row_scale = nullptr;
  void* c = nullptr;
  // Scratch of max_row_tiles(m, groups) x 2 int32: per row tile, its first
  // row and its group (kTailTile, kSpareTile); written by the launch itself.
  int32_t* tile_map = nullptr;
};

struct GemmTnParams {
  Dtype dtype = Dtype::kHalf;
  int64_t m = 0;          // rows of b (the reduction)
  int64_t k = 0, n = 0;   // a's and b's columns: C is (groups, k, n)
  int64_t groups = 0;
  const void* a = nullptr;
  const void* b = nullptr;
  const int64_t* offs = nullptr;
  const int64_t* gather_a = nullptr;
  void* c = nullptr;
};

struct CombineParams {
  Dtype dtype = Dtype::kHalf;
  int64_t tokens = 0, k = 0, h = 0, y_rows = 0;
  const void* y = nullptr;
  const int64_t* index = nullptr;  // -1: the slot adds nothing
  void* out = nullptr;
};

struct ActBwdParams {
  Dtype dtype = Dtype::kHalf;
  Act act = Act::kSilu;
  int64_t m = 0, i = 0;          // gate_up (m, 2i), grad_h (m, i), out (m, 2i)
  const void* gate_up = nullptr;
  const void* grad_h = nullptr;
  void* out = nullptr;
};

// Routing limits: a warp per token row holds E / 32 scores per lane.
constexpr int kRouteMaxExperts = 256;
constexpr int kRouteMaxTopK = 8;
constexpr int kRouteMaxGroups = kRouteMaxExperts / 2;  // groups hold >= 2 experts

struct RouteParams {
  Dtype dtype = Dtype::kFloat;  // of logits, read as float32
  int64_t tokens = 0;
  int experts = 0;              // E in [1, kRouteMaxExperts]
  int top_k = 1;                // in [1, min(E, kRouteMaxTopK)]
  bool sigmoid = false;         // scores: softmax (false) or sigmoid of the logits
  bool normalize = true;        // weights / their sum (sigmoid: sum + 1e-20)
  int n_group = 0;              // 0: no group limit; else E / n_group >= 2 experts a group
  int topk_group = 0;           // groups kept, in [1, n_group]
  float scaling = 1.f;
  const void* logits = nullptr;
  const float* bias = nullptr;  // added to the scores for the choice only
  float* weights = nullptr;
  int64_t* expert_ids = nullptr;
  int64_t* counts = nullptr;    // zeroed by the launch, then the (token, slot) assignments of each expert
};

// `stream` is a cudaStream_t (ignored in host mode). Nothing is launched for
// empty outputs.
void grouped_gemm_launch(const GemmParams& p, void* stream);
void grouped_gemm_tn_launch(const GemmTnParams& p, void* stream);
void combine_launch(const CombineParams& p, void* stream);
void act_backward_launch(const ActBwdParams& p, void* stream);
void route_launch(const RouteParams& p, void* stream);

}  // namespace moe
}  // namespace tfk
