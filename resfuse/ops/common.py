"""Validation and allocation helpers every op module shares (one copy)."""

import os
from typing import List, Optional

import torch
from torch._prims_common import suggest_memory_format  # eager's own rule (PyTorch's decompositions use it)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class OnInput:
    """Mixin of an op's problem dataclass: its ``device`` and ``dtype`` are
    its input ``x``'s (what the backends' checks and ``alloc_output`` read)."""

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


def pair(value, name: str) -> List[int]:
    """An int or a 1/2-sequence as [height, width]; errors name `name`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    try:
        vals = [int(v) for v in value]
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(vals) == 1:
        return vals * 2
    if len(vals) != 2:
        raise ValueError(f"{name} must have 2 elements (height, width), got {list(value)}")
    return vals


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output follows the input: channels_last in, channels_last out."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """PyTorch's rule for a convolution's output: channels_last when the
    input *or* the weight suggests channels_last (as F.conv2d answers on
    CPU and cuDNN), else contiguous."""
    if suggest_memory_format(x) == torch.channels_last or suggest_memory_format(weight) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def check_tensor(t, name, *, dims, device, dtype=None, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; all tensors must be on one device")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {dtype}; they must match")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def alloc_output(p, memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """Output buffer in ``memory_format`` (default: the input's). With
    RESFUSE_POISON_OUTPUTS=1 (the test suite sets it) it starts as NaN, so
    an element a kernel fails to write cannot pass a comparison."""
    return empty_output(p.out_shape, p.x, memory_format or output_memory_format(p.x))


def empty_output(shape, like: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``alloc_output`` from its parts: a (poisoned, under the test suite)
    `shape` buffer of `like`'s dtype and device."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
    if os.environ.get("RESFUSE_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out
