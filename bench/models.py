"""ResNet-18/50 and VGG16-bn without torchvision (resfuse.models).

Same module tree, names, parameter shapes and forward as torchvision's
``resnet18``, ``resnet50`` and ``vgg16_bn`` (checked against torchvision in
tests/test_bench_model.py where it is importable), so a state_dict loads in
either and ``resfuse.convert`` sees what it would see in a user's model.
The GPU box has no torchvision; ``build(name, prefer_torchvision=True)``
takes torchvision's model when it can be imported. ``make_block(spec)``
builds one residual block (``bench.model.BlockSpec``) the same way.
``make_gnconv`` / ``make_horblock`` build HorNet's gnconv and HorBlock
(HorNet's structure and forward; no timm on the GPU box either).

Weights are random (no download anywhere). ``calibrate_bn`` gives the BN
layers realistic running statistics, so activations stay O(1) through 50
layers in float16 and the eval-mode fold is not an identity.
"""

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from resfuse import models as rf_models
from resfuse.hornet import HorBlock, PlainGnConv  # HorNet's modules: resfuse.hornet holds the one copy

from .archs import RESNET_BLOCKS


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def resnet18(num_classes=1000) -> nn.Module:
    return rf_models.ResNet(rf_models.BasicBlock, RESNET_BLOCKS[18][1], num_classes)


def resnet50(num_classes=1000) -> nn.Module:
    return rf_models.ResNet(rf_models.Bottleneck, RESNET_BLOCKS[50][1], num_classes)


def vgg16_bn(num_classes=1000) -> nn.Module:
    return rf_models.vgg16_bn(num_classes)


BUILDERS: Dict[str, Callable[[], nn.Module]] = {"resnet18": resnet18, "resnet50": resnet50, "vgg16_bn": vgg16_bn}


def torchvision_builder(name: str) -> Optional[Callable[[], nn.Module]]:
    """torchvision.models.<name> (random weights) when torchvision imports."""
    try:
        import torchvision.models as tvm
    except Exception:
        return None
    fn = getattr(tvm, name, None)
    return (lambda: fn(weights=None)) if fn is not None else None


def build(name: str, prefer_torchvision: bool = False) -> nn.Module:
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(BUILDERS)}")
    tv = torchvision_builder(name) if prefer_torchvision else None
    return (tv or BUILDERS[name])()


@torch.no_grad()
def randomize_bn_affine(model: nn.Module, generator: torch.Generator) -> None:
    """gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1): a BN that is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)


@torch.no_grad()
def calibrate_bn(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Set every BN's running statistics to those of `example` (one pass in
    train mode with a cumulative average), then return the model in eval
    mode. Without this, random weights and unit running statistics make a
    ResNet-50's activations grow by orders of magnitude (float16 overflows)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(example)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def build_block(spec) -> nn.Module:
    """The torchvision-layout block a ``bench.model.BlockSpec`` describes
    (``downsample`` = Sequential(1x1 conv with the stride, BN) when the spec
    has a projection shortcut), with ResNet's conv init."""
    cls = {"basic": rf_models.BasicBlock, "bottleneck": rf_models.Bottleneck}[spec.kind]
    downsample = None
    if spec.projection:
        downsample = nn.Sequential(_conv1x1(spec.C, spec.K, spec.stride), nn.BatchNorm2d(spec.K, eps=spec.eps))
    block = cls(spec.C, spec.planes, spec.stride, downsample)
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.eps = spec.eps
    return block


def make_block(spec, *, seed: int = 0, calib_batch: int = 2) -> nn.Module:
    """A reproducible random-weight block with calibrated BN (on a
    N(0, 1) input of the spec's shape), fp32 on CPU, eval."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = build_block(spec)
    randomize_bn_affine(block, gen)
    example = torch.randn(calib_batch, spec.C, spec.H, spec.W, generator=gen)
    return calibrate_bn(block, example)


def make_model(name: str, *, seed: int = 0, image: int = 224, calib_batch: int = 4,
               prefer_torchvision: bool = False) -> nn.Module:
    """A reproducible random-weight model with calibrated BN, fp32 on CPU, eval."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(name, prefer_torchvision)
    randomize_bn_affine(model, gen)
    example = torch.randn(calib_batch, 3, image, image, generator=gen)
    return calibrate_bn(model, example)


# ----------------------------------------------------------------------------
# HorNet's gnconv, plain eager (the GPU box has no timm)
# ----------------------------------------------------------------------------

def make_gnconv(dim: int, order: int, s: float = 1.0, ksize: int = 7, *, seed: int = 0) -> PlainGnConv:
    """A reproducible random-weight PlainGnConv, fp32 on CPU, eval. The
    weights keep every gated product O(1) on an N(0, 1) input (1x1 convs
    std 1/sqrt(fan_in); depthwise std 1/(s ksize), so ``s * dwconv`` is
    O(1)), so an order-5 chain does not shrink to rounding noise and the
    correctness check compares numbers that matter."""
    gen = torch.Generator().manual_seed(seed)
    m = PlainGnConv(dim, order, s, ksize)
    with torch.no_grad():
        for conv in m.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            if conv is m.dwconv:
                std = 1.0 / (s * ksize)
            else:
                std = conv.in_channels ** -0.5
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
    return m.eval()


# ----------------------------------------------------------------------------
# HorNet's HorBlock, plain eager
# ----------------------------------------------------------------------------

def make_horblock(dim: int, order: int, s: float = 1.0, ksize: int = 7, *, seed: int = 0) -> HorBlock:
    """A reproducible random-weight HorBlock (drop_path 0), fp32 on CPU,
    eval. Its gnconv is ``make_gnconv``'s (O(1) gated products); the
    Linears have std 1/sqrt(fan_in) and N(0, 0.1) biases; the LayerNorms'
    weights are U(0.5, 1.5) and biases N(0, 0.1); gamma1 and gamma2 (the
    layer scales) are U(0.5, 1.0) with random signs, O(1) and not HorNet's
    1e-6 init, so both branches count in the output and the check compares
    numbers that matter."""
    gen = torch.Generator().manual_seed(seed + 7919)
    blk = HorBlock(dim, gnconv=lambda d: make_gnconv(d, order, s, ksize, seed=seed))
    with torch.no_grad():
        for lin in (blk.pwconv1, blk.pwconv2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * lin.in_features ** -0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)
        for ln in (blk.norm1, blk.norm2):
            ln.weight.copy_(torch.rand(dim, generator=gen) + 0.5)
            ln.bias.copy_(torch.randn(dim, generator=gen) * 0.1)
        for gamma in (blk.gamma1, blk.gamma2):
            sign = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
            gamma.copy_((0.5 + 0.5 * torch.rand(dim, generator=gen)) * sign)
    return blk.eval()
