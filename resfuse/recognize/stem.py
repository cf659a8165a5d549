"""The ResNet stem: ``conv1 -> bn1 -> relu/act1`` of a module that also has
``layer1`` (torchvision's, timm's and the seed's ResNet), fused in place
as a ``ConvBNHead`` (``nn.stem``) when the owner's traced forward feeds
conv1 to bn1 alone (and bn1 to the activation alone, else the activation
stays outside)."""

import torch.nn as nn

from ..activations import activation_of_module
from ..nn.guards import bn_reason, conv_reason, hooks_reason
from ..nn.stem import ConvBNHead, FoldedBatchNorm2d, fuse_head
from .dataflow import chain_reason, trace


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
    why = conv_reason(conv) or bn_reason(bn, conv)
    if why:
        return why
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
