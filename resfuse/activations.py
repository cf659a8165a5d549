"""Activations a fused kernel can apply in its epilogue.

One table, read by the op (validation, eager path), by the Triton launcher
(``triton_id``, matched in ``kernels/conv_bn_act.py::_apply_activation``)
and by ``convert`` (which module types map to which name). Adding an
activation is one row here and one branch in the kernel.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    name: str
    triton_id: int
    eager: Callable[[torch.Tensor], torch.Tensor]


ACTIVATIONS = {
    a.name: a
    for a in (
        Activation("identity", 0, lambda t: t),
        Activation("relu", 1, torch.relu),
        Activation("relu6", 2, F.relu6),
        Activation("silu", 3, F.silu),
        Activation("gelu", 4, F.gelu),  # exact (erf) form
    )
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def activation_of_module(m: Optional[nn.Module]) -> Optional[str]:
    """The activation name an ``nn.Module`` computes, or None if it is not
    one the kernels fuse. Exact types only: a subclass may change forward."""
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
    if t is nn.GELU and m.approximate == "none":
        return "gelu"
    if t is nn.Identity:
        return "identity"
    return None
