// Device pieces shared by the attention kernels: element traits, shared-memory
// tiles (cp.async in, ldmatrix out) and fragment conversions.
//
// Tiles are kBlockM (= kBlockN) rows of HD 16-bit elements in shared memory,
// each row's 16-byte chunks XOR-swizzled by (row % 8) so that the eight rows
// one ldmatrix phase reads fall in different banks.
//
// Fragment names follow common/warp_primitives.h: per warp, g = lane / 4 and
// t = lane % 4; a C fragment (16x8 f32) holds rows g and g + 8, columns 2t and
// 2t + 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention/attention.h"
#include "common/elem.cuh"
#include "common/tfk_cuda.h"
#include "common/warp_primitives.h"

namespace tfk {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Elem<T> (packing and the mma of __half / __nv_bfloat16): common/elem.cuh.

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled tile.
template <int HD>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return row * HD + ((chunk ^ (row & 7)) << 3);
}

// cp.async of rows [0, 64) of a row-major (row stride HD) global tile into a
// swizzled shared tile; rows >= valid are zero-filled and not read. The
// caller commits the group.
template <int HD, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int valid) {
  constexpr int kChunks = HD / 8;
  for (int i = threadIdx.x; i < kBlockM * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = r < valid;
    cp_async_16(smem + tile_offset<HD>(r, c), ok ? gmem + static_cast<int64_t>(r) * HD + c * 8 : gmem,
                ok ? 16u : 0u);
  }
}

// cp.async of `valid` (<= 64) float32 row statistics; the rest zero-filled.
__device__ __forceinline__ void load_rows_f32(float* smem, const float* gmem, int valid) {
  if (threadIdx.x < kBlockM) {
    const int r = threadIdx.x;
    cp_async_4(smem + r, r < valid ? gmem + r : gmem, r < valid ? 4u : 0u);
  }
}

// A fragment (16x16, row-major) of rows [row0, row0 + 16), columns [16kk, 16kk + 16).
template <int HD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int kk) {
  const int l = lane_id();
  ldmatrix_x4(a, tile + tile_offset<HD>(row0 + (l & 15), 2 * kk + (l >> 4)));
}

// B fragments of two n-tiles, [n0, n0 + 8) in b[0..1] and [n0 + 8, n0 + 16) in
// b[2..3], k in [16kk, 16kk + 16), from a tile stored n-major (row = n, e.g.
// K in Q K^T): B[k][n] = tile[n][k].
template <int HD, typename T>
__device__ __forceinline__ void load_b_nmajor(uint32_t (&b)[4], const T* tile, int n0, int kk) {
  const int l = lane_id();
  ldmatrix_x4(b, tile + tile_offset<HD>(n0 + (l & 7) + ((l >> 4) << 3), 2 * kk + ((l >> 3) & 1)));
}

// The same from a tile stored k-major (row = k, e.g. V in P V): B[k][n] =
// tile[k][n], k in [k0, k0 + 16), n in [n0, n0 + 16) (n0 a multiple of 8).
template <int HD, typename T>
__device__ __forceinline__ void load_b_kmajor(uint32_t (&b)[4], const T* tile, int k0, int n0) {
  const int l = lane_id();
  ldmatrix_x4_trans(b, tile + tile_offset<HD>(k0 + (l & 15), (n0 >> 3) + (l >> 4)));
}

// The A fragment of k-step kk (columns [16kk, 16kk + 16)) of a 16 x 8N f32
// accumulator held as C fragments c[N][4], rounded to T: how P (or dS) feeds
// the next product without leaving registers.
template <typename T, int N>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[N][4], int kk) {
  a[0] = Elem<T>::pack(c[2 * kk][0], c[2 * kk][1]);
  a[1] = Elem<T>::pack(c[2 * kk][2], c[2 * kk][3]);
  a[2] = Elem<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = Elem<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// c[N][4] (16 rows x 8N columns) += A (16 x HD, shared, rows [a_row0, +16)) *
// B^T, B n-major in shared memory with rows [b_row0, b_row0 + 8N): scores.
template <int HD, int N, typename T>
__device__ __forceinline__ void gemm_abt(float (&c)[N][4], const T* a_tile, int a_row0, const T* b_tile,
                                         int b_row0) {
  TFK_UNROLL
  for (int kk = 0; kk < HD / 16; ++kk) {
    uint32_t a[4];
    load_a<HD>(a, a_tile, a_row0, kk);
    TFK_UNROLL
    for (int n = 0; n < N; n += 2) {
      uint32_t b[4];
      load_b_nmajor<HD>(b, b_tile, b_row0 + 8 * n, kk);
      Elem<T>::mma(c[n], a, b[0], b[1]);
      Elem<T>::mma(c[n + 1], a, b[2], b[3]);
    }
  }
}

// acc[HD / 8][4] (16 x HD) += P (16 x 16K, C fragments p[2K][4]) * B, B
// k-major in shared memory with rows [b_row0, b_row0 + 16K): P V, dS K, ...
template <int HD, int K, typename T>
__device__ __forceinline__ void gemm_pb(float (&acc)[HD / 8][4], const float (&p)[2 * K][4], const T* b_tile,
                                        int b_row0) {
  TFK_UNROLL
  for (int kk = 0; kk < K; ++kk) {
    uint32_t a[4];
    c_to_a<T>(a, p, kk);
    TFK_UNROLL
    for (int n = 0; n < HD / 8; n += 2) {
      uint32_t b[4];
      load_b_kmajor<HD>(b, b_tile, b_row0 + 16 * kk, 8 * n);
      Elem<T>::mma(acc[n], a, b[0], b[1]);
      Elem<T>::mma(acc[n + 1], a, b[2], b[3]);
    }
  }
}

// The original position of layout position `pos` (index null: the identity).
__device__ __forceinline__ int64_t original(const int64_t* index, int pos) { return index ? index[pos] : pos; }

// The index tables of query head h in batch b, and of its key head.
__device__ __forceinline__ const int64_t* q_table(const Params& p, int b, int h) {
  return p.q_index ? p.q_index + (static_cast<int64_t>(b) * p.heads + h) * p.q_index_stride : nullptr;
}
__device__ __forceinline__ const int64_t* kv_table(const Params& p, int b, int h) {
  const int hk = h / (p.heads / p.kv_heads);
  return p.kv_index ? p.kv_index + (static_cast<int64_t>(b) * p.kv_heads + hk) * p.kv_index_stride : nullptr;
}

// Reformer's self logit -1e5 in log2 units as float32 holds it. It stands
// for -1e5 * log2(e) exactly: a self-only row (lse near -1e5) measures from
// it (row_lse, RowProb), so its probabilities and lse are exact.
constexpr float kSelfLogit2 = -144269.5f;
// A row whose max (log2 units) or lse (natural) is below these saw only self logits.
constexpr float kSelfRowMax2 = -5e4f * 1.4426950408889634f;
constexpr float kSelfRowLse = -5e4f;

// A row's lse (natural) from its max m (log2 units) and sum. A row that saw
// only its self logit has m near -1.4e5, where float32 steps by 0.016: it
// measures from the self logit, in small numbers.
__device__ __forceinline__ float row_lse(float m, float sum, int predicates) {
  if (predicates != 0 && m < kSelfRowMax2) return ((m - kSelfLogit2) + log2f(sum)) * kLn2 - 1e5f;
  return (m + log2f(sum)) * kLn2;
}

// Probabilities exp(s - lse) of a row's scores x = s * log2(e), from its
// natural lse: exp2f((x - ref) - shift); 0 for a row with no allowed key
// (lse = -inf). A self-only row (see row_lse) measures from the self logit
// (else a 1% error in its probabilities).
struct RowProb {
  float ref, shift;
  __device__ __forceinline__ RowProb(float lse, int predicates) {
    const bool self_only = predicates != 0 && lse < kSelfRowLse;
    ref = self_only ? kSelfLogit2 : 0.f;
    shift = lse == -INFINITY ? INFINITY : (self_only ? (lse + 1e5f) * kLog2e : lse * kLog2e);
  }
  __device__ __forceinline__ float operator()(float x) const { return exp2f((x - ref) - shift); }
};

// Whether the user mask lets (query row, key col) of the layout through, and
// what it adds to the score (log2 units); the position predicates; rows and
// cols inside the sequence.
struct UserMask {
  int kind;
  const void* mask;
  int64_t base;  // b * stride[0] + h * stride[1]
  int64_t sm, sn;
  const int64_t* q_index;
  const int64_t* kv_index;

  __device__ __forceinline__ float bias(int row, int col) const {
    const int64_t off = base + original(q_index, row) * sm + original(kv_index, col) * sn;
    if (kind == 1) return static_cast<const uint8_t*>(mask)[off] ? 0.f : -INFINITY;
    return static_cast<const float*>(mask)[off] * kLog2e;
  }

  // Score x under the position predicates (Params::predicates, not 0).
  __device__ __forceinline__ float predicate(float x, int predicates, int row, int col) const {
    const int64_t i = original(q_index, row), j = original(kv_index, col);
    if (j == i) return kSelfLogit2;
    return predicates == 2 && j > i ? -INFINITY : x;
  }
  // Whether (row, col), inside the sequence, pairs a query with its own
  // position: its logit is a constant, so its dS is 0.
  __device__ __forceinline__ bool self_pair(int row, int col) const {
    return original(q_index, row) == original(kv_index, col);
  }
};

__device__ __forceinline__ UserMask user_mask(const Params& p, int b, int h) {
  return UserMask{p.mask_kind,        p.mask,          b * p.mask_stride[0] + h * p.mask_stride[1],
                  p.mask_stride[2],   p.mask_stride[3], q_table(p, b, h),
                  kv_table(p, b, h)};
}

// Scores of one tile to log2 units (times scale_log2), with its masks: pairs
// outside the sequence, outside the plan's tile mask (partial tile `pid`, or
// -1 for a full one) or refused by the user mask become -inf; a float user
// mask adds. Element (i of n-tile n) of the 16 x 8N fragment is at tile row
// row0 + g + 8 * (i / 2), column col0 + 8n + 2t + i % 2; rows are queries and
// columns keys, or the other way round when kTransposed (dK/dV).
template <bool kTransposed, int N>
__device__ __forceinline__ void scale_and_mask(float (&s)[N][4], const Params& p, const UserMask& user, int pid,
                                               int q0, int k0, int row0, int col0, float scale_log2) {
  // Interior full tiles without a user mask or predicates (most tiles) only
  // scale. Full tiles may reach past the sequence's end: the plan only
  // bounds-masks partial ones.
  if (pid < 0 && p.mask_kind == 0 && p.predicates == 0 && q0 + kBlockM <= p.lq && k0 + kBlockN <= p.lk) {
    TFK_UNROLL
    for (int n = 0; n < N; ++n) {
      TFK_UNROLL
      for (int i = 0; i < 4; ++i) s[n][i] *= scale_log2;
    }
    return;
  }
  const uint8_t* pm = pid >= 0 ? p.partial_masks + static_cast<int64_t>(pid) * kBlockM * kBlockN : nullptr;
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
  TFK_UNROLL
  for (int n = 0; n < N; ++n) {
    TFK_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int a = row0 + g + 8 * (i >> 1), c = col0 + n * 8 + 2 * t + (i & 1);
      const int qr = kTransposed ? c : a, kr = kTransposed ? a : c;
      float x = s[n][i] * scale_log2;
      if (q0 + qr >= p.lq || k0 + kr >= p.lk || (pm && !pm[qr * kBlockN + kr])) {
        x = -INFINITY;
      } else {
        if (p.mask_kind != 0) x += user.bias(q0 + qr, k0 + kr);
        if (p.predicates != 0) x = user.predicate(x, p.predicates, q0 + qr, k0 + kr);
      }
      s[n][i] = x;
    }
  }
}

// The score modifiers of one (batch, head) (Params::softcap, bias): the raw
// score q.k of layout positions (row, col) to its modified score, log2 units.
struct ScoreMods {
  float cap_scale;    // scale / cap: tanh's argument per raw score
  float cap_log2;     // cap * log2(e)
  const float* bias;  // the head's row at offset bias_offset (null: none)
  const int64_t* q_index;
  const int64_t* kv_index;

  __device__ __forceinline__ ScoreMods(const Params& p, int b, int h)
      : cap_scale(p.softcap > 0.f ? p.scale / p.softcap : 0.f), cap_log2(p.softcap * kLog2e),
        bias(p.bias ? p.bias + h * p.bias_stride + p.bias_offset : nullptr), q_index(q_table(p, b, h)),
        kv_index(kv_table(p, b, h)) {}

  // The score (log2 units) of raw score s at (row, col), inside the sequence;
  // f gets d(capped score) / d(scale * s) = 1 - tanh^2 (1 without a cap).
  __device__ __forceinline__ float operator()(float s, float scale_log2, int row, int col, float& f) const {
    float x;
    if (cap_scale != 0.f) {
      const float t = tanhf(s * cap_scale);
      f = 1.f - t * t;
      x = t * cap_log2;
    } else {
      f = 1.f;
      x = s * scale_log2;
    }
    if (bias) x += bias[original(kv_index, col) - original(q_index, row)] * kLog2e;
    return x;
  }
  // The flat index of (row, col)'s bias entry in the (heads, bias_stride) vector.
  __device__ __forceinline__ int32_t bias_index(const Params& p, int h, int row, int col) const {
    return static_cast<int32_t>(h * p.bias_stride + p.bias_offset + original(kv_index, col) - original(q_index, row));
  }
};

// scale_and_mask with the score modifiers: the same masks, on the modified
// scores; with kGrad, f gets each element's 1 - tanh^2 (0 where masked).
// Every tile goes element by element (the bias depends on the position).
template <bool kTransposed, bool kGrad, int N>
__device__ __forceinline__ void scale_and_mask_mods(float (&s)[N][4], float (&f)[N][4], const Params& p,
                                                    const UserMask& user, const ScoreMods& mods, int pid, int q0,
                                                    int k0, int row0, int col0, float scale_log2) {
  const uint8_t* pm = pid >= 0 ? p.partial_masks + static_cast<int64_t>(pid) * kBlockM * kBlockN : nullptr;
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
  TFK_UNROLL
  for (int n = 0; n < N; ++n) {
    TFK_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int a = row0 + g + 8 * (i >> 1), c = col0 + n * 8 + 2 * t + (i & 1);
      const int qr = kTransposed ? c : a, kr = kTransposed ? a : c;
      float x, fx = 0.f;
      if (q0 + qr >= p.lq || k0 + kr >= p.lk || (pm && !pm[qr * kBlockN + kr])) {
        x = -INFINITY;
      } else {
        x = mods(s[n][i], scale_log2, q0 + qr, k0 + kr, fx);
        if (p.mask_kind != 0) x += user.bias(q0 + qr, k0 + kr);
        if (p.predicates != 0) x = user.predicate(x, p.predicates, q0 + qr, k0 + kr);
      }
      s[n][i] = x;
      if (kGrad) f[n][i] = fx;
    }
  }
}

// tfk/dropout.py's 32-bit finaliser (uint32 multiplication wraps).
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  return x ^ (x >> 16);
}

// Dropout's keep bits for one (batch, head) (see Params::drop_*): a word per
// query row, then one mix per key. Rows and cols are layout positions inside
// the sequence; the hash takes original ones.
struct Dropout {
  uint32_t head_word, threshold;
  float scale;
  const int64_t* q_index;
  const int64_t* kv_index;
  uint32_t q0, k0;   // the call's place in a larger call's grid (Params::drop_q0, drop_k0)

  __device__ __forceinline__ Dropout(const Params& p, int b, int h)
      : head_word(mix32(static_cast<uint32_t>((b * (p.drop_heads ? p.drop_heads : p.heads) + p.drop_head0 + h) *
                                                  p.drop_rounds + p.drop_round) ^ p.drop_key)),
        threshold(p.drop_threshold), scale(p.drop_scale), q_index(q_table(p, b, h)), kv_index(kv_table(p, b, h)),
        q0(p.drop_q0), k0(p.drop_k0) {}

  __device__ __forceinline__ bool on() const { return threshold != 0; }
  __device__ __forceinline__ uint32_t row_word(int row) const {
    return mix32((static_cast<uint32_t>(original(q_index, row)) + q0) ^ head_word);
  }
  __device__ __forceinline__ bool keep(uint32_t row_word, int col) const {
    return mix32((static_cast<uint32_t>(original(kv_index, col)) + k0) ^ row_word) >= threshold;
  }

  // The words of this thread's two fragment rows, tile rows row0 + g and
  // row0 + g + 8 of the query block at q0 (0 past its q_valid rows).
  __device__ __forceinline__ void row_words(uint32_t (&w)[2], int q0, int row0, int q_valid) const {
    const int g = lane_id() >> 2;
    TFK_UNROLL
    for (int r = 0; r < 2; ++r) w[r] = row0 + g + 8 * r < q_valid ? row_word(q0 + row0 + g + 8 * r) : 0;
  }

  // x (a 16 x 8N fragment: rows this thread's query rows with words w,
  // columns keys k0 + 8n + 2t + i % 2) times scale where kept, else 0.
  template <int N>
  __device__ __forceinline__ void apply(float (&x)[N][4], const uint32_t (&w)[2], int k0, int lk) const {
    const int t = lane_id() & 3;
    TFK_UNROLL
    for (int n = 0; n < N; ++n) {
      TFK_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int col = k0 + n * 8 + 2 * t + (i & 1);
        if (col < lk) x[n][i] = keep(w[i >> 1], col) ? x[n][i] * scale : 0.f;
      }
    }
  }
};

// Counts one visited tile in tiles[which] when the caller asked for counts.
__device__ __forceinline__ void count_tile(const Params& p, int which) {
  if (p.tiles && threadIdx.x == 0) atomicAdd(p.tiles + which, 1);
}

// Reduction over the four lanes (t = 0..3) that share a row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The schedule row of block `blk` for head h.
struct ScheduleRow {
  int count;
  const int32_t* blocks;
  const int32_t* partial;
};

__device__ __forceinline__ ScheduleRow schedule_row(const Schedule& s, int h, int blk, int nblocks) {
  const int64_t row = (s.per_head ? static_cast<int64_t>(h) * nblocks : 0) + blk;
  return ScheduleRow{s.count[row], s.blocks + row * s.width, s.partial + row * s.width};
}

// What the forward and dQ kernels share: block (blockIdx.x, y, z) = (query
// block, head, batch), its schedule row and its head's keys and values.
template <typename T, int HD>
struct QueryBlock {
  int q0, h, b;
  int q_valid;     // rows of the block inside the sequence
  int64_t row0;    // its first row in (B, H, Lq) tensors
  ScheduleRow sched;
  const T* k;
  const T* v;
  int lk;

  __device__ __forceinline__ explicit QueryBlock(const Params& p)
      : q0(blockIdx.x * kBlockM), h(blockIdx.y), b(blockIdx.z), q_valid(min(kBlockM, p.lq - q0)),
        row0(static_cast<int64_t>(b * p.heads + h) * p.lq + q0),
        sched(schedule_row(p.kv_schedule, h, blockIdx.x, (p.lq + kBlockM - 1) / kBlockM)),
        lk(p.lk) {
    const int64_t kv_row0 = static_cast<int64_t>(b * p.kv_heads + h / (p.heads / p.kv_heads)) * p.lk;
    k = static_cast<const T*>(p.k) + kv_row0 * HD;
    v = static_cast<const T*>(p.v) + kv_row0 * HD;
  }

  // cp.async of the it-th scheduled key and value tiles into buffer it % 2 of
  // sK and sV (two tiles each; not committed).
  __device__ __forceinline__ void load_kv(T* sK, T* sV, int it) const {
    const int64_t k0 = static_cast<int64_t>(sched.blocks[it]) * kBlockN;
    const int valid = min(kBlockN, lk - static_cast<int>(k0));
    const int buf = (it & 1) * kBlockN * HD;
    load_tile<HD>(sK + buf, k + k0 * HD, valid);
    load_tile<HD>(sV + buf, v + k0 * HD, valid);
  }

  // The double buffer's step before the math on tile it: starts the copy of
  // tile it + 1 into the other buffer, then waits until tile it (and what
  // was committed with it) has landed and is visible to the whole block.
  __device__ __forceinline__ void await_kv(T* sK, T* sV, int it) const {
    if (it + 1 < sched.count) {
      load_kv(sK, sV, it + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
  }
};

// Runs Launcher::run<T, HD>(p, stream) for p's dtype and head dim (the
// instantiated ones: 64 and 128).
template <typename Launcher, typename P>
void dispatch(const P& p, void* stream) {
  const bool bf16 = p.dtype == Dtype::kBFloat16;
  if (p.head_dim == 64) {
    bf16 ? Launcher::template run<__nv_bfloat16, 64>(p, stream) : Launcher::template run<__half, 64>(p, stream);
  } else if (p.head_dim == 128) {
    bf16 ? Launcher::template run<__nv_bfloat16, 128>(p, stream) : Launcher::template run<__half, 128>(p, stream);
  } else {
    throw std::invalid_argument("tfk attention: head_dim " + std::to_string(p.head_dim) +
                                " (kernels take 64 or 128)");
  }
}

}  // namespace attention
}  // namespace tfk
