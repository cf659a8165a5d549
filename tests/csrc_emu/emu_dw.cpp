// CPU emulator driver for csrc/gnconv_dw.cu (dwconv_gate forward, dwconv_gate_backward): the only
// execution evidence for those kernels on machines without a GPU (tests/test_csrc_gnconv_dw_emulation.py
// builds and runs it). The engine, what it emulates and what it cannot catch: emu.cpp's header and
// emu_core.h. Per case and dtype {f16, bf16, f32}: the forward and (when the case asks) the backward
// against a float64 reference of the formulas in csrc/gnconv.h / the .cu header, on the rounded
// inputs. Checks, each a failure: every output element within tolerance (NaN must be NaN, +-Inf
// the same Inf), outputs pre-filled with NaN (unwritten elements fail) with NaN guard regions
// before and after and NaN in the gaps of ld > S rows (stray writes fail), the workspace
// pre-filled with NaN (partials must be overwritten, not accumulated into), out-of-range and
// misaligned global reads, writes past the shared buffer, reads past the weight / bias vectors
// (SIGSEGV: they end at a PROT_NONE page). Plus launcher validation (error strings, nothing
// launched).
// Tolerance: |got - want| <= 2.5*(rtol_acc*mag + rtol_out*|want|) + 1e-6, mag = sum |terms|,
// rtol_acc = 1e-6 + 6e-8 * (number of fp32 additions on the longest chain, bounded generously),
// rtol_out = one rounding to the dtype (fp16 1/1024, bf16 1/128, fp32 1.2e-7; 0 for dw/db).
//
// By hand, from the repository root:
//   g++ -O2 -std=c++20 -pthread -I/usr/local/cuda/include tests/csrc_emu/emu_dw.cpp -o /tmp/dw_emu
//   /tmp/dw_emu            # all cases x {f16, bf16, f32}
//   /tmp/dw_emu 3 7        # cases 3 and 7 only
// Output: "case <i> <dtype> <name>: ok|FAIL (...)" per case and dtype, "validation: ok|FAIL (...)",
// then "emu: <n> cases, <k> ok, <f> failed"; exit status 0 iff nothing failed.
#include "emu_core.h"

#define RESFUSE_CUDA_EMULATE "../tests/csrc_emu/emu_shims.h"
// 4 partial slots per channel block (512 on the GPU): cases with more than 4 weight-gradient tiles
// run CTAs that reduce several tiles (and a ragged last slot), small cases one tile per CTA.
#define RESFUSE_DW_MAX_SLOTS 4
#include "../../csrc/gnconv_dw.cu"

#include "emu_core_impl.h"

struct Case {
  const char* name;
  int N, H, W, S, k;
  int d0;          // n_pwa
  bool slice;      // abc = tail of f, pwa = head of f (ld_abc = ld_pwa = d0 + S); else own buffers
  int ldx;         // extra elements in ld_out / ld_dabc / ld_dg / ld_gates (and ld_abc when !slice)
  bool gates;      // gates given (no conv)
  bool bias;
  int misalign;    // elements every activation pointer is offset by
  bool nonfinite;  // NaN / +Inf / -Inf in abc (and dg)
  int bwd;         // bits: 1 dabc, 2 dw_dw, 4 db_dw; 8: pass abc = nullptr to the backward
};

// Output buffer of `rows` rows (ld) with S valid columns at offset mis, all else must stay NaN.
struct OutCheck {
  int bad = 0;
  double worst = 0;
  void cmp(double got, double want, double mag, double rtol_acc, double rtol_out, const char* what, long i) {
    bool ok;
    if (!std::isfinite(want)) {
      ok = (std::isnan(want) && std::isnan(got)) || (std::isinf(want) && got == want);
    } else {
      const double tol = std::isfinite(mag) ? 2.5 * (rtol_acc * mag + rtol_out * std::fabs(want)) + 1e-6
                                            : 2.5 * rtol_out * std::fabs(want) + 1e-6;
      const double e = std::fabs(got - want);
      ok = e <= tol;
      if (std::isfinite(got)) worst = std::max(worst, e / tol);
    }
    if (!ok && bad++ < 5) std::printf("  mismatch %s[%ld] got %.8g want %.8g (mag %.3g)\n", what, i, got, want, mag);
  }
};

static bool nan_everywhere_else(Buf& b, long lo, long hi, long M, long ld, int S, long mis, const char* what) {
  int stray = 0;
  for (long i = lo; i < hi; ++i) {
    const long j = i - mis;
    const bool output = j >= 0 && j < M * ld && j % ld < S;
    if (!output && !std::isnan(b.get(i))) ++stray;
  }
  if (stray) std::printf("  %d writes outside %s's outputs (guards / ld gaps)\n", stray, what);
  return stray == 0;
}


struct Result { int fails; double worst; long long ldg; int tps = 0; };

static emu::Range vrange(const float* p, long n) { return {(const char*)p, (const char*)(p + n)}; }

static Result run_case(const Case& cs, DType dt, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const int N = cs.N, H = cs.H, W = cs.W, S = cs.S, k = cs.k, d0 = cs.d0, h2 = k / 2;
  const long M = long(N) * H * W, mis = cs.misalign;
  const long ld_f = cs.slice ? d0 + S : 0;
  const long ld_abc = cs.slice ? ld_f : S + cs.ldx, ld_pwa = cs.slice ? ld_f : d0 + cs.ldx;
  const long ld_o = S + cs.ldx;  // out, dabc, dg, gates
  Buf f(dt, cs.slice ? M * ld_f + mis : 1), abcb(dt, M * ld_abc + mis), pwab(dt, M * ld_pwa + mis + 1);
  Buf gates(dt, M * ld_o + mis), dg(dt, M * ld_o + mis), out(dt, M * ld_o + mis), dabc(dt, M * ld_o + mis);
  Buf& abc_buf = cs.slice ? f : abcb;
  Buf& pwa_buf = cs.slice ? f : pwab;
  const long abc_off = cs.slice ? mis + d0 : mis, pwa_off = mis;
  auto ABC = [&](long m, int c) { return abc_off + m * ld_abc + c; };
  auto PWA = [&](long m, int c) { return pwa_off + m * ld_pwa + c; };
  auto O = [&](long m, int c) { return mis + m * ld_o + c; };
  // NaN everywhere first (ld gaps of inputs must never be read into a result), then the values
  for (Buf* b : {&f, &abcb, &pwab, &gates, &dg})
    for (long i = -Buf::kGuard; i < b->n + Buf::kGuard; ++i) b->set(i, NAN);
  for (long m = 0; m < M; ++m) {
    for (int c = 0; c < S; ++c) {
      abc_buf.set(ABC(m, c), U(rng)); gates.set(O(m, c), U(rng)); dg.set(O(m, c), U(rng));
    }
    for (int c = 0; c < d0; ++c) pwa_buf.set(PWA(m, c), U(rng));
  }
  if (cs.nonfinite) {
    abc_buf.set(ABC(M / 2, 1), NAN); abc_buf.set(ABC(1, 2), INFINITY); abc_buf.set(ABC(M - 1, S - 1), -INFINITY);
    dg.set(O(M / 3, 0), INFINITY); dg.set(O(2, 3), NAN); dg.set(O(0, 5), -INFINITY);  // (0, 0): padding columns
  }
  for (Buf* b : {&out, &dabc})
    for (long i = -Buf::kGuard; i < b->n + Buf::kGuard; ++i) b->set(i, NAN);
  std::vector<float> wv(size_t(S) * k * k), bv(S);
  for (float& x : wv) x = U(rng);
  for (float& x : bv) x = U(rng);
  GuardedVec w_g(wv), b_g(bv);
  const float scale = 0.75f;
  const int d = cs.d0;
  auto region = [&](Buf& b, long off, long ld, int cols) { return b.range(off, off + (M - 1) * ld + cols); };

  // ---- forward ----
  resfuse::DwGateParams p{};
  p.abc = abc_buf.at(abc_off); p.ld_abc = ld_abc;
  p.w_dw = w_g.data; p.b_dw = cs.bias ? b_g.data : nullptr; p.ksize = k;
  p.gates = cs.gates ? gates.at(mis) : nullptr; p.ld_gates = ld_o;
  p.pwa = d > 0 ? pwa_buf.at(pwa_off) : nullptr; p.ld_pwa = ld_pwa; p.n_pwa = d;
  p.scale = scale; p.out = out.at(mis); p.ld_out = ld_o;
  p.N = N; p.H = H; p.W = W; p.S = S; p.dtype = dt;
  emu::readable = {vrange(w_g.data, long(wv.size())), vrange(b_g.data, S)};
  if (cs.gates) emu::readable.push_back(region(gates, mis, ld_o, S));
  else emu::readable.push_back(region(abc_buf, abc_off, ld_abc, S));
  if (d > 0) emu::readable.push_back(region(pwa_buf, pwa_off, ld_pwa, d));
  emu::stats = {};
  emu::smem_overrun = 0;
  int fails = 0;
  long long ldg = 0;
  if (const char* err = resfuse::dwconv_gate_launch(p, nullptr)) { std::printf("  launch error: %s\n", err); return {1, 0, 0}; }
  fails += emu_violations();
  ldg += emu::stats.ldg;
  const double rtol_out = dt == DType::kFloat32 ? 1.2e-7 : (dt == DType::kFloat16 ? 1.0 / 1024 : 1.0 / 128);
  OutCheck oc;
  const double rtol_fwd = 1e-6 + 6e-8 * k * k;
  for (long m = 0; m < M; ++m) {
    const int n = int(m / (long(H) * W)), h = int(m / W % H), w = int(m % W);
    for (int c = 0; c < S; ++c) {
      double acc = 0, mag = 0;
      if (cs.gates) {
        acc = gates.get(O(m, c)); mag = std::fabs(acc);
      } else {
        for (int r = 0; r < k; ++r)
          for (int s = 0; s < k; ++s) {
            const int ih = h + r - h2, iw = w + s - h2;
            if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
            const double t = double(abc_buf.get(ABC((long(n) * H + ih) * W + iw, c))) * wv[(size_t(c) * k + r) * k + s];
            acc += t; mag += std::fabs(t);
          }
        if (cs.bias) { acc += bv[c]; mag += std::fabs(bv[c]); }
      }
      double y = scale * acc;
      mag *= std::fabs(scale);
      if (c < d) { const double pv = pwa_buf.get(PWA(m, c)); y *= pv; mag *= std::fabs(pv); }
      oc.cmp(out.get(O(m, c)), y, mag, rtol_fwd, rtol_out, "out", m * S + c);
    }
  }
  if (oc.bad > 5) std::printf("  ... %d mismatches in out\n", oc.bad);
  fails += oc.bad + !nan_everywhere_else(out, -Buf::kGuard, out.n + Buf::kGuard, M, ld_o, S, mis, "out");
  double worst = oc.worst;
  if (!cs.bwd) return {fails, worst, ldg};

  // ---- backward ----
  const bool want_dabc = cs.bwd & 1, want_dw = cs.bwd & 2, want_db = cs.bwd & 4, null_abc = cs.bwd & 8;
  const long kk = long(k) * k, G = 64;
  std::vector<float> dwv(size_t(S * kk + 2 * G), NAN), dbv(size_t(S + 2 * G), NAN);
  resfuse::DwGateBwdParams q{};
  q.dg = dg.at(mis); q.ld_dg = ld_o;
  q.abc = null_abc ? nullptr : abc_buf.at(abc_off); q.ld_abc = ld_abc;
  q.w_dw = w_g.data; q.ksize = k; q.scale = scale;
  q.dabc = want_dabc ? dabc.at(mis) : nullptr; q.ld_dabc = ld_o;
  q.dw_dw = want_dw ? dwv.data() + G : nullptr; q.db_dw = want_db ? dbv.data() + G : nullptr;
  q.N = N; q.H = H; q.W = W; q.S = S; q.dtype = dt;
  const size_t wsb = resfuse::dwconv_gate_backward_workspace_bytes(q);
  std::vector<float> ws(wsb / 4 + 1, NAN);
  q.workspace = ws.data(); q.workspace_bytes = wsb;
  emu::readable = {vrange(w_g.data, long(wv.size())), region(dg, mis, ld_o, S)};
  if (!null_abc) emu::readable.push_back(region(abc_buf, abc_off, ld_abc, S));
  emu::stats = {};
  emu::smem_overrun = 0;
  if (const char* err = resfuse::dwconv_gate_backward_launch(q, nullptr)) { std::printf("  backward launch error: %s\n", err); return {fails + 1, worst, ldg}; }
  fails += emu_violations();
  ldg += emu::stats.ldg;
  OutCheck ob;
  for (long m = 0; m < M && want_dabc; ++m) {
    const int n = int(m / (long(H) * W)), h = int(m / W % H), w = int(m % W);
    for (int c = 0; c < S; ++c) {
      double acc = 0, mag = 0;
      for (int r = 0; r < k; ++r)
        for (int s = 0; s < k; ++s) {
          const int ih = h - r + h2, iw = w - s + h2;
          if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
          const double t = double(dg.get(O((long(n) * H + ih) * W + iw, c))) * wv[(size_t(c) * k + r) * k + s];
          acc += t; mag += std::fabs(t);
        }
      ob.cmp(dabc.get(O(m, c)), scale * acc, std::fabs(scale) * mag, rtol_fwd, rtol_out, "dabc", m * S + c);
    }
  }
  if (want_dabc) fails += !nan_everywhere_else(dabc, -Buf::kGuard, dabc.n + Buf::kGuard, M, ld_o, S, mis, "dabc");
  else fails += !nan_everywhere_else(dabc, -Buf::kGuard, dabc.n + Buf::kGuard, 0, ld_o, S, mis, "dabc (null)");
  const double rtol_w = 1e-6 + 6e-8 * (kk + 64 + M / 16);
  for (int c = 0; c < S; ++c) {
    for (long tap = 0; tap <= kk; ++tap) {
      if (tap < kk ? !want_dw : !want_db) continue;
      const int r = int(tap / k), s = int(tap % k);
      double acc = 0, mag = 0;
      for (long m = 0; m < M; ++m) {
        const int n = int(m / (long(H) * W)), h = int(m / W % H), w = int(m % W);
        const double gv = dg.get(O(m, c));
        double av = 1;
        if (tap < kk) {
          const int ih = h + r - h2, iw = w + s - h2;
          if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
          av = abc_buf.get(ABC((long(n) * H + ih) * W + iw, c));
        }
        acc += gv * av; mag += std::fabs(gv * av);
      }
      const double got = tap < kk ? dwv[size_t(G + c * kk + tap)] : dbv[size_t(G + c)];
      ob.cmp(got, scale * acc, std::fabs(scale) * mag, rtol_w, 0, tap < kk ? "dw_dw" : "db_dw", tap < kk ? c * kk + tap : c);
    }
  }
  if (ob.bad > 5) std::printf("  ... %d mismatches in the backward\n", ob.bad);
  fails += ob.bad;
  int stray = 0;
  for (size_t i = 0; i < dwv.size(); ++i)
    stray += !std::isnan(dwv[i]) && (!want_dw || i < size_t(G) || i >= size_t(G + S * kk));
  for (size_t i = 0; i < dbv.size(); ++i) stray += !std::isnan(dbv[i]) && (!want_db || i < size_t(G) || i >= size_t(G + S));
  if (stray) std::printf("  %d writes outside dw_dw / db_dw\n", stray);
  fails += stray != 0;
  const int tps = (want_dw || want_db) ? resfuse::detail::wgrad_plan(N, H, W, S, k).tps : 0;
  return {fails, std::max(worst, ob.worst), ldg, tps};
}

// Launcher validation: each call must return an error naming the field (and launch nothing), or
// succeed without launching for an empty problem.
static int validation() {
  int bad = 0;
  std::vector<float> w(49, 0.f), ws(1 << 16, 0.f);
  Buf a(DType::kFloat16, 64), o(DType::kFloat16, 64);
  auto fwd = [&] {
    resfuse::DwGateParams p{};
    p.abc = a.at(0); p.ld_abc = 8; p.w_dw = w.data(); p.ksize = 7; p.out = o.at(0); p.ld_out = 8;
    p.N = 1; p.H = 2; p.W = 2; p.S = 8; p.dtype = DType::kFloat16; p.scale = 1;
    return p;
  };
  auto bwd = [&] {
    resfuse::DwGateBwdParams q{};
    q.dg = a.at(0); q.ld_dg = 8; q.abc = a.at(0); q.ld_abc = 8; q.w_dw = w.data(); q.ksize = 7;
    q.dabc = o.at(0); q.ld_dabc = 8; q.dw_dw = w.data(); q.N = 1; q.H = 2; q.W = 2; q.S = 8;
    q.dtype = DType::kFloat16; q.workspace = ws.data(); q.workspace_bytes = ws.size() * 4;
    return q;
  };
  struct F { const char* field; resfuse::DwGateParams p; };
  std::vector<F> fc;
  { auto p = fwd(); p.out = nullptr; fc.push_back({"out", p}); }
  { auto p = fwd(); p.abc = nullptr; fc.push_back({"abc", p}); }
  { auto p = fwd(); p.w_dw = nullptr; fc.push_back({"w_dw", p}); }
  { auto p = fwd(); p.H = -1; fc.push_back({"N, H, W, S", p}); }
  { auto p = fwd(); p.ksize = 6; fc.push_back({"ksize", p}); }
  { auto p = fwd(); p.ksize = 0; fc.push_back({"ksize", p}); }
  { auto p = fwd(); p.ksize = 1025; fc.push_back({"ksize", p}); }
  { auto p = fwd(); p.ld_abc = 7; fc.push_back({"ld_abc", p}); }
  { auto p = fwd(); p.ld_out = 7; fc.push_back({"ld_out", p}); }
  { auto p = fwd(); p.n_pwa = 9; p.pwa = a.at(0); p.ld_pwa = 9; fc.push_back({"n_pwa", p}); }
  { auto p = fwd(); p.n_pwa = 4; fc.push_back({"pwa", p}); }
  { auto p = fwd(); p.n_pwa = 4; p.pwa = a.at(0); p.ld_pwa = 3; fc.push_back({"ld_pwa", p}); }
  { auto p = fwd(); p.gates = a.at(0); p.ld_gates = 4; fc.push_back({"ld_gates", p}); }
  { auto p = fwd(); p.dtype = DType(7); fc.push_back({"dtype", p}); }
  for (auto& c : fc) {
    const char* e = resfuse::dwconv_gate_launch(c.p, nullptr);
    if (!e || !std::strstr(e, c.field)) { std::printf("  forward: expected an error naming %s, got %s\n", c.field, e ? e : "success"); ++bad; }
  }
  struct B { const char* field; resfuse::DwGateBwdParams q; };
  std::vector<B> bc;
  { auto q = bwd(); q.dg = nullptr; bc.push_back({"dg", q}); }
  { auto q = bwd(); q.w_dw = nullptr; bc.push_back({"w_dw", q}); }
  { auto q = bwd(); q.abc = nullptr; bc.push_back({"abc", q}); }
  { auto q = bwd(); q.workspace = nullptr; bc.push_back({"workspace", q}); }
  { auto q = bwd(); q.workspace_bytes = resfuse::dwconv_gate_backward_workspace_bytes(q) - 4; bc.push_back({"workspace_bytes", q}); }
  { auto q = bwd(); q.S = -2; bc.push_back({"N, H, W, S", q}); }
  { auto q = bwd(); q.ksize = 4; bc.push_back({"ksize", q}); }
  { auto q = bwd(); q.ld_dg = 3; bc.push_back({"ld_dg", q}); }
  { auto q = bwd(); q.ld_abc = 3; bc.push_back({"ld_abc", q}); }
  { auto q = bwd(); q.ld_dabc = 3; bc.push_back({"ld_dabc", q}); }
  { auto q = bwd(); q.dtype = DType(9); bc.push_back({"dtype", q}); }
  for (auto& c : bc) {
    const char* e = resfuse::dwconv_gate_backward_launch(c.q, nullptr);
    if (!e || !std::strstr(e, c.field)) { std::printf("  backward: expected an error naming %s, got %s\n", c.field, e ? e : "success"); ++bad; }
  }
  // empty problems: success, nothing launched (readable is empty: any read would count)
  emu::readable.clear();
  emu::stats = {};
  { auto p = fwd(); p.N = 0; if (resfuse::dwconv_gate_launch(p, nullptr)) ++bad; }
  { auto p = fwd(); p.S = 0; if (resfuse::dwconv_gate_launch(p, nullptr)) ++bad; }
  { auto q = bwd(); q.W = 0; q.workspace_bytes = 0; if (resfuse::dwconv_gate_backward_launch(q, nullptr)) ++bad; }
  if (emu::stats.ldg) { std::printf("  an empty problem launched a kernel\n"); ++bad; }
  std::printf("validation: %s (%zu error checks, 3 empty problems)\n", bad ? "FAIL" : "ok", fc.size() + bc.size());
  return bad;
}

int main(int argc, char** argv) {
  start_driver();
  // name, N,H,W,S,k, d0, slice, ldx, gates, bias, misalign, nonfinite, bwd
  const Case cases[] = {
    {"k7 slice d0=4 S=28 (dim 16 order 3) n_pwa=d0", 2, 9, 11, 28, 7, 4, true, 0, false, true, 0, false, 7},
    {"k7 slice d0=8 S=56 vec 2x2 tiles", 1, 9, 17, 56, 7, 8, true, 0, false, true, 0, false, 7},
    {"k7 3x3 image N=3 S=16 n_pwa=S", 3, 3, 3, 16, 7, 16, false, 0, false, true, 0, false, 7},
    {"k7 H=11 W=33 S=40 ld+8 several tiles, db null", 1, 11, 33, 40, 7, 8, false, 8, false, true, 0, false, 3},
    {"k5 S=13 elementwise N=2 odd H/W", 2, 6, 7, 13, 5, 3, false, 0, false, true, 0, false, 7},
    {"k3 n_pwa=0 no bias, db only (abc null)", 1, 5, 17, 24, 3, 0, false, 0, false, false, 0, false, 12},
    {"k1 S=32 N=2", 2, 4, 9, 32, 1, 8, false, 0, false, true, 0, false, 7},
    {"k11 tile 4x8 S=8", 1, 5, 9, 8, 11, 8, false, 0, false, true, 0, false, 7},
    {"k13 large (direct forward)", 1, 9, 10, 16, 13, 0, false, 0, false, true, 0, false, 7},
    {"k31 large (direct forward and wgrad)", 1, 3, 4, 8, 31, 8, false, 0, false, true, 0, false, 7},
    {"gates given S=24 d0=8", 2, 5, 7, 24, 7, 8, false, 0, true, false, 0, false, 0},
    {"gates given S=20 d0=4 misaligned", 1, 3, 11, 20, 7, 4, false, 8, true, false, 1, false, 0},
    {"k7 misaligned by one element S=32", 1, 8, 16, 32, 7, 8, false, 0, false, true, 1, false, 7},
    {"k7 nonfinite abc/dg S=16", 1, 7, 9, 16, 7, 8, false, 0, false, true, 0, true, 7},
    {"k7 dabc only", 1, 6, 6, 16, 7, 8, false, 0, false, true, 0, false, 1},
  };
  struct Mode { const char* n; DType d; } modes[] = {{"f16", DType::kFloat16}, {"bf16", DType::kBFloat16}, {"f32", DType::kFloat32}};
  const int ncases = int(sizeof(cases) / sizeof(cases[0]));
  std::vector<bool> selected;  // no arguments: every case
  if (!select_cases(argc, argv, ncases, selected)) return 2;
  int runs = 0, fails = 0;
  for (int ci = 0; ci < ncases; ++ci) {
    if (!selected[ci]) continue;
    for (const Mode& md : modes) {
      std::snprintf(g_current, sizeof(g_current), "%d %s %s", ci, md.n, cases[ci].name);
      const Result r = run_case(cases[ci], md.d, 777 + ci);
      std::printf("case %d %s %s: %s (max err/tol %.3f, checked loads %lld, wgrad tiles/CTA %d)\n", ci, md.n,
                  cases[ci].name, r.fails ? "FAIL" : "ok", r.worst, r.ldg, r.tps);
      std::fflush(stdout);
      ++runs;
      fails += r.fails != 0;
    }
  }
  const int vbad = argc == 1 ? validation() : 0;
  std::printf("emu: %d cases, %d ok, %d failed\n", runs, runs - fails, fails);
  return fails != 0 || vbad != 0;
}
