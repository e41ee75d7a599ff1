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

// Rows sorted by expert (the torch backend's permutation): row m is token
// token[m] routed to the expert whose range [ends[e-1], ends[e]) holds m.
// For each row: h = x[token] @ gate_up_proj[e]^T (2I), a = act(h[:I]) * h[I:],
// rows[m] = row_weight[m] * (a @ down_proj[e]^T) (H). float32 in and out,
// float32 sums. All arrays contiguous.
struct ExpertsRows {
  const float* x;             // (T, H)
  const int64_t* token;       // (M,)
  const int64_t* ends;        // (E,) row ends, ends[E-1] == M
  const float* row_weight;    // (M,)
  const float* gate_up_proj;  // (E, 2I, H)
  const float* down_proj;     // (E, H, I)
  float* rows;                // (M, H) out
  int64_t E, H, I;
  Act act;
};

// Every row, on the calling thread.
void experts_rows(const ExpertsRows& p);

}  // namespace cpu
}  // namespace moe
}  // namespace tfk
