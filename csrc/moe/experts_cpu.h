// The MoE experts forward for small groups, as a native CPU kernel (tfk._cpu):
// decode sizes, where each expert gets a few rows and a GEMM library spends
// more time packing an expert's weights than multiplying them. No torch
// headers: csrc/cpu/bindings.cpp checks the tensors and calls it.
#pragma once

#include <cstdint>

namespace tfk {
namespace moe {
namespace cpu {

enum class Act { kSilu, kGelu, kRelu };  // gelu: the tanh approximation
enum class Dtype { kFloat32, kBFloat16, kFloat16 };  // of x and both weights

// Rows sorted by expert (the torch backend's permutation): row m is token
// token[m] routed to the expert whose range [ends[e-1], ends[e]) holds m.
// For each row: h = x[token] @ gate_up_proj[e]^T (2I), a = act(h[:I]) * h[I:],
// rows[m] = row_weight[m] * (a @ down_proj[e]^T) (H). x and the weights in
// `dtype`; row_weight, the sums, h, a and the rows float32. All arrays
// contiguous.
struct ExpertsRows {
  const void* x;              // (T, H)
  const int64_t* token;       // (M,)
  const int64_t* ends;        // (E,) row ends, ends[E-1] == M
  const float* row_weight;    // (M,)
  const void* gate_up_proj;   // (E, 2I, H)
  const void* down_proj;      // (E, H, I)
  float* rows;                // (M, H) out
  int64_t E, H, I;
  Act act;
  Dtype dtype;
};

// Every row, on the calling thread.
void experts_rows(const ExpertsRows& p);

// The whole forward, on the calling thread: the torch backend's permutation
// (assignments of ids outside [0, E) dropped; an expert keeps its first
// `capacity` assignments in (slot, token) order, all when capacity < 0),
// experts_rows, and out[t] = the sum of token t's kept rows in slot order
// (0 when none is kept).
struct ExpertsForward {
  const void* x;              // (T, H)
  const int64_t* experts;     // (T, k) ids
  const float* weights;       // (T, k) routing weights
  const void* gate_up_proj;   // (E, 2I, H)
  const void* down_proj;      // (E, H, I)
  float* out;                 // (T, H) out
  int64_t T, k, E, H, I, capacity;
  Act act;
  Dtype dtype;
};

void experts_forward(const ExpertsForward& f);

}  // namespace cpu
}  // namespace moe
}  // namespace tfk
