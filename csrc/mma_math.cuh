// Tensor-core math policies shared by resfuse's mma.sync kernels (csrc/conv_bn_act.cu,
// csrc/gnconv_*.cu): element storage type, conversions, and one warp k-step of 32 bytes of
// reduction (m16n8k16 for fp16/bf16, m16n8k8 TF32 or 3xTF32 for fp32). Fragments arrive as raw
// 32-bit words in the documented mma.sync layouts; how a kernel gathers them is its own business.
#pragma once

#include "device_prims.cuh"

namespace resfuse {
namespace detail {

// ----------------------------------------------------------------------------------------------
// Math policies: element storage type, conversions, and one warp k-step (32 bytes of reduction:
// k16 for 16-bit types, k8 for fp32). Fragment registers arrive as raw 32-bit smem words in the
// documented mma.sync layouts (see compute_stage).
// ----------------------------------------------------------------------------------------------
template <bool kBF16>
struct Math16 {
  using Elem = uint16_t;
  static __device__ __forceinline__ float to_float(Elem b) {
    if constexpr (kBF16) return bf16_to_float(b);
    else return f16_to_float(b);
  }
  static __device__ __forceinline__ Elem from_float(float v) {
    if constexpr (kBF16) return float_to_bf16(v);
    else return float_to_f16(v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (kBF16) mma_bf16(c, a, b);
    else mma_f16(c, a, b);
  }
  template <int MI, int NI>
  static __device__ __forceinline__ void warp_step(float (&acc)[MI][NI][4], const uint32_t (&a)[MI][4],
                                                   const uint32_t (&b)[NI][2]) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) mma(acc[mi][ni], a[mi], b[ni]);
  }
};

// fp32 storage; kSplit3 = false: one TF32 mma; true: 3xTF32.
template <bool kSplit3>
struct MathF32 {
  using Elem = uint32_t;
  static __device__ __forceinline__ float to_float(Elem b) { return as_float(b); }
  static __device__ __forceinline__ Elem from_float(float v) { return as_uint(v); }

  // big = tf32(v); small = tf32(v - big), 0 for Inf/NaN (whose big already carries them).
  static __device__ __forceinline__ void split(uint32_t v, uint32_t& big, uint32_t& small) {
    const float f = as_float(v);
    big = to_tf32(f);
    small = finite_bits(v) ? to_tf32(f - as_float(big)) : 0u;
  }

  template <int MI, int NI>
  static __device__ __forceinline__ void warp_step(float (&acc)[MI][NI][4], const uint32_t (&a)[MI][4],
                                                   const uint32_t (&b)[NI][2]) {
    if constexpr (!kSplit3) {
      uint32_t bt[NI][2];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) bt[ni][j] = to_tf32(as_float(b[ni][j]));
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        uint32_t at[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) at[j] = to_tf32(as_float(a[mi][j]));
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_tf32(acc[mi][ni], at, bt[ni]);
      }
    } else {
      // acc += a_small*b_bigz + a_bigz*b_small + a_big*b_big. The cross terms use big parts with
      // Inf/NaN zeroed ("z"), so an Inf operand never meets a 0 small part (Inf*0 = NaN where
      // eager gives Inf); the big*big term carries Inf/NaN exactly as fp32 would.
      uint32_t bb[NI][2], bs[NI][2], bz[NI][2];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          split(b[ni][j], bb[ni][j], bs[ni][j]);
          bz[ni][j] = finite_bits(b[ni][j]) ? bb[ni][j] : 0u;
        }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        uint32_t ab[4], as[4], az[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          split(a[mi][j], ab[j], as[j]);
          az[j] = finite_bits(a[mi][j]) ? ab[j] : 0u;
        }
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          mma_tf32(acc[mi][ni], as, bz[ni]);
          mma_tf32(acc[mi][ni], az, bs[ni]);
          mma_tf32(acc[mi][ni], ab, bb[ni]);
        }
      }
    }
  }
};

// Zero a warp's fp32 accumulator fragments (acc[mi][ni][4], the m16n8 C layout).
template <int MI, int NI>
__device__ __forceinline__ void zero_acc(float (&acc)[MI][NI][4]) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.f;
}

}  // namespace detail
}  // namespace resfuse
