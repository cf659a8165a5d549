// Device primitives shared by resfuse's CUDA kernels (csrc/conv_bn_act.cu, csrc/gnconv_*.cu):
// the only inline PTX, intrinsics and launch syntax they use. Include inside nothing: this file
// opens namespace resfuse::detail itself. Under nvcc it defines the real primitives; when
// RESFUSE_CUDA_EMULATE names a header (tests/csrc_emu/emu_shims.h), that header's host versions
// replace them, so the kernels run unchanged on the CPU emulator of tests/csrc_emu/.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace resfuse {
namespace detail {

// ----------------------------------------------------------------------------------------------
// Device primitives: the only inline PTX / intrinsics / launch syntax of resfuse's kernels. A host
// emulator (a std::thread per CUDA thread, barriers for __syncthreads and mma.sync) can swap this
// block for its own by defining RESFUSE_CUDA_EMULATE to a header name; nvcc builds never
// define it.
// ----------------------------------------------------------------------------------------------
#if defined(RESFUSE_CUDA_EMULATE)
#include RESFUSE_CUDA_EMULATE
#else
#define RF_SHARED_BUFFER(name, bytes) __shared__ __align__(16) unsigned char name[bytes]

// 16-byte async copy; src_bytes = 0 zero-fills the destination without reading src.
template <bool kCacheL1>
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? 16 : 0;
  if constexpr (kCacheL1) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

template <typename T>
__device__ __forceinline__ T ldg(const T* p) { return __ldg(p); }
__device__ __forceinline__ float as_float(uint32_t b) { return __uint_as_float(b); }
__device__ __forceinline__ uint32_t as_uint(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float f16_to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
__device__ __forceinline__ uint16_t float_to_f16(float v) { return __half_as_ushort(__float2half_rn(v)); }
__device__ __forceinline__ float bf16_to_float(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
__device__ __forceinline__ uint16_t float_to_bf16(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

__device__ __forceinline__ uint32_t to_tf32(float f) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(f));
  return r;
}

// D = A*B + C, fp32 accumulate; fragments in the PTX ISA layouts for m16n8k16 (.f16 / .bf16)
// and m16n8k8 (.tf32).
__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <class Args>
const char* launch_grid(void (*kernel)(Args), dim3 grid, int threads, cudaStream_t stream, const Args& args) {
  kernel<<<grid, threads, 0, stream>>>(args);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
#endif  // RESFUSE_CUDA_EMULATE

__device__ __forceinline__ bool finite_bits(uint32_t b) { return (b & 0x7f800000u) != 0x7f800000u; }

// One masked 16-byte chunk of a channels-contiguous row into shared memory (the loaders of
// conv_bn_act / pixel_gemm and of pixel_wgrad): `remaining` = channels left from the chunk's first
// channel (may be <= 0), `ok` = the pixel is in range. vec: one cp.async (zero-fill when masked;
// the caller guarantees the width is a multiple of the chunk and the address 16-byte aligned, so a
// chunk is wholly inside or wholly outside); else element-wise masked loads stored at once.
template <bool kCacheL1, typename Elem>
__device__ __forceinline__ void copy_chunk_16(unsigned char* dst, const Elem* base, int64_t off, bool ok,
                                              int remaining, bool vec) {
  constexpr int kVE = 16 / sizeof(Elem);
  if (vec) {
    const bool v = ok && remaining > 0;
    cp_async_16<kCacheL1>(dst, v ? static_cast<const void*>(base + off) : static_cast<const void*>(base), v);
  } else {
    Elem e[kVE];
#pragma unroll
    for (int j = 0; j < kVE; ++j) e[j] = (ok && j < remaining) ? ldg(base + off + j) : Elem(0);
    uint4 v;
    if constexpr (sizeof(Elem) == 2) {
      v.x = e[0] | (uint32_t(e[1]) << 16);
      v.y = e[2] | (uint32_t(e[3]) << 16);
      v.z = e[4] | (uint32_t(e[5]) << 16);
      v.w = e[6] | (uint32_t(e[7]) << 16);
    } else {
      v.x = e[0]; v.y = e[1]; v.z = e[2]; v.w = e[3];
    }
    *reinterpret_cast<uint4*>(dst) = v;
  }
}

}  // namespace detail
}  // namespace resfuse
