// Test kernels of the host-execution layer: ldmatrix, mma.sync m16n8k16 and
// cp.async, alone (fragment probes) and together (a tiled GEMM shaped like the
// inner loops of FlashAttention-2). See host_exec_tests.h.
#include <stdexcept>
#include <type_traits>

#include "common/tfk_cuda.h"
#include "common/warp_primitives.h"
#include "host_exec_tests/host_exec_tests.h"

namespace tfk {
namespace host_exec_tests {

// ---------------------------------------------------------------- probes

constexpr int kProbeRows = 64, kProbeCols = 16;  // b16 elements per row: 2 chunks of 8

__global__ void __launch_bounds__(32)
ldmatrix_probe_kernel(const uint16_t* __restrict__ tile, const int* __restrict__ row_of_lane,
                      const int* __restrict__ chunk_of_lane, uint32_t* __restrict__ out) {
  __shared__ __align__(16) uint16_t s[kProbeRows * kProbeCols];
  const int lane = static_cast<int>(threadIdx.x);
  for (int c = lane; c < kProbeRows * kProbeCols / 8; c += 32) cp_async_16(s + 8 * c, tile + 8 * c);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const uint16_t* row = s + row_of_lane[lane] * kProbeCols + chunk_of_lane[lane] * 8;
  uint32_t r[6][4] = {};
  uint32_t x2[2], x4[4];
  ldmatrix_x1(r[0][0], row);
  ldmatrix_x2(x2, row);
  r[1][0] = x2[0], r[1][1] = x2[1];
  ldmatrix_x4(x4, row);
  for (int i = 0; i < 4; ++i) r[2][i] = x4[i];
  ldmatrix_x1_trans(r[3][0], row);
  ldmatrix_x2_trans(x2, row);
  r[4][0] = x2[0], r[4][1] = x2[1];
  ldmatrix_x4_trans(x4, row);
  for (int i = 0; i < 4; ++i) r[5][i] = x4[i];
  for (int v = 0; v < 6; ++v)
    for (int i = 0; i < 4; ++i) out[(v * 32 + lane) * 4 + i] = r[v][i];
}

__global__ void __launch_bounds__(32)
mma_probe_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b, const float* __restrict__ c,
                 float* __restrict__ d, int bf16) {
  const int lane = static_cast<int>(threadIdx.x);
  uint32_t ra[4], rb[2];
  float rc[4], rd[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[lane * 4 + i], rc[i] = c[lane * 4 + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[lane * 2 + i];
  if (bf16) {
    mma_m16n8k16_bf16f32(rd, ra, rb, rc);
  } else {
    mma_m16n8k16_f16f32(rd, ra, rb, rc);
  }
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = rd[i];
}

// Two consecutive floats per thread: packed half2 / bfloat162 (round to
// nearest even) and the values converted there and back.
__global__ void __launch_bounds__(256)
convert_kernel(const float* __restrict__ in, uint32_t* __restrict__ h2, uint32_t* __restrict__ b2,
               float* __restrict__ back, int64_t pairs) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const float lo = in[2 * p], hi = in[2 * p + 1];
  h2[p] = pack_half2(lo, hi);
  b2[p] = pack_bfloat162(lo, hi);
  back[2 * p] = __half2float(__float2half_rn(lo));
  back[2 * p + 1] = __half2float(__float2half_rn(hi));
  back[2 * pairs + 2 * p] = __bfloat162float(__float2bfloat16_rn(lo));
  back[2 * pairs + 2 * p + 1] = __bfloat162float(__float2bfloat16_rn(hi));
}

// ---------------------------------------------------------------- GEMM

namespace gemm_cfg {
constexpr int kBM = 64, kBN = 32, kBK = 32, kThreads = 128;
constexpr int kPad = 8;                 // b16 per row of padding: rows stay 16-byte aligned
constexpr int kLdA = kBK + kPad;        // A tile: kBM rows (m) x kBK (k)
constexpr int kLdBnk = kBK + kPad;      // B^T tile: kBN rows (n) x kBK (k)
constexpr int kLdBkn = kBN + kPad;      // B tile: kBK rows (k) x kBN (n)
constexpr int kStageA = kBM * kLdA;
constexpr int kStageB = (kBN * kLdBnk > kBK * kLdBkn) ? kBN * kLdBnk : kBK * kLdBkn;
constexpr int kStage = kStageA + kStageB;
constexpr size_t kSmemBytes = 2 * kStage * sizeof(uint16_t);  // two stages
}  // namespace gemm_cfg

// Stage one K step of A and B into shared memory with 16-byte cp.async; chunks
// past M, N or K are zero-filled (src-size 0, the source is not read).
template <typename T>
__device__ __forceinline__ void gemm_load_stage(uint16_t* stage, const T* __restrict__ A, const T* __restrict__ B,
                                                int M, int N, int K, int m0, int n0, int k0, bool b_kn) {
  using namespace gemm_cfg;
  const int tid = static_cast<int>(threadIdx.x);
  uint16_t* as = stage;
  uint16_t* bs = stage + kStageA;
  for (int c = tid; c < kBM * kBK / 8; c += kThreads) {
    const int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
    const int gm = m0 + r, gk = k0 + kc;
    const bool ok = gm < M && gk < K;
    cp_async_16(as + r * kLdA + kc, ok ? A + static_cast<int64_t>(gm) * K + gk : A, ok ? 16u : 0u);
  }
  if (!b_kn) {  // B^T stored [N][K]
    for (int c = tid; c < kBN * kBK / 8; c += kThreads) {
      const int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
      const int gn = n0 + r, gk = k0 + kc;
      const bool ok = gn < N && gk < K;
      cp_async_16(bs + r * kLdBnk + kc, ok ? B + static_cast<int64_t>(gn) * K + gk : B, ok ? 16u : 0u);
    }
  } else {  // B stored [K][N]
    for (int c = tid; c < kBK * kBN / 8; c += kThreads) {
      const int r = c / (kBN / 8), nc = (c % (kBN / 8)) * 8;
      const int gk = k0 + r, gn = n0 + nc;
      const bool ok = gk < K && gn < N;
      cp_async_16(bs + r * kLdBkn + nc, ok ? B + static_cast<int64_t>(gk) * N + gn : B, ok ? 16u : 0u);
    }
  }
}

template <typename T>
__device__ __forceinline__ void mma_t(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                      const float (&c)[4]) {
  if constexpr (std::is_same<T, __half>::value) {
    mma_m16n8k16_f16f32(d, a, b, c);
  } else {
    mma_m16n8k16_bf16f32(d, a, b, c);
  }
}

// Block (64 x 32 of C): warp w owns rows 16w..16w+15, all 32 columns (four
// m16n8 accumulators). Per K step of 32: two k16 slices, each one ldmatrix_x4
// for A and four ldmatrix_x2(_trans) for B.
template <typename T>
__global__ void __launch_bounds__(gemm_cfg::kThreads)
gemm_kernel(const T* __restrict__ A, const T* __restrict__ B, float* __restrict__ C, int M, int N, int K, int b_kn) {
  using namespace gemm_cfg;
  uint16_t* smem = dynamic_smem<uint16_t>();
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int m0 = static_cast<int>(blockIdx.y) * kBM, n0 = static_cast<int>(blockIdx.x) * kBN;
  const int ktiles = (K + kBK - 1) / kBK;
  float acc[4][4];
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  gemm_load_stage(smem, A, B, M, N, K, m0, n0, 0, b_kn != 0);
  cp_async_commit();
  for (int kt = 0; kt < ktiles; ++kt) {
    if (kt + 1 < ktiles) {  // prefetch the next step into the other stage
      gemm_load_stage(smem + ((kt + 1) & 1) * kStage, A, B, M, N, K, m0, n0, (kt + 1) * kBK, b_kn != 0);
      cp_async_commit();
      cp_async_wait<1>();  // this step's group has landed; the next may be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this step are visible
    const uint16_t* as = smem + (kt & 1) * kStage;
    const uint16_t* bs = as + kStageA;
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, as + (warp * 16 + (lane & 15)) * kLdA + kk + 8 * (lane >> 4));
      for (int nt = 0; nt < 4; ++nt) {
        uint32_t b[2];
        if (!b_kn) {
          ldmatrix_x2(b, bs + (nt * 8 + (lane & 7)) * kLdBnk + kk + 8 * ((lane >> 3) & 1));
        } else {
          ldmatrix_x2_trans(b, bs + (kk + (lane & 15)) * kLdBkn + nt * 8);
        }
        mma_t<T>(acc[nt], a, b, acc[nt]);
      }
    }
    __syncthreads();  // reads of this stage are done before it is refilled
  }
  const int g = lane >> 2, t = lane & 3;
  for (int nt = 0; nt < 4; ++nt)
    for (int i = 0; i < 4; ++i) {
      const int row = m0 + warp * 16 + g + 8 * (i >> 1), col = n0 + nt * 8 + 2 * t + (i & 1);
      if (row < M && col < N) C[static_cast<int64_t>(row) * N + col] = acc[nt][i];
    }
}

void ldmatrix_probe(const uint16_t* tile, const int* row_of_lane, const int* chunk_of_lane, uint32_t* out,
                    void* stream) {
  launch(ldmatrix_probe_kernel, dim3(1), dim3(32), 0, static_cast<stream_t>(stream), tile, row_of_lane,
         chunk_of_lane, out);
}

void mma_probe(const uint32_t* a, const uint32_t* b, const float* c, float* d, bool bf16, void* stream) {
  launch(mma_probe_kernel, dim3(1), dim3(32), 0, static_cast<stream_t>(stream), a, b, c, d, bf16 ? 1 : 0);
}

void convert(const float* in, uint32_t* h2, uint32_t* b2, float* back, int64_t pairs, void* stream) {
  if (pairs <= 0) return;
  launch(convert_kernel, dim3(static_cast<unsigned>((pairs + 255) / 256)), dim3(256), 0, static_cast<stream_t>(stream),
         in, h2, b2, back, pairs);
}

void gemm(const uint16_t* A, const uint16_t* B, float* C, int M, int N, int K, bool bf16, bool b_kn, void* stream) {
  using namespace gemm_cfg;
  if (M < 1 || N < 1 || K < 1) throw std::invalid_argument("gemm: empty problem");
  if (K % 8 || (b_kn && N % 8)) throw std::invalid_argument("gemm: K (and N for B [K][N]) must be multiples of 8");
  const dim3 grid((N + kBN - 1) / kBN, (M + kBM - 1) / kBM);
  const stream_t s = static_cast<stream_t>(stream);
  if (bf16) {
    launch(gemm_kernel<__nv_bfloat16>, grid, dim3(kThreads), kSmemBytes, s,
           reinterpret_cast<const __nv_bfloat16*>(A), reinterpret_cast<const __nv_bfloat16*>(B), C, M, N, K,
           b_kn ? 1 : 0);
  } else {
    launch(gemm_kernel<__half>, grid, dim3(kThreads), kSmemBytes, s, reinterpret_cast<const __half*>(A),
           reinterpret_cast<const __half*>(B), C, M, N, K, b_kn ? 1 : 0);
  }
}

}  // namespace host_exec_tests
}  // namespace tfk
