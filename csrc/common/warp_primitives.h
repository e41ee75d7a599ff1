// Tensor-core and async-copy primitives, one wrapper per PTX instruction, for
// both builds: inline PTX under nvcc (device code, sm_80+), the host-execution
// layer's warp collectives in host mode (common/host_exec.h). Kernels use these
// instead of raw inline asm.
//
// Fragment layouts are PTX's (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type" and "ldmatrix"); g = laneid >> 2, t = laneid % 4, and a
// .b32 register holding two 16-bit elements keeps the lower-index one in bits
// 0-15:
//   A (16x16, row-major): a[r] = A[g + 8*(r&1)][2t + 8*(r>>1) + {0,1}]
//   B (16x8, "col"):      b[r] = B[2t + 8r + {0,1}][g]
//   C, D (16x8, f32):     c[i] = C[g + 8*(i>>1)][2t + (i&1)]
// ldmatrix.m8n8.x{1,2,4}: lanes 8i..8i+7 pass the shared-memory addresses of
// rows 0..7 of matrix i (16 bytes, 16-byte aligned; lanes past 8*num are
// ignored but must still execute it); lane l receives in register i
// M_i[l/4][2(l%4) + {0,1}], or with .trans M_i[2(l%4) + {0,1}][l/4].
// So ldmatrix_x4 with lane l pointing at A[l%16][8*(l/16)] of a row-major
// 16x16 tile yields the A fragment; ldmatrix_x2 with lane l at Bt[l%8][8*(l/8)]
// of an n-major 8x16 tile (B^T, e.g. K in Q K^T) yields the B fragment, and
// ldmatrix_x2_trans with lane l at B[l%16][0] of a k-major 16x8 tile (e.g. V
// in P V) yields it too.
//
// All of these are warp-wide (.sync.aligned): every lane of a full warp must
// execute the same call, converged. cp.async is per thread: a copy is only
// guaranteed to have landed after cp_async_wait<N>() retired its group (and, for
// other threads, a barrier after that).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/tfk_cuda.h"

namespace tfk {

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Lane index within the warp (%laneid).
__device__ __forceinline__ unsigned lane_id() {
#if defined(__CUDA_ARCH__)
  unsigned l;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(l));
  return l;
#elif defined(TFK_HOST_MODE)
  return host::lane_id();
#else
  return 0;
#endif
}

// Two 16-bit floats in one .b32 register: lo in bits 0-15, hi in bits 16-31.
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof r);
  return r;
}
__device__ __forceinline__ uint32_t pack_bfloat162(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof r);
  return r;
}

// ---------------------------------------------------------------- mma.sync

// d = a * b + c; m16n8k16, A row-major, B column-major, fp16 inputs, fp32 accumulate.
__device__ __forceinline__ void mma_m16n8k16_f16f32(float (&d)[4], const uint32_t (&a)[4],
                                                    const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#elif defined(TFK_HOST_MODE)
  host::mma_m16n8k16(d, a, b, c, false);
#endif
}

// The same with bfloat16 inputs.
__device__ __forceinline__ void mma_m16n8k16_bf16f32(float (&d)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#elif defined(TFK_HOST_MODE)
  host::mma_m16n8k16(d, a, b, c, true);
#endif
}

// ---------------------------------------------------------------- ldmatrix
// The "memory" clobber orders these after earlier shared-memory stores of the
// thread in the compiler's view (the hardware ordering still needs a barrier).

__device__ __forceinline__ void ldmatrix_x1(uint32_t& r, const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r) : "r"(smem_u32(smem_row)) : "memory");
#elif defined(TFK_HOST_MODE)
  host::ldmatrix<1, false>(&r, smem_row);
#endif
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(smem_row)) : "memory");
#elif defined(TFK_HOST_MODE)
  host::ldmatrix<2, false>(r, smem_row);
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(smem_row)) : "memory");
#elif defined(TFK_HOST_MODE)
  host::ldmatrix<4, false>(r, smem_row);
#endif
}

__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t& r, const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r) : "r"(smem_u32(smem_row)) : "memory");
#elif defined(TFK_HOST_MODE)
  host::ldmatrix<1, true>(&r, smem_row);
#endif
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(smem_row)) : "memory");
#elif defined(TFK_HOST_MODE)
  host::ldmatrix<2, true>(r, smem_row);
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(smem_row)) : "memory");
#elif defined(TFK_HOST_MODE)
  host::ldmatrix<4, true>(r, smem_row);
#endif
}

// ---------------------------------------------------------------- cp.async
// Global -> shared, asynchronous. src_bytes < size zero-fills the rest (src
// is not read at all when src_bytes == 0: out-of-bounds tiles). Addresses must
// be aligned to the copy size. 16 bytes bypass L1 (.cg); 4 and 8 use .ca.

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, uint32_t src_bytes = 16) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(src_bytes)
               : "memory");
#elif defined(TFK_HOST_MODE)
  host::cp_async(smem_dst, gmem_src, 16, src_bytes);
#endif
}

__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src, uint32_t src_bytes = 8) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(src_bytes)
               : "memory");
#elif defined(TFK_HOST_MODE)
  host::cp_async(smem_dst, gmem_src, 8, src_bytes);
#endif
}

__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src, uint32_t src_bytes = 4) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(src_bytes)
               : "memory");
#elif defined(TFK_HOST_MODE)
  host::cp_async(smem_dst, gmem_src, 4, src_bytes);
#endif
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(TFK_HOST_MODE)
  host::cp_async_commit();
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7");
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(TFK_HOST_MODE)
  host::cp_async_wait(N);
#endif
}

// Commits and waits for everything this thread issued.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(TFK_HOST_MODE)
  host::cp_async_commit();
  host::cp_async_wait(0);
#endif
}

}  // namespace tfk
