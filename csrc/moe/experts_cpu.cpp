// The small-group MoE experts forward on the CPU (see experts_cpu.h).
//
// A block of up to kRows rows of one expert streams the expert's weights
// once: every weight row is dotted with the block's rows, 8-float vectors in
// two independent accumulators per row (GCC/Clang vector extensions, so the
// same source becomes AVX2 or SSE/NEON code), then summed in a fixed order.
// 16-bit weights are widened to float as they are loaded (exactly: bf16 by a
// shift, fp16 by integer arithmetic on its fields, no F16C needed); the sums,
// the activation and the rows are float32. The sums never depend on the
// machine: the AVX2 clone and the generic one perform the same additions in
// the same order (no FMA contraction in ISO C++), and rows never share a sum.
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
typedef uint32_t u8x32 __attribute__((vector_size(32)));  // 8 lanes of uint32
typedef uint16_t u8x16 __attribute__((vector_size(16)));  // 8 lanes of uint16

template <typename V, typename T>
TFK_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

template <typename To, typename From>
TFK_INLINE To bits(From v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To t;
  std::memcpy(&t, &v, sizeof t);
  return t;
}

// Storage types: 8 values widened to float, and one.
struct F32 {
  using T = float;
  static TFK_INLINE f8 vec(const float* p) { return load<f8>(p); }
  static TFK_INLINE float one(float v) { return v; }
};

struct BF16 {  // the high half of a float
  using T = uint16_t;
  static TFK_INLINE f8 vec(const uint16_t* p) {
    return bits<f8>(__builtin_convertvector(load<u8x16>(p), u8x32) << 16);
  }
  static TFK_INLINE float one(uint16_t v) { return bits<float>(static_cast<uint32_t>(v) << 16); }
};

struct F16 {  // IEEE half: exponent rebiased; subnormals renormalised by a float subtraction; Inf/NaN kept
  using T = uint16_t;
  static TFK_INLINE f8 vec(const uint16_t* p) {
    const u8x32 h = __builtin_convertvector(load<u8x16>(p), u8x32);
    const u8x32 exp_mask = u8x32{} + (0x7c00u << 13);
    u8x32 o = (h & 0x7fffu) << 13;  // exponent and mantissa in float's places
    const u8x32 exp = o & exp_mask;
    o += (127u - 15u) << 23;
    o += bits<u8x32>(exp == exp_mask) & ((128u - 16u) << 23);  // Inf/NaN: all ones exponent
    const u8x32 sub = bits<u8x32>(exp == 0);                    // zero or subnormal
    const u8x32 renorm = bits<u8x32>(bits<f8>(o + (1u << 23)) - (f8{} + bits<float>(113u << 23)));
    o = (renorm & sub) | (o & ~sub);
    return bits<f8>(o | ((h & 0x8000u) << 16));
  }
  static TFK_INLINE float one(uint16_t v) {  // the vector path on one lane: one conversion to trust
    const uint16_t lanes[8] = {v};
    return vec(lanes)[0];
  }
};

// dst[0 .. n) = src widened to float, 8 at a time.
template <typename S>
TFK_INLINE void widen(const typename S::T* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const f8 v = S::vec(src + j);
    std::memcpy(dst + j, &v, sizeof v);
  }
  for (; j < n; ++j) dst[j] = S::one(src[j]);
}

TFK_INLINE float sum8(f8 v) {  // fixed order: halves, then the pairs
  f4 s = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// out[r * out_stride] = dot(xs[r * K ...], w[0 .. K)) for the block's R rows.
template <typename S, int R>
TFK_INLINE void dots(const typename S::T* __restrict w, const float* __restrict xs, int64_t K,
                     float* __restrict out, int64_t out_stride) {
  f8 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = f8{};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const f8 w0 = S::vec(w + k), w1 = S::vec(w + k + 8);
    for (int r = 0; r < R; ++r) {
      acc0[r] += load<f8>(xs + r * K + k) * w0;
      acc1[r] += load<f8>(xs + r * K + k + 8) * w1;
    }
  }
  if (k + 8 <= K) {
    const f8 w0 = S::vec(w + k);
    for (int r = 0; r < R; ++r) acc0[r] += load<f8>(xs + r * K + k) * w0;
    k += 8;
  }
  for (int r = 0; r < R; ++r) {
    float s = sum8(acc0[r] + acc1[r]);
    for (int64_t j = k; j < K; ++j) s += xs[r * K + j] * S::one(w[j]);
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
template <typename S, int R>
TFK_INLINE void block(const ExpertsRows& p, const typename S::T* w1, const typename S::T* w2,
                      const float* row_weight, const float* xs, float* h, float* a, float* out) {
  const int64_t H = p.H, I = p.I;
  for (int64_t n = 0; n < 2 * I; ++n) dots<S, R>(w1 + n * H, xs, H, h + n, 2 * I);
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < I; ++i) a[r * I + i] = activate(h[r * 2 * I + i], p.act) * h[r * 2 * I + I + i];
  for (int64_t j = 0; j < H; ++j) dots<S, R>(w2 + j * I, a, I, out + j, H);
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < H; ++j) out[r * H + j] *= row_weight[r];
}

template <typename S>
TFK_INLINE void rows(const ExpertsRows& p) {
  using T = typename S::T;
  const int64_t H = p.H, I = p.I;
  const T* x = static_cast<const T*>(p.x);
  std::vector<float> xs(kRows * H), h(kRows * 2 * I), a(kRows * I);
  for (int64_t e = 0; e < p.E; ++e) {
    const T* w1 = static_cast<const T*>(p.gate_up_proj) + e * 2 * I * H;
    const T* w2 = static_cast<const T*>(p.down_proj) + e * H * I;
    const int64_t end = p.ends[e];
    for (int64_t m = e == 0 ? 0 : p.ends[e - 1]; m < end; m += kRows) {
      const int n = static_cast<int>(std::min<int64_t>(kRows, end - m));
      for (int r = 0; r < n; ++r) widen<S>(x + p.token[m + r] * H, &xs[r * H], H);
      float* out = p.rows + m * H;
      const float* rw = p.row_weight + m;
      static_assert(kRows == 4, "one case per block size");
      switch (n) {
        case 4: block<S, 4>(p, w1, w2, rw, xs.data(), h.data(), a.data(), out); break;
        case 3: block<S, 3>(p, w1, w2, rw, xs.data(), h.data(), a.data(), out); break;
        case 2: block<S, 2>(p, w1, w2, rw, xs.data(), h.data(), a.data(), out); break;
        default: block<S, 1>(p, w1, w2, rw, xs.data(), h.data(), a.data(), out); break;
      }
    }
  }
}

}  // namespace

TFK_CPU_CLONES void experts_rows(const ExpertsRows& p) {
  switch (p.dtype) {
    case Dtype::kFloat32: rows<F32>(p); break;
    case Dtype::kBFloat16: rows<BF16>(p); break;
    default: rows<F16>(p); break;
  }
}

void experts_forward(const ExpertsForward& f) {
  const int64_t T = f.T, k = f.k, E = f.E, H = f.H;
  // Each kept assignment's place among its expert's rows, first choices first.
  std::vector<int64_t> count(E, 0), place(T * k, -1);
  for (int64_t s = 0; s < k; ++s)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t e = f.experts[t * k + s];
      if (e >= 0 && e < E && (f.capacity < 0 || count[e] < f.capacity)) place[t * k + s] = count[e]++;
    }
  std::vector<int64_t> ends(E);
  for (int64_t e = 0, total = 0; e < E; ++e) ends[e] = total += count[e];
  const int64_t M = E ? ends[E - 1] : 0;
  std::vector<int64_t> token(M), row(T * k, -1);  // row: the row of assignment (t, s), -1 when dropped
  std::vector<float> row_weight(M), rows(M * H);
  for (int64_t a = 0; a < T * k; ++a) {
    if (place[a] < 0) continue;
    const int64_t e = f.experts[a];
    row[a] = ends[e] - count[e] + place[a];
    token[row[a]] = a / k;
    row_weight[row[a]] = f.weights[a];
  }
  experts_rows(ExpertsRows{f.x, token.data(), ends.data(), row_weight.data(), f.gate_up_proj, f.down_proj,
                           rows.data(), E, H, f.I, f.act, f.dtype});
  for (int64_t t = 0; t < T; ++t) {
    float* o = f.out + t * H;
    bool first = true;
    for (int64_t s = 0; s < k; ++s) {
      const int64_t m = row[t * k + s];
      if (m < 0) continue;
      const float* r = rows.data() + m * H;
      if (first) {
        std::memcpy(o, r, H * sizeof(float));
        first = false;
      } else {
        for (int64_t j = 0; j < H; ++j) o[j] += r[j];
      }
    }
    if (first) std::fill(o, o + H, 0.f);
  }
}

}  // namespace cpu
}  // namespace moe
}  // namespace tfk
