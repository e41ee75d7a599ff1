// Attention backward over one sub-pass, FlashAttention-2 style, in two kernels
// that need no atomics:
//   dQ:    one block per (query block, head, batch) walks the key blocks of
//          its schedule row, as the forward does: dQ += dS K.
//   dK/dV: one block per (key block, kv head, batch) walks the transposed
//          schedule of every query head of its group (GQA sums in-block):
//          dV += P^T dO, dK += dS^T Q.
// P is recomputed from the forward's (merged) lse; dS = P * (dP - delta) with
// delta = rowsum(dO * O) - dlse from the host. Under dropout (keep mask Z,
// scale c) the forward computed O = (c Z * P) V, so dV = (c Z * P)^T dO and
// dS = P * (c Z * dP - delta). Tiles stream through two
// shared-memory buffers by cp.async, products run on mma.sync.
#include "attention/attention.h"
#include "attention/tile.cuh"

namespace tfk {
namespace attention {
namespace bwd {

// The bias's gradient slot of query block blk's tile it (BwdParams::dbias).
template <typename Blk>
__device__ __forceinline__ int64_t dbias_slot(const BwdParams& p, const Blk& blk, int it) {
  return (static_cast<int64_t>(blk.b * p.heads + blk.h) * ((p.lq + kBlockM - 1) / kBlockM) + blockIdx.x) *
             p.kv_schedule.width + it;
}

// kMods: the score modifiers (Params::softcap, bias) are on: dS of the
// modified scores goes to the bias's gradient (BwdParams::dbias) and, times
// 1 - tanh^2 under a softcap, to dQ and dK.
template <typename T, bool kMods, int HD>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dq_kernel(const BwdParams p) {
  constexpr int kTile = kBlockM * HD;
  constexpr int kN = kBlockN / 8;
  T* const sQ = dynamic_smem<T>();
  T* const sdO = sQ + kTile;
  T* const sK = sdO + kTile;    // two buffers
  T* const sV = sK + 2 * kTile;  // two buffers

  const QueryBlock<T, HD> blk(p);
  const int warp = threadIdx.x / 32, lane = lane_id(), g = lane >> 2, t = lane & 3;
  const ScheduleRow& sched = blk.sched;
  const int q_valid = blk.q_valid;
  const int64_t q_row0 = blk.row0;
  load_tile<HD>(sQ, static_cast<const T*>(p.q) + q_row0 * HD, q_valid);
  load_tile<HD>(sdO, static_cast<const T*>(p.dout) + q_row0 * HD, q_valid);
  if (sched.count > 0) blk.load_kv(sK, sV, 0);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  const UserMask user = user_mask(p, blk.b, blk.h);
  const Dropout drop(p, blk.b, blk.h);
  const ScoreMods mods(p, blk.b, blk.h);
  float delta[2];
  const RowProb prob[2] = {RowProb(warp * 16 + g < q_valid ? p.lse[q_row0 + warp * 16 + g] : -INFINITY,
                                   p.predicates),
                           RowProb(warp * 16 + g + 8 < q_valid ? p.lse[q_row0 + warp * 16 + g + 8] : -INFINITY,
                                   p.predicates)};
  uint32_t drop_row[2] = {0, 0};
  TFK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    delta[r] = row < q_valid ? p.delta[q_row0 + row] : 0.f;
  }
  if (drop.on()) drop.row_words(drop_row, blk.q0, warp * 16, q_valid);
  float dq[HD / 8][4] = {};

  for (int it = 0; it < sched.count; ++it) {
    const int buf = it & 1;
    blk.await_kv(sK, sV, it);
    count_tile(p, 1);

    float s[kN][4] = {};
    float dp[kN][4] = {};
    gemm_abt<HD, kN>(s, sQ, warp * 16, sK + buf * kTile, 0);
    gemm_abt<HD, kN>(dp, sdO, warp * 16, sV + buf * kTile, 0);
    const int k0 = sched.blocks[it] * kBlockN;
    [[maybe_unused]] float fac[kN][4];  // 1 - tanh^2 (kMods only)
    if constexpr (kMods) {
      scale_and_mask_mods<false, true>(s, fac, p, user, mods, sched.partial[it], blk.q0, k0, warp * 16, 0,
                                       scale_log2);
    } else {
      scale_and_mask<false>(s, p, user, sched.partial[it], blk.q0, k0, warp * 16, 0, scale_log2);
    }
    if (drop.on()) drop.apply(dp, drop_row, k0, p.lk);
    TFK_UNROLL
    for (int n = 0; n < kN; ++n) {
      TFK_UNROLL
      for (int i = 0; i < 4; ++i) {
        s[n][i] = prob[i >> 1](s[n][i]) * (dp[n][i] - delta[i >> 1]);  // dS
        if (p.predicates != 0) {
          const int row = warp * 16 + g + 8 * (i >> 1), col = k0 + n * 8 + 2 * t + (i & 1);
          if (row < q_valid && col < p.lk && user.self_pair(blk.q0 + row, col)) s[n][i] = 0.f;
        }
        if constexpr (kMods) {
          if (p.dbias) {  // this tile's share of the bias's gradient
            const int row = warp * 16 + g + 8 * (i >> 1), col = n * 8 + 2 * t + (i & 1);
            const bool in = row < q_valid && k0 + col < p.lk;
            if (p.dbias_diagonal) {
              dp[n][i] = in ? s[n][i] : 0.f;  // kept for the per-diagonal sums below
            } else {  // element by element
              const int64_t off = dbias_slot(p, blk, it) * (kBlockM * kBlockN) + row * kBlockN + col;
              p.dbias[off] = in ? s[n][i] : 0.f;
              p.dbias_index[off] = in ? mods.bias_index(p, blk.h, blk.q0 + row, k0 + col) : 0;
            }
          }
          s[n][i] *= fac[n][i];  // the gradient of the raw score (times scale, below)
        }
      }
    }
    gemm_pb<HD, kBlockN / 16>(dq, s, sK + buf * kTile, 0);
    if constexpr (kMods) {
      if (p.dbias && p.dbias_diagonal) {  // block-uniform
        // This buffer's K and V are done with once every warp is past gemm_pb
        // (the next copy into it starts at it + 1's await_kv, after the
        // __syncthreads below): dS (float) goes there, rows 0-31 over K's and
        // 32-63 over V's, columns swizzled by row against bank conflicts.
        static_assert(kTile * sizeof(T) >= (kBlockM / 2) * kBlockN * sizeof(float), "dS staging");
        float* const lo = reinterpret_cast<float*>(sK + buf * kTile);
        float* const hi = reinterpret_cast<float*>(sV + buf * kTile);
        auto at = [&](int row, int col) -> float& {
          return (row < kBlockM / 2 ? lo + row * kBlockN : hi + (row - kBlockM / 2) * kBlockN)[col ^ ((row & 7) << 3)];
        };
        __syncthreads();
        TFK_UNROLL
        for (int n = 0; n < kN; ++n) {
          TFK_UNROLL
          for (int i = 0; i < 4; ++i) at(warp * 16 + g + 8 * (i >> 1), n * 8 + 2 * t + (i & 1)) = dp[n][i];
        }
        __syncthreads();
        const int64_t slot = dbias_slot(p, blk, it);
        if (threadIdx.x < kDiagonals) {  // diagonal d: col - row = d - (kBlockM - 1), summed in row order
          const int d = threadIdx.x, shift = d - (kBlockM - 1);
          const int k_valid = min(kBlockN, p.lk - k0);
          const int a0 = max(0, -shift), a1 = min(q_valid, k_valid - shift);  // rows [a0, a1) in the sequence
          float sum = 0.f;
          for (int a = a0; a < a1; ++a) sum += at(a, a + shift);
          p.dbias[slot * kDiagonals + d] = sum;
        }
        if (threadIdx.x == 0) {
          p.dbias_index[slot] =
              static_cast<int32_t>(blk.h * p.bias_stride + p.bias_offset + k0 - blk.q0 - (kBlockM - 1));
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  TFK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (row >= q_valid) continue;
    TFK_UNROLL
    for (int d = 0; d < HD / 8; ++d) {
      *reinterpret_cast<float2*>(p.dq + (q_row0 + row) * HD + d * 8 + 2 * t) =
          make_float2(dq[d][2 * r] * p.scale, dq[d][2 * r + 1] * p.scale);
    }
  }
}

// The (head, query block, partial) items of a key block's transposed schedule
// rows, over the query heads h0 .. h0 + heads - 1 of one kv head.
struct Cursor {
  const Schedule* sched;
  int h0, heads, kb, nkb;
  int head, n;      // current item: n-th entry of head h0 + head
  ScheduleRow row;

  __device__ __forceinline__ bool valid() const { return head < heads; }
  __device__ __forceinline__ int h() const { return h0 + head; }
  __device__ __forceinline__ int qb() const { return row.blocks[n]; }
  __device__ __forceinline__ int pid() const { return row.partial[n]; }
  // Moves to the next item (skips empty rows): from (head, n - 1) past the end.
  __device__ __forceinline__ void settle() {
    while (head < heads && n >= row.count) {
      if (++head < heads) row = schedule_row(*sched, h0 + head, kb, nkb);
      n = 0;
    }
  }
  __device__ __forceinline__ void advance() {
    ++n;
    settle();
  }
};

template <typename T, bool kMods, int HD>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dkdv_kernel(const BwdParams p) {
  constexpr int kTile = kBlockM * HD;
  // Query columns per step: 16 x kQC scores and dP per warp beside the dK and
  // dV accumulators; 32 keeps head dim 128 within registers.
  constexpr int kQC = HD == 128 ? 32 : 64;
  constexpr int kN = kQC / 8;
  T* const sK = dynamic_smem<T>();
  T* const sV = sK + kTile;
  T* const sQ = sV + kTile;       // two buffers
  T* const sdO = sQ + 2 * kTile;  // two buffers
  float* const sLse = reinterpret_cast<float*>(sdO + 2 * kTile);  // two buffers of kBlockM
  float* const sDelta = sLse + 2 * kBlockM;                       // two buffers

  const int kb = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int group = p.heads / p.kv_heads;
  const int warp = threadIdx.x / 32, lane = lane_id(), g = lane >> 2, t = lane & 3;
  const int k0 = kb * kBlockN;
  const int k_valid = min(kBlockN, p.lk - k0);
  const int nkb = (p.lk + kBlockN - 1) / kBlockN;
  const int64_t k_row0 = static_cast<int64_t>(b * p.kv_heads + hk) * p.lk + k0;

  Cursor cur{&p.q_schedule, hk * group, group, kb, nkb, 0, 0,
             schedule_row(p.q_schedule, hk * group, kb, nkb)};
  cur.settle();
  auto load_q = [&](const Cursor& c, int buf) {
    const int q0 = c.qb() * kBlockM;
    const int valid = min(kBlockM, p.lq - q0);
    const int64_t row0 = static_cast<int64_t>(b * p.heads + c.h()) * p.lq + q0;
    load_tile<HD>(sQ + buf * kTile, static_cast<const T*>(p.q) + row0 * HD, valid);
    load_tile<HD>(sdO + buf * kTile, static_cast<const T*>(p.dout) + row0 * HD, valid);
    load_rows_f32(sLse + buf * kBlockM, p.lse + row0, valid);
    load_rows_f32(sDelta + buf * kBlockM, p.delta + row0, valid);
  };
  load_tile<HD>(sK, static_cast<const T*>(p.k) + k_row0 * HD, k_valid);
  load_tile<HD>(sV, static_cast<const T*>(p.v) + k_row0 * HD, k_valid);
  if (cur.valid()) load_q(cur, 0);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  float dk[HD / 8][4] = {};
  float dv[HD / 8][4] = {};

  for (int it = 0; cur.valid(); ++it) {
    const int buf = it & 1;
    Cursor next = cur;
    next.advance();
    if (next.valid()) {
      load_q(next, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    count_tile(p, 2);
    const int q0 = cur.qb() * kBlockM;
    const UserMask user = user_mask(p, b, cur.h());
    const Dropout drop(p, b, cur.h());
    const T* const q = sQ + buf * kTile;
    const T* const dO = sdO + buf * kTile;
    const float* const lse = sLse + buf * kBlockM;
    const float* const delta = sDelta + buf * kBlockM;
    // Not unrolled: the steps share nothing, and unrolling spills at head dim 128.
    TFK_UNROLL_N(1)
    for (int c0 = 0; c0 < kBlockM; c0 += kQC) {
      float s[kN][4] = {};   // S^T: this warp's 16 keys x kQC queries
      float dp[kN][4] = {};  // dP^T
      gemm_abt<HD, kN>(s, sK, warp * 16, q, c0);
      gemm_abt<HD, kN>(dp, sV, warp * 16, dO, c0);
      [[maybe_unused]] float fac[kN][4];  // 1 - tanh^2 (kMods only)
      if constexpr (kMods) {
        scale_and_mask_mods<true, true>(s, fac, p, user, ScoreMods(p, b, cur.h()), cur.pid(), q0, k0, warp * 16, c0,
                                        scale_log2);
      } else {
        scale_and_mask<true>(s, p, user, cur.pid(), q0, k0, warp * 16, c0, scale_log2);
      }
      TFK_UNROLL
      for (int n = 0; n < kN; ++n) {
        TFK_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int col = c0 + n * 8 + 2 * t + (i & 1);
          const float pr = RowProb(lse[col], p.predicates)(s[n][i]);  // P^T
          const int key = k0 + warp * 16 + g + 8 * (i >> 1);
          float z = 1.f;  // dropout's c Z for this pair
          if (drop.on()) {
            z = q0 + col < p.lq && key < p.lk && drop.keep(drop.row_word(q0 + col), key) ? drop.scale : 0.f;
          }
          dp[n][i] = pr * (z * dp[n][i] - delta[col]);  // dS^T
          if (p.predicates != 0 && q0 + col < p.lq && key < p.lk && user.self_pair(q0 + col, key)) dp[n][i] = 0.f;
          if constexpr (kMods) dp[n][i] *= fac[n][i];
          s[n][i] = z * pr;                             // (c Z * P)^T, for dV
        }
      }
      gemm_pb<HD, kQC / 16>(dv, s, dO, c0);
      gemm_pb<HD, kQC / 16>(dk, dp, q, c0);
    }
    __syncthreads();  // the next prefetch overwrites this buffer
    cur = next;
  }
  cp_async_wait<0>();

  TFK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (row >= k_valid) continue;
    TFK_UNROLL
    for (int d = 0; d < HD / 8; ++d) {
      const int64_t off = (k_row0 + row) * HD + d * 8 + 2 * t;
      *reinterpret_cast<float2*>(p.dk + off) = make_float2(dk[d][2 * r] * p.scale, dk[d][2 * r + 1] * p.scale);
      *reinterpret_cast<float2*>(p.dv + off) = make_float2(dv[d][2 * r], dv[d][2 * r + 1]);
    }
  }
}

struct Launcher {
  template <typename T, int HD, bool kMods>
  static void run_kernels(const BwdParams& p, stream_t s) {
    launch(attention_bwd_dq_kernel<T, kMods, HD>, dim3((p.lq + kBlockM - 1) / kBlockM, p.heads, p.batch),
           dim3(kThreads), bwd_dq_smem_bytes(HD), s, p);
    if (p.lk > 0) {
      launch(attention_bwd_dkdv_kernel<T, kMods, HD>, dim3((p.lk + kBlockN - 1) / kBlockN, p.kv_heads, p.batch),
             dim3(kThreads), bwd_dkdv_smem_bytes(HD), s, p);
    }
  }
  template <typename T, int HD>
  static void run(const BwdParams& p, void* stream) {
    const stream_t s = static_cast<stream_t>(stream);
    if (p.mods()) {
      run_kernels<T, HD, true>(p, s);
    } else {
      run_kernels<T, HD, false>(p, s);
    }
  }
};

}  // namespace bwd

int64_t bwd_dq_smem_bytes(int head_dim) { return 6LL * kBlockM * head_dim * 2; }  // Q, dO + 2 x (K, V)
int64_t bwd_dkdv_smem_bytes(int head_dim) {
  return 6LL * kBlockM * head_dim * 2 + 4LL * kBlockM * 4;  // K, V + 2 x (Q, dO) + 2 x (lse, delta)
}

void bwd_launch(const BwdParams& p, void* stream) {
  if (p.lq <= 0 || p.batch <= 0 || p.heads <= 0) return;
  dispatch<bwd::Launcher>(p, stream);
}

}  // namespace attention
}  // namespace tfk
