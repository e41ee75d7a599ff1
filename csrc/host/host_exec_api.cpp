// C entry points to the host-execution layer's test kernels
// (csrc/host_exec_tests/), for tests/test_host_exec.py through ctypes on CPU
// tensors' data_ptr(). Return 0 on success, nonzero on error;
// tfk_host_exec_last_error() says why.
//
// Plain C++ (no CUDA, no torch headers, no common/tfk_cuda.h): the layer's
// settings and counters are reached through host_exec_control().
#include <cstdint>

#include "host/host_api_guard.h"
#include "host_exec_tests/host_exec_tests.h"

using tfk::host_api::fail;
using tfk::host_api::guarded;

namespace hx = tfk::host_exec_tests;

TFK_HOST_EXPORT const char* tfk_host_exec_last_error() { return tfk::host_api::last_error.c_str(); }

TFK_HOST_EXPORT int tfk_host_exec_set_workers(int n) {
  return guarded([&] { hx::host_exec_control(0, n, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_last_stats(uint64_t* out) {
  if (!out) return fail(2, "tfk_host_exec_last_stats: null pointer");
  return guarded([&] { hx::host_exec_control(1, 0, out); });
}

TFK_HOST_EXPORT int tfk_host_exec_block_sum(const float* x, int64_t n, float* partial, int blocks, int threads,
                                            int dynamic_smem) {
  if (n < 0 || !partial || (n > 0 && !x)) return fail(1, "tfk_host_exec_block_sum: bad arguments");
  return guarded([&] { hx::block_sum(x, n, partial, blocks, threads, dynamic_smem != 0, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_rotate(const float* in, float* out, int blocks, int threads, int rounds,
                                         int use_barrier) {
  if (!in || !out || blocks < 1 || rounds < 0) return fail(1, "tfk_host_exec_rotate: bad arguments");
  return guarded([&] { hx::rotate(in, out, blocks, threads, rounds, use_barrier != 0, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_sync_votes(const int* pred, int* out, int threads) {
  if (!pred || !out) return fail(1, "tfk_host_exec_sync_votes: null pointer");
  return guarded([&] { hx::sync_votes(pred, out, threads, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_atomics(const int* v, int64_t n, int* hist, int bins, int* max_min, float* sum,
                                          unsigned long long* counter, int blocks, int threads) {
  if (n < 0 || (n > 0 && !v) || !hist || !max_min || !sum || !counter || blocks < 1)
    return fail(1, "tfk_host_exec_atomics: bad arguments");
  return guarded([&] { hx::atomics(v, n, hist, bins, max_min, sum, counter, blocks, threads, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_barrier_spin(float* out, int blocks, int threads, int iters) {
  if (!out || blocks < 1 || iters < 0) return fail(1, "tfk_host_exec_barrier_spin: bad arguments");
  return guarded([&] { hx::barrier_spin(out, blocks, threads, iters, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_block_scan(const int* in, int* out, int64_t n, int threads) {
  if (n < 0 || (n > 0 && (!in || !out))) return fail(1, "tfk_host_exec_block_scan: bad arguments");
  return guarded([&] { hx::block_scan(in, out, n, threads, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_partial_warp_sum(const int* in, int* out, int threads) {
  if (!in || !out) return fail(1, "tfk_host_exec_partial_warp_sum: null pointer");
  return guarded([&] { hx::partial_warp_sum(in, out, threads, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_warp_ops(const int* in, const int* src, int* out, long long* out64, int threads) {
  if (!in || !src || !out || !out64) return fail(1, "tfk_host_exec_warp_ops: null pointer");
  return guarded([&] { hx::warp_ops(in, src, out, out64, threads, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_syncwarp_exchange(const int* in, int* out, int threads) {
  if (!in || !out) return fail(1, "tfk_host_exec_syncwarp_exchange: null pointer");
  return guarded([&] { hx::syncwarp_exchange(in, out, threads, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_ldmatrix_probe(const uint16_t* tile, const int* row_of_lane,
                                                 const int* chunk_of_lane, uint32_t* out) {
  if (!tile || !row_of_lane || !chunk_of_lane || !out) return fail(1, "tfk_host_exec_ldmatrix_probe: null pointer");
  for (int l = 0; l < 32; ++l)
    if (row_of_lane[l] < 0 || row_of_lane[l] >= 64 || chunk_of_lane[l] < 0 || chunk_of_lane[l] > 1)
      return fail(1, "tfk_host_exec_ldmatrix_probe: rows in [0, 64), chunks in {0, 1}");
  return guarded([&] { hx::ldmatrix_probe(tile, row_of_lane, chunk_of_lane, out, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_mma_probe(const uint32_t* a, const uint32_t* b, const float* c, float* d,
                                            int bf16) {
  if (!a || !b || !c || !d) return fail(1, "tfk_host_exec_mma_probe: null pointer");
  return guarded([&] { hx::mma_probe(a, b, c, d, bf16 != 0, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_convert(const float* in, uint32_t* h2, uint32_t* b2, float* back, int64_t pairs) {
  if (pairs < 0 || (pairs > 0 && (!in || !h2 || !b2 || !back))) return fail(1, "tfk_host_exec_convert: bad arguments");
  return guarded([&] { hx::convert(in, h2, b2, back, pairs, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_gemm(const uint16_t* A, const uint16_t* B, float* C, int M, int N, int K,
                                       int bf16, int b_kn) {
  if (!A || !B || !C) return fail(1, "tfk_host_exec_gemm: null pointer");
  return guarded([&] { hx::gemm(A, B, C, M, N, K, bf16 != 0, b_kn != 0, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_hazard(const float* in, float* out, int threads, int mode) {
  if (!in || !out) return fail(1, "tfk_host_exec_hazard: null pointer");
  return guarded([&] { hx::hazard(in, out, threads, mode, nullptr); });
}

TFK_HOST_EXPORT int tfk_host_exec_misuse(int which, int threads, int* out) {
  if (!out) return fail(1, "tfk_host_exec_misuse: null pointer");
  return guarded([&] { hx::misuse(which, threads, out, nullptr); });
}
