"""Backward of the 1x1 convolutions of kernels/conv1x1.py (see its
docstring for the tiling, the per-image pixel tiles and FLAT addressing):
the data gradient with a GELU' or LayerNorm-backward epilogue, and the
weight gradient (a GEMM over pixels, split-K) with a GELU or LayerNorm
prologue on its second operand. Used by the gnconv and HorBlock backward
(resfuse/ops/gnconv_backward.py).
"""

import torch
import triton
import triton.language as tl

from ._common import (TunedKernel, alloc_scratch, declare_kernels, dot_precision, interpreter_blocks, interpreting,
                      launch, needs_int64, num_sms)
from .conv1x1 import (_GELU, _gelu_grad, _interpreter_blocks_ln, _is_flat, _ln_stats, _pix_offsets, _pixel_tile, _pixel_tiles, _prune_by,
                      _vector, _weight_2d)
from .conv_bn_act import _apply_activation, grouped_tile_ids

declare_kernels("conv1x1_dgrad", "conv1x1_wgrad")


# ----------------------------------------------------------------------------
# Data gradient: dh = W^T @ (dy * cs[k] * ss[n]), then an epilogue
# ----------------------------------------------------------------------------

def _dgrad_configs():
    """GPU autotune space of the plain / GELU' data gradient: the forward's
    tiles (the same GEMM shape with K and C swapped), the 128-pixel tile
    with 8 warps (with 4 the GELU' epilogue spills on sm_90)."""
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 64, 32, 8, 4), (64, 64, 64, 4, 3), (64, 64, 32, 4, 4), (64, 32, 32, 2, 5),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _dgrad_prune(configs, named_args, **kwargs):
    HW, K, C = named_args["HW"], named_args["K"], named_args["C"]
    return _prune_by(configs, {"BLOCK_N": (C, 32), "BLOCK_M": (HW, 64), "BLOCK_K": (K, 32)})


def _dgrad_ln_configs():
    """GPU autotune space of the LayerNorm-backward data gradient: one
    program per pixel tile walks all channel blocks twice, so the pixel
    tile sets the parallelism (N * cdiv(H*W, BLOCK_M) programs); keep it
    modest."""
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (32, 64, 64, 4, 3), (64, 32, 32, 4, 4),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return cfgs


def _dgrad_ln_prune(configs, named_args, **kwargs):
    HW, K, C = named_args["HW"], named_args["K"], named_args["C"]
    return _prune_by(configs, {"BLOCK_N": (C, 32), "BLOCK_M": (HW, 32), "BLOCK_K": (K, 32)})


@triton.jit
def _dgrad_tile(dy_img, w_ptr, cs_ptr, offs_c, c_ok, dy_pix, m_ok, K, sdy_c, sw_k, sw_c, offs_k,
                HAS_CS: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N channels x BLOCK_M pixels) of sum_k W[k,c] * dy[k,p] * cs[k],
    fp32; dy * cs is rounded to dy's dtype before the dot (as eager's
    gamma * grad is). W^T is read through W's strides."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        g = tl.load(dy_img + kk[:, None] * sdy_c + dy_pix[None, :], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        if HAS_CS:
            g = (g.to(tl.float32) * tl.load(cs_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[:, None]).to(
                dy_img.dtype.element_ty)
        wt = tl.load(w_ptr + offs_c[:, None] * sw_c + kk[None, :] * sw_k, mask=c_ok[:, None] & k_ok[None, :],
                     other=0.0)
        if DOT_IN_FP32:
            # Interpreter only: its bf16 tl.dot multiplies raw bit patterns.
            wt = wt.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(wt, g, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _conv1x1_dgrad_kernel(
    dy_ptr, w_ptr, cs_ptr, ss_ptr, a_ptr, out_ptr,
    M, C, K, HW, W,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sw_k, sw_c,
    sa_n, sa_c, sa_h, sa_w,
    so_n, so_c, so_h, so_w,
    HAS_CS: tl.constexpr, HAS_SS: tl.constexpr, GELU_EPI: tl.constexpr, FLAT: tl.constexpr,
    INT64: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[n,c,p] = ss[n] * sum_k W[k,c] * (dy[n,k,p] * cs[k])  [* GELU'(a[n,c,p])]

    The data gradient of y = W @ h (+ per-channel / per-sample scales of
    y), optionally through h = GELU(a): GELU'(a) = Phi(a) + a * phi(a).
    dy: (N, K, H, W), W: (K, C) read transposed through its strides,
    a and out: (N, C, H, W), each via strides; cs (K,), ss (N,) optional.
    fp32 accumulation and epilogue, one rounding at the store.

    Bytes per pixel (e = element size): reads K*e of dy (once per
    channel tile, i.e. cdiv(C, BLOCK_N) times, mostly from L2) and C*e of a
    (GELU_EPI); writes C*e of out. W once per tile."""
    tiles_m = (M // HW) * tl.cdiv(HW, BLOCK_M)
    pid_m, pid_n = grouped_tile_ids(tiles_m * BLOCK_M, C, BLOCK_M, BLOCK_N, GROUP_M)
    n, q, m_ok = _pixel_tile(pid_m, HW, BLOCK_M, INT64)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:
        offs_c = offs_c.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    c_ok = offs_c < C
    dy_pix = _pix_offsets(q, sdy_h, sdy_w, W, FLAT)

    acc = _dgrad_tile(dy_ptr + n * sdy_n, w_ptr, cs_ptr, offs_c, c_ok, dy_pix, m_ok, K, sdy_c, sw_k, sw_c, offs_k,
                      HAS_CS, DOT_IN_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
    if HAS_SS:
        acc = acc * tl.load(ss_ptr + n).to(tl.float32)
    ok = c_ok[:, None] & m_ok[None, :]
    if GELU_EPI:
        a_pix = _pix_offsets(q, sa_h, sa_w, W, FLAT)
        a = tl.load(a_ptr + n * sa_n + offs_c[:, None] * sa_c + a_pix[None, :], mask=ok, other=0.0).to(tl.float32)
        acc = acc * _gelu_grad(a)
    o_pix = _pix_offsets(q, so_h, so_w, W, FLAT)
    tl.store(out_ptr + n * so_n + offs_c[:, None] * so_c + o_pix[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _conv1x1_dgrad_ln_kernel(
    dy_ptr, w_ptr, cs_ptr, ss_ptr, x_ptr, lnw_ptr, out_ptr, mean_ptr, rstd_ptr, dlnw_ptr, dlnb_ptr,
    M, C, K, HW, W, eps,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sw_k, sw_c,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    HAS_CS: tl.constexpr, HAS_SS: tl.constexpr, HAS_NORM_W: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, FLAT: tl.constexpr,
    INT64: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The data gradient through y = W @ LN(x) (channels-first LayerNorm
    over the C channels of each pixel, biased variance):

      dh   = ss[n] * W^T @ (dy * cs[k])                  (grad of LN(x))
      xhat = (x - mean) * rstd,  gw = dh * lnw[c]  (or dh)
      out  = rstd * (gw - mean_c(gw) - xhat * mean_c(gw * xhat))
      mean[m], rstd[m]         fp32 per pixel m = n*H*W + h*W + w
      dlnw[t, c] = sum_{p in tile t} dh * xhat,  dlnb[t, c] = sum_{p in tile t} dh
                               fp32 partials per program (the launcher sums
                               the rows: no atomics, deterministic)

    The mean over channels needs every channel of a pixel, so a program
    owns a tile of BLOCK_M pixels (of one image) and walks the channel
    blocks: pass 0 computes the statistics from x (two reads of x, as the
    forward), pass 1 computes dh block by block and accumulates the two
    channel means and the dlnw/dlnb partials, pass 2 recomputes dh and
    writes out.
    Trade: recomputing dh doubles the dgrad GEMM's FLOPs (2*C*K per pixel
    more) and reads dy twice more per channel block (L2 hits: one pixel
    tile of dy is K*BLOCK_M*e bytes) instead of writing and re-reading an
    fp32 dh (8*C bytes per pixel of HBM traffic plus a scratch of 4*M*C
    bytes); the kernel is memory-bound at HorNet's widths, so recomputing
    is the cheaper side.

    dy: (N, K, H, W), W: (K, C), x and out: (N, C, H, W), each via strides.
    Bytes per pixel from HBM (e = element size): reads K*e of dy (the
    re-reads per channel block and pass come from L2) and C*e of x (four
    passes over the same tile: the first from HBM, the rest mostly L2),
    writes C*e of out and 8 bytes of mean/rstd; the dlnw/dlnb partials
    are 8*C/BLOCK_M bytes per pixel."""
    pid = tl.program_id(0)
    n, q, m_ok = _pixel_tile(pid, HW, BLOCK_M, INT64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    dy_img = dy_ptr + n * sdy_n
    x_img = x_ptr + n * sx_n
    dy_pix = _pix_offsets(q, sdy_h, sdy_w, W, FLAT)
    x_pix = _pix_offsets(q, sx_h, sx_w, W, FLAT)
    o_pix = _pix_offsets(q, so_h, so_w, W, FLAT)

    mean, rstd = _ln_stats(x_img, x_pix, sx_c, C, m_ok, eps, offs_n, BLOCK_M, BLOCK_N)
    tl.store(mean_ptr + n * HW + q, mean, mask=m_ok)
    tl.store(rstd_ptr + n * HW + q, rstd, mask=m_ok)
    if HAS_SS:
        ss = tl.load(ss_ptr + n).to(tl.float32)
    part = pid
    if INT64:
        part = part.to(tl.int64)

    s_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_gx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_N):
        cc = c0 + offs_n
        c_ok = cc < C
        ok = c_ok[:, None] & m_ok[None, :]
        dh = _dgrad_tile(dy_img, w_ptr, cs_ptr, cc, c_ok, dy_pix, m_ok, K, sdy_c, sw_k, sw_c, offs_k,
                         HAS_CS, DOT_IN_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
        if HAS_SS:
            dh = dh * ss
        xt = tl.load(x_img + cc[:, None] * sx_c + x_pix[None, :], mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (xt - mean[None, :]) * rstd[None, :], 0.0)
        if HAS_NORM_W:
            gw = dh * tl.load(lnw_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        else:
            gw = dh
        s_g += tl.sum(gw, axis=0)
        s_gx += tl.sum(gw * xhat, axis=0)
        if WANT_DW:
            tl.store(dlnw_ptr + part * C + cc, tl.sum(dh * xhat, axis=1), mask=c_ok)
        if WANT_DB:
            tl.store(dlnb_ptr + part * C + cc, tl.sum(dh, axis=1), mask=c_ok)
    s_g = s_g / C
    s_gx = s_gx / C

    for c0 in range(0, C, BLOCK_N):
        cc = c0 + offs_n
        c_ok = cc < C
        ok = c_ok[:, None] & m_ok[None, :]
        dh = _dgrad_tile(dy_img, w_ptr, cs_ptr, cc, c_ok, dy_pix, m_ok, K, sdy_c, sw_k, sw_c, offs_k,
                         HAS_CS, DOT_IN_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
        if HAS_SS:
            dh = dh * ss
        xt = tl.load(x_img + cc[:, None] * sx_c + x_pix[None, :], mask=ok, other=0.0).to(tl.float32)
        xhat = (xt - mean[None, :]) * rstd[None, :]
        if HAS_NORM_W:
            gw = dh * tl.load(lnw_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        else:
            gw = dh
        dx = rstd[None, :] * (gw - s_g[None, :] - xhat * s_gx[None, :])
        tl.store(out_ptr + n * so_n + cc[:, None] * so_c + o_pix[None, :], dx.to(out_ptr.dtype.element_ty),
                 mask=ok)


_conv1x1_dgrad_tuned = TunedKernel(
    _conv1x1_dgrad_kernel, _dgrad_configs(),
    key=["M", "HW", "K", "C", "GELU_EPI"], prune=_dgrad_prune)

_conv1x1_dgrad_ln_tuned = TunedKernel(
    _conv1x1_dgrad_ln_kernel, _dgrad_ln_configs(),
    key=["M", "HW", "K", "C"], prune=_dgrad_ln_prune)


def _check_same_dtype(what, *tensors):
    dts = {t.dtype for t in tensors if t is not None}
    if len(dts) > 1:
        raise ValueError(f"{what}: operands must share one dtype, got {sorted(str(d) for d in dts)}")


def conv1x1_dgrad(dy, weight, out, *, allow_tf32, channel_scale=None, sample_scale=None, gelu_input=None,
                  norm=None, force_int64=False):
    """Data gradient of a 1x1 conv y = W @ h, written into `out`:

      gk = dy * channel_scale[k] * sample_scale[n]          (each optional)
      dh = sum_k W[k,c] * gk[n,k,p]                         (fp32)
      gelu_input=a:  out = dh * GELU'(a)                    (h = GELU(a))
      norm=(x, norm_weight, norm_bias, eps):                (h = LN(x))
                     out = rstd * (gw - mean_c(gw) - xhat * mean_c(gw * xhat)),
                     gw = dh * norm_weight (or dh), xhat = (x - mean) * rstd
      neither:       out = dh

    dy (N, K, H, W); weight (K, C) or (K, C, 1, 1), dy's dtype; out, a, x
    (N, C, H, W), any strides; channel_scale K elements, sample_scale N.

    Returns None, or with `norm` (mean (M,), rstd (M,), d_norm_weight (C,) or
    None, d_norm_bias (C,) or None), all fp32, M = N*H*W indexed
    m = n*H*W + h*W + w; d_norm_weight = sum_p dh * xhat is returned when
    norm_weight is given, d_norm_bias = sum_p dh when norm_bias is."""
    if gelu_input is not None and norm is not None:
        raise ValueError("conv1x1_dgrad: gelu_input and norm are exclusive epilogues")
    weight = _weight_2d(weight)
    N, K, H, W = dy.shape
    C = weight.shape[1]
    if weight.shape[0] != K:
        raise ValueError(f"weight {tuple(weight.shape)} does not match dy's {K} channels")
    if tuple(out.shape) != (N, C, H, W):
        raise ValueError(f"out must be {(N, C, H, W)}, got {tuple(out.shape)}")
    _check_same_dtype("conv1x1_dgrad", dy, weight)
    if out.numel() and any(t is not None and t.data_ptr() == out.data_ptr() for t in (dy, gelu_input)):
        raise ValueError("conv1x1_dgrad: out must not alias dy or gelu_input")
    channel_scale = _vector(channel_scale, K, "channel_scale")
    sample_scale = _vector(sample_scale, N, "sample_scale")
    x = None
    if norm is not None:
        x, norm_weight, norm_bias, eps = norm
        if tuple(x.shape) != (N, C, H, W):
            raise ValueError(f"norm input must be {(N, C, H, W)}, got {tuple(x.shape)}")
        norm_weight = _vector(norm_weight, C, "norm_weight")
        norm_bias = _vector(norm_bias, C, "norm_bias")
    if gelu_input is not None and tuple(gelu_input.shape) != (N, C, H, W):
        raise ValueError(f"gelu_input must be {(N, C, H, W)}, got {tuple(gelu_input.shape)}")
    M, HW = N * H * W, H * W
    interpret = interpreting()
    dev = dy.device
    dummy = dy
    int64 = bool(force_int64 or needs_int64(dy, out, gelu_input, x, extra=M))
    common = dict(INT64=int64, DOT_IN_FP32=interpret and dy.dtype == torch.bfloat16,
                  INPUT_PRECISION=dot_precision(dy.dtype, allow_tf32),
                  FLAT=_is_flat(dy, out, gelu_input, x))
    cs = channel_scale if channel_scale is not None else dummy
    ss = sample_scale if sample_scale is not None else dummy

    if norm is None:
        if M == 0 or C == 0:
            return None
        a = gelu_input

        def grid(meta):
            return (_pixel_tiles(M, HW, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)

        if interpret:
            bm, bn, bk = _interpreter_blocks_ln(K, C)
            kernel, tiles = _conv1x1_dgrad_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
        else:
            kernel, tiles = _conv1x1_dgrad_tuned, {}
        launch(
            "conv1x1_dgrad", kernel, grid,
            dy, weight, cs, ss, a if a is not None else dummy, out,
            M, C, K, HW, W,
            *dy.stride(), weight.stride(0), weight.stride(1),
            *(a.stride() if a is not None else (0, 0, 0, 0)), *out.stride(),
            HAS_CS=channel_scale is not None, HAS_SS=sample_scale is not None, GELU_EPI=a is not None,
            **common, **tiles,
        )
        return None

    mean = torch.empty(M, dtype=torch.float32, device=dev)
    rstd = torch.empty(M, dtype=torch.float32, device=dev)
    if interpret:
        bm, bn, bk = _interpreter_blocks_ln(K, C)
        kernel, tiles, min_bm = _conv1x1_dgrad_ln_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), bm
    else:
        kernel, tiles = _conv1x1_dgrad_ln_tuned, {}
        min_bm = min(c.kwargs["BLOCK_M"] for c in _dgrad_ln_configs())
    want_dw, want_db = norm_weight is not None, norm_bias is not None
    rows = _pixel_tiles(M, HW, min_bm)
    # Partials: row t = program t's sums over its pixel tile. The autotuner
    # picks BLOCK_M, so the row count is only known at launch: the grid
    # records it (its last call is the launch that counts).
    dlnw_part = alloc_scratch(max(rows * C, 1) if want_dw else 1, torch.float32, dev)
    dlnb_part = alloc_scratch(max(rows * C, 1) if want_db else 1, torch.float32, dev)
    used = {}

    def grid(meta):
        used["programs"] = _pixel_tiles(M, HW, meta["BLOCK_M"])
        return (used["programs"],)

    if M > 0 and C > 0:
        launch(
            "conv1x1_dgrad", kernel, grid,
            dy, weight, cs, ss, x, norm_weight if norm_weight is not None else dummy, out, mean, rstd,
            dlnw_part, dlnb_part,
            M, C, K, HW, W, float(eps),
            *dy.stride(), weight.stride(0), weight.stride(1), *x.stride(), *out.stride(),
            HAS_CS=channel_scale is not None, HAS_SS=sample_scale is not None, HAS_NORM_W=want_dw,
            WANT_DW=want_dw, WANT_DB=want_db, **common, **tiles,
        )
    p = used.get("programs", 0)
    d_nw = dlnw_part[:p * C].view(p, C).sum(0) if want_dw else None
    d_nb = dlnb_part[:p * C].view(p, C).sum(0) if want_db else None
    return mean, rstd, d_nw, d_nb


# ----------------------------------------------------------------------------
# Weight gradient: G = sum_p a'[k,p] b'[c,p], split over pixels
# ----------------------------------------------------------------------------

#: Fewest pixels one split of the weight gradient reduces over: with 64-wide
#: pixel blocks that is >= 32 loop iterations per program, so the fp32
#: partial it writes (BLOCK_K*BLOCK_C*4 bytes) is a few percent of what it
#: reads ((BLOCK_K + BLOCK_C)*e bytes per pixel).
WGRAD_MIN_PIXELS_PER_SPLIT = 2048


def _wgrad_configs():
    """GPU autotune space of the weight gradient ((K x C) tiles, pixels
    reduced in BLOCK_P steps)."""
    cfgs = []
    for bk, bc, bp, warps, stages in [
        (64, 64, 64, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3), (32, 32, 64, 2, 4),
    ]:
        cfgs.append(triton.Config({"BLOCK_K": bk, "BLOCK_C": bc, "BLOCK_P": bp, "GROUP_K": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _wgrad_prune(configs, named_args, **kwargs):
    K, C, HW = named_args["K"], named_args["C"], named_args["HW"]
    return _prune_by(configs, {"BLOCK_K": (K, 32), "BLOCK_C": (C, 32), "BLOCK_P": (HW, 32)})


def wgrad_split(M, K, C, sms):
    """How many pixel ranges the weight gradient splits M pixels into:
    enough for two programs per SM counting the (K x C) tiles as 64x64,
    but no range with fewer than WGRAD_MIN_PIXELS_PER_SPLIT pixels, and at
    least 1. (The kernel deals out its pixel blocks evenly: a range is
    cdiv(blocks, split) consecutive blocks.)"""
    tiles = max(1, triton.cdiv(K, 64) * triton.cdiv(C, 64))
    return max(1, min(triton.cdiv(2 * sms, tiles), M // WGRAD_MIN_PIXELS_PER_SPLIT))


@triton.jit
def _conv1x1_wgrad_kernel(
    a_ptr, b_ptr, ss_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, g_ptr, rs_ptr,
    M, K, C, HW, W,
    sa_n, sa_c, sa_h, sa_w,
    sb_n, sb_c, sb_h, sb_w,
    HAS_SS: tl.constexpr, B_GELU: tl.constexpr, B_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr,
    HAS_NORM_B: tl.constexpr, WANT_ROWSUM: tl.constexpr, FLAT: tl.constexpr,
    INT64: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, GROUP_K: tl.constexpr,
):
    """G[s,k,c] = sum_{p in range s} a'[k,p] * b'[c,p],  rs[s,k] = sum_{p in range s} a'[k,p]

      a' = a * ss[n]                         (HAS_SS; rounded to a's dtype for the dot,
                                              the row sum is taken before rounding)
      b' = GELU(b)                           (B_GELU; exact erf, rounded to b's dtype)
         = (b - mean[m]) * rstd[m] * lnw[c] + lnb[c]
                                             (B_NORM; the forward's LayerNorm from its
                                              saved statistics, rounded to b's dtype)
         = b                                 (otherwise)

    The weight gradient of y = W @ b' with upstream gradient a (and the bias
    gradient, the row sum). a: (N, K, H, W), b: (N, C, H, W) via strides;
    mean, rstd (M,) fp32 by pixel m = n*H*W + h*W + w.

    Split-K over pixels: the pixels form N * cdiv(H*W, BLOCK_P) blocks (a
    block never straddles two images); program (tile, s) of the
    num_programs(1) splits reduces blocks [s*B, (s+1)*B), B = cdiv(blocks,
    splits), into its own fp32 partial G[s] (SPLIT, K, C) and rs[s]
    (SPLIT, K) (rs written by the programs of the first channel tile);
    an empty range writes zeros. The launcher sums the splits: no atomics,
    deterministic.

    Bytes per pixel (e = element size): reads K*e of a once per channel
    tile and C*e of b once per K tile (cdiv(C, BLOCK_C) and cdiv(K,
    BLOCK_K) times, mostly L2), 8 bytes of mean/rstd per K tile (B_NORM);
    writes 4*K*C bytes per split. B_GELU / B_NORM recompute the prologue
    once per K tile."""
    pid_k, pid_c = grouped_tile_ids(K, C, BLOCK_K, BLOCK_C, GROUP_K)
    split = tl.program_id(1)
    blocks = (M // HW) * tl.cdiv(HW, BLOCK_P)
    per_split = tl.cdiv(blocks, tl.num_programs(1))
    b_start = split * per_split
    b_end = tl.minimum(b_start + per_split, blocks)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        offs_k = offs_k.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    k_ok = offs_k < K
    c_ok = offs_c < C
    if HAS_NORM_W:
        lnw = tl.load(lnw_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_NORM_B:
        lnb = tl.load(lnb_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    rs = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for blk in range(b_start, b_end):
        n, q, p_ok = _pixel_tile(blk, HW, BLOCK_P, INT64)
        at = tl.load(a_ptr + n * sa_n + offs_k[:, None] * sa_c + _pix_offsets(q, sa_h, sa_w, W, FLAT)[None, :],
                     mask=k_ok[:, None] & p_ok[None, :], other=0.0)
        if HAS_SS:
            af = at.to(tl.float32) * tl.load(ss_ptr + n).to(tl.float32)
            if WANT_ROWSUM:
                rs += tl.sum(af, axis=1)
            at = af.to(a_ptr.dtype.element_ty)
        elif WANT_ROWSUM:
            rs += tl.sum(at.to(tl.float32), axis=1)
        bok = c_ok[:, None] & p_ok[None, :]
        bt = tl.load(b_ptr + n * sb_n + offs_c[:, None] * sb_c + _pix_offsets(q, sb_h, sb_w, W, FLAT)[None, :],
                     mask=bok, other=0.0)
        if B_GELU:
            bt = _apply_activation(bt.to(tl.float32), 0.0, _GELU).to(b_ptr.dtype.element_ty)
        if B_NORM:
            mu = tl.load(mean_ptr + n * HW + q, mask=p_ok, other=0.0)
            rsd = tl.load(rstd_ptr + n * HW + q, mask=p_ok, other=0.0)
            v = (bt.to(tl.float32) - mu[None, :]) * rsd[None, :]
            if HAS_NORM_W:
                v = v * lnw[:, None]
            if HAS_NORM_B:
                v = v + lnb[:, None]
            bt = tl.where(bok, v, 0.0).to(b_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            # Interpreter only: its bf16 tl.dot multiplies raw bit patterns.
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(at, tl.trans(bt), acc, input_precision=INPUT_PRECISION)

    part = split
    if INT64:
        part = part.to(tl.int64)
    tl.store(g_ptr + part * K * C + offs_k[:, None] * C + offs_c[None, :], acc, mask=k_ok[:, None] & c_ok[None, :])
    if WANT_ROWSUM:
        tl.store(rs_ptr + part * K + offs_k, rs, mask=k_ok & (pid_c == 0))


_conv1x1_wgrad_tuned = TunedKernel(
    _conv1x1_wgrad_kernel, _wgrad_configs(),
    key=["M", "HW", "K", "C", "B_GELU", "B_NORM"], prune=_wgrad_prune)


def conv1x1_wgrad(a, b, *, allow_tf32, sample_scale=None, b_gelu=False, b_norm=None, want_rowsum=True,
                  force_int64=False, split=None):
    """Weight gradient of a 1x1 conv: G[k,c] = sum_{n,p} a'[n,k,p] * b'[n,c,p]
    and rowsum[k] = sum_{n,p} a'[n,k,p] (the bias gradient), fp32.

      a' = a * sample_scale[n]       (optional)
      b' = GELU(b) (b_gelu), LN(b) with b_norm = (mean (M,), rstd (M,),
           norm_weight or None, norm_bias or None) (the statistics
           conv1x1_dgrad returns), or b; rounded to b's dtype.

    a (N, K, H, W), b (N, C, H, W), one dtype, any strides. The pixel axis
    is split into `split` ranges (default wgrad_split(M, K, C, SMs)); each
    writes an fp32 partial (split, K, C) that one torch sum reduces.
    `split` is for tests. Returns (G (K, C), rowsum (K,) or None)."""
    if b_gelu and b_norm is not None:
        raise ValueError("conv1x1_wgrad: b_gelu and b_norm are exclusive prologues")
    N, K, H, W = a.shape
    if b.dim() != 4 or (b.shape[0], b.shape[2], b.shape[3]) != (N, H, W):
        raise ValueError(f"b {tuple(b.shape)} does not match a {tuple(a.shape)}")
    _check_same_dtype("conv1x1_wgrad", a, b)
    C = b.shape[1]
    M, HW = N * H * W, H * W
    dev = a.device
    sample_scale = _vector(sample_scale, N, "sample_scale")
    mean = rstd = nw = nb = None
    if b_norm is not None:
        mean, rstd, nw, nb = b_norm
        if mean.numel() != M or rstd.numel() != M:
            raise ValueError(f"b_norm statistics must have N*H*W = {M} elements")
        mean, rstd = mean.reshape(-1).float().contiguous(), rstd.reshape(-1).float().contiguous()
        nw, nb = _vector(nw, C, "norm_weight"), _vector(nb, C, "norm_bias")
    if M == 0 or K == 0 or C == 0:
        return (torch.zeros(K, C, dtype=torch.float32, device=dev),
                torch.zeros(K, dtype=torch.float32, device=dev) if want_rowsum else None)
    split = wgrad_split(M, K, C, num_sms(dev)) if split is None else max(1, int(split))
    interpret = interpreting()
    g_part = alloc_scratch(split * K * C, torch.float32, dev)
    rs_part = alloc_scratch(split * K if want_rowsum else 1, torch.float32, dev)
    int64 = bool(force_int64 or needs_int64(a, b, extra=max(M, split * K * C)))
    dummy = a

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(C, meta["BLOCK_C"]), split)

    if interpret:
        bk, bc, bp = interpreter_blocks((16 if K <= 32 else 32, 16 if C <= 32 else 32, 32))
        kernel, tiles = _conv1x1_wgrad_kernel, dict(BLOCK_K=bk, BLOCK_C=bc, BLOCK_P=bp, GROUP_K=4)
    else:
        kernel, tiles = _conv1x1_wgrad_tuned, {}
    launch(
        "conv1x1_wgrad", kernel, grid,
        a, b, sample_scale if sample_scale is not None else dummy,
        mean if mean is not None else dummy, rstd if rstd is not None else dummy,
        nw if nw is not None else dummy, nb if nb is not None else dummy, g_part, rs_part,
        M, K, C, HW, W,
        *a.stride(), *b.stride(),
        HAS_SS=sample_scale is not None, B_GELU=bool(b_gelu), B_NORM=b_norm is not None,
        HAS_NORM_W=nw is not None, HAS_NORM_B=nb is not None, WANT_ROWSUM=bool(want_rowsum),
        FLAT=_is_flat(a, b), INT64=int64, DOT_IN_FP32=interpret and a.dtype == torch.bfloat16,
        INPUT_PRECISION=dot_precision(a.dtype, allow_tf32), **tiles,
    )
    g = g_part.view(split, K, C)
    g = g[0] if split == 1 else g.sum(0)
    rowsum = None
    if want_rowsum:
        r = rs_part.view(split, K)
        rowsum = r[0] if split == 1 else r.sum(0)
    return g, rowsum
