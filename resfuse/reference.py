"""Eager definitions of resfuse's ops: the oracle every test compares with.

Plain PyTorch, unfused, in whatever dtype the caller passes (tests pass
float64). Nothing here is fast; everything here is obviously right.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .activations import get_activation


def conv_bn_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    bn_mean: Optional[torch.Tensor] = None,
    bn_var: Optional[torch.Tensor] = None,
    bn_weight: Optional[torch.Tensor] = None,
    bn_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    activation: str = "identity",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``act(batch_norm_eval(conv2d(x, weight, bias)) [+ residual])``.

    The three steps run as separate eager ops, exactly as Conv2d ->
    BatchNorm2d (eval) -> add -> activation would. ``bn_mean is None`` means
    no BatchNorm. All tensors are used in the dtype they come in.
    """
    y = F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    if bn_mean is not None:
        y = F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, training=False, eps=eps)
    if residual is not None:
        y = y + residual
    return get_activation(activation).eager(y, negative_slope)


def bn_act_conv_reference(x, in_mean, in_var, in_weight=None, in_bias=None, in_eps: float = 1e-5,
                          in_activation: str = "relu", weight=None, bias=None, in_negative_slope: float = 0.01,
                          **conv_bn_act_args) -> torch.Tensor:
    """``conv_bn_act_reference(act_in(batch_norm_eval(x)), weight, bias, ...)``:
    BatchNorm2d (eval) -> activation -> Conv2d (zero padding of the
    activated tensor) -> the rest as ``conv_bn_act_reference``."""
    h = F.batch_norm(x, in_mean, in_var, in_weight, in_bias, training=False, eps=in_eps)
    h = get_activation(in_activation).eager(h, in_negative_slope)
    return conv_bn_act_reference(h, weight, bias, **conv_bn_act_args)


def to_float64(*tensors):
    """Upcast every tensor (None passes through) for the float64 oracle."""
    return tuple(None if t is None else t.detach().to(torch.float64) for t in tensors)


# ----------------------------------------------------------------------------
# HorNet's gnconv (recursive gated convolution)
# ----------------------------------------------------------------------------

def gnconv_dims(dim: int, order: int):
    """HorNet's channel split: ``[dim / 2^(order-1), ..., dim / 2, dim]``."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if dim < 1 or dim % (1 << (order - 1)):
        raise ValueError(f"dim={dim} must be a positive multiple of 2^(order-1) = {1 << (order - 1)}")
    return [dim >> (order - 1 - i) for i in range(order)]


def layer_norm_channels_first_reference(x, weight=None, bias=None, eps: float = 1e-6):
    """HorNet's ``LayerNorm(data_format="channels_first")``: normalize each
    pixel over the channel dimension (biased variance), then the affine."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    if weight is not None:
        x = weight[:, None, None] * x
    if bias is not None:
        x = x + bias[:, None, None]
    return x


def layernorm_conv1x1_reference(x, weight, bias=None, norm_weight=None, norm_bias=None,
                                norm_eps: Optional[float] = None, epilogue_gelu: bool = False):
    """``conv1x1(LN_channels_first(x))`` (no LayerNorm when norm_eps is None):
    a HorBlock's ``norm1`` followed by its gnconv's ``proj_in``; with
    ``epilogue_gelu`` the exact GELU of that (``norm2`` -> ``pwconv1`` ->
    ``act``)."""
    if norm_eps is not None:
        x = layer_norm_channels_first_reference(x, norm_weight, norm_bias, norm_eps)
    y = F.conv2d(x, weight, bias)
    return F.gelu(y) if epilogue_gelu else y


def patchify_conv_reference(x, weight, bias=None, pre_weight=None, pre_bias=None, pre_eps: Optional[float] = None,
                            post_weight=None, post_bias=None, post_eps: Optional[float] = None):
    """``LN_post(conv2d(LN_pre(x), weight, bias, stride=P))`` for a (K, C, P, P)
    weight (no padding), each channels-first LayerNorm optional (off when
    its eps is None): a HorNet / ConvNeXt downsampling layer (LN_pre) or
    stem (LN_post)."""
    if pre_eps is not None:
        x = layer_norm_channels_first_reference(x, pre_weight, pre_bias, pre_eps)
    y = F.conv2d(x, weight, bias, stride=weight.shape[-1])
    if post_eps is not None:
        y = layer_norm_channels_first_reference(y, post_weight, post_bias, post_eps)
    return y


def gnconv_chain_reference(fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale: float,
                           residual=None, layer_scale=None, sample_scale=None):
    """Everything of HorNet's gnconv after ``proj_in``, as HorNet writes it.

    fused: proj_in's output (N, 2*dim, H, W). The gates are
    ``dwconv(abc) * scale`` with the depthwise conv (w_dw, b_dw, padding
    k//2), or ``gates * scale`` when a gflayer's output is given instead.
    Optionally ``residual + sample_scale[n] * layer_scale * y`` (a HorBlock's
    first half; ``sample_scale`` is drop path's per-sample multiplier)."""
    dim, order = w_out.shape[0], len(w_pws) + 1
    dims = gnconv_dims(dim, order)
    pwa, abc = torch.split(fused, (dims[0], sum(dims)), dim=1)
    if gates is None:
        k = w_dw.shape[-1]
        gates = F.conv2d(abc, w_dw, b_dw, padding=k // 2, groups=sum(dims))
    dw_list = torch.split(gates * scale, dims, dim=1)
    x = pwa * dw_list[0]
    for i in range(order - 1):
        x = F.conv2d(x, w_pws[i], b_pws[i]) * dw_list[i + 1]
    y = F.conv2d(x, w_out, b_out)
    return _scale_add(y, layer_scale, sample_scale, residual)


def _scale_add(y, layer_scale, sample_scale, residual):
    """``residual + sample_scale[n] * (layer_scale[c] * y)``, each part optional,
    in the order a HorBlock applies them (gamma, then drop path, then add)."""
    if layer_scale is not None:
        y = layer_scale[:, None, None] * y
    if sample_scale is not None:
        y = y * sample_scale[:, None, None, None]
    if residual is not None:
        y = residual + y
    return y


def gelu_conv1x1_reference(a, weight, bias=None, layer_scale=None, sample_scale=None, residual=None,
                           prologue_gelu: bool = True):
    """``residual + sample_scale[n] * layer_scale * conv1x1(gelu(a), weight, bias)``:
    the second half of a HorBlock's MLP (``act`` -> ``pwconv2`` -> ``gamma2``
    -> drop path -> ``x + .``) on (N, C, H, W) tensors; exact (erf) GELU.
    ``prologue_gelu=False``: ``a`` is already gelu'd (by
    ``layernorm_conv1x1(epilogue_gelu=True)``), the 1x1 takes it as is."""
    return _scale_add(F.conv2d(F.gelu(a) if prologue_gelu else a, weight, bias), layer_scale, sample_scale,
                      residual)


def gnconv_reference(x, w_in, b_in, w_dw, b_dw, w_pws, b_pws, w_out, b_out, scale: float, *,
                     norm_weight=None, norm_bias=None, norm_eps: Optional[float] = None,
                     residual=None, layer_scale=None):
    """HorNet's gnconv (recursive gated convolution), the definition::

        dims = [dim/2^(order-1), ..., dim]
        pwa, abc = split(proj_in(x), (dims[0], sum(dims)))
        dw_0, ..., dw_{order-1} = split(dwconv7x7(abc) * scale, dims)
        x = pwa * dw_0;  x = pws[i](x) * dw_{i+1}  for i < order-1
        return proj_out(x)

    with, optionally, a channels-first LayerNorm before proj_in and
    ``residual + layer_scale * out`` after proj_out (a HorBlock's
    ``x + gamma1 * gnconv(norm1(x))``)."""
    fused = layernorm_conv1x1_reference(x, w_in, b_in, norm_weight, norm_bias, norm_eps)
    return gnconv_chain_reference(fused, w_dw, b_dw, None, w_pws, b_pws, w_out, b_out, scale,
                                  residual, layer_scale)
