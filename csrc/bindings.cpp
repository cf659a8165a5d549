// The torch side of resfuse._C: schemas, argument validation, layout
// conversion, and the calls into the plain-CUDA launchers (conv_bn_act.h).
// The only file that includes torch headers (GUIDE §3: they cost a minute
// of compile time per translation unit).
//
// Ops live in their own namespace, torch.ops.resfuse_cuda.*, and write into
// a caller-allocated `out`; resfuse's Python ops (resfuse/ops/conv_bn_act.py,
// resfuse/ops/conv_bn_proj_act.py) call them from their "cuda" backend, so dispatch,
// autograd and torch.compile stay with the one op name resfuse::conv_bn_act.
//
// Validation order is deliberate: shapes, dtypes and values first, devices
// last, so every check can be exercised with CPU tensors on a machine
// without a GPU (the CPU kernel registered below validates and then refuses
// with "must be a CUDA tensor"). Messages name the argument.

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <string>
#include <vector>

#include "bindings_common.h"
#include "conv_bn_act.h"

namespace {

using namespace resfuse_bind;
using at::Tensor;
using c10::optional;

// The kernel writes NHWC; `out` may be any layout of the right shape.
struct Output {
  Tensor target, buffer;
  explicit Output(const Tensor& out)
      : target(out), buffer(out.is_contiguous(at::MemoryFormat::ChannelsLast) ? out : at::empty_like(
            out, out.options().memory_format(at::MemoryFormat::ChannelsLast))) {}
  void finish() {
    if (!buffer.is_same(target)) target.copy_(buffer);
  }
};

struct Geometry {
  int64_t N, C, H, W, K, R, S, P, Q;
  std::vector<int64_t> stride, padding, dilation;
};

Geometry check_main(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                    const optional<Tensor>& bn_mean, const optional<Tensor>& bn_var,
                    const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias, double eps,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                    int64_t activation, const Tensor& out) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(supported_dtype(x), "x must be float32, float16 or bfloat16 for the CUDA kernel, got ",
              x.scalar_type());
  check_4d(weight, "weight", x);
  TORCH_CHECK(groups == 1, "groups must be 1: the CUDA kernel implements groups=1 only, got groups=", groups);
  Geometry g;
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.K = weight.size(0); g.R = weight.size(2); g.S = weight.size(3);
  TORCH_CHECK(weight.size(1) == g.C, "weight must have ", g.C, " input channels (x has ", g.C, "), got shape ",
              weight.sizes());
  TORCH_CHECK(g.K > 0 && g.R > 0 && g.S > 0, "weight must have K, R, S > 0, got shape ", weight.sizes());
  g.stride = check_pair(stride, "stride", 1);
  g.padding = check_pair(padding, "padding", 0);
  g.dilation = check_pair(dilation, "dilation", 1);
  g.P = (g.H + 2 * g.padding[0] - g.dilation[0] * (g.R - 1) - 1) / g.stride[0] + 1;
  g.Q = (g.W + 2 * g.padding[1] - g.dilation[1] * (g.S - 1) - 1) / g.stride[1] + 1;
  TORCH_CHECK(g.P > 0 && g.Q > 0, "x of shape ", x.sizes(), " is smaller than the (dilated) kernel ",
              weight.sizes(), " with padding ", padding, ": the output would be empty");
  check_vector(bias, "bias", g.K);
  TORCH_CHECK(bn_mean.has_value() == bn_var.has_value(), "bn_mean and bn_var must be given together");
  check_vector(bn_mean, "bn_mean", g.K);
  check_vector(bn_var, "bn_var", g.K);
  check_vector(bn_weight, "bn_weight", g.K);
  check_vector(bn_bias, "bn_bias", g.K);
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  TORCH_CHECK(activation >= 0 && activation <= 8,
              "activation must be 0..8 (identity, relu, relu6, silu, gelu, leaky_relu, hardswish, hardsigmoid, "
              "gelu_tanh), got ", activation);
  check_4d(out, "out", x);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({g.N, g.K, g.P, g.Q}), "out must have shape (", g.N, ", ", g.K,
              ", ", g.P, ", ", g.Q, "), got ", out.sizes());
  return g;
}

void check_main_devices(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                        const optional<Tensor>& bn_mean, const optional<Tensor>& bn_var,
                        const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias, const Tensor& out) {
  check_device(x, "x", x);
  check_device(weight, "weight", x);
  check_optional_device(bias, "bias", x);
  check_optional_device(bn_mean, "bn_mean", x);
  check_optional_device(bn_var, "bn_var", x);
  check_optional_device(bn_weight, "bn_weight", x);
  check_optional_device(bn_bias, "bn_bias", x);
  check_device(out, "out", x);
}

// LeakyReLU's slope, passed with every activation (the others ignore it).
void check_negative_slope(double negative_slope) {
  TORCH_CHECK(std::isfinite(negative_slope), "negative_slope must be finite, got ", negative_slope);
}

resfuse::ConvBNActParams main_params(const Geometry& g, const Tensor& xc, const Tensor& wc, const Tensor& bias,
                                     const Tensor& mean, const Tensor& var, const Tensor& gamma,
                                     const Tensor& beta, double eps, int64_t activation, double negative_slope,
                                     bool allow_tf32,
                                     const Tensor& x, Output& o) {
  resfuse::ConvBNActParams p{};
  p.x = xc.data_ptr();
  p.weight = wc.data_ptr();
  p.out = o.buffer.data_ptr();
  p.bias = f32_ptr(bias);
  p.bn_mean = f32_ptr(mean);
  p.bn_var = f32_ptr(var);
  p.bn_weight = f32_ptr(gamma);
  p.bn_bias = f32_ptr(beta);
  p.eps = static_cast<float>(eps);
  p.N = g.N; p.H = g.H; p.W = g.W; p.C = g.C; p.K = g.K; p.R = g.R; p.S = g.S; p.P = g.P; p.Q = g.Q;
  p.stride_h = g.stride[0]; p.stride_w = g.stride[1];
  p.pad_h = g.padding[0]; p.pad_w = g.padding[1];
  p.dil_h = g.dilation[0]; p.dil_w = g.dilation[1];
  p.activation = static_cast<int>(activation);
  p.negative_slope = static_cast<float>(negative_slope);
  p.dtype = to_dtype(x);
  p.allow_tf32 = allow_tf32;
  return p;
}

void launch(const resfuse::ConvBNActParams& p, const Tensor& x, Output& o) {
  const char* err = resfuse::conv_bn_act_launch(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err == nullptr, "resfuse CUDA conv_bn_act: ", err ? err : "");
  o.finish();
}

// ---------------------------------------------------------------------------
// conv_bn_act: out = act(BN(conv(x, weight) + bias) [+ residual])
// ---------------------------------------------------------------------------

void conv_bn_act(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                 const optional<Tensor>& bn_mean, const optional<Tensor>& bn_var,
                 const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias, double eps,
                 const optional<Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, int64_t groups, int64_t activation, double negative_slope,
                 bool allow_tf32,
                 Tensor out) {
  Geometry g = check_main(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, stride, padding, dilation,
                          groups, activation, out);
  check_negative_slope(negative_slope);
  if (residual.has_value()) {
    check_4d(*residual, "residual", x);
    TORCH_CHECK(residual->sizes() == out.sizes(), "residual must have the output's shape ", out.sizes(),
                ", got ", residual->sizes());
  }
  check_main_devices(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, out);
  check_optional_device(residual, "residual", x);
  if (g.N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor xc = nhwc(x), wc = nhwc(weight);
  Tensor rc = residual.has_value() ? nhwc(*residual) : Tensor();
  Tensor b = as_f32(bias), mean = as_f32(bn_mean), var = as_f32(bn_var), gamma = as_f32(bn_weight),
         beta = as_f32(bn_bias);
  Output o(out);
  resfuse::ConvBNActParams p = main_params(g, xc, wc, b, mean, var, gamma, beta, eps, activation, negative_slope,
                                                 allow_tf32, x, o);
  p.residual = rc.defined() ? rc.data_ptr() : nullptr;
  launch(p, x, o);
}

// ---------------------------------------------------------------------------
// conv_bn_proj_act: out = act(BN(conv(x)) + BN_d(conv1x1_stride_d(xs)))
// ---------------------------------------------------------------------------

void conv_bn_proj_act(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias, const Tensor& bn_mean,
                      const Tensor& bn_var, const optional<Tensor>& bn_weight, const optional<Tensor>& bn_bias,
                      double eps, const Tensor& xs, const Tensor& weight_d, const optional<Tensor>& bias_d,
                      const Tensor& bn_mean_d, const Tensor& bn_var_d, const optional<Tensor>& bn_weight_d,
                      const optional<Tensor>& bn_bias_d, double eps_d, at::IntArrayRef stride_d,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      int64_t activation, double negative_slope, bool allow_tf32, Tensor out) {
  Geometry g = check_main(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, stride, padding, dilation,
                          groups, activation, out);
  check_negative_slope(negative_slope);
  check_4d(xs, "xs", x);
  check_4d(weight_d, "weight_d", x);
  const int64_t Cs = xs.size(1);
  TORCH_CHECK(xs.size(0) == g.N, "xs must have ", g.N, " images (x has ", g.N, "), got shape ", xs.sizes());
  TORCH_CHECK(weight_d.sizes() == at::IntArrayRef({g.K, Cs, 1, 1}), "weight_d must have shape (", g.K, ", ", Cs,
              ", 1, 1) (a 1x1 conv from xs's ", Cs, " channels to ", g.K, "), got ", weight_d.sizes());
  std::vector<int64_t> sd = check_pair(stride_d, "stride_d", 1);
  TORCH_CHECK((xs.size(2) - 1) / sd[0] + 1 == g.P && (xs.size(3) - 1) / sd[1] + 1 == g.Q, "xs of shape ",
              xs.sizes(), " with stride_d ", stride_d, " does not give the main branch's ", g.P, "x", g.Q,
              " output");
  check_vector(bias_d, "bias_d", g.K);
  check_vector(bn_mean_d, "bn_mean_d", g.K);
  check_vector(bn_var_d, "bn_var_d", g.K);
  check_vector(bn_weight_d, "bn_weight_d", g.K);
  check_vector(bn_bias_d, "bn_bias_d", g.K);
  TORCH_CHECK(eps_d >= 0, "eps_d must be >= 0, got ", eps_d);
  check_main_devices(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, out);
  check_device(xs, "xs", x);
  check_device(weight_d, "weight_d", x);
  check_optional_device(bias_d, "bias_d", x);
  check_device(bn_mean_d, "bn_mean_d", x);
  check_device(bn_var_d, "bn_var_d", x);
  check_optional_device(bn_weight_d, "bn_weight_d", x);
  check_optional_device(bn_bias_d, "bn_bias_d", x);
  if (g.N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor xc = nhwc(x), wc = nhwc(weight), xsc = nhwc(xs), wdc = weight_d.reshape({g.K, Cs}).contiguous();
  Tensor b = as_f32(bias), mean = as_f32(bn_mean), var = as_f32(bn_var), gamma = as_f32(bn_weight),
         beta = as_f32(bn_bias);
  Tensor bd = as_f32(bias_d), mean_d = as_f32(bn_mean_d), var_d = as_f32(bn_var_d), gamma_d = as_f32(bn_weight_d),
         beta_d = as_f32(bn_bias_d);
  Output o(out);
  resfuse::ConvBNActParams p = main_params(g, xc, wc, b, mean, var, gamma, beta, eps, activation, negative_slope,
                                                 allow_tf32, x, o);
  p.xs = xsc.data_ptr();
  p.wd = wdc.data_ptr();
  p.bias_d = f32_ptr(bd);
  p.mean_d = f32_ptr(mean_d);
  p.var_d = f32_ptr(var_d);
  p.gamma_d = f32_ptr(gamma_d);
  p.beta_d = f32_ptr(beta_d);
  p.eps_d = static_cast<float>(eps_d);
  p.Hs = xs.size(2); p.Ws = xs.size(3); p.Cs = Cs; p.sd_h = sd[0]; p.sd_w = sd[1];
  launch(p, x, o);
}

}  // namespace

TORCH_LIBRARY(resfuse_cuda, m) {
  m.def("conv_bn_act(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_mean, Tensor? bn_var, Tensor? bn_weight, "
        "Tensor? bn_bias, float eps, Tensor? residual, int[] stride, int[] padding, int[] dilation, int groups, "
        "int activation, float negative_slope, bool allow_tf32, Tensor(a!) out) -> ()");
  m.def("conv_bn_proj_act(Tensor x, Tensor weight, Tensor? bias, Tensor bn_mean, Tensor bn_var, "
        "Tensor? bn_weight, Tensor? bn_bias, float eps, Tensor xs, Tensor weight_d, Tensor? bias_d, "
        "Tensor bn_mean_d, Tensor bn_var_d, Tensor? bn_weight_d, Tensor? bn_bias_d, float eps_d, int[] stride_d, "
        "int[] stride, int[] padding, int[] dilation, int groups, int activation, float negative_slope, "
        "bool allow_tf32, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(resfuse_cuda, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act);
  m.impl("conv_bn_proj_act", &conv_bn_proj_act);
}

// CPU tensors reach the same entry points, which validate everything and
// then refuse with "must be a CUDA tensor": the validation is testable on
// machines without a GPU.
TORCH_LIBRARY_IMPL(resfuse_cuda, CPU, m) {
  m.impl("conv_bn_act", &conv_bn_act);
  m.impl("conv_bn_proj_act", &conv_bn_proj_act);
}

// `import resfuse._C` loads this library, which registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The resfuse ops whose `cuda` backend this library serves (resfuse/_backends.py::cuda_reasons).
  m.attr("OPS") = std::vector<std::string>{"conv_bn_act",           "conv_bn_proj_act",
                                           "layernorm_conv1x1",     "gnconv_chain",
                                           "gelu_conv1x1",          "layernorm_conv1x1_backward",
                                           "gnconv_chain_backward", "gelu_conv1x1_backward"};
  // Its own ops, torch.ops.resfuse_cuda.<name> (bindings.cpp, bindings_gnconv.cpp).
  m.attr("KERNEL_OPS") = std::vector<std::string>{"conv_bn_act", "conv_bn_proj_act", "pixel_gemm", "pixel_wgrad",
                                                  "layernorm_rows_backward", "dwconv_gate", "dwconv_gate_backward"};
}
