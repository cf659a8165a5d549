// The mma.sync GEMM pipeline shared by resfuse's implicit-GEMM kernels (csrc/conv_bn_act.cu, the
// conv; csrc/gnconv_gemm.cu, the 1x1 pixel GEMM = a 1x1/stride-1 conv whose pixel rows are `ld`
// elements apart): tile constants, the global -> shared tile loader, one stage of warp MMAs and the
// multistage cp.async main loop with an optional per-stage shared-memory transform (a prologue on
// A, e.g. LayerNorm or GELU). Device code only; include inside nothing (opens resfuse::detail).
//
// Tile: CTA kBM (pixels) x kBN (output channels) x kRowBytes of reduction per stage, kStages
// stages of (kBM + kBN) rows x kRowPitch bytes in static shared memory. Smem rows: A rows
// 0..kBM-1 (pixel m, reduction contiguous), B rows kBM..kBM+kBN-1 (channel n, same order).
#pragma once

#include "device_prims.cuh"
#include "mma_math.cuh"

namespace resfuse {
namespace detail {

// ----------------------------------------------------------------------------------------------
// Tile configuration (one source of truth).
// ----------------------------------------------------------------------------------------------
constexpr int kBM = 128;                       // output pixels per CTA
constexpr int kBN = 64;                        // output channels per CTA
constexpr int kRowBytes = 64;                  // reduction slice per stage, in bytes
constexpr int kRowPitch = kRowBytes + 16;      // smem row pitch: 20 words -> conflict-free frags
constexpr int kPitchWords = kRowPitch / 4;
constexpr int kStages = 3;
constexpr int kStageBytes = (kBM + kBN) * kRowPitch;
constexpr int kSmemBytes = kStages * kStageBytes;
static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
static_assert(kRowBytes == 64, "fragment addressing below assumes 2 k-steps of 32 bytes per stage");

// kWarpsM x kWarpsN warps over the kBM x kBN CTA tile.
template <int kWarpsM_, int kWarpsN_>
struct WarpTiling {
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWM = kBM / kWarpsM;  // warp tile rows
  static constexpr int kWN = kBN / kWarpsN;  // warp tile columns
  static constexpr int kMI = kWM / 16;       // mma tiles along M per warp
  static constexpr int kNI = kWN / 8;        // mma tiles along N per warp
};

// One implicit-GEMM operand pair: x (pixels of an NHWC image batch, consecutive pixels `ld`
// elements apart, channel c at +c) and w (K, R, S, C) contiguous. conv_bn_act: ld = C; its
// projection shortcut is the same with x = xs, w = wd, R = S = 1, stride = sd, pad = 0,
// dilation = 1. Pixel GEMM: H = W = R = S = 1 (one "image" per pixel, P = Q = 1), ld = lda.
struct ConvGeom {
  const void* x;
  const void* w;
  int H, W, C, R, S;
  int sh, sw, ph, pw, dh, dw;
  int64_t ld;  // elements between consecutive pixels of x (>= C)
  int tiles;   // R * S * ceil(C / BK)
  bool vec;    // 16-byte loads allowed (C % 16B and ld % 16B elements, pointers 16-byte aligned)
};

// ----------------------------------------------------------------------------------------------
// Global -> shared tile loader. Each thread owns one 16-byte column chunk (tid % 4) of a fixed
// set of A rows (output pixels) and B rows (output channels); the (n, p, q) decode of its rows
// happens once in init().
// ----------------------------------------------------------------------------------------------
template <typename Elem, int kThreads>
struct TileLoader {
  static constexpr int kVE = 16 / sizeof(Elem);          // elements per 16-byte chunk
  static constexpr int kBK = kRowBytes / sizeof(Elem);   // elements per stage row
  static constexpr int kRowsPerPass = kThreads / 4;
  static constexpr int kAIt = kBM / kRowsPerPass;
  static constexpr int kBIt = kBN / kRowsPerPass;
  static_assert(kBM % kRowsPerPass == 0 && kBN % kRowsPerPass == 0, "loader mapping");

  const Elem* x;
  const Elem* w;
  int64_t a_off[kAIt];  // element offset of (n, ih0, iw0, 0); may be "negative" (padding)
  int a_ih0[kAIt], a_iw0[kAIt];
  int64_t b_off[kBIt];  // element offset of weight row n
  unsigned a_ok, b_ok;  // bit i: row i inside M / inside K
  int H, W, C, S, dh, dw;
  int64_t ld;
  int r, s, c0;  // reduction position of the next tile
  int row0, cchunk;
  bool vec;

  __device__ __forceinline__ void init(const ConvGeom& g, int64_t m0, int n0, int64_t M, int K, int P, int Q,
                                       int tid) {
    x = static_cast<const Elem*>(g.x);
    w = static_cast<const Elem*>(g.w);
    H = g.H; W = g.W; C = g.C; S = g.S; dh = g.dh; dw = g.dw;
    ld = g.ld;
    vec = g.vec;
    r = 0; s = 0; c0 = 0;
    row0 = tid >> 2;
    cchunk = tid & 3;
    const int64_t PQ = static_cast<int64_t>(P) * Q;
    a_ok = 0;
#pragma unroll
    for (int i = 0; i < kAIt; ++i) {
      const int64_t m = m0 + row0 + i * kRowsPerPass;
      a_off[i] = 0; a_ih0[i] = 0; a_iw0[i] = 0;
      if (m < M) {
        const int64_t img = m / PQ;
        const int64_t rem = m - img * PQ;  // P*Q may exceed 2^31 for one huge image
        const int p = static_cast<int>(rem / Q);
        const int q = static_cast<int>(rem - static_cast<int64_t>(p) * Q);
        const int ih0 = p * g.sh - g.ph;
        const int iw0 = q * g.sw - g.pw;
        a_ih0[i] = ih0;
        a_iw0[i] = iw0;
        a_off[i] = ((img * H + ih0) * W + iw0) * ld;
        a_ok |= 1u << i;
      }
    }
    b_ok = 0;
    const int64_t rsc = static_cast<int64_t>(g.R) * g.S * g.C;
#pragma unroll
    for (int i = 0; i < kBIt; ++i) {
      const int n = n0 + row0 + i * kRowsPerPass;
      b_off[i] = n < K ? n * rsc : 0;
      if (n < K) b_ok |= 1u << i;
    }
  }

  template <bool kCacheL1>
  __device__ __forceinline__ void copy_chunk(unsigned char* dst, const Elem* base, int64_t off, bool ok,
                                             int remaining) const {
    copy_chunk_16<kCacheL1>(dst, base, off, ok, remaining, vec);
  }

  __device__ __forceinline__ void load(unsigned char* stage) const {
    const int c = c0 + cchunk * kVE;
    const int remaining = C - c;
    const int rdh = r * dh, sdw = s * dw;
    const int64_t a_delta = (static_cast<int64_t>(rdh) * W + sdw) * ld + c;
    const int64_t b_delta = static_cast<int64_t>(r * S + s) * C + c;
#pragma unroll
    for (int i = 0; i < kAIt; ++i) {
      const int ih = a_ih0[i] + rdh;
      const int iw = a_iw0[i] + sdw;
      const bool ok = ((a_ok >> i) & 1u) && static_cast<unsigned>(ih) < static_cast<unsigned>(H) &&
                      static_cast<unsigned>(iw) < static_cast<unsigned>(W);
      copy_chunk<true>(stage + (row0 + i * kRowsPerPass) * kRowPitch + cchunk * 16, x, a_off[i] + a_delta, ok,
                       remaining);
    }
#pragma unroll
    for (int i = 0; i < kBIt; ++i) {
      copy_chunk<false>(stage + (kBM + row0 + i * kRowsPerPass) * kRowPitch + cchunk * 16, w, b_off[i] + b_delta,
                        (b_ok >> i) & 1u, remaining);
    }
  }

  __device__ __forceinline__ void advance() {
    c0 += kBK;
    if (c0 >= C) {
      c0 = 0;
      if (++s == S) {
        s = 0;
        ++r;
      }
    }
  }
};

// ----------------------------------------------------------------------------------------------
// Warp MMA over one smem stage. For both instruction shapes the fragment word for lane
// (g = lane/4, t = lane%4) is:
//   A: a0 = (row g, word t), a1 = (row g+8, word t), a2 = (row g, word t+4), a3 = (row g+8, word t+4)
//   B: b0 = (row g, word t), b1 = (row g, word t+4)
// (m16n8k16 16-bit: word t = elements 2t, 2t+1; m16n8k8 tf32: word t = element t), words counted
// from the k-step's 32-byte offset.
// ----------------------------------------------------------------------------------------------
template <class Math, int MI, int NI>
__device__ __forceinline__ void compute_stage(const unsigned char* stage, float (&acc)[MI][NI][4], int warp_m0,
                                              int warp_n0, int lane) {
  const uint32_t* sw = reinterpret_cast<const uint32_t*>(stage);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ks = 0; ks < kRowBytes / 32; ++ks) {
    uint32_t af[MI][4], bf[NI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const uint32_t* p = sw + (warp_m0 + mi * 16 + g) * kPitchWords + ks * 8 + t;
      af[mi][0] = p[0];
      af[mi][1] = p[8 * kPitchWords];
      af[mi][2] = p[4];
      af[mi][3] = p[8 * kPitchWords + 4];
    }
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const uint32_t* p = sw + (kBM + warp_n0 + ni * 8 + g) * kPitchWords + ks * 8 + t;
      bf[ni][0] = p[0];
      bf[ni][1] = p[4];
    }
    Math::warp_step(acc, af, bf);
  }
}

// No per-stage transform (conv_bn_act, the pixel GEMM without prologue): compiled away.
struct NoStageTransform {
  static constexpr bool kActive = false;
  __device__ __forceinline__ void operator()(unsigned char*, int) const {}
};

// Multistage main loop: tile kt lives in stage kt % kStages. At the top of iteration kt, tiles
// 0..kt+1 are committed (one group per tile, empty groups past the end); waiting for all but
// kStages-2 groups lands tile kt, and the barrier both publishes it and proves every warp is done
// with tile kt-1, whose stage the refill of tile kt+kStages-1 overwrites.
// Transform (kActive): tf(stage, kt) rewrites landed tile kt in place (a prologue on A) by every
// thread, then a second barrier publishes the rewrite before any warp's fragment loads.
template <class Math, class Loader, int MI, int NI, class Transform = NoStageTransform>
__device__ __forceinline__ void mainloop(Loader& ld, int tiles, float (&acc)[MI][NI][4], unsigned char* smem,
                                         int warp_m0, int warp_n0, int lane, const Transform& tf = Transform{}) {
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < tiles) {
      ld.load(smem + st * kStageBytes);
      ld.advance();
    }
    cp_async_commit();
  }
  int read_stage = 0, write_stage = kStages - 1;
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (kt + kStages - 1 < tiles) {
      ld.load(smem + write_stage * kStageBytes);
      ld.advance();
    }
    cp_async_commit();
    if constexpr (Transform::kActive) {
      tf(smem + read_stage * kStageBytes, kt);
      __syncthreads();
    }
    compute_stage<Math>(smem + read_stage * kStageBytes, acc, warp_m0, warp_n0, lane);
    read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
    write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // a following main loop (projection) refills stages other warps may still read
}

}  // namespace detail
}  // namespace resfuse
