// Device pieces of the MoE kernels: the activations, swizzled shared-memory
// tiles and their ldmatrix fragment loads.
//
// A tile row holds kChunks 16-byte chunks (8 16-bit elements each), kChunks
// 4 (32 elements) or 8 (64). Chunks are XOR-swizzled so that the eight rows
// one ldmatrix phase reads (eight consecutive rows, one chunk column) fall in
// eight different 16-byte bank groups: rows of 8 chunks (128 bytes) swizzle by
// row % 8; rows of 4 chunks (64 bytes, two rows per 128 bytes) by (row / 2) % 4.
//
// Fragment names follow common/warp_primitives.h: per warp g = lane / 4 and
// t = lane % 4; a C fragment (16x8 f32) holds rows g and g + 8, columns 2t and
// 2t + 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/elem.cuh"
#include "common/tfk_cuda.h"
#include "common/warp_primitives.h"
#include "moe/moe.h"

namespace tfk {
namespace moe {

// to_f32, from_f32 and Elem (packing, the mma) are common/elem.cuh's.

// ---------------------------------------------------------------- activations
// fp32, as triton_kernels/moe.py computes them (exp of -|x| only: no overflow).

__device__ __forceinline__ float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  return (x >= 0.f ? 1.f : e) / (1.f + e);
}

__device__ __forceinline__ float tanh_stable(float x) {
  const float e = expf(-2.f * fabsf(x));
  const float t = (1.f - e) / (1.f + e);
  return x < 0.f ? -t : t;
}

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)

__device__ __forceinline__ float activate(Act act, float x) {
  switch (act) {
    case Act::kSilu: return x * sigmoid(x);
    case Act::kGeluTanh: return 0.5f * x * (1.f + tanh_stable(kGeluC * (x + 0.044715f * x * x * x)));
    case Act::kRelu: return fmaxf(x, 0.f);
    default: return x;
  }
}

// d act(x) / dx.
__device__ __forceinline__ float activate_grad(Act act, float x) {
  switch (act) {
    case Act::kSilu: {
      const float s = sigmoid(x);
      return s * (1.f + x * (1.f - s));
    }
    case Act::kGeluTanh: {
      const float t = tanh_stable(kGeluC * (x + 0.044715f * x * x * x));
      return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kGeluC * (1.f + 0.134145f * x * x);
    }
    case Act::kRelu: return x > 0.f ? 1.f : 0.f;
    default: return 1.f;
  }
}

// ---------------------------------------------------------------- tiles

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of
// kChunks chunks per row.
template <int kChunks>
__device__ __forceinline__ int swz(int row, int chunk) {
  static_assert(kChunks == 4 || kChunks == 8, "tiles have rows of 4 or 8 chunks");
  if constexpr (kChunks == 8) return row * 64 + ((chunk ^ (row & 7)) << 3);
  else return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3);
}

// A fragment (16x16, row-major) of rows [row0, row0 + 16), columns [16kk, 16kk + 16)
// of a tile stored row-major (row = m).
template <int kChunks, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int kk) {
  const int l = lane_id();
  ldmatrix_x4(a, tile + swz<kChunks>(row0 + (l & 15), 2 * kk + (l >> 4)));
}

// The A fragment of A^T from a tile stored k-major (row = k of the mma, column
// = m): A^T rows [m0, m0 + 16), columns (tile rows) [k0, k0 + 16).
template <int kChunks, typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* tile, int k0, int m0) {
  const int l = lane_id();
  ldmatrix_x4_trans(a, tile + swz<kChunks>(k0 + (l & 7) + ((l >> 4) << 3), (m0 >> 3) + ((l >> 3) & 1)));
}

// B fragments of two n-tiles, [n0, n0 + 8) in b[0..1] and [n0 + 8, n0 + 16) in
// b[2..3], k in [16kk, 16kk + 16), from a tile stored n-major (row = n).
template <int kChunks, typename T>
__device__ __forceinline__ void load_b_nmajor(uint32_t (&b)[4], const T* tile, int n0, int kk) {
  const int l = lane_id();
  ldmatrix_x4(b, tile + swz<kChunks>(n0 + (l & 7) + ((l >> 4) << 3), 2 * kk + ((l >> 3) & 1)));
}

// The same from a tile stored k-major (row = k): k in [k0, k0 + 16), n in
// [n0, n0 + 16), n0 a multiple of 8.
template <int kChunks, typename T>
__device__ __forceinline__ void load_b_kmajor(uint32_t (&b)[4], const T* tile, int k0, int n0) {
  const int l = lane_id();
  ldmatrix_x4_trans(b, tile + swz<kChunks>(k0 + (l & 15), (n0 >> 3) + (l >> 4)));
}

// Stores two adjacent outputs (columns 2t, 2t + 1 of a C fragment) to dst.
template <typename T>
__device__ __forceinline__ void store2(T* dst, float x0, float x1) {
  if constexpr (std::is_same<T, float>::value) {
    dst[0] = x0;
    dst[1] = x1;
  } else {
    *reinterpret_cast<uint32_t*>(dst) = Elem<T>::pack(x0, x1);
  }
}

// Runs Launcher::run<T>(p, stream) for p's dtype.
template <typename Launcher, typename P>
void dispatch(const P& p, void* stream) {
  switch (p.dtype) {
    case Dtype::kHalf: Launcher::template run<__half>(p, stream); break;
    case Dtype::kBFloat16: Launcher::template run<__nv_bfloat16>(p, stream); break;
    default: Launcher::template run<float>(p, stream); break;
  }
}

}  // namespace moe
}  // namespace tfk
