"""1x1 convolutions (per-pixel GEMMs over channels) with fused prologues
and epilogues, in Triton: the projection of HorNet's gnconv (with the
HorBlock's channels-first LayerNorm as a prologue), the HorBlock's MLP half
(pwconv1 with norm2 as prologue; pwconv2 with GELU as prologue and
gamma2 / drop-path / residual as epilogue) and the pieces of their
backward (data gradient with a GELU' or LayerNorm-backward epilogue, weight
gradient with a GELU or LayerNorm prologue on the second operand).

Tiles are (channels x pixels): y^T = W @ x^T, so pixels are the fast axis
of every tile (what NCHW stores contiguously). Every tensor is addressed
through its own strides (NCHW, channels_last, channel-sliced views); a
weight is (K, C) or (K, C, 1, 1), read through its strides.

A pixel tile never straddles two images (each image has cdiv(H*W, BLOCK)
tiles; the last one is masked), so the image index is a scalar per tile
and, when every tensor stores an image's pixels at one stride (FLAT: NCHW,
channels_last and channel slices of either), pixel offsets are affine in
the tile index: the compiler then vectorizes along pixels and keeps one
pointer per vector instead of one per element (on sm_90 this removed the
register spills of every weight-gradient config). Other strides (spatial
windows) take the general h/w path. The price is the masked tail per image
(7x7 images with 64-pixel tiles: 23% idle lanes).

Kernels and launchers (the backward ones in kernels/conv1x1_bwd.py, which
shares this module's device helpers):
  _ln_conv1x1_kernel        ln_conv1x1_fwd   forward, LN / GELU / no prologue,
                                             bias, layer scale, sample scale,
                                             residual epilogue
  _conv1x1_dgrad_kernel     conv1x1_dgrad    dh = W^T (dy * scales), * GELU'(a)
  _conv1x1_dgrad_ln_kernel  conv1x1_dgrad    ... followed by the LayerNorm
                                             backward (norm=...)
  _conv1x1_wgrad_kernel     conv1x1_wgrad    G = a' b'^T over pixels, split-K
"""

import torch
import triton
import triton.language as tl

from ._common import (TunedKernel, declare_kernels, dot_precision, interpreter_blocks, interpreting, launch,
                      needs_int64)
from .conv_bn_act import _apply_activation, grouped_tile_ids

declare_kernels("ln_conv1x1", "ln_fold_weight")

_GELU = tl.constexpr(4)  # _apply_activation's id of the exact (erf) GELU


# ----------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------

@triton.jit
def _ln_stats(x_ptr, x_pix, sx_c, C, m_ok, eps, offs_c, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, rstd) over the C channels of each pixel of the tile, fp32.
    Two passes (mean, then centred variance) rather than E[x^2]-E[x]^2,
    which cancels catastrophically when |mean| >> std."""
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        a = tl.load(x_ptr + cc[:, None] * sx_c + x_pix[None, :], mask=(cc < C)[:, None] & m_ok[None, :], other=0.0)
        total += tl.sum(a.to(tl.float32), axis=0)
    mean = total / C
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        ok = (cc < C)[:, None] & m_ok[None, :]
        a = tl.load(x_ptr + cc[:, None] * sx_c + x_pix[None, :], mask=ok, other=0.0)
        d = tl.where(ok, a.to(tl.float32) - mean[None, :], 0.0)
        sq += tl.sum(d * d, axis=0)
    rstd = 1.0 / tl.sqrt(sq / C + eps)
    return mean, rstd


@triton.jit
def _pix_offsets(q, s_h, s_w, W, FLAT: tl.constexpr):
    """Offsets of the pixels q (= h*W + w) of one image. FLAT: the tensor
    stores an image's pixels at a single stride (s_h == W * s_w: NCHW,
    channels_last and channel slices of either), so the offsets are affine
    in q and the compiler can vectorize along pixels."""
    if FLAT:
        return q * s_w
    else:
        return (q // W) * s_h + (q % W) * s_w


@triton.jit
def _pixel_tile(tile, HW, BLOCK_M: tl.constexpr, INT64: tl.constexpr):
    """(image n, pixels q of that image, mask) of pixel tile `tile`: tiles
    never straddle two images (cdiv(H*W, BLOCK_M) tiles per image), so n is
    a scalar and offsets stay affine in q."""
    qb = tl.cdiv(HW, BLOCK_M)
    n = tile // qb
    q = (tile % qb) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        n = n.to(tl.int64)
        q = q.to(tl.int64)
    return n, q, q < HW


@triton.jit
def _gelu_grad(a):
    """d/da of the exact GELU a * Phi(a): Phi(a) + a * phi(a), fp32."""
    cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
    pdf = 0.3989422804014327 * tl.exp(-0.5 * a * a)
    return cdf + a * pdf


def _weight_2d(weight):
    """(K, C) view of a (K, C) or (K, C, 1, 1) weight (no copy)."""
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"1x1 conv weight expected, got {tuple(weight.shape)}")
        return weight[:, :, 0, 0]
    if weight.dim() != 2:
        raise ValueError(f"weight must be (K, C) or (K, C, 1, 1), got {tuple(weight.shape)}")
    return weight


def _vector(v, n, what):
    """A per-channel or per-sample vector as a contiguous 1-D tensor of n."""
    if v is None:
        return None
    if v.numel() != n:
        raise ValueError(f"{what} must have {n} elements, got shape {tuple(v.shape)}")
    return v.reshape(-1).contiguous()


def _is_flat(*tensors):
    """Every 4-D tensor stores an image's pixels at one stride (h-stride =
    W * w-stride, or a spatial extent of 1): the kernels' FLAT path."""
    for t in tensors:
        if t is None:
            continue
        _, _, H, W = t.shape
        if H > 1 and W > 0 and t.stride(2) != W * t.stride(3):
            return False
    return True


def _pixel_tiles(M, HW, block):
    """Pixel tiles of `block` pixels that never straddle two images."""
    return (M // HW) * triton.cdiv(HW, block) if HW > 0 else 0


def _prune_by(configs, sizes):
    """Keep configs whose tile sides do not exceed the problem (rounded up
    to a power of two, at least the smallest tile); sizes maps a block name
    to (extent, smallest)."""
    kept = [c for c in configs
            if all(c.kwargs[b] <= max(lo, triton.next_power_of_2(int(ext))) for b, (ext, lo) in sizes.items())]
    return kept or configs[-1:]


# ----------------------------------------------------------------------------
# Forward: y = residual + ss[n] * ls[k] * (b[k] + W @ P(x))
# ----------------------------------------------------------------------------

def _ln_conv1x1_configs():
    """GPU autotune space: the tiles that compile without register spills on
    sm_90 with and without the LayerNorm prologue (ptxas -v, fp16; 128x128
    and 128x256 tiles spill with it). The interpreter bypasses the
    autotuner (it needs a driver to benchmark)."""
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (64, 64, 32, 4, 4), (64, 32, 32, 2, 5),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _ln_conv1x1_prune(configs, named_args, **kwargs):
    """Tiles no larger than the problem: pixel tiles lie within one image,
    so H*W (not M) bounds BLOCK_M."""
    HW, K, C = named_args.get("HW", named_args["M"]), named_args["K"], named_args["C"]
    return _prune_by(configs, {"BLOCK_N": (K, 32), "BLOCK_M": (HW, 64), "BLOCK_K": (C, 32)})


@triton.jit
def _ln_conv1x1_kernel(
    x_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, lnu_ptr, lnv_ptr, y_ptr, ls_ptr, ss_ptr, r_ptr,
    M, C, K, HW, W, eps,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c,
    sy_n, sy_c, sy_h, sy_w,
    sr_n, sr_c, sr_h, sr_w,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
    INT64: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROLOGUE_GELU: tl.constexpr = False, HAS_LS: tl.constexpr = False, HAS_SS: tl.constexpr = False,
    HAS_RES: tl.constexpr = False, FLAT: tl.constexpr = False, LN_FOLDED: tl.constexpr = False,
    EPILOGUE_GELU: tl.constexpr = False,
):
    """y[n,k,h,w] = r[n,k,h,w] + ss[n] * ls[k] * E(b[k] + sum_c W[k,c] * P(x)[n,c,h,w])

    E is the exact GELU with EPILOGUE_GELU (a HorBlock's pwconv1 + act at
    inference: pwconv2 then runs as a plain GEMM), else the identity.

    P is one of
      HAS_NORM:      LN(x)[c] = (x[c] - mean) * rsqrt(var + eps) * lnw[c] + lnb[c]
                     over the C channels of one pixel (biased variance, as
                     HorNet's LayerNorm);
      PROLOGUE_GELU: GELU(x) = x * Phi(x) (exact erf form);
      neither:       x itself;
    and P(x) is rounded to x's dtype before the dot (as eager's LayerNorm /
    GELU output is). LN_FOLDED (16-bit x): the LayerNorm is folded into
    the weights instead of applied to x, so the main loop is a plain GEMM
    of raw x tiles (on sm_90, wgmma on pipelined cp.async tiles; a prologue
    in registers makes every wgmma wait for the previous one):

        sum_c W[k,c] LN(x)[c] = s[k] * rstd * (sum_c W'[k,c] x[c] - mean * u[k]) + v[k]

    with W' = W diag(lnw) / s[k] in x's dtype (w_ptr), s[k] the power of
    two at or below max_c |W[k,c] lnw[c]| (so W' uses the dtype's normal
    range whatever the LN weights' scale: no fp16 subnormals or overflow;
    exact to apply), u[k] = sum_c W'[k,c] of the rounded W' (lnu_ptr[k],
    s[k] at lnu_ptr[K + k]) and v[k] = sum_c W[k,c] lnb[c] (lnv_ptr), all
    fp32, from ``_ln_fold_weight_kernel`` at every call (live weights).
    Exact algebra; the rounding moves from LN(x) (eager) to W', the same
    relative size in 16 bits, and u from the rounded W' keeps the mean
    term cancelling exactly (up to fp32 sums). r (residual), ss (per-sample scale: drop path), ls
    (per-channel layer scale), b are each optional; the epilogue is fp32
    with one rounding at the store.

    x: (N, C, H, W), W: (K, C), y and r: (N, K, H, W), each via strides
    (FLAT: every tensor has h-stride = W * w-stride, see _pix_offsets).
    Bytes per pixel (e = element size): reads C*e of x (HAS_NORM: twice
    more, from L2, for the statistics; x is read once per output-channel
    tile, i.e. cdiv(K, BLOCK_N) times, mostly from L2), K*e of r if
    HAS_RES; writes K*e of y. W and the vectors are read once per tile.
    PROLOGUE_GELU recomputes erf on each x element once per output-channel
    tile (cdiv(K, BLOCK_N) times).

    Tiles are (channels x pixels of one image): y^T = W @ P(x)^T, so pixels
    are the fast axis of every tile. In NCHW, pixels are what is contiguous
    in memory (and per-pixel vectors then cost a couple of registers per
    thread, not one per tile row)."""
    tiles_m = (M // HW) * tl.cdiv(HW, BLOCK_M)
    pid_m, pid_n = grouped_tile_ids(tiles_m * BLOCK_M, K, BLOCK_M, BLOCK_N, GROUP_M)
    n, q, m_ok = _pixel_tile(pid_m, HW, BLOCK_M, INT64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K)
    if INT64:
        offs_n = offs_n.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    n_ok = offs_n < K
    x_img = x_ptr + n * sx_n
    x_pix = _pix_offsets(q, sx_h, sx_w, W, FLAT)

    if HAS_NORM:
        mean, rstd = _ln_stats(x_img, x_pix, sx_c, C, m_ok, eps, offs_c, BLOCK_M, BLOCK_K)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        cc = c0 + offs_c
        c_ok = cc < C
        xt = tl.load(x_img + cc[:, None] * sx_c + x_pix[None, :], mask=c_ok[:, None] & m_ok[None, :], other=0.0)
        if HAS_NORM and not LN_FOLDED:
            v = (xt.to(tl.float32) - mean[None, :]) * rstd[None, :]
            if HAS_NORM_W:
                v = v * tl.load(lnw_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            if HAS_NORM_B:
                v = v + tl.load(lnb_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            # K lanes past C must stay exactly zero (a NaN mean would leak).
            xt = tl.where(c_ok[:, None], v, 0.0).to(x_ptr.dtype.element_ty)
        if PROLOGUE_GELU:
            # GELU(0) = 0: masked lanes stay zero.
            xt = _apply_activation(xt.to(tl.float32), 0.0, _GELU).to(x_ptr.dtype.element_ty)
        wt = tl.load(w_ptr + offs_n[:, None] * sw_k + cc[None, :] * sw_c, mask=n_ok[:, None] & c_ok[None, :],
                     other=0.0)
        if DOT_IN_FP32:
            # Interpreter only: its bf16 tl.dot multiplies raw bit patterns.
            wt = wt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(wt, xt, acc, input_precision=INPUT_PRECISION)

    if HAS_NORM and LN_FOLDED:
        u = tl.load(lnu_ptr + offs_n, mask=n_ok, other=0.0)
        s = tl.load(lnu_ptr + K + offs_n, mask=n_ok, other=0.0)
        acc = (acc - u[:, None] * mean[None, :]) * (s[:, None] * rstd[None, :])
        if HAS_NORM_B:
            acc += tl.load(lnv_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if EPILOGUE_GELU:
        acc = _apply_activation(acc, 0.0, _GELU)
    if HAS_LS:
        acc = acc * tl.load(ls_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_SS:
        acc = acc * tl.load(ss_ptr + n).to(tl.float32)
    ok = n_ok[:, None] & m_ok[None, :]
    if HAS_RES:
        r_pix = _pix_offsets(q, sr_h, sr_w, W, FLAT)
        acc += tl.load(r_ptr + n * sr_n + offs_n[:, None] * sr_c + r_pix[None, :], mask=ok,
                       other=0.0).to(tl.float32)
    y_pix = _pix_offsets(q, sy_h, sy_w, W, FLAT)
    tl.store(y_ptr + n * sy_n + offs_n[:, None] * sy_c + y_pix[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _w_times_lnw(w_ptr, lnw_ptr, offs_k, k_ok, cc, c_ok, sw_k, sw_c, HAS_NORM_W: tl.constexpr):
    """(W, W diag(lnw)) for rows offs_k and channels cc, fp32 (0 outside)."""
    w = tl.load(w_ptr + offs_k[:, None] * sw_k + cc[None, :] * sw_c, mask=k_ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)
    wl = w
    if HAS_NORM_W:
        wl = w * tl.load(lnw_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return w, wl


@triton.jit
def _ln_fold_weight_kernel(w_ptr, lnw_ptr, lnb_ptr, wf_ptr, u_ptr, v_ptr, K, C, sw_k, sw_c,
                           HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """The LayerNorm fold of _ln_conv1x1_kernel (LN_FOLDED), for BLOCK_K
    output channels per program:

        s[k]    = 2^floor(log2(max_c |W[k,c] lnw[c]|))   (1 for an all-zero row)
        W'[k,c] = W[k,c] * lnw[c] / s[k]                rounded to W's dtype, (K, C) contiguous
        u[k]    = sum_c W'[k,c]                         fp32, of the rounded values
        v[k]    = sum_c W[k,c] lnb[c]                   fp32 (0 without lnb)

    u_ptr holds u (K) then s (K). W: (K, C) via strides. Reads W twice
    (the row maximum, then the fold), writes W' once (K*C elements: the
    weights, not the activations). s and 1/s come from the exponent bits,
    so scaling by them is exact."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_c = tl.arange(0, BLOCK_C)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        _, wl = _w_times_lnw(w_ptr, lnw_ptr, offs_k, k_ok, cc, cc < C, sw_k, sw_c, HAS_NORM_W)
        amax = tl.maximum(amax, tl.max(tl.abs(wl), axis=1))
    expo = amax.to(tl.int32, bitcast=True) & 0x7F800000
    normal = (expo > 0) & (expo < (254 << 23))  # zero / subnormal / huge rows keep s = 1
    s = tl.where(normal, expo.to(tl.float32, bitcast=True), 1.0)
    inv_s = tl.where(normal, ((254 << 23) - expo).to(tl.float32, bitcast=True), 1.0)
    u = tl.zeros((BLOCK_K,), dtype=tl.float32)
    v = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < C
        ok = k_ok[:, None] & c_ok[None, :]
        w, wl = _w_times_lnw(w_ptr, lnw_ptr, offs_k, k_ok, cc, c_ok, sw_k, sw_c, HAS_NORM_W)
        wf = (wl * inv_s[:, None]).to(wf_ptr.dtype.element_ty)
        tl.store(wf_ptr + offs_k[:, None] * C + cc[None, :], wf, mask=ok)
        u += tl.sum(wf.to(tl.float32), axis=1)
        if HAS_NORM_B:
            v += tl.sum(w * tl.load(lnb_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[None, :], axis=1)
    tl.store(u_ptr + offs_k, u, mask=k_ok)
    tl.store(u_ptr + K + offs_k, s, mask=k_ok)
    tl.store(v_ptr + offs_k, v, mask=k_ok)


def _fold_layer_norm(weight, norm_weight, norm_bias):
    """(W', [u | s], v) of _ln_fold_weight_kernel for a (K, C) weight: one launch."""
    K, C = weight.shape
    wf = torch.empty((K, C), dtype=weight.dtype, device=weight.device)
    u = torch.empty((2 * K,), dtype=torch.float32, device=weight.device)
    v = torch.empty((K,), dtype=torch.float32, device=weight.device)
    block_k, block_c = (16, 16) if interpreting() else (32, 64)
    launch("ln_fold_weight", _ln_fold_weight_kernel, (triton.cdiv(K, block_k),),
           weight, norm_weight if norm_weight is not None else weight,
           norm_bias if norm_bias is not None else weight, wf, u, v, K, C, weight.stride(0), weight.stride(1),
           HAS_NORM_W=norm_weight is not None, HAS_NORM_B=norm_bias is not None,
           BLOCK_K=block_k, BLOCK_C=block_c, num_warps=4)
    return wf, u, v


_ln_conv1x1_tuned = TunedKernel(
    _ln_conv1x1_kernel, _ln_conv1x1_configs(),
    key=["M", "HW", "K", "C", "HAS_NORM", "PROLOGUE_GELU", "EPILOGUE_GELU"], prune=_ln_conv1x1_prune)


def _interpreter_blocks_ln(C, K):
    """Small tiles in the interpreter so that the tests cross tile edges
    (C: the reduced channels, K: the output channels)."""
    return interpreter_blocks((32, (16 if K <= 32 else 32), (16 if C <= 32 else 32)))


def ln_conv1x1_fwd(x, weight, bias, norm_weight, norm_bias, norm_eps, out, *, allow_tf32, force_int64=False,
                   prologue_gelu=False, layer_scale=None, sample_scale=None, residual=None, epilogue_gelu=False):
    """Launch the forward 1x1 conv: out = residual + sample_scale[n] *
    layer_scale[k] * E(bias[k] + W @ P(x)), P = LayerNorm (norm_eps not
    None), exact GELU (prologue_gelu) or identity, E = exact GELU
    (epilogue_gelu) or identity; every term optional.

    x (N, C, H, W); weight (K, C) or (K, C, 1, 1); out and residual
    (N, K, H, W); layer_scale (K,); sample_scale N elements (e.g. a drop-path
    mask of shape (N, 1, 1, 1)). `out` is preallocated; inputs of the
    LayerNorm path are validated by resfuse.ops.gnconv. Returns out."""
    if prologue_gelu and norm_eps is not None:
        raise ValueError("ln_conv1x1_fwd: prologue_gelu and the LayerNorm prologue (norm_eps) are exclusive")
    weight = _weight_2d(weight)
    N, C, H, W = x.shape
    K = weight.shape[0]
    M = N * H * W
    if residual is not None and tuple(residual.shape) != tuple(out.shape):
        raise ValueError(f"residual shape {tuple(residual.shape)} != out shape {tuple(out.shape)}")
    if residual is not None and residual.numel() and residual.data_ptr() == out.data_ptr():
        # The GPU autotuner runs the kernel several times on its first call.
        raise ValueError("ln_conv1x1_fwd: out must not alias residual (no in-place residual add)")
    layer_scale = _vector(layer_scale, K, "layer_scale")
    sample_scale = _vector(sample_scale, N, "sample_scale")
    if M == 0:
        return out
    interpret = interpreting()
    has_norm = norm_eps is not None
    bias, norm_weight, norm_bias = (None if v is None else v.contiguous() for v in (bias, norm_weight, norm_bias))
    dummy = x
    int64 = force_int64 or needs_int64(x, out, residual, extra=M)

    def grid(meta):
        return (_pixel_tiles(M, H * W, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

    if interpret:
        bm, bn, bk = _interpreter_blocks_ln(C, K)
        kernel, tiles = _ln_conv1x1_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
    else:
        kernel, tiles = _ln_conv1x1_tuned, {}
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    # 16-bit x: the LayerNorm folded into the weights (see the kernel; in
    # fp32 the fold's x @ W' would lose TF32 bits to the mean term).
    folded = has_norm and x.dtype in (torch.float16, torch.bfloat16)
    lnu = lnv = dummy
    if folded:
        weight, lnu, lnv = _fold_layer_norm(weight, norm_weight, norm_bias)
    launch(
        "ln_conv1x1", kernel, grid,
        x, weight, bias if bias is not None else dummy,
        norm_weight if norm_weight is not None else dummy, norm_bias if norm_bias is not None else dummy,
        lnu, lnv, out,
        layer_scale if layer_scale is not None else dummy, sample_scale if sample_scale is not None else dummy,
        residual if residual is not None else dummy,
        M, C, K, H * W, W, float(norm_eps) if has_norm else 0.0,
        *x.stride(), weight.stride(0), weight.stride(1), *out.stride(), *res_strides,
        HAS_BIAS=bias is not None, HAS_NORM=has_norm,
        HAS_NORM_W=has_norm and norm_weight is not None, HAS_NORM_B=has_norm and norm_bias is not None,
        INT64=bool(int64), DOT_IN_FP32=interpret and x.dtype == torch.bfloat16,
        INPUT_PRECISION=dot_precision(x.dtype, allow_tf32),
        PROLOGUE_GELU=bool(prologue_gelu), HAS_LS=layer_scale is not None, HAS_SS=sample_scale is not None,
        HAS_RES=residual is not None, FLAT=_is_flat(x, out, residual), LN_FOLDED=folded,
        EPILOGUE_GELU=bool(epilogue_gelu), **tiles,
    )
    return out
