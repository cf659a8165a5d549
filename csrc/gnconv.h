// Plain CUDA C++ API of the gnconv / HorBlock kernels (no torch headers; csrc/bindings.cpp binds
// them, resfuse/ops/gnconv_cuda.py composes them into the ops' `cuda` backend).
//
// Layout of every activation here: channels_last rows. A tensor of M = N*H*W pixels and C
// channels is addressed as t[m * ld + c] (ld >= C, in elements; ld > C for a channel slice of a
// wider tensor, e.g. f's abc half), m = (n*H + h)*W + w. Weights are contiguous.
// dtype: one DType for every activation and weight of a call (fp32, fp16, bf16); per-channel
// vectors (biases, scales, LayerNorm affine) are fp32 and contiguous; accumulation is fp32.
// Every launcher returns nullptr on success, else a static error string naming the field; it
// launches nothing (and succeeds) when the problem is empty (M == 0 or an output dim is 0).
//
// Kernels (files):
//   pixel_gemm     (csrc/gnconv_gemm.cu)  1x1 conv as a GEMM over pixels on tensor cores, with a
//                                         LayerNorm or GELU prologue and gate / scale / residual
//                                         epilogues: proj_in, each gated pws stage, proj_out, the
//                                         MLP's pwconv1/pwconv2, and their data gradients.
//   pixel_wgrad    (csrc/gnconv_wgrad.cu) weight (and bias) gradient of a 1x1 conv: a GEMM whose
//                                         reduction runs over pixels, split into per-block fp32
//                                         partials, then one reduction kernel.
//   layernorm_rows_backward (csrc/gnconv_wgrad.cu) the channels-first LayerNorm's backward.
//   dwconv_gate / dwconv_gate_backward (csrc/gnconv_dw.cu) the depthwise kxk conv with the gate
//                                         scale, bias and first gate fused, and its backward.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "conv_bn_act.h"  // resfuse::DType

namespace resfuse {

enum class Prologue : int { kNone = 0, kLayerNorm = 1, kGelu = 2 };

// out = epilogue(prologue(a) @ w^T):
//   a'[m,k]  = a[m*lda + k]                                    (kNone)
//            = (a[m*lda+k] - mean_m) * rstd_m * nw[k] + nb[k]  (kLayerNorm: mean_m, var_m over the K
//              values of row m, population variance, rstd_m = 1/sqrt(var_m + eps), two-pass in fp32;
//              norm_weight / norm_bias nullable = 1 / 0)
//            = 0.5 a (1 + erf(a / sqrt 2))                     (kGelu, exact)
//   acc[m,n] = sum_{k<K} a'[m,k] * w[n*K + k]                   (fp32; w is (Nout, K) contiguous)
//   z        = acc + bias[n]                                    (bias nullable)
//   v        = z * mul'[m,n] * col_scale[n] * row_scale[m / HW]  (each factor optional = 1)
//              mul'[m,n] = mul[m*ld_mul + n], or gelu'(mul[m*ld_mul + n]) when mul_gelu_grad
//              (gelu'(h) = Phi(h) + h*phi(h), exact)
//   out[m*ld_out + n]       = round(v + residual[m*ld_res + n])   (residual nullable)
//   aux_out[m*ld_aux + n]   = round(z * aux_mul[m*ld_aux_mul + n]) (aux_out nullable; aux_mul nullable = 1)
// One rounding to dtype per output. NaN/Inf propagate as in eager (0 * Inf = NaN, etc.).
// out may alias mul (in place: each element's mul is read by the thread that writes it, before
// it writes); aux_out may alias aux_mul the same way; no other aliasing.
// Uses in gnconv (forward): stage i  out = x_i = (W x_{i-1} + b) * g_i  written over g_i (mul = out);
//   proj_out  out = residual + ss[n] * ls * (W x + b)  (row_scale = ss, col_scale = ls);
//   backward recompute  out = x_i, aux_out = z_i (aux_mul null);
//   data gradient  w = W^T (contiguous copy), out = dz_{i-1} = acc * g_{i-1}, aux_out = dg_{i-1} =
//   acc * z_{i-1} (bias null).
struct PixelGemmParams {
  const void* a; int64_t lda;
  const void* w;
  const float* bias;
  Prologue prologue; const float* norm_weight; const float* norm_bias; float eps;
  const void* mul; int64_t ld_mul; bool mul_gelu_grad;
  const float* col_scale;                 // length Nout
  const float* row_scale; int64_t HW;     // row_scale length N = M / HW (HW >= 1 when given)
  const void* residual; int64_t ld_res;
  void* out; int64_t ld_out;
  void* aux_out; int64_t ld_aux; const void* aux_mul; int64_t ld_aux_mul;
  int64_t M; int K, Nout;
  DType dtype;
  bool allow_tf32;  // fp32 only: TF32 tensor cores; false: 3xTF32 (about fp32 accuracy), as conv_bn_act
};
const char* pixel_gemm_launch(const PixelGemmParams& p, cudaStream_t stream);

// Weight gradient of a 1x1 conv (fp32 results, overwritten, never accumulated into):
//   dy'[m,n] = dy[m*ld_dy + n] * row_scale[m / HW]              (row_scale nullable)
//   b'[m,k]  = b[m*ldb + k]                                      (kNone)
//            = (b[m*ldb+k] - mean[m]) * rstd[m] * nw[k] + nb[k]  (kLayerNorm: mean/rstd given, fp32,
//              length M, e.g. from layernorm_rows_backward; nw/nb nullable = 1/0)
//            = gelu(b[m*ldb + k])                                (kGelu)
//   dw[n*K + k] = sum_m dy'[m,n] * b'[m,k]     (Nout x K)
//   db[n]       = sum_m dy'[m,n]               (db nullable)
// Deterministic: each block reduces a fixed pixel range into its own fp32 partial tile of the
// workspace, then one reduction kernel sums the partials in a fixed order (no atomics).
struct PixelWgradParams {
  const void* dy; int64_t ld_dy;
  const void* b; int64_t ldb;
  Prologue prologue; const float* mean; const float* rstd; const float* norm_weight; const float* norm_bias;
  const float* row_scale; int64_t HW;
  float* dw; float* db;
  float* workspace; size_t workspace_bytes;  // >= pixel_wgrad_workspace_bytes(p)
  int64_t M; int K, Nout;
  DType dtype;
  bool allow_tf32;
};
size_t pixel_wgrad_workspace_bytes(const PixelWgradParams& p);  // reads M, K, Nout only
const char* pixel_wgrad_launch(const PixelWgradParams& p, cudaStream_t stream);

// Backward of the channels-first LayerNorm y = (x - mean) * rstd * nw + nb over the C channels of
// each pixel, given dy = dL/dy (what pixel_gemm computed as dh @ W):
//   xhat = (x - mean) * rstd;  g = dy * nw
//   dx[m*ld_dx + c] = round(rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)))
//   mean_out[m], rstd_out[m]   (fp32, length M; nullable) for pixel_wgrad's LayerNorm prologue
//   dnw[c] = sum_m dy * xhat,  dnb[c] = sum_m dy   (fp32, nullable; per-block partials in the
//   workspace, then one reduction, deterministic)
struct LayerNormRowsBwdParams {
  const void* x; int64_t ldx;
  const void* dy; int64_t ld_dy;
  const float* norm_weight; float eps;    // nw nullable = 1
  void* dx; int64_t ld_dx;
  float* mean_out; float* rstd_out;
  float* dnw; float* dnb;
  float* workspace; size_t workspace_bytes;
  int64_t M; int C;
  DType dtype;
};
size_t layernorm_rows_backward_workspace_bytes(const LayerNormRowsBwdParams& p);  // reads M, C
const char* layernorm_rows_backward_launch(const LayerNormRowsBwdParams& p, cudaStream_t stream);

// Depthwise kxk conv (zero padding k/2, stride 1) of abc with the gate scale, bias and the first
// gate product fused; N images of H x W, M = N*H*W:
//   g[m,c]  = scale * (sum_{r,s<k} abc[n, h+r-k/2, w+s-k/2, c] * w_dw[(c*k + r)*k + s] + b_dw[c])   c < S
//           = scale * gates[m*ld_gates + c]             when gates != nullptr (HorNet's gflayer; no conv)
//   out[m*ld_out + c] = round(c < n_pwa ? pwa[m*ld_pwa + c] * g[m,c] : g[m,c])
// abc[m,c] = abc_base[m*ld_abc + c]; w_dw is (S, k, k) fp32 contiguous; b_dw nullable.
// n_pwa = d0 fuses x_0 = pwa * g_0 (forward); n_pwa = 0 writes the raw gates (backward recompute).
struct DwGateParams {
  const void* abc; int64_t ld_abc;
  const float* w_dw; const float* b_dw; int ksize;
  const void* gates; int64_t ld_gates;
  const void* pwa; int64_t ld_pwa; int n_pwa;
  float scale;
  void* out; int64_t ld_out;
  int N, H, W, S;
  DType dtype;
};
const char* dwconv_gate_launch(const DwGateParams& p, cudaStream_t stream);

// Backward of g = scale * (dwconv(abc) + b_dw) given dg = dL/dg (M x S, ld_dg):
//   dabc[m*ld_dabc + c] = round(scale * sum_{r,s} dg[n, h-r+k/2, w-s+k/2, c] * w_dw[(c*k+r)*k+s])  (nullable)
//   dw_dw[(c*k+r)*k+s] = scale * sum_m dg[m,c] * abc[n, h+r-k/2, w+s-k/2, c]   (fp32, nullable)
//   db_dw[c]           = scale * sum_m dg[m,c]                                 (fp32, nullable)
// Weight/bias gradients: per-block fp32 partial sums in the workspace, then one reduction kernel
// in a fixed order (deterministic, no atomics).
struct DwGateBwdParams {
  const void* dg; int64_t ld_dg;
  const void* abc; int64_t ld_abc;
  const float* w_dw; int ksize; float scale;
  void* dabc; int64_t ld_dabc;
  float* dw_dw; float* db_dw;
  float* workspace; size_t workspace_bytes;
  int N, H, W, S;
  DType dtype;
};
size_t dwconv_gate_backward_workspace_bytes(const DwGateBwdParams& p);  // reads N, H, W, S, ksize
const char* dwconv_gate_backward_launch(const DwGateBwdParams& p, cudaStream_t stream);

}  // namespace resfuse
