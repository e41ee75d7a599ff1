// Attention forward over one sub-pass: out and lse, FlashAttention-2 style.
//
// One block of 4 warps per (query block, head, batch); each warp owns 16 query
// rows. Key/value tiles of the block's schedule row stream through two
// shared-memory buffers (cp.async of tile n + 1 overlaps the math on tile n);
// S = Q K^T and O += P V run on mma.sync with the softmax online in registers,
// in log2 units. Interior full tiles skip masking; partial tiles read their
// plan mask.
#include "attention/attention.h"
#include "attention/tile.cuh"

namespace tfk {
namespace attention {
// Named (not anonymous) so kernel names in ptxas reports and profilers are stable.
namespace fwd {

// kMods: the score modifiers (Params::softcap, bias) are on; the plain
// kernels are instantiated without them.
template <typename T, bool kMods, int HD>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const FwdParams p) {
  constexpr int kTile = kBlockM * HD;  // elements of one shared tile
  constexpr int kN = kBlockN / 8;      // n-tiles of scores per warp
  T* const sQ = dynamic_smem<T>();
  T* const sK = sQ + kTile;            // two buffers
  T* const sV = sK + 2 * kTile;        // two buffers

  const QueryBlock<T, HD> blk(p);
  const int warp = threadIdx.x / 32, lane = lane_id(), g = lane >> 2, t = lane & 3;
  const ScheduleRow& sched = blk.sched;
  load_tile<HD>(sQ, static_cast<const T*>(p.q) + blk.row0 * HD, blk.q_valid);
  if (sched.count > 0) blk.load_kv(sK, sV, 0);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  const UserMask user = user_mask(p, blk.b, blk.h);
  const Dropout drop(p, blk.b, blk.h);
  const ScoreMods mods(p, blk.b, blk.h);
  const int rows[2] = {warp * 16 + g, warp * 16 + g + 8};  // this thread's rows in the tile
  uint32_t drop_row[2] = {0, 0};
  if (drop.on()) drop.row_words(drop_row, blk.q0, warp * 16, blk.q_valid);
  float o[HD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY};  // running row max (log2 units)
  float l[2] = {0.f, 0.f};              // running row sum, this thread's columns

  for (int it = 0; it < sched.count; ++it) {
    const int buf = it & 1;
    blk.await_kv(sK, sV, it);
    count_tile(p, 0);

    float s[kN][4] = {};
    gemm_abt<HD, kN>(s, sQ, warp * 16, sK + buf * kTile, 0);

    if constexpr (kMods) {
      scale_and_mask_mods<false, false>(s, s, p, user, mods, sched.partial[it], blk.q0,
                                        sched.blocks[it] * kBlockN, warp * 16, 0, scale_log2);
    } else {
      scale_and_mask<false>(s, p, user, sched.partial[it], blk.q0, sched.blocks[it] * kBlockN, warp * 16, 0,
                            scale_log2);
    }

    TFK_UNROLL
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
      TFK_UNROLL
      for (int n = 0; n < kN; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      const float m_new = fmaxf(m[r], quad_max(mx));
      // A row with nothing allowed yet keeps m = -inf: subtract 0 instead (no NaN).
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[r] - base);
      m[r] = m_new;
      l[r] *= alpha;
      TFK_UNROLL
      for (int d = 0; d < HD / 8; ++d) {
        o[d][2 * r] *= alpha;
        o[d][2 * r + 1] *= alpha;
      }
      TFK_UNROLL
      for (int n = 0; n < kN; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] - base);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
        l[r] += s[n][2 * r] + s[n][2 * r + 1];
      }
    }
    // Dropout acts on P V only: the normaliser l sums the undropped P.
    if (drop.on()) drop.apply(s, drop_row, sched.blocks[it] * kBlockN, p.lk);

    gemm_pb<HD, kBlockN / 16>(o, s, sV + buf * kTile, 0);
    __syncthreads();  // the next iteration's prefetch overwrites this buffer
  }
  cp_async_wait<0>();  // nothing in flight at exit (an empty schedule row)

  TFK_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(l[r]);
    const int64_t row = blk.row0 + rows[r];
    if (rows[r] >= blk.q_valid) continue;
    // A row no key may attend to: out 0, lse -inf (as torch's math SDPA).
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    if (t == 0) p.lse[row] = sum > 0.f ? row_lse(m[r], sum, p.predicates) : -INFINITY;
    TFK_UNROLL
    for (int d = 0; d < HD / 8; ++d) {
      const int64_t off = row * HD + d * 8 + 2 * t;
      const float x0 = o[d][2 * r] * inv, x1 = o[d][2 * r + 1] * inv;
      if (p.out_f32) {
        *reinterpret_cast<float2*>(static_cast<float*>(p.out) + off) = make_float2(x0, x1);
      } else {
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + off) = Elem<T>::pack(x0, x1);
      }
    }
  }
}

struct Launcher {
  template <typename T, int HD>
  static void run(const FwdParams& p, void* stream) {
    const dim3 grid((p.lq + kBlockM - 1) / kBlockM, p.heads, p.batch);
    if (p.mods()) {
      launch(attention_fwd_kernel<T, true, HD>, grid, dim3(kThreads), fwd_smem_bytes(HD),
             static_cast<stream_t>(stream), p);
    } else {
      launch(attention_fwd_kernel<T, false, HD>, grid, dim3(kThreads), fwd_smem_bytes(HD),
             static_cast<stream_t>(stream), p);
    }
  }
};

}  // namespace fwd

int64_t fwd_smem_bytes(int head_dim) { return 5LL * kBlockM * head_dim * 2; }  // Q + 2 x (K, V)

void fwd_launch(const FwdParams& p, void* stream) {
  if (p.lq <= 0 || p.batch <= 0 || p.heads <= 0) return;
  dispatch<fwd::Launcher>(p, stream);
}

}  // namespace attention
}  // namespace tfk
