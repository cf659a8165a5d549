"""Drop-in modules for Conv2d -> BatchNorm2d (-> activation).

``FusedSequential`` is an ``nn.Sequential`` with the same children under
the same names (so ``state_dict`` keys are unchanged) that runs each
Conv2d -> BN (-> activation) run of its children as one fused op when the
BN uses running statistics (eval), and its children one by one otherwise
(train), which is then exactly what ``nn.Sequential`` computes.

``ConvBNAct`` is a FusedSequential of exactly (conv, bn[, act]): a drop-in
for ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)`` and for a conv/bn pair.
"""

from typing import Dict, Optional

import torch
import torch.nn as nn

from .. import dispatch
from ..activations import ACTIVATIONS, activation_of_module
from ..ops import resolve_padding
from ..patterns import (FusedGroup, Plan, bn_reason, bn_tensors, bn_uses_running_stats, conv_reason,
                        plan_sequential)

_ACT_MODULES = {
    "identity": None,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}
assert set(_ACT_MODULES) == set(ACTIVATIONS), "every fused activation needs a module"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class FusedSequential(nn.Sequential):
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
        self.backend = backend
        self.last_decisions: Dict[str, dispatch.Decision] = {}
        self._plan: Optional[Plan] = None
        self._plan_key = None

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = dispatch.validate_backend(value)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, backend: str = "auto") -> "FusedSequential":
        """Turn `seq` itself into a FusedSequential (same object, children,
        hooks and flags; only its class changes)."""
        seq.__class__ = cls
        seq._init_fused(backend)
        return seq

    def plan(self) -> Plan:
        """The fusion plan for the current children (recomputed when a child
        is replaced)."""
        if _compiling() and self._plan is not None:
            return self._plan
        key = tuple(self._modules.items())
        if self._plan is None or len(key) != len(self._plan_key) or any(
                a[0] != b[0] or a[1] is not b[1] for a, b in zip(key, self._plan_key)):
            self._plan, self._plan_key = plan_sequential(self), key
        return self._plan

    def forward(self, x):
        for step in self.plan().steps:
            if isinstance(step, FusedGroup):
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
        conv = self._modules[group.conv]
        mean, var, gamma, beta, eps = bn_tensors(self._modules[group.bn])
        weight, bias = conv.weight, conv.bias
        if torch.is_autocast_enabled(x.device.type):
            # What autocast does for F.conv2d: compute in the autocast dtype.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        y = torch.ops.resfuse.conv_bn_act(
            x, weight, bias, mean, var, gamma, beta, eps, None,
            list(conv.stride), resolve_padding(conv.padding, conv.kernel_size, conv.dilation),
            list(conv.dilation), conv.groups, group.activation, self._backend)
        if not _compiling():
            self.last_decisions[group.conv] = dispatch.last_decision()
        return y

    def extra_repr(self) -> str:
        return f"backend={self._backend!r}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plan"], state["_plan_key"] = None, None  # rebuilt from the children
        return state


class ConvBNAct(FusedSequential):
    """Conv2d -> BatchNorm2d (-> activation), fused in eval mode.

    Children are ``0`` (Conv2d), ``1`` (BatchNorm2d) and, with an
    activation, ``2``: the state_dict keys of
    ``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...), nn.ReLU())``.
    In train mode it computes exactly what that Sequential computes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, activation: str = "relu",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None, dtype=None,
                 backend: str = "auto"):
        if activation not in _ACT_MODULES:
            raise ValueError(f"activation must be one of {sorted(_ACT_MODULES)}, got {activation!r}")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias=bias, device=device, dtype=dtype)
        bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        act_cls = _ACT_MODULES[activation]
        mods = [conv, bn] + ([act_cls()] if act_cls is not None else [])
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


__all__ = ["FusedSequential", "ConvBNAct"]
