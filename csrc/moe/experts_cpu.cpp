// The small-group MoE experts forward on the CPU (see experts_cpu.h).
//
// A block of up to kRows rows of one expert streams the expert's weights
// once: every weight row is dotted with the block's rows, 8-float vectors in
// two independent accumulators per row (GCC/Clang vector extensions, so the
// same source becomes AVX2 or SSE/NEON code), then summed in a fixed order.
// The sums never depend on the machine: the AVX2 clone and the generic one
// perform the same additions in the same order (no FMA contraction in ISO
// C++), and rows never share a sum.
#include "moe/experts_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

static_assert(sizeof(float) == 4, "float32 rows");

// On x86-64, one AVX2 clone and the generic code, picked at load time.
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 14 : defined(__GNUC__) && __GNUC__ >= 8)
#define TFK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TFK_CPU_CLONES
#endif
#define TFK_INLINE inline __attribute__((always_inline))

namespace tfk {
namespace moe {
namespace cpu {
namespace {

constexpr int kRows = 4;  // rows per block (8 accumulators): each weight load serves 4 rows

typedef float f8 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));

TFK_INLINE f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

TFK_INLINE float sum8(f8 v) {  // fixed order: halves, then the pairs
  f4 s = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// out[r * out_stride] = dot(xs[r * K ...], w[0 .. K)) for the block's R rows.
template <int R>
TFK_INLINE void dots(const float* __restrict w, const float* __restrict xs, int64_t K, float* __restrict out,
                     int64_t out_stride) {
  f8 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = f8{};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const f8 w0 = load8(w + k), w1 = load8(w + k + 8);
    for (int r = 0; r < R; ++r) {
      acc0[r] += load8(xs + r * K + k) * w0;
      acc1[r] += load8(xs + r * K + k + 8) * w1;
    }
  }
  if (k + 8 <= K) {
    const f8 w0 = load8(w + k);
    for (int r = 0; r < R; ++r) acc0[r] += load8(xs + r * K + k) * w0;
    k += 8;
  }
  for (int r = 0; r < R; ++r) {
    float s = sum8(acc0[r] + acc1[r]);
    for (int64_t j = k; j < K; ++j) s += xs[r * K + j] * w[j];
    out[r * out_stride] = s;
  }
}

TFK_INLINE float activate(float g, Act act) {
  switch (act) {
    case Act::kSilu:
      return g / (1.f + std::exp(-g));
    case Act::kGelu:
      return 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    default:
      return std::max(g, 0.f);  // NaN stays NaN, as torch's relu
  }
}

// One block of R rows of one expert; xs (R, H) holds its tokens' rows,
// h (R, 2I) and a (R, I) are scratch, out (R, H) its rows of the result.
template <int R>
TFK_INLINE void block(const ExpertsRows& p, const float* w1, const float* w2, const float* row_weight,
                      const float* xs, float* h, float* a, float* out) {
  const int64_t H = p.H, I = p.I;
  for (int64_t n = 0; n < 2 * I; ++n) dots<R>(w1 + n * H, xs, H, h + n, 2 * I);
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < I; ++i) a[r * I + i] = activate(h[r * 2 * I + i], p.act) * h[r * 2 * I + I + i];
  for (int64_t j = 0; j < H; ++j) dots<R>(w2 + j * I, a, I, out + j, H);
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < H; ++j) out[r * H + j] *= row_weight[r];
}

}  // namespace

TFK_CPU_CLONES void experts_rows(const ExpertsRows& p) {
  const int64_t H = p.H, I = p.I;
  std::vector<float> xs(kRows * H), h(kRows * 2 * I), a(kRows * I);
  for (int64_t e = 0; e < p.E; ++e) {
    const float* w1 = p.gate_up_proj + e * 2 * I * H;
    const float* w2 = p.down_proj + e * H * I;
    const int64_t end = p.ends[e];
    for (int64_t m = e == 0 ? 0 : p.ends[e - 1]; m < end; m += kRows) {
      const int n = static_cast<int>(std::min<int64_t>(kRows, end - m));
      for (int r = 0; r < n; ++r) std::memcpy(&xs[r * H], p.x + p.token[m + r] * H, H * sizeof(float));
      float* out = p.rows + m * H;
      const float* rw = p.row_weight + m;
      static_assert(kRows == 4, "one case per block size");
      switch (n) {
        case 4: block<4>(p, w1, w2, rw, xs.data(), h.data(), a.data(), out); break;
        case 3: block<3>(p, w1, w2, rw, xs.data(), h.data(), a.data(), out); break;
        case 2: block<2>(p, w1, w2, rw, xs.data(), h.data(), a.data(), out); break;
        default: block<1>(p, w1, w2, rw, xs.data(), h.data(), a.data(), out); break;
      }
    }
  }
}

}  // namespace cpu
}  // namespace moe
}  // namespace tfk
