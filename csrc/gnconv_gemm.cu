// pixel_gemm: a 1x1 convolution as a GEMM over pixels on tensor cores (mma.sync), with a LayerNorm
// or GELU prologue on A and gate / scale / residual / aux epilogues. The contract (formula, nulls,
// aliasing) is csrc/gnconv.h's PixelGemmParams; in short (m pixel, n output channel, k < K):
//   a'[m,k]  = a[m*lda+k] | LN: (a - mean_m) * rstd_m * nw[k] + nb[k] | GELU: gelu(a)  (fp32 math,
//              rounded to dtype once before the MMA, as eager/Triton do)
//   acc[m,n] = sum_k a'[m,k] * w[n*K+k]          (fp32 accumulation)
//   z        = acc + bias[n]
//   out[m*ld_out+n]  = round(z * mul'[m,n] * col_scale[n] * row_scale[m/HW] + residual[m*ld_res+n])
//                      mul' = mul[m*ld_mul+n] or gelu'(mul) (mul_gelu_grad; Phi(h) + h*phi(h))
//   aux_out[m*ld_aux+n] = round(z * aux_mul[m*ld_aux_mul+n])
// One rounding to dtype per output. Layouts: activations channels_last rows (t[m*ld + c], ld >= C:
// a channel slice of a wider tensor is addressed in place), w (Nout, K) contiguous, fp32 vectors
// contiguous. out may alias mul and aux_out aux_mul (each element's gate is loaded by the thread
// that stores it, before the store, with a coherent load; never __ldg/.nc).
//
// GEMM: M pixels x Nout channels x K reduction, the 1x1/stride-1 case of conv_bn_act's implicit
// GEMM (the shared pipeline, csrc/mma_pipeline.cuh, with one pixel per "image" and the row stride
// ld = lda). Tiles: CTA 128 (M) x 64 (Nout) x 64 bytes of K per stage (32 fp16/bf16, 16 fp32),
// 4 warps (2 x 2), warp tile 64 x 32 -> 4 x 4 mma tiles, 64 fp32 accumulators per thread.
// Grid (ceil(M/128), ceil(Nout/64)): blockIdx.x walks M so consecutive CTAs share the weight tile.
// MMA: fp16 m16n8k16.f32.f16.f16.f32, bf16 m16n8k16.f32.bf16.bf16.f32, fp32 + allow_tf32
// m16n8k8.tf32 (cvt.rna), fp32 !allow_tf32 3xTF32 (mma_math.cuh's policies, as conv_bn_act).
// Pipeline: 3-stage cp.async (16-byte, zero-filled when masked) when K % (16/e) == 0,
// lda % (16/e) == 0 and a, w are 16-byte aligned; element-wise masked loads otherwise. Static
// smem 3 x 192 rows x 80 B = 46080 B (+ 1024 B of LayerNorm row stats).
// Prologue (templated, compiled away for kNone):
//   LayerNorm: before the main loop each CTA computes mean and rstd of its 128 rows over all K
//     channels, two passes in fp32 (sum -> mean, then sum (x - mean)^2 -> rstd = 1/sqrt(var+eps)),
//     4 threads per row (16-byte loads when vec), partials reduced in a fixed order through smem;
//     stats stay in smem. Then each A stage, once landed (cp.async wait + barrier), is normalised
//     in place in smem (fp32 math, rounded to dtype), a barrier publishes it, the warps MMA it.
//     Channels >= K and rows >= M stay 0. A NaN/Inf in a row makes its mean/var NaN: the whole
//     row's output is NaN, as eager LayerNorm.
//   GELU: the same per-stage in-smem transform with the exact erf GELU (gelu(0) = 0: masks hold).
// Epilogue: per-channel bias / col_scale (fp32, read once per thread), row_scale per row, mul /
//   residual / aux_mul reads and out / aux_out stores of adjacent channel pairs (n, n+1) as one
//   32-bit (16-bit types) or 64-bit (fp32) access when Nout, every ld and every pointer involved
//   are 2-element aligned; element-wise otherwise. int64 offsets for everything that scales with M.
//
// Bytes per pixel (element size e; D = dim, dims[i] = gnconv's stage widths, all per pass over M):
//   proj_in (LN prologue, Nout = 2D): reads C*e of x (+ two L1/L2 passes of the CTA's rows for the
//     stats, and L2 re-reads of x once per N tile, ceil(2D/64) tiles), writes 2D*e.
//   stage i (gate, in place): reads dims[i-1]*e (x_{i-1}, a slice) + dims[i]*e (gate g_i),
//     writes dims[i]*e (x_i over g_i).
//   proj_out (row_scale, col_scale, residual): reads D*e + D*e (residual), writes D*e.
//   MLP pwconv1 / pwconv2 (GELU prologue on pwconv2's input): reads K*e, writes Nout*e.
//   data gradients: reads K*e (+ Nout*e per mul / aux_mul), writes Nout*e (+ Nout*e aux_out).
//   weights: one 64 x K tile per CTA = K*e/2 per pixel per N tile, L2-resident (read from HBM
//   once); fp32 vectors once per thread.
//
// Why hand-written (inline PTX mma.sync, not CUTLASS/cuBLAS), the same reason as conv_bn_act: the
// epilogue needs per-channel (bias, col_scale) and per-row (row_scale[m/HW]) factors, a gate
// read in place over the output, a second output (aux_out = z * aux_mul) from the same
// accumulator and a residual, each with its own row stride; the prologue normalises A in shared
// memory between the cp.async landing and the MMA, which no library GEMM exposes (cuBLASLt's
// epilogues are per-column only; CUTLASS would need a custom mainloop for the smem transform and
// a custom epilogue visitor, per dtype and for 3xTF32, beyond the 2-core build budget).
//
// Kernels: 4 math modes x 3 prologues = 12, 128 threads each. ptxas (nvcc 13.0, -O3,
// -Xptxas=-v,-warn-spills,-Werror), registers sm_80 | sm_90, 0 spill bytes and 0 stack in all 24:
//   prologue    fp16 / bf16   TF32        3xTF32      static smem
//   none        144 | 124     128 | 121   198 | 197   46080 B
//   GELU        146 | 128     130 | 121   198 | 194   46080 B
//   LayerNorm   150 | 152 (*) 136 | 128   194 | 198   47104 B
//   (*) __launch_bounds__(128, 3): left to its occupancy heuristic ptxas aims at 4 CTAs/SM (128
//   registers) for fp16/bf16 + LayerNorm and spills. Not yet run on a GPU; CPU emulation:
//   tests/csrc_emu/emu_gemm.cpp (tests/test_csrc_gnconv_gemm_emulation.py).

#include "gnconv.h"

#include <cstdint>

#if defined(__CUDACC__) || defined(RESFUSE_CUDA_EMULATE)

#include <cmath>

#include "mma_pipeline.cuh"

namespace resfuse {
namespace detail {
namespace pgemm {

using Warps = WarpTiling<2, 2>;  // 128 threads, warp tile 64 x 32
constexpr int kThreads = Warps::kThreads;
constexpr int kStatsBytes = 2 * kBM * 4;  // LayerNorm mean[kBM], rstd[kBM]
static_assert(kThreads == kBM, "one thread per CTA row in the LayerNorm stats reduction");
static_assert(kSmemBytes + kStatsBytes <= 48 * 1024, "static shared memory limit");

struct Args {
  ConvGeom geom;  // a / w, H = W = R = S = 1, C = K, ld = lda
  int64_t M;
  int K, Nout;
  const float* bias;
  const float* nw;
  const float* nb;
  float eps;
  const void* mul; int64_t ld_mul; bool mul_gelu_grad;
  const float* col_scale;
  const float* row_scale; int64_t HW;
  const void* residual; int64_t ld_res;
  void* out; int64_t ld_out;
  void* aux_out; int64_t ld_aux;
  const void* aux_mul; int64_t ld_aux_mul;
  bool pair_ok;  // every epilogue tensor: Nout, ld and pointer 2-element aligned
};

__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.7071067811865476f)); }
// d gelu / dh = Phi(h) + h * phi(h)
__device__ __forceinline__ float gelu_grad(float h) {
  return 0.5f * (1.f + erff(h * 0.7071067811865476f)) + h * (0.3989422804014327f * expf(-0.5f * h * h));
}

// 16 bytes of smem / global <-> kVE floats.
template <class Math>
struct Vec16 {
  static constexpr int kVE = 16 / sizeof(typename Math::Elem);
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[kVE]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (kVE == 8) {
        f[2 * i] = Math::to_float(static_cast<uint16_t>(w[i] & 0xffffu));
        f[2 * i + 1] = Math::to_float(static_cast<uint16_t>(w[i] >> 16));
      } else {
        f[i] = Math::to_float(w[i]);
      }
    }
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[kVE]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (kVE == 8) {
        w[i] = uint32_t(Math::from_float(f[2 * i])) | (uint32_t(Math::from_float(f[2 * i + 1])) << 16);
      } else {
        w[i] = Math::from_float(f[i]);
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// LayerNorm row statistics of rows m0..m0+kBM-1 into stats[0..kBM) (mean), stats[kBM..2kBM)
// (rstd). Thread (row0 = tid/4 + 32 i, chunk = tid%4) sums its 16-byte chunks (or elements) of
// the row; part (kBM x 4 floats, aliasing the pipeline's stage 0, free before the main loop)
// holds the partials, thread tid adds row tid's four in order. Ends with a barrier, after which
// part is dead and stats are visible.
template <class Math>
__device__ __forceinline__ void ln_stats(const Args& a, int64_t m0, float* stats, float* part, int tid) {
  using Elem = typename Math::Elem;
  using V = Vec16<Math>;
  constexpr int kVE = V::kVE;
  const Elem* A = static_cast<const Elem*>(a.geom.x);
  const int row0 = tid >> 2, ch = tid & 3;
  const int K = a.K;
  const float inv_k = K > 0 ? 1.f / static_cast<float>(K) : 0.f;
#pragma unroll 1
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
    for (int i = 0; i < kBM / (kThreads / 4); ++i) {
      const int row = row0 + i * (kThreads / 4);
      const int64_t m = m0 + row;
      float s = 0.f;
      if (m < a.M) {
        const float mean = pass ? stats[row] : 0.f;
        const Elem* rp = A + m * a.geom.ld;
        if (a.geom.vec) {
          for (int c = ch * kVE; c < K; c += 4 * kVE) {
            float f[kVE];
            V::unpack(ldg(reinterpret_cast<const uint4*>(rp + c)), f);
#pragma unroll
            for (int j = 0; j < kVE; ++j) {
              const float d = f[j] - mean;
              s += pass ? d * d : f[j];
            }
          }
        } else {
          for (int c = ch; c < K; c += 4) {
            const float d = Math::to_float(ldg(rp + c)) - mean;
            s += pass ? d * d : d;
          }
        }
      }
      part[row * 4 + ch] = s;
    }
    __syncthreads();
    const float tot = ((part[tid * 4] + part[tid * 4 + 1]) + part[tid * 4 + 2]) + part[tid * 4 + 3];
    if (pass == 0) stats[tid] = tot * inv_k;
    else stats[kBM + tid] = 1.f / sqrtf(tot * inv_k + a.eps);
    __syncthreads();
  }
}

// Per-stage transforms of the landed A tile (mma_pipeline.cuh's mainloop hook). Thread tid owns
// the 16-byte chunk tid%4 of rows tid/4 + 32 i (the loader's mapping), i.e. channels
// kt*kBK + (tid%4)*kVE + j.
template <class Math>
struct LayerNormStage {
  static constexpr bool kActive = true;
  using V = Vec16<Math>;
  static constexpr int kVE = V::kVE;
  static constexpr int kBK = kRowBytes / sizeof(typename Math::Elem);
  const Args& a;        // K, nw, nb read from the kernel parameters (no registers held)
  const float* stats;   // shared memory: mean[kBM], rstd[kBM]
  int rows;             // valid rows of this CTA: min(M - m0, kBM)
  int tid;
  __device__ __forceinline__ void operator()(unsigned char* stage, int kt) const {
    const int row0 = tid >> 2, ch = tid & 3;
    const int c0 = kt * kBK + ch * kVE;
    const int K = a.K;
    const float* nw = a.nw;
    const float* nb = a.nb;
    float w[kVE], b[kVE];
#pragma unroll
    for (int j = 0; j < kVE; ++j) {
      const bool in = c0 + j < K;
      w[j] = in ? (nw ? ldg(nw + c0 + j) : 1.f) : 0.f;
      b[j] = in && nb ? ldg(nb + c0 + j) : 0.f;
    }
#pragma unroll 1  // one row at a time: few live registers beside the accumulators
    for (int i = 0; i < kBM / (kThreads / 4); ++i) {
      const int row = row0 + i * (kThreads / 4);
      if (row >= rows) continue;
      const float mean = stats[row], rstd = stats[kBM + row];
      uint4* p = reinterpret_cast<uint4*>(stage + row * kRowPitch + ch * 16);
      float f[kVE];
      V::unpack(*p, f);
#pragma unroll
      for (int j = 0; j < kVE; ++j) f[j] = c0 + j < K ? (f[j] - mean) * rstd * w[j] + b[j] : 0.f;
      *p = V::pack(f);
    }
  }
};

template <class Math>
struct GeluStage {
  static constexpr bool kActive = true;
  using V = Vec16<Math>;
  static constexpr int kVE = V::kVE;
  int tid;
  __device__ __forceinline__ void operator()(unsigned char* stage, int) const {
    const int row0 = tid >> 2, ch = tid & 3;
#pragma unroll 1
    for (int i = 0; i < kBM / (kThreads / 4); ++i) {
      uint4* p = reinterpret_cast<uint4*>(stage + (row0 + i * (kThreads / 4)) * kRowPitch + ch * 16);
      float f[kVE];
      V::unpack(*p, f);
#pragma unroll
      for (int j = 0; j < kVE; ++j) f[j] = gelu(f[j]);
      *p = V::pack(f);
    }
  }
};

// Epilogue global accesses of the pair (n, n+1) at element offset off: one 2-element access when
// pair (pair_ok), else element-wise (the second only when `second`). kCoherent: a plain load (the
// tensor may alias an output of this kernel: mul, aux_mul), else the read-only path. The emulator
// checks both through its ldg.
template <bool kCoherent, typename T>
__device__ __forceinline__ T load_global(const T* p) {
#if defined(RESFUSE_CUDA_EMULATE)
  return ldg(p);
#else
  if constexpr (kCoherent) return *p;
  else return ldg(p);
#endif
}

template <class Math, bool kCoherent>
__device__ __forceinline__ void load_pair(const void* base, int64_t off, bool pair, bool second, float (&v)[2]) {
  using Elem = typename Math::Elem;
  const Elem* p = static_cast<const Elem*>(base) + off;
  if (pair) {
    if constexpr (sizeof(Elem) == 2) {
      const uint32_t w = load_global<kCoherent>(reinterpret_cast<const uint32_t*>(p));
      v[0] = Math::to_float(static_cast<Elem>(w & 0xffffu));
      v[1] = Math::to_float(static_cast<Elem>(w >> 16));
    } else {
      const uint2 w = load_global<kCoherent>(reinterpret_cast<const uint2*>(p));
      v[0] = Math::to_float(w.x);
      v[1] = Math::to_float(w.y);
    }
  } else {
    v[0] = Math::to_float(load_global<kCoherent>(p));
    if (second) v[1] = Math::to_float(load_global<kCoherent>(p + 1));
  }
}

template <class Math>
__device__ __forceinline__ void store_pair(void* base, int64_t off, bool pair, bool second, const float (&v)[2]) {
  using Elem = typename Math::Elem;
  Elem* p = static_cast<Elem*>(base) + off;
  const Elem o0 = Math::from_float(v[0]), o1 = Math::from_float(v[1]);
  if (pair) {
    if constexpr (sizeof(Elem) == 2) *reinterpret_cast<uint32_t*>(p) = uint32_t(o0) | (uint32_t(o1) << 16);
    else *reinterpret_cast<uint2*>(p) = make_uint2(o0, o1);
  } else {
    p[0] = o0;
    if (second) p[1] = o1;
  }
}

template <class Math, int kPro>
__device__ __forceinline__ void pixel_gemm_body(const Args& args) {
  using Elem = typename Math::Elem;
  constexpr int MI = Warps::kMI, NI = Warps::kNI;
  constexpr bool kLN = kPro == static_cast<int>(Prologue::kLayerNorm);
  RF_SHARED_BUFFER(smem, kSmemBytes + (kLN ? kStatsBytes : 0));

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m0 = (warp % Warps::kWarpsM) * Warps::kWM;
  const int warp_n0 = (warp / Warps::kWarpsM) * Warps::kWN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;

  float acc[MI][NI][4];
  zero_acc(acc);
  {
    TileLoader<Elem, kThreads> ld;
    ld.init(args.geom, m0, n0, args.M, args.Nout, 1, 1, tid);
    if constexpr (kLN) {
      float* stats = reinterpret_cast<float*>(smem + kSmemBytes);
      ln_stats<Math>(args, m0, stats, reinterpret_cast<float*>(smem), tid);
      const int64_t left = args.M - m0;
      const LayerNormStage<Math> tf{args, stats, left < kBM ? static_cast<int>(left) : kBM, tid};
      mainloop<Math>(ld, args.geom.tiles, acc, smem, warp_m0, warp_n0, lane, tf);
    } else if constexpr (kPro == static_cast<int>(Prologue::kGelu)) {
      mainloop<Math>(ld, args.geom.tiles, acc, smem, warp_m0, warp_n0, lane, GeluStage<Math>{tid});
    } else {
      mainloop<Math>(ld, args.geom.tiles, acc, smem, warp_m0, warp_n0, lane);
    }
  }

  // ---- epilogue: accumulator (mi, ni, 2h+j) is pixel m0+warp_m0+mi*16+g+8h, channel
  //      n0+warp_n0+ni*8+2t+j (the m16n8 C layout). Columns past Nout read channel Nout-1's
  //      vectors (never stored).
  const int Nout = args.Nout;
  const int g = lane >> 2, t = lane & 3;
  float bias[NI][2], cscale[NI][2];
#pragma unroll
  for (int ni = 0; ni < NI; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int nc = n0 + warp_n0 + ni * 8 + 2 * t + j;
      const int n = nc < Nout ? nc : Nout - 1;
      bias[ni][j] = args.bias ? ldg(args.bias + n) : 0.f;
      cscale[ni][j] = args.col_scale ? ldg(args.col_scale + n) : 1.f;
    }
  const bool pair = args.pair_ok;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + warp_m0 + mi * 16 + g + 8 * h;
      if (m >= args.M) continue;
      const float rs = args.row_scale ? ldg(args.row_scale + m / args.HW) : 1.f;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int n = n0 + warp_n0 + ni * 8 + 2 * t;
        if (n >= Nout) continue;
        const bool second = n + 1 < Nout;  // pair_ok => Nout even => true
        // All loads (mul, aux_mul may alias out, aux_out) before any store of this pair.
        float mv[2] = {1.f, 1.f}, rv[2] = {0.f, 0.f}, am[2] = {1.f, 1.f};
        if (args.mul) {
          load_pair<Math, true>(args.mul, m * args.ld_mul + n, pair, second, mv);
          if (args.mul_gelu_grad) {
            mv[0] = gelu_grad(mv[0]);
            mv[1] = gelu_grad(mv[1]);
          }
        }
        if (args.residual) load_pair<Math, false>(args.residual, m * args.ld_res + n, pair, second, rv);
        if (args.aux_out && args.aux_mul) load_pair<Math, true>(args.aux_mul, m * args.ld_aux_mul + n, pair, second, am);
        float o[2], ax[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float z = acc[mi][ni][2 * h + j] + bias[ni][j];
          o[j] = z * mv[j] * cscale[ni][j] * rs + rv[j];
          ax[j] = z * am[j];
        }
        store_pair<Math>(args.out, m * args.ld_out + n, pair, second, o);
        if (args.aux_out) store_pair<Math>(args.aux_out, m * args.ld_aux + n, pair, second, ax);
      }
    }
}

template <class Math, int kPro>
__global__ void __launch_bounds__(kThreads) pixel_gemm_kernel(const Args args) {
  pixel_gemm_body<Math, kPro>(args);
}
// fp16/bf16 + LayerNorm: ptxas, left alone, aims at 4 CTAs/SM (128 registers, what the smem
// allows) and spills; asking for 3 CTAs/SM (<= 168 registers) removes the spills.
template <class Math, int kPro>
__global__ void __launch_bounds__(kThreads, 3) pixel_gemm_kernel_3cta(const Args args) {
  pixel_gemm_body<Math, kPro>(args);
}

template <class Math>
const char* launch_math(const Args& a, Prologue pro, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.M + kBM - 1) / kBM), static_cast<unsigned>((a.Nout + kBN - 1) / kBN));
  switch (pro) {
    case Prologue::kLayerNorm:
      if constexpr (sizeof(typename Math::Elem) == 2)
        return launch_grid(&pixel_gemm_kernel_3cta<Math, static_cast<int>(Prologue::kLayerNorm)>, grid, kThreads,
                           stream, a);
      else
        return launch_grid(&pixel_gemm_kernel<Math, static_cast<int>(Prologue::kLayerNorm)>, grid, kThreads, stream,
                           a);
    case Prologue::kGelu:
      return launch_grid(&pixel_gemm_kernel<Math, static_cast<int>(Prologue::kGelu)>, grid, kThreads, stream, a);
    default:
      return launch_grid(&pixel_gemm_kernel<Math, static_cast<int>(Prologue::kNone)>, grid, kThreads, stream, a);
  }
}

inline bool aligned(const void* p, size_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }

}  // namespace pgemm
}  // namespace detail

const char* pixel_gemm_launch(const PixelGemmParams& p, cudaStream_t stream) {
  using namespace detail;
  using pgemm::aligned;
  if (!p.a) return "pixel_gemm: a is null";
  if (!p.w) return "pixel_gemm: w is null";
  if (!p.out) return "pixel_gemm: out is null";
  if (p.M < 0) return "pixel_gemm: M must be >= 0";
  if (p.K < 0) return "pixel_gemm: K must be >= 0";
  if (p.Nout < 0) return "pixel_gemm: Nout must be >= 0";
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "pixel_gemm: unsupported dtype";
  if (p.prologue != Prologue::kNone && p.prologue != Prologue::kLayerNorm && p.prologue != Prologue::kGelu)
    return "pixel_gemm: prologue must be kNone, kLayerNorm or kGelu";
  if (p.prologue == Prologue::kLayerNorm && !(p.eps >= 0.f)) return "pixel_gemm: eps must be >= 0 with kLayerNorm";
  if (p.lda < p.K) return "pixel_gemm: lda must be >= K";
  if (p.ld_out < p.Nout) return "pixel_gemm: ld_out must be >= Nout";
  if (p.mul && p.ld_mul < p.Nout) return "pixel_gemm: ld_mul must be >= Nout";
  if (p.residual && p.ld_res < p.Nout) return "pixel_gemm: ld_res must be >= Nout";
  if (p.aux_out && p.ld_aux < p.Nout) return "pixel_gemm: ld_aux must be >= Nout";
  if (p.aux_out && p.aux_mul && p.ld_aux_mul < p.Nout) return "pixel_gemm: ld_aux_mul must be >= Nout";
  if (p.row_scale && p.HW < 1) return "pixel_gemm: HW must be >= 1 with row_scale";
  if (p.M == 0 || p.Nout == 0) return nullptr;
  if ((p.Nout + kBN - 1) / kBN > 65535) return "pixel_gemm: Nout too large (grid.y limit: Nout <= 4194240)";
  if ((p.M + kBM - 1) / kBM > INT32_MAX) return "pixel_gemm: M too large for the grid";

  const size_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  const int ve = static_cast<int>(16 / es);
  const int bk = static_cast<int>(kRowBytes / es);
  pgemm::Args a{};
  ConvGeom& g = a.geom;
  g.x = p.a; g.w = p.w;
  g.H = 1; g.W = 1; g.C = p.K; g.R = 1; g.S = 1;
  g.sh = 1; g.sw = 1; g.ph = 0; g.pw = 0; g.dh = 1; g.dw = 1;
  g.ld = p.lda;
  g.tiles = (p.K + bk - 1) / bk;
  g.vec = p.K % ve == 0 && p.lda % ve == 0 && aligned(p.a, 16) && aligned(p.w, 16);
  a.M = p.M; a.K = p.K; a.Nout = p.Nout;
  a.bias = p.bias;
  a.nw = p.norm_weight; a.nb = p.norm_bias; a.eps = p.eps;
  a.mul = p.mul; a.ld_mul = p.ld_mul; a.mul_gelu_grad = p.mul_gelu_grad;
  a.col_scale = p.col_scale;
  a.row_scale = p.row_scale; a.HW = p.row_scale ? p.HW : 1;
  a.residual = p.residual; a.ld_res = p.ld_res;
  a.out = p.out; a.ld_out = p.ld_out;
  a.aux_out = p.aux_out; a.ld_aux = p.ld_aux;
  a.aux_mul = p.aux_out ? p.aux_mul : nullptr; a.ld_aux_mul = p.ld_aux_mul;
  auto pairable = [&](const void* ptr, int64_t ld) { return !ptr || (ld % 2 == 0 && aligned(ptr, 2 * es)); };
  a.pair_ok = p.Nout % 2 == 0 && pairable(p.out, p.ld_out) && pairable(a.mul, p.ld_mul) &&
              pairable(p.residual, p.ld_res) && pairable(p.aux_out, p.ld_aux) && pairable(a.aux_mul, p.ld_aux_mul);

  switch (p.dtype) {
    case DType::kFloat16: return pgemm::launch_math<Math16<false>>(a, p.prologue, stream);
    case DType::kBFloat16: return pgemm::launch_math<Math16<true>>(a, p.prologue, stream);
    default:
      return p.allow_tf32 ? pgemm::launch_math<MathF32<false>>(a, p.prologue, stream)
                          : pgemm::launch_math<MathF32<true>>(a, p.prologue, stream);
  }
}

}  // namespace resfuse

#endif  // __CUDACC__ || RESFUSE_CUDA_EMULATE
