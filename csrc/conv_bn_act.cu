// Fused conv2d -> BatchNorm(eval) -> (+ residual | + projection shortcut) -> activation, one CUDA kernel.
//
// Formula (n image, p/q output row/col, k output channel; fp32 accumulation, one rounding to dtype):
//   acc[m,k]  = sum_{r,s,c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, c] * w[k,r,s,c]   (zero padding)
//   scale[k]  = bn_weight[k] / sqrt(bn_var[k] + eps)          (bn_weight null => 1; no BN => 1)
//   shift[k]  = bn_bias[k] + (bias[k] - bn_mean[k]) * scale[k] (nulls => 0; no BN => bias[k])
//   y         = acc*scale + shift
//             [+ acc_d*scale_d + shift_d,  acc_d[m,k] = sum_c xs[n, p*sd_h, q*sd_w, c] * wd[k,c]]
//             [+ residual[n,p,q,k]]
//   out       = act(y)   act: 0 identity, 1 relu, 2 relu6, 3 silu, 4 gelu(erf), 5 leaky_relu(negative_slope),
//                        6 hardswish, 7 hardsigmoid, 8 gelu(tanh); NaN propagates.
// The BN fold is computed in the epilogue from the live BN vectors at every launch (no folded
// weight copy exists). Layouts: x NHWC, w KRSC, out/residual NHWC (N,P,Q,K), xs NHWC, wd (K,Cs),
// all contiguous; out offset = m*K + k with m = (n*P + p)*Q + q.
//
// Implicit GEMM: M = N*P*Q output pixels, N_gemm = K, reduction = R*S*C ordered (r, s) outer and
// c inner, tiled by BK = 64 bytes of channels (32 fp16/bf16, 16 fp32). The projection shortcut is
// a second 1x1/stride-sd implicit GEMM over xs (same loader, R = S = 1, pad 0) into a second
// accumulator, so acc and acc_d get their own BN scale in the epilogue (no pre-scaled weights).
//
// Tiles: CTA 128 (M) x 64 (K) x 64 bytes (reduction), 3-stage cp.async pipeline in static shared
//   memory: 3 * (128 + 64) rows * 80 B (64 B of data + 16 B pad, which makes the 32-bit fragment
//   loads bank-conflict free) = 46080 B.
//   plain:      4 warps (2 x 2), warp tile 64 x 32 -> 4 x 4 mma tiles, 64 fp32 accumulators/thread.
//   projection: 8 warps (4 x 2), warp tile 32 x 32 -> 2 x 4 mma tiles, 2 x 32 accumulators/thread.
// MMA (mma.sync, sm_80 and sm_90 SASS HMMA):
//   fp16: m16n8k16.f32.f16.f16.f32      bf16: m16n8k16.f32.bf16.bf16.f32
//   fp32 + allow_tf32: m16n8k8.f32.tf32.tf32.f32, operands cvt.rna to tf32
//   fp32, !allow_tf32: 3xTF32 (big/small split, 3 m16n8k8 per tile step; ~fp32 accuracy)
// Loads: 16-byte cp.async (A with .ca: the R*S window reuse hits L1; B with .cg) zero-filled
//   when masked, if C % (16/sizeof) == 0 and the pointers are 16-byte aligned; else element-wise
//   masked loads stored to shared memory (same pipeline, loads not overlapped). Masks: M tail,
//   K tail, C tail, padding (ih/iw outside the image).
// Offsets: element offsets are int64 everywhere they scale with tensor size (m, image base,
//   (ih*W+iw)*C, n*R*S*C, m*K), so N*P*Q up to 2^31 and tensors > 2^31 elements are addressed.
//
// Bytes per output pixel (element size e):
//   x:        R*S*C*e requested per pixel per K tile, served by L1/L2 (the im2col window overlaps);
//             HBM ~ C*e*sh*sw (x read once) when the tile rows stay cached; L2 re-reads x once per
//             K tile (ceil(K/64) times).
//   weights:  one 64 x R*S*C tile per CTA: 64*R*S*C*e / 128 = R*S*C*e/2 per pixel per K tile
//             (L2-resident across CTAs; blockIdx.x walks M so consecutive CTAs share it).
//   residual: K*e read;  out: K*e written (once, rounded once);  BN vectors: 5*4 B per channel
//             per CTA. Projection: + Cs*e (xs) per pixel per K tile and Cs*e/2 (wd) per pixel.
//
// Why hand-written (inline PTX mma.sync, not CUTLASS/CuTe): one epilogue has to apply a
// per-channel BN fold computed live from five optional vectors, optionally add a *second*
// accumulator (the projection shortcut, its own BN fold, a different A tensor and reduction
// length), a residual and one of five activations. CUTLASS 2.x conv epilogues take scalar
// alpha/beta (per-channel needs a custom epilogue functor + a second implicit GEMM pass or a
// dual-GEMM kernel that exists only for GEMM), its analytic iterators for C % 8 != 0 and the
// 3xTF32 conv variants each add instantiations that would blow the 2-core build budget, and the
// fragment layouts needed here are the four documented mma.sync layouts, checked against CuTe's
// MMA_Traits (SM80_16x8x16_F32F16F16F32_TN, SM80_16x8x8_F32TF32TF32F32_TN). The whole file is
// 8 kernels; see csrc/README.md for the ptxas table (registers, smem, 0 spills) and SASS check.
// The tile constants, the global->shared loader (TileLoader, its ConvGeom with the pixel row
// stride ld = C here), the stage MMA and the cp.async main loop live in csrc/mma_pipeline.cuh,
// shared with the 1x1 pixel GEMM of csrc/gnconv_gemm.cu; this file keeps the conv geometry, the
// epilogue, the launcher validation and the host self-test.
//
// Host self-test of the epilogue math (no GPU needed), see csrc/README.md:
//   g++ -std=c++17 -x c++ -DRESFUSE_CONV_BN_ACT_SELFTEST -I/usr/local/cuda-13.0/include
//       csrc/conv_bn_act.cu -o /tmp/conv_bn_act_selftest && /tmp/conv_bn_act_selftest

#include "conv_bn_act.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define RF_HD __host__ __device__ __forceinline__
#else
#define RF_HD inline
#endif

namespace resfuse {
namespace detail {

// ----------------------------------------------------------------------------------------------
// Epilogue math: host + device, so the host self-test runs exactly this code.
// ----------------------------------------------------------------------------------------------

// The ids are resfuse.activations.ACTIVATIONS[name].triton_id.
enum : int {
  kActIdentity = 0, kActRelu = 1, kActRelu6 = 2, kActSilu = 3, kActGelu = 4,
  kActLeakyRelu = 5, kActHardswish = 6, kActHardsigmoid = 7, kActGeluTanh = 8, kActCount = 9
};

// Comparisons written so that NaN falls through unchanged (as eager's relu/hardtanh do).
RF_HD float clamp06(float v) { return v < 0.f ? 0.f : (v > 6.f ? 6.f : v); }

RF_HD float apply_activation(float v, int act, float negative_slope) {
  switch (act) {
    case kActRelu: return v < 0.f ? 0.f : v;
    case kActRelu6: return clamp06(v);
    case kActSilu: return v / (1.f + expf(-v));  // ATen's silu formula
    case kActGelu: return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
    case kActLeakyRelu: return v < 0.f ? v * negative_slope : v;
    case kActHardswish: return v * clamp06(v + 3.f) / 6.f;
    case kActHardsigmoid: return clamp06(v + 3.f) / 6.f;
    case kActGeluTanh: return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    default: return v;
  }
}

// BN(conv + bias) = conv * scale + shift for channel k, from the live vectors (mean == nullptr:
// no BN, scale = 1, shift = bias).
RF_HD void bn_fold(const float* bias, const float* mean, const float* var, const float* gamma,
                   const float* beta, float eps, int k, float& scale, float& shift) {
  const float b = bias ? bias[k] : 0.f;
  if (!mean) {
    scale = 1.f;
    shift = b;
    return;
  }
  float s = 1.f / sqrtf(var[k] + eps);
  if (gamma) s *= gamma[k];
  scale = s;
  shift = (b - mean[k]) * s + (beta ? beta[k] : 0.f);
}

// One output value before rounding: proj = acc_d*scale_d + shift_d (0 without projection),
// res = residual (0 without).
RF_HD float epilogue_value(float acc, float scale, float shift, float proj, float res, int act,
                           float negative_slope) {
  return apply_activation(acc * scale + shift + proj + res, act, negative_slope);
}

}  // namespace detail
}  // namespace resfuse

#if defined(__CUDACC__) || defined(RESFUSE_CUDA_EMULATE)

#include "mma_pipeline.cuh"

namespace resfuse {
namespace detail {

// Tile constants, ConvGeom, TileLoader, compute_stage and mainloop: csrc/mma_pipeline.cuh.
// plain: 2 x 2 warps (warp tile 64 x 32); projection: 4 x 2 warps (32 x 32, two accumulators).
template <bool kProj>
using WarpLayout = WarpTiling<kProj ? 4 : 2, 2>;

// ----------------------------------------------------------------------------------------------
// Kernel arguments (built by the host launcher from ConvBNActParams).
// ----------------------------------------------------------------------------------------------

struct KernelArgs {
  ConvGeom main, proj;
  int64_t M;  // N*P*Q
  int K, P, Q;
  bool pair_ok;  // K even and out/residual aligned to 2 elements: paired epilogue stores
  const float *bias, *mean, *var, *gamma, *beta;
  float eps;
  const float *bias_d, *mean_d, *var_d, *gamma_d, *beta_d;
  float eps_d;
  const void* residual;
  void* out;
  int act;
  float negative_slope;
};

template <class Math, bool kProj>
__global__ void __launch_bounds__(WarpLayout<kProj>::kThreads)
    conv_bn_act_kernel(const KernelArgs args) {
  using L = WarpLayout<kProj>;
  using Elem = typename Math::Elem;
  constexpr int MI = L::kMI, NI = L::kNI;
  RF_SHARED_BUFFER(smem, kSmemBytes);

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m0 = (warp % L::kWarpsM) * L::kWM;
  const int warp_n0 = (warp / L::kWarpsM) * L::kWN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;

  float acc[MI][NI][4];
  zero_acc(acc);
  {
    TileLoader<Elem, L::kThreads> ld;
    ld.init(args.main, m0, n0, args.M, args.K, args.P, args.Q, tid);
    mainloop<Math>(ld, args.main.tiles, acc, smem, warp_m0, warp_n0, lane);
  }

  float acc_d[kProj ? MI : 1][kProj ? NI : 1][4];
  if constexpr (kProj) {
    zero_acc(acc_d);
    TileLoader<Elem, L::kThreads> ld;
    ld.init(args.proj, m0, n0, args.M, args.K, args.P, args.Q, tid);
    mainloop<Math>(ld, args.proj.tiles, acc_d, smem, warp_m0, warp_n0, lane);
  }

  // ---- epilogue: accumulator (mi, ni, 2h+j) is pixel m0+warp_m0+mi*16+g+8h, channel
  //      n0+warp_n0+ni*8+2t+j (the m16n8 C layout). Columns past K read channel K-1's vectors
  //      (never stored).
  const int K = args.K;
  const int g = lane >> 2, t = lane & 3;
  float sc[NI][2], sh[NI][2], scd[NI][2], shd[NI][2];
#pragma unroll
  for (int ni = 0; ni < NI; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int kc = n0 + warp_n0 + ni * 8 + 2 * t + j;
      const int k = kc < K ? kc : K - 1;
      bn_fold(args.bias, args.mean, args.var, args.gamma, args.beta, args.eps, k, sc[ni][j], sh[ni][j]);
      scd[ni][j] = 0.f;
      shd[ni][j] = 0.f;
      if constexpr (kProj)
        bn_fold(args.bias_d, args.mean_d, args.var_d, args.gamma_d, args.beta_d, args.eps_d, k, scd[ni][j],
                shd[ni][j]);
    }

  const void* res = args.residual;
  Elem* out = static_cast<Elem*>(args.out);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + warp_m0 + mi * 16 + g + 8 * h;
      if (m >= args.M) continue;
      const int64_t row = m * K;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int k = n0 + warp_n0 + ni * 8 + 2 * t;
        if (k >= K) continue;
        const int64_t off = row + k;
        // pair_ok: K even and k even => k + 1 < K and off is 2-element aligned.
        float r[2] = {0.f, 0.f};
        if (res) {
          const Elem* rp = static_cast<const Elem*>(res) + off;
          if (args.pair_ok) {
            if constexpr (sizeof(Elem) == 2) {
              const uint32_t rr = ldg(reinterpret_cast<const uint32_t*>(rp));
              r[0] = Math::to_float(static_cast<Elem>(rr & 0xffffu));
              r[1] = Math::to_float(static_cast<Elem>(rr >> 16));
            } else {
              const uint2 rr = ldg(reinterpret_cast<const uint2*>(rp));
              r[0] = Math::to_float(rr.x);
              r[1] = Math::to_float(rr.y);
            }
          } else {
            r[0] = Math::to_float(ldg(rp));
            if (k + 1 < K) r[1] = Math::to_float(ldg(rp + 1));
          }
        }
        Elem o[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float proj = 0.f;
          if constexpr (kProj) proj = acc_d[mi][ni][2 * h + j] * scd[ni][j] + shd[ni][j];
          o[j] = Math::from_float(epilogue_value(acc[mi][ni][2 * h + j], sc[ni][j], sh[ni][j], proj, r[j], args.act,
                                                      args.negative_slope));
        }
        if (args.pair_ok) {
          if constexpr (sizeof(Elem) == 2) {
            *reinterpret_cast<uint32_t*>(out + off) = uint32_t(o[0]) | (uint32_t(o[1]) << 16);
          } else {
            *reinterpret_cast<uint2*>(out + off) = make_uint2(o[0], o[1]);
          }
        } else {
          out[off] = o[0];
          if (k + 1 < K) out[off + 1] = o[1];
        }
      }
    }
}

// ----------------------------------------------------------------------------------------------
// Host side.
// ----------------------------------------------------------------------------------------------
template <class Math, bool kProj>
const char* launch_kernel(const KernelArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.M + kBM - 1) / kBM), static_cast<unsigned>((a.K + kBN - 1) / kBN));
  return launch_grid(&conv_bn_act_kernel<Math, kProj>, grid, WarpLayout<kProj>::kThreads, stream, a);
}

template <class Math>
const char* launch_math(const KernelArgs& a, bool proj, cudaStream_t stream) {
  return proj ? launch_kernel<Math, true>(a, stream) : launch_kernel<Math, false>(a, stream);
}

inline bool aligned(const void* p, size_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// conv2d output size; -1 when the kernel does not fit in the padded input.
inline int64_t conv_out(int64_t in, int64_t pad, int64_t dil, int64_t ker, int64_t stride) {
  const int64_t span = in + 2 * pad - dil * (ker - 1) - 1;
  return span < 0 ? -1 : span / stride + 1;
}

}  // namespace detail

const char* conv_bn_act_launch(const ConvBNActParams& p, cudaStream_t stream) {
  using namespace detail;
  if (!p.x || !p.weight || !p.out) return "conv_bn_act: x, weight and out must be non-null";
  if (p.N < 0 || p.H < 0 || p.W < 0 || p.C < 0 || p.K < 0 || p.P < 0 || p.Q < 0)
    return "conv_bn_act: N, H, W, C, K, P, Q must be >= 0";
  if (p.R < 1 || p.S < 1) return "conv_bn_act: R and S must be >= 1";
  if (p.stride_h < 1 || p.stride_w < 1 || p.dil_h < 1 || p.dil_w < 1)
    return "conv_bn_act: stride and dilation must be >= 1";
  if (p.pad_h < 0 || p.pad_w < 0) return "conv_bn_act: padding must be >= 0";
  if (int64_t(p.H) + 2 * int64_t(p.pad_h) > INT32_MAX || int64_t(p.W) + 2 * int64_t(p.pad_w) > INT32_MAX)
    return "conv_bn_act: H + 2*pad_h and W + 2*pad_w must fit in int32";
  if (p.activation < 0 || p.activation >= kActCount) return "conv_bn_act: activation must be in 0..8";
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "conv_bn_act: unsupported dtype";
  if (p.bn_mean && !p.bn_var) return "conv_bn_act: bn_var must be given with bn_mean";
  const int64_t M = int64_t(p.N) * p.P * p.Q;
  if (M > 0 && (p.P != conv_out(p.H, p.pad_h, p.dil_h, p.R, p.stride_h) ||
                p.Q != conv_out(p.W, p.pad_w, p.dil_w, p.S, p.stride_w)))
    return "conv_bn_act: P, Q do not match conv2d's output size for H, W, R, S, stride, padding, dilation";
  const bool proj = p.xs != nullptr;
  if (proj) {
    if (!p.wd) return "conv_bn_act: wd must be given with xs";
    if (p.mean_d && !p.var_d) return "conv_bn_act: var_d must be given with mean_d";
    if (p.Hs < 1 || p.Ws < 1 || p.Cs < 0 || p.sd_h < 1 || p.sd_w < 1)
      return "conv_bn_act: projection needs Hs, Ws, sd_h, sd_w >= 1 and Cs >= 0";
    if (M > 0 && (int64_t(p.P - 1) * p.sd_h >= p.Hs || int64_t(p.Q - 1) * p.sd_w >= p.Ws))
      return "conv_bn_act: projection reads outside xs ((P-1)*sd_h >= Hs or (Q-1)*sd_w >= Ws)";
  }
  if (M == 0 || p.K == 0) return nullptr;
  if (ceil_div(p.K, kBN) > 65535) return "conv_bn_act: K too large (grid.y limit: K <= 4194240)";
  if (ceil_div(M, kBM) > INT32_MAX) return "conv_bn_act: N*P*Q too large for the grid";

  const size_t esize = p.dtype == DType::kFloat32 ? 4 : 2;
  const int ve = static_cast<int>(16 / esize);
  const int bk = static_cast<int>(kRowBytes / esize);

  KernelArgs a{};
  a.main.x = p.x; a.main.w = p.weight;
  a.main.H = p.H; a.main.W = p.W; a.main.C = p.C; a.main.R = p.R; a.main.S = p.S;
  a.main.sh = p.stride_h; a.main.sw = p.stride_w; a.main.ph = p.pad_h; a.main.pw = p.pad_w;
  a.main.dh = p.dil_h; a.main.dw = p.dil_w; a.main.ld = p.C;
  const int64_t tiles = int64_t(p.R) * p.S * ceil_div(p.C, bk);
  if (tiles > INT32_MAX) return "conv_bn_act: R*S*C too large";
  a.main.tiles = static_cast<int>(tiles);
  a.main.vec = p.C % ve == 0 && aligned(p.x, 16) && aligned(p.weight, 16);
  if (proj) {
    a.proj.x = p.xs; a.proj.w = p.wd;
    a.proj.H = p.Hs; a.proj.W = p.Ws; a.proj.C = p.Cs; a.proj.R = 1; a.proj.S = 1;
    a.proj.sh = p.sd_h; a.proj.sw = p.sd_w; a.proj.ph = 0; a.proj.pw = 0; a.proj.dh = 1; a.proj.dw = 1;
    a.proj.ld = p.Cs;
    a.proj.tiles = static_cast<int>(ceil_div(p.Cs, bk));
    a.proj.vec = p.Cs % ve == 0 && aligned(p.xs, 16) && aligned(p.wd, 16);
  }
  a.M = M; a.K = p.K; a.P = p.P; a.Q = p.Q;
  a.pair_ok = p.K % 2 == 0 && aligned(p.out, 2 * esize) && (!p.residual || aligned(p.residual, 2 * esize));
  a.bias = p.bias; a.mean = p.bn_mean; a.var = p.bn_var; a.gamma = p.bn_weight; a.beta = p.bn_bias; a.eps = p.eps;
  a.bias_d = p.bias_d; a.mean_d = p.mean_d; a.var_d = p.var_d; a.gamma_d = p.gamma_d; a.beta_d = p.beta_d;
  a.eps_d = p.eps_d;
  a.residual = p.residual; a.out = p.out; a.act = p.activation;
  a.negative_slope = p.negative_slope;

  switch (p.dtype) {
    case DType::kFloat16: return launch_math<Math16<false>>(a, proj, stream);
    case DType::kBFloat16: return launch_math<Math16<true>>(a, proj, stream);
    default:
      return p.allow_tf32 ? launch_math<MathF32<false>>(a, proj, stream) : launch_math<MathF32<true>>(a, proj, stream);
  }
}

}  // namespace resfuse

#endif  // __CUDACC__ || RESFUSE_CUDA_EMULATE

#if defined(RESFUSE_CONV_BN_ACT_SELFTEST) && !defined(__CUDACC__)
// Host check of the epilogue math against double-precision formulas, including NaN/Inf.
#include <cstdio>
// float64 forms of the activations, as ATen writes them (leaky_relu: x > 0 ? x : x * slope).
static const char* const kActName[] = {"identity", "relu", "relu6", "silu", "gelu",
                                       "leaky_relu", "hardswish", "hardsigmoid", "gelu_tanh"};
static const double kSlope = -0.37;  // any slope; a negative one also flips the sign
static double clamp06_ref(double v) { return std::isnan(v) ? v : std::min(std::max(v, 0.0), 6.0); }
static double act_ref(double v, int act) {
  switch (act) {
    case 1: return std::isnan(v) ? v : (v < 0 ? 0 : v);
    case 2: return clamp06_ref(v);
    case 3: return v / (1 + std::exp(-v));
    case 4: return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
    case 5: return v > 0 ? v : v * kSlope;
    case 6: return v * clamp06_ref(v + 3) / 6;
    case 7: return clamp06_ref(v + 3) / 6;
    case 8: return 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    default: return v;
  }
}

int main() {
  using namespace resfuse::detail;
  int fails = 0;
  auto check = [&](const char* what, double got, double want, double tol) {
    const bool ok = (std::isnan(want) && std::isnan(got)) || (std::isinf(want) && got == want) ||
                    std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
    if (!ok) {
      std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
      ++fails;
    }
  };
  const double nan = NAN, inf = INFINITY;
  const double vals[] = {-7.5, -6.0, -1.0, -1e-3, -0.0, 0.0, 1e-3, 0.5, 5.9, 6.0, 6.5, 40.0, -100.0, nan, inf, -inf};
  for (double v0 : vals) {
    const double v = double(float(v0));  // the value the float path sees
    for (int act = 0; act < kActCount; ++act)
      check(kActName[act], apply_activation(float(v), act, float(kSlope)), act_ref(v, act), act == 0 ? 0 : 1e-6);
  }
  // BN fold with every optional vector present / absent, checked through epilogue_value.
  const float bias[2] = {0.25f, -1.5f}, mean[2] = {0.1f, -0.3f}, var[2] = {2.0f, 0.01f};
  const float gamma[2] = {1.5f, -0.7f}, beta[2] = {-0.2f, 0.9f};
  const float eps = 1e-5f;
  for (int k = 0; k < 2; ++k)
    for (int mask = 0; mask < 16; ++mask) {
      const bool hb = mask & 1, hbn = mask & 2, hg = mask & 4, hbe = mask & 8;
      float sc, shf;
      bn_fold(hb ? bias : nullptr, hbn ? mean : nullptr, var, hg ? gamma : nullptr, hbe ? beta : nullptr, eps, k, sc,
              shf);
      const double acc = 3.25, res = -0.5, proj = 0.75;
      double y = acc + (hb ? bias[k] : 0.0);
      if (hbn) y = (y - mean[k]) / std::sqrt(double(var[k]) + eps) * (hg ? gamma[k] : 1.0) + (hbe ? beta[k] : 0.0);
      for (int act = 0; act < kActCount; ++act)
        check("bn_fold+epilogue",
              epilogue_value(float(acc), sc, shf, float(proj), float(res), act, float(kSlope)),
              act_ref(y + proj + res, act), 2e-6);
    }
  // NaN accumulator / residual propagate through every activation.
  for (int act = 0; act < kActCount; ++act) {
    check("nan acc", epilogue_value(float(nan), 1.f, 0.f, 0.f, 0.f, act, 0.1f), nan, 0);
    check("nan res", epilogue_value(1.f, 1.f, 0.f, 0.f, float(nan), act, 0.1f), nan, 0);
  }
  check("inf acc relu", epilogue_value(float(inf), 2.f, 1.f, 0.f, 0.f, 1, 0.f), inf, 0);
  if (fails) std::printf("conv_bn_act epilogue self-test: %d FAILED\n", fails);
  else std::printf("conv_bn_act epilogue self-test: ok\n");
  return fails ? 1 : 0;
}
#endif
