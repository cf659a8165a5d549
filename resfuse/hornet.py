"""HorNet's modules as HorNet's code writes them, in plain PyTorch (no
timm, no downloads, random weights): the LayerNorm (channels_last through
F.layer_norm, channels_first written out), DropPath, the gnconv (recursive
gated convolution, one PyTorch op per step), the Block (yoloair's
HorBlock), and HorNet-T's trunk (``hornet_tiny_7x7``: dims 64/128/256/512,
depths 2/3/18/2, gnconv orders 2/3/4/5, s = 1/3, depthwise 7x7; stem,
downsampling layers and stages, no classifier head).

Child and parameter names, and forwards, are HorNet's, so
``resfuse.convert`` proves them as it proves HorNet's own. Used by
``resfuse.inspect`` (``--model hornet_t``), by bench/ (the GPU box has no
timm) and by the tests' seed structures.
"""

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn

from .reference import gnconv_dims

#: (dim, order, H=W at a 224x224 input) per stage of HorNet-T.
HORNET_T_STAGES = ((64, 2, 56), (128, 3, 28), (256, 4, 14), (512, 5, 7))
HORNET_T_DEPTHS = (2, 3, 18, 2)
HORNET_T_SCALE = 1.0 / 3.0


class HorLayerNorm(nn.Module):
    """HorNet's LayerNorm: ``channels_last`` (N, H, W, C) through
    F.layer_norm, or ``channels_first`` (N, C, H, W) written out as HorNet
    writes it (mean, biased variance, normalise, affine: 10 eager ops)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class DropPath(nn.Module):
    """Stochastic depth per sample (the identity in eval or with p = 0)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class HorBlock(nn.Module):
    """HorNet's Block (yoloair's HorBlock) as HorNet writes it:
    ``x + drop_path(gamma1 * gnconv(norm1(x)))`` (norm1 channels-first),
    then the channels-last MLP half
    ``x + drop_path(gamma2 * pwconv2(act(pwconv1(norm2(x)))))``. Same
    children, parameter names and forward as HorNet (and
    tests/seed_hornet.py), so ``resfuse.convert`` takes it for a HorBlock.
    ``gnconv``: a callable dim -> token mixer (a ``PlainGnConv`` of order 5
    by default)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, gnconv=None):
        super().__init__()
        self.norm1 = HorLayerNorm(dim, eps=1e-6, data_format="channels_first")
        self.gnconv = (gnconv or PlainGnConv)(dim)
        self.norm2 = HorLayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma1 = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                       if layer_scale_init_value > 0 else None)
        self.gamma2 = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                       if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        C = x.shape[1]
        gamma1 = self.gamma1.view(C, 1, 1) if self.gamma1 is not None else 1
        x = x + self.drop_path(gamma1 * self.gnconv(self.norm1(x)))
        y = self.norm2(x.permute(0, 2, 3, 1))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class PlainGnConv(nn.Module):
    """HorNet's gnconv (recursive gated convolution) as HorNet writes it,
    one PyTorch op per step: ``proj_in`` 1x1 dim -> 2 dim, ``dwconv``
    depthwise ksize x ksize with bias over sum(dims) channels, ``pws``
    (order - 1 gated 1x1 convs dims[i] -> dims[i+1]), ``proj_out`` 1x1
    dim -> dim, scale ``s``. Same child and parameter names as HorNet, so
    ``resfuse.nn.GnConv.from_module`` takes it as it takes HorNet's."""

    def __init__(self, dim: int, order: int = 5, s: float = 1.0, ksize: int = 7):
        super().__init__()
        self.order = order
        self.dims = gnconv_dims(dim, order)  # [dim / 2^(order-1), ..., dim]
        S = sum(self.dims)
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        self.dwconv = nn.Conv2d(S, S, kernel_size=ksize, padding=ksize // 2, bias=True, groups=S)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList(nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1))
        self.scale = s

    def forward(self, x):
        pwa, abc = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        y = pwa * gates[0]
        for i, pw in enumerate(self.pws):
            y = pw(y) * gates[i + 1]
        return self.proj_out(y)


class HorNetTrunk(nn.Module):
    def __init__(self, depths: Sequence[int] = HORNET_T_DEPTHS, stages=HORNET_T_STAGES, in_chans: int = 3):
        super().__init__()
        dims = [d for d, _, _ in stages]
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            HorLayerNorm(dims[0], data_format="channels_first"))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(nn.Sequential(HorLayerNorm(dims[i], data_format="channels_first"),
                                                        nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList([nn.Sequential(*[
            HorBlock(d, gnconv=partial(PlainGnConv, order=o, s=HORNET_T_SCALE)) for _ in range(n)])
            for (d, o, _), n in zip(stages, depths)])

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x


def hornet_t(depths: Sequence[int] = HORNET_T_DEPTHS) -> HorNetTrunk:
    """HorNet-T's trunk (``depths`` smaller for quick runs)."""
    return HorNetTrunk(depths)
