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

Only valid where the owner's forward feeds conv -> bn directly; which
chains those are is recognition's to prove (``resfuse.recognize``: the
ResNet stem in ``recognize.stem``, conv -> BN heads in ``recognize.heads``,
BN -> act -> conv prologues in ``recognize.prologues``), and this module
only provides the in-place fused classes.
"""

from typing import Optional

import torch.nn as nn

from ..activations import get_activation
from .guards import any_hooks, bn_uses_running_stats
from ._call import InPlaceBackendMixin, fused_conv_bn

def head_fuses(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """Whether the head applies the BN now. ConvBNHead and FoldedBatchNorm2d
    both ask this, so the BN is applied exactly once: fused while the BN
    uses running statistics and neither module (nor a BN's own act/drop)
    has hooks (a hook must see the module really run)."""
    return bn_uses_running_stats(bn) and not any_hooks((conv, bn, *bn._modules.values()))  # + BatchNormAct2d's act/drop


def prologue_fuses(conv: nn.Conv2d) -> bool:
    """Whether the conv applies its input BN and activation (its prologue)
    now: as head_fuses, and the activation module has no hooks either."""
    bn = conv.__dict__.get("_pre_bn")
    if bn is None or not head_fuses(conv, bn):
        return False
    act = conv.__dict__.get("_pre_act")
    return act is None or not any_hooks((act,))


def bn_folded(bn: nn.Module) -> bool:
    """Whether the conv this folded BN belongs to applies it now (as its
    epilogue or its prologue)."""
    conv = bn.__dict__["_head_conv"]
    return prologue_fuses(conv) if conv.__dict__.get("_pre_bn") is bn else head_fuses(conv, bn)


class ConvBNHead(InPlaceBackendMixin, nn.Conv2d):
    """A Conv2d that also applies the following BN (and an idempotent
    activation) while that BN uses running statistics, and/or (the
    prologue) the BN and activation before it, while that BN does."""

    def forward(self, x):
        d = self.__dict__
        bn = d["_fused_bn"]
        post = bn is not None and head_fuses(self, bn)
        pre = prologue_fuses(self)
        if not (pre or post):
            return nn.Conv2d.forward(self, x)
        act_module = getattr(bn, "act", None) if post and bn.__dict__["_act_fused"] else None
        y, decision = fused_conv_bn(x, self, bn if post else None, d["_fused_activation"] if post else "identity",
                                    d["_backend"], act_module=act_module,
                                    prologue=(d["_pre_bn"], d["_pre_activation"], d["_pre_act"]) if pre else None)
        if decision is not None:
            d["last_decision"] = decision
        return y

    @property
    def fused_bn(self) -> Optional[nn.Module]:
        """The BN after the conv it applies (None: only a prologue)."""
        return self.__dict__["_fused_bn"]

    @property
    def fused_activation(self) -> str:
        return self.__dict__["_fused_activation"]

    @property
    def pre_bn(self) -> Optional[nn.Module]:
        """The BN before the conv it applies (None: no prologue)."""
        return self.__dict__.get("_pre_bn")

    @property
    def pre_activation(self) -> str:
        return self.__dict__.get("_pre_activation", "identity")

    @property
    def fuses_now(self) -> bool:
        """Whether a fused kernel runs on the next call (in eval, no hooks)."""
        bn = self.fused_bn
        return prologue_fuses(self) or (bn is not None and head_fuses(self, bn))

    @property
    def label(self) -> str:
        """'stem' (a ResNet stem), 'head' (a conv -> BN chain of another
        forward) or 'preact' (only a BN -> act -> conv prologue)."""
        return self.__dict__.get("_label", "stem")


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d already applied by the ConvBNHead before it while it
    uses running statistics (then forward is the identity)."""

    def forward(self, x):
        if bn_folded(self):
            return x
        return nn.BatchNorm2d.forward(self, x)


def _new_folded(kind: str, base: type) -> nn.Module:
    """Unpickling: an empty instance of the folded class of `base` (the
    classes are made on demand, so a fresh process has them only after
    this makes them)."""
    cls = (_folded_bn_act_class if kind == "bn_act" else _folded_act_class)(base)
    return cls.__new__(cls)


def _folded_type(name: str, base: type, kind: str, forward, doc: str) -> type:
    def __reduce_ex__(self, protocol):
        return _new_folded, (kind, base), self.__getstate__()
    folded = type(name, (base,), {"forward": forward, "__reduce_ex__": __reduce_ex__, "__module__": __name__,
                                  "__qualname__": name, "__doc__": doc})
    return folded


_FOLDED_BN_ACT = {}


def _folded_bn_act_class(cls: type) -> type:
    """A subclass of timm's BatchNormAct2d (BN, then its ``drop`` and ``act``
    children) that, while its ConvBNHead applies the BN, applies only what
    the head did not: nothing when the head fused the activation, else
    act(drop(x))."""
    if cls not in _FOLDED_BN_ACT:
        def forward(self, x):
            if bn_folded(self):
                return x if self.__dict__["_act_fused"] else self.act(self.drop(x))
            return cls.forward(self, x)
        _FOLDED_BN_ACT[cls] = _folded_type("Folded" + cls.__name__, cls, "bn_act", forward,
                                           _folded_bn_act_class.__doc__)
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


_FOLDED_ACT = {}


def _folded_act_class(cls: type) -> type:
    """A subclass of activation class `cls` that is the identity while the
    conv after it applies it as its prologue (else `cls`'s forward)."""
    if cls not in _FOLDED_ACT:
        def forward(self, x):
            if prologue_fuses(self.__dict__["_prologue_of"]):
                return x
            return cls.forward(self, x)
        _FOLDED_ACT[cls] = _folded_type("Folded" + cls.__name__, cls, "act", forward, _folded_act_class.__doc__)
    return _FOLDED_ACT[cls]


def fuse_prologue(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Optional[nn.Module], activation: str,
                  backend: str = "auto") -> None:
    """Make `conv` (in place; a Conv2d or already a ConvBNHead) apply
    act(bn(.)) to its input (the ``bn_act_conv`` prologue) and `bn` (a
    BatchNorm2d, or timm's BatchNormAct2d whose own act is `activation`)
    and the activation module `act` (or None) the identity while it does."""
    if type(conv) is nn.Conv2d:
        conv.__class__ = ConvBNHead
        conv.__dict__.update(_fused_bn=None, _fused_activation="identity", _label="preact")
        conv.backend = backend
    elif type(conv) is not ConvBNHead or conv.pre_bn is not None:
        raise ValueError("fuse_prologue needs an nn.Conv2d or a ConvBNHead without a prologue")
    bn_act = type(bn) is not nn.BatchNorm2d
    conv.__dict__.update(_pre_bn=bn, _pre_act=bn.act if bn_act else act, _pre_activation=activation)
    bn.__class__ = _folded_bn_act_class(type(bn)) if bn_act else FoldedBatchNorm2d
    bn.__dict__["_head_conv"] = conv
    bn.__dict__["_act_fused"] = True
    if act is not None and type(act) is not nn.Identity:
        act.__class__ = _folded_act_class(type(act))
        act.__dict__["_prologue_of"] = conv
