// The torch side of the gnconv / HorBlock kernels (csrc/gnconv.h): schemas, validation and calls
// into the plain-CUDA launchers. resfuse/ops/gnconv_cuda.py composes these ops into the `cuda`
// backend of resfuse::layernorm_conv1x1, gnconv_chain, gelu_conv1x1 and their backward ops.
//
// Activations are (N, C, H, W) tensors whose pixels are rows of a channels_last buffer:
// strides (H*W*ld, 1, W*ld, ld) with ld >= C, i.e. a channels_last tensor or a channel slice of
// one (f[:, d0:] is abc). The kernels address them through that ld, so slices cost no copy.
// Weight gradients and per-pixel statistics are fp32. Outputs are written into caller-allocated
// tensors (`Tensor(a!)`), as for conv_bn_act.
//
// Validation order, as in bindings.cpp: shapes, dtypes, layouts and values first, devices last,
// so the CPU registration below exercises every check without a GPU and then refuses with
// "must be a CUDA tensor".

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bindings_common.h"
#include "gnconv.h"

namespace {

using namespace resfuse_bind;
using at::Tensor;
using c10::optional;

struct Rows {
  int64_t N, C, H, W, ld;
  int64_t M() const { return N * H * W; }
};

Rows rows_of(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
  Rows r{t.size(0), t.size(1), t.size(2), t.size(3), t.size(1)};
  if (r.W > 1) r.ld = t.stride(3);
  else if (r.H > 1) r.ld = t.stride(2);
  else if (r.N > 1) r.ld = t.stride(0);
  const bool ok = (r.C <= 1 || t.stride(1) == 1) && r.ld >= r.C && r.ld >= 1 && (r.W <= 1 || t.stride(3) == r.ld) &&
                  (r.H <= 1 || t.stride(2) == r.W * r.ld) && (r.N <= 1 || t.stride(0) == r.H * r.W * r.ld);
  TORCH_CHECK(ok, name, " must be channels_last pixel rows (a channels_last tensor or a channel slice of one, "
              "strides (H*W*ld, 1, W*ld, ld) with ld >= C), got shape ", t.sizes(), " and strides ", t.strides());
  return r;
}

void same_pixels(const Rows& r, const Rows& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(r.N == ref.N && r.H == ref.H && r.W == ref.W, name, " must have ", ref_name, "'s N, H, W (", ref.N,
              ", ", ref.H, ", ", ref.W, "), got (", r.N, ", ", r.H, ", ", r.W, ")");
}

Rows rows_like(const optional<Tensor>& t, const char* name, const Rows& ref, const char* ref_name, int64_t C,
               const Tensor& x) {
  Rows r = rows_of(*t, name);
  same_pixels(r, ref, name, ref_name);
  TORCH_CHECK(r.C == C, name, " must have ", C, " channels, got ", r.C);
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), name, " has dtype ", t->scalar_type(), " but must match ",
              x.scalar_type());
  return r;
}

void check_f32(const optional<Tensor>& t, const char* name, at::IntArrayRef shape) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
}

// Memory overlap of two tensors. Pixel-row views of one buffer with equal strides (channel slices
// such as f's pwa / abc or one stage of the gate buffer) are disjoint when their channel ranges
// are: with b starting r = (offset of b - offset of a) mod ld channels into a's rows, when
// [r, r + Cb) misses [0, Ca) and stays inside the row. Anything else is compared by address
// range (conservative: interleaved but disjoint views other than those are reported).
bool overlaps(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  const auto lo = [](const Tensor& t) { return static_cast<const char*>(t.data_ptr()); };
  const auto hi = [](const Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return static_cast<const char*>(t.data_ptr()) + (last + 1) * t.element_size();
  };
  if (hi(a) <= lo(b) || hi(b) <= lo(a)) return false;
  if (a.dim() == 4 && b.dim() == 4 && a.element_size() == b.element_size() && a.strides() == b.strides() &&
      (a.size(1) <= 1 || a.stride(1) == 1)) {
    const int64_t ld = a.size(3) > 1 ? a.stride(3) : a.size(2) > 1 ? a.stride(2) : a.stride(0);
    if (ld >= 1) {
      const int64_t off = (lo(b) - lo(a)) / a.element_size();
      const int64_t r = ((off % ld) + ld) % ld;
      return !(r >= a.size(1) && r + b.size(1) <= ld);
    }
  }
  return true;
}

// b may overlap a only as the very same view (in-place epilogues: gnconv.h allows out == mul and
// aux_out == aux_mul, each element read then written by one thread).
void exact_alias_or_disjoint(const Tensor& a, const Tensor& b, const char* an, const char* bn) {
  if (!overlaps(a, b)) return;
  TORCH_CHECK(a.data_ptr() == b.data_ptr() && a.strides() == b.strides() && a.sizes() == b.sizes(), bn,
              " overlaps ", an, " without being the same view; only exact aliasing (in place) is supported");
}

// b must not share memory with a at all (a kernel would read what another block already wrote).
void disjoint(const Tensor& a, const Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(!overlaps(a, b), bn, " overlaps ", an, ": they must not share memory");
}

const Tensor& opt(const optional<Tensor>& t) {
  static const Tensor none;
  return t.has_value() ? *t : none;
}

int as_int(int64_t v, const char* name) {
  TORCH_CHECK(v <= INT32_MAX, name, " = ", v, " is too large for the CUDA kernels (at most 2^31 - 1)");
  return static_cast<int>(v);
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void ok_or_throw(const char* err, const char* op) { TORCH_CHECK(err == nullptr, "resfuse CUDA ", op, ": ", err); }

int prologue_of(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= 2, "prologue must be 0 (none), 1 (layernorm) or 2 (gelu), got ", v);
  return static_cast<int>(v);
}

const void* ptr(const optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

float* fptr(const optional<Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

Tensor weight_2d(const Tensor& w, const char* name, int64_t Nout, int64_t K, const Tensor& x) {
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), name, " has dtype ", w.scalar_type(), " but must match ",
              x.scalar_type());
  TORCH_CHECK((w.dim() == 2 && w.size(0) == Nout && w.size(1) == K) ||
                  (w.dim() == 4 && w.size(0) == Nout && w.size(1) == K && w.size(2) == 1 && w.size(3) == 1),
              name, " must have shape (", Nout, ", ", K, ") or (", Nout, ", ", K, ", 1, 1), got ", w.sizes());
  return w;
}

// ---------------------------------------------------------------------------------------------
// pixel_gemm
// ---------------------------------------------------------------------------------------------
void pixel_gemm(const Tensor& a, const Tensor& weight, const optional<Tensor>& bias, int64_t prologue,
                const optional<Tensor>& norm_weight, const optional<Tensor>& norm_bias, double eps,
                const optional<Tensor>& mul, bool mul_gelu_grad, const optional<Tensor>& col_scale,
                const optional<Tensor>& row_scale, const optional<Tensor>& residual, bool allow_tf32, Tensor out,
                const optional<Tensor>& aux_out, const optional<Tensor>& aux_mul) {
  TORCH_CHECK(supported_dtype(a), "a must be float32, float16 or bfloat16 for the CUDA kernel, got ", a.scalar_type());
  const Rows ra = rows_of(a, "a");
  TORCH_CHECK(out.dim() == 4, "out must be 4-D (N, Nout, H, W), got shape ", out.sizes());
  const int64_t Nout = out.size(1);
  weight_2d(weight, "weight", Nout, ra.C, a);
  const Rows ro = rows_like(out, "out", ra, "a", Nout, a);
  const int pro = prologue_of(prologue);
  check_vector(bias, "bias", Nout);
  if (pro == 1) {
    check_vector(norm_weight, "norm_weight", ra.C);
    check_vector(norm_bias, "norm_bias", ra.C);
    TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  } else {
    TORCH_CHECK(!norm_weight.has_value() && !norm_bias.has_value(),
                "norm_weight / norm_bias given without the layernorm prologue (prologue=1)");
  }
  TORCH_CHECK(!mul_gelu_grad || mul.has_value(), "mul_gelu_grad needs mul");
  const Rows rm = mul.has_value() ? rows_like(mul, "mul", ra, "a", Nout, a) : Rows{};
  const Rows rr = residual.has_value() ? rows_like(residual, "residual", ra, "a", Nout, a) : Rows{};
  const Rows rx = aux_out.has_value() ? rows_like(aux_out, "aux_out", ra, "a", Nout, a) : Rows{};
  TORCH_CHECK(!aux_mul.has_value() || aux_out.has_value(), "aux_mul given without aux_out");
  const Rows rxm = aux_mul.has_value() ? rows_like(aux_mul, "aux_mul", ra, "a", Nout, a) : Rows{};
  check_vector(col_scale, "col_scale", Nout);
  check_vector(row_scale, "row_scale", ra.N);
  exact_alias_or_disjoint(out, opt(mul), "out", "mul");
  disjoint(out, a, "out", "a");
  disjoint(out, opt(residual), "out", "residual");
  exact_alias_or_disjoint(opt(aux_out), opt(aux_mul), "aux_out", "aux_mul");
  for (const auto& [t, n] : {std::pair<const Tensor&, const char*>{out, "out"}, {a, "a"}, {opt(mul), "mul"},
                             {opt(residual), "residual"}})
    disjoint(t, opt(aux_out), n, "aux_out");
  check_device(a, "a", a);
  check_device(weight, "weight", a);
  check_device(out, "out", a);
  for (auto* t : {&bias, &norm_weight, &norm_bias, &mul, &col_scale, &row_scale, &residual, &aux_out, &aux_mul})
    check_optional_device(*t, "a vector/tensor argument", a);
  if (ra.M() == 0 || Nout == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  Tensor w = weight.reshape({Nout, ra.C}).contiguous();
  Tensor b = as_f32(bias), nw = as_f32(norm_weight), nb = as_f32(norm_bias), cs = as_f32(col_scale),
         rs = as_f32(row_scale);
  resfuse::PixelGemmParams p{};
  p.a = a.data_ptr(); p.lda = ra.ld; p.w = w.data_ptr(); p.bias = f32_ptr(b);
  p.prologue = static_cast<resfuse::Prologue>(pro); p.norm_weight = f32_ptr(nw); p.norm_bias = f32_ptr(nb);
  p.eps = static_cast<float>(eps);
  p.mul = ptr(mul); p.ld_mul = rm.ld; p.mul_gelu_grad = mul_gelu_grad;
  p.col_scale = f32_ptr(cs); p.row_scale = f32_ptr(rs); p.HW = ra.H * ra.W;
  p.residual = ptr(residual); p.ld_res = rr.ld;
  p.out = out.data_ptr(); p.ld_out = ro.ld;
  p.aux_out = aux_out.has_value() ? aux_out->data_ptr() : nullptr; p.ld_aux = rx.ld;
  p.aux_mul = ptr(aux_mul); p.ld_aux_mul = rxm.ld;
  p.M = ra.M(); p.K = as_int(ra.C, "a's channels"); p.Nout = as_int(Nout, "out's channels");
  p.dtype = to_dtype(a); p.allow_tf32 = allow_tf32;
  ok_or_throw(resfuse::pixel_gemm_launch(p, stream_of(a)), "pixel_gemm");
}

// ---------------------------------------------------------------------------------------------
// pixel_wgrad: dw (Nout, K) fp32, db (Nout,) fp32
// ---------------------------------------------------------------------------------------------
void pixel_wgrad(const Tensor& dy, const Tensor& b, int64_t prologue, const optional<Tensor>& mean,
                 const optional<Tensor>& rstd, const optional<Tensor>& norm_weight,
                 const optional<Tensor>& norm_bias, const optional<Tensor>& row_scale, bool allow_tf32, Tensor dw,
                 const optional<Tensor>& db) {
  TORCH_CHECK(supported_dtype(dy), "dy must be float32, float16 or bfloat16 for the CUDA kernel, got ",
              dy.scalar_type());
  const Rows rd = rows_of(dy, "dy");
  const Rows rb = rows_of(b, "b");
  same_pixels(rb, rd, "b", "dy");
  TORCH_CHECK(b.scalar_type() == dy.scalar_type(), "b has dtype ", b.scalar_type(), " but must match ",
              dy.scalar_type());
  const int pro = prologue_of(prologue);
  check_f32(dw, "dw", {rd.C, rb.C});
  check_f32(db, "db", {rd.C});
  if (pro == 1) {
    TORCH_CHECK(mean.has_value() && rstd.has_value(), "the layernorm prologue (prologue=1) needs mean and rstd");
    check_f32(mean, "mean", {rd.M()});
    check_f32(rstd, "rstd", {rd.M()});
    check_vector(norm_weight, "norm_weight", rb.C);
    check_vector(norm_bias, "norm_bias", rb.C);
  } else {
    TORCH_CHECK(!mean.has_value() && !rstd.has_value() && !norm_weight.has_value() && !norm_bias.has_value(),
                "mean / rstd / norm_weight / norm_bias given without the layernorm prologue (prologue=1)");
  }
  check_vector(row_scale, "row_scale", rd.N);
  as_int(rd.C, "dy's channels");
  as_int(rb.C, "b's channels");
  check_device(dy, "dy", dy);
  check_device(b, "b", dy);
  check_device(dw, "dw", dy);
  for (auto* t : {&mean, &rstd, &norm_weight, &norm_bias, &row_scale, &db})
    check_optional_device(*t, "a vector argument", dy);
  if (rd.C == 0) return;
  const c10::cuda::CUDAGuard guard(dy.device());
  if (rd.M() == 0) {  // no pixels: the sums are empty
    dw.zero_();
    if (db.has_value()) db->zero_();
    return;
  }
  Tensor nw = as_f32(norm_weight), nb = as_f32(norm_bias), rs = as_f32(row_scale);
  resfuse::PixelWgradParams p{};
  p.dy = dy.data_ptr(); p.ld_dy = rd.ld; p.b = b.data_ptr(); p.ldb = rb.ld;
  p.prologue = static_cast<resfuse::Prologue>(pro); p.mean = fptr(mean); p.rstd = fptr(rstd);
  p.norm_weight = f32_ptr(nw); p.norm_bias = f32_ptr(nb);
  p.row_scale = f32_ptr(rs); p.HW = rd.H * rd.W;
  p.dw = dw.data_ptr<float>(); p.db = fptr(db);
  p.M = rd.M(); p.K = static_cast<int>(rb.C); p.Nout = static_cast<int>(rd.C);  // checked above
  p.dtype = to_dtype(dy); p.allow_tf32 = allow_tf32;
  const size_t bytes = resfuse::pixel_wgrad_workspace_bytes(p);
  Tensor ws = at::empty({static_cast<int64_t>((bytes + 3) / 4)}, dy.options().dtype(at::kFloat));
  p.workspace = ws.data_ptr<float>(); p.workspace_bytes = bytes;
  ok_or_throw(resfuse::pixel_wgrad_launch(p, stream_of(dy)), "pixel_wgrad");
}

// ---------------------------------------------------------------------------------------------
// layernorm_rows_backward
// ---------------------------------------------------------------------------------------------
void layernorm_rows_backward(const Tensor& x, const Tensor& dy, const optional<Tensor>& norm_weight, double eps,
                             Tensor dx, const optional<Tensor>& mean, const optional<Tensor>& rstd,
                             const optional<Tensor>& dnw, const optional<Tensor>& dnb) {
  TORCH_CHECK(supported_dtype(x), "x must be float32, float16 or bfloat16 for the CUDA kernel, got ", x.scalar_type());
  const Rows rx = rows_of(x, "x");
  const Rows rd = rows_like(dy, "dy", rx, "x", rx.C, x);
  const Rows ro = rows_like(dx, "dx", rx, "x", rx.C, x);
  check_vector(norm_weight, "norm_weight", rx.C);
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  check_f32(mean, "mean", {rx.M()});
  check_f32(rstd, "rstd", {rx.M()});
  check_f32(dnw, "dnw", {rx.C});
  check_f32(dnb, "dnb", {rx.C});
  disjoint(dx, x, "dx", "x");
  disjoint(dx, dy, "dx", "dy");
  as_int(rx.C, "x's channels");
  check_device(x, "x", x);
  check_device(dy, "dy", x);
  check_device(dx, "dx", x);
  for (auto* t : {&norm_weight, &mean, &rstd, &dnw, &dnb}) check_optional_device(*t, "a vector argument", x);
  if (rx.C == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  if (rx.M() == 0) {  // no pixels: the parameter gradients are empty sums
    for (auto* t : {&dnw, &dnb})
      if (t->has_value()) (*t)->zero_();
    return;
  }
  Tensor nw = as_f32(norm_weight);
  resfuse::LayerNormRowsBwdParams p{};
  p.x = x.data_ptr(); p.ldx = rx.ld; p.dy = dy.data_ptr(); p.ld_dy = rd.ld;
  p.norm_weight = f32_ptr(nw); p.eps = static_cast<float>(eps);
  p.dx = dx.data_ptr(); p.ld_dx = ro.ld;
  p.mean_out = fptr(mean); p.rstd_out = fptr(rstd); p.dnw = fptr(dnw); p.dnb = fptr(dnb);
  p.M = rx.M(); p.C = static_cast<int>(rx.C); p.dtype = to_dtype(x);
  const size_t bytes = resfuse::layernorm_rows_backward_workspace_bytes(p);
  Tensor ws = at::empty({static_cast<int64_t>((bytes + 3) / 4)}, x.options().dtype(at::kFloat));
  p.workspace = ws.data_ptr<float>(); p.workspace_bytes = bytes;
  ok_or_throw(resfuse::layernorm_rows_backward_launch(p, stream_of(x)), "layernorm_rows_backward");
}

// ---------------------------------------------------------------------------------------------
// dwconv_gate / dwconv_gate_backward
// ---------------------------------------------------------------------------------------------
int64_t check_dw_weight(const Tensor& w, int64_t S, const Tensor& x) {
  TORCH_CHECK(w.dim() == 4 && w.size(0) == S && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) % 2 == 1,
              "w_dw must be a depthwise weight (", S, ", 1, k, k) with k odd, got ", w.sizes());
  TORCH_CHECK(w.is_floating_point(), "w_dw must be a floating-point tensor, got ", w.scalar_type());
  (void)x;
  return w.size(2);
}

void dwconv_gate(const Tensor& abc, const optional<Tensor>& w_dw, const optional<Tensor>& b_dw,
                 const optional<Tensor>& gates, const optional<Tensor>& pwa, double scale, Tensor out) {
  TORCH_CHECK(supported_dtype(abc), "abc must be float32, float16 or bfloat16 for the CUDA kernel, got ",
              abc.scalar_type());
  const Rows ra = rows_of(abc, "abc");
  TORCH_CHECK(w_dw.has_value() != gates.has_value(), "give exactly one of w_dw (the depthwise conv) and gates");
  int64_t k = 1;
  if (w_dw.has_value()) k = check_dw_weight(*w_dw, ra.C, abc);
  TORCH_CHECK(!(gates.has_value() && b_dw.has_value()), "b_dw given with gates: the bias belongs to the conv");
  check_vector(b_dw, "b_dw", ra.C);
  const Rows rg = gates.has_value() ? rows_like(gates, "gates", ra, "abc", ra.C, abc) : Rows{};
  Rows rp{};
  if (pwa.has_value()) {
    rp = rows_of(*pwa, "pwa");
    same_pixels(rp, ra, "pwa", "abc");
    TORCH_CHECK(rp.C <= ra.C, "pwa has ", rp.C, " channels, more than abc's ", ra.C);
    TORCH_CHECK(pwa->scalar_type() == abc.scalar_type(), "pwa has dtype ", pwa->scalar_type(), " but must match ",
                abc.scalar_type());
  }
  const Rows ro = rows_like(out, "out", ra, "abc", ra.C, abc);
  disjoint(out, abc, "out", "abc");
  disjoint(out, opt(pwa), "out", "pwa");
  disjoint(out, opt(gates), "out", "gates");
  as_int(ra.N, "N"); as_int(ra.H, "H"); as_int(ra.W, "W"); as_int(ra.C, "abc's channels");
  check_device(abc, "abc", abc);
  check_device(out, "out", abc);
  for (auto* t : {&w_dw, &b_dw, &gates, &pwa}) check_optional_device(*t, "a tensor argument", abc);
  if (ra.M() == 0 || ra.C == 0) return;
  const c10::cuda::CUDAGuard guard(abc.device());
  Tensor w = w_dw.has_value() ? w_dw->to(at::kFloat).contiguous() : Tensor();
  Tensor b = as_f32(b_dw);
  resfuse::DwGateParams p{};
  p.abc = abc.data_ptr(); p.ld_abc = ra.ld; p.w_dw = f32_ptr(w); p.b_dw = f32_ptr(b); p.ksize = static_cast<int>(k);
  p.gates = ptr(gates); p.ld_gates = rg.ld;
  p.pwa = ptr(pwa); p.ld_pwa = pwa.has_value() ? rp.ld : 0; p.n_pwa = pwa.has_value() ? static_cast<int>(rp.C) : 0;
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr(); p.ld_out = ro.ld;
  p.N = ra.N; p.H = ra.H; p.W = ra.W; p.S = ra.C; p.dtype = to_dtype(abc);
  ok_or_throw(resfuse::dwconv_gate_launch(p, stream_of(abc)), "dwconv_gate");
}

void dwconv_gate_backward(const Tensor& dg, const Tensor& abc, const Tensor& w_dw, double scale,
                          const optional<Tensor>& dabc, const optional<Tensor>& dw_dw,
                          const optional<Tensor>& db_dw) {
  TORCH_CHECK(supported_dtype(dg), "dg must be float32, float16 or bfloat16 for the CUDA kernel, got ",
              dg.scalar_type());
  const Rows rd = rows_of(dg, "dg");
  const Rows ra = rows_like(abc, "abc", rd, "dg", rd.C, dg);
  const int64_t k = check_dw_weight(w_dw, rd.C, dg);
  const Rows ro = dabc.has_value() ? rows_like(dabc, "dabc", rd, "dg", rd.C, dg) : Rows{};
  check_f32(dw_dw, "dw_dw", {rd.C, 1, k, k});
  check_f32(db_dw, "db_dw", {rd.C});
  disjoint(opt(dabc), dg, "dabc", "dg");
  disjoint(opt(dabc), abc, "dabc", "abc");
  as_int(rd.N, "N"); as_int(rd.H, "H"); as_int(rd.W, "W"); as_int(rd.C, "dg's channels");
  check_device(dg, "dg", dg);
  check_device(abc, "abc", dg);
  check_device(w_dw, "w_dw", dg);
  for (auto* t : {&dabc, &dw_dw, &db_dw}) check_optional_device(*t, "an output", dg);
  if (rd.C == 0) return;
  const c10::cuda::CUDAGuard guard(dg.device());
  if (rd.M() == 0) {  // no pixels: empty sums, nothing to launch
    for (auto* t : {&dw_dw, &db_dw})
      if (t->has_value()) (*t)->zero_();
    return;
  }
  Tensor w = w_dw.to(at::kFloat).contiguous();
  resfuse::DwGateBwdParams p{};
  p.dg = dg.data_ptr(); p.ld_dg = rd.ld; p.abc = abc.data_ptr(); p.ld_abc = ra.ld;
  p.w_dw = w.data_ptr<float>(); p.ksize = static_cast<int>(k); p.scale = static_cast<float>(scale);
  p.dabc = dabc.has_value() ? dabc->data_ptr() : nullptr; p.ld_dabc = ro.ld;
  p.dw_dw = fptr(dw_dw); p.db_dw = fptr(db_dw);
  p.N = rd.N; p.H = rd.H; p.W = rd.W; p.S = rd.C; p.dtype = to_dtype(dg);
  const size_t bytes = resfuse::dwconv_gate_backward_workspace_bytes(p);
  Tensor ws = at::empty({static_cast<int64_t>((bytes + 3) / 4)}, dg.options().dtype(at::kFloat));
  p.workspace = ws.data_ptr<float>(); p.workspace_bytes = bytes;
  ok_or_throw(resfuse::dwconv_gate_backward_launch(p, stream_of(dg)), "dwconv_gate_backward");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resfuse_cuda, m) {
  m.def("pixel_gemm(Tensor a, Tensor weight, Tensor? bias, int prologue, Tensor? norm_weight, Tensor? norm_bias, "
        "float eps, Tensor? mul, bool mul_gelu_grad, Tensor? col_scale, Tensor? row_scale, Tensor? residual, "
        "bool allow_tf32, Tensor(a!) out, Tensor(b!)? aux_out, Tensor? aux_mul) -> ()");
  m.def("pixel_wgrad(Tensor dy, Tensor b, int prologue, Tensor? mean, Tensor? rstd, Tensor? norm_weight, "
        "Tensor? norm_bias, Tensor? row_scale, bool allow_tf32, Tensor(a!) dw, Tensor(b!)? db) -> ()");
  m.def("layernorm_rows_backward(Tensor x, Tensor dy, Tensor? norm_weight, float eps, Tensor(a!) dx, "
        "Tensor(b!)? mean, Tensor(c!)? rstd, Tensor(d!)? dnw, Tensor(e!)? dnb) -> ()");
  m.def("dwconv_gate(Tensor abc, Tensor? w_dw, Tensor? b_dw, Tensor? gates, Tensor? pwa, float scale, "
        "Tensor(a!) out) -> ()");
  m.def("dwconv_gate_backward(Tensor dg, Tensor abc, Tensor w_dw, float scale, Tensor(a!)? dabc, "
        "Tensor(b!)? dw_dw, Tensor(c!)? db_dw) -> ()");
}

#define RESFUSE_GNCONV_IMPLS(m)                                   \
  m.impl("pixel_gemm", &pixel_gemm);                              \
  m.impl("pixel_wgrad", &pixel_wgrad);                            \
  m.impl("layernorm_rows_backward", &layernorm_rows_backward);    \
  m.impl("dwconv_gate", &dwconv_gate);                            \
  m.impl("dwconv_gate_backward", &dwconv_gate_backward)

TORCH_LIBRARY_IMPL(resfuse_cuda, CUDA, m) { RESFUSE_GNCONV_IMPLS(m); }
// CPU: validate everything, then refuse (see the header).
TORCH_LIBRARY_IMPL(resfuse_cuda, CPU, m) { RESFUSE_GNCONV_IMPLS(m); }
