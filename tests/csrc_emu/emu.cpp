// CPU emulator of the CUDA kernel in csrc/conv_bn_act.cu: the only execution evidence for that
// kernel on machines without a GPU (tests/test_csrc_emulation.py builds and runs it).
//
// What it emulates. The .cu file is compiled unchanged by g++ with RESFUSE_CUDA_EMULATE
// naming emu_shims.h, which replaces its device primitives (and nothing else):
//   * every CUDA thread of a CTA is a std::thread (CTAs run one after another); __syncthreads is a
//     std::barrier over the CTA; shared memory is a per-CTA buffer filled with 0xff (NaN in every
//     dtype) so a read of an unwritten byte poisons the result;
//   * staggered warps: after every __syncthreads one warp (rotating) waits until all the others
//     have reached the next barrier or exited, so a missing __syncthreads (a stage refilled while
//     a warp still reads it, or read before a warp wrote it) fails deterministically, not by luck
//     of the scheduler (EMU_STAGGER=0 turns this off, for debugging only);
//   * mma.sync (m16n8k16 f16/bf16, m16n8k8 tf32) is a barrier over the warp's 32 threads, which
//     then compute D = A*B + C from the fragment layouts of the PTX ISA tables (products summed in
//     double, rounded to float once per instruction); tf32 operands must already be tf32 values
//     (the kernel rounds with cvt.rna), their low 13 bits are dropped as the hardware does;
//   * cp.async lands either at issue ("early") or as late as the PTX rules allow, i.e. at the
//     cp.async.wait_group that covers its commit group ("late"); runs alternate the two, so a
//     missing/short wait (late) and a refill of a stage still being read (early) both show;
//   * __ldg and cp.async sources are checked against the input tensors (out-of-range reads are
//     counted and not performed) and natural alignment (16 B for cp.async, sizeof for __ldg).
// Checks per case, each a failure: every output element against a float64 reference of the
// formula in the .cu header (tolerance below), outputs pre-filled with NaN (an unwritten element
// fails), NaN guard regions before and after out (stray writes), out-of-range / misaligned global
// reads, cp.async outside shared memory, writes past the shared buffer, cp.async never waited for,
// mma.sync tf32 operands that are not tf32 values, and (SIGSEGV) reads past the end of the BN /
// bias vectors, which end at a PROT_NONE page. Inputs include NaN/Inf (one case) and a pointer
// offset by one element (element-wise loads, unpaired stores).
// Tolerance: |got - want| <= 2.5*(rtol_op*mag + 1e-6*mag + rtol_out*|want|) + 1e-6, mag = sum of
// |products| (times |BN scale|), rtol_op = operand rounding (tf32 1/1024, 3xTF32 2e-6, 16-bit 1e-6:
// the reference uses the rounded inputs), rtol_out = one rounding to the dtype (fp16 1/1024, bf16
// 1/128, fp32 1.2e-7). Non-finite references: NaN must be NaN, +-Inf the same Inf; a finite
// reference reached through an Inf (relu(-Inf) = 0) must match to the output rounding.
//
// Race detector: built with -fsanitize=thread (the test does, on a few cases) ThreadSanitizer
// checks every shared-memory access against the happens-before order of this model (barriers,
// warp barriers, cp.async landing in the issuing thread at issue or at its wait); unordered
// conflicting accesses are reported even when the run happened to compute the right numbers.
//
// What it cannot catch: real async-copy timing (only the two extremes above); hazards that exist
// only on the hardware's model and not this one (it is no replacement for compute-sanitizer
// --tool racecheck / memcheck on a GPU); the real hardware MMA (a fragment layout
// misread the same way by the kernel and by this file passes; hardware accumulation order and
// rounding inside an mma differ from the double sum here); nvcc code generation (registers,
// spills, __launch_bounds__, occupancy, bank conflicts, speed); CUDA's expf/erff/sqrtf (the host
// libm runs instead); misaligned or out-of-range *stores* beyond the guard regions (plain C++
// stores on x86 never fault); raw-pointer reads before the BN vectors' start; launch errors.
//
// By hand, from the repository root (any CUDA toolkit's include dir, for cuda_runtime.h's types):
//   g++ -O2 -std=c++20 -pthread -I/usr/local/cuda/include tests/csrc_emu/emu.cpp -o /tmp/cba_emu
//   /tmp/cba_emu          # all cases x {f16, bf16, tf32, 3xtf32}
//   /tmp/cba_emu 3 7      # cases 3 and 7 only
//   # ThreadSanitizer build, ~5x slower:
//   g++ -O1 -g -fsanitize=thread -std=c++20 -pthread -I/usr/local/cuda/include tests/csrc_emu/emu.cpp -o /tmp/cba_tsan
//   /tmp/cba_tsan 2 3 4 6
// Output: one line per case and mode, "case <i> <mode> <landing> <name>: ok|FAIL (...)", then
// "emu: <n> cases, <k> ok, <f> failed"; exit status 0 iff nothing failed. ~20-30 s on 2 cores.
#include "emu_core.h"

// Resolved relative to csrc/device_prims.cuh, the file that includes it.
#define RESFUSE_CUDA_EMULATE "../tests/csrc_emu/emu_shims.h"
#include "../../csrc/conv_bn_act.cu"

#include "emu_core_impl.h"

// ------------------------------------------------------------------------------------------------
// Driver: cases x math modes vs a float64 reference.
// ------------------------------------------------------------------------------------------------
struct Case {
  const char* name;
  int N, H, W, C, K, R, S, sh, sw, ph, pw, dh, dw;
  bool bias, bn, gamma, beta, res;
  int act;
  bool proj; int Hs, Ws, Cs, sdh, sdw; bool bias_d, bn_d;
  int misalign;      // elements to offset x, xs, out and residual by: element-wise loads, unpaired stores
  bool nonfinite;    // inject NaN / +Inf / -Inf in x
};

struct Result { int fails; double worst; long long cp, ldg; };

static const float kSlope = 0.2f;  // leaky_relu's slope, passed through the launch arguments

static Result run_case(const Case& cs, DType dt, bool tf32, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const int P = (cs.H + 2 * cs.ph - cs.dh * (cs.R - 1) - 1) / cs.sh + 1;
  const int Q = (cs.W + 2 * cs.pw - cs.dw * (cs.S - 1) - 1) / cs.sw + 1;
  const long M = long(cs.N) * P * Q;
  const long nx = long(cs.N) * cs.H * cs.W * cs.C, nw = long(cs.K) * cs.R * cs.S * cs.C, no = M * cs.K;
  const long mis = cs.misalign;
  Buf x(dt, nx + mis), w(dt, nw), out(dt, no + mis), res(dt, no + mis);
  const long nxs = cs.proj ? long(cs.N) * cs.Hs * cs.Ws * cs.Cs : 0, nwd = cs.proj ? long(cs.K) * cs.Cs : 0;
  Buf xs(dt, nxs + mis), wd(dt, nwd);
  for (long i = 0; i < nx; ++i) x.set(i + mis, U(rng));
  if (cs.nonfinite) { x.set(mis + 3 * cs.C / 2, NAN); x.set(mis + nx / 2, INFINITY); x.set(mis + nx - 1, -INFINITY); }
  for (long i = 0; i < nw; ++i) w.set(i, U(rng));
  for (long i = 0; i < no; ++i) res.set(i + mis, U(rng));
  for (long i = 0; i < nxs; ++i) xs.set(i + mis, U(rng));
  for (long i = 0; i < nwd; ++i) wd.set(i, U(rng));
  for (long i = -Buf::kGuard; i < no + mis + Buf::kGuard; ++i) out.set(i, NAN);
  std::vector<float> bias(cs.K), mean(cs.K), var(cs.K), gam(cs.K), bet(cs.K), bd(cs.K), md(cs.K), vd(cs.K), gd(cs.K), btd(cs.K);
  for (int k = 0; k < cs.K; ++k) {
    bias[k] = U(rng); mean[k] = 0.3f * U(rng); var[k] = 0.5f + U(rng) * 0.4f; gam[k] = 1.2f * U(rng); bet[k] = U(rng);
    bd[k] = U(rng); md[k] = 0.3f * U(rng); vd[k] = 0.6f + 0.3f * U(rng); gd[k] = U(rng); btd[k] = U(rng);
  }
  GuardedVec g_bias(bias), g_mean(mean), g_var(var), g_gam(gam), g_bet(bet), g_bd(bd), g_md(md), g_vd(vd), g_gd(gd),
      g_btd(btd);
  resfuse::ConvBNActParams p{};
  p.x = x.at(mis); p.weight = w.at(0); p.out = out.at(mis);
  p.bias = cs.bias ? g_bias.data : nullptr;
  p.bn_mean = cs.bn ? g_mean.data : nullptr; p.bn_var = g_var.data;
  p.bn_weight = cs.gamma ? g_gam.data : nullptr; p.bn_bias = cs.beta ? g_bet.data : nullptr; p.eps = 1e-5f;
  p.residual = cs.res ? res.at(mis) : nullptr;
  if (cs.proj) {
    p.xs = xs.at(mis); p.wd = wd.at(0); p.bias_d = cs.bias_d ? g_bd.data : nullptr;
    p.mean_d = cs.bn_d ? g_md.data : nullptr; p.var_d = g_vd.data; p.gamma_d = g_gd.data; p.beta_d = g_btd.data;
    p.eps_d = 1e-3f; p.Hs = cs.Hs; p.Ws = cs.Ws; p.Cs = cs.Cs; p.sd_h = cs.sdh; p.sd_w = cs.sdw;
  }
  p.N = cs.N; p.H = cs.H; p.W = cs.W; p.C = cs.C; p.K = cs.K; p.R = cs.R; p.S = cs.S; p.P = P; p.Q = Q;
  p.stride_h = cs.sh; p.stride_w = cs.sw; p.pad_h = cs.ph; p.pad_w = cs.pw; p.dil_h = cs.dh; p.dil_w = cs.dw;
  p.activation = cs.act; p.negative_slope = kSlope; p.dtype = dt; p.allow_tf32 = tf32;
  emu::readable = {x.range(mis, mis + nx), w.range(0, nw)};  // only what this launch may read
  if (cs.res) emu::readable.push_back(res.range(mis, mis + no));
  if (cs.proj) { emu::readable.push_back(xs.range(mis, mis + nxs)); emu::readable.push_back(wd.range(0, nwd)); }
  emu::stats = {};
  emu::smem_overrun = 0;
  const char* err = resfuse::conv_bn_act_launch(p, nullptr);
  if (err) { std::printf("  launch error: %s\n", err); return {1, 0, 0, 0}; }

  // float64 reference, plus mag = sum |terms| for the tolerance
  const double rtol_op = dt == DType::kFloat32 ? (tf32 ? 1.0 / 1024 : 2e-6) : 1e-6;  // operand rounding
  const double rtol_out = dt == DType::kFloat32 ? 1.2e-7 : (dt == DType::kFloat16 ? 1.0 / 1024 : 1.0 / 128);
  int bad = 0;
  double worst = 0;  // max |err| / tol over finite references
  for (long m = 0; m < M; ++m) {
    const int n = int(m / (long(P) * Q)), pp = int(m / Q % P), qq = int(m % Q);
    for (int k = 0; k < cs.K; ++k) {
      double acc = 0, mag = 0;
      for (int r = 0; r < cs.R; ++r)
        for (int s = 0; s < cs.S; ++s) {
          const int ih = pp * cs.sh - cs.ph + r * cs.dh, iw = qq * cs.sw - cs.pw + s * cs.dw;
          if (ih < 0 || ih >= cs.H || iw < 0 || iw >= cs.W) continue;
          for (int c = 0; c < cs.C; ++c) {
            const double a = x.get(mis + ((long(n) * cs.H + ih) * cs.W + iw) * cs.C + c);
            const double b = w.get(((long(k) * cs.R + r) * cs.S + s) * cs.C + c);
            acc += a * b; mag += std::fabs(a * b);
          }
        }
      double y = acc + (cs.bias ? bias[k] : 0.0);
      double scale = 1;
      if (cs.bn) {
        scale = (cs.gamma ? gam[k] : 1.0) / std::sqrt(double(var[k]) + 1e-5);
        y = (y - mean[k]) * scale + (cs.beta ? bet[k] : 0.0);
      }
      mag *= std::fabs(scale);
      if (cs.proj) {
        double ad = 0, magd = 0;
        for (int c = 0; c < cs.Cs; ++c) {
          const double a = xs.get(mis + ((long(n) * cs.Hs + pp * cs.sdh) * cs.Ws + qq * cs.sdw) * cs.Cs + c);
          const double b = wd.get(long(k) * cs.Cs + c);
          ad += a * b; magd += std::fabs(a * b);
        }
        double yd = ad + (cs.bias_d ? bd[k] : 0.0), sd = 1;
        if (cs.bn_d) { sd = gd[k] / std::sqrt(double(vd[k]) + 1e-3); yd = (yd - md[k]) * sd + btd[k]; }
        y += yd; mag += magd * std::fabs(sd);
      }
      if (cs.res) y += res.get(mis + m * cs.K + k);
      switch (cs.act) {
        case 1: y = y < 0 ? 0 : y; break;
        case 2: y = y < 0 ? 0 : (y > 6 ? 6 : y); break;
        case 3: y = y / (1 + std::exp(-y)); break;
        case 4: y = 0.5 * y * (1 + std::erf(y / std::sqrt(2.0))); break;
        case 5: y = y > 0 ? y : y * double(kSlope); break;
        case 6: y = y * std::min(std::max(y + 3, 0.0), 6.0) / 6; break;
        case 7: y = std::min(std::max(y + 3, 0.0), 6.0) / 6; break;
        case 8: y = 0.5 * y * (1 + std::tanh(std::sqrt(2 / M_PI) * (y + 0.044715 * y * y * y))); break;
      }
      const double got = out.get(mis + m * cs.K + k);
      bool ok;
      if (!std::isfinite(y)) {
        ok = (std::isnan(y) && std::isnan(got)) || (std::isinf(y) && got == y);
      } else {
        // mag is infinite only when an Inf was clamped away (relu(-Inf) = 0): output rounding only
        const double tol = std::isfinite(mag) ? 2.5 * (rtol_op * mag + 1e-6 * mag + rtol_out * std::fabs(y)) + 1e-6
                                              : 2.5 * rtol_out * std::fabs(y) + 1e-6;
        const double e = std::fabs(got - y);
        ok = e <= tol;  // false for a NaN got
        if (std::isfinite(got)) worst = std::max(worst, e / tol);
      }
      if (!ok && bad++ < 5) std::printf("  mismatch m=%ld k=%d got %.8g want %.8g (mag %.3g)\n", m, k, got, y, mag);
    }
  }
  if (bad > 5) std::printf("  ... %d mismatches in all\n", bad);
  int guard_bad = 0;
  for (long i = -Buf::kGuard; i < mis; ++i) guard_bad += !std::isnan(out.get(i));
  for (long i = mis + no; i < mis + no + Buf::kGuard; ++i) guard_bad += !std::isnan(out.get(i));
  if (guard_bad) std::printf("  %d writes outside out (guard regions)\n", guard_bad);
  const emu::Counters& st = emu::stats;
  const int extra_bad = emu_violations();
  return {bad + guard_bad + extra_bad, worst, st.cp, st.ldg};
}

int main(int argc, char** argv) {
  start_driver();
  // name, N,H,W,C,K,R,S, sh,sw,ph,pw,dh,dw, bias,bn,gamma,beta,res, act, proj,Hs,Ws,Cs,sdh,sdw,bias_d,bn_d, misalign, nonfinite
  const Case cases[] = {
    {"3x3 s2 C=19 K=70 bn res relu", 2, 7, 9, 19, 70, 3, 3, 2, 2, 1, 1, 1, 1, true, true, true, true, true, 1, false, 0, 0, 0, 1, 1, false, false, 0, false},
    {"3x2 dil(2,1) pad(2,1) C=40 K=33 silu", 1, 12, 12, 40, 33, 3, 2, 1, 1, 2, 1, 2, 1, false, true, false, true, false, 3, false, 0, 0, 0, 1, 1, false, false, 0, false},
    {"proj Cs=12 + res gelu", 2, 8, 8, 16, 64, 3, 3, 2, 2, 1, 1, 1, 1, true, true, true, true, true, 4, true, 8, 8, 12, 2, 2, true, true, 0, false},
    {"proj Cs=24 no bn_d K=10 relu6", 1, 5, 7, 8, 10, 1, 1, 1, 1, 0, 0, 1, 1, false, false, false, false, false, 2, true, 9, 13, 24, 2, 2, true, false, 0, false},
    {"1x1 C=72 K=128 bias res misaligned gelu_tanh", 1, 6, 6, 72, 128, 1, 1, 1, 1, 0, 0, 1, 1, true, false, false, false, true, 8, false, 0, 0, 0, 1, 1, false, false, 1, false},
    {"3x3 C=64 K=96 M=160 vec leaky_relu", 1, 10, 16, 64, 96, 3, 3, 1, 1, 1, 1, 1, 1, false, true, true, true, true, 5, false, 0, 0, 0, 1, 1, false, false, 0, false},
    {"nonfinite x identity", 1, 5, 5, 8, 16, 3, 3, 1, 1, 1, 1, 1, 1, true, true, true, true, false, 0, false, 0, 0, 0, 1, 1, false, false, 0, true},
    {"proj M=338 K=45 odd + res hardsigmoid", 2, 13, 13, 8, 45, 3, 3, 1, 1, 1, 1, 1, 1, true, true, true, false, true, 7, true, 13, 13, 16, 1, 1, false, true, 0, false},
    {"C=3 stem 7x7 s2 hardswish", 1, 11, 11, 3, 8, 7, 7, 2, 2, 3, 3, 1, 1, false, true, true, true, false, 6, false, 0, 0, 0, 1, 1, false, false, 0, false},
  };
  const int ncases = int(sizeof(cases) / sizeof(cases[0]));
  std::vector<bool> selected;  // no arguments: every case
  if (!select_cases(argc, argv, ncases, selected)) return 2;
  int runs = 0, fails = 0;
  for (int ci = 0; ci < ncases; ++ci) {
    if (!selected[ci]) continue;
    for (int mi = 0; mi < 4; ++mi) {
      const MathMode& md = kMathModes[mi];
      emu::late_landing = (ci + mi) % 2 == 1;  // each case sees both policies across its modes
      const char* landing = emu::late_landing ? "late" : "early";
      std::snprintf(g_current, sizeof(g_current), "%d %s %s %s", ci, md.n, landing, cases[ci].name);
      const Result r = run_case(cases[ci], md.d, md.tf32, 1234 + ci);
      std::printf("case %d %s %s %s: %s (max err/tol %.3f, cp.async %lld, checked loads %lld)\n", ci, md.n, landing,
                  cases[ci].name, r.fails ? "FAIL" : "ok", r.worst, r.cp, r.ldg);
      std::fflush(stdout);
      ++runs;
      fails += r.fails != 0;
    }
  }
  std::printf("emu: %d cases, %d ok, %d failed\n", runs, runs - fails, fails);
  return fails != 0;
}

