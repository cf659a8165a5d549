"""``resfuse.convert``: rewrite a model so its fusable runs execute fused.

Recognition is structural (module types and order, see ``patterns``), so
copies of torchvision code in user projects convert too. Parameters and
buffers are never moved or renamed: the converted model's state_dict has
the original's keys, shapes and values.
"""

import copy

import torch.nn as nn

from . import dispatch
from .block_patterns import match_block
from .nn.blocks import FusedResidualBlock, convert_blocks, fuse_block
from .nn.conv_bn_act import FusedSequential
from .nn.gnconv import convert_gnconv
from .nn.stem import convert_stems
from .patterns import FusedGroup, is_plain_sequential, plan_sequential


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Return `model` with its conv -> BN (-> act) (-> add) patterns fused:

    - residual blocks (torchvision/timm BasicBlock and Bottleneck, the seed's
      ResidualLayer/ResDown, and anything with their structure) become
      ``resfuse.nn.BasicBlock`` / ``Bottleneck``: 2 or 3 kernels in eval,
      the shortcut inside the last one;
    - a ResNet-style stem (conv1, bn1, relu/act1 of a module with layer1)
      becomes one kernel (``resfuse.nn.stem``);
    - every Conv2d -> BatchNorm (-> activation) run inside an
      ``nn.Sequential`` runs as one kernel (``resfuse.nn.FusedSequential``);
    - every HorNet gnconv (recognised by structure: proj_in, dwconv, pws,
      proj_out, scale) becomes ``resfuse.nn.GnConv`` (two kernels), and
      every HorNet Block / yoloair HorBlock ``resfuse.nn.FusedHorBlock``
      (its channels-first LayerNorm norm1 inside the projection kernel, the
      layer scale and residual inside the second).

    backend: 'auto' | 'triton' | 'cuda' | 'eager', set on every fused module
        (``RESFUSE_BACKEND`` overrides 'auto' at run time).
    inplace: rewrite `model` itself instead of a deep copy.

    No parameter or buffer is moved or renamed. Modules that do not match
    stay as they are; ``resfuse.explain`` says why.
    """
    dispatch.validate_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, FusedResidualBlock) or not isinstance(match_block(model), str):
        model = fuse_block(model, backend) if not isinstance(model, FusedResidualBlock) else model
        model.backend = backend
    model = convert_gnconv(model, backend)
    absorbed = convert_blocks(model, backend)
    if isinstance(model, FusedResidualBlock) and model.spec.shortcut == "projection":
        absorbed.add(id(model._modules[model.spec.downsample]))
    convert_stems(model, backend)
    for m in list(model.modules()):
        if id(m) in absorbed:
            continue  # a projection shortcut computed inside its block's last kernel
        if isinstance(m, FusedSequential):
            m.backend = backend
        elif is_plain_sequential(m) and any(isinstance(s, FusedGroup) for s in plan_sequential(m).steps):
            FusedSequential.from_sequential(m, backend)
    return model
