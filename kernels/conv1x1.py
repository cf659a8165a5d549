"""1x1 convolutions (per-pixel GEMMs over channels) with fused prologues
and epilogues, in Triton: the projection of HorNet's gnconv (with the
HorBlock's channels-first LayerNorm as a prologue) and the building blocks
of the HorBlock's MLP half and of the gnconv backward.

Tiles are (channels x pixels): y^T = W @ x^T, so pixels are the fast axis
of every tile (what NCHW stores contiguously). Every tensor is addressed
through its own strides (NCHW, channels_last, channel-sliced views).
"""

import torch
import triton
import triton.language as tl

from ._common import count_launch, declare_kernels, dot_precision, interpreter_blocks, interpreting, needs_int64
from .conv_bn_act import grouped_tile_ids

declare_kernels("ln_conv1x1")


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
    M, K, C = named_args["M"], named_args["K"], named_args["C"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(K))
            and c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(M))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(C))]
    return kept or configs[-1:]


@triton.jit
def _ln_conv1x1_kernel(
    x_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, y_ptr,
    M, C, K, HW, W, eps,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c,
    sy_n, sy_c, sy_h, sy_w,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
    INT64: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[n,k,h,w] = b[k] + sum_c W[k,c] * LN(x)[n,c,h,w],
    LN(x)[c] = (x[c] - mean) * rsqrt(var + eps) * lnw[c] + lnb[c] over the C
    channels of one pixel (biased variance, as HorNet's LayerNorm), or x
    itself without HAS_NORM. x: (N, C, H, W), W: (K, C) via strides, y: (N, K, H, W).
    Reads x (C per pixel; twice more from L2 for the statistics), W and the
    vectors once per tile; writes y once. fp32 statistics and accumulation;
    the normalized tile is rounded to x's dtype before the dot (as eager's
    LayerNorm output is).

    Tiles are (channels x pixels): y^T = W @ LN(x)^T, so pixels are the
    fast axis of every tile. In NCHW, pixels are what is contiguous in
    memory (and per-pixel vectors then cost a couple of registers per
    thread, not one per tile row)."""
    pid_m, pid_n = grouped_tile_ids(M, K, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K)
    if INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < K
    img = offs_m // HW
    rem = offs_m % HW
    x_pix = img * sx_n + (rem // W) * sx_h + (rem % W) * sx_w

    if HAS_NORM:
        # Two passes (mean, then centred variance) rather than E[x^2]-E[x]^2,
        # which cancels catastrophically when |mean| >> std.
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_K):
            cc = c0 + offs_c
            a = tl.load(x_ptr + cc[:, None] * sx_c + x_pix[None, :], mask=(cc < C)[:, None] & m_ok[None, :],
                        other=0.0)
            total += tl.sum(a.to(tl.float32), axis=0)
        mean = total / C
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_K):
            cc = c0 + offs_c
            ok = (cc < C)[:, None] & m_ok[None, :]
            a = tl.load(x_ptr + cc[:, None] * sx_c + x_pix[None, :], mask=ok, other=0.0)
            d = tl.where(ok, a.to(tl.float32) - mean[None, :], 0.0)
            sq += tl.sum(d * d, axis=0)
        rstd = 1.0 / tl.sqrt(sq / C + eps)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        cc = c0 + offs_c
        c_ok = cc < C
        xt = tl.load(x_ptr + cc[:, None] * sx_c + x_pix[None, :], mask=c_ok[:, None] & m_ok[None, :], other=0.0)
        if HAS_NORM:
            v = (xt.to(tl.float32) - mean[None, :]) * rstd[None, :]
            if HAS_NORM_W:
                v = v * tl.load(lnw_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            if HAS_NORM_B:
                v = v + tl.load(lnb_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
            # K lanes past C must stay exactly zero (a NaN mean would leak).
            xt = tl.where(c_ok[:, None], v, 0.0).to(x_ptr.dtype.element_ty)
        wt = tl.load(w_ptr + offs_n[:, None] * sw_k + cc[None, :] * sw_c, mask=n_ok[:, None] & c_ok[None, :],
                     other=0.0)
        if DOT_IN_FP32:
            # Interpreter only: its bf16 tl.dot multiplies raw bit patterns.
            wt = wt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(wt, xt, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y_pix = img * sy_n + (rem // W) * sy_h + (rem % W) * sy_w
    tl.store(y_ptr + offs_n[:, None] * sy_c + y_pix[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


_ln_conv1x1_tuned = triton.autotune(
    configs=_ln_conv1x1_configs(), key=["M", "K", "C", "HAS_NORM"],
    prune_configs_by={"early_config_prune": _ln_conv1x1_prune})(_ln_conv1x1_kernel)


def _interpreter_blocks_ln(C, K):
    """Small tiles in the interpreter so that the tests cross tile edges."""
    return interpreter_blocks((32, (16 if K <= 32 else 32), (16 if C <= 32 else 32)))


def ln_conv1x1_fwd(x, weight, bias, norm_weight, norm_bias, norm_eps, out, *, allow_tf32, force_int64=False):
    """Launch kernel 1. Inputs are validated by resfuse.ops_gnconv; `out` is
    a preallocated (N, K, H, W) tensor. norm_eps None: no LayerNorm."""
    N, C, H, W = x.shape
    K = weight.shape[0]
    M = N * H * W
    if M == 0:
        return out
    interpret = interpreting()
    has_norm = norm_eps is not None
    bias, norm_weight, norm_bias = (None if v is None else v.contiguous() for v in (bias, norm_weight, norm_bias))
    dummy = x
    int64 = force_int64 or needs_int64(x, out, extra=M)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

    if interpret:
        bm, bn, bk = _interpreter_blocks_ln(C, K)
        kernel, tiles = _ln_conv1x1_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4)
    else:
        kernel, tiles = _ln_conv1x1_tuned, {}
    kernel[grid](
        x, weight, bias if bias is not None else dummy,
        norm_weight if norm_weight is not None else dummy, norm_bias if norm_bias is not None else dummy,
        out,
        M, C, K, H * W, W, float(norm_eps) if has_norm else 0.0,
        *x.stride(), weight.stride(0), weight.stride(1), *out.stride(),
        HAS_BIAS=bias is not None, HAS_NORM=has_norm,
        HAS_NORM_W=has_norm and norm_weight is not None, HAS_NORM_B=has_norm and norm_bias is not None,
        INT64=bool(int64), DOT_IN_FP32=interpret and x.dtype == torch.bfloat16,
        INPUT_PRECISION=dot_precision(x.dtype, allow_tf32), **tiles,
    )
    count_launch("ln_conv1x1")
    return out
