"""The seed's HorNet structures (GUIDE §1, seeds/), rewritten here for the
tests (not copied, and needing no timm): yoloair's per-stage
``HorNet(index, in_chans, depths, dim_base, ...)`` built from ``HorBlock``s
whose token mixer is HorNet's ``gnconv`` (orders 2..5, s = 1/3), with the
channels-first ``HorLayerNorm`` in the stem, the downsampling layers and
each block's norm1; plus a ``GlobalLocalFilter``-like gflayer (depthwise
3x3 on half the channels, a learned FFT filter on the other half) and
helpers that give a model non-trivial parameters.

The module and parameter names are HorNet's, so a state_dict of these is a
HorNet state_dict.
"""

from functools import partial
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# HorNet's LayerNorm, DropPath and Block: resfuse's plain copies (the same
# code, names and forwards as HorNet's). HorBlock's default mixer is an
# order-5 gnconv with s = 1, as the seed's.
from resfuse.hornet import HorBlock, HorLayerNorm  # noqa: F401  (re-exported to the tests)


class GlobalLocalFilter(nn.Module):
    """HorNet's gflayer: pre-norm, then a depthwise 3x3 on the first half of
    the channels and a learned global filter (rfft2 * complex weight,
    irfft2) on the second half, interleaved back, then post-norm."""

    def __init__(self, dim: int, h: int = 14, w: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, bias=False, groups=dim // 2)
        self.complex_weight = nn.Parameter(torch.randn(dim // 2, h, w, 2, dtype=torch.float32) * 0.02)
        self.pre_norm = HorLayerNorm(dim, eps=1e-6, data_format="channels_first")
        self.post_norm = HorLayerNorm(dim, eps=1e-6, data_format="channels_first")

    def forward(self, x):
        x = self.pre_norm(x)
        x1, x2 = torch.chunk(x, 2, dim=1)
        x1 = self.dw(x1)
        x2 = x2.to(torch.float32)
        B, C, a, b = x2.shape
        x2 = torch.fft.rfft2(x2, dim=(2, 3), norm="ortho")
        weight = self.complex_weight
        if weight.shape[1:3] != x2.shape[2:4]:
            weight = F.interpolate(weight.permute(3, 0, 1, 2), size=x2.shape[2:4], mode="bilinear",
                                   align_corners=True).permute(1, 2, 3, 0)
        x2 = x2 * torch.view_as_complex(weight.contiguous())
        x2 = torch.fft.irfft2(x2, s=(a, b), dim=(2, 3), norm="ortho").to(x1.dtype)
        x = torch.cat([x1.unsqueeze(2), x2.unsqueeze(2)], dim=2).reshape(B, 2 * C, a, b)
        return self.post_norm(x)


class gnconv(nn.Module):  # noqa: N801  (HorNet's class name, which the seed uses)
    """Recursive gated convolution of order ``order``: proj_in to 2*dim,
    depthwise 7x7 (or a gflayer) on all but the first dims[0] channels,
    scaled by s; then x = pwa * dw_0 and x = pws[i](x) * dw_{i+1}; proj_out."""

    def __init__(self, dim: int, order: int = 5, gflayer=None, h: int = 14, w: int = 8, s: float = 1.0):
        super().__init__()
        self.order = order
        self.dims = [dim // 2 ** i for i in range(order)][::-1]
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        total = sum(self.dims)
        if gflayer is None:
            self.dwconv = nn.Conv2d(total, total, kernel_size=7, padding=3, bias=True, groups=total)
        else:
            self.dwconv = gflayer(total, h=h, w=w)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList([nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)])
        self.scale = s

    def forward(self, x, mask=None, dummy=False):
        fused = self.proj_in(x)
        pwa, abc = torch.split(fused, (self.dims[0], sum(self.dims)), dim=1)
        dw = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        x = pwa * dw[0]
        for i in range(self.order - 1):
            x = self.pws[i](x) * dw[i + 1]
        return self.proj_out(x)


def default_gnconvs(s: float = 1.0 / 3.0) -> List:
    """The seed's per-stage mixers: orders 2, 3, 4, 5, all with s = 1/3."""
    return [partial(gnconv, order=o, s=s) for o in (2, 3, 4, 5)]


class HorNet(nn.Module):
    """yoloair's HorNet backbone piece: all four downsampling layers and
    stages are built, forward runs only the ``index``-th of each."""

    def __init__(self, index: int, in_chans: int, depths: Sequence[int], dim_base: int, drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, gnconv=None):
        super().__init__()
        dims = [dim_base, dim_base * 2, dim_base * 4, dim_base * 8]
        self.index = index
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            HorLayerNorm(dims[0], eps=1e-6, data_format="channels_first"))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                HorLayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        mixers = default_gnconvs() if gnconv is None else gnconv
        if not isinstance(mixers, list):
            mixers = [mixers] * 4
        assert len(mixers) == 4
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                HorBlock(dims[i], drop_path=rates[cur + j], layer_scale_init_value=layer_scale_init_value,
                         gnconv=mixers[i]) for j in range(depths[i])]))
            cur += depths[i]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.constant_(m.bias, 0)

    def forward(self, x):
        return self.stages[self.index](self.downsample_layers[self.index](x))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter O(1)-scaled random values (convs/linears scaled
    by fan-in, norms and layer scales around +-1, biases N(0, 1)), so that
    no test passes on HorNet's near-zero init (gamma = 1e-6, bias = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2 and leaf == "weight":
                fan_in = p[0].numel()
                if p.dim() == 4 and p.shape[1] == 1:  # depthwise: fan-in is the kernel window
                    fan_in = p.shape[2] * p.shape[3]
                p.copy_(r / fan_in ** 0.5)
            elif leaf in ("gamma1", "gamma2") or (p.dim() == 1 and leaf == "weight"):
                p.copy_((0.5 + 0.5 * torch.rand(p.shape, generator=g)) * torch.where(r < -0.5, -1.0, 1.0))
            else:
                p.copy_(r * 0.5)
    return model
