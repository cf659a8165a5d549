// Helpers shared by resfuse._C's torch translation units (bindings.cpp, bindings_gnconv.cpp):
// dtype mapping, argument checks that name the argument, fp32 per-channel vectors.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "conv_bn_act.h"

namespace resfuse_bind {

using at::Tensor;
using c10::optional;

inline bool supported_dtype(const Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

inline resfuse::DType to_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return resfuse::DType::kFloat16;
    case at::kBFloat16: return resfuse::DType::kBFloat16;
    default: return resfuse::DType::kFloat32;
  }
}

inline void check_4d(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D, got ", t.dim(), "-D with shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type(), "; they must match");
}

inline void check_vector(const optional<Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, " must have shape (", n, "), got ", t->sizes());
  TORCH_CHECK(t->is_floating_point(), name, " must be a floating-point tensor, got ", t->scalar_type());
}

inline std::vector<int64_t> check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 elements (h, w), got ", v.size());
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, name, " must be >= ", min_value, ", got ", v);
  TORCH_CHECK(v[0] < (1 << 30) && v[1] < (1 << 30), name, " is too large: ", v);
  return {v[0], v[1]};
}

inline void check_device(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor (resfuse's cuda backend), got ", t.device());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
}

inline void check_optional_device(const optional<Tensor>& t, const char* name, const Tensor& x) {
  if (t.has_value()) check_device(*t, name, x);
}

// Per-channel vectors go to the kernel as contiguous fp32 (K elements:
// negligible next to the activations).
inline Tensor as_f32(const optional<Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : Tensor();
}

inline const float* f32_ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

inline Tensor nhwc(const Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

}  // namespace resfuse_bind
