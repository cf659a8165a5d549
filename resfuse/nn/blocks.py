"""Fused ResNet blocks: ``BasicBlock`` (2 kernels in eval) and
``Bottleneck`` (3 kernels in eval), drop-in for torchvision's, timm's and
look-alike blocks (proven by ``resfuse.recognize.blocks``).

A fused block keeps the original block's children under their original
names, so its state_dict is the original's. In eval (every BN on running
statistics) each conv -> BN -> act is one kernel; the last kernel also adds
the shortcut: the block input (identity), a 1x1 conv + BN projection
computed inside the same kernel as a second accumulation over the strided
input (its output never touches memory), or any other downsample module's
output read in the epilogue. Otherwise (train mode) it runs the original
block class's own forward, so training semantics are exactly the original's.
"""

from typing import Optional

import torch.nn as nn

from .. import models as _reference_blocks
from ._call import FusedModuleMixin, adopt, fused_conv_bn
from ._provers import prove
from .guards import any_hooks, bn_uses_running_stats

class FusedResidualBlock(FusedModuleMixin, nn.Module):
    """Base of the fused blocks. Attributes: ``backend``, ``spec`` (the
    matched structure), ``last_decisions`` (conv name -> what ran)."""

    _n_stages = None  # set by subclasses

    def _init_fused(self, spec, source_cls: type, backend: str) -> None:
        if len(spec.stages) != self._n_stages:
            raise ValueError(f"{type(self).__name__} needs {self._n_stages} conv stages, the block has "
                             f"{len(spec.stages)}; use resfuse.nn.fuse_block() to pick the class")
        self.spec = spec
        self._source_cls = source_cls
        self.backend = backend  # also resets last_decisions


    @classmethod
    def from_module(cls, block: nn.Module, backend: str = "auto") -> "FusedResidualBlock":
        """A fused block sharing `block`'s children, parameters, buffers and
        hooks. Raises ValueError with the reason if `block` does not match."""
        spec = prove("residual_block", block, forward_of=getattr(block, "_source_cls", None))
        if isinstance(spec, str):
            raise ValueError(f"{cls.__name__}.from_module: {type(block).__name__} is not a fusable residual "
                             f"block: {spec}")
        self = adopt(cls, block)
        src = type(block)
        for attr in ("expansion",):
            if hasattr(src, attr) and attr not in self.__dict__:
                self.__dict__[attr] = getattr(src, attr)
        if isinstance(block, FusedResidualBlock):
            src = block._source_cls
        self._init_fused(spec, src, backend)
        return self

    def _fusable_now(self) -> bool:
        mods, spec = self._modules, self.spec
        for st in spec.stages:
            if not bn_uses_running_stats(mods[st.bn]):
                return False
        members = [m for n, m in mods.items() if m is not None and n != spec.downsample]
        if spec.shortcut == "projection":
            down = mods[spec.downsample]
            if not bn_uses_running_stats(down[1]):
                return False
            members += down.modules()
        # A hook on any member would not fire inside a fused kernel: run as
        # the original then (the same check convert made, kept live).
        if any_hooks(members):
            return False
        # drop_path / drop_block are the identity only in eval
        for name in ("drop_path", "drop_block"):
            m = mods.get(name)
            if m is not None and m.training:
                return False
        return True

    def forward(self, x):
        if not self._fusable_now():
            return self._source_cls.forward(self, x)
        mods, spec, record = self._modules, self.spec, self.last_decisions
        h = x
        for st in spec.stages[:-1]:
            h, d = fused_conv_bn(h, mods[st.conv], mods[st.bn], st.activation, self._backend,
                                 act_module=mods[st.act])
            if d is not None:
                record[st.conv] = d
        last = spec.stages[-1]
        conv, bn, act = mods[last.conv], mods[last.bn], mods[spec.out_act]
        if spec.shortcut == "identity":
            y, d = fused_conv_bn(h, conv, bn, spec.out_activation, self._backend, residual=x, act_module=act)
        elif spec.shortcut == "projection":
            ds = mods[spec.downsample]
            y, d = fused_conv_bn(h, conv, bn, spec.out_activation, self._backend, shortcut=(x, ds[0], ds[1]),
                                 act_module=act)
        else:
            y, d = fused_conv_bn(h, conv, bn, spec.out_activation, self._backend,
                                 residual=mods[spec.downsample](x), act_module=act)
        if d is not None:
            record[last.conv] = d
        return y

    def extra_repr(self) -> str:
        return f"backend={self._backend!r}, shortcut={self.spec.shortcut!r}"


class BasicBlock(FusedResidualBlock):
    """conv3x3-BN-act, conv3x3-BN + shortcut - act: 2 kernels in eval.

    ``BasicBlock(inplanes, planes, stride=1, downsample=None)`` builds
    torchvision's layout; ``BasicBlock.from_module(block)`` wraps an
    existing block."""

    _n_stages = 2
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 backend: str = "auto"):
        super().__init__()
        ref = _reference_blocks.BasicBlock(inplanes, planes, stride, downsample)
        self.__dict__.update({k: v for k, v in ref.__dict__.items()})
        self._init_fused(prove("residual_block", ref), _reference_blocks.BasicBlock, backend)


class Bottleneck(FusedResidualBlock):
    """1x1-BN-act, 3x3-BN-act, 1x1-BN + shortcut - act: 3 kernels in eval.

    ``Bottleneck(inplanes, planes, stride=1, downsample=None)`` builds
    torchvision's layout (stride on the 3x3); ``from_module`` wraps any
    matching block (the seed's ResDown strides its first 1x1)."""

    _n_stages = 3
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 backend: str = "auto"):
        super().__init__()
        ref = _reference_blocks.Bottleneck(inplanes, planes, stride, downsample)
        self.__dict__.update({k: v for k, v in ref.__dict__.items()})
        self._init_fused(prove("residual_block", ref), _reference_blocks.Bottleneck, backend)


def fuse_block(block: nn.Module, backend: str = "auto") -> FusedResidualBlock:
    """BasicBlock or Bottleneck (by the number of convs) wrapping `block`."""
    spec = prove("residual_block", block, forward_of=getattr(block, "_source_cls", None))
    if isinstance(spec, str):
        raise ValueError(f"fuse_block: {type(block).__name__} is not a fusable residual block: {spec}")
    cls = BasicBlock if len(spec.stages) == 2 else Bottleneck
    return cls.from_module(block, backend)
