"""Patchify convolutions (kernel = stride, no padding) with a channels-first
LayerNorm before or after them, in one Triton kernel: the stems and
downsampling layers of HorNet and ConvNeXt.

Definition (resfuse/reference.py::patchify_conv_reference)::

    x_  = LN_pre(x)            over the C channels of each input pixel (optional)
    z   = conv2d(x_, W, b, stride=P)          W: (K, C, P, P), no padding
    y   = LN_post(z)           over the K channels of each output pixel (optional)

    LN(v)[c] = (v[c] - mean) * rsqrt(var + eps) * w[c] + b[c]  (biased variance)

A patchify conv reads every input pixel exactly once (the patches do not
overlap), so it is a GEMM over output pixels (M = N * Ho * Wo) x output
channels K with a reduction over (r, s, c) of P*P*C, its A operand gathered
from the P x P patch of each output pixel. Tiles are (channels x pixels),
y^T = W @ x^T, as in kernels/conv1x1.py (whose LayerNorm helpers this
kernel shares).

- LN_pre (HorNet / ConvNeXt downsampling: LayerNorm, then a 2x2 stride-2
  conv): the statistics differ per input pixel, so the reduction runs per
  tap (r, s): each tap's mean and rstd over C (two passes over its x
  tiles, served by L2), then its C-loop GEMM. In fp16/bf16 the LayerNorm
  is folded into the weights (conv1x1's ``_ln_fold_weight_kernel`` on the
  (K*P*P, C) rows of W, one small launch per call): each tap's main loop
  is a plain pipelined GEMM on raw x tiles and the tap's
  ``s * rstd * (acc - u * mean) + v`` is added to the output accumulator
  (the pipeline drains once per tap). fp32 applies the LayerNorm to the x
  tiles in registers (the mean term would cost TF32 bits).
- LN_post (the stems: a 4x4 stride-4 conv, then LayerNorm): one tile holds
  all K output channels of its pixels (BLOCK_N >= K; K <= 256), so the
  LayerNorm is a reduction over the accumulator's channel axis in the
  epilogue and z never reaches memory.
- Neither: one flat (tap, channel block) loop, pipelined across taps.
  SMALL_C (C < 16, the RGB stem): the reduction runs over rows r of the
  patch and the (s, c) pairs of a row, P*C at a time, so a 3-channel
  input fills 12 of 16 K lanes instead of 3.

Bytes per output pixel (e = element size): reads P*P*C*e of x (LN_pre:
twice more from L2, for the statistics), writes K*e of y; W (and the
folded W') once per tile. Eager runs the LayerNorm as its own pass (HorNet's
channels-first LayerNorm is 10 kernels of one read and one write each) and
the conv as another: the fused kernel moves x and y once.
"""

import torch
import triton
import triton.language as tl

from ._common import (TunedKernel, declare_kernels, dot_precision, interpreter_blocks, interpreting, launch,
                      needs_int64)
from .conv1x1 import _fold_layer_norm, _ln_stats, _pix_offsets, _pixel_tile, _prune_by, _pixel_tiles
from .conv_bn_act import grouped_tile_ids

declare_kernels("patchify_conv")

#: The largest K the LN_post epilogue holds in one tile.
MAX_POST_NORM_CHANNELS = 256
#: Below this many input channels (and without LN_pre) the reduction runs
#: over (s, c) pairs of a patch row (SMALL_C).
SMALL_C = 16


@triton.jit
def _patchify_conv_kernel(
    x_ptr, w_ptr, b_ptr, prew_ptr, preb_ptr, lnu_ptr, lnv_ptr, postw_ptr, postb_ptr, y_ptr,
    M, C, K, HWo, Wo, pre_eps, post_eps,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    sy_n, sy_c, sy_h, sy_w,
    P: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRE_NORM: tl.constexpr, PRE_W: tl.constexpr, PRE_B: tl.constexpr, PRE_FOLDED: tl.constexpr,
    POST_NORM: tl.constexpr, POST_W: tl.constexpr, POST_B: tl.constexpr, SMALL_C: tl.constexpr,
    INT64: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, FLAT_Y: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[n,k,i,j] = LN_post(b[k] + sum_{c,r,s} W[k,c,r,s] * LN_pre(x)[n,c,P*i+r,P*j+s])

    x: (N, C, H, W), y: (N, K, Ho, Wo) with Ho = H // P, Wo = W // P (rows
    and columns past P*Ho, P*Wo are never read, as F.conv2d drops them);
    W: (K, C, P, P), all through strides. LN_pre over x's C channels per
    input pixel (PRE_NORM; prew/preb optional), LN_post over y's K channels
    per output pixel (POST_NORM: BLOCK_N >= K, one channel tile). With
    PRE_FOLDED, w_ptr is the folded W' (rows k*P*P + r*P + s of C, from
    ``_ln_fold_weight_kernel``) and lnu_ptr holds u (K*P*P) then s
    (K*P*P), lnv_ptr v (K*P*P), per (k, tap): each tap adds
    ``s * rstd * (sum_c W' x - u * mean) + v`` (exact algebra; see
    kernels/conv1x1.py's LN_FOLDED). fp32 accumulation and epilogue, one
    rounding at the store."""
    tiles_m = (M // HWo) * tl.cdiv(HWo, BLOCK_M)
    pid_m, pid_n = grouped_tile_ids(tiles_m * BLOCK_M, K, BLOCK_M, BLOCK_N, GROUP_M)
    n, q, m_ok = _pixel_tile(pid_m, HWo, BLOCK_M, INT64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K)
    if INT64:
        offs_n = offs_n.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    n_ok = offs_n < K
    x_img = x_ptr + n * sx_n
    # The top-left input pixel of each output pixel's patch.
    x_pix0 = (q // Wo) * (P * sx_h) + (q % Wo) * (P * sx_w)
    w_rows = w_ptr + offs_n * sw_k

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PRE_NORM:
        for t in range(P * P):
            x_pix = x_pix0 + (t // P) * sx_h + (t % P) * sx_w
            w_tap = w_rows + (t // P) * sw_r + (t % P) * sw_s
            mean, rstd = _ln_stats(x_img, x_pix, sx_c, C, m_ok, pre_eps, offs_c, BLOCK_M, BLOCK_K)
            if PRE_FOLDED:
                tap = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                tap = acc
            for c0 in range(0, C, BLOCK_K):
                cc = c0 + offs_c
                c_ok = cc < C
                xt = tl.load(x_img + cc[:, None] * sx_c + x_pix[None, :], mask=c_ok[:, None] & m_ok[None, :],
                             other=0.0)
                if not PRE_FOLDED:
                    v = (xt.to(tl.float32) - mean[None, :]) * rstd[None, :]
                    if PRE_W:
                        v = v * tl.load(prew_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
                    if PRE_B:
                        v = v + tl.load(preb_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
                    # K lanes past C stay exactly zero (a NaN mean would leak).
                    xt = tl.where(c_ok[:, None], v, 0.0).to(x_ptr.dtype.element_ty)
                wt = tl.load(w_tap[:, None] + cc[None, :] * sw_c, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
                if DOT_IN_FP32:
                    # Interpreter only: its bf16 tl.dot multiplies raw bit patterns.
                    wt = wt.to(tl.float32)
                    xt = xt.to(tl.float32)
                tap = tl.dot(wt, xt, tap, input_precision=INPUT_PRECISION)
            if PRE_FOLDED:
                row = offs_n * (P * P) + t
                u = tl.load(lnu_ptr + row, mask=n_ok, other=0.0)
                s = tl.load(lnu_ptr + K * (P * P) + row, mask=n_ok, other=0.0)
                tap = (tap - u[:, None] * mean[None, :]) * (s[:, None] * rstd[None, :])
                if PRE_B:
                    tap += tl.load(lnv_ptr + row, mask=n_ok, other=0.0)[:, None]
                acc += tap
            else:
                acc = tap
    elif SMALL_C:
        J = P * C
        nj = tl.cdiv(J, BLOCK_K)
        for kk in range(0, P * nj):
            r = kk // nj
            j = (kk % nj) * BLOCK_K + offs_c
            j_ok = j < J
            s_, c_ = j // C, j % C
            xt = tl.load(x_img + (x_pix0 + r * sx_h)[None, :] + (s_ * sx_w + c_ * sx_c)[:, None],
                         mask=j_ok[:, None] & m_ok[None, :], other=0.0)
            wt = tl.load(w_rows[:, None] + (r * sw_r + s_ * sw_s + c_ * sw_c)[None, :],
                         mask=n_ok[:, None] & j_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                wt = wt.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(wt, xt, acc, input_precision=INPUT_PRECISION)
    else:
        nc = tl.cdiv(C, BLOCK_K)
        for kk in range(0, P * P * nc):
            t = kk // nc
            cc = (kk % nc) * BLOCK_K + offs_c
            c_ok = cc < C
            x_pix = x_pix0 + (t // P) * sx_h + (t % P) * sx_w
            xt = tl.load(x_img + cc[:, None] * sx_c + x_pix[None, :], mask=c_ok[:, None] & m_ok[None, :],
                         other=0.0)
            wt = tl.load(w_rows[:, None] + ((t // P) * sw_r + (t % P) * sw_s) + cc[None, :] * sw_c,
                         mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                wt = wt.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(wt, xt, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if POST_NORM:
        # One tile holds every output channel (BLOCK_N >= K): channels past
        # K are excluded from the statistics.
        mean = tl.sum(tl.where(n_ok[:, None], acc, 0.0), axis=0) / K
        d = tl.where(n_ok[:, None], acc - mean[None, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / K + post_eps)
        acc = d * rstd[None, :]
        if POST_W:
            acc = acc * tl.load(postw_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if POST_B:
            acc += tl.load(postb_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y_pix = _pix_offsets(q, sy_h, sy_w, Wo, FLAT_Y)
    tl.store(y_ptr + n * sy_n + offs_n[:, None] * sy_c + y_pix[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


def _patchify_configs():
    """GPU space, in order of preference (the first that fits is the
    default): tiles that compile on sm_90 to wgmma without spills
    (``python -m resfuse.inspect --model hornet_t``)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (64, 64, 32, 4, 4)]]


def _patchify_prune(configs, named_args, **kwargs):
    """Tiles no larger than the problem (pixel tiles lie within one image)."""
    HWo, K, C = named_args["HWo"], named_args["K"], named_args["C"]
    return _prune_by(configs, {"BLOCK_N": (K, 64), "BLOCK_M": (HWo, 64), "BLOCK_K": (C, 32)})


_patchify_tuned = TunedKernel(
    _patchify_conv_kernel, _patchify_configs(),
    key=["M", "HWo", "K", "C", "P", "PRE_NORM", "POST_NORM", "SMALL_C"], prune=_patchify_prune)


def _post_norm_tiles(K, C, small_c, interpret):
    """The one fixed tile of an LN_post launch: all K channels in BLOCK_N."""
    bn = max(16, triton.next_power_of_2(K))
    bk = 16 if (small_c or C <= 16 or interpret) else 32
    bm = 16 if interpret else 64
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), (4 if bn <= 128 else 8)


def patchify_conv_fwd(x, weight, bias, pre, post, out, *, allow_tf32, force_int64=False):
    """Launch the patchify conv: out = LN_post(conv2d(LN_pre(x), weight,
    bias, stride=P)). ``pre``/``post``: (norm_weight, norm_bias, eps) or
    None (each weight/bias may be None). x (N, C, H, W); weight (K, C, P, P);
    out (N, K, H // P, W // P), preallocated. Validation is
    resfuse.ops.patchify's. Returns out."""
    N, C, H, W = x.shape
    K, _, P, _ = weight.shape
    Ho, Wo = H // P, W // P
    M = N * Ho * Wo
    if M == 0:
        return out
    if post is not None and K > MAX_POST_NORM_CHANNELS:
        raise ValueError(f"patchify_conv_fwd: post_norm over K = {K} > {MAX_POST_NORM_CHANNELS} channels "
                         f"(one tile must hold them)")
    interpret = interpreting()
    dummy = x
    bias = None if bias is None else bias.contiguous()
    prew, preb, pre_eps = pre if pre is not None else (None, None, 0.0)
    postw, postb, post_eps = post if post is not None else (None, None, 0.0)
    prew, preb, postw, postb = (None if v is None else v.contiguous() for v in (prew, preb, postw, postb))
    folded = pre is not None and x.dtype in (torch.float16, torch.bfloat16)
    small_c = pre is None and C < SMALL_C
    lnu = lnv = dummy
    w = weight
    sw = (weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3))
    if folded:
        # Rows k*P*P + r*P + s of C (a view of an OHWI weight; a copy of another).
        rows = weight.permute(0, 2, 3, 1).reshape(K * P * P, C)
        w, lnu, lnv = _fold_layer_norm(rows, prew, preb)
        sw = (P * P * C, 1, P * C, C)
    int64 = force_int64 or needs_int64(x, out, extra=M)

    if post is not None:
        tiles, warps = _post_norm_tiles(K, C, small_c, interpret)
        kernel, tiles = _patchify_conv_kernel, dict(tiles, num_warps=warps, num_stages=1 if interpret else 3)
    elif interpret:
        bm, bn, bk = interpreter_blocks((16, 16, 16))
        kernel, tiles = _patchify_conv_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
    else:
        kernel, tiles = _patchify_tuned, {}

    def grid(meta):
        return (_pixel_tiles(M, Ho * Wo, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

    launch(
        "patchify_conv", kernel, grid,
        x, w, bias if bias is not None else dummy,
        prew if prew is not None else dummy, preb if preb is not None else dummy, lnu, lnv,
        postw if postw is not None else dummy, postb if postb is not None else dummy, out,
        M, C, K, Ho * Wo, Wo, float(pre_eps), float(post_eps),
        *x.stride(), *sw, *out.stride(),
        P=P, HAS_BIAS=bias is not None,
        PRE_NORM=pre is not None, PRE_W=prew is not None, PRE_B=preb is not None, PRE_FOLDED=folded,
        POST_NORM=post is not None, POST_W=postw is not None, POST_B=postb is not None, SMALL_C=small_c,
        INT64=bool(int64), DOT_IN_FP32=interpret and x.dtype == torch.bfloat16,
        INPUT_PRECISION=dot_precision(x.dtype, allow_tf32), FLAT_Y=Ho <= 1 or out.stride(2) == Wo * out.stride(3),
        **tiles,
    )
    return out
