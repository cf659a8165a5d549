"""Drop-in modules for Conv2d -> BatchNorm2d (-> activation).

``FusedSequential`` is an ``nn.Sequential`` with the same children under
the same names (so ``state_dict`` keys are unchanged) that runs each
Conv2d -> BN (-> activation) run of its children as one fused op when the
BN uses running statistics (eval), and its children one by one otherwise
(train), which is then exactly what ``nn.Sequential`` computes.

``ConvBNAct`` is a FusedSequential of exactly (conv, bn[, act]): a drop-in
for ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)`` and for a conv/bn pair.
``BNActConv`` is the pre-activation layer ``nn.Sequential(BatchNorm2d,
ReLU, Conv2d)`` with the BN and activation as the conv's prologue.
"""

from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn

from ..activations import ACTIVATIONS, activation_of_module
from ._call import FusedModuleMixin, fused_conv_bn
from .guards import bn_reason, bn_uses_running_stats, conv_reason, hooks_reason
from .stem import fuse_prologue

_ACT_MODULES = {   # the module ConvBNAct(activation=name) builds, from its negative_slope
    "identity": None,
    "relu": lambda slope: nn.ReLU(),
    "relu6": lambda slope: nn.ReLU6(),
    "silu": lambda slope: nn.SiLU(),
    "gelu": lambda slope: nn.GELU(),
    "leaky_relu": lambda slope: nn.LeakyReLU(slope),
    "hardswish": lambda slope: nn.Hardswish(),
    "hardsigmoid": lambda slope: nn.Hardsigmoid(),
    "gelu_tanh": lambda slope: nn.GELU(approximate="tanh"),
}
assert set(_ACT_MODULES) == set(ACTIVATIONS), "every fused activation needs a module"


# ----------------------------------------------------------------------------
# The plan: how a Sequential's children run (recomputed by FusedSequential at
# every call, so a changed child is never run with a stale plan; convert uses
# it to decide which Sequentials to make FusedSequentials)
# ----------------------------------------------------------------------------

class FusedGroup(NamedTuple):
    """A Conv2d -> BN (-> activation) run inside a Sequential, by child name
    (a NamedTuple: made at every call, see ``plan_sequential``)."""
    conv: str
    bn: str
    act: Optional[str]
    activation: str

    @property
    def kind(self) -> str:
        return "conv+bn" + ("" if self.activation == "identity" and self.act is None
                            else f"+{self.activation}")


class Plan(NamedTuple):
    """How a Sequential runs: fused groups and single modules, in order."""
    steps: tuple  # of FusedGroup | str (a child name run as is)
    unfused: Dict[str, str]  # conv child name -> why it is not fused


def plan_sequential(seq: nn.Sequential) -> Plan:
    names: List[str] = list(seq._modules.keys())
    mods = [seq._modules[n] for n in names]
    steps, unfused = [], {}
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Conv2d):
            why = conv_reason(m) or bn_reason(mods[i + 1] if i + 1 < len(mods) else None, m)
            if why is None:
                act_mod = mods[i + 2] if i + 2 < len(mods) else None
                act = (activation_of_module(act_mod)
                       if act_mod is not None and hooks_reason(act_mod, "activation") is None else None)
                if act_mod is not None and act is not None:
                    steps.append(FusedGroup(names[i], names[i + 1], names[i + 2], act))
                    i += 3
                else:
                    steps.append(FusedGroup(names[i], names[i + 1], None, "identity"))
                    i += 2
                continue
            unfused[names[i]] = why
        steps.append(names[i])
        i += 1
    return Plan(tuple(steps), unfused)


def is_plain_sequential(m: nn.Module) -> bool:
    """An nn.Sequential whose forward is Sequential's own."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class FusedSequential(FusedModuleMixin, nn.Sequential):
    """``nn.Sequential`` that fuses its Conv2d -> BN (-> act) runs.

    Attributes:
        backend: 'auto' | 'triton' | 'cuda' | 'eager' (not saved in state_dict).
        last_decisions: conv child name -> ``dispatch.Decision`` of its last
            eager-mode call (what actually ran, and why others did not).
    """

    def __init__(self, *args, backend: str = "auto"):
        super().__init__(*args)
        self._init_fused(backend)

    def _init_fused(self, backend: str) -> None:
        self.backend = backend  # also resets last_decisions


    @classmethod
    def from_sequential(cls, seq: nn.Sequential, backend: str = "auto") -> "FusedSequential":
        """Turn `seq` itself into a FusedSequential (same object, children,
        hooks and flags; only its class changes). A subclass of
        nn.Sequential (torchvision's Conv2dNormActivation, say) becomes a
        subclass of both, so isinstance checks and its methods still work."""
        seq.__class__ = fused_class(type(seq))
        seq._init_fused(backend)
        return seq

    def __reduce_ex__(self, protocol):
        # A class made by fused_class is not importable by name; pickle
        # (torch.save of a whole model) rebuilds it from the original class.
        cls = type(self)
        base = _FUSED_BASE.get(cls)
        if base is None:
            return super().__reduce_ex__(protocol)
        return _new_fused, (base,), self.__getstate__()

    def plan(self) -> Plan:
        """The fusion plan for the children as they are now.

        Recomputed at every call (tens of microseconds for all of
        vgg16_bn.features): it depends on the children and on attributes
        of theirs (padding_mode, hooks, an activation's parameters, ...)
        that can change after conversion, and a stale plan would compute
        the wrong function silently. Under torch.compile it is traced, and
        dynamo guards on what it reads."""
        return plan_sequential(self)

    def forward(self, x):
        for step in self.plan().steps:
            if type(step) is FusedGroup:
                bn = self._modules[step.bn]
                if bn_uses_running_stats(bn):
                    x = self._run_fused(step, x)
                    continue
                x = self._modules[step.conv](x)
                x = bn(x)
                if step.act is not None:
                    x = self._modules[step.act](x)
            else:
                x = self._modules[step](x)
        return x

    def _run_fused(self, group: FusedGroup, x):
        y, decision = fused_conv_bn(x, self._modules[group.conv], self._modules[group.bn], group.activation,
                                    self._backend, act_module=self._modules.get(group.act) if group.act else None)
        if decision is not None:
            self.last_decisions[group.conv] = decision
        return y

    def extra_repr(self) -> str:
        return f"backend={self._backend!r}"


_FUSED_CLASSES: Dict[type, type] = {nn.Sequential: FusedSequential}
_FUSED_BASE: Dict[type, type] = {}


def fused_class(seq_cls: type) -> type:
    """FusedSequential for nn.Sequential; for a subclass of nn.Sequential
    that keeps Sequential's forward, a class deriving from both."""
    if issubclass(seq_cls, FusedSequential):
        return seq_cls
    cls = _FUSED_CLASSES.get(seq_cls)
    if cls is None:
        cls = type(f"Fused{seq_cls.__name__}", (FusedSequential, seq_cls),
                   {"__module__": __name__, "__doc__": f"{seq_cls.__name__}, fused by resfuse.convert."})
        _FUSED_CLASSES[seq_cls], _FUSED_BASE[cls] = cls, seq_cls
    return cls


def _new_fused(seq_cls: type) -> FusedSequential:
    """Unpickling: an empty instance of fused_class(seq_cls); pickle then
    restores its __dict__ through nn.Module.__setstate__."""
    cls = fused_class(seq_cls)
    return cls.__new__(cls)


class ConvBNAct(FusedSequential):
    """Conv2d -> BatchNorm2d (-> activation), fused in eval mode.

    Children are ``0`` (Conv2d), ``1`` (BatchNorm2d) and, with an
    activation, ``2`` (``activation="leaky_relu"`` builds ``nn.LeakyReLU(negative_slope)``;
    the fused call reads the slope from that module each time): the state_dict keys of
    ``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...), nn.ReLU())``.
    In train mode it computes exactly what that Sequential computes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, activation: str = "relu",
                 negative_slope: float = 0.01, eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None, dtype=None,
                 backend: str = "auto"):
        if activation not in _ACT_MODULES:
            raise ValueError(f"activation must be one of {sorted(_ACT_MODULES)}, got {activation!r}")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias=bias, device=device, dtype=dtype)
        bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        make_act = _ACT_MODULES[activation]
        mods = [conv, bn] + ([make_act(negative_slope)] if make_act is not None else [])
        super().__init__(*mods, backend=backend)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.Module, act: Optional[nn.Module] = None,
                     backend: str = "auto") -> "ConvBNAct":
        """Wrap existing modules (shared, not copied). Raises ValueError with
        the reason when they cannot fuse."""
        why = conv_reason(conv) or bn_reason(bn, conv)
        if why is None and act is not None and activation_of_module(act) is None:
            why = f"activation {type(act).__name__} is not one the kernels fuse ({sorted(ACTIVATIONS)})"
        if why is not None:
            raise ValueError(f"ConvBNAct.from_modules: cannot fuse: {why}")
        self = cls.__new__(cls)
        mods = [conv, bn] + ([act] if act is not None else [])
        FusedSequential.__init__(self, *mods, backend=backend)
        return self

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.Module:
        return self._modules["1"]

    @property
    def act(self) -> Optional[nn.Module]:
        return self._modules.get("2")


class BNActConv(nn.Sequential):
    """BatchNorm2d -> activation -> Conv2d (a pre-activation layer), the BN
    and activation fused into the conv as its prologue (``bn_act_conv``)
    while the BN uses running statistics.

    Children ``0`` (BatchNorm2d over ``in_channels``), ``1`` (the
    activation; absent for ``activation="identity"``) and the conv last:
    the state_dict keys of ``nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(),
    nn.Conv2d(c, k, ...))``. The BN and activation modules are the
    identity while the conv applies them; in train mode (or with hooks)
    every child runs as itself, exactly that Sequential.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, activation: str = "relu",
                 negative_slope: float = 0.01, eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None,
                 dtype=None, backend: str = "auto"):
        if activation not in _ACT_MODULES:
            raise ValueError(f"activation must be one of {sorted(_ACT_MODULES)}, got {activation!r}")
        bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        make_act = _ACT_MODULES[activation]
        act = make_act(negative_slope) if make_act is not None else None
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias=bias, device=device, dtype=dtype)
        super().__init__(*([bn] + ([act] if act is not None else []) + [conv]))
        why = conv_reason(conv)
        if why is not None:
            raise ValueError(f"BNActConv: cannot fuse: {why}")
        fuse_prologue(conv, bn, act, activation, backend)

    @property
    def backend(self) -> str:
        return self.conv.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.conv.backend = value

    @property
    def bn(self) -> nn.Module:
        return self._modules["0"]

    @property
    def conv(self) -> nn.Conv2d:
        return self[-1]


__all__ = ["FusedSequential", "ConvBNAct", "BNActConv"]
