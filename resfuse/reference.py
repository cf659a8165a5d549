"""Eager definitions of resfuse's ops: the oracle every test compares with.

Plain PyTorch, unfused, in whatever dtype the caller passes (tests pass
float64). Nothing here is fast; everything here is obviously right.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .activations import get_activation


def conv_bn_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    bn_mean: Optional[torch.Tensor] = None,
    bn_var: Optional[torch.Tensor] = None,
    bn_weight: Optional[torch.Tensor] = None,
    bn_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    activation: str = "identity",
) -> torch.Tensor:
    """``act(batch_norm_eval(conv2d(x, weight, bias)) [+ residual])``.

    The three steps run as separate eager ops, exactly as Conv2d ->
    BatchNorm2d (eval) -> add -> activation would. ``bn_mean is None`` means
    no BatchNorm. All tensors are used in the dtype they come in.
    """
    y = F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    if bn_mean is not None:
        y = F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, training=False, eps=eps)
    if residual is not None:
        y = y + residual
    return get_activation(activation).eager(y)


def to_float64(*tensors):
    """Upcast every tensor (None passes through) for the float64 oracle."""
    return tuple(None if t is None else t.detach().to(torch.float64) for t in tensors)
