"""``resfuse.convert``: rewrite a model so its fusable runs execute fused.

Recognition is structural (module types and order, see ``patterns``), so
copies of torchvision code in user projects convert too. Parameters and
buffers are never moved or renamed: the converted model's state_dict has
the original's keys, shapes and values.
"""

import copy

import torch.nn as nn

from . import dispatch
from .nn.conv_bn_act import FusedSequential
from .patterns import FusedGroup, is_plain_sequential, plan_sequential


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Return `model` with every Conv2d -> BatchNorm2d (-> activation) run
    inside an ``nn.Sequential`` fused (``resfuse.nn.FusedSequential``).

    backend: 'auto' | 'triton' | 'cuda' | 'eager', set on every fused module
        (``RESFUSE_BACKEND`` overrides 'auto' at run time).
    inplace: rewrite `model` itself instead of a deep copy.

    Modules that do not match stay as they are; ``resfuse.explain`` says why.
    """
    dispatch.validate_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for m in list(model.modules()):
        if isinstance(m, FusedSequential):
            m.backend = backend
        elif is_plain_sequential(m) and any(isinstance(s, FusedGroup) for s in plan_sequential(m).steps):
            FusedSequential.from_sequential(m, backend)
    return model
