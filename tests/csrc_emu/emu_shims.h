// Host replacements for the device primitives of csrc/conv_bn_act.cu (see emu.cpp for what the
// emulator is and how to run it). csrc/device_prims.cuh includes this file, inside namespace
// resfuse::detail, in place of its inline-PTX block when RESFUSE_CUDA_EMULATE names it;
// every function here has the signature of the device version it replaces. The state and checks
// live in namespace ::emu (emu.cpp, declared before the .cu is included).
#pragma once

#define RF_SHARED_BUFFER(name, bytes) unsigned char* name = ::emu::shared_buffer(bytes)

// cp.async: 16-byte global->shared copy (zero-fill when !valid). Lands at issue ("early") or at
// the cp.async.wait_group that must cover it ("late"), see emu::late_landing. Checks: dst inside
// the CTA's shared buffer and 16-byte aligned; when valid, src 16-byte aligned and inside an input.
template <bool kCacheL1>
inline void cp_async_16(void* dst, const void* src, bool valid) { ::emu::cp_async(dst, src, valid); }
inline void cp_async_commit() { ::emu::cp_commit(); }
template <int kPending>
inline void cp_async_wait() { ::emu::cp_wait(kPending); }

// __ldg: checked against the input ranges and natural alignment; an out-of-range read returns 0
// (and counts) instead of touching memory the kernel does not own.
template <typename T>
inline T ldg(const T* p) {
  if (!::emu::check_global(p, sizeof(T), sizeof(T))) return T{};
  return *p;
}

inline float as_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t as_uint(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }
// __half2float / __float2half_rn: _Float16 conversions are exact / round-to-nearest-even.
inline float f16_to_float(uint16_t b) { _Float16 h; std::memcpy(&h, &b, 2); return (float)h; }
inline uint16_t float_to_f16(float v) { _Float16 h = (_Float16)v; uint16_t b; std::memcpy(&b, &h, 2); return b; }
// __bfloat162float / __float2bfloat16_rn (NaN -> canonical 0x7fc0, else round-to-nearest-even).
inline float bf16_to_float(uint16_t b) { return as_float(uint32_t(b) << 16); }
inline uint16_t float_to_bf16(float v) {
  uint32_t b = as_uint(v);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
// cvt.rna.tf32.f32: nearest, ties away from zero; NaN -> 0x7fffffff, +-Inf kept.
inline uint32_t to_tf32(float f) {
  uint32_t b = as_uint(f);
  if ((b & 0x7f800000u) == 0x7f800000u) return (b & 0x7fffffu) ? 0x7fffffffu : b;
  return (b + 0x1000u) & ~0x1fffu;
}

// mma.sync: a warp-collective barrier, then D = A*B + C from the PTX ISA fragment layouts.
inline void mma_f16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { ::emu::warp_mma<0>(c, a, b); }
inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { ::emu::warp_mma<1>(c, a, b); }
inline void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { ::emu::warp_mma<2>(c, a, b); }

// kernel<<<grid, threads>>>(args): every CTA of the grid, one std::thread per CUDA thread.
template <class Args>
const char* launch_grid(void (*kernel)(Args), dim3 grid, int threads, cudaStream_t, const Args& args) {
  ::emu::run_grid([&] { kernel(args); }, grid.x, grid.y, threads);
  return nullptr;
}
