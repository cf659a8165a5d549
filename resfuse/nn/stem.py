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
modules with that structure (conv1, bn1 and layer1 children) whose traced
forward (``recognize.dataflow.chain_reason``) shows conv1's output read by
bn1 alone, and the activation's only when bn1's output feeds it alone.
"""

from typing import Optional

import torch.nn as nn

from .. import dispatch
from ..activations import get_activation
from ..patterns import bn_uses_running_stats, hooks_reason
from ._call import fused_conv_bn

def head_fuses(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """Whether the head applies the BN now. ConvBNHead and FoldedBatchNorm2d
    both ask this, so the BN is applied exactly once: fused while the BN
    uses running statistics and neither module (nor a BN's own act/drop)
    has hooks (a hook must see the module really run)."""
    return bn_uses_running_stats(bn) and not hooks_reason(conv, "conv") and not hooks_reason(bn, "bn") and \
        not any(hooks_reason(m, "bn") for m in bn._modules.values())  # a BatchNormAct2d's act/drop


class ConvBNHead(nn.Conv2d):
    """A Conv2d that also applies the following BN (and an idempotent
    activation) while that BN uses running statistics."""

    def forward(self, x):
        bn = self.__dict__["_fused_bn"]
        if head_fuses(self, bn):
            y, d = fused_conv_bn(x, self, bn, self.__dict__["_fused_activation"], self.__dict__["_backend"],
                                 act_module=getattr(bn, "act", None) if bn.__dict__["_act_fused"] else None)
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

    @property
    def label(self) -> str:
        """'stem' (a ResNet stem) or 'head' (a conv -> BN chain of another forward)."""
        return self.__dict__.get("_label", "stem")


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d already applied by the ConvBNHead before it while it
    uses running statistics (then forward is the identity)."""

    def forward(self, x):
        if head_fuses(self.__dict__["_head_conv"], self):
            return x
        return nn.BatchNorm2d.forward(self, x)


_FOLDED_BN_ACT = {}


def _folded_bn_act_class(cls: type) -> type:
    """A subclass of timm's BatchNormAct2d (BN, then its ``drop`` and ``act``
    children) that, while its ConvBNHead applies the BN, applies only what
    the head did not: nothing when the head fused the activation, else
    act(drop(x))."""
    if cls not in _FOLDED_BN_ACT:
        def forward(self, x):
            if head_fuses(self.__dict__["_head_conv"], self):
                return x if self.__dict__["_act_fused"] else self.act(self.drop(x))
            return cls.forward(self, x)
        name = "Folded" + cls.__name__
        folded = type(name, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": name,
                                     "__doc__": _folded_bn_act_class.__doc__})
        globals()[name] = folded  # so torch.save / pickle find it by name
        _FOLDED_BN_ACT[cls] = folded
    return _FOLDED_BN_ACT[cls]


def fuse_head(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str], backend: str = "auto",
              label: str = "stem", bn_act: bool = False) -> None:
    """Turn `conv`/`bn` (in place, same objects) into ConvBNHead /
    FoldedBatchNorm2d. For a plain BN the `activation` (the module after
    it) is fused only if idempotent; with ``bn_act`` the BN is timm's
    BatchNormAct2d and `activation` is its own act, fused whatever it is.
    `label`: how explain names the head ('stem', 'head')."""
    if type(conv) is not nn.Conv2d or (type(bn) is not nn.BatchNorm2d and not bn_act):
        raise ValueError("fuse_head needs an exact nn.Conv2d and nn.BatchNorm2d (or timm's BatchNormAct2d)")
    if not bn_act:
        activation = activation if activation and get_activation(activation).idempotent else "identity"
    conv.__class__ = ConvBNHead
    conv.__dict__["_fused_bn"] = bn  # not registered: bn stays where it is in the tree
    conv.__dict__["_fused_activation"] = activation or "identity"
    conv.__dict__["_label"] = label
    conv.backend = backend
    bn.__class__ = _folded_bn_act_class(type(bn)) if bn_act else FoldedBatchNorm2d
    bn.__dict__["_head_conv"] = conv  # not registered either
    bn.__dict__["_act_fused"] = (activation or "identity") != "identity"


def stem_parts(owner: nn.Module):
    """(conv, bn, activation name or None) of a ResNet-style stem owned by
    `owner` (children conv1, bn1, relu/act1 and layer1), or a str reason.
    conv1 may be a Sequential (timm's deep stem) ending in a Conv2d."""
    ch = owner._modules
    if "conv1" not in ch or "bn1" not in ch or "layer1" not in ch:
        return "not a ResNet-style stem (conv1, bn1, layer1)"
    conv, bn = ch["conv1"], ch["bn1"]
    if isinstance(conv, nn.Sequential) and len(conv) and type(conv[-1]) in (nn.Conv2d, ConvBNHead):
        conv = conv[-1]
    if type(conv) not in (nn.Conv2d, ConvBNHead):
        return f"conv1 is {type(conv).__name__}"
    if type(bn) not in (nn.BatchNorm2d, FoldedBatchNorm2d):
        return f"bn1 is {type(bn).__name__}, not BatchNorm2d"
    if isinstance(conv, ConvBNHead):
        return conv, bn, conv.fused_activation
    from ..patterns import bn_reason, conv_reason
    why = conv_reason(conv) or bn_reason(bn, conv)
    if why:
        return why
    from ..activations import activation_of_module
    from ..recognize.dataflow import chain_reason, trace
    hooked = hooks_reason(ch["conv1"], "conv1") or hooks_reason(owner, type(owner).__name__)
    if hooked:
        return hooked
    # The owner's forward must feed conv1 -> bn1 alone (bn1's output is the
    # head's). The activation is fused only if bn1's output feeds it alone.
    graph = trace(owner)
    why = graph if isinstance(graph, str) else chain_reason(graph, ("conv1", "bn1"))
    if why:
        return f"{type(owner).__name__}.forward: {why}"
    act_name = "relu" if "relu" in ch else "act1"
    act_mod = ch.get(act_name)
    activation = activation_of_module(act_mod) if act_mod is not None else None
    if activation is not None and chain_reason(graph, ("conv1", "bn1", act_name)):
        activation = None
    return conv, bn, activation


def convert_stems(model: nn.Module, backend: str) -> None:
    """Fuse the stem conv -> bn1 (-> ReLU) of every ResNet-style module."""
    for owner in list(model.modules()):
        parts = stem_parts(owner)
        if isinstance(parts, str):
            continue
        conv, bn, activation = parts
        if isinstance(conv, ConvBNHead):
            conv.backend = backend
        else:
            fuse_head(conv, bn, activation, backend)
