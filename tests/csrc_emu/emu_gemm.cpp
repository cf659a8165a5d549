// CPU emulator run of csrc/gnconv_gemm.cu (pixel_gemm_launch): the kernel compiled unchanged by
// g++ with its device primitives swapped for the host ones of emu_shims.h (see emu.cpp's header
// for what the emulator models, checks and cannot catch). tests/test_csrc_gnconv_gemm_emulation.py
// builds and runs it.
//
// Cases x {f16, bf16, tf32, 3xtf32} against a float64 reference of csrc/gnconv.h's formula,
// alternating early / late cp.async landing. Checks per run, each a failure: every output element
// (out, aux_out) against the reference; outputs pre-filled with NaN (an unwritten element fails);
// every other element of the written buffers (row padding, the A slice sharing a buffer with an
// in-place output, guard regions before and after) bit-identical after the launch; reads outside
// the inputs / misaligned; cp.async outside smem / never waited; non-tf32 mma operands; reads
// past the fp32 vectors (SIGSEGV). One extra line checks the launcher's validation strings.
// Tolerance on an output y (finite reference):
//   2.5 * ((rtol_op + 1e-6) * mag * F + amb * F + rtol_out * |y| + 4e-6 * (|v| + |res|) + 1e-7 * |z| * G) + 1e-6
//   mag = sum_k |a'_k w_k|; F = |mul' * col_scale * row_scale| (aux: |aux_mul|); G = |col_scale * row_scale|;
//   rtol_op: operand rounding of the MMA (tf32 1/1024, 3xTF32 2e-6, 16-bit 0: the reference uses
//   the dtype values); amb = sum_k |w_k| * (the operand's possible rounding spread): the kernel
//   computes the LN / GELU prologue in fp32 and rounds it to the dtype, the reference in float64,
//   so an a' within the fp32 error (delta_k) of a rounding boundary may round either way;
//   rtol_out = one rounding to the dtype (fp16 1/1024, bf16 1/128, fp32 1.2e-7).
// Non-finite references: NaN must be NaN, +-Inf the same Inf.
//
//   g++ -O2 -std=c++20 -pthread -I/usr/local/cuda/include tests/csrc_emu/emu_gemm.cpp -o /tmp/gemm_emu
//   /tmp/gemm_emu          # all cases;   /tmp/gemm_emu 3 5   # cases 3 and 5
// Output: "case <i> <mode> <landing> <name>: ok|FAIL (...)" per case and mode, "validation: ok|FAIL
// (...)", then "emu: <n> cases, <k> ok, <f> failed"; exit status 0 iff nothing failed.
#include "emu_core.h"

#define RESFUSE_CUDA_EMULATE "../tests/csrc_emu/emu_shims.h"
#include "../../csrc/gnconv_gemm.cu"

#include "emu_core_impl.h"

#include <string>

struct Case {
  const char* name;
  long M; int K, Nout;
  int pro;          // 0 none, 1 LayerNorm, 2 GELU
  bool nw, nb, bias;
  int mul;          // 0 none, 1 own tensor, 2 in place: out == mul, a channel slice of a wide buffer holding A too
  bool gelu_grad;
  bool col, row; int HW;
  bool res;
  int aux;          // 0 none, 1 aux_out only, 2 aux_out + aux_mul, 3 aux_out in place over aux_mul
  int pad;          // row padding (elements) of every strided tensor; each tensor gets its own ld
  int misalign;     // elements added to every activation pointer
  bool nonfinite;   // NaN / +Inf / -Inf in a (and mul)
};

struct Result { int fails; double worst; long long cp, ldg; };

static double round_dt(DType dt, double v) {
  if (dt == DType::kFloat32) return float(v);
  const float f = float(v);
  return dt == DType::kFloat16 ? emu::h2f(f2h(f)) : emu::b2f(f2b(f));
}

// A strided activation tensor inside a Buf: element (m, c) at base + m*ld + c.
struct View {
  Buf* b; long base; long ld;
  long idx(long m, long c) const { return base + m * ld + c; }
  double get(long m, long c) const { return b->get(idx(m, c)); }
};

static Result run_case(const Case& cs, DType dt, bool tf32, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const long M = cs.M, K = cs.K, N = cs.Nout, mis = cs.misalign, pad = cs.pad;
  // strides: each tensor its own (a swapped stride shows)
  const long lda0 = K + pad, ldo0 = N + pad, ldm0 = N + pad + 2 * (pad > 0), ldr = N + pad + 4 * (pad > 0),
             ldx = N + pad + 6 * (pad > 0), ldxm = N + pad + 8 * (pad > 0);
  // in place: one buffer of width Wd, A at column 0, out == mul at column K + 8
  const long Wd = K + 8 + N + pad;
  const bool inplace = cs.mul == 2;
  Buf wide(dt, inplace ? M * Wd + mis : 0);
  Buf abuf(dt, inplace ? 0 : M * lda0 + mis), obuf(dt, inplace ? 0 : M * ldo0 + mis);
  Buf mbuf(dt, cs.mul == 1 ? M * ldm0 + mis : 0), rbuf(dt, cs.res ? M * ldr + mis : 0);
  Buf xbuf(dt, cs.aux ? M * ldx + mis : 0), xmbuf(dt, cs.aux == 2 ? M * ldxm + mis : 0);
  Buf w(dt, N * K);
  const View A = inplace ? View{&wide, mis, Wd} : View{&abuf, mis, lda0};
  const View O = inplace ? View{&wide, mis + K + 8, Wd} : View{&obuf, mis, ldo0};
  const View Mu = inplace ? O : View{&mbuf, mis, ldm0};
  const View R{&rbuf, mis, ldr}, X{&xbuf, mis, ldx};
  const View XM = cs.aux == 3 ? X : View{&xmbuf, mis, ldxm};
  // every written buffer: NaN everywhere first (guards, padding, outputs)
  for (Buf* b : {&wide, &obuf, &xbuf})
    for (long i = -Buf::kGuard; i < b->n + Buf::kGuard; ++i) b->set(i, NAN);
  const float shift = cs.pro == 1 ? 2.f : 0.f, spread = cs.pro == 2 ? 3.f : 1.f;
  for (long m = 0; m < M; ++m)
    for (long k = 0; k < K; ++k) A.b->set(A.idx(m, k), shift + spread * U(rng));
  for (long i = 0; i < N * K; ++i) w.set(i, U(rng));
  for (long m = 0; m < M; ++m)
    for (long n = 0; n < N; ++n) {
      if (cs.mul) Mu.b->set(Mu.idx(m, n), (cs.gelu_grad ? 2.f : 1.5f) * U(rng));
      if (cs.res) R.b->set(R.idx(m, n), U(rng));
      if (cs.aux >= 2) XM.b->set(XM.idx(m, n), 1.5f * U(rng));
    }
  if (cs.nonfinite) {
    A.b->set(A.idx(1, 3 % K), NAN);
    A.b->set(A.idx(M / 2, 0), INFINITY);
    A.b->set(A.idx(M - 1, K - 1), -INFINITY);
    if (cs.mul) { Mu.b->set(Mu.idx(2, 1), NAN); Mu.b->set(Mu.idx(3, N - 1), INFINITY); }
  }
  std::vector<float> bias(N), cs_(N), nw(K), nb(K), rs((M + cs.HW - 1) / std::max(cs.HW, 1));
  for (auto& v : bias) v = U(rng);
  for (auto& v : cs_) v = U(rng);
  for (auto& v : nw) v = 1.f + 0.5f * U(rng);
  for (auto& v : nb) v = 0.5f * U(rng);
  for (auto& v : rs) v = 1.f + 0.5f * U(rng);
  GuardedVec g_bias(bias), g_cs(cs_), g_nw(nw), g_nb(nb), g_rs(rs);
  // snapshots: inputs for the reference (in place: mul is overwritten), written buffers for the
  // untouched-element check
  auto snap = [](Buf& b) {
    std::vector<unsigned char> s((b.n + 2 * Buf::kGuard) * b.es());
    std::memcpy(s.data(), b.at(-Buf::kGuard), s.size());
    return s;
  };
  const std::vector<unsigned char> wide0 = snap(wide), obuf0 = snap(obuf), xbuf0 = snap(xbuf);
  std::vector<double> mul0(cs.mul ? M * N : 0), aux0(cs.aux >= 2 ? M * N : 0);
  for (long m = 0; m < M; ++m)
    for (long n = 0; n < N; ++n) {
      if (cs.mul) mul0[m * N + n] = Mu.get(m, n);
      if (cs.aux >= 2) aux0[m * N + n] = XM.get(m, n);
    }

  resfuse::PixelGemmParams p{};
  p.a = A.b->at(A.base); p.lda = A.ld; p.w = w.at(0);
  p.bias = cs.bias ? g_bias.data : nullptr;
  p.prologue = resfuse::Prologue(cs.pro);
  p.norm_weight = cs.nw ? g_nw.data : nullptr; p.norm_bias = cs.nb ? g_nb.data : nullptr; p.eps = 1e-5f;
  if (cs.mul) { p.mul = Mu.b->at(Mu.base); p.ld_mul = Mu.ld; p.mul_gelu_grad = cs.gelu_grad; }
  p.col_scale = cs.col ? g_cs.data : nullptr;
  p.row_scale = cs.row ? g_rs.data : nullptr; p.HW = cs.HW;
  if (cs.res) { p.residual = R.b->at(R.base); p.ld_res = R.ld; }
  p.out = O.b->at(O.base); p.ld_out = O.ld;
  if (cs.aux) { p.aux_out = X.b->at(X.base); p.ld_aux = X.ld; }
  if (cs.aux >= 2) { p.aux_mul = XM.b->at(XM.base); p.ld_aux_mul = XM.ld; }
  p.M = M; p.K = cs.K; p.Nout = cs.Nout; p.dtype = dt; p.allow_tf32 = tf32;

  auto vec_range = [](const GuardedVec& g, long n) { return emu::Range{(const char*)g.data, (const char*)(g.data + n)}; };
  emu::readable = {w.range(0, N * K), vec_range(g_bias, N), vec_range(g_cs, N), vec_range(g_nw, K),
                   vec_range(g_nb, K), vec_range(g_rs, long(rs.size()))};
  if (inplace) emu::readable.push_back(wide.range(mis, mis + M * Wd));
  else emu::readable.push_back(abuf.range(mis, mis + M * lda0));
  if (cs.mul == 1) emu::readable.push_back(mbuf.range(mis, mis + M * ldm0));
  if (cs.res) emu::readable.push_back(rbuf.range(mis, mis + M * ldr));
  if (cs.aux == 2) emu::readable.push_back(xmbuf.range(mis, mis + M * ldxm));
  if (cs.aux == 3) emu::readable.push_back(xbuf.range(mis, mis + M * ldx));
  emu::stats = {};
  emu::smem_overrun = 0;
  // reference inputs read before the launch (A may share the written buffer)
  std::vector<double> a_in(M * K);
  for (long m = 0; m < M; ++m)
    for (long k = 0; k < K; ++k) a_in[m * K + k] = A.get(m, k);
  const char* err = resfuse::pixel_gemm_launch(p, nullptr);
  if (err) { std::printf("  launch error: %s\n", err); return {1, 0, 0, 0}; }

  const double rtol_op = dt == DType::kFloat32 ? (tf32 ? 1.0 / 1024 : 2e-6) : 0.0;
  const double rtol_out = dt == DType::kFloat32 ? 1.2e-7 : (dt == DType::kFloat16 ? 1.0 / 1024 : 1.0 / 128);
  int bad = 0;
  double worst = 0;
  auto check = [&](const char* what, long m, long n, double got, double y, double tol) {
    bool ok;
    if (!std::isfinite(y)) ok = (std::isnan(y) && std::isnan(got)) || (std::isinf(y) && got == y);
    else {
      ok = std::fabs(got - y) <= tol;
      if (std::isfinite(got)) worst = std::max(worst, std::fabs(got - y) / tol);
    }
    if (!ok && bad++ < 5) std::printf("  %s mismatch m=%ld n=%ld got %.8g want %.8g (tol %.3g)\n", what, m, n, got, y, tol);
  };
  std::vector<double> ap(K), delta(K), spreadk(K);
  for (long m = 0; m < M; ++m) {
    // prologue in float64; delta = the kernel's fp32 error bound on a'
    double mean = 0, var = 0;
    if (cs.pro == 1) {
      for (long k = 0; k < K; ++k) mean += a_in[m * K + k];
      mean /= double(K);
      for (long k = 0; k < K; ++k) var += (a_in[m * K + k] - mean) * (a_in[m * K + k] - mean);
      var /= double(K);
    }
    const double rstd = 1.0 / std::sqrt(var + double(1e-5f));
    for (long k = 0; k < K; ++k) {
      const double x = a_in[m * K + k];
      double v = x, d = 0;
      if (cs.pro == 1) {
        const double wk = cs.nw ? nw[k] : 1.0, bk = cs.nb ? nb[k] : 0.0;
        v = (x - mean) * rstd * wk + bk;
        d = 4e-6 * (std::fabs(v) + (std::fabs(x) + std::fabs(mean)) * rstd * std::fabs(wk) + std::fabs(bk));
      } else if (cs.pro == 2) {
        v = 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
        d = 2e-6 * std::fabs(v) + 2e-7 * std::fabs(x);
      }
      if (cs.pro && std::isfinite(v)) {
        const double lo = round_dt(dt, v - d), hi = round_dt(dt, v + d);
        ap[k] = round_dt(dt, v);
        spreadk[k] = dt == DType::kFloat32 ? d : hi - lo;
      } else {
        ap[k] = cs.pro ? v : x;
        spreadk[k] = 0;
      }
    }
    for (long n = 0; n < N; ++n) {
      double acc = 0, mag = 0, amb = 0;
      for (long k = 0; k < K; ++k) {
        const double wk = w.get(n * K + k);
        acc += ap[k] * wk; mag += std::fabs(ap[k] * wk); amb += spreadk[k] * std::fabs(wk);
      }
      const double z = acc + (cs.bias ? bias[n] : 0.0);
      double f = 1;
      if (cs.mul) {
        const double h = mul0[m * N + n];
        f = cs.gelu_grad ? 0.5 * (1 + std::erf(h / std::sqrt(2.0))) + h * std::exp(-0.5 * h * h) / std::sqrt(2 * M_PI) : h;
      }
      const double G = (cs.col ? cs_[n] : 1.0) * (cs.row ? rs[m / cs.HW] : 1.0);
      const double v = z * f * G, r = cs.res ? R.get(m, n) : 0.0, y = v + r;
      const double F = std::fabs(f * G);
      const double tol = 2.5 * ((rtol_op + 1e-6) * mag * F + amb * F + rtol_out * std::fabs(y) +
                                4e-6 * (std::fabs(v) + std::fabs(r)) + 1e-7 * std::fabs(z * G)) + 1e-6;
      check("out", m, n, O.get(m, n), y, tol);
      if (cs.aux) {
        const double am = cs.aux >= 2 ? aux0[m * N + n] : 1.0, ya = z * am;
        const double tola = 2.5 * ((rtol_op + 1e-6) * mag * std::fabs(am) + amb * std::fabs(am) +
                                   rtol_out * std::fabs(ya) + 4e-6 * std::fabs(ya)) + 1e-6;
        check("aux_out", m, n, X.get(m, n), ya, tola);
      }
    }
  }
  if (bad > 5) std::printf("  ... %d mismatches in all\n", bad);
  // untouched elements of the written buffers: bit-identical to their snapshot
  auto untouched = [&](Buf& b, const std::vector<unsigned char>& s0, const View* outs[2]) {
    std::vector<char> is_out(b.n + 2 * Buf::kGuard, 0);
    for (int o = 0; o < 2; ++o)
      if (outs[o] && outs[o]->b == &b)
        for (long m = 0; m < M; ++m)
          for (long n = 0; n < N; ++n) is_out[outs[o]->idx(m, n) + Buf::kGuard] = 1;
    int changed = 0;
    for (long i = -Buf::kGuard; i < b.n + Buf::kGuard; ++i)
      if (!is_out[i + Buf::kGuard] && std::memcmp(b.at(i), s0.data() + (i + Buf::kGuard) * b.es(), b.es())) ++changed;
    return changed;
  };
  const View* outs[2] = {&O, cs.aux ? &X : nullptr};
  const int stray = untouched(wide, wide0, outs) + untouched(obuf, obuf0, outs) + untouched(xbuf, xbuf0, outs);
  if (stray) std::printf("  %d writes outside the outputs (padding, A slice, guard regions)\n", stray);
  const emu::Counters& st = emu::stats;
  const int extra_bad = emu_violations();
  return {bad + (stray != 0) + extra_bad, worst, st.cp, st.ldg};
}

// The launcher's validation: each bad field named, the empty problem a no-op success.
static int check_validation() {
  int fails = 0, n = 0;
  uint16_t buf[64] = {};
  auto base = [&] {
    resfuse::PixelGemmParams p{};
    p.a = buf; p.lda = 8; p.w = buf; p.out = buf; p.ld_out = 8; p.M = 4; p.K = 8; p.Nout = 8;
    p.dtype = DType::kFloat16; p.HW = 1; p.eps = 1e-5f;
    return p;
  };
  auto expect = [&](const char* what, resfuse::PixelGemmParams p, const char* field) {
    ++n;
    const char* e = resfuse::pixel_gemm_launch(p, nullptr);
    const bool ok = field ? (e && std::strstr(e, field)) : e == nullptr;
    if (!ok) { std::printf("  validation %s: got %s, want %s\n", what, e ? e : "success", field ? field : "success"); ++fails; }
  };
  auto p = base(); p.a = nullptr; expect("null a", p, "a ");
  p = base(); p.w = nullptr; expect("null w", p, "w ");
  p = base(); p.out = nullptr; expect("null out", p, "out");
  p = base(); p.M = -1; expect("M < 0", p, "M");
  p = base(); p.K = -1; expect("K < 0", p, "K");
  p = base(); p.Nout = -1; expect("Nout < 0", p, "Nout");
  p = base(); p.lda = 7; expect("lda < K", p, "lda");
  p = base(); p.ld_out = 7; expect("ld_out < Nout", p, "ld_out");
  p = base(); p.mul = buf; p.ld_mul = 7; expect("ld_mul < Nout", p, "ld_mul");
  p = base(); p.residual = buf; p.ld_res = 7; expect("ld_res < Nout", p, "ld_res");
  p = base(); p.aux_out = buf; p.ld_aux = 7; expect("ld_aux < Nout", p, "ld_aux");
  p = base(); p.aux_out = buf; p.ld_aux = 8; p.aux_mul = buf; p.ld_aux_mul = 7; expect("ld_aux_mul", p, "ld_aux_mul");
  static const float one = 1.f;
  p = base(); p.row_scale = &one; p.HW = 0; expect("HW < 1", p, "HW");
  p = base(); p.prologue = resfuse::Prologue(3); expect("prologue", p, "prologue");
  p = base(); p.prologue = resfuse::Prologue::kLayerNorm; p.eps = -1.f; expect("eps < 0", p, "eps");
  p = base(); p.dtype = DType(7); expect("dtype", p, "dtype");
  emu::stats = {};
  p = base(); p.M = 0; expect("M == 0 (empty: success)", p, nullptr);
  p = base(); p.Nout = 0; p.ld_out = 0; expect("Nout == 0 (empty: success)", p, nullptr);
  if (emu::stats.cp || emu::stats.ldg) { std::printf("  empty problem launched a kernel\n"); ++fails; }
  std::printf("validation: %s (%d checks)\n", fails ? "FAIL" : "ok", n);
  return fails;
}

int main(int argc, char** argv) {
  start_driver();
  // name, M,K,Nout, pro,nw,nb,bias, mul,gelu_grad, col,row,HW, res, aux, pad, misalign, nonfinite
  const Case cases[] = {
    {"plain bias M=300 K=40 Nout=70", 300, 40, 70, 0, false, false, true, 0, false, false, false, 1, false, 0, 0, 0, false},
    {"LN K=19 Nout=33 nw nb element-wise", 150, 19, 33, 1, true, true, true, 0, false, false, false, 1, false, 0, 0, 0, false},
    {"LN K=64 vec no affine M=200 Nout=64", 200, 64, 64, 1, false, false, false, 0, false, false, false, 1, false, 0, 0, 0, false},
    {"LN K=64 vec nw lda>K pad bias", 130, 64, 40, 1, true, false, true, 0, false, false, false, 1, false, 0, 8, 0, false},
    {"GELU prologue K=48 Nout=40 bias res", 140, 48, 40, 2, false, false, true, 0, false, false, false, 1, true, 0, 0, 0, false},
    {"gate in place out==mul slice lda>K K=64 Nout=48 M=257", 257, 64, 48, 0, false, false, true, 2, false, false, false, 1, false, 0, 8, 0, false},
    {"gate in place odd Nout=33 K=24 slice", 140, 24, 33, 0, false, false, true, 2, false, false, false, 1, false, 0, 1, 0, false},
    {"proj_out row_scale HW=50 col_scale res M=300 K=32 Nout=32", 300, 32, 32, 0, false, false, true, 0, false, true, true, 50, true, 0, 2, 0, false},
    {"dgrad mul + aux_out aux_mul no bias K=48 Nout=40", 140, 48, 40, 0, false, false, false, 1, false, false, false, 1, false, 2, 2, 0, false},
    {"recompute gate + aux_out no aux_mul K=32 Nout=70", 130, 32, 70, 0, false, false, true, 1, false, false, false, 1, false, 1, 0, 0, false},
    {"mul_gelu_grad + aux_out in place over aux_mul K=32 Nout=70", 150, 32, 70, 0, false, false, false, 1, true, false, false, 1, false, 3, 4, 0, false},
    {"misaligned plain mul res K=32 Nout=34", 140, 32, 34, 0, false, false, true, 1, false, true, false, 1, true, 0, 0, 1, false},
    {"nonfinite LN K=16 Nout=24", 130, 16, 24, 1, true, true, true, 0, false, false, false, 1, false, 0, 0, 0, true},
    {"nonfinite plain gate K=32 Nout=16", 130, 32, 16, 0, false, false, true, 1, false, false, false, 1, false, 0, 0, 0, true},
  };
  const int ncases = int(sizeof(cases) / sizeof(cases[0]));
  std::vector<bool> selected;  // no arguments: every case
  if (!select_cases(argc, argv, ncases, selected)) return 2;
  int runs = 0, fails = 0;
  for (int ci = 0; ci < ncases; ++ci) {
    if (!selected[ci]) continue;
    for (int mi = 0; mi < 4; ++mi) {
      const MathMode& md = kMathModes[mi];
      emu::late_landing = (ci + mi) % 2 == 1;
      const char* landing = emu::late_landing ? "late" : "early";
      std::snprintf(g_current, sizeof(g_current), "%d %s %s %s", ci, md.n, landing, cases[ci].name);
      const Result r = run_case(cases[ci], md.d, md.tf32, 4321 + ci);
      std::printf("case %d %s %s %s: %s (max err/tol %.3f, cp.async %lld, checked loads %lld)\n", ci, md.n, landing,
                  cases[ci].name, r.fails ? "FAIL" : "ok", r.worst, r.cp, r.ldg);
      std::fflush(stdout);
      ++runs;
      fails += r.fails != 0;
    }
  }
  const int vfail = check_validation();
  std::printf("emu: %d cases, %d ok, %d failed\n", runs, runs - fails, fails);
  return fails != 0 || vfail != 0;
}
