"""HorNet's recursive gated convolution (gnconv) forward in two Triton kernels.

Definition (resfuse/reference.py::gnconv_reference, HorNet's ``gnconv``)::

    dims = [D/2^(o-1), ..., D/2, D]        (o = order, d0 = dims[0], S = sum(dims) = 2D - d0)
    h    = LN_cf(x)  (optional: HorBlock's norm1, channels-first LayerNorm)
    f    = W_in h + b_in                   (1x1, D -> 2D)    f = [pwa (d0) | abc (S)]
    g    = s * (dwconv_kxk(abc) + b_dw)     (depthwise, k odd, padding k//2)  g = [g_0 | ... | g_{o-1}]
    x_0  = pwa * g_0
    x_i  = (W_{i-1} x_{i-1} + b_{i-1}) * g_i          i = 1..o-1    (1x1, dims[i-1] -> dims[i])
    y    = W_out x_{o-1} + b_out            (1x1, D -> D)
    y    = residual + layer_scale * y       (optional: HorBlock's ``x + gamma1 * gnconv(norm1(x))``)
    y    = residual + ss[n] * layer_scale * y  (ss optional: drop path's per-sample multiplier, training)

Kernels (two launches per gnconv, a third for the 16-bit LayerNorm fold
with norm1; HorNet's eager code runs 2o+3 kernels, ten more for the
LayerNorm and two for the residual):

1. ``_ln_conv1x1_kernel``: f = W_in LN(x) + b_in. A 1x1 conv is a GEMM over
   pixels (M = N*H*W) x output channels; each program first reduces its
   pixels' mean and variance over all C channels (two passes over its x
   tile, served by L2). In fp32 the LayerNorm is a prologue that normalizes
   each x tile in registers before ``tl.dot``; in fp16/bf16 it is folded
   (W' = W_in diag(lnw), by one small ``_ln_fold_weight_kernel`` launch per
   call that reads W_in and writes W') and the mean/rstd are applied in the
   epilogue, so the main loop is a plain pipelined GEMM (a register
   prologue makes every sm_90 wgmma wait for the previous one). Reads x
   once from HBM, writes f once.
2. ``_gnconv_chain_kernel``: everything after f, per tile of BLOCK_M pixels,
   in one program: the depthwise kxk conv of each channel block of abc is
   computed where its gate is needed (k*k masked loads of the f tile, the
   halo served by L1/L2), multiplied into pwa or into the 1x1 GEMM of the
   previous stage, and the stage's output x_i goes to a per-program scratch
   slot (D x BLOCK_M, ping-pong between two slots) that the next stage reads
   back as its GEMM operand (x_0, when 2 * D0 <= BLOCK_N so that stages 0
   and 1 each fit one channel tile, stays in registers and meets W_0, held
   for the whole loop, in one wgmma);
   proj_out (+ layer scale + residual) is the epilogue. The grid is persistent (a fixed number of programs, each looping
   over pixel tiles) so the scratch is a few MB reused tile after tile: it
   can live in L2 rather than reach HBM. Reads f once (pwa and abc), writes
   y once. ``tl.debug_barrier()`` orders the slot's writes and reads between
   stages (all threads of the program share the slot).

Both kernels use (channels x pixels) tiles: each 1x1 is computed as
out^T = W @ x^T, so pixels are the fast axis, which is what NCHW stores
contiguously and what keeps per-pixel index vectors to a few registers per
thread.

f must reach memory: the kxk depthwise needs a (k-1)/2-pixel halo of f around
every tile, which the projection of the neighbouring tiles produces.

Byte model (``bench.model.gnconv``, bench/model/rules.py's rules; per pixel,
in elements, weights apart; S = 2D - d0)::

    eager HorNet  3D + 4S + 3 d0 + sum_i (dims[i] + 4 dims[i+1]) + 2D   (2o + 3 kernels)
    stepwise      3D + (2D + S) + sum_i (dims[i] + 2 dims[i+1]) + 2D   (o + 2: dw+gate0, one GEMM per gate)
    fused (this)  3D (kernel 1) + 3D (kernel 2) = 6D                   (2 kernels)
    minimal       2D (x read, y written: one kernel, ruled out by the halo)

HorNet-T at batch 32, fp16, weights included (``python -m
bench.model.gnconv``), eager -> fused MB: stage 1 (D=64, o=2, 56x56)
218.4 -> 77.1 (2.83x less), stage 2 (128, o=3, 28x28) 125.4 -> 38.7 (3.24x),
stage 3 (256, o=4, 14x14) 67.2 -> 19.8 (3.39x), stage 4 (512, o=5, 7x7)
36.3 -> 11.7 (3.12x); the stepwise fusion would move 141.3 / 80.4 / 43.1 /
23.9 MB. With norm1 in kernel 1 and ``x + gamma1 * .`` in kernel 2 (the
HorBlock's first half; eager adds HorNet's 10-kernel LayerNorm and 2
kernels): 464.3 -> 90.0, 247.9 -> 45.3, 128.3 -> 23.8, 66.9 -> 16.4 MB
(4.1-5.5x), 19..25 kernels -> 3, the 16-bit LayerNorm fold included (W
re-read, W' written and read, 6 D^2 elements per call: 3.2 MB of stage
4's 16.4).

Layouts: every tensor is addressed through its own strides (NCHW,
channels_last, channel-sliced views such as f's pwa/abc halves). Offsets
are int64 when a tensor spans 2**31 elements or more (``INT64``).
"""

import torch
import triton
import triton.language as tl

from ._common import LAUNCHES_BY_KERNEL, TunedKernel, alloc_scratch, declare_kernels, dot_precision, launch
from ._common import interpreter_blocks
from ._common import interpreting, needs_int64, num_sms

#: The kernels of the gnconv family; ``LAUNCHES`` (module attribute) is
#: their total, LAUNCHES_BY_KERNEL[name] each one's (tests read both).
GNCONV_KERNELS = ("ln_conv1x1", "gnconv_chain")
declare_kernels(*GNCONV_KERNELS)


def __getattr__(name):
    if name == "LAUNCHES":
        return sum(LAUNCHES_BY_KERNEL[k] for k in GNCONV_KERNELS)
    raise AttributeError(name)

#: Pixels of scratch per SM for the chain kernel: the persistent grid has
#: NUM_SMS * SCRATCH_PIXELS_PER_SM // BLOCK_M programs at most, each with a
#: 2 x D x BLOCK_M scratch slot, so the scratch is NUM_SMS * 64 * 2D elements
#: whatever the tile (17 MB fp16 for D = 512 on 132 SMs, 13 MB of it touched:
#: a third of an H100's 50 MB L2).
SCRATCH_PIXELS_PER_SM = 64
#: Programs of the chain kernel in the interpreter: few, so that the tests
#: exercise the persistent loop (each program handles several tiles).
INTERPRETER_PROGRAMS = 2


# ----------------------------------------------------------------------------
# Kernel 2: depthwise kxk + gates + 1x1 chain + proj_out (+ layer scale + residual)
# ----------------------------------------------------------------------------

@triton.jit
def _pick(i: tl.constexpr, a, b, c, d):
    """The i-th of four arguments, chosen at compile time (the pws pointers
    and strides of stage i; order <= 5 means at most four)."""
    r = d
    if i == 0:
        r = a
    if i == 1:
        r = b
    if i == 2:
        r = c
    return r


@triton.jit
def _gate(f_ptr, g_ptr, wdw_ptr, bdw_ptr, f_pix, g_pix, h, w, m_ok, cn, n_ok, H, W, scale,
          sf_c, sf_h, sf_w, sg_c, sdw_c, sdw_r, sdw_s,
          D0: tl.constexpr, OFF: tl.constexpr, KS: tl.constexpr,
          GATES_GIVEN: tl.constexpr, HAS_B_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """s * (dwconv_kxk(abc) + b_dw) for abc channels OFF + cn (f channels
    D0 + OFF + cn) at the tile's pixels, in fp32: (BLOCK_N, BLOCK_M). With
    GATES_GIVEN the conv is replaced by a tensor (HorNet's gflayer output)."""
    if GATES_GIVEN:
        g = tl.load(g_ptr + (OFF + cn)[:, None] * sg_c + g_pix[None, :],
                    mask=n_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)
    else:
        PAD: tl.constexpr = KS // 2
        g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        # Only 1-D offsets stay live across the taps; each tap's 2-D pointer
        # tile is formed and consumed at once (a hoisted tile of 64-bit
        # pointers costs 2 registers per element). Not unrolled: unrolled,
        # the compiler hoists many tap loads at once and spills.
        ch_off = (D0 + OFF + cn) * sf_c
        w_ch = wdw_ptr + (OFF + cn) * sdw_c
        for r in tl.range(KS, loop_unroll_factor=1):
            hh = h + (r - PAD)
            row_ok = m_ok & (hh >= 0) & (hh < H)
            row_off = f_pix + (r - PAD) * sf_h
            for s in tl.range(KS, loop_unroll_factor=1):
                ww = w + (s - PAD)
                ok = row_ok & (ww >= 0) & (ww < W)
                v = tl.load(f_ptr + ch_off[:, None] + (row_off + (s - PAD) * sf_w)[None, :],
                            mask=n_ok[:, None] & ok[None, :], other=0.0)
                wt = tl.load(w_ch + (r * sdw_r + s * sdw_s), mask=n_ok, other=0.0)
                g += v.to(tl.float32) * wt.to(tl.float32)[:, None]
        if HAS_B_DW:
            g += tl.load(bdw_ptr + OFF + cn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    return g * scale


@triton.jit
def _gemm_from_scratch(src, w_ptr, sw_n, sw_k, cn, n_ok, KDIM: tl.constexpr,
                       DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[n, m] = sum_k W[n, k] * src[k, m] for k < KDIM: (BLOCK_N, BLOCK_M).
    src is this program's scratch slot, channel-major (channel k of the
    previous stage's output at src + k * BLOCK_M)."""
    cols = tl.arange(0, BLOCK_M)
    kk0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        kk = k0 + kk0
        k_ok = kk < KDIM
        a = tl.load(w_ptr + cn[:, None] * sw_n + kk[None, :] * sw_k, mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(src + kk[:, None] * BLOCK_M + cols[None, :], mask=k_ok[:, None], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _stage_preact(i: tl.constexpr, f_ptr, g_ptr, wdw_ptr, bdw_ptr, src,
                  w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
                  sw0_n, sw0_k, sw1_n, sw1_k, sw2_n, sw2_k, sw3_n, sw3_k,
                  f_pix, g_pix, h, w, m_ok, cn, n_ok, H, W, scale,
                  sf_c, sf_h, sf_w, sg_c, sdw_c, sdw_r, sdw_s,
                  D0: tl.constexpr, KS: tl.constexpr, GATES_GIVEN: tl.constexpr, HAS_B_DW: tl.constexpr,
                  PWS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(z_i, g_i) of stage i for channels cn of the tile, fp32 (BLOCK_N, BLOCK_M):
    z_0 = pwa, z_i = W_{i-1} x_{i-1} + b_{i-1} with x_{i-1} in the scratch
    slot `src`; g_i the scaled depthwise gate. x_i = z_i * g_i. One
    definition for the forward kernel and the backward's recompute, so the
    backward differentiates what the forward computed (the forward's
    FIRST_IN_REGS stage 1 sums the same products over a zero-padded K, so
    z_1 may differ from the recompute's in the last fp32 bit)."""
    DI: tl.constexpr = D0 << i
    OFF: tl.constexpr = D0 * ((1 << i) - 1)  # channel of g_i inside abc
    gate = _gate(f_ptr, g_ptr, wdw_ptr, bdw_ptr, f_pix, g_pix, h, w, m_ok, cn, n_ok, H, W, scale,
                 sf_c, sf_h, sf_w, sg_c, sdw_c, sdw_r, sdw_s,
                 D0, OFF, KS, GATES_GIVEN, HAS_B_DW, BLOCK_M, BLOCK_N)
    if i == 0:
        z = tl.load(f_ptr + cn[:, None] * sf_c + f_pix[None, :],
                    mask=n_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)
    else:
        z = _gemm_from_scratch(src, _pick(i - 1, w0_ptr, w1_ptr, w2_ptr, w3_ptr),
                               _pick(i - 1, sw0_n, sw1_n, sw2_n, sw3_n),
                               _pick(i - 1, sw0_k, sw1_k, sw2_k, sw3_k),
                               cn, n_ok, DI // 2, DOT_IN_FP32, INPUT_PRECISION,
                               BLOCK_M, BLOCK_N, BLOCK_K)
        if (PWS_BIAS >> (i - 1)) & 1:
            bias = _pick(i - 1, b0_ptr, b1_ptr, b2_ptr, b3_ptr)
            z += tl.load(bias + cn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    return z, gate


@triton.jit
def _gnconv_chain_kernel(
    f_ptr, g_ptr, wdw_ptr, bdw_ptr,
    w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
    wout_ptr, bout_ptr, ls_ptr, ss_ptr, res_ptr, y_ptr, scr_ptr,
    M, H, W, scale,
    sf_n, sf_c, sf_h, sf_w,
    sg_n, sg_c, sg_h, sg_w,
    sdw_c, sdw_r, sdw_s,
    sw0_n, sw0_k, sw1_n, sw1_k, sw2_n, sw2_k, sw3_n, sw3_k,
    swo_n, swo_k,
    sr_n, sr_c, sr_h, sr_w,
    sy_n, sy_c, sy_h, sy_w,
    D0: tl.constexpr, ORDER: tl.constexpr, KS: tl.constexpr,
    GATES_GIVEN: tl.constexpr, HAS_B_DW: tl.constexpr, PWS_BIAS: tl.constexpr, HAS_B_OUT: tl.constexpr,
    HAS_LS: tl.constexpr, HAS_SS: tl.constexpr, HAS_RES: tl.constexpr,
    INT64: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FIRST_IN_REGS: tl.constexpr = True,
):
    """gnconv after the projection, for BLOCK_M-pixel tiles (module docstring).

    f: (N, 2D, H, W) = [pwa | abc]; gates (GATES_GIVEN): (N, S, H, W);
    w_dw: (S, 1, KS, KS); pws i: (dims[i+1], dims[i]); w_out: (D, D); y and
    residual: (N, D, H, W); all through strides. dims[i] = D0 << i.
    Epilogue: y = residual + ss[n] * ls[c] * (W_out x + b_out), each part
    optional (HAS_RES, HAS_SS: drop path's per-sample scale, contiguous (N,);
    HAS_LS), in fp32 and rounded once.
    PWS_BIAS: bit i set when pws i has a bias. scr: per-program slots of
    2 x D x BLOCK_M elements of y's dtype (x_i is rounded to it, as eager
    rounds each stage's output).

    Per tile: reads f's pwa and abc once (the halo from cache), the weights
    (from L2); x_1 .. x_{o-1} go through the scratch slot (x_0 stays in
    registers where 2 * D0 <= BLOCK_N, FIRST_IN_REGS); writes y once.
    Tiles are (channels x pixels), pixels the fast axis (see
    _ln_conv1x1_kernel); each 1x1 is out^T = W @ x^T."""
    D: tl.constexpr = D0 << (ORDER - 1)
    SLOT: tl.constexpr = BLOCK_M * D
    # Where stages 0 and 1 each fit one channel tile (2 * D0 <= BLOCK_N),
    # x_0 stays in registers and is stage 1's GEMM operand as it is,
    # against W_0 as one zero-padded BLOCK_N x BLOCK_N tile loaded once per
    # program: no scratch round trip and no operand load per tile for that
    # K = D0 GEMM, which through the scratch is one K step (its operands
    # loaded synchronously, nothing in flight). FIRST_IN_REGS=False keeps
    # the scratch path (tests compare both).
    REGS0: tl.constexpr = FIRST_IN_REGS and ORDER >= 2 and 2 * D0 <= BLOCK_N
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scr = scr_ptr + pid.to(tl.int64) * (2 * SLOT)
    cols = tl.arange(0, BLOCK_M)
    rows = tl.arange(0, BLOCK_N)
    HW = H * W
    num_tiles = tl.cdiv(M, BLOCK_M)
    if REGS0:
        w0_tile = tl.load(w0_ptr + rows[:, None] * sw0_n + rows[None, :] * sw0_k,
                          mask=(rows < 2 * D0)[:, None] & (rows < D0)[None, :], other=0.0)
        if DOT_IN_FP32:
            w0_tile = w0_tile.to(tl.float32)
    for tile in tl.range(pid, num_tiles, nprog):
        offs_m = tile * BLOCK_M + cols
        if INT64:
            offs_m = offs_m.to(tl.int64)
        m_ok = offs_m < M
        img = offs_m // HW
        rem = offs_m % HW
        h = rem // W
        w = rem % W
        f_pix = img * sf_n + h * sf_h + w * sf_w
        g_pix = img * sg_n + h * sg_h + w * sg_w

        for i in tl.static_range(ORDER):
            DI = D0 << i
            dst = scr + (i % 2) * SLOT
            src = scr + ((i + 1) % 2) * SLOT
            if REGS0 and i <= 1:
                cn = rows
                if INT64:
                    cn = cn.to(tl.int64)
                n_ok = cn < DI
                if i == 0:
                    v, gate = _stage_preact(0, f_ptr, g_ptr, wdw_ptr, bdw_ptr, src,
                                            w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
                                            sw0_n, sw0_k, sw1_n, sw1_k, sw2_n, sw2_k, sw3_n, sw3_k,
                                            f_pix, g_pix, h, w, m_ok, cn, n_ok, H, W, scale,
                                            sf_c, sf_h, sf_w, sg_c, sdw_c, sdw_r, sdw_s,
                                            D0, KS, GATES_GIVEN, HAS_B_DW, PWS_BIAS, DOT_IN_FP32,
                                            INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                    # rows >= D0 are 0 (masked loads), as the scratch path's K mask makes them
                    x0 = (v * gate).to(scr_ptr.dtype.element_ty)
                    if DOT_IN_FP32:
                        x0 = x0.to(tl.float32)
                else:
                    gate = _gate(f_ptr, g_ptr, wdw_ptr, bdw_ptr, f_pix, g_pix, h, w, m_ok, cn, n_ok, H, W, scale,
                                 sf_c, sf_h, sf_w, sg_c, sdw_c, sdw_r, sdw_s,
                                 D0, D0, KS, GATES_GIVEN, HAS_B_DW, BLOCK_M, BLOCK_N)
                    z = tl.dot(w0_tile, x0, input_precision=INPUT_PRECISION)
                    if PWS_BIAS & 1:
                        z += tl.load(b0_ptr + cn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                    tl.store(dst + cn[:, None] * BLOCK_M + cols[None, :], (z * gate).to(scr_ptr.dtype.element_ty),
                             mask=n_ok[:, None])
            else:
                for n0 in range(0, DI, BLOCK_N):
                    cn = n0 + rows
                    if INT64:
                        cn = cn.to(tl.int64)
                    n_ok = cn < DI
                    v, gate = _stage_preact(i, f_ptr, g_ptr, wdw_ptr, bdw_ptr, src,
                                            w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
                                            sw0_n, sw0_k, sw1_n, sw1_k, sw2_n, sw2_k, sw3_n, sw3_k,
                                            f_pix, g_pix, h, w, m_ok, cn, n_ok, H, W, scale,
                                            sf_c, sf_h, sf_w, sg_c, sdw_c, sdw_r, sdw_s,
                                            D0, KS, GATES_GIVEN, HAS_B_DW, PWS_BIAS, DOT_IN_FP32,
                                            INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                    tl.store(dst + cn[:, None] * BLOCK_M + cols[None, :],
                             (v * gate).to(scr_ptr.dtype.element_ty), mask=n_ok[:, None])
            if not (REGS0 and i == 0):
                # x_i complete in the slot before the next stage reads it (and
                # x_{i-1}'s slot is free before stage i+1 overwrites it).
                tl.debug_barrier()

        last = scr + ((ORDER - 1) % 2) * SLOT
        y_pix = img * sy_n + h * sy_h + w * sy_w
        r_pix = img * sr_n + h * sr_h + w * sr_w
        for n0 in range(0, D, BLOCK_N):
            cn = n0 + rows
            if INT64:
                cn = cn.to(tl.int64)
            n_ok = cn < D
            out = _gemm_from_scratch(last, wout_ptr, swo_n, swo_k, cn, n_ok, D, DOT_IN_FP32, INPUT_PRECISION,
                                     BLOCK_M, BLOCK_N, BLOCK_K)
            if HAS_B_OUT:
                out += tl.load(bout_ptr + cn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            ok = n_ok[:, None] & m_ok[None, :]
            if HAS_LS:
                out = out * tl.load(ls_ptr + cn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if HAS_SS:
                out = out * tl.load(ss_ptr + img, mask=m_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_RES:
                out += tl.load(res_ptr + cn[:, None] * sr_c + r_pix[None, :], mask=ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + cn[:, None] * sy_c + y_pix[None, :], out.to(y_ptr.dtype.element_ty), mask=ok)
        # The next tile's stage 0 overwrites slot 0, which proj_out may have read.
        tl.debug_barrier()


def _chain_configs():
    """Tiles that compile on sm_90 to wgmma without register spills at
    orders 2-5 (resfuse.inspect over HorNet-T's stages, bf16, batch 1 and
    64; tests/test_gnconv.py compiles the whole space). The dots are
    W (BLOCK_N channels) @ x (BLOCK_M pixels), so a wgmma needs BLOCK_N >=
    64 per warpgroup: BLOCK_N = 32 tiles compile to mma.sync and are kept
    only for D <= 32 (the prune), where no wgmma tile fits. 3 stages: with
    2, every K step's cp.async is waited for (wait_group 0) before its
    MMA; with 3, one group stays in flight. 64x64 at 4 warps: 113-140
    registers, no spills (the depthwise weight channel-innermost, x_0 in
    registers: the chain kernel's FIRST_IN_REGS)."""
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (64, 64, 32, 4, 3), (32, 64, 32, 4, 3), (16, 64, 32, 4, 3), (32, 32, 32, 4, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return cfgs


def _chain_prune(configs, named_args, **kwargs):
    """Drop tiles far wider than the stages, and pixel tiles so large that
    the grid would leave SMs idle on small feature maps (forward and
    backward chain kernels)."""
    args = {**named_args, **kwargs}  # the autotuner passes keyword (constexpr) arguments apart
    D = args["D0"] << (args["ORDER"] - 1)
    M = args["M"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(D))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(D))
            and (c.kwargs["BLOCK_M"] <= 32 or M >= 64 * num_sms())]
    return kept or configs[-1:]


def _chain_fwd_prune(configs, named_args, **kwargs):
    """_chain_prune, then the forward's wgmma rule: 64-channel tiles unless
    D <= 32 (see _chain_configs)."""
    args = {**named_args, **kwargs}
    narrow = triton.next_power_of_2(args["D0"] << (args["ORDER"] - 1)) <= 32
    kept = _chain_prune(configs, named_args, **kwargs)
    return [c for c in kept if (c.kwargs["BLOCK_N"] == 32) == narrow] or kept


_gnconv_chain_tuned = TunedKernel(
    _gnconv_chain_kernel, _chain_configs(),
    key=["M", "D0", "ORDER", "KS", "GATES_GIVEN", "HAS_RES"], prune=_chain_fwd_prune)

def _interpreter_blocks_chain(D):
    return interpreter_blocks((32, 16, 16 if D <= 32 else 32))


def gnconv_chain_fwd(f, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, residual, layer_scale, out, *,
                     allow_tf32, force_int64=False, sample_scale=None, first_in_regs=True):
    """Launch kernel 2. Validated by resfuse.ops.gnconv. f: (N, 2D, H, W);
    exactly one of w_dw (S, 1, k, k) and gates (N, S, H, W); w_pws/b_pws:
    order-1 weights (dims[i+1], dims[i], 1, 1) and biases (or None);
    `out`: preallocated (N, D, H, W); sample_scale: None or (N,) (drop
    path's per-sample multiplier: out = residual + ss[n] * ls[c] * y);
    first_in_regs=False: x_0 through the scratch too (the kernel's
    FIRST_IN_REGS; for tests and the inspection tool's control)."""
    N, _, H, W = f.shape
    D = w_out.shape[0]
    order = len(w_pws) + 1
    if order > 5:
        raise ValueError(f"the Triton gnconv kernel supports order <= 5, got {order}")
    d0 = D >> (order - 1)
    M = N * H * W
    if M == 0:
        return out
    interpret = interpreting()
    dummy = f
    b_dw, b_out, layer_scale, sample_scale = (None if v is None else v.contiguous()
                                              for v in (b_dw, b_out, layer_scale, sample_scale))
    b_pws = [None if b is None else b.contiguous() for b in b_pws]
    ws = list(w_pws) + [dummy] * (4 - len(w_pws))
    bs = [b if b is not None else dummy for b in b_pws] + [dummy] * (4 - len(b_pws))
    w_strides = []
    for i in range(4):
        w_strides += [w_pws[i].stride(0), w_pws[i].stride(1)] if i < len(w_pws) else [0, 0]
    pws_bias = sum(1 << i for i, b in enumerate(b_pws) if b is not None)
    gs = gates.stride() if gates is not None else (0, 0, 0, 0)
    rs = residual.stride() if residual is not None else (0, 0, 0, 0)
    dws = (w_dw.stride(0), w_dw.stride(2), w_dw.stride(3)) if w_dw is not None else (0, 0, 0)
    ks = w_dw.shape[-1] if w_dw is not None else 1
    int64 = force_int64 or needs_int64(f, gates, residual, out, extra=M)
    n_sms = num_sms(f.device)

    if interpret:
        bm, bn, bk = _interpreter_blocks_chain(D)
        kernel, tiles = _gnconv_chain_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        max_pixels = INTERPRETER_PROGRAMS * bm
    else:
        kernel, tiles = _gnconv_chain_tuned, {}
        max_pixels = n_sms * SCRATCH_PIXELS_PER_SM

    def grid(meta):
        bm_ = meta["BLOCK_M"]
        return (max(1, min(triton.cdiv(M, bm_), max_pixels // bm_)),)

    # Slots for the largest grid any configuration launches (same pixel budget).
    scratch = alloc_scratch(max_pixels * 2 * D, out.dtype, out.device)
    launch(
        "gnconv_chain", kernel, grid,
        f, gates if gates is not None else dummy, w_dw if w_dw is not None else dummy,
        b_dw if b_dw is not None else dummy,
        *ws, *bs,
        w_out, b_out if b_out is not None else dummy, layer_scale if layer_scale is not None else dummy,
        sample_scale if sample_scale is not None else dummy,
        residual if residual is not None else dummy, out, scratch,
        M, H, W, float(scale),
        *f.stride(), *gs, *dws, *w_strides, w_out.stride(0), w_out.stride(1), *rs, *out.stride(),
        D0=d0, ORDER=order, KS=ks,
        GATES_GIVEN=gates is not None, HAS_B_DW=b_dw is not None, PWS_BIAS=pws_bias, HAS_B_OUT=b_out is not None,
        HAS_LS=layer_scale is not None, HAS_SS=sample_scale is not None, HAS_RES=residual is not None,
        INT64=bool(int64), DOT_IN_FP32=interpret and f.dtype == torch.bfloat16,
        INPUT_PRECISION=dot_precision(f.dtype, allow_tf32), FIRST_IN_REGS=bool(first_in_regs), **tiles,
    )
    return out
