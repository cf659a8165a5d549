"""The structures of the user's document (GUIDE §1, seeds/) that resfuse
must handle, rewritten here for the tests (not copied): the ``Downsample``
projection shortcut, ``ResidualLayer`` (a BasicBlock whose convs keep their
bias), a small ``ResNet`` built by ``_make_layer``, and ``BackboneVGG``
(vgg16_bn features split into body1..body4). Plus helpers that give a model
non-default BatchNorm state, so that a test can never pass on mean 0 / var 1.
"""

from functools import lru_cache
from typing import List, Sequence

import torch
import torch.nn as nn


def downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """The seed's projection shortcut: 1x1 strided conv (no bias) -> BN."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResidualLayer(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the identity or
    ``downsample(x)``, then ReLU. As in the seed the convs keep their bias
    and the block's modules are attributes, not an nn.Sequential."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)


class ResNet(nn.Module):
    """torchvision-style ResNet as the seed writes it (stem conv7x7/2 ->
    BN -> ReLU -> maxpool, four ``_make_layer`` stages, optional head),
    with configurable widths so the tests stay small."""

    def __init__(self, block=ResidualLayer, blocks_num: Sequence[int] = (1, 1, 1, 1),
                 widths: Sequence[int] = (8, 16, 24, 32), num_classes: int = 10,
                 include_top: bool = True):
        super().__init__()
        self.include_top = include_top
        self.in_channel = widths[0]
        self.conv1 = nn.Conv2d(3, self.in_channel, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.in_channel)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], blocks_num[0])
        self.layer2 = self._make_layer(block, widths[1], blocks_num[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], blocks_num[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], blocks_num[3], stride=2)
        if include_top:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, channel: int, block_num: int, stride: int = 1) -> nn.Sequential:
        shortcut = None
        if stride != 1 or self.in_channel != channel * block.expansion:
            shortcut = downsample(self.in_channel, channel * block.expansion, stride)
        layers = [block(self.in_channel, channel, stride=stride, downsample=shortcut)]
        self.in_channel = channel * block.expansion
        layers += [block(self.in_channel, channel) for _ in range(1, block_num)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.include_top:
            x = self.fc(torch.flatten(self.avgpool(x), 1))
        return x


class BackboneVGG(nn.Module):
    """The seed's Backbone_VGG for vgg16_bn with intermediate outputs:
    ``features`` split into body1..body4 (children [:13], [13:23], [23:33],
    [33:43]); forward returns the four feature maps. Random weights (the
    seed loads pretrained ones; no network here). ``features[43]`` (the last
    max-pool) is left out, as in the seed."""

    def __init__(self):
        super().__init__()
        features = list(vgg16_bn_features().children())
        self.body1 = nn.Sequential(*features[:13])
        self.body2 = nn.Sequential(*features[13:23])
        self.body3 = nn.Sequential(*features[23:33])
        self.body4 = nn.Sequential(*features[33:43])
        self.num_channels = 256

    def forward(self, x) -> List[torch.Tensor]:
        out = []
        for body in (self.body1, self.body2, self.body3, self.body4):
            x = body(x)
            out.append(x)
        return out


# vgg16 ("D"): channels per 3x3 conv, "M" = 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_bn_features_local() -> nn.Sequential:
    """The same modules, order and initialization as torchvision's
    vgg16_bn features, for machines without torchvision (the GPU box)."""
    layers, cin = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(cin, v, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        cin = v
    return nn.Sequential(*layers)


@lru_cache(maxsize=1)
def _vgg16_bn_features_template() -> nn.Sequential:
    try:
        import torchvision
    except ImportError:
        return _vgg16_bn_features_local()
    # Building vgg16_bn initializes its 120M-parameter classifier too (seconds
    # on two cores); the tests need only the features, so build them once.
    return torchvision.models.vgg16_bn(weights=None).features


def vgg16_bn_features() -> nn.Sequential:
    """``torchvision.models.vgg16_bn(weights=None).features`` (a fresh copy;
    an identical local build where torchvision is not installed)."""
    import copy

    return copy.deepcopy(_vgg16_bn_features_template())


@torch.no_grad()
def randomize_bn(model: nn.Module, generator: torch.Generator, calibrate_with=None) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters.

    With `calibrate_with` (an input batch) the running statistics are first
    measured on it (cumulative average, as after a real training run) so a
    deep model's activations stay O(1); then every statistic and parameter
    is perturbed randomly. Returns `model` in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if calibrate_with is not None:
        saved = [(m, m.momentum) for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model(calibrate_with)
        for m, momentum in saved:
            m.momentum = momentum

    def rand(shape, lo, hi):
        return torch.rand(shape, generator=generator) * (hi - lo) + lo

    for m in bns:
        n = m.num_features
        if m.track_running_stats and calibrate_with is None:
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
            m.running_var.copy_(rand(n, 0.5, 2.0))
        elif m.track_running_stats:
            m.running_mean.add_(torch.randn(n, generator=generator) * 0.05 * m.running_var.sqrt())
            m.running_var.mul_(rand(n, 0.8, 1.25))
        if m.track_running_stats:
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
        if m.affine:
            m.weight.copy_(rand(n, 0.5, 1.5))
            m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()



def float64_reference(model: nn.Module, *inputs):
    """The float64 oracle: an eval-mode float64 copy of the *plain* `model`
    run on the inputs upcast to float64."""
    import copy

    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return ref(*[t.detach().double() for t in inputs])
