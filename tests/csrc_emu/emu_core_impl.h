// Second half of the emulator engine (needs the kernel's resfuse::detail conversions, so it is
// included after the kernel .cu; see emu_core.h), plus host buffers shared by the drivers.
#pragma once
namespace emu {
static float h2f(uint16_t b) { return resfuse::detail::f16_to_float(b); }
static float b2f(uint16_t b) { return resfuse::detail::bf16_to_float(b); }
static bool is_tf32(uint32_t w) { return (w & 0x1fffu) == 0 || (w & 0x7f800000u) == 0x7f800000u; }

// PTX ISA fragment layouts, g = lane / 4, t = lane % 4:
//   m16n8k16 (.f16/.bf16, two 16-bit values per register, low half first):
//     A (16x16, row major): reg i of lane = rows g + 8*(i%2), cols 2t + 8*(i/2) + {0,1}
//     B (16x8,  col major): reg i of lane = rows 2t + 8*i + {0,1}, col g
//   m16n8k8 (.tf32, one value per register):
//     A (16x8): reg i = row g + 8*(i%2), col t + 4*(i/2);   B (8x8): reg i = row t + 4*i, col g
//   C/D (16x8, fp32): reg i = row g + 8*(i/2), col 2t + i%2
template <int kKind>
void warp_mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = tid & 31, w = tid >> 5;
  // Double-buffered slots: lanes write buffer (n % 2) at their n-th mma and read it after the
  // barrier; a lane can rewrite that buffer (call n + 2) only after every lane has passed the
  // barrier of call n + 1, i.e. after all of them finished reading call n. One barrier per mma.
  Slot* S = cta->slots[mma_calls++ & 1][w];
  std::memcpy(S[lane].a, a, sizeof(S[lane].a));
  std::memcpy(S[lane].b, b, sizeof(S[lane].b));
  if (kKind == 2)
    for (uint32_t v : a) tc.not_tf32 += !is_tf32(v);
  if (kKind == 2)
    for (uint32_t v : b) tc.not_tf32 += !is_tf32(v);
  cta->warp_bar[w]->arrive_and_wait();  // all 32 lanes present (mma.sync.aligned)
  const int g = lane >> 2, t = lane & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double sum = c[i];
    if (kKind < 2) {
      for (int k = 0; k < 16; ++k) {
        const uint32_t wa = S[(row % 8) * 4 + (k % 8) / 2].a[(row / 8) + 2 * (k / 8)];
        const uint32_t wb = S[col * 4 + (k % 8) / 2].b[k / 8];
        const uint16_t ha = uint16_t(wa >> (16 * (k % 2))), hb = uint16_t(wb >> (16 * (k % 2)));
        const double va = kKind == 0 ? h2f(ha) : b2f(ha), vb = kKind == 0 ? h2f(hb) : b2f(hb);
        sum += va * vb;
      }
    } else {
      for (int k = 0; k < 8; ++k) {
        const uint32_t wa = S[(row % 8) * 4 + k % 4].a[(row / 8) + 2 * (k / 4)];
        const uint32_t wb = S[col * 4 + k % 4].b[k / 4];
        sum += double(resfuse::detail::as_float(wa & ~0x1fffu)) * double(resfuse::detail::as_float(wb & ~0x1fffu));
      }
    }
    out[i] = float(sum);
  }
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

void run_grid(std::function<void()> body, unsigned gx, unsigned gy, int threads) {
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      auto c = std::make_unique<Cta>();
      std::memset(c->smem, 0xff, sizeof(c->smem));  // NaN garbage: unwritten smem shows up
      c->threads = threads;
      c->bar = std::make_unique<std::barrier<>>(threads);
      for (int w = 0; w < threads / 32; ++w) c->warp_bar.push_back(std::make_unique<std::barrier<>>(32));
      std::vector<std::thread> ts;
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
          cta = c.get();
          tid = t;
          threadIdx = make_uint3(t, 0, 0);
          blockIdx = make_uint3(bx, by, 0);
          body();
          emu::arrive(emu::barrier_epoch + 1);
          for (auto& g : groups) tc.unwaited += g.size();
          tc.unwaited += open_copies.size();
          std::lock_guard<std::mutex> l(mu);
          stats.add(tc);
        });
      for (auto& th : ts) th.join();
      for (int i = c->smem_bytes.load(); i < kSmemCap; ++i) smem_overrun += c->smem[i] != 0xff;
    }
}
}  // namespace emu

using resfuse::DType;
static uint16_t f2h(float v) { return resfuse::detail::float_to_f16(v); }
static uint16_t f2b(float v) { return resfuse::detail::float_to_bf16(v); }

// dtype-typed host buffer, 64-byte aligned, with kGuard elements before and after; index i may be
// in [-kGuard, n + kGuard).
struct Buf {
  static constexpr long kGuard = 64;
  struct alignas(64) Line { unsigned char b[64]; };
  DType dt; long n; std::vector<Line> lines;
  Buf(DType d, long count) : dt(d), n(count), lines(((count + 2 * kGuard) * es() + 63) / 64) {}
  long es() const { return dt == DType::kFloat32 ? 4 : 2; }
  unsigned char* at(long i) { return reinterpret_cast<unsigned char*>(lines.data()) + (i + kGuard) * es(); }
  void set(long i, float v) {
    unsigned char* p = at(i);
    if (dt == DType::kFloat32) std::memcpy(p, &v, 4);
    else { uint16_t h = dt == DType::kFloat16 ? f2h(v) : f2b(v); std::memcpy(p, &h, 2); }
  }
  float get(long i) {
    unsigned char* p = at(i);
    if (dt == DType::kFloat32) { float v; std::memcpy(&v, p, 4); return v; }
    uint16_t h; std::memcpy(&h, p, 2);
    return dt == DType::kFloat16 ? resfuse::detail::f16_to_float(h) : resfuse::detail::bf16_to_float(h);
  }
  emu::Range range(long lo, long hi) { return {(const char*)at(lo), (const char*)at(hi)}; }
};

// n floats ending exactly at a PROT_NONE page: a read past the end is a SIGSEGV; the rest of the
// page in front is NaN, so a read before the start poisons the result instead.
struct GuardedVec {
  void* base = nullptr; size_t len = 0; float* data = nullptr;
  explicit GuardedVec(const std::vector<float>& v) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE)), bytes = v.size() * sizeof(float);
    const size_t body = (bytes + page - 1) / page * page + (bytes == 0 ? page : 0);
    len = body + page;
    base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(static_cast<char*>(base) + body, page, PROT_NONE) != 0) {
      std::perror("emu: mmap"); std::exit(2);
    }
    float* all = static_cast<float*>(base);
    for (size_t i = 0; i < body / sizeof(float); ++i) all[i] = NAN;
    data = reinterpret_cast<float*>(static_cast<char*>(base) + body - bytes);
    std::memcpy(data, v.data(), bytes);
  }
  ~GuardedVec() { munmap(base, len); }
  GuardedVec(const GuardedVec&) = delete;
  GuardedVec& operator=(const GuardedVec&) = delete;
};

static char g_current[256] = "(none)";
extern "C" void on_segv(int) {
  const char a[] = "\nemu: SIGSEGV (a read past a guarded BN/bias vector, or a stray pointer) in case ";
  ssize_t r = write(2, a, sizeof(a) - 1);
  r = write(2, g_current, strlen(g_current));
  r = write(2, "\n", 1);
  (void)r;
  _exit(3);
}


// The case indices named on the command line (none: every case). False after printing the usage
// line when an argument is not an index in [0, ncases).
inline bool select_cases(int argc, char** argv, int ncases, std::vector<bool>& selected) {
  selected.assign(ncases, argc == 1);
  for (int i = 1; i < argc; ++i) {
    char* end = nullptr;
    const long ci = std::strtol(argv[i], &end, 10);
    if (*argv[i] == 0 || *end != 0 || ci < 0 || ci >= ncases) {
      std::fprintf(stderr, "usage: %s [case index 0..%d]...\n", argv[0], ncases - 1);
      return false;
    }
    selected[ci] = true;
  }
  return true;
}

// The four math modes of the mma.sync kernels (fp16, bf16, fp32 with TF32, fp32 with 3xTF32).
struct MathMode { const char* n; DType d; bool tf32; };
constexpr MathMode kMathModes[4] = {{"f16", DType::kFloat16, false}, {"bf16", DType::kBFloat16, false},
                                    {"tf32", DType::kFloat32, true}, {"3xtf32", DType::kFloat32, false}};

// Print and count the emulator's checks that failed during the last launches (each a failure of
// the case): reads outside the inputs, misalignment, shared-memory overruns, unwaited cp.async,
// non-tf32 mma operands.
inline int emu_violations() {
  const emu::Counters& st = emu::stats;
  const long long extra[] = {st.bad_reads, st.misaligned, st.smem_oob, emu::smem_overrun, st.unwaited, st.not_tf32};
  const char* what[] = {"global reads outside the inputs", "misaligned global/shared accesses",
                        "cp.async outside the shared buffer", "bytes written past the shared buffer",
                        "cp.async copies never waited for", "tf32 mma operands that are not tf32 values"};
  int bad = 0;
  for (int i = 0; i < 6; ++i)
    if (extra[i]) { std::printf("  %lld %s\n", extra[i], what[i]); ++bad; }
  return bad;
}

// Every driver's main() starts here: name the case on a crash, EMU_STAGGER=0 turns the staggered
// warps off (debugging only).
inline void start_driver() {
  std::signal(SIGSEGV, on_segv);
  std::signal(SIGBUS, on_segv);
  if (const char* e = std::getenv("EMU_STAGGER")) emu::stagger = std::atoi(e) != 0;
}
