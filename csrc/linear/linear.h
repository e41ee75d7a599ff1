// Linear-attention kernels: the chunked causal forward and the non-causal
// forward of the core (tfk/ops/linear/torch_backend.py's module doc), on
// already-mapped features or mapping them on load, and the statistics of the
// "softmax" map's key side (softmax_stats_launch, csrc/linear/linear_stats.cu).
//
// Free of CUDA and torch headers: included by the kernels (nvcc, or the host
// compiler in host mode) and by the torch bindings (csrc/linear/ops.h).
//
// Layouts (contiguous, row-major; the ops in csrc/linear/ops.h check them):
//   q      (B, H, L, D)      phi_q in T, or q when fmap names the map to apply
//   k      (B, Hkv, S, D)    phi_k in T, or k (fmap); keys where keep is 0 count as
//                            phi_k = 0
//   v      (B, Hkv, S, E)    V' = [v, 1] (E = Dv + 1: the normaliser is one more
//                            value column, so one product gives num and den), in
//                            T; with `ones`, v (B, Hkv, S, E - 1) and the column
//                            of ones is the kernel's
//   s0     (B, Hkv, D, E)    float32 initial state S'_0, or null (zeros)
//   o      (B, H, L, E)      float32 O' = [num, den]
//   s      (B, Hkv, D, E)    float32 final state S'_0 + sum_j phi_k_j^T V'_j
//   kstats (B, Hkv, 2, D)    float32, the softmax map's (softmax_stats_launch):
//                            [.., 0, d] the max of k[.., :, d] over the kept
//                            keys, [.., 1, d] 1 / sum_j exp(k_j,d - max); both 0
//                            for a batch row with every key masked
// Query head h reads KV head h / G, G = H / Hkv. Causal: S == L and query i
// sees keys j <= i. T is fp16, bf16 or fp32; D and E at most kMaxDim.
#pragma once

#include <cstdint>

namespace tfk {
namespace linear {

enum class Dtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

// The feature map applied to q and k as they are loaded (in fp32, then
// rounded to T for the products): tfk/ops/linear/torch_backend.py's maps.
// kSoftmax (non-causal only): phi(q) = softmax of each q row over its D
// channels; phi(k)[j, d] = exp(k[j, d] - max_d) / sum_d from kstats, the
// softmax over the kept positions of channel d (masked keys 0).
enum class FeatureMap : int { kIdentity = 0, kElu1 = 1, kRelu = 2, kSoftmax = 3 };

constexpr int kMaxDim = 257;  // D and E: E = Dv + 1 for Dv up to 256, and the backward passes V' as features
constexpr int kChunk = 32;    // positions per chunk (rows of the intra-chunk product)
constexpr int kBlockE = 64;   // value columns per block: the state tile is D x kBlockE fp32
constexpr int kThreads = 128; // 4 warps

struct FwdParams {
  Dtype dtype = Dtype::kFloat;
  bool causal = true;
  int64_t batch = 0, heads = 0, kv_heads = 0;
  int64_t len_q = 0, len_k = 0;
  int dim = 0;   // D
  int vdim = 0;  // E = Dv + 1
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* s0 = nullptr;
  FeatureMap fmap = FeatureMap::kIdentity;
  const uint8_t* keep = nullptr;  // (B, S): 0 drops the key (phi_k = 0); null keeps all
  bool ones = false;              // v holds E - 1 columns; column E - 1 of V' is 1
  const float* kstats = nullptr;  // (B, Hkv, 2, D): kSoftmax's key statistics (required for it)
  float* o = nullptr;
  float* s = nullptr;
};

// The dynamic shared memory a launch of p uses (bytes).
int64_t fwd_smem_bytes(const FwdParams& p);

// `stream` is a cudaStream_t (ignored in host mode). Nothing is launched when
// batch * kv_heads or E is 0.
void fwd_launch(const FwdParams& p, void* stream);

// The softmax map's key statistics: per (batch, KV head, channel d), over the
// positions j < len_k with keep[j] != 0 (keep null: all), max_d = max_j k[j, d]
// and inv_d = 1 / sum_j exp(k[j, d] - max_d), in two passes (max, then sum)
// in a fixed order (deterministic). stats (B, Hkv, 2, D) float32: [.., 0, :]
// max, [.., 1, :] inv; a channel without a kept key gets max 0 and inv 0.
struct StatsParams {
  Dtype dtype = Dtype::kFloat;
  int64_t batch = 0, kv_heads = 0, len_k = 0;
  int dim = 0;
  const void* k = nullptr;        // (B, Hkv, S, D) in T
  const uint8_t* keep = nullptr;  // (B, S) or null
  float* stats = nullptr;         // (B, Hkv, 2, D)
};

// Nothing is launched when batch * kv_heads or D is 0.
void softmax_stats_launch(const StatsParams& p, void* stream);

}  // namespace linear
}  // namespace tfk
