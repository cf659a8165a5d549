"""Fusing a conv -> BN -> ReLU whose modules are attributes of a larger
module (the ResNet stem: ``conv1``, ``bn1``, ``relu``/``act1`` of the model),
without moving any parameter.

The Conv2d becomes a ``ConvBNHead`` (a Conv2d subclass: same parameters and
keys) that, while its BN uses running statistics, applies that BN and the
activation in its own kernel; the BN becomes a ``FoldedBatchNorm2d`` (a
BatchNorm2d subclass: same keys) that is then the identity, since its
transform was already applied. The activation module stays and runs on an
already-activated tensor, so only idempotent activations (ReLU, ReLU6) are
fused into the head; others stay after it. In train mode both behave as
plain Conv2d and BatchNorm2d.

Only valid where the owner's forward feeds conv -> bn directly, as in
torchvision's, timm's and the seed's ResNet; ``convert`` applies it to
modules with that structure (conv1, bn1 and layer1 children).
"""

from typing import Optional

import torch.nn as nn

from .. import dispatch
from ..patterns import bn_uses_running_stats
from ._call import fused_conv_bn

IDEMPOTENT = ("relu", "relu6", "identity")


class ConvBNHead(nn.Conv2d):
    """A Conv2d that also applies the following BN (and an idempotent
    activation) while that BN uses running statistics."""

    def forward(self, x):
        bn = self.__dict__["_fused_bn"]
        if bn_uses_running_stats(bn):
            y, d = fused_conv_bn(x, self, bn, self.__dict__["_fused_activation"], self.__dict__["_backend"])
            if d is not None:
                self.__dict__["last_decision"] = d
            return y
        return nn.Conv2d.forward(self, x)

    @property
    def backend(self) -> str:
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, value: str) -> None:
        self.__dict__["_backend"] = dispatch.validate_backend(value)

    @property
    def fused_bn(self) -> nn.Module:
        return self.__dict__["_fused_bn"]

    @property
    def fused_activation(self) -> str:
        return self.__dict__["_fused_activation"]


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d already applied by the ConvBNHead before it while it
    uses running statistics (then forward is the identity)."""

    def forward(self, x):
        if bn_uses_running_stats(self):
            return x
        return nn.BatchNorm2d.forward(self, x)


def fuse_head(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str], backend: str = "auto") -> None:
    """Turn `conv`/`bn` (in place, same objects) into ConvBNHead /
    FoldedBatchNorm2d. `activation` is fused only if idempotent."""
    if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:
        raise ValueError("fuse_head needs an exact nn.Conv2d and nn.BatchNorm2d")
    conv.__class__ = ConvBNHead
    conv.__dict__["_fused_bn"] = bn  # not registered: bn stays where it is in the tree
    conv.__dict__["_fused_activation"] = activation if activation in IDEMPOTENT else "identity"
    conv.backend = backend
    bn.__class__ = FoldedBatchNorm2d
