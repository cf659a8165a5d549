"""HorNet-T (``hornet_tiny_7x7``: dims 64/128/256/512, depths 2/3/18/2,
gnconv orders 2/3/4/5, s = 1/3, depthwise 7x7) as plain PyTorch modules
with HorNet's structure and module names, for ``resfuse.inspect`` and the
demo-sized checks: no timm, no downloads, random weights. The trunk only
(stem, downsampling layers, stages; no classifier head).

Structure, as HorNet's code writes it: the stem is Conv 4x4/4 then a
channels-first LayerNorm; each downsampling layer a channels-first
LayerNorm then Conv 2x2/2; a block is
``x + gamma1 * gnconv(norm1(x))`` then
``x + gamma2 * pwconv2(GELU(pwconv1(norm2(x))))`` over channels-last pixels.
"""

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reference import gnconv_dims

#: (dim, order, H=W at a 224x224 input) per stage.
HORNET_T_STAGES = ((64, 2, 56), (128, 3, 28), (256, 4, 14), (512, 5, 7))
HORNET_T_DEPTHS = (2, 3, 18, 2)


class LayerNorm(nn.Module):
    """HorNet's LayerNorm: over the last dim (``channels_last``) through
    F.layer_norm, or over dim 1 of NCHW (``channels_first``) written out."""

    def __init__(self, dim: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.data_format, self.normalized_shape = eps, data_format, (dim,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GnConv(nn.Module):
    """HorNet's gnconv (recursive gated convolution), depthwise 7x7."""

    def __init__(self, dim: int, order: int, s: float = 1.0 / 3.0):
        super().__init__()
        self.order, self.dims, self.scale = order, gnconv_dims(dim, order), s
        total = sum(self.dims)
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        self.dwconv = nn.Conv2d(total, total, kernel_size=7, padding=3, bias=True, groups=total)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList([nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)])

    def forward(self, x):
        pwa, abc = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        dw = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        x = pwa * dw[0]
        for i in range(self.order - 1):
            x = self.pws[i](x) * dw[i + 1]
        return self.proj_out(x)


class Block(nn.Module):
    """HorNet's Block (drop path off: the trunk as evaluated)."""

    def __init__(self, dim: int, order: int, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, data_format="channels_first")
        self.gnconv = GnConv(dim, order)
        self.norm2 = LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.gamma2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.drop_path = nn.Identity()

    def forward(self, x):
        C = x.shape[1]
        gamma1 = self.gamma1.view(C, 1, 1) if self.gamma1 is not None else 1
        x = x + self.drop_path(gamma1 * self.gnconv(self.norm1(x)))
        y = self.pwconv2(self.act(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1)))))
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class HorNetTrunk(nn.Module):
    def __init__(self, depths: Sequence[int] = HORNET_T_DEPTHS, stages=HORNET_T_STAGES, in_chans: int = 3):
        super().__init__()
        dims = [d for d, _, _ in stages]
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm(dims[0], data_format="channels_first"))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(nn.Sequential(LayerNorm(dims[i], data_format="channels_first"),
                                                        nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList([nn.Sequential(*[Block(d, o) for _ in range(n)])
                                     for (d, o, _), n in zip(stages, depths)])

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x


def hornet_t(depths: Sequence[int] = HORNET_T_DEPTHS) -> HorNetTrunk:
    """HorNet-T's trunk (``depths`` smaller for quick runs)."""
    return HorNetTrunk(depths)
