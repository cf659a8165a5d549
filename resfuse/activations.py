"""Activations a fused kernel can apply in its epilogue (and, for the
pre-activation op, in its prologue).

One table, read by the op (validation, eager path, gradient), by the
Triton launcher (``triton_id``, matched in
``kernels/conv_bn_act.py::_apply_activation``), by the CUDA epilogue (the
same ids, ``csrc/conv_bn_act.cu::apply_activation``) and by ``convert``
(which module computes which row). Adding an activation is one row here, a
gradient in ``activation_grad`` and one branch in each kernel.

Every row takes the one scalar parameter the ops carry, ``negative_slope``
(LeakyReLU's slope; ignored by the others), so that a slope is read from
the live module at every call, never frozen at convert time.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

#: nn.LeakyReLU's and F.leaky_relu's default slope: the ops' default too.
DEFAULT_NEGATIVE_SLOPE = 0.01


@dataclass(frozen=True)
class Activation:
    name: str
    triton_id: int
    eager: Callable[[torch.Tensor, float], torch.Tensor]   # (t, negative_slope) -> act(t)
    idempotent: bool            # act(act(t)) == act(t): may run again on an activated tensor


ACTIVATIONS = {
    a.name: a
    for a in (
        Activation("identity", 0, lambda t, s: t, True),
        Activation("relu", 1, lambda t, s: torch.relu(t), True),
        Activation("relu6", 2, lambda t, s: F.relu6(t), True),
        Activation("silu", 3, lambda t, s: F.silu(t), False),
        Activation("gelu", 4, lambda t, s: F.gelu(t), False),          # exact (erf) form
        Activation("leaky_relu", 5, lambda t, s: F.leaky_relu(t, s), False),
        Activation("hardswish", 6, lambda t, s: F.hardswish(t), False),
        Activation("hardsigmoid", 7, lambda t, s: F.hardsigmoid(t), False),
        Activation("gelu_tanh", 8, lambda t, s: F.gelu(t, approximate="tanh"), False),
    )
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def check_negative_slope(value) -> float:
    """The slope argument of the ops: a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"negative_slope must be a finite float, got {value!r}")
    return float(value)


def _timm_activation(m: nn.Module) -> Optional[str]:
    """timm's own activation classes whose forwards are one of ours
    (timm.layers.activations; exact types)."""
    t = type(m)
    if not t.__module__.startswith("timm."):
        return None
    return {"GELU": "gelu", "GELUTanh": "gelu_tanh", "Swish": "silu", "HardSwish": "hardswish",
            "HardSigmoid": "hardsigmoid"}.get(t.__name__)


def activation_of_module(m: Optional[nn.Module]) -> Optional[str]:
    """The activation name an ``nn.Module`` computes, or None if it is not
    one the kernels fuse. Exact types only: a subclass may change forward.
    A LeakyReLU's slope is not part of the answer: the fused call reads it
    from the module (``negative_slope_of``) each time it runs."""
    if m is None:
        return "identity"
    t = type(m)
    if t is nn.ReLU:
        return "relu"
    if t is nn.ReLU6:
        return "relu6"
    if t is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0:
        return "relu6"
    if t is nn.SiLU:
        return "silu"
    if t is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    if t is nn.LeakyReLU:
        return "leaky_relu" if math.isfinite(m.negative_slope) else None
    if t is nn.Hardswish:
        return "hardswish"
    if t is nn.Hardsigmoid:
        return "hardsigmoid"
    if t is nn.Identity:
        return "identity"
    return _timm_activation(m)


def negative_slope_of(m: Optional[nn.Module]) -> float:
    """The slope to pass with `m`'s activation: a LeakyReLU's own, read now
    (isinstance: `m` may be the folded subclass convert made of it)."""
    return float(m.negative_slope) if isinstance(m, nn.LeakyReLU) else DEFAULT_NEGATIVE_SLOPE


# d act / du, times g. Formulas as ATen's backward kernels write them.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def activation_grad(name: str, u: torch.Tensor, g: torch.Tensor,
                    negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """g * act'(u) for activation `name` at pre-activation u."""
    if name == "identity":
        return g
    if name == "relu":
        return g * (u > 0)
    if name == "relu6":
        return g * ((u > 0) & (u < 6))
    if name == "silu":
        sig = torch.sigmoid(u)
        return g * sig * (1 + u * (1 - sig))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(u * 0.7071067811865476))
        pdf = torch.exp(-0.5 * u * u) * 0.3989422804014327
        return g * (cdf + u * pdf)
    if name == "leaky_relu":
        return torch.where(u > 0, g, g * negative_slope)
    if name == "hardswish":
        return torch.where(u < -3, torch.zeros_like(g), torch.where(u <= 3, g * (u / 3 + 0.5), g))
    if name == "hardsigmoid":
        return torch.where((u > -3) & (u < 3), g / 6, torch.zeros_like(g))
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (u + 0.044715 * u * u * u)
        th = torch.tanh(inner)
        left = 0.5 * u
        d_right = left * (1 - th * th) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * u * u)
        return g * (0.5 * (1 + th) + d_right)
    raise ValueError(f"no gradient for activation {name!r}")
