// Test kernels of the host-execution layer (common/host_exec.h): small CUDA
// kernels that exercise barriers, shared memory, warp shuffles and votes,
// mma.sync, ldmatrix and cp.async. The same sources compile with nvcc (ptxas
// report: they must stay valid, spill-free CUDA) and, in host mode, run on the
// CPU for tests/test_host_exec.py through csrc/host/host_exec_api.cpp.
//
// Free of CUDA and torch headers. Launchers run synchronously in host mode and
// throw std::exception on misuse; `stream` is a cudaStream_t as void*.
#pragma once

#include <cstdint>

namespace tfk {
namespace host_exec_tests {

// ---- host_exec_reduce.cu
// partial[b] = sum of x[i] over i = b*threads + t + k*blocks*threads (grid
// stride), reduced in shared memory (static, or dynamic when dynamic_smem).
// Any threads in [1, 1024].
void block_sum(const float* x, int64_t n, float* partial, int blocks, int threads, bool dynamic_smem,
               void* stream);
// Per block of `threads`: `rounds` rotations through two shared buffers,
// out[t] = in[(t + rounds*(rounds+1)/2) % threads] + rounds, with a
// __syncthreads before each round when use_barrier (without it the answer is
// wrong: a check that barriers are honoured). in/out hold blocks*threads.
void rotate(const float* in, float* out, int blocks, int threads, int rounds, bool use_barrier, void* stream);
// out[3t..3t+2] = __syncthreads_count/_and/_or(pred[t]) in one block.
void sync_votes(const int* pred, int* out, int threads, void* stream);
// Grid-stride over v[0, n): hist[(v % bins + bins) % bins] += 1 (through a
// shared-memory histogram, bins <= 256), max_min[0] = max(max_min[0], v),
// max_min[1] = min(...), *sum += v (float), *counter += 1 per element by an
// atomicCAS loop. Integer results are exact whatever the order.
void atomics(const int* v, int64_t n, int* hist, int bins, int* max_min, float* sum, unsigned long long* counter,
             int blocks, int threads, void* stream);
// `iters` __syncthreads per thread; out[t] = t (timing of barriers).
void barrier_spin(float* out, int blocks, int threads, int iters, void* stream);

// ---- host_exec_warp.cu
// Inclusive scan of in[0, n) within each block of `threads` (a multiple of
// 32): warp scans with __shfl_up_sync, then a scan of warp totals.
void block_scan(const int* in, int* out, int64_t n, int threads, void* stream);
// One block of any size: out[w] = sum of in over warp w's existing lanes,
// shuffling with the mask of those lanes (partial last warp).
void partial_warp_sum(const int* in, int* out, int threads, void* stream);
// kWarpOps results per thread of one block (threads a multiple of 32), see
// the kernel; out64[t] = a 64-bit __shfl_down_sync.
constexpr int kWarpOps = 13;
void warp_ops(const int* in, const int* src, int* out, long long* out64, int threads, void* stream);
// out[t] = in[t's warp neighbour (lane+1)%32] through shared memory and __syncwarp.
void syncwarp_exchange(const int* in, int* out, int threads, void* stream);

// ---- host_exec_mma.cu
// One warp: tile is 64 rows x 16 b16 (row-major); lane l points ldmatrix at
// row row_of_lane[l], 8-element chunk chunk_of_lane[l] (0 or 1). out[v][l][i]
// (6 x 32 x 4 uint32) holds register i of lane l for v = x1, x2, x4, x1.trans,
// x2.trans, x4.trans (unused registers zero).
void ldmatrix_probe(const uint16_t* tile, const int* row_of_lane, const int* chunk_of_lane, uint32_t* out,
                    void* stream);
// One warp, one mma.m16n8k16: per-lane fragments a[32][4], b[32][2] (.b32,
// f16 or bf16 pairs), c[32][4] -> d[32][4].
void mma_probe(const uint32_t* a, const uint32_t* b, const float* c, float* d, bool bf16, void* stream);
// in[2 pairs] -> h2[pairs], b2[pairs] (pack_half2 / pack_bfloat162 of
// consecutive floats) and back[4 pairs]: the floats through __half, then
// through __nv_bfloat16.
void convert(const float* in, uint32_t* h2, uint32_t* b2, float* back, int64_t pairs, void* stream);
// C[M][N] (fp32) = A[M][K] @ B, A row-major fp16/bf16 (raw 16-bit), B either
// [N][K] (b_kn false: read with ldmatrix) or [K][N] (b_kn true: ldmatrix
// .trans); 64x32 block tiles, 4 warps, K steps of 32 double-buffered with
// cp.async (zero-filled past the edges). K % 8 == 0 (and N % 8 == 0 when b_kn).
void gemm(const uint16_t* A, const uint16_t* B, float* C, int M, int N, int K, bool bf16, bool b_kn,
          void* stream);

// ---- host_exec_hazards.cu
// One block of `threads`; modes seed shared-memory bugs for the race check:
// 0 correct exchange through dynamic smem, 1 missing __syncthreads (RAW),
// 2 overwrite of a value another thread still reads (WAR), 3 read of a
// cp.async destination before cp_async_wait (ASYNC), 4 read of a byte no
// thread wrote (UNINIT), 5 lanes exchange without __syncwarp (RAW within a
// warp), 6 the same with __syncwarp (correct), 7 as 1 in static __shared__,
// 8 a cp.async into a location another thread read since the last barrier (WAR).
void hazard(const float* in, float* out, int threads, int mode, void* stream);
// Misuses the layer must refuse: 0 __syncthreads in divergent code, 1 a
// shuffle whose mask names an exited lane, 2 lanes of one mask in different
// collectives, 3 deadlock between a shuffle and a barrier, 4 mma.sync in a
// partial warp, 5 ldmatrix from global memory, 6 a full-mask shuffle in a
// partial warp (threads not a multiple of 32).
void misuse(int which, int threads, int* out, void* stream);

// ---- host mode only (host_exec_reduce.cu): the layer's settings and counters.
// what 0: worker threads for the blocks of a grid = value (1: the calling
// thread). what 1: out[0..3] = blocks, fiber resumes, completed barriers and
// completed warp collectives of the last launch on the calling thread.
void host_exec_control(int what, int value, uint64_t* out);

}  // namespace host_exec_tests
}  // namespace tfk
