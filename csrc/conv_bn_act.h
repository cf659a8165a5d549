// Plain CUDA C++ API of the fused conv -> BatchNorm(eval) -> (+ residual | + projection shortcut)
// -> activation kernel (csrc/conv_bn_act.cu). No torch headers: csrc/bindings.cpp binds it.
//
// Precision of the fp32 paths (dtype == kFloat32):
//   allow_tf32 == true  : TF32 tensor cores (mma.sync m16n8k8 .tf32, operands rounded to nearest tf32).
//   allow_tf32 == false : 3xTF32 on tensor cores: each operand v is split into big = tf32(v) and
//                         small = tf32(v - big); acc += a_small*b_big + a_big*b_small + a_big*b_big.
//                         Error ~ fp32 FFMA (the dropped small*small term is ~2^-22 relative).
//                         Inf/NaN operands keep eager's IEEE semantics (their small parts are 0 and
//                         they are zeroed in the cross terms).
// fp16 / bf16: mma.sync m16n8k16 with fp32 accumulation. The output is rounded to dtype once.
//
// Alignment: the kernel picks 16-byte cp.async loads when C (resp. Cs) is a multiple of
// 16/sizeof(dtype) and the base pointers are 16-byte aligned, else element-wise loads; paired
// stores when K is even and out/residual are aligned, else element-wise stores. Any pointer
// alignment to the element size is accepted.
#pragma once
#include <cuda_runtime.h>

namespace resfuse {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ConvBNActParams {
  // x: NHWC contiguous (N, H, W, C); weight: KRSC contiguous (K, R, S, C); out: NHWC contiguous (N, P, Q, K)
  const void* x; const void* weight; void* out;
  // per-channel fp32 vectors (length K), contiguous; nullptr = absent
  const float* bias;      // conv bias
  const float* bn_mean;   // nullptr => no BatchNorm (then bn_var/bn_weight/bn_bias are ignored)
  const float* bn_var; const float* bn_weight; const float* bn_bias; float eps;
  const void* residual;   // nullptr or NHWC contiguous (N, P, Q, K), dtype of x
  // projection shortcut: xs == nullptr => none. xs NHWC contiguous (N, Hs, Ws, Cs); wd (K, Cs) contiguous, dtype of x;
  // out += BN_d(conv1x1_stride(xs, wd) + bias_d)  (the 1x1 reads xs at (p*sd_h, q*sd_w))
  // mean_d == nullptr => no BN_d (scale_d = 1, shift_d = bias_d), as for the main branch.
  const void* xs; const void* wd; const float* bias_d; const float* mean_d; const float* var_d;
  const float* gamma_d; const float* beta_d; float eps_d; int Hs, Ws, Cs, sd_h, sd_w;
  int N, H, W, C, K, R, S, P, Q;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int activation;         // 0 identity, 1 relu, 2 relu6, 3 silu, 4 gelu (exact erf), 5 leaky_relu,
                          // 6 hardswish, 7 hardsigmoid, 8 gelu (tanh approximation)
  float negative_slope;   // leaky_relu's slope (the other activations ignore it)
  DType dtype;            // of x, weight, residual, xs, wd, out
  bool allow_tf32;        // fp32 only: true => TF32 tensor cores; false => IEEE-accurate fp32 (3xTF32, see above)
};

// Launches on `stream`; returns nullptr on success, else a static error string (bad params, launch error).
// Validates: non-null x/weight/out (and bn_var with bn_mean, wd/var_d with xs/mean_d), sizes >= 0
// (R, S, strides, dilations >= 1, pads >= 0), P and Q equal to conv2d's output size, the projection's
// reads inside xs ((P-1)*sd_h < Hs, (Q-1)*sd_w < Ws), activation in 0..8, K <= 4194240 (grid.y).
// N*P*Q == 0 or K == 0 launches nothing and succeeds.
const char* conv_bn_act_launch(const ConvBNActParams& p, cudaStream_t stream);

}  // namespace resfuse
