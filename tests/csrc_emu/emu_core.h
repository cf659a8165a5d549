// Engine of the CPU emulator of resfuse's CUDA kernels (see emu.cpp's header for what it emulates,
// what it checks and what it cannot catch). A driver includes, in this order:
//   #include "emu_core.h"
//   #define RESFUSE_CUDA_EMULATE "../tests/csrc_emu/emu_shims.h"   // resolved from csrc/
//   #include "../../csrc/<kernel>.cu"                              // one or more kernel files
//   #include "emu_core_impl.h"                                      // mma, run_grid, Buf, GuardedVec
// then its cases. Kernels see threadIdx/blockIdx (x and y), __syncthreads, the shims' cp.async,
// __ldg, conversions and mma.sync; nothing else of CUDA.
#pragma once
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include <cuda_runtime.h>

#define __launch_bounds__(...)

namespace emu {
constexpr int kSmemCap = 48 * 1024;  // static shared memory limit; the tail past the request is a guard
struct Slot { uint32_t a[4], b[2]; };
struct Cta {
  alignas(16) unsigned char smem[kSmemCap];
  std::atomic<int> smem_bytes{0};  // set by every thread, same value
  int threads = 0;
  std::atomic<long long> arrivals{0};  // __syncthreads arrivals + exits of all threads
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  Slot slots[2][8][32];  // [mma call parity][warp][lane]
};
thread_local Cta* cta = nullptr;
thread_local int tid = 0;
thread_local unsigned mma_calls = 0;  // same count in every lane of a warp (mma.sync.aligned)

struct Range { const char* lo; const char* hi; };
std::vector<Range> readable;  // global inputs the kernel may read (read-only during a launch)
bool late_landing = false;    // cp.async policy of the current launch

// Per-thread counters, folded into Stats when the thread ends.
struct Counters {
  long long bad_reads = 0, misaligned = 0, smem_oob = 0, unwaited = 0, not_tf32 = 0, cp = 0, ldg = 0;
  void add(const Counters& o) {
    bad_reads += o.bad_reads; misaligned += o.misaligned; smem_oob += o.smem_oob; unwaited += o.unwaited;
    not_tf32 += o.not_tf32; cp += o.cp; ldg += o.ldg;
  }
};
thread_local Counters tc;
Counters stats;  // of the current launch
long long smem_overrun = 0;
std::mutex mu;

inline bool check_global(const void* p, size_t n, size_t align) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % align) ++tc.misaligned;
  ++tc.ldg;
  for (auto& r : readable)
    if (c >= r.lo && c + n <= r.hi) return true;
  ++tc.bad_reads;
  return false;
}

struct Copy { unsigned char* dst; const void* src; bool valid; };
thread_local std::vector<Copy> open_copies;           // issued, not yet committed
thread_local std::deque<std::vector<Copy>> groups;     // committed, not yet landed
inline void land(const Copy& c) {
  if (c.valid) std::memcpy(c.dst, c.src, 16); else std::memset(c.dst, 0, 16);
}
inline void cp_async(void* dst, const void* src, bool valid) {
  ++tc.cp;
  unsigned char* d = static_cast<unsigned char*>(dst);
  if (d < cta->smem || d + 16 > cta->smem + cta->smem_bytes.load(std::memory_order_relaxed)) { ++tc.smem_oob; return; }
  if (reinterpret_cast<uintptr_t>(d) % 16) ++tc.misaligned;
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % 16) ++tc.misaligned;
    const char* c = static_cast<const char*>(src);
    bool in = false;
    for (auto& r : readable) in = in || (c >= r.lo && c + 16 <= r.hi);
    if (!in) { ++tc.bad_reads; valid = false; }
  }
  const Copy cp{d, src, valid};
  if (late_landing) open_copies.push_back(cp); else land(cp);
}
inline void cp_commit() {
  if (!late_landing) return;
  groups.push_back(std::move(open_copies));
  open_copies.clear();
}
inline void cp_wait(int pending) {  // cp.async.wait_group: all but the `pending` newest groups land
  while (static_cast<int>(groups.size()) > pending) {
    for (const Copy& c : groups.front()) land(c);
    groups.pop_front();
  }
}
inline unsigned char* shared_buffer(int bytes) {
  if (bytes > kSmemCap) { std::fprintf(stderr, "emu: shared buffer of %d B > %d B\n", bytes, kSmemCap); std::abort(); }
  cta->smem_bytes.store(bytes, std::memory_order_relaxed);  // every thread asks for the same size
  return cta->smem;
}
template <int kKind>  // 0 f16, 1 bf16, 2 tf32
void warp_mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void run_grid(std::function<void()> body, unsigned gx, unsigned gy, int threads);
}  // namespace emu

thread_local uint3 threadIdx, blockIdx;
// Staggered warps: after each barrier one warp (rotating with the barrier count and the CTA)
// waits until every other thread has reached the next barrier or exited, so it runs its interval
// last. A missing __syncthreads then shows deterministically: the others refill a stage it still
// has to read, or it writes rows of a stage the others have already read.
namespace emu {
thread_local unsigned barrier_epoch = 0;
bool stagger = true;
// Every thread passes the same barriers, so while the staggered warp waits after barrier e every
// thread has arrived e or e+1 times (an exit counts as one more arrival): the others are all
// done exactly when arrivals == threads*e + threads - 32. Only the arrival that makes it so wakes.
inline void arrive(unsigned count) {  // this thread has now arrived `count` times
  const long long v = cta->arrivals.fetch_add(1, std::memory_order_acq_rel) + 1;
  if (v == static_cast<long long>(cta->threads) * count - 32) cta->arrivals.notify_all();
}
inline void wait_for_others(unsigned e) {
  const long long target = static_cast<long long>(cta->threads) * (e + 1) - 32;
  for (long long v; (v = cta->arrivals.load(std::memory_order_acquire)) != target;) cta->arrivals.wait(v);
}
}  // namespace emu
inline void __syncthreads() {
  emu::Cta* c = emu::cta;
  const unsigned e = ++emu::barrier_epoch;
  emu::arrive(e);
  c->bar->arrive_and_wait();
  const int warp = emu::tid >> 5;
  if (emu::stagger && unsigned(warp) == (e + blockIdx.x + blockIdx.y) % unsigned(c->threads / 32)) {
    if ((emu::tid & 31) == 0) emu::wait_for_others(e);
    c->warp_bar[warp]->arrive_and_wait();  // the warp's other lanes wait for lane 0
  }
}

