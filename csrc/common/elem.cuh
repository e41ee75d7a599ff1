// Element traits shared by the kernel families (attention, MoE): fp32
// conversions of the input types and, for the two 16-bit ones, packing and
// the tensor-core mma (mma.sync m16n8k16, fp32 accumulation).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/tfk_cuda.h"
#include "common/warp_primitives.h"

namespace tfk {

template <typename T>
__device__ __forceinline__ float to_f32(T x) {
  if constexpr (std::is_same<T, __half>::value) return __half2float(x);
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(x);
  else return x;
}

template <typename T>
__device__ __forceinline__ T from_f32(float x) {
  if constexpr (std::is_same<T, __half>::value) return __float2half_rn(x);
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(x);
  else return x;
}

// What differs between the two 16-bit input types: packing and the mma.
template <typename T>
struct Elem {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "the tensor-core kernels take __half or __nv_bfloat16");
  static constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;

  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    if constexpr (kBf16) return pack_bfloat162(lo, hi);
    else return pack_half2(lo, hi);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t b0,
                                             const uint32_t b1) {
    const uint32_t b[2] = {b0, b1};
    if constexpr (kBf16) mma_m16n8k16_bf16f32(d, a, b, d);
    else mma_m16n8k16_f16f32(d, a, b, d);
  }
};

}  // namespace tfk
