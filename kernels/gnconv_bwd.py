"""HorNet's gnconv backward (after the projection) in two Triton kernels.

Forward (kernels/gnconv.py; per pixel, d0 = dims[0], dims[i] = d0 << i,
D = dims[-1], S = sum(dims) = 2D - d0, o = order <= 5)::

    f   = [pwa (d0) | abc (S)]                    (N, 2D, H, W)
    a   = dwconv_kxk(abc) + b_dw   or  a = gates   (N, S, H, W)
    g   = scale * a = [g_0 | ... | g_{o-1}]
    z_0 = pwa;  x_0 = z_0 * g_0;  z_i = W_{i-1} x_{i-1} + b_{i-1};  x_i = z_i * g_i
    y   = W_out x_{o-1} + b_out;   out = residual + ss[n] * ls[c] * y

Backward, given dout::

    dy      = dout * ls[c] * ss[n]
    dx_{o-1} = W_out^T dy
    dz_i    = dx_i * g_i ;  da_i = scale * dx_i * z_i ;  dx_{i-1} = W_{i-1}^T dz_i     (i = o-1 .. 0)
    dpwa    = dz_0
    dabc    = dwconv_kxk^T(da)   (kernel 2)   dW_dw, db_dw from da and abc (kernel 2)

Kernels:

1. ``_gnconv_chain_bwd_kernel`` (``gnconv_chain_bwd``): per tile of BLOCK_M
   pixels, recomputes the forward stages from f exactly as the forward
   kernel does (same helper ``_stage_preact``: x_i is
   bit-for-bit the forward's), keeping z_i and g_i of the tile in a
   per-program scratch, then runs the chain backward through the same
   scratch and writes dpwa (into d_f[:, :d0]), da, the stage outputs x_i and
   the pws-output grads dz_i (i >= 1): what the weight-gradient GEMMs of
   pws/proj_out need (done elsewhere from x_save, dz_save and dout).
2. ``_dwconv_bwd_kernel`` (``dwconv_bwd``): the depthwise conv's backward:
   d_abc (the transposed kxk conv of da, into d_f[:, d0:]) and the per
   channel weight and bias gradients, reduced without atomics.

Byte model (per pixel, in elements, weights and the O(programs) partials
apart; S = 2D - d0)::

    chain bwd   reads f 2D (the kxk halo of abc from L1/L2) + dout D
                writes d_f[:, :d0] d0 + d_a S + x_save S + dz_save S - d0
                = 3D + 3S = 9D - 3 d0
    dwconv bwd  reads d_a S + abc S (halo from cache); writes d_abc S = 3S

Recompute vs store: the gates and the stage tensors are recomputed from f
instead of being saved by the forward. Recomputing g costs k*k FMAs per
channel (49 for HorNet's 7x7) and no HBM bytes; saving g would cost S
writes in the forward and S reads here per pixel, and saving z_i as well
another 2S. Inside the backward kernel z_i and g_i go to the scratch (L2)
rather than being recomputed a second time.

Scratch: per program (2D + 2S) x BLOCK_M elements of f's dtype: two D-wide
slots (x_{i-1} -> x_i in the forward stages, then dy -> dz_{o-1} -> ...
ping-pong in the backward) and z, g of all stages. With
``BWD_SCRATCH_PIXELS_PER_SM`` = 64 that is at most NUM_SMS * 64 * (2D + 2S)
elements: 51 MB fp16 for D = 512 (order 5) on 132 SMs, of which only the
launched programs' part is touched (min(M, 8448) pixels rounded to tiles):
10 MB for HorNet-T stage 4 (7x7) at batch 32, but all of it, the size of an
H100's L2, from batch 173 on; then the scratch traffic (S + 2D writes,
as many reads per pixel) starts to reach HBM.

Layouts: every tensor is addressed through its own strides (NCHW,
channels_last, channel-sliced views). Offsets are int64 when a tensor spans
2**31 elements or more (``INT64``).
"""

import torch
import triton
import triton.language as tl

from ._common import LAUNCHES_BY_KERNEL  # noqa: F401  (re-exported: tests read the counters here)
from ._common import TunedKernel, alloc_scratch, declare_kernels, dot_precision, interpreter_blocks, launch
from ._common import interpreting, needs_int64, num_sms
from .gnconv import _chain_prune, _gemm_from_scratch, _pick, _stage_preact

#: Launch counters (LAUNCHES_BY_KERNEL[name], shared with every kernel module).
GNCONV_BWD_KERNELS = ("gnconv_chain_bwd", "dwconv_bwd")
declare_kernels(*GNCONV_BWD_KERNELS)

#: Pixels of scratch per SM for the chain backward (see the module
#: docstring): the persistent grid has NUM_SMS * 64 // BLOCK_M programs at
#: most, the same pixel budget as the forward.
BWD_SCRATCH_PIXELS_PER_SM = 64
#: Persistent programs in the interpreter: few, so that each program loops
#: over several tiles.
INTERPRETER_PROGRAMS = 2
#: dwconv_bwd: pixel programs per channel block in the interpreter.
INTERPRETER_PIX_PROGRAMS = 2


# ----------------------------------------------------------------------------
# Kernel 1: chain backward
# ----------------------------------------------------------------------------

@triton.jit
def _round(x, dt: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 x rounded to dt. RNE_BF16 (interpreter and bf16 only): the
    interpreter's fp32 -> bf16 cast truncates, which biases the backward's
    chain of roundings (dy, dx_i, dz_i) to ~4x eager's error; rounding to
    nearest even with integer ops first makes the cast exact, as a GPU's
    cvt.rn does it. The GPU path is a plain cast."""
    if RNE_BF16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, b.to(tl.float32, bitcast=True))
    return x.to(dt)


@triton.jit
def _gnconv_chain_bwd_kernel(
    f_ptr, g_ptr, wdw_ptr, bdw_ptr,
    w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
    wout_ptr, ls_ptr, ss_ptr, dout_ptr,
    df_ptr, da_ptr, xs_ptr, dzs_ptr, scr_ptr,
    M, H, W, scale,
    sf_n, sf_c, sf_h, sf_w,
    sg_n, sg_c, sg_h, sg_w,
    sdw_c, sdw_r, sdw_s,
    sw0_n, sw0_k, sw1_n, sw1_k, sw2_n, sw2_k, sw3_n, sw3_k,
    swo_n, swo_k,
    sdo_n, sdo_c, sdo_h, sdo_w,
    sdf_n, sdf_c, sdf_h, sdf_w,
    sda_n, sda_c, sda_h, sda_w,
    sxs_n, sxs_c, sxs_h, sxs_w,
    sdz_n, sdz_c, sdz_h, sdz_w,
    D0: tl.constexpr, ORDER: tl.constexpr, KS: tl.constexpr,
    GATES_GIVEN: tl.constexpr, HAS_B_DW: tl.constexpr, PWS_BIAS: tl.constexpr,
    HAS_LS: tl.constexpr, HAS_SS: tl.constexpr,
    INT64: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gnconv chain backward for BLOCK_M-pixel tiles (module docstring).

    Inputs: f (N, 2D, H, W) = [pwa | abc]; gates (GATES_GIVEN) (N, S, H, W)
    or w_dw (S, 1, KS, KS) + b_dw (S,); pws i: W_i (dims[i+1], dims[i]) via
    (sw_n, sw_k) strides, b_i (PWS_BIAS bit i); w_out (D, D); ls (D,) and
    ss (N,) contiguous (each optional); dout (N, D, H, W).
    Outputs (f's dtype): d_f[:, :d0] <- dz_0 (channels >= d0 untouched);
    d_a (N, S, H, W) <- da = scale * dx * z; x_save (N, S, H, W) <- x_i;
    dz_save (N, S - d0, H, W) <- [dz_1 | ... | dz_{o-1}] (unused at order 1).
    Every tensor through its strides.

    Per tile: reads f (2D, halo from cache) and dout (D) once; writes each
    output once. scr: per-program (2D + 2S) x BLOCK_M elements of f's dtype
    = [slot 0 (D) | slot 1 (D) | z (S) | g (S)], channel-major (channel c
    at c * BLOCK_M). Rounding follows eager: x_i = round(z_i * g_i) from the
    fp32 z_i and g_i (as the forward kernel); z_i, g_i, dy, dx_i, dz_i are
    rounded to the dtype eager holds them in; GEMMs accumulate in fp32;
    da = scale * dx * z is rounded once. W^T tiles are W's tiles read
    through swapped strides (no copies)."""
    D: tl.constexpr = D0 << (ORDER - 1)
    S: tl.constexpr = 2 * D - D0
    SLOT: tl.constexpr = BLOCK_M * D
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scr = scr_ptr + pid.to(tl.int64) * ((2 * D + 2 * S) * BLOCK_M)
    zs = scr + 2 * SLOT
    gs = zs + S * BLOCK_M
    dt = scr_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_M)
    rows = tl.arange(0, BLOCK_N)
    HW = H * W
    num_tiles = tl.cdiv(M, BLOCK_M)
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

        # ---- forward recompute: x_i (-> x_save, slot), z_i and g_i (-> scratch)
        xs_pix = img * sxs_n + h * sxs_h + w * sxs_w
        for i in tl.static_range(ORDER):
            DI = D0 << i
            OFF = D0 * ((1 << i) - 1)  # channel of stage i inside abc / S-wide tensors
            dst = scr + (i % 2) * SLOT
            src = scr + ((i + 1) % 2) * SLOT
            for n0 in range(0, DI, BLOCK_N):
                cn = n0 + rows
                if INT64:
                    cn = cn.to(tl.int64)
                n_ok = cn < DI
                z, gate = _stage_preact(i, f_ptr, g_ptr, wdw_ptr, bdw_ptr, src,
                                        w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
                                        sw0_n, sw0_k, sw1_n, sw1_k, sw2_n, sw2_k, sw3_n, sw3_k,
                                        f_pix, g_pix, h, w, m_ok, cn, n_ok, H, W, scale,
                                        sf_c, sf_h, sf_w, sg_c, sdw_c, sdw_r, sdw_s,
                                        D0, KS, GATES_GIVEN, HAS_B_DW, PWS_BIAS, DOT_IN_FP32, INPUT_PRECISION,
                                        BLOCK_M, BLOCK_N, BLOCK_K)
                x = _round(z * gate, dt, RNE_BF16)
                if i < ORDER - 1:  # the next stage's GEMM operand
                    tl.store(dst + cn[:, None] * BLOCK_M + cols[None, :], x, mask=n_ok[:, None])
                sc = (OFF + cn)[:, None] * BLOCK_M + cols[None, :]
                tl.store(zs + sc, _round(z, dt, RNE_BF16), mask=n_ok[:, None])
                tl.store(gs + sc, _round(gate, dt, RNE_BF16), mask=n_ok[:, None])
                tl.store(xs_ptr + (OFF + cn)[:, None] * sxs_c + xs_pix[None, :], x,
                         mask=n_ok[:, None] & m_ok[None, :])
            # Stage i's slot, z and g complete before anyone reads them.
            tl.debug_barrier()

        # ---- dy = dout * ls * ss -> slot 0 (both slots are free now)
        do_pix = img * sdo_n + h * sdo_h + w * sdo_w
        if HAS_SS:
            ss = tl.load(ss_ptr + img, mask=m_ok, other=0.0).to(tl.float32)
        for n0 in range(0, D, BLOCK_N):
            cn = n0 + rows
            if INT64:
                cn = cn.to(tl.int64)
            n_ok = cn < D
            dy = tl.load(dout_ptr + cn[:, None] * sdo_c + do_pix[None, :], mask=n_ok[:, None] & m_ok[None, :],
                         other=0.0).to(tl.float32)
            if HAS_LS:
                dy = dy * tl.load(ls_ptr + cn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if HAS_SS:
                dy = dy * ss[None, :]
            tl.store(scr + cn[:, None] * BLOCK_M + cols[None, :], _round(dy, dt, RNE_BF16), mask=n_ok[:, None])
        tl.debug_barrier()

        # ---- backward stages o-1 .. 0: slot j%2 holds the grad of stage i's output's consumer input
        da_pix = img * sda_n + h * sda_h + w * sda_w
        dz_pix = img * sdz_n + h * sdz_h + w * sdz_w
        df_pix = img * sdf_n + h * sdf_h + w * sdf_w
        for j in tl.static_range(ORDER):
            i = ORDER - 1 - j
            DI = D0 << i
            OFF = D0 * ((1 << i) - 1)
            src = scr + (j % 2) * SLOT
            dst = scr + ((j + 1) % 2) * SLOT
            for n0 in range(0, DI, BLOCK_N):
                cn = n0 + rows
                if INT64:
                    cn = cn.to(tl.int64)
                n_ok = cn < DI
                ok = n_ok[:, None] & m_ok[None, :]
                if i == ORDER - 1:  # dx_{o-1} = W_out^T dy
                    dx = _gemm_from_scratch(src, wout_ptr, swo_k, swo_n, cn, n_ok, D, DOT_IN_FP32,
                                            INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                else:  # dx_i = W_i^T dz_{i+1}
                    dx = _gemm_from_scratch(src, _pick(i, w0_ptr, w1_ptr, w2_ptr, w3_ptr),
                                            _pick(i, sw0_k, sw1_k, sw2_k, sw3_k),
                                            _pick(i, sw0_n, sw1_n, sw2_n, sw3_n),
                                            cn, n_ok, DI * 2, DOT_IN_FP32, INPUT_PRECISION,
                                            BLOCK_M, BLOCK_N, BLOCK_K)
                dx = _round(dx, dt, RNE_BF16).to(tl.float32)
                sc = (OFF + cn)[:, None] * BLOCK_M + cols[None, :]
                g = tl.load(gs + sc, mask=n_ok[:, None], other=0.0).to(tl.float32)
                z = tl.load(zs + sc, mask=n_ok[:, None], other=0.0).to(tl.float32)
                dz = _round(dx * g, dt, RNE_BF16)
                tl.store(da_ptr + (OFF + cn)[:, None] * sda_c + da_pix[None, :],
                         _round(dx * z * scale, dt, RNE_BF16), mask=ok)
                if i > 0:
                    tl.store(dst + cn[:, None] * BLOCK_M + cols[None, :], dz, mask=n_ok[:, None])
                    tl.store(dzs_ptr + (OFF - D0 + cn)[:, None] * sdz_c + dz_pix[None, :], dz, mask=ok)
                else:
                    tl.store(df_ptr + cn[:, None] * sdf_c + df_pix[None, :], dz, mask=ok)
            # dz_i complete before stage i-1 reads it; after stage 0 the
            # scratch is free for the next tile's forward stages.
            tl.debug_barrier()


def _chain_bwd_configs():
    """GPU autotune space. ptxas -v of the fp16 kernel (sm_90a, every
    feature on, 7x7) at orders 2..5 with D0 from 1 to 256: these three
    compile without spills except 104 bytes for 64x32 at order 5, D0 16 and
    8 bytes for 16x32 at order 2, D0 32. 64x64 at 8 warps,
    64x32 (4 warps) and 16x64 spill 200-1450 bytes here (the backward keeps
    more pointer tiles live: x_save, z and g stores, then g and z loads
    beside the W^T GEMM); 128-pixel tiles are left out (their scratch would
    halve the programs at the shared pixel budget)."""
    cfgs = []
    for bm, bn, bk, warps, stages in [(64, 32, 32, 8, 2), (32, 32, 32, 8, 2), (16, 32, 32, 4, 2)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return cfgs


_gnconv_chain_bwd_tuned = TunedKernel(
    _gnconv_chain_bwd_kernel, _chain_bwd_configs(),
    key=["M", "D0", "ORDER", "KS", "GATES_GIVEN"], prune=_chain_prune)


def _strides4(t):
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def gnconv_chain_bwd(f, w_dw, b_dw, gates, w_pws, b_pws, w_out, scale, dout, layer_scale, sample_scale,
                     d_f, d_a, x_save, dz_save, *, allow_tf32, force_int64=False):
    """Launch ``_gnconv_chain_bwd_kernel``. f: (N, 2D, H, W); exactly one of
    w_dw (S, 1, k, k) (+ b_dw (S,) or None) and gates (N, S, H, W); w_pws /
    b_pws: order-1 weights (dims[i+1], dims[i], 1, 1) and biases (or None);
    w_out (D, D, 1, 1); dout (N, D, H, W); layer_scale (D,) / sample_scale
    (N,) or None. Preallocated outputs of f's dtype, any strides: d_f
    (N, 2D, H, W) (only channels < d0 written), d_a and x_save (N, S, H, W),
    dz_save (N, S - d0, H, W) (None allowed at order 1). Returns
    (d_f, d_a, x_save, dz_save)."""
    N, C2, H, W = f.shape
    D = w_out.shape[0]
    order = len(w_pws) + 1
    if order > 5:
        raise ValueError(f"the Triton gnconv backward supports order <= 5, got {order}")
    if (w_dw is None) == (gates is None):
        raise ValueError("exactly one of w_dw and gates must be given")
    d0 = D >> (order - 1)
    S = 2 * D - d0
    if C2 != 2 * D or d0 << (order - 1) != D:
        raise ValueError(f"f has {C2} channels, expected 2*D = {2 * D} with D = {D} divisible by 2^(order-1)")
    if dz_save is None and order > 1:
        raise ValueError("dz_save is required for order > 1")
    for name, t in (("dout", dout), ("d_f", d_f), ("d_a", d_a), ("x_save", x_save), ("dz_save", dz_save)):
        if t is not None and t.dtype != f.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected f's {f.dtype}")
    for name, t, shape in (("dout", dout, (N, D, H, W)), ("d_f", d_f, (N, 2 * D, H, W)),
                           ("d_a", d_a, (N, S, H, W)), ("x_save", x_save, (N, S, H, W)),
                           ("dz_save", dz_save, (N, S - d0, H, W))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    M = N * H * W
    if M == 0:
        return d_f, d_a, x_save, dz_save
    interpret = interpreting()
    dummy = f
    b_dw, layer_scale, sample_scale = (None if v is None else v.contiguous()
                                       for v in (b_dw, layer_scale, sample_scale))
    b_pws = [None if b is None else b.contiguous() for b in b_pws]
    ws = list(w_pws) + [dummy] * (4 - len(w_pws))
    bs = [b if b is not None else dummy for b in b_pws] + [dummy] * (4 - len(b_pws))
    w_strides = []
    for i in range(4):
        w_strides += [w_pws[i].stride(0), w_pws[i].stride(1)] if i < len(w_pws) else [0, 0]
    pws_bias = sum(1 << i for i, b in enumerate(b_pws) if b is not None)
    dws = (w_dw.stride(0), w_dw.stride(2), w_dw.stride(3)) if w_dw is not None else (0, 0, 0)
    ks = w_dw.shape[-1] if w_dw is not None else 1
    int64 = force_int64 or needs_int64(f, gates, dout, d_f, d_a, x_save, dz_save, extra=M)

    if interpret:
        bm, bn, bk = interpreter_blocks((16, 16, 16))
        kernel, tiles = _gnconv_chain_bwd_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        max_pixels = INTERPRETER_PROGRAMS * bm
    else:
        kernel, tiles = _gnconv_chain_bwd_tuned, {}
        max_pixels = num_sms(f.device) * BWD_SCRATCH_PIXELS_PER_SM

    def grid(meta):
        bm_ = meta["BLOCK_M"]
        return (max(1, min(triton.cdiv(M, bm_), max_pixels // bm_)),)

    # Slots for the largest grid any configuration launches (same pixel budget).
    scratch = alloc_scratch(max_pixels * (2 * D + 2 * S), f.dtype, f.device)
    launch(
        "gnconv_chain_bwd", kernel, grid,
        f, gates if gates is not None else dummy, w_dw if w_dw is not None else dummy,
        b_dw if b_dw is not None else dummy,
        *ws, *bs,
        w_out, layer_scale if layer_scale is not None else dummy,
        sample_scale if sample_scale is not None else dummy, dout,
        d_f, d_a, x_save, dz_save if dz_save is not None else dummy, scratch,
        M, H, W, float(scale),
        *f.stride(), *_strides4(gates), *dws, *w_strides, w_out.stride(0), w_out.stride(1),
        *dout.stride(), *d_f.stride(), *d_a.stride(), *x_save.stride(), *_strides4(dz_save),
        D0=d0, ORDER=order, KS=ks,
        GATES_GIVEN=gates is not None, HAS_B_DW=b_dw is not None, PWS_BIAS=pws_bias,
        HAS_LS=layer_scale is not None, HAS_SS=sample_scale is not None,
        INT64=bool(int64), DOT_IN_FP32=interpret and f.dtype == torch.bfloat16,
        INPUT_PRECISION=dot_precision(f.dtype, allow_tf32), RNE_BF16=interpret and f.dtype == torch.bfloat16,
        **tiles,
    )
    return d_f, d_a, x_save, dz_save


# ----------------------------------------------------------------------------
# Kernel 2: depthwise kxk backward (data, weight and bias gradients)
# ----------------------------------------------------------------------------

@triton.jit
def _dwconv_bwd_kernel(
    da_ptr, x_ptr, w_ptr, dx_ptr, pw_ptr, pb_ptr,
    M, C, H, W, PIX_PROGS,
    sda_n, sda_c, sda_h, sda_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_c, sw_r, sw_s,
    sdx_n, sdx_c, sdx_h, sdx_w,
    KS: tl.constexpr, KKP: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, INT64: tl.constexpr,
    RNE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward of a depthwise kxk conv (stride 1, padding P = KS // 2),
    for a (BLOCK_C channels x BLOCK_M pixels) tile at a time::

        d_x[n,c,h,w]  = sum_{r,s} w[c,r,s] * d_a[n,c,h+P-r,w+P-s]       (zero outside the image)
        pw[p,c,r*KS+s] = sum_{pixels of program p} d_a[n,c,h,w] * x[n,c,h+r-P,w+s-P]
        pb[p,c]        = sum_{pixels of program p} d_a[n,c,h,w]

    d_a, x, d_x: (N, C, H, W) through strides; w: (C, 1, KS, KS) through
    (sw_c, sw_r, sw_s). Grid (channel blocks, PIX_PROGS): program (cb, p)
    owns pixel tiles p, p + PIX_PROGS, ... of its channel block and
    accumulates its weight/bias partials in fp32 registers (the taps of the
    (BLOCK_C, KKP) tile selected by a compare, as registers cannot be
    indexed), then writes them once to pw (PIX_PROGS, C, KS*KS) and pb
    (PIX_PROGS, C), fp32: no atomics, a deterministic sum over p later.
    Per pixel: reads d_a C and x C once (the halos from cache), writes d_x C."""
    PAD: tl.constexpr = KS // 2
    KK: tl.constexpr = KS * KS
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        cc = cc.to(tl.int64)
    c_ok = cc < C
    taps = tl.arange(0, KKP)
    cols = tl.arange(0, BLOCK_M)
    dw_acc = tl.zeros((BLOCK_C, KKP), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    da_c = cc * sda_c
    x_c = cc * sx_c
    w_c = w_ptr + cc * sw_c
    HW = H * W
    num_tiles = tl.cdiv(M, BLOCK_M)
    for tile in range(pid_p, num_tiles, PIX_PROGS):
        offs_m = tile * BLOCK_M + cols
        if INT64:
            offs_m = offs_m.to(tl.int64)
        m_ok = offs_m < M
        img = offs_m // HW
        rem = offs_m % HW
        h = rem // W
        w = rem % W
        da_pix = img * sda_n + h * sda_h + w * sda_w
        x_pix = img * sx_n + h * sx_h + w * sx_w
        if NEED_DW or NEED_DB:
            d = tl.load(da_ptr + da_c[:, None] + da_pix[None, :], mask=c_ok[:, None] & m_ok[None, :],
                        other=0.0).to(tl.float32)
            if NEED_DB:
                db_acc += tl.sum(d, axis=1)
        acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
        # Not unrolled (as the forward's _gate): unrolled, the tap loads are
        # hoisted together and spill.
        for r in tl.range(KS, loop_unroll_factor=1):
            hh = h + (PAD - r)
            row_ok = m_ok & (hh >= 0) & (hh < H)
            if NEED_DW:
                hx = h + (r - PAD)
                xrow_ok = m_ok & (hx >= 0) & (hx < H)
            for s in tl.range(KS, loop_unroll_factor=1):
                ww = w + (PAD - s)
                ok = row_ok & (ww >= 0) & (ww < W)
                v = tl.load(da_ptr + da_c[:, None] + (da_pix + (PAD - r) * sda_h + (PAD - s) * sda_w)[None, :],
                            mask=c_ok[:, None] & ok[None, :], other=0.0)
                wt = tl.load(w_c + (r * sw_r + s * sw_s), mask=c_ok, other=0.0)
                acc += v.to(tl.float32) * wt.to(tl.float32)[:, None]
                if NEED_DW:
                    wx = w + (s - PAD)
                    okx = xrow_ok & (wx >= 0) & (wx < W)
                    xv = tl.load(x_ptr + x_c[:, None] + (x_pix + (r - PAD) * sx_h + (s - PAD) * sx_w)[None, :],
                                 mask=c_ok[:, None] & okx[None, :], other=0.0)
                    part = tl.sum(d * xv.to(tl.float32), axis=1)
                    dw_acc += tl.where(taps[None, :] == r * KS + s, part[:, None], 0.0)
        dx_pix = img * sdx_n + h * sdx_h + w * sdx_w
        tl.store(dx_ptr + (cc * sdx_c)[:, None] + dx_pix[None, :], _round(acc, dx_ptr.dtype.element_ty, RNE_BF16),
                 mask=c_ok[:, None] & m_ok[None, :])
    prow = pid_p * C + cc
    if NEED_DW:
        tl.store(pw_ptr + prow[:, None] * KK + taps[None, :], dw_acc, mask=c_ok[:, None] & (taps < KK)[None, :])
    if NEED_DB:
        tl.store(pb_ptr + prow, db_acc, mask=c_ok)


def _dwconv_bwd_configs():
    """GPU autotune space ((channels x pixels) tiles): those that compile
    without register spills on sm_90 (ptxas -v, fp16, 7x7 and 3x3, both
    weight grads). The live state is two (BLOCK_C, BLOCK_M) fp32 tiles (d_x
    accumulator, the d_a tile) and the (BLOCK_C, 64) weight-gradient
    accumulator of a 7x7; 32x64 and 16x128 at 4 warps, 64x32 and 32x32
    spill 24-160 bytes."""
    cfgs = []
    for bc, bm, warps in [(32, 64, 8), (16, 128, 8), (8, 128, 4), (16, 256, 8)]:
        cfgs.append(triton.Config({"BLOCK_C": bc, "BLOCK_M": bm}, num_warps=warps, num_stages=2))
    return cfgs


def _dwconv_bwd_prune(configs, named_args, **kwargs):
    """Drop channel tiles far wider than the channels."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= max(16, triton.next_power_of_2(args["C"]))]
    return kept or configs[-1:]


_dwconv_bwd_tuned = TunedKernel(
    _dwconv_bwd_kernel, _dwconv_bwd_configs(),
    key=["M", "C", "KS", "NEED_DW", "NEED_DB"], prune=_dwconv_bwd_prune)


def _pixel_programs(M, C, device):
    """Pixel programs per channel block, the same for every autotune config
    (the partials' row count must not depend on the tile): about four
    programs per SM for 32-channel blocks, at most one per 32 pixels."""
    if interpreting():
        return INTERPRETER_PIX_PROGRAMS
    return max(1, min(triton.cdiv(M, 32), triton.cdiv(4 * num_sms(device), triton.cdiv(C, 32))))


def dwconv_bwd(d_a, abc, w_dw, d_abc, *, need_weight_grad=True, need_bias_grad=True, force_int64=False,
               allow_tf32=None):
    """Launch ``_dwconv_bwd_kernel``. d_a, abc: (N, S, H, W); w_dw (S, 1, k, k),
    k odd (padding k//2, stride 1); d_abc: preallocated (N, S, H, W), any
    strides (in gnconv the channel view d_f[:, d0:]; it must not overlap
    d_a). Writes d_abc; returns (d_w fp32 (S, 1, k, k) or None, d_b fp32
    (S,) or None). allow_tf32 is accepted and unused (no tl.dot here), so
    that the ops call every launcher alike."""
    N, S, H, W = d_a.shape
    ks = w_dw.shape[-1]
    if ks % 2 == 0 or tuple(w_dw.shape) != (S, 1, ks, ks):
        raise ValueError(f"w_dw must be (S, 1, k, k) with k odd and S = {S}, got {tuple(w_dw.shape)}")
    for name, t in (("abc", abc), ("d_abc", d_abc)):
        if tuple(t.shape) != (N, S, H, W):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(N, S, H, W)}")
    M = N * H * W
    kk = ks * ks
    dev = d_a.device
    if M == 0:
        dw = torch.zeros(S, 1, ks, ks, dtype=torch.float32, device=dev) if need_weight_grad else None
        db = torch.zeros(S, dtype=torch.float32, device=dev) if need_bias_grad else None
        return dw, db
    P = _pixel_programs(M, S, dev)
    # Every (p, c) row is written whatever the tile (NaN-poisoned in tests).
    pw = alloc_scratch(P * S * kk if need_weight_grad else 1, torch.float32, dev)
    pb = alloc_scratch(P * S if need_bias_grad else 1, torch.float32, dev)
    int64 = force_int64 or needs_int64(d_a, abc, d_abc, extra=M)
    if interpreting():
        bm, bc, _ = interpreter_blocks((16, 16, 16))
        kernel, tiles = _dwconv_bwd_kernel, dict(BLOCK_M=bm, BLOCK_C=bc)
    else:
        kernel, tiles = _dwconv_bwd_tuned, {}

    def grid(meta):
        return (triton.cdiv(S, meta["BLOCK_C"]), P)

    launch(
        "dwconv_bwd", kernel, grid,
        d_a, abc, w_dw, d_abc, pw, pb,
        M, S, H, W, P,
        *d_a.stride(), *abc.stride(), w_dw.stride(0), w_dw.stride(2), w_dw.stride(3), *d_abc.stride(),
        KS=ks, KKP=triton.next_power_of_2(kk), NEED_DW=bool(need_weight_grad), NEED_DB=bool(need_bias_grad),
        INT64=bool(int64), RNE_BF16=interpreting() and d_abc.dtype == torch.bfloat16, **tiles,
    )
    dw = pw.view(P, S, kk).sum(0).view(S, 1, ks, ks) if need_weight_grad else None
    db = pb.view(P, S).sum(0) if need_bias_grad else None
    return dw, db
