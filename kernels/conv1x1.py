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

Kernels and launchers:
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

from ._common import (alloc_scratch, count_launch, declare_kernels, dot_precision, interpreter_blocks, interpreting,
                      needs_int64, num_sms)
from .conv_bn_act import _apply_activation, grouped_tile_ids

declare_kernels("ln_conv1x1", "conv1x1_dgrad", "conv1x1_wgrad")

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
    x_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, y_ptr, ls_ptr, ss_ptr, r_ptr,
    M, C, K, HW, W, eps,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c,
    sy_n, sy_c, sy_h, sy_w,
    sr_n, sr_c, sr_h, sr_w,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
    INT64: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROLOGUE_GELU: tl.constexpr = False, HAS_LS: tl.constexpr = False, HAS_SS: tl.constexpr = False,
    HAS_RES: tl.constexpr = False, FLAT: tl.constexpr = False,
):
    """y[n,k,h,w] = r[n,k,h,w] + ss[n] * ls[k] * (b[k] + sum_c W[k,c] * P(x)[n,c,h,w])

    P is one of
      HAS_NORM:      LN(x)[c] = (x[c] - mean) * rsqrt(var + eps) * lnw[c] + lnb[c]
                     over the C channels of one pixel (biased variance, as
                     HorNet's LayerNorm);
      PROLOGUE_GELU: GELU(x) = x * Phi(x) (exact erf form);
      neither:       x itself;
    and P(x) is rounded to x's dtype before the dot (as eager's LayerNorm /
    GELU output is). r (residual), ss (per-sample scale: drop path), ls
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
        if HAS_NORM:
            v = (xt.to(tl.float32) - mean[None, :]) * rstd[None, :]
            if HAS_NORM_W:
                v = v * tl.load(lnw_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            if HAS_NORM_B:
                v = v + tl.load(lnb_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            # K lanes past C must stay exactly zero (a NaN mean would leak).
            xt = tl.where(c_ok[:, None], v, 0.0).to(x_ptr.dtype.element_ty)
        if PROLOGUE_GELU:
            # GELU(0) = 0: masked lanes stay zero.
            xt = _apply_activation(xt.to(tl.float32), _GELU).to(x_ptr.dtype.element_ty)
        wt = tl.load(w_ptr + offs_n[:, None] * sw_k + cc[None, :] * sw_c, mask=n_ok[:, None] & c_ok[None, :],
                     other=0.0)
        if DOT_IN_FP32:
            # Interpreter only: its bf16 tl.dot multiplies raw bit patterns.
            wt = wt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(wt, xt, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
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


_ln_conv1x1_tuned = triton.autotune(
    configs=_ln_conv1x1_configs(), key=["M", "HW", "K", "C", "HAS_NORM", "PROLOGUE_GELU"],
    prune_configs_by={"early_config_prune": _ln_conv1x1_prune})(_ln_conv1x1_kernel)


def _interpreter_blocks_ln(C, K):
    """Small tiles in the interpreter so that the tests cross tile edges
    (C: the reduced channels, K: the output channels)."""
    return interpreter_blocks((32, (16 if K <= 32 else 32), (16 if C <= 32 else 32)))


def ln_conv1x1_fwd(x, weight, bias, norm_weight, norm_bias, norm_eps, out, *, allow_tf32, force_int64=False,
                   prologue_gelu=False, layer_scale=None, sample_scale=None, residual=None):
    """Launch the forward 1x1 conv: out = residual + sample_scale[n] *
    layer_scale[k] * (bias[k] + W @ P(x)), P = LayerNorm (norm_eps not
    None), exact GELU (prologue_gelu) or identity; every term optional.

    x (N, C, H, W); weight (K, C) or (K, C, 1, 1); out and residual
    (N, K, H, W); layer_scale (K,); sample_scale N elements (e.g. a drop-path
    mask of shape (N, 1, 1, 1)). `out` is preallocated; inputs of the
    LayerNorm path are validated by resfuse.ops_gnconv. Returns out."""
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
    kernel[grid](
        x, weight, bias if bias is not None else dummy,
        norm_weight if norm_weight is not None else dummy, norm_bias if norm_bias is not None else dummy,
        out,
        layer_scale if layer_scale is not None else dummy, sample_scale if sample_scale is not None else dummy,
        residual if residual is not None else dummy,
        M, C, K, H * W, W, float(norm_eps) if has_norm else 0.0,
        *x.stride(), weight.stride(0), weight.stride(1), *out.stride(), *res_strides,
        HAS_BIAS=bias is not None, HAS_NORM=has_norm,
        HAS_NORM_W=has_norm and norm_weight is not None, HAS_NORM_B=has_norm and norm_bias is not None,
        INT64=bool(int64), DOT_IN_FP32=interpret and x.dtype == torch.bfloat16,
        INPUT_PRECISION=dot_precision(x.dtype, allow_tf32),
        PROLOGUE_GELU=bool(prologue_gelu), HAS_LS=layer_scale is not None, HAS_SS=sample_scale is not None,
        HAS_RES=residual is not None, FLAT=_is_flat(x, out, residual), **tiles,
    )
    count_launch("ln_conv1x1")
    return out


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


_conv1x1_dgrad_tuned = triton.autotune(
    configs=_dgrad_configs(), key=["M", "HW", "K", "C", "GELU_EPI"],
    prune_configs_by={"early_config_prune": _dgrad_prune})(_conv1x1_dgrad_kernel)

_conv1x1_dgrad_ln_tuned = triton.autotune(
    configs=_dgrad_ln_configs(), key=["M", "HW", "K", "C"],
    prune_configs_by={"early_config_prune": _dgrad_ln_prune})(_conv1x1_dgrad_ln_kernel)


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
        kernel[grid](
            dy, weight, cs, ss, a if a is not None else dummy, out,
            M, C, K, HW, W,
            *dy.stride(), weight.stride(0), weight.stride(1),
            *(a.stride() if a is not None else (0, 0, 0, 0)), *out.stride(),
            HAS_CS=channel_scale is not None, HAS_SS=sample_scale is not None, GELU_EPI=a is not None,
            **common, **tiles,
        )
        count_launch("conv1x1_dgrad")
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
        kernel[grid](
            dy, weight, cs, ss, x, norm_weight if norm_weight is not None else dummy, out, mean, rstd,
            dlnw_part, dlnb_part,
            M, C, K, HW, W, float(eps),
            *dy.stride(), weight.stride(0), weight.stride(1), *x.stride(), *out.stride(),
            HAS_CS=channel_scale is not None, HAS_SS=sample_scale is not None, HAS_NORM_W=want_dw,
            WANT_DW=want_dw, WANT_DB=want_db, **common, **tiles,
        )
        count_launch("conv1x1_dgrad")
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
            bt = _apply_activation(bt.to(tl.float32), _GELU).to(b_ptr.dtype.element_ty)
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


_conv1x1_wgrad_tuned = triton.autotune(
    configs=_wgrad_configs(), key=["M", "HW", "K", "C", "B_GELU", "B_NORM"],
    prune_configs_by={"early_config_prune": _wgrad_prune})(_conv1x1_wgrad_kernel)


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
    kernel[grid](
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
    count_launch("conv1x1_wgrad")
    g = g_part.view(split, K, C)
    g = g[0] if split == 1 else g.sum(0)
    rowsum = None
    if want_rowsum:
        r = rs_part.view(split, K)
        rowsum = r[0] if split == 1 else r.sum(0)
    return g, rowsum
