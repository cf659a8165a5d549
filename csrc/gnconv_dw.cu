// HorNet gnconv's depthwise kxk conv with the gate scale, bias and first gate product fused
// (dwconv_gate), and its backward (dwconv_gate_backward). Contract: csrc/gnconv.h.
//
// Formulas (n image, h/w pixel, c channel < S, k odd, pad k/2, stride 1, fp32 accumulation, one
// rounding to dtype per output):
//   forward   acc[m,c] = sum_{r,s<k} abc[n, h+r-k/2, w+s-k/2, c] * w_dw[(c*k+r)*k+s]   (zero pad)
//             g = scale * (acc + b_dw[c])       (or g = scale * gates[m,c] when gates is given)
//             out[m*ld_out+c] = round(c < n_pwa ? pwa[m*ld_pwa+c] * g : g)
//   backward  dabc[m,c] = round(scale * sum_{r,s} dg[n, h+r-k/2, w+s-k/2, c] * w_dw[c, k-1-r, k-1-s])
//             (the forward kernel with flipped taps: tap index t = r*k+s becomes k*k-1-t)
//             dw_dw[c,r,s] = scale * sum_m dg[m,c] * abc[n, h+r-k/2, w+s-k/2, c],  db_dw[c] = scale * sum_m dg[m,c]
//   Padding contributes nothing (a pixel outside the image is skipped, so dg = Inf at the border
//   does not make dw NaN through Inf * 0). gates mode ignores abc, w_dw, b_dw and ksize.
// Layouts: activations channels_last rows t[m*ld + c], m = (n*H + h)*W + w, int64 offsets
//   (N*H*W*ld may exceed 2^31); w_dw (S, k, k) fp32; b_dw, dw_dw, db_dw fp32 contiguous.
//
// Tiling: 256 threads (8 warps); a CTA owns a TH x TW pixel tile of one image (blockIdx.x) and
//   32 channels (blockIdx.y); lane = channel, so every shared-memory access of a warp is 32
//   consecutive floats (conflict-free). Shared memory (static, RF_SHARED_BUFFER, 48 KB): the input
//   tile plus its k/2 halo, converted to fp32, layout [(TH+k-1)*(TW+k-1) pixels][32 channels],
//   then the CTA's weights [k*k taps][32] (flipped in the backward). Staging uses 16-byte ldg
//   (8 fp16/bf16 or 4 fp32 channels) when S, the ld's and base pointers allow, element-wise
//   loads otherwise (same smem layout; padding and channels >= S are zeros).
//   Compute: a thread owns one channel and runs of kR = 8 consecutive pixels of a row (at most two
//   runs: TH*TW/8 <= 16). k = 7 is instantiated with a register sliding window (per filter row:
//   14 smem loads, 56 FMAs); other k run a generic loop (8 loads + 1 weight load per 8 FMAs).
//   Epilogue: accumulators go through smem (over the dead halo) so that the stores (and the pwa
//   loads) are 16-byte vectors along channels when aligned, element-wise otherwise.
//   __launch_bounds__(256, 1): with (256) alone ptxas spilled 4-8 bytes at 32/48/64 registers.
//   Tile per k: the first of 8x16, 8x8, 4x8, 2x8, 1x8 whose halo + weights fit (k = 7: 8x16,
//   39424 + 6272 B); when none fits (k >= 13) a direct path reads the input and weights from
//   global memory per tap (slower, correct for any odd k <= kMaxK = 1023).
//   Weight gradient: a CTA owns a fixed run of tps consecutive 8x8 (k = 7; smaller tiles for larger
//   k, direct global reads when no tile fits, k >= 17) pixel tiles and 32 channels; per tile it
//   stages the abc halo and the dg tile, then warp w takes tasks t = w, w+8, ...: one filter row r
//   (k = 7: 7 taps with a sliding window, 1 dg + 1 abc smem load per 7 FMAs) or one tap (generic),
//   plus one db task; each thread adds its per-tile sums into its own fp32 slot of the workspace
//   [channel block][slot][k*k+1][32] (no atomics). dwconv_reduce_kernel then sums the slots in
//   slot order and multiplies by scale: same bits run to run.
//
// Bytes per pixel (element size e; HBM, assuming the halo re-reads are served by smem / L2):
//   forward:  reads S*e abc (+ the halo: ((TH+k-1)(TW+k-1)/(TH*TW) - 1)*S*e more from L2, 2.4x at
//             k = 7) + d0*e pwa (n_pwa = d0), writes S*e out; weights k*k*4 B per channel per CTA.
//             gates mode: reads (S + d0)*e, writes S*e.
//   backward: dabc: reads S*e dg (+ halo from L2), writes S*e dabc. dw/db: reads S*e dg + S*e abc
//             (+ halo), writes the partials: nslots*(k*k+1)*4 B per channel (nslots <= 512 per
//             channel block, i.e. < 0.1 B per pixel for large M), which the reduction re-reads once.
#include "gnconv.h"

#include <cstdint>

#if defined(__CUDACC__) || defined(RESFUSE_CUDA_EMULATE)

#include "device_prims.cuh"

namespace resfuse {
namespace detail {

constexpr int kDwThreads = 256;
constexpr int kDwWarps = kDwThreads / 32;
constexpr int kDwCB = 32;                 // channels per CTA (= lanes)
constexpr int kDwR = 8;                   // pixels per run (forward)
constexpr int kDwSmem = 48 * 1024;        // static shared memory per CTA
constexpr int kDwMaxRuns = 2 * kDwWarps;  // runs per tile, two per thread
#ifndef RESFUSE_DW_MAX_SLOTS  // the CPU emulator lowers it so that CTAs reduce several tiles
#define RESFUSE_DW_MAX_SLOTS 512
#endif
constexpr int kDwMaxSlots = RESFUSE_DW_MAX_SLOTS;  // weight-gradient partial slots per channel block
constexpr int kDwGatePix = 64;            // pixels per CTA, gates mode
constexpr int kMaxK = 1023;

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

struct EF32 {
  using T = float;
  static constexpr int kVE = 4;
  __device__ __forceinline__ static float to_f(T v) { return v; }
  __device__ __forceinline__ static T from_f(float v) { return v; }
  __device__ __forceinline__ static void unpack(const uint4& u, float* v) {
    v[0] = as_float(u.x); v[1] = as_float(u.y); v[2] = as_float(u.z); v[3] = as_float(u.w);
  }
  __device__ __forceinline__ static uint4 pack(const float* v) {
    return make_uint4(as_uint(v[0]), as_uint(v[1]), as_uint(v[2]), as_uint(v[3]));
  }
};
template <bool kBF>
struct E16 {
  using T = uint16_t;
  static constexpr int kVE = 8;
  __device__ __forceinline__ static float to_f(T b) { return kBF ? bf16_to_float(b) : f16_to_float(b); }
  __device__ __forceinline__ static T from_f(float v) { return kBF ? float_to_bf16(v) : float_to_f16(v); }
  __device__ __forceinline__ static void unpack(const uint4& u, float* v) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = to_f(static_cast<T>(w[i] & 0xffffu));
      v[2 * i + 1] = to_f(static_cast<T>(w[i] >> 16));
    }
  }
  __device__ __forceinline__ static uint4 pack(const float* v) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = uint32_t(from_f(v[2 * i])) | (uint32_t(from_f(v[2 * i + 1])) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// Tile geometry shared by the forward / dabc and weight-gradient kernels.
struct DwTiling {
  int N, H, W, S, k;
  int TH, TW, tiles_w, tiles_hw;  // tiles_hw = tiles_h * tiles_w
};

struct DwConvArgs {
  DwTiling t;
  const void* in; int64_t ld_in;     // abc (forward) or dg (dabc)
  const float* w; const float* b;    // b nullable
  const void* pwa; int64_t ld_pwa; int n_pwa;
  float scale;
  void* out; int64_t ld_out;
  bool vin, vout;                    // 16-byte staging loads / epilogue loads+stores
};

struct DwGateOnlyArgs {
  const void* gates; int64_t ld_gates;
  const void* pwa; int64_t ld_pwa; int n_pwa;
  float scale;
  void* out; int64_t ld_out;
  int64_t M; int S;
  bool vec;
};

struct DwWgradArgs {
  DwTiling t;
  const void* dg; int64_t ld_dg;
  const void* abc; int64_t ld_abc;   // null: db only (no dw tasks, no abc staging)
  float* ws;                         // [ceil(S/32)][nslots][k*k+1][32]
  int64_t ntiles; int tps, nslots;
  bool vdg, vabc;
};

struct DwReduceArgs {
  const float* ws; float* dw; float* db;
  int k, S, nslots;
  float scale;
};

// Stages rows x cols pixels starting at image pixel (gy0, gx0) (may lie outside the image: zeros),
// channels c0 .. c0+31 (>= S: zeros), of src[((n*H + h)*W + w)*ld + c] into dst[pixel][32] as fp32.
template <class E>
__device__ __forceinline__ void stage_tile(float* dst, const void* src_v, int64_t ld, int n, int H, int W,
                                           int gy0, int gx0, int rows, int cols, int c0, int S, bool vec) {
  const typename E::T* src = static_cast<const typename E::T*>(src_v);
  const int tid = threadIdx.x;
  if (vec) {
    constexpr int kVE = E::kVE, kCPP = kDwCB / kVE;
    const int items = rows * cols * kCPP;
    for (int it = tid; it < items; it += kDwThreads) {
      const int p = it / kCPP, ch = it % kCPP, y = p / cols, x = p % cols;
      const int h = gy0 + y, w = gx0 + x, c = c0 + ch * kVE;
      float v[kVE];
      if (src && h >= 0 && h < H && w >= 0 && w < W && c < S) {
        const int64_t off = ((int64_t(n) * H + h) * W + w) * ld + c;
        E::unpack(ldg(reinterpret_cast<const uint4*>(src + off)), v);
      } else {
#pragma unroll
        for (int i = 0; i < kVE; ++i) v[i] = 0.f;
      }
      float4* d = reinterpret_cast<float4*>(dst + p * kDwCB + ch * kVE);
#pragma unroll
      for (int i = 0; i < kVE / 4; ++i) d[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    }
  } else {
    const int items = rows * cols * kDwCB;
    for (int it = tid; it < items; it += kDwThreads) {
      const int p = it / kDwCB, lane = it % kDwCB, y = p / cols, x = p % cols;
      const int h = gy0 + y, w = gx0 + x, c = c0 + lane;
      float v = 0.f;
      if (src && h >= 0 && h < H && w >= 0 && w < W && c < S)
        v = E::to_f(ldg(src + ((int64_t(n) * H + h) * W + w) * ld + c));
      dst[p * kDwCB + lane] = v;
    }
  }
}

// Reads pixel (y, x) of a staged window (smem) or, in the direct path, straight from global memory.
template <class E, bool kDirect>
struct Window {
  const float* s; int cols;  // smem, already offset by the lane
  const typename E::T* g; int64_t ld; int n, H, W, gy0, gx0, c; bool cok;
  __device__ __forceinline__ float operator()(int y, int x) const {
    if constexpr (!kDirect) {
      return s[(y * cols + x) * kDwCB];
    } else {
      const int h = gy0 + y, w = gx0 + x;
      if (!g || !cok || h < 0 || h >= H || w < 0 || w >= W) return 0.f;
      return E::to_f(ldg(g + ((int64_t(n) * H + h) * W + w) * ld + c));
    }
  }
};

template <class E, bool kDirect>
__device__ __forceinline__ Window<E, kDirect> make_window(const float* s, int cols, const void* g, int64_t ld,
                                                          const DwTiling& t, int n, int gy0, int gx0, int c) {
  return {s, cols, static_cast<const typename E::T*>(g), ld, n, t.H, t.W, gy0, gx0, c, c < t.S};
}

// out = round(c < n_pwa ? pwa * g : g), g = scale * (v + b[c]): one element / one 16-byte chunk.
template <class E>
__device__ __forceinline__ void finish1(const void* pwa, int64_t ld_pwa, int n_pwa, const float* b, float scale,
                                        void* out, int64_t ld_out, int64_t m, int c, float v) {
  float g = scale * (b ? v + ldg(b + c) : v);
  if (c < n_pwa) g *= E::to_f(ldg(static_cast<const typename E::T*>(pwa) + m * ld_pwa + c));
  static_cast<typename E::T*>(out)[m * ld_out + c] = E::from_f(g);
}
template <class E>
__device__ __forceinline__ void finish_vec(const void* pwa, int64_t ld_pwa, int n_pwa, const float* b, float scale,
                                           void* out, int64_t ld_out, int64_t m, int c, float* v) {
  constexpr int kVE = E::kVE;
#pragma unroll
  for (int i = 0; i < kVE; ++i) v[i] = scale * (b ? v[i] + ldg(b + c + i) : v[i]);
  if (c < n_pwa) {  // the launcher guarantees n_pwa % kVE == 0 on this path
    float p[kVE];
    E::unpack(ldg(reinterpret_cast<const uint4*>(static_cast<const typename E::T*>(pwa) + m * ld_pwa + c)), p);
#pragma unroll
    for (int i = 0; i < kVE; ++i) v[i] *= p[i];
  }
  *reinterpret_cast<uint4*>(static_cast<typename E::T*>(out) + m * ld_out + c) = E::pack(v);
}

// Forward (kFlip = false) and dabc (kFlip = true: taps reversed). kK = 7: compile-time k with a
// register sliding window; kK = 0: runtime k. kDirect: no halo in smem, reads from global.
template <class E, int kK, bool kDirect, bool kFlip>
__global__ void __launch_bounds__(kDwThreads, 1) dwconv_kernel(const DwConvArgs a) {
  static_assert(kK == 0 || !kDirect, "the direct path is generic");
  RF_SHARED_BUFFER(smem_raw, kDirect ? kDwMaxRuns * kDwR * kDwCB * 4 : kDwSmem);  // direct: the output tile only
  float* smem = reinterpret_cast<float*>(smem_raw);
  const DwTiling& t = a.t;
  const int k = kK > 0 ? kK : t.k, kk = k * k, half = k / 2;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n = blockIdx.x / t.tiles_hw, tile = blockIdx.x % t.tiles_hw;
  const int y0 = (tile / t.tiles_w) * t.TH, x0 = (tile % t.tiles_w) * t.TW;
  const int c0 = blockIdx.y * kDwCB, c = c0 + lane;
  const int hcols = t.TW + k - 1, hrows = t.TH + k - 1;
  float* sw = smem + hrows * hcols * kDwCB;  // weights [kk][32] after the halo

  if constexpr (!kDirect) {
    stage_tile<E>(smem, a.in, a.ld_in, n, t.H, t.W, y0 - half, x0 - half, hrows, hcols, c0, t.S, a.vin);
    for (int i = tid; i < kk * kDwCB; i += kDwThreads) {
      const int tap = i / kDwCB, cc = c0 + i % kDwCB;
      sw[i] = cc < t.S ? ldg(a.w + int64_t(cc) * kk + (kFlip ? kk - 1 - tap : tap)) : 0.f;
    }
    __syncthreads();
  }
  const auto win = make_window<E, kDirect>(smem + lane, hcols, a.in, a.ld_in, t, n, y0 - half, x0 - half, c);
  auto weight = [&](int tap) -> float {
    if constexpr (!kDirect) return sw[tap * kDwCB + lane];
    else return c < t.S ? ldg(a.w + int64_t(c) * kk + (kFlip ? kk - 1 - tap : tap)) : 0.f;
  };

  const int rpr = t.TW / kDwR, runs = t.TH * rpr;  // runs per row, per tile (<= kDwMaxRuns)
  float acc[2][kDwR];
#pragma unroll
  for (int sl = 0; sl < 2; ++sl) {
#pragma unroll
    for (int j = 0; j < kDwR; ++j) acc[sl][j] = 0.f;
    const int run = warp + sl * kDwWarps;
    if (run >= runs) continue;
    const int y = run / rpr, xr = (run % rpr) * kDwR;
#pragma unroll 1
    for (int r = 0; r < k; ++r) {
      if constexpr (kK > 0) {
        float wv[kK + kDwR - 1];
#pragma unroll
        for (int i = 0; i < kK + kDwR - 1; ++i) wv[i] = win(y + r, xr + i);
#pragma unroll
        for (int s = 0; s < kK; ++s) {
          const float wt = weight(r * kK + s);
#pragma unroll
          for (int j = 0; j < kDwR; ++j) acc[sl][j] = fmaf(wv[j + s], wt, acc[sl][j]);
        }
      } else {
#pragma unroll 1
        for (int s = 0; s < k; ++s) {
          const float wt = weight(r * k + s);
#pragma unroll
          for (int j = 0; j < kDwR; ++j) acc[sl][j] = fmaf(win(y + r, xr + j + s), wt, acc[sl][j]);
        }
      }
    }
  }
  float* otile = smem;  // [TH*TW][32], over the halo
  if constexpr (!kDirect) __syncthreads();  // every warp is done with the halo
#pragma unroll
  for (int sl = 0; sl < 2; ++sl) {
    const int run = warp + sl * kDwWarps;
    if (run >= runs) continue;
    const int y = run / rpr, xr = (run % rpr) * kDwR;
#pragma unroll
    for (int j = 0; j < kDwR; ++j) otile[((y * t.TW) + xr + j) * kDwCB + lane] = acc[sl][j];
  }
  __syncthreads();
  const int tpix = t.TH * t.TW;
  if (a.vout) {
    constexpr int kVE = E::kVE, kCPP = kDwCB / kVE;
    for (int it = tid; it < tpix * kCPP; it += kDwThreads) {
      const int p = it / kCPP, ch = it % kCPP, h = y0 + p / t.TW, w = x0 + p % t.TW, cc = c0 + ch * kVE;
      if (h >= t.H || w >= t.W || cc >= t.S) continue;
      float v[kVE];
#pragma unroll
      for (int i = 0; i < kVE; ++i) v[i] = otile[p * kDwCB + ch * kVE + i];
      finish_vec<E>(a.pwa, a.ld_pwa, a.n_pwa, a.b, a.scale, a.out, a.ld_out, (int64_t(n) * t.H + h) * t.W + w, cc, v);
    }
  } else {
    for (int it = tid; it < tpix * kDwCB; it += kDwThreads) {
      const int p = it / kDwCB, l = it % kDwCB, h = y0 + p / t.TW, w = x0 + p % t.TW, cc = c0 + l;
      if (h >= t.H || w >= t.W || cc >= t.S) continue;
      finish1<E>(a.pwa, a.ld_pwa, a.n_pwa, a.b, a.scale, a.out, a.ld_out, (int64_t(n) * t.H + h) * t.W + w, cc,
                 otile[it]);
    }
  }
}

// Gates given (HorNet's gflayer): out = round(c < n_pwa ? pwa * scale * gates : scale * gates).
template <class E>
__global__ void __launch_bounds__(kDwThreads) dwconv_gate_only_kernel(const DwGateOnlyArgs a) {
  const int64_t m0 = int64_t(blockIdx.x) * kDwGatePix;
  const int c0 = blockIdx.y * kDwCB;
  const typename E::T* g = static_cast<const typename E::T*>(a.gates);
  if (a.vec) {
    constexpr int kVE = E::kVE, kCPP = kDwCB / kVE;
    for (int it = threadIdx.x; it < kDwGatePix * kCPP; it += kDwThreads) {
      const int64_t m = m0 + it / kCPP;
      const int c = c0 + (it % kCPP) * kVE;
      if (m >= a.M || c >= a.S) continue;
      float v[kVE];
      E::unpack(ldg(reinterpret_cast<const uint4*>(g + m * a.ld_gates + c)), v);
      finish_vec<E>(a.pwa, a.ld_pwa, a.n_pwa, nullptr, a.scale, a.out, a.ld_out, m, c, v);
    }
  } else {
    for (int it = threadIdx.x; it < kDwGatePix * kDwCB; it += kDwThreads) {
      const int64_t m = m0 + it / kDwCB;
      const int c = c0 + it % kDwCB;
      if (m >= a.M || c >= a.S) continue;
      finish1<E>(a.pwa, a.ld_pwa, a.n_pwa, nullptr, a.scale, a.out, a.ld_out, m, c, E::to_f(ldg(g + m * a.ld_gates + c)));
    }
  }
}

// Weight / bias gradient partials: CTA (slot, channel block) sums tiles slot*tps .. +tps-1 into
// ws[cb][slot][tap][lane] (tap k*k = bias). kK = 7: tasks are filter rows (7 taps, sliding window).
template <class E, int kK, bool kDirect>
__global__ void __launch_bounds__(kDwThreads, 1) dwconv_wgrad_kernel(const DwWgradArgs a) {
  static_assert(kK == 0 || !kDirect, "the direct path is generic");
  constexpr int kSC = kK > 0 ? kK : 1;  // taps per task
  RF_SHARED_BUFFER(smem_raw, kDirect ? 16 : kDwSmem);  // direct: unused
  float* smem = reinterpret_cast<float*>(smem_raw);
  const DwTiling& t = a.t;
  const int k = kK > 0 ? kK : t.k, kk = k * k, half = k / 2;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c0 = blockIdx.y * kDwCB, c = c0 + lane;
  const int hcols = t.TW + k - 1, hrows = t.TH + k - 1;
  float* sdg = smem + hrows * hcols * kDwCB;  // dg tile [TH*TW][32] after the abc halo
  const int64_t slot = int64_t(blockIdx.y) * a.nslots + blockIdx.x;
  const int ntasks = (kK > 0 ? k : kk) + 1;  // + the bias task
  for (int i = 0; i < a.tps; ++i) {
    const int64_t tile_id = int64_t(blockIdx.x) * a.tps + i;
    if (tile_id >= a.ntiles) break;  // uniform over the CTA
    const int n = int(tile_id / t.tiles_hw), tile = int(tile_id % t.tiles_hw);
    const int y0 = (tile / t.tiles_w) * t.TH, x0 = (tile % t.tiles_w) * t.TW;
    if constexpr (!kDirect) {
      if (a.abc) stage_tile<E>(smem, a.abc, a.ld_abc, n, t.H, t.W, y0 - half, x0 - half, hrows, hcols, c0, t.S, a.vabc);
      stage_tile<E>(sdg, a.dg, a.ld_dg, n, t.H, t.W, y0, x0, t.TH, t.TW, c0, t.S, a.vdg);
      __syncthreads();
    }
    const auto A = make_window<E, kDirect>(smem + lane, hcols, a.abc, a.ld_abc, t, n, y0 - half, x0 - half, c);
    const auto D = make_window<E, kDirect>(sdg + lane, t.TW, a.dg, a.ld_dg, t, n, y0, x0, c);
    const int ye = imin(t.TH, t.H - y0), xe = imin(t.TW, t.W - x0);  // the tile's pixels in the image
    for (int task = warp + (a.abc ? 0 : ntasks - 1); task < ntasks; task += kDwWarps) {  // db only: one task
      float acc[kSC];
#pragma unroll
      for (int j = 0; j < kSC; ++j) acc[j] = 0.f;
      int tap0;
      if (task == ntasks - 1) {  // db: sum of dg over the tile's pixels
        tap0 = kk;
#pragma unroll 1
        for (int y = 0; y < ye; ++y)
#pragma unroll 1
          for (int x = 0; x < xe; ++x) acc[0] += D(y, x);
      } else {
        const int r = kK > 0 ? task : task / k, s0 = kK > 0 ? 0 : task % k;
        tap0 = r * k + s0;
        // rows whose abc row lies in the image; columns in the padding are skipped below when dg is
        // not finite (padding contributes nothing, not 0 * Inf = NaN)
#pragma unroll 1
        for (int y = imax(0, half - r - y0); y < imin(ye, t.H + half - r - y0); ++y) {
          float wv[kSC];  // abc(y + r, x + s0 + j), slid along x
#pragma unroll
          for (int j = 0; j < kSC; ++j) wv[j] = A(y + r, s0 + j);
#pragma unroll 1
          for (int x = 0; x < xe; ++x) {
            if (x > 0) {
#pragma unroll
              for (int j = 0; j + 1 < kSC; ++j) wv[j] = wv[j + 1];
              wv[kSC - 1] = A(y + r, x + s0 + kSC - 1);
            }
            const float d = D(y, x);
            if (finite_bits(as_uint(d))) {
#pragma unroll
              for (int j = 0; j < kSC; ++j) acc[j] = fmaf(d, wv[j], acc[j]);
            } else {
#pragma unroll
              for (int j = 0; j < kSC; ++j) {
                const int iw = x0 + x + s0 + j - half;
                if (iw >= 0 && iw < t.W) acc[j] = fmaf(d, wv[j], acc[j]);
              }
            }
          }
        }
      }
      const int nt = tap0 == kk ? 1 : kSC;
      float* ws = a.ws + (slot * (kk + 1) + tap0) * kDwCB + lane;  // this thread's own partials
#pragma unroll
      for (int j = 0; j < kSC; ++j)
        if (j < nt) ws[j * kDwCB] = (i == 0 ? 0.f : ws[j * kDwCB]) + acc[j];
    }
    if constexpr (!kDirect) __syncthreads();  // before the next tile overwrites the staged data
  }
}

// dw[c*k*k + tap] / db[c] = scale * sum over slots (in slot order) of ws[cb][slot][tap][lane].
__global__ void __launch_bounds__(kDwThreads) dwconv_reduce_kernel(const DwReduceArgs a) {
  const int kk = a.k * a.k, T = kk + 1;
  const int64_t idx = int64_t(blockIdx.x) * kDwThreads + threadIdx.x;
  const int lane = int(idx % kDwCB);
  const int64_t rest = idx / kDwCB;
  const int tap = int(rest % T), cb = int(rest / T), c = cb * kDwCB + lane;
  if (c >= a.S) return;
  const float* p = a.ws + ((int64_t(cb) * a.nslots) * T + tap) * kDwCB + lane;
  float sum = 0.f;
  for (int s = 0; s < a.nslots; ++s) sum += p[int64_t(s) * T * kDwCB];
  const float v = a.scale * sum;
  if (tap < kk) {
    if (a.dw) a.dw[int64_t(c) * kk + tap] = v;
  } else if (a.db) {
    a.db[c] = v;
  }
}

// ----------------------------------------------------------------------------------------------
// Host side.
// ----------------------------------------------------------------------------------------------
inline bool dw_aligned(const void* p, size_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }
inline int64_t dw_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t halo_bytes(int th, int tw, int k) { return int64_t(th + k - 1) * (tw + k - 1) * kDwCB * 4; }
// 16-byte path for one tensor: ld and base aligned to 16 bytes (S % vec checked by the caller).
inline bool vec_ok(const void* p, int64_t ld, size_t es) { return !p || (dw_aligned(p, 16) && (ld * es) % 16 == 0); }

constexpr int kTileCand[][2] = {{8, 16}, {8, 8}, {4, 8}, {2, 8}, {1, 8}};

// Forward / dabc tile: the first candidate whose halo + weights fit; direct (8x16) when none does.
inline DwTiling conv_tiling(int N, int H, int W, int S, int k, bool* direct) {
  DwTiling t{N, H, W, S, k, 8, 16, 0, 0};
  *direct = true;
  for (const auto& c : kTileCand)
    if (halo_bytes(c[0], c[1], k) + int64_t(k) * k * kDwCB * 4 <= kDwSmem) { t.TH = c[0]; t.TW = c[1]; *direct = false; break; }
  t.tiles_w = int(dw_cdiv(W, t.TW));
  t.tiles_hw = int(dw_cdiv(H, t.TH)) * t.tiles_w;
  return t;
}
// Weight-gradient tile (reads k only, so the workspace size depends on N, H, W, S, k alone).
inline DwTiling wgrad_tiling(int N, int H, int W, int S, int k, bool* direct) {
  DwTiling t{N, H, W, S, k, 8, 8, 0, 0};
  *direct = true;
  for (int i = 1; i < 5; ++i) {
    const int th = kTileCand[i][0], tw = kTileCand[i][1];
    if (halo_bytes(th, tw, k) + int64_t(th) * tw * kDwCB * 4 <= kDwSmem) { t.TH = th; t.TW = tw; *direct = false; break; }
  }
  t.tiles_w = int(dw_cdiv(W, t.TW));
  t.tiles_hw = int(dw_cdiv(H, t.TH)) * t.tiles_w;
  return t;
}
struct WgradPlan { DwTiling t; bool direct; int64_t ntiles; int tps, nslots, ncb; size_t bytes; };
inline WgradPlan wgrad_plan(int N, int H, int W, int S, int k) {
  WgradPlan p{};
  p.t = wgrad_tiling(N, H, W, S, k, &p.direct);
  p.ntiles = int64_t(N) * p.t.tiles_hw;
  p.tps = int(dw_cdiv(p.ntiles, kDwMaxSlots));
  p.nslots = p.ntiles > 0 ? int(dw_cdiv(p.ntiles, p.tps)) : 0;
  p.ncb = int(dw_cdiv(S, kDwCB));
  p.bytes = size_t(p.ncb) * p.nslots * (int64_t(k) * k + 1) * kDwCB * sizeof(float);
  return p;
}

template <class E>
const char* launch_conv(const DwConvArgs& a, bool direct, bool flip, cudaStream_t st) {
  const dim3 grid(unsigned(int64_t(a.t.N) * a.t.tiles_hw), unsigned(dw_cdiv(a.t.S, kDwCB)));
  if (direct) return flip ? launch_grid(&dwconv_kernel<E, 0, true, true>, grid, kDwThreads, st, a)
                          : launch_grid(&dwconv_kernel<E, 0, true, false>, grid, kDwThreads, st, a);
  if (a.t.k == 7) return flip ? launch_grid(&dwconv_kernel<E, 7, false, true>, grid, kDwThreads, st, a)
                              : launch_grid(&dwconv_kernel<E, 7, false, false>, grid, kDwThreads, st, a);
  return flip ? launch_grid(&dwconv_kernel<E, 0, false, true>, grid, kDwThreads, st, a)
              : launch_grid(&dwconv_kernel<E, 0, false, false>, grid, kDwThreads, st, a);
}
template <class E>
const char* launch_gate_only(const DwGateOnlyArgs& a, cudaStream_t st) {
  const dim3 grid(unsigned(dw_cdiv(a.M, kDwGatePix)), unsigned(dw_cdiv(a.S, kDwCB)));
  return launch_grid(&dwconv_gate_only_kernel<E>, grid, kDwThreads, st, a);
}
template <class E>
const char* launch_wgrad(const DwWgradArgs& a, bool direct, cudaStream_t st) {
  const dim3 grid(unsigned(a.nslots), unsigned(dw_cdiv(a.t.S, kDwCB)));
  if (direct) return launch_grid(&dwconv_wgrad_kernel<E, 0, true>, grid, kDwThreads, st, a);
  if (a.t.k == 7) return launch_grid(&dwconv_wgrad_kernel<E, 7, false>, grid, kDwThreads, st, a);
  return launch_grid(&dwconv_wgrad_kernel<E, 0, false>, grid, kDwThreads, st, a);
}
inline size_t dw_esize(DType d) { return d == DType::kFloat32 ? 4 : 2; }
inline bool dw_dtype_ok(DType d) { return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16; }

}  // namespace detail

const char* dwconv_gate_launch(const DwGateParams& p, cudaStream_t stream) {
  using namespace detail;
  const bool conv = p.gates == nullptr;
  if (!p.out) return "dwconv_gate: out must be non-null";
  if (conv && (!p.abc || !p.w_dw)) return "dwconv_gate: abc and w_dw must be non-null (gates == nullptr)";
  if (p.N < 0 || p.H < 0 || p.W < 0 || p.S < 0) return "dwconv_gate: N, H, W, S must be >= 0";
  if (conv && (p.ksize < 1 || p.ksize % 2 == 0)) return "dwconv_gate: ksize must be odd and >= 1";
  if (conv && p.ksize > kMaxK) return "dwconv_gate: ksize must be <= 1023";
  if (p.n_pwa < 0 || p.n_pwa > p.S) return "dwconv_gate: n_pwa must be in [0, S]";
  if (p.n_pwa > 0 && !p.pwa) return "dwconv_gate: pwa must be non-null when n_pwa > 0";
  if (conv && p.ld_abc < p.S) return "dwconv_gate: ld_abc must be >= S";
  if (!conv && p.ld_gates < p.S) return "dwconv_gate: ld_gates must be >= S";
  if (p.ld_out < p.S) return "dwconv_gate: ld_out must be >= S";
  if (p.n_pwa > 0 && p.ld_pwa < p.n_pwa) return "dwconv_gate: ld_pwa must be >= n_pwa";
  if (!dw_dtype_ok(p.dtype)) return "dwconv_gate: unsupported dtype";
  const int64_t M = int64_t(p.N) * p.H * p.W;
  if (M == 0 || p.S == 0) return nullptr;
  if (dw_cdiv(p.S, kDwCB) > 65535) return "dwconv_gate: S too large (grid.y limit: S <= 2097120)";
  const size_t es = dw_esize(p.dtype);
  const int ve = int(16 / es);
  const void* pwa = p.n_pwa > 0 ? p.pwa : nullptr;
  const bool vout = p.S % ve == 0 && p.n_pwa % ve == 0 && vec_ok(p.out, p.ld_out, es) && vec_ok(pwa, p.ld_pwa, es);
  if (!conv) {
    if (dw_cdiv(M, kDwGatePix) > INT32_MAX) return "dwconv_gate: N*H*W too large for the grid";
    DwGateOnlyArgs a{p.gates, p.ld_gates, pwa, p.ld_pwa, p.n_pwa, p.scale, p.out, p.ld_out, M, p.S,
                     vout && vec_ok(p.gates, p.ld_gates, es)};
    switch (p.dtype) {
      case DType::kFloat16: return launch_gate_only<E16<false>>(a, stream);
      case DType::kBFloat16: return launch_gate_only<E16<true>>(a, stream);
      default: return launch_gate_only<EF32>(a, stream);
    }
  }
  bool direct = false;
  DwConvArgs a{};
  a.t = conv_tiling(p.N, p.H, p.W, p.S, p.ksize, &direct);
  if (int64_t(p.N) * a.t.tiles_hw > INT32_MAX) return "dwconv_gate: N*H*W too large for the grid";
  a.in = p.abc; a.ld_in = p.ld_abc; a.w = p.w_dw; a.b = p.b_dw;
  a.pwa = pwa; a.ld_pwa = p.ld_pwa; a.n_pwa = p.n_pwa; a.scale = p.scale; a.out = p.out; a.ld_out = p.ld_out;
  a.vin = p.S % ve == 0 && vec_ok(p.abc, p.ld_abc, es);
  a.vout = vout;
  switch (p.dtype) {
    case DType::kFloat16: return launch_conv<E16<false>>(a, direct, false, stream);
    case DType::kBFloat16: return launch_conv<E16<true>>(a, direct, false, stream);
    default: return launch_conv<EF32>(a, direct, false, stream);
  }
}

size_t dwconv_gate_backward_workspace_bytes(const DwGateBwdParams& p) {
  if (p.N <= 0 || p.H <= 0 || p.W <= 0 || p.S <= 0 || p.ksize < 1 || p.ksize % 2 == 0 || p.ksize > detail::kMaxK)
    return 0;
  return detail::wgrad_plan(p.N, p.H, p.W, p.S, p.ksize).bytes;
}

const char* dwconv_gate_backward_launch(const DwGateBwdParams& p, cudaStream_t stream) {
  using namespace detail;
  const bool wgrad = p.dw_dw || p.db_dw;
  if (!p.dg) return "dwconv_gate_backward: dg must be non-null";
  if (p.dabc && !p.w_dw) return "dwconv_gate_backward: w_dw must be non-null when dabc is requested";
  if (p.dw_dw && !p.abc) return "dwconv_gate_backward: abc must be non-null when dw_dw is requested";
  if (wgrad && !p.workspace) return "dwconv_gate_backward: workspace must be non-null when dw_dw or db_dw is requested";
  if (p.N < 0 || p.H < 0 || p.W < 0 || p.S < 0) return "dwconv_gate_backward: N, H, W, S must be >= 0";
  if (p.ksize < 1 || p.ksize % 2 == 0) return "dwconv_gate_backward: ksize must be odd and >= 1";
  if (p.ksize > kMaxK) return "dwconv_gate_backward: ksize must be <= 1023";
  if (p.ld_dg < p.S) return "dwconv_gate_backward: ld_dg must be >= S";
  if (p.abc && p.ld_abc < p.S) return "dwconv_gate_backward: ld_abc must be >= S";
  if (p.dabc && p.ld_dabc < p.S) return "dwconv_gate_backward: ld_dabc must be >= S";
  if (!dw_dtype_ok(p.dtype)) return "dwconv_gate_backward: unsupported dtype";
  if (wgrad && p.workspace_bytes < dwconv_gate_backward_workspace_bytes(p))
    return "dwconv_gate_backward: workspace_bytes < dwconv_gate_backward_workspace_bytes(p)";
  const int64_t M = int64_t(p.N) * p.H * p.W;
  if (M == 0 || p.S == 0 || (!p.dabc && !wgrad)) return nullptr;
  if (dw_cdiv(p.S, kDwCB) > 65535) return "dwconv_gate_backward: S too large (grid.y limit: S <= 2097120)";
  const size_t es = dw_esize(p.dtype);
  const int ve = int(16 / es);
  const bool svec = p.S % ve == 0;
  if (p.dabc) {
    bool direct = false;
    DwConvArgs a{};
    a.t = conv_tiling(p.N, p.H, p.W, p.S, p.ksize, &direct);
    if (int64_t(p.N) * a.t.tiles_hw > INT32_MAX) return "dwconv_gate_backward: N*H*W too large for the grid";
    a.in = p.dg; a.ld_in = p.ld_dg; a.w = p.w_dw; a.b = nullptr;
    a.pwa = nullptr; a.ld_pwa = 0; a.n_pwa = 0; a.scale = p.scale; a.out = p.dabc; a.ld_out = p.ld_dabc;
    a.vin = svec && vec_ok(p.dg, p.ld_dg, es);
    a.vout = svec && vec_ok(p.dabc, p.ld_dabc, es);
    const char* err = p.dtype == DType::kFloat16    ? launch_conv<E16<false>>(a, direct, true, stream)
                      : p.dtype == DType::kBFloat16 ? launch_conv<E16<true>>(a, direct, true, stream)
                                                    : launch_conv<EF32>(a, direct, true, stream);
    if (err) return err;
  }
  if (!wgrad) return nullptr;
  const WgradPlan plan = wgrad_plan(p.N, p.H, p.W, p.S, p.ksize);
  DwWgradArgs a{};
  a.t = plan.t; a.dg = p.dg; a.ld_dg = p.ld_dg; a.abc = p.dw_dw ? p.abc : nullptr; a.ld_abc = p.ld_abc;
  a.ws = p.workspace; a.ntiles = plan.ntiles; a.tps = plan.tps; a.nslots = plan.nslots;
  a.vdg = svec && vec_ok(p.dg, p.ld_dg, es);
  a.vabc = svec && vec_ok(a.abc, p.ld_abc, es);
  const char* err = p.dtype == DType::kFloat16    ? launch_wgrad<E16<false>>(a, plan.direct, stream)
                    : p.dtype == DType::kBFloat16 ? launch_wgrad<E16<true>>(a, plan.direct, stream)
                                                  : launch_wgrad<EF32>(a, plan.direct, stream);
  if (err) return err;
  const DwReduceArgs r{p.workspace, p.dw_dw, p.db_dw, p.ksize, p.S, plan.nslots, p.scale};
  const int64_t threads = int64_t(plan.ncb) * (int64_t(p.ksize) * p.ksize + 1) * kDwCB;
  return launch_grid(&dwconv_reduce_kernel, dim3(unsigned(dw_cdiv(threads, kDwThreads))), kDwThreads, stream, r);
}

}  // namespace resfuse

#endif  // __CUDACC__ || RESFUSE_CUDA_EMULATE
