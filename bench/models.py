"""ResNet-18/50 and VGG16-bn without torchvision (resfuse.models).

Same module tree, names, parameter shapes and forward as torchvision's
``resnet18``, ``resnet50`` and ``vgg16_bn`` (checked against torchvision in
tests/test_bench_model.py where it is importable), so a state_dict loads in
either and ``resfuse.convert`` sees what it would see in a user's model.
The GPU box has no torchvision; ``build(name, prefer_torchvision=True)``
takes torchvision's model when it can be imported. ``make_block(spec)``
builds one residual block (``bench.model.BlockSpec``) the same way.

Weights are random (no download anywhere). ``calibrate_bn`` gives the BN
layers realistic running statistics, so activations stay O(1) through 50
layers in float16 and the eval-mode fold is not an identity.
"""

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from resfuse import models as rf_models

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
