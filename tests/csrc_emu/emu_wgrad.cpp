// CPU emulator driver for csrc/gnconv_wgrad.cu (pixel_wgrad, layernorm_rows_backward): the kernels
// compiled unchanged by g++ on the engine of emu_core.h (see emu.cpp's header for what the engine
// emulates, checks and cannot catch), each case x {f16, bf16, tf32, 3xtf32} against a float64
// reference of the formulas in csrc/gnconv.h. tests/test_csrc_gnconv_wgrad_emulation.py runs it.
//
// Checks per case, each a failure: every output element (dw, db / dx, mean, rstd, dnw, dnb) within
// tolerance of the reference (NaN must be NaN), outputs and the workspace pre-filled with NaN (an
// unwritten element fails; a partial read before it is written poisons dw), NaN guard regions
// around every output (and the gaps of a strided dx), global reads outside the inputs, misaligned
// reads, cp.async outside shared memory / never waited for, bytes written past the shared buffer,
// tf32 operands that are not tf32, and (SIGSEGV) reads past the fp32 vectors (mean, rstd, nw, nb,
// row_scale end at a PROT_NONE page). cp.async lands early / late alternately across modes.
// Tolerance (wgrad): |got - want| <= 2.5*((rtol_op + rtol_acc)*mag) + 1e-6, mag = sum_m |dy'*b'|
// (sum |dy'| for db), rtol_op = operand rounding (tf32 1/1024, 3xTF32 2e-6; fp16/bf16: one dtype
// rounding per transformed operand, 2^-11 / 2^-9, the reference does not round the prologue),
// rtol_acc = 6e-8*(M/8 + 4) (fp32 accumulation, one rounding per mma). LN: 1e-5-relative terms on
// the fp32 math plus one output rounding for dx.
//
// By hand, from the repository root:
//   g++ -O2 -std=c++20 -pthread -I/usr/local/cuda/include tests/csrc_emu/emu_wgrad.cpp -o /tmp/wg_emu
//   /tmp/wg_emu            # all cases;  /tmp/wg_emu 3 8   # cases 3 and 8
#include "emu_core.h"

#define RESFUSE_CUDA_EMULATE "../tests/csrc_emu/emu_shims.h"
#include "../../csrc/gnconv_wgrad.cu"

#include "emu_core_impl.h"

using resfuse::Prologue;

struct Case {
  const char* name;
  bool ln_bwd;          // false: pixel_wgrad; true: layernorm_rows_backward
  long M; int Nout, K;  // wgrad: dw is Nout x K; ln: C = K (Nout unused)
  int pad_a, pad_b;     // wgrad: ld_dy = Nout + pad_a, ldb = K + pad_b; ln: ldx / ld_dy = C + pad_a, ld_dx = C + pad_b
  bool db;              // wgrad: db requested; ln: dnw/dnb + mean/rstd outputs requested
  long HW;              // wgrad: row_scale with M / HW images (0: none); ln: unused
  Prologue pro; bool affine;  // wgrad prologue; LN affine (nw/nb given) / ln: nw given
  bool nonfinite;       // NaN in an input
  int misalign;         // elements to offset dy (wgrad) / x (ln) by: element-wise loads
};

struct Checker {
  int bad = 0; double worst = 0;
  void operator()(const char* what, long i, double got, double want, double tol) {
    bool ok;
    if (!std::isfinite(want)) ok = (std::isnan(want) && std::isnan(got)) || got == want;
    else {
      const double e = std::fabs(got - want);
      ok = e <= tol;
      if (std::isfinite(got)) worst = std::max(worst, e / tol);
    }
    if (!ok && bad++ < 5) std::printf("  mismatch %s[%ld] got %.8g want %.8g (tol %.3g)\n", what, i, got, want, tol);
  }
};

// NaN-filled fp32 output with kGuard floats each side.
struct Out {
  static constexpr long kGuard = 32;
  std::vector<float> v;
  explicit Out(long n) : v(n + 2 * kGuard, NAN) {}
  float* p() { return v.data() + kGuard; }
  int guards() const {
    int b = 0;
    for (long i = 0; i < kGuard; ++i) b += !std::isnan(v[i]) + !std::isnan(v[v.size() - 1 - i]);
    return b;
  }
};

static double gelu(double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }

static int finish(int bad, int guard_bad) {
  if (bad > 5) std::printf("  ... %d mismatches in all\n", bad);
  if (guard_bad) std::printf("  %d writes outside the outputs (guard regions / gaps)\n", guard_bad);
  return bad + guard_bad + emu_violations();
}

struct Result { int fails; double worst; long long cp, ldg; };

static Result run_wgrad(const Case& cs, DType dt, bool tf32, std::mt19937& rng) {
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const long M = cs.M, mis = cs.misalign;
  const int Nout = cs.Nout, K = cs.K;
  const long ld_dy = Nout + cs.pad_a, ldb = K + cs.pad_b;
  const long ndy = M * ld_dy, nb = M * ldb;
  Buf dy(dt, ndy + mis), b(dt, nb);
  for (long i = 0; i < ndy; ++i) dy.set(i + mis, U(rng));
  for (long i = 0; i < nb; ++i) b.set(i, 2.f * U(rng));
  if (cs.nonfinite && M > 12 && Nout > 3 && K > 7) { dy.set(mis + 5 * ld_dy + 3, NAN); b.set(10 * ldb + 7, NAN); }
  const long nimg = cs.HW ? (M + cs.HW - 1) / cs.HW : 0;
  std::vector<float> rs(nimg), mean(M), rstd(M), nw(K), nbv(K);
  for (auto& v : rs) v = 1.5f * U(rng);
  for (long m = 0; m < M; ++m) { mean[m] = 0.3f * U(rng); rstd[m] = 1.f + 0.5f * U(rng); }
  for (int k = 0; k < K; ++k) { nw[k] = 1.f + 0.5f * U(rng); nbv[k] = 0.5f * U(rng); }
  GuardedVec g_rs(rs), g_mean(mean), g_rstd(rstd), g_nw(nw), g_nb(nbv);
  resfuse::PixelWgradParams p{};
  p.dy = dy.at(mis); p.ld_dy = ld_dy; p.b = b.at(0); p.ldb = ldb;
  p.prologue = cs.pro;
  const bool ln = cs.pro == Prologue::kLayerNorm;
  p.mean = ln ? g_mean.data : nullptr; p.rstd = ln ? g_rstd.data : nullptr;
  p.norm_weight = ln && cs.affine ? g_nw.data : nullptr; p.norm_bias = ln && cs.affine ? g_nb.data : nullptr;
  p.row_scale = cs.HW ? g_rs.data : nullptr; p.HW = cs.HW;
  p.M = M; p.K = K; p.Nout = Nout; p.dtype = dt; p.allow_tf32 = tf32;
  Out dw(long(Nout) * K), db(Nout);
  p.dw = dw.p(); p.db = cs.db ? db.p() : nullptr;
  const size_t wsb = resfuse::pixel_wgrad_workspace_bytes(p);
  Out ws(long(wsb / 4));
  p.workspace = wsb ? ws.p() : nullptr; p.workspace_bytes = wsb;
  const long chunks = wsb / 4 / (long(Nout) * (K + 1));
  if (std::strstr(cs.name, "chunks=") && chunks != std::atol(std::strstr(cs.name, "chunks=") + 7)) {
    std::printf("  workspace holds %ld chunks, the case name says otherwise\n", chunks);
    return {1, 0, 0, 0};
  }
  auto last = [](long rows, long ld, long w) { return rows > 0 ? (rows - 1) * ld + w : 0; };
  emu::readable = {dy.range(mis, mis + last(M, ld_dy, Nout)), b.range(0, last(M, ldb, K))};
  for (const GuardedVec* g : {&g_rs, &g_mean, &g_rstd, &g_nw, &g_nb})
    emu::readable.push_back({(const char*)g->data, (const char*)(g->data) + 4 * (g == &g_rs ? nimg : g == &g_nw || g == &g_nb ? K : M)});
  emu::stats = {};
  emu::smem_overrun = 0;
  if (const char* err = resfuse::pixel_wgrad_launch(p, nullptr)) { std::printf("  launch error: %s\n", err); return {1, 0, 0, 0}; }

  // float64 reference of the transformed operands
  std::vector<double> dyp(M * Nout), bp(M * long(K));
  for (long m = 0; m < M; ++m) {
    const double s = cs.HW ? rs[m / cs.HW] : 1.0;
    for (int n = 0; n < Nout; ++n) dyp[m * Nout + n] = double(dy.get(mis + m * ld_dy + n)) * s;
    for (int k = 0; k < K; ++k) {
      const double v = b.get(m * ldb + k);
      double o = v;
      if (ln) o = (v - mean[m]) * rstd[m] * (cs.affine ? nw[k] : 1.0) + (cs.affine ? nbv[k] : 0.0);
      if (cs.pro == Prologue::kGelu) o = gelu(v);
      bp[m * K + k] = o;
    }
  }
  const double u16 = dt == DType::kFloat16 ? 1.0 / 2048 : 1.0 / 512;
  double rtol_op = dt == DType::kFloat32 ? (tf32 ? 1.0 / 1024 : 2e-6) : 0.0;
  if (dt != DType::kFloat32) rtol_op = (cs.HW ? u16 : 0) + (cs.pro != Prologue::kNone ? u16 : 0);
  const double rtol_acc = 6e-8 * (double(M) / 8 + 4), rtol_db = (dt == DType::kFloat32 ? rtol_op / 2 : (cs.HW ? u16 : 0));
  Checker chk;
  for (int n = 0; n < Nout; ++n) {
    for (int k = 0; k < K; ++k) {
      double acc = 0, mag = 0;
      for (long m = 0; m < M; ++m) { const double t = dyp[m * Nout + n] * bp[m * K + k]; acc += t; mag += std::fabs(t); }
      chk("dw", long(n) * K + k, dw.p()[long(n) * K + k], acc, 2.5 * (rtol_op + rtol_acc) * mag + 1e-6);
    }
    if (cs.db) {
      double acc = 0, mag = 0;
      for (long m = 0; m < M; ++m) { acc += dyp[m * Nout + n]; mag += std::fabs(dyp[m * Nout + n]); }
      chk("db", n, db.p()[n], acc, 2.5 * (rtol_db + rtol_acc) * mag + 1e-6);
    }
  }
  int guard_bad = dw.guards() + (cs.db ? db.guards() : 0) + ws.guards();
  if (!cs.db) for (float v : db.v) guard_bad += !std::isnan(v);
  return {finish(chk.bad, guard_bad), chk.worst, emu::stats.cp, emu::stats.ldg};
}

static Result run_ln(const Case& cs, DType dt, std::mt19937& rng) {
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const long M = cs.M, mis = cs.misalign;
  const int C = cs.K;
  const long ldx = C + cs.pad_a, ldo = C + cs.pad_b;
  Buf x(dt, M * ldx + mis), dy(dt, M * ldx), dx(dt, M * ldo);
  for (long m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) {
      x.set(mis + m * ldx + c, 0.5f + 2.f * U(rng) + 0.01f * float(m % 7));
      dy.set(m * ldx + c, U(rng));
    }
  if (cs.nonfinite && M > 3) x.set(mis + 3 * ldx + C / 2, NAN);
  for (long i = -Buf::kGuard; i < M * ldo + Buf::kGuard; ++i) dx.set(i, NAN);
  std::vector<float> nw(C);
  for (auto& v : nw) v = 1.f + 0.5f * U(rng);
  GuardedVec g_nw(nw);
  Out mo(M), ro(M), dnw(C), dnb(C);
  resfuse::LayerNormRowsBwdParams p{};
  p.x = x.at(mis); p.ldx = ldx; p.dy = dy.at(0); p.ld_dy = ldx;
  p.norm_weight = cs.affine ? g_nw.data : nullptr; p.eps = 1e-5f;
  p.dx = dx.at(0); p.ld_dx = ldo;
  if (cs.db) { p.mean_out = mo.p(); p.rstd_out = ro.p(); p.dnw = dnw.p(); p.dnb = dnb.p(); }
  p.M = M; p.C = C; p.dtype = dt;
  const size_t wsb = resfuse::layernorm_rows_backward_workspace_bytes(p);
  Out ws(long(wsb / 4));
  p.workspace = ws.p(); p.workspace_bytes = wsb;
  const long lastx = M > 0 ? (M - 1) * ldx + C : 0;
  emu::readable = {x.range(mis, mis + lastx), dy.range(0, lastx),
                   {(const char*)g_nw.data, (const char*)(g_nw.data + C)}};
  emu::stats = {};
  emu::smem_overrun = 0;
  if (const char* err = resfuse::layernorm_rows_backward_launch(p, nullptr)) {
    std::printf("  launch error: %s\n", err); return {1, 0, 0, 0};
  }
  const double rout = dt == DType::kFloat32 ? 1.2e-7 : (dt == DType::kFloat16 ? 1.0 / 1024 : 1.0 / 128);
  Checker chk;
  std::vector<double> sw(C, 0), sb(C, 0), magw(C, 0), magb(C, 0);
  int guard_bad = 0;
  for (long m = 0; m < M; ++m) {
    double mean = 0, var = 0, mg = 0, mgx = 0;
    for (int c = 0; c < C; ++c) mean += x.get(mis + m * ldx + c);
    mean /= C;
    for (int c = 0; c < C; ++c) { const double d = x.get(mis + m * ldx + c) - mean; var += d * d; }
    var /= C;
    const double rstd = 1 / std::sqrt(var + 1e-5);
    auto xh = [&](int c) { return (x.get(mis + m * ldx + c) - mean) * rstd; };
    auto gv = [&](int c) { return double(dy.get(m * ldx + c)) * (cs.affine ? nw[c] : 1.0); };
    double amg = 0, amgx = 0;
    for (int c = 0; c < C; ++c) { mg += gv(c); mgx += gv(c) * xh(c); amg += std::fabs(gv(c)); amgx += std::fabs(gv(c) * xh(c)); }
    mg /= C; mgx /= C; amg /= C; amgx /= C;
    for (int c = 0; c < C; ++c) {
      const double want = rstd * (gv(c) - mg - xh(c) * mgx);
      const double mag = rstd * (std::fabs(gv(c)) + amg + std::fabs(xh(c)) * amgx + std::fabs(xh(c)) * amgx);
      chk("dx", m * ldo + c, dx.get(m * ldo + c), want, 2.5 * (rout * std::fabs(want) + 1e-5 * mag) + 1e-6);
      const double d = dy.get(m * ldx + c);
      sw[c] += d * xh(c); magw[c] += std::fabs(d * xh(c)); sb[c] += d; magb[c] += std::fabs(d);
    }
    for (long c = C; c < ldo; ++c) guard_bad += !std::isnan(dx.get(m * ldo + c));
    if (cs.db) {
      chk("mean", m, mo.p()[m], mean, 1e-5 * (std::fabs(mean) + 1) + 1e-6);
      chk("rstd", m, ro.p()[m], rstd, 1e-5 * rstd);
    }
  }
  if (cs.db)
    for (int c = 0; c < C; ++c) {
      chk("dnw", c, dnw.p()[c], sw[c], 2e-5 * magw[c] + 1e-6);
      chk("dnb", c, dnb.p()[c], sb[c], 1e-5 * magb[c] + 1e-6);
    }
  for (long i = -Buf::kGuard; i < 0; ++i) guard_bad += !std::isnan(dx.get(i)) + !std::isnan(dx.get(M * ldo - 1 - i));
  guard_bad += mo.guards() + ro.guards() + dnw.guards() + dnb.guards() + ws.guards();
  if (!cs.db) for (const Out* o : {&mo, &ro, &dnw, &dnb}) for (float v : o->v) guard_bad += !std::isnan(v);
  return {finish(chk.bad, guard_bad), chk.worst, emu::stats.cp, emu::stats.ldg};
}

// Launcher validation: every bad field gets its static error string (naming the field) and no
// launch; checked without running a kernel (emu::readable empty: a launch would count bad reads).
static int check_validation() {
  int bad = 0;
  float f[64] = {};
  auto expect = [&](const char* what, const char* err, const char* needle) {
    if (!err || !std::strstr(err, needle)) {
      std::printf("  validation %s: got \"%s\", want an error naming \"%s\"\n", what, err ? err : "(success)", needle);
      ++bad;
    }
  };
  auto wg = [&] {
    resfuse::PixelWgradParams p{};
    p.dy = f; p.ld_dy = 8; p.b = f; p.ldb = 8; p.dw = f; p.M = 4; p.K = 8; p.Nout = 8; p.dtype = DType::kFloat32;
    return p;
  };
  resfuse::PixelWgradParams p = wg();
  p.dy = nullptr; expect("dy null", resfuse::pixel_wgrad_launch(p, nullptr), "dy, b and dw");
  p = wg(); p.dw = nullptr; expect("dw null", resfuse::pixel_wgrad_launch(p, nullptr), "dy, b and dw");
  p = wg(); p.M = -1; expect("M < 0", resfuse::pixel_wgrad_launch(p, nullptr), "M must");
  p = wg(); p.K = -1; expect("K < 0", resfuse::pixel_wgrad_launch(p, nullptr), "K must");
  p = wg(); p.Nout = -1; expect("Nout < 0", resfuse::pixel_wgrad_launch(p, nullptr), "Nout must");
  p = wg(); p.ld_dy = 7; expect("ld_dy < Nout", resfuse::pixel_wgrad_launch(p, nullptr), "ld_dy must");
  p = wg(); p.ldb = 7; expect("ldb < K", resfuse::pixel_wgrad_launch(p, nullptr), "ldb must");
  p = wg(); p.row_scale = f; p.HW = 0; expect("HW < 1", resfuse::pixel_wgrad_launch(p, nullptr), "HW must");
  p = wg(); p.prologue = Prologue::kLayerNorm; p.mean = f;
  expect("LN without rstd", resfuse::pixel_wgrad_launch(p, nullptr), "rstd");
  p = wg(); p.dtype = DType(7); expect("dtype", resfuse::pixel_wgrad_launch(p, nullptr), "dtype");
  p = wg(); p.M = 100000; p.workspace = f; p.workspace_bytes = 4;
  expect("workspace too small", resfuse::pixel_wgrad_launch(p, nullptr), "workspace");
  auto lnp = [&] {
    resfuse::LayerNormRowsBwdParams q{};
    q.x = f; q.ldx = 8; q.dy = f; q.ld_dy = 8; q.dx = f; q.ld_dx = 8; q.M = 4; q.C = 8; q.dtype = DType::kFloat16;
    return q;
  };
  resfuse::LayerNormRowsBwdParams q = lnp();
  q.x = nullptr; expect("x null", resfuse::layernorm_rows_backward_launch(q, nullptr), "x, dy and dx");
  q = lnp(); q.M = -1; expect("ln M < 0", resfuse::layernorm_rows_backward_launch(q, nullptr), "M must");
  q = lnp(); q.C = -1; expect("C < 0", resfuse::layernorm_rows_backward_launch(q, nullptr), "C must be >= 0");
  q = lnp(); q.ld_dx = 7; expect("ld_dx < C", resfuse::layernorm_rows_backward_launch(q, nullptr), "ld_dx must");
  q = lnp(); q.C = 5000; q.ldx = q.ld_dy = q.ld_dx = 5000; q.dnw = f;
  expect("C > 4096 with dnw", resfuse::layernorm_rows_backward_launch(q, nullptr), "C must be <= 4096");
  q = lnp(); q.dnb = f; q.workspace = f; q.workspace_bytes = 4;
  expect("ln workspace too small", resfuse::layernorm_rows_backward_launch(q, nullptr), "workspace");
  q = lnp(); q.dtype = DType(9); expect("ln dtype", resfuse::layernorm_rows_backward_launch(q, nullptr), "dtype");
  std::printf("validation: %s\n", bad ? "FAIL" : "ok");
  return bad;
}

int main(int argc, char** argv) {
  start_driver();
  const Prologue N0 = Prologue::kNone, LN = Prologue::kLayerNorm, GE = Prologue::kGelu;
  // name, ln_bwd, M, Nout, K, pad_a, pad_b, db, HW, prologue, affine, nonfinite, misalign
  const Case cases[] = {
    {"wgrad Nout=64 K=64 M=96 db vec", false, 96, 64, 64, 0, 0, true, 0, N0, false, false, 0},
    {"wgrad Nout=40 K=72 M=100 no db vec", false, 100, 40, 72, 0, 0, false, 0, N0, false, false, 0},
    {"wgrad slices ld_dy=80 ldb=100 Nout=48 K=72 M=64 db", false, 64, 48, 72, 32, 28, true, 0, N0, false, false, 0},
    {"wgrad row_scale HW=20 (3 images) Nout=32 K=96 M=60 db", false, 60, 32, 96, 0, 0, true, 20, N0, false, false, 0},
    {"wgrad LN prologue nw nb Nout=64 K=48 M=80 db", false, 80, 64, 48, 0, 0, true, 0, LN, true, false, 0},
    {"wgrad LN prologue no affine + row_scale HW=16 Nout=16 K=32 M=48", false, 48, 16, 32, 0, 8, true, 16, LN, false, false, 0},
    {"wgrad GELU prologue Nout=24 K=40 M=70 db", false, 70, 24, 40, 0, 0, true, 0, GE, false, false, 0},
    {"wgrad Nout=37 K=21 M=90 element-wise db", false, 90, 37, 21, 0, 0, true, 0, N0, false, false, 0},
    {"wgrad chunks=3 ragged Nout=72 K=72 M=520 db vec", false, 520, 72, 72, 0, 0, true, 0, N0, false, false, 0},
    {"wgrad M=0 zeros Nout=20 K=12 db", false, 0, 20, 12, 0, 0, true, 0, N0, false, false, 0},
    {"wgrad NaN in dy and b Nout=16 K=24 M=40 db", false, 40, 16, 24, 0, 0, true, 0, N0, false, true, 0},
    {"wgrad misaligned dy + GELU Nout=32 K=64 M=50 db", false, 50, 32, 64, 0, 0, true, 10, GE, false, false, 1},
    {"wgrad K=0 db only chunks=3 Nout=16 M=600", false, 600, 16, 0, 0, 0, true, 0, N0, false, false, 0},
    {"ln C=16 M=40 all outputs", true, 40, 0, 16, 0, 0, true, 0, N0, true, false, 0},
    {"ln C=37 M=29 all outputs ld slices", true, 29, 0, 37, 5, 3, true, 0, N0, true, false, 1},
    {"ln C=200 M=50 all outputs", true, 50, 0, 200, 0, 0, true, 0, N0, true, false, 0},
    {"ln C=37 M=20 dx only", true, 20, 0, 37, 0, 0, false, 0, N0, true, false, 0},
    {"ln C=200 M=19 no nw dx only", true, 19, 0, 200, 0, 0, false, 0, N0, false, false, 0},
    {"ln C=300 M=200 all outputs several rounds", true, 200, 0, 300, 0, 0, true, 0, N0, true, false, 0},
    {"ln C=16 M=0 zeros", true, 0, 0, 16, 0, 0, true, 0, N0, true, false, 0},
    {"ln C=16 M=24 NaN in x", true, 24, 0, 16, 0, 0, true, 0, N0, true, true, 0},
  };
  const int ncases = int(sizeof(cases) / sizeof(cases[0]));
  std::vector<bool> selected;  // no arguments: every case
  if (!select_cases(argc, argv, ncases, selected)) return 2;
  int runs = 0, fails = 0;
  const int vbad = check_validation();
  for (int ci = 0; ci < ncases; ++ci) {
    if (!selected[ci]) continue;
    for (int mi = 0; mi < 4; ++mi) {
      const MathMode& md = kMathModes[mi];
      emu::late_landing = (ci + mi) % 2 == 1;
      const char* landing = emu::late_landing ? "late" : "early";
      std::snprintf(g_current, sizeof(g_current), "%d %s %s %s", ci, md.n, landing, cases[ci].name);
      std::mt19937 rng(777 + ci);
      const Result r = cases[ci].ln_bwd ? run_ln(cases[ci], md.d, rng) : run_wgrad(cases[ci], md.d, md.tf32, rng);
      std::printf("case %d %s %s %s: %s (max err/tol %.3f, cp.async %lld, checked loads %lld)\n", ci, md.n, landing,
                  cases[ci].name, r.fails ? "FAIL" : "ok", r.worst, r.cp, r.ldg);
      std::fflush(stdout);
      ++runs;
      fails += r.fails != 0;
    }
  }
  std::printf("emu: %d cases, %d ok, %d failed\n", runs, runs - fails, fails);
  return fails != 0 || vbad != 0;
}
