// Weight gradient of a 1x1 conv (pixel_wgrad) and the channels-first LayerNorm backward
// (layernorm_rows_backward); the C API and the formulas are in csrc/gnconv.h.
//
// pixel_wgrad: dw[n,k] = sum_m dy'[m,n] * b'[m,k],  db[n] = sum_m dy'[m,n]   (fp32 results)
//   dy'[m,n] = dy[m*ld_dy + n] * row_scale[m / HW];  b'[m,k] = b[m*ldb + k], its LayerNorm with the
//   given mean[m]/rstd[m] and nw/nb, or gelu(b) (exact erf). The prologue runs in fp32 in an smem
//   pass over each landed tile (by the thread that loaded the element) and rounds back to the
//   dtype for fp16/bf16, as eager / Triton do before their GEMM.
//   GEMM view: A = dy'^T (Nout x M, "row major" in the reduction m), B = b' (M x K); both are
//   stored pixel-major (channels contiguous), so the fragments are gathered transposed from smem:
//     16-bit m16n8k16: A reg i = (n = g + 8(i%2), pixels p, p+1 with p = 2t + 8(i/2)) packed low/high
//                      from two 16-bit smem loads; B reg i = (k = g, pixels 2t + 8i, +1).
//     fp32 m16n8k8:    A reg i = (n = g + 8(i%2), pixel t + 4(i/2)); B reg i = (k = g, pixel t + 4i).
//   Tiles: CTA 64 (Nout) x 64 (K), 4 warps (2 x 2) of 32 x 32 (2 x 4 mma tiles, 32 fp32 acc/thread);
//   a stage is 64 bytes of reduction = 32 pixels (fp16/bf16) or 16 pixels (fp32); 3-stage cp.async
//   pipeline. Smem row = one pixel's 64 channels + 8 elements pad (pitch 72 elements: the
//   transposed gathers above hit 32 distinct banks, 16-byte rows stay aligned); stage = 2 operands
//   x rows x 72e = 9216 B, 3 stages = 27648 B static.
//   db: the CTAs of k-tile 0 run one extra mma per (warp k-column 0, mi) with a B fragment of ones,
//   so db comes from the same rounded dy' and the same fp32 tensor-core accumulation as dw.
//   Split over pixels: grid = (chunks * ceil(Nout/64), ceil(K/64)); CTA (chunk, n-tile, k-tile)
//   reduces the pixels [chunk*len, min(M, (chunk+1)*len)) into its own fp32 partial tile
//   ws[chunk][Nout][K] (+ ws_db[chunk][Nout]); pixel_wgrad_reduce then sums the partials for
//   chunk = 0, 1, ... in that fixed order (deterministic, no atomics). Chunk rule:
//     tiles = ceil(Nout/64) * ceil(K/64);  chunks = clamp(ceil(264 / tiles), 1, ceil(M / 256))
//     (264 = 2 CTAs on each of 132 SMs, at least 256 pixels per chunk), len = ceil(M/chunks)
//     rounded up to 32, chunks = ceil(M / len). With one chunk the CTAs write dw/db directly and
//     no workspace is needed (pixel_wgrad_workspace_bytes = 0), else chunks*(Nout*K + Nout)*4 B.
//   M == 0: dw (and db) are written as zeros (the reduce kernel over 0 chunks). K == 0 with db:
//   db is still computed (one masked k-tile).
//   Loads: 16-byte cp.async (.cg) zero-filled when masked if the operand's width and ld are
//   multiples of 16/e and its pointer is 16-byte aligned (checked per operand), else element-wise
//   masked __ldg into the same smem slots. Offsets are int64 in m.
//   Bytes per pixel (e = element size): dy: Nout*e read ceil(K/64) times, b: K*e read
//   ceil(Nout/64) times (the n-tiles of one chunk are adjacent in blockIdx.x, so the re-reads
//   mostly hit L2; HBM ~ (Nout + K)*e); mean/rstd 8 B (LN) and row_scale 4 B per pixel and per
//   tile (cached). Partials: chunks*Nout*(K+1)*4 B written once and read once (when chunks > 1).
//
// layernorm_rows_backward: per pixel row m (C channels, fp32 math, two-pass mean/var):
//   mean, rstd = 1/sqrt(var + eps); xhat = (x - mean)*rstd; g = dy*nw;
//   dx = round(rstd*(g - mean_c(g) - xhat*mean_c(g*xhat))); dnw[c] = sum_m dy*xhat; dnb[c] = sum_m dy.
//   Block = 8 warps (256 threads) over a contiguous range of rows, 8 rows per round (one per warp):
//   the warp reads its row lane-strided three times (sum x; sum (x-mean)^2; sum g, g*xhat), each
//   lane's partials go to smem and every lane sums the 32 partials in the same order (no shuffles);
//   then the 256 threads walk the channels (c = tid + 256j) over the round's 8 rows, write dx and
//   accumulate dnw/dnb in smem slots owned by that thread; at the end each block writes its
//   partial [dnw | dnb] row to the workspace and pixel_wgrad_reduce sums the blocks in order.
//   Limit: C <= 4096 when dnw or dnb is requested (the smem accumulators, 32 KB); any C >= 1
//   otherwise. Blocks = ceil(M / rows), rows = 8*max(4, ceil(ceil(M/8) / 528)) (528 = 4 blocks on
//   each of 132 SMs; at least 4 rounds per block); workspace = blocks*2C*4 B. M == 0 with dnw/dnb: zeros are written; C == 0:
//   nothing is launched (no rows to normalise).
//   Bytes per pixel: reads 2C*e (x, dy; the four passes re-read the round's rows from L1/L2),
//   writes C*e (dx) + 8 B (mean, rstd); partials blocks*2C*4 B written and read once.
//   Loads are scalar __ldg (coalesced across lanes / threads), no vector path.
// ptxas (nvcc 13.0, -O3, 0 spills / 0 stack everywhere), registers sm_80 / sm_90: wgrad f16, bf16
//   166/165, TF32 120/120, 3xTF32 168/167 (27648 B smem); LN bwd 64/40 (36992 B); reduce 32/32.

#include "gnconv.h"

#include <cstdint>

#if defined(__CUDACC__) || defined(RESFUSE_CUDA_EMULATE)

#include <cmath>

#include "device_prims.cuh"
#include "mma_math.cuh"

namespace resfuse {
namespace detail {
namespace wgrad {

constexpr int kTN = 64, kTK = 64;          // dw tile per CTA (Nout x K)
constexpr int kPitch = 72;                 // smem row pitch in elements (64 channels + 8 pad)
constexpr int kStages = 3;
constexpr int kThreads = 128;              // 4 warps, 2 (n) x 2 (k)
constexpr int kStageBytes = 2 * 64 * kPitch;  // 2 operands x (64/e rows) x 72e bytes = 9216
constexpr int kSmemBytes = kStages * kStageBytes;
constexpr int kTargetCtas = 264;           // 2 per SM on 132 SMs
constexpr int64_t kMinChunkPixels = 256;
static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");

struct Args {
  const void* dy; int64_t ld_dy;
  const void* b; int64_t ldb;
  int prologue; const float* mean; const float* rstd; const float* nw; const float* nb;
  const float* row_scale; int64_t HW;
  float* part; float* part_db;  // chunk c's tile at part + c*Nout*K, db at part_db + c*Nout
  int64_t M, chunk_len;
  int K, Nout, tiles_n;
  bool vec_dy, vec_b;
};

template <class Math>
struct Tile {
  using Elem = typename Math::Elem;
  static constexpr int kE = sizeof(Elem);
  static constexpr int kVE = 16 / kE;            // elements per 16-byte chunk
  static constexpr int kRows = 64 / kE;          // pixels per stage
  static constexpr int kChunksPerRow = 64 / kVE;  // 16-byte chunks per 64-channel row
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kIt = kRows / kRowsPerPass;  // chunks per thread per operand (2)
  static constexpr int kStep = 32 / kE;          // pixels per mma k-step
  static_assert(kIt * kRowsPerPass == kRows, "loader mapping");
};


__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.7071067811865476f)); }

// Loads (and, after landing, transforms) this thread's chunks of one stage: rows (pixels)
// row0 + i*kRowsPerPass, channels cc*kVE.. of dy (rows 0..kRows-1) and of b (rows kRows..).
template <class Math>
struct Loader {
  using T = Tile<Math>;
  using Elem = typename Math::Elem;
  int row0, cc;
  int n_c, k_c;  // first channel of this thread's chunk in dy / b

  __device__ __forceinline__ void load(const Args& a, unsigned char* stage, int64_t p0, int64_t p_end) const {
    const Elem* dy = static_cast<const Elem*>(a.dy);
    const Elem* b = static_cast<const Elem*>(a.b);
#pragma unroll
    for (int i = 0; i < T::kIt; ++i) {
      const int r = row0 + i * T::kRowsPerPass;
      const int64_t m = p0 + r;
      const bool ok = m < p_end;
      copy_chunk_16<false>(stage + (r * kPitch + cc * T::kVE) * T::kE, dy, m * a.ld_dy + n_c, ok, a.Nout - n_c,
                           a.vec_dy);
      copy_chunk_16<false>(stage + ((T::kRows + r) * kPitch + cc * T::kVE) * T::kE, b, m * a.ldb + k_c, ok,
                           a.K - k_c, a.vec_b);
    }
  }

  // Prologue in fp32 on this thread's own (landed) chunks; rows past the chunk end stay zero.
  __device__ __forceinline__ void transform(const Args& a, unsigned char* stage, int64_t p0, int64_t p_end) const {
#pragma unroll
    for (int i = 0; i < T::kIt; ++i) {
      const int r = row0 + i * T::kRowsPerPass;
      const int64_t m = p0 + r;
      if (m >= p_end) continue;
      if (a.row_scale) {
        const float s = ldg(a.row_scale + m / a.HW);
        Elem* e = reinterpret_cast<Elem*>(stage) + r * kPitch + cc * T::kVE;
#pragma unroll
        for (int j = 0; j < T::kVE; ++j) e[j] = Math::from_float(Math::to_float(e[j]) * s);
      }
      if (a.prologue != static_cast<int>(Prologue::kNone)) {
        Elem* e = reinterpret_cast<Elem*>(stage) + (T::kRows + r) * kPitch + cc * T::kVE;
        float mu = 0.f, rs = 0.f;
        if (a.prologue == static_cast<int>(Prologue::kLayerNorm)) { mu = ldg(a.mean + m); rs = ldg(a.rstd + m); }
#pragma unroll
        for (int j = 0; j < T::kVE; ++j) {
          const int k = k_c + j;
          if (k >= a.K) continue;  // zero-filled channels stay zero
          const float v = Math::to_float(e[j]);
          float o;
          if (a.prologue == static_cast<int>(Prologue::kLayerNorm))
            o = (v - mu) * rs * (a.nw ? ldg(a.nw + k) : 1.f) + (a.nb ? ldg(a.nb + k) : 0.f);
          else
            o = gelu(v);
          e[j] = Math::from_float(o);
        }
      }
    }
  }
};

// Transposed fragment gather from one stage (see the file header) and the warp's mma steps.
template <class Math, int MI, int NI>
__device__ __forceinline__ void compute_stage(const unsigned char* stage, float (&acc)[MI][NI][4],
                                              float (&acc_db)[MI][1][4], bool do_db, int wn0, int wk0, int lane) {
  using T = Tile<Math>;
  using Elem = typename Math::Elem;
  const Elem* sdy = reinterpret_cast<const Elem*>(stage);
  const Elem* sb = sdy + T::kRows * kPitch;
  const int g = lane >> 2, t = lane & 3;
  uint32_t ones[1][2];
  if constexpr (T::kE == 2) {
    const uint32_t o = Math::from_float(1.f);
    ones[0][0] = ones[0][1] = o | (o << 16);
  } else {
    ones[0][0] = ones[0][1] = Math::from_float(1.f);
  }
#pragma unroll
  for (int ks = 0; ks < T::kRows / T::kStep; ++ks) {
    const int p0 = ks * T::kStep;
    uint32_t af[MI][4], bf[NI][2];
    if constexpr (T::kE == 2) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const Elem* p = sdy + (p0 + 2 * t + 8 * (i >> 1)) * kPitch + wn0 + mi * 16 + g + 8 * (i & 1);
          af[mi][i] = uint32_t(p[0]) | (uint32_t(p[kPitch]) << 16);
        }
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const Elem* p = sb + (p0 + 2 * t + 8 * i) * kPitch + wk0 + ni * 8 + g;
          bf[ni][i] = uint32_t(p[0]) | (uint32_t(p[kPitch]) << 16);
        }
    } else {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          af[mi][i] = sdy[(p0 + t + 4 * (i >> 1)) * kPitch + wn0 + mi * 16 + g + 8 * (i & 1)];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int i = 0; i < 2; ++i) bf[ni][i] = sb[(p0 + t + 4 * i) * kPitch + wk0 + ni * 8 + g];
    }
    Math::warp_step(acc, af, bf);
    if (do_db) Math::warp_step(acc_db, af, ones);
  }
}

template <class Math>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const Args a) {
  using T = Tile<Math>;
  constexpr int MI = 2, NI = 4;  // warp tile 32 (n) x 32 (k)
  RF_SHARED_BUFFER(smem, kSmemBytes);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn0 = (warp & 1) * 32, wk0 = (warp >> 1) * 32;
  const int chunk = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.tiles_n));
  const int n0 = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.tiles_n)) * kTN;
  const int k0 = blockIdx.y * kTK;
  const int64_t p_begin = static_cast<int64_t>(chunk) * a.chunk_len;
  const int64_t p_end = p_begin + a.chunk_len < a.M ? p_begin + a.chunk_len : a.M;
  const int tiles = static_cast<int>((p_end - p_begin + T::kRows - 1) / T::kRows);
  const bool do_db = a.part_db != nullptr && blockIdx.y == 0 && wk0 == 0;  // warp-uniform
  const bool xform = a.row_scale != nullptr || a.prologue != static_cast<int>(Prologue::kNone);

  Loader<Math> ld;
  ld.row0 = tid / T::kChunksPerRow;
  ld.cc = tid % T::kChunksPerRow;
  ld.n_c = n0 + ld.cc * T::kVE;
  ld.k_c = k0 + ld.cc * T::kVE;

  float acc[MI][NI][4], acc_db[MI][1][4];
  zero_acc(acc);
  zero_acc(acc_db);

  // Pipeline as conv_bn_act's mainloop: tile kt lives in stage kt % kStages; the wait lands this
  // thread's copies of tile kt, the thread transforms its own chunks, and the barrier publishes
  // them and proves every warp is done with tile kt-1, whose stage the refill overwrites.
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < tiles) ld.load(a, smem + st * kStageBytes, p_begin + int64_t(st) * T::kRows, p_end);
    cp_async_commit();
  }
  int read_stage = 0, write_stage = kStages - 1;
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    if (xform) ld.transform(a, smem + read_stage * kStageBytes, p_begin + int64_t(kt) * T::kRows, p_end);
    __syncthreads();
    if (kt + kStages - 1 < tiles)
      ld.load(a, smem + write_stage * kStageBytes, p_begin + int64_t(kt + kStages - 1) * T::kRows, p_end);
    cp_async_commit();
    compute_stage<Math>(smem + read_stage * kStageBytes, acc, acc_db, do_db, wn0, wk0, lane);
    read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
    write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
  }
  cp_async_wait<0>();

  // Partial tile (C layout: row n = g + 8(i/2), col k = 2t + i%2).
  const int g = lane >> 2, t = lane & 3;
  float* part = a.part + static_cast<int64_t>(chunk) * a.Nout * a.K;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + wn0 + mi * 16 + g + 8 * h;
      if (n >= a.Nout) continue;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int k = k0 + wk0 + ni * 8 + 2 * t + j;
          if (k < a.K) part[static_cast<int64_t>(n) * a.K + k] = acc[mi][ni][2 * h + j];
        }
      if (do_db && t == 0) a.part_db[static_cast<int64_t>(chunk) * a.Nout + n] = acc_db[mi][0][2 * h];
    }
}

}  // namespace wgrad

// out_r[j] = sum_{c < chunks} base_r[c*stride_r + j] for j < n_r, two regions (out_r nullable),
// summed in chunk order (deterministic). chunks == 0 writes zeros.
struct ReduceArgs {
  const float* base0; int64_t stride0; int64_t n0; float* out0;
  const float* base1; int64_t stride1; int64_t n1; float* out1;
  int chunks;
};
constexpr int kReduceThreads = 256;

__global__ void __launch_bounds__(kReduceThreads) partial_reduce_kernel(const ReduceArgs a) {
  int64_t j = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  const bool second = j >= a.n0;  // selects by value, not by array index (no local memory)
  if (second) j -= a.n0;
  float* out = second ? a.out1 : a.out0;
  if (j >= (second ? a.n1 : a.n0) || !out) return;
  const float* p = (second ? a.base1 : a.base0) + j;
  const int64_t stride = second ? a.stride1 : a.stride0;
  float s = 0.f;
  for (int c = 0; c < a.chunks; ++c) s += p[c * stride];
  out[j] = s;
}

inline const char* launch_reduce(const ReduceArgs& a, cudaStream_t stream) {
  const int64_t total = a.n0 + a.n1;
  const int64_t blocks = (total + kReduceThreads - 1) / kReduceThreads;
  if (blocks == 0) return nullptr;
  if (blocks > INT32_MAX) return "partial reduce: output too large for the grid";
  return launch_grid(&partial_reduce_kernel, dim3(static_cast<unsigned>(blocks), 1), kReduceThreads, stream, a);
}

namespace lnbwd {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kMaxC = 4096;     // smem dnw/dnb accumulators (only when dnw or dnb is requested)
constexpr int kMaxBlocks = 528; // 4 per SM on 132 SMs
constexpr int kMinRounds = 4;   // >= 32 rows per block: partials cost <= 2C*4/32 B per pixel
constexpr int kSmemBytes = (2 * kMaxC + 4 * kWarps * 32 + 4 * kWarps) * 4;
static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");

struct Args {
  const void* x; int64_t ldx;
  const void* dy; int64_t ld_dy;
  const float* nw; float eps;
  void* dx; int64_t ld_dx;
  float* mean_out; float* rstd_out;
  float* part;  // block b's [dnw | dnb] partial row at part + b*2C; null: no dnw/dnb
  int64_t M, rows_per_block;
  int C;
};

template <class Math>
__global__ void __launch_bounds__(kThreads) ln_rows_bwd_kernel(const Args a) {
  using Elem = typename Math::Elem;
  RF_SHARED_BUFFER(smem, kSmemBytes);
  float* acc_w = reinterpret_cast<float*>(smem);  // [kMaxC], slot c owned by thread c % kThreads
  float* acc_b = acc_w + kMaxC;
  float* red = acc_b + kMaxC;                       // [4][kWarps][32] lane partials
  float* stat = red + 4 * kWarps * 32;              // [kWarps][4]: mean, rstd, mean(g), mean(g*xhat)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const Elem* x = static_cast<const Elem*>(a.x);
  const Elem* dy = static_cast<const Elem*>(a.dy);
  Elem* dx = static_cast<Elem*>(a.dx);
  const int C = a.C;
  const float inv_c = 1.f / static_cast<float>(C);
  const bool partials = a.part != nullptr;
  if (partials)
    for (int c = tid; c < C; c += kThreads) { acc_w[c] = 0.f; acc_b[c] = 0.f; }

  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  const int64_t r_end = r_begin + a.rows_per_block < a.M ? r_begin + a.rows_per_block : a.M;
  float* my_red = red + warp * 32;
  constexpr int kRed = kWarps * 32;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kWarps) {  // block-uniform trip count
    const int64_t m = r0 + warp;
    const bool valid = m < r_end;
    const Elem* xr = x + m * a.ldx;
    const Elem* dyr = dy + m * a.ld_dy;
    float s = 0.f;
    if (valid)
      for (int c = lane; c < C; c += 32) s += Math::to_float(ldg(xr + c));
    my_red[lane] = s;
    __syncthreads();
    float mean = 0.f;
    for (int j = 0; j < 32; ++j) mean += my_red[j];
    mean *= inv_c;
    s = 0.f;
    if (valid)
      for (int c = lane; c < C; c += 32) {
        const float d = Math::to_float(ldg(xr + c)) - mean;
        s += d * d;
      }
    my_red[kRed + lane] = s;
    __syncthreads();
    float var = 0.f;
    for (int j = 0; j < 32; ++j) var += my_red[kRed + j];
    const float rstd = 1.f / sqrtf(var * inv_c + a.eps);
    float sg = 0.f, sgx = 0.f;
    if (valid)
      for (int c = lane; c < C; c += 32) {
        const float xhat = (Math::to_float(ldg(xr + c)) - mean) * rstd;
        const float gv = Math::to_float(ldg(dyr + c)) * (a.nw ? ldg(a.nw + c) : 1.f);
        sg += gv;
        sgx += gv * xhat;
      }
    my_red[2 * kRed + lane] = sg;
    my_red[3 * kRed + lane] = sgx;
    __syncthreads();
    if (lane == 0) {
      float mg = 0.f, mgx = 0.f;
      for (int j = 0; j < 32; ++j) { mg += my_red[2 * kRed + j]; mgx += my_red[3 * kRed + j]; }
      stat[warp * 4 + 0] = mean; stat[warp * 4 + 1] = rstd;
      stat[warp * 4 + 2] = mg * inv_c; stat[warp * 4 + 3] = mgx * inv_c;
      if (valid && a.mean_out) a.mean_out[m] = mean;
      if (valid && a.rstd_out) a.rstd_out[m] = rstd;
    }
    __syncthreads();
    // dx and dnw/dnb: thread walks channels c = tid + 256j over the round's rows.
    const int rows = r_end - r0 < kWarps ? static_cast<int>(r_end - r0) : kWarps;
    for (int c = tid; c < C; c += kThreads) {
      const float nwc = a.nw ? ldg(a.nw + c) : 1.f;
      float aw = 0.f, ab = 0.f;
      for (int w = 0; w < rows; ++w) {
        const int64_t mm = r0 + w;
        const float* st = stat + w * 4;
        const float xhat = (Math::to_float(ldg(x + mm * a.ldx + c)) - st[0]) * st[1];
        const float dyv = Math::to_float(ldg(dy + mm * a.ld_dy + c));
        dx[mm * a.ld_dx + c] = Math::from_float(st[1] * (dyv * nwc - st[2] - xhat * st[3]));
        aw += dyv * xhat;
        ab += dyv;
      }
      if (partials) { acc_w[c] += aw; acc_b[c] += ab; }
    }
  }
  if (partials) {
    float* out = a.part + static_cast<int64_t>(blockIdx.x) * 2 * C;
    for (int c = tid; c < C; c += kThreads) { out[c] = acc_w[c]; out[C + c] = acc_b[c]; }
  }
}

}  // namespace lnbwd

inline bool wg_aligned(const void* p, size_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }

struct WgradPlan { int64_t chunks, chunk_len; int tiles_n, tiles_k; };

// K == 0 still gets one (masked) k-tile: it computes db when asked for, and the workspace size
// then does not depend on db.
inline WgradPlan wgrad_plan(int64_t M, int K, int Nout) {
  WgradPlan pl{};
  pl.tiles_n = static_cast<int>((int64_t(Nout) + wgrad::kTN - 1) / wgrad::kTN);
  pl.tiles_k = K > 0 ? static_cast<int>((int64_t(K) + wgrad::kTK - 1) / wgrad::kTK) : 1;
  if (M <= 0 || pl.tiles_n == 0) return pl;
  const int64_t tiles = int64_t(pl.tiles_n) * pl.tiles_k;
  int64_t chunks = (wgrad::kTargetCtas + tiles - 1) / tiles;
  const int64_t by_m = (M + wgrad::kMinChunkPixels - 1) / wgrad::kMinChunkPixels;
  if (chunks > by_m) chunks = by_m;
  if (chunks < 1) chunks = 1;
  int64_t len = (M + chunks - 1) / chunks;
  len = (len + 31) / 32 * 32;
  pl.chunk_len = len;
  pl.chunks = (M + len - 1) / len;
  return pl;
}

inline int64_t ln_rows_per_block(int64_t M) {
  const int64_t rounds = (M + lnbwd::kWarps - 1) / lnbwd::kWarps;
  const int64_t per_block = (rounds + lnbwd::kMaxBlocks - 1) / lnbwd::kMaxBlocks;
  return lnbwd::kWarps * (per_block > lnbwd::kMinRounds ? per_block : lnbwd::kMinRounds);
}

}  // namespace detail

size_t pixel_wgrad_workspace_bytes(const PixelWgradParams& p) {
  // db's slots are always counted: the size depends on M, K, Nout only.
  const detail::WgradPlan pl = detail::wgrad_plan(p.M, p.K, p.Nout);
  if (pl.chunks <= 1) return 0;
  return static_cast<size_t>(pl.chunks) * static_cast<size_t>(p.Nout) * (static_cast<size_t>(p.K) + 1) * 4;
}

const char* pixel_wgrad_launch(const PixelWgradParams& p, cudaStream_t stream) {
  using namespace detail;
  if (!p.dy || !p.b || !p.dw) return "pixel_wgrad: dy, b and dw must be non-null";
  if (p.M < 0) return "pixel_wgrad: M must be >= 0";
  if (p.K < 0) return "pixel_wgrad: K must be >= 0";
  if (p.Nout < 0) return "pixel_wgrad: Nout must be >= 0";
  if (p.ld_dy < p.Nout) return "pixel_wgrad: ld_dy must be >= Nout";
  if (p.ldb < p.K) return "pixel_wgrad: ldb must be >= K";
  if (p.row_scale && p.HW < 1) return "pixel_wgrad: HW must be >= 1 when row_scale is given";
  if (p.prologue != Prologue::kNone && p.prologue != Prologue::kLayerNorm && p.prologue != Prologue::kGelu)
    return "pixel_wgrad: unknown prologue";
  if (p.prologue == Prologue::kLayerNorm && (!p.mean || !p.rstd))
    return "pixel_wgrad: mean and rstd must be given with the LayerNorm prologue";
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "pixel_wgrad: unsupported dtype";
  const WgradPlan pl = wgrad_plan(p.M, p.K, p.Nout);
  if (pl.tiles_k > 65535) return "pixel_wgrad: K too large (grid.y limit: K <= 4194240)";
  if (p.Nout == 0) return nullptr;
  if (p.M == 0) {  // empty sum: dw = 0, db = 0
    ReduceArgs r{};
    r.n0 = int64_t(p.Nout) * p.K; r.out0 = p.dw;
    r.n1 = p.Nout; r.out1 = p.db;
    r.base0 = r.base1 = p.dw;  // never read (chunks = 0)
    r.chunks = 0;
    return launch_reduce(r, stream);
  }
  if (p.K == 0 && !p.db) return nullptr;
  const size_t need = pixel_wgrad_workspace_bytes(p);
  if (need > 0 && (!p.workspace || p.workspace_bytes < need))
    return "pixel_wgrad: workspace missing or smaller than pixel_wgrad_workspace_bytes()";
  if (pl.chunks * pl.tiles_n > INT32_MAX) return "pixel_wgrad: Nout too large for the grid";

  const size_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t ve = static_cast<int64_t>(16 / es);
  wgrad::Args a{};
  a.dy = p.dy; a.ld_dy = p.ld_dy; a.b = p.b; a.ldb = p.ldb;
  a.prologue = static_cast<int>(p.prologue); a.mean = p.mean; a.rstd = p.rstd;
  a.nw = p.norm_weight; a.nb = p.norm_bias;
  a.row_scale = p.row_scale; a.HW = p.HW;
  a.M = p.M; a.chunk_len = pl.chunk_len; a.K = p.K; a.Nout = p.Nout; a.tiles_n = pl.tiles_n;
  a.vec_dy = p.Nout % ve == 0 && p.ld_dy % ve == 0 && wg_aligned(p.dy, 16);
  a.vec_b = p.K % ve == 0 && p.ldb % ve == 0 && wg_aligned(p.b, 16);
  const int64_t nk = int64_t(p.Nout) * p.K;
  if (pl.chunks == 1) {
    a.part = p.dw; a.part_db = p.db;
  } else {
    a.part = p.workspace; a.part_db = p.db ? p.workspace + pl.chunks * nk : nullptr;
  }
  const dim3 grid(static_cast<unsigned>(pl.chunks * pl.tiles_n), static_cast<unsigned>(pl.tiles_k));
  const char* err;
  switch (p.dtype) {
    case DType::kFloat16: err = launch_grid(&wgrad::wgrad_kernel<Math16<false>>, grid, wgrad::kThreads, stream, a); break;
    case DType::kBFloat16: err = launch_grid(&wgrad::wgrad_kernel<Math16<true>>, grid, wgrad::kThreads, stream, a); break;
    default:
      err = p.allow_tf32 ? launch_grid(&wgrad::wgrad_kernel<MathF32<false>>, grid, wgrad::kThreads, stream, a)
                         : launch_grid(&wgrad::wgrad_kernel<MathF32<true>>, grid, wgrad::kThreads, stream, a);
  }
  if (err || pl.chunks == 1) return err;
  ReduceArgs r{};
  r.base0 = p.workspace; r.stride0 = nk; r.n0 = nk; r.out0 = p.dw;
  r.base1 = p.workspace + pl.chunks * nk; r.stride1 = p.Nout; r.n1 = p.db ? p.Nout : 0; r.out1 = p.db;
  r.chunks = static_cast<int>(pl.chunks);
  return launch_reduce(r, stream);
}

size_t layernorm_rows_backward_workspace_bytes(const LayerNormRowsBwdParams& p) {
  if (p.M <= 0 || p.C <= 0) return 0;
  const int64_t rows = detail::ln_rows_per_block(p.M);
  return static_cast<size_t>((p.M + rows - 1) / rows) * 2 * static_cast<size_t>(p.C) * 4;
}

const char* layernorm_rows_backward_launch(const LayerNormRowsBwdParams& p, cudaStream_t stream) {
  using namespace detail;
  if (!p.x || !p.dy || !p.dx) return "layernorm_rows_backward: x, dy and dx must be non-null";
  if (p.M < 0) return "layernorm_rows_backward: M must be >= 0";
  if (p.C < 0) return "layernorm_rows_backward: C must be >= 0";
  if (p.ldx < p.C) return "layernorm_rows_backward: ldx must be >= C";
  if (p.ld_dy < p.C) return "layernorm_rows_backward: ld_dy must be >= C";
  if (p.ld_dx < p.C) return "layernorm_rows_backward: ld_dx must be >= C";
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "layernorm_rows_backward: unsupported dtype";
  const bool partials = p.dnw || p.dnb;
  if (partials && p.C > lnbwd::kMaxC)
    return "layernorm_rows_backward: C must be <= 4096 when dnw or dnb is requested";
  if (p.C == 0) return nullptr;
  if (p.M == 0) {
    if (!partials) return nullptr;
    ReduceArgs r{};
    r.n0 = p.C; r.out0 = p.dnw; r.n1 = p.C; r.out1 = p.dnb;
    r.base0 = r.base1 = p.dnw ? p.dnw : p.dnb;  // never read (chunks = 0)
    r.chunks = 0;
    return launch_reduce(r, stream);
  }
  const size_t need = layernorm_rows_backward_workspace_bytes(p);
  if (partials && (!p.workspace || p.workspace_bytes < need))
    return "layernorm_rows_backward: workspace missing or smaller than layernorm_rows_backward_workspace_bytes()";
  lnbwd::Args a{};
  a.x = p.x; a.ldx = p.ldx; a.dy = p.dy; a.ld_dy = p.ld_dy; a.nw = p.norm_weight; a.eps = p.eps;
  a.dx = p.dx; a.ld_dx = p.ld_dx; a.mean_out = p.mean_out; a.rstd_out = p.rstd_out;
  a.part = partials ? p.workspace : nullptr;
  a.M = p.M; a.rows_per_block = ln_rows_per_block(p.M); a.C = p.C;
  const int64_t blocks = (p.M + a.rows_per_block - 1) / a.rows_per_block;
  const dim3 grid(static_cast<unsigned>(blocks), 1);
  const char* err;
  switch (p.dtype) {
    case DType::kFloat16: err = launch_grid(&lnbwd::ln_rows_bwd_kernel<Math16<false>>, grid, lnbwd::kThreads, stream, a); break;
    case DType::kBFloat16: err = launch_grid(&lnbwd::ln_rows_bwd_kernel<Math16<true>>, grid, lnbwd::kThreads, stream, a); break;
    default: err = launch_grid(&lnbwd::ln_rows_bwd_kernel<MathF32<false>>, grid, lnbwd::kThreads, stream, a);
  }
  if (err || !partials) return err;
  ReduceArgs r{};
  r.base0 = p.workspace; r.stride0 = 2 * int64_t(p.C); r.n0 = p.C; r.out0 = p.dnw;
  r.base1 = p.workspace + p.C; r.stride1 = 2 * int64_t(p.C); r.n1 = p.C; r.out1 = p.dnb;
  r.chunks = static_cast<int>(blocks);
  return launch_reduce(r, stream);
}

}  // namespace resfuse

#endif  // __CUDACC__ || RESFUSE_CUDA_EMULATE
