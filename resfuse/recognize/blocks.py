"""Residual blocks recognised by structure, and the reason when one is not.

A residual block here is any module whose children are, by name,

    conv1, bn1, <act>, conv2, bn2, [<act>, conv3, bn3,] <out act>, [downsample]

where ``<act>`` is ``act{i}`` (timm) or the shared ``relu`` (torchvision,
the seed's ResidualLayer / ResDown), plus optional children that are the
identity in eval (``drop_block``, ``aa``, ``se``, ``drop_path`` set to
None / ``nn.Identity`` / a DropBlock or DropPath). The data flow is the one
all of these share: each conv -> bn -> act feeds the next, the last BN's
output is added to ``downsample(x)`` (or ``x``), then the out activation.

Children are not enough: the block's own forward is traced (torch.fx,
submodules opaque; ``recognize.dataflow``) and must compute exactly that
data flow, each intermediate used once. A block whose forward scales a
branch, drops the last activation, takes more than one input (timm's DLA
blocks), or is a subclass with its own forward is left alone with the
reason, and so is a block with hooks on itself or any member.

The shortcut is ``identity`` (no downsample), ``projection`` (downsample is
``Sequential(Conv2d 1x1, BatchNorm)``: fused into the last kernel as a
second accumulation) or ``module`` (any other downsample, e.g. timm's
avg-pool + conv + BN: run on its own, read in the last kernel's epilogue).
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch.nn as nn

from ..activations import activation_of_module
from ..nn._provers import register_prover
from ..nn.blocks import FusedResidualBlock, fuse_block
from ..nn.conv_bn_act import is_plain_sequential
from ..nn.guards import bn_reason, conv_reason, hooks_reason
from .dataflow import Expr, dataflow, describe, single_user_reason, trace

# Children that may appear in a block and are the identity in eval mode.
_EVAL_IDENTITY_NAMES = ("drop_block", "aa", "se", "drop_path")
_EVAL_IDENTITY_TYPES = ("DropPath", "DropBlock2d", "Identity")


@dataclass(frozen=True)
class Stage:
    conv: str
    bn: str
    act: Optional[str]      # child applying the activation after this BN (None: the last stage)
    activation: str         # its name in resfuse.activations ('identity' for the last stage)


@dataclass(frozen=True)
class BlockSpec:
    stages: Tuple[Stage, ...]
    out_act: str            # child applying the activation after the add
    out_activation: str
    shortcut: str           # 'identity' | 'projection' | 'module'
    downsample: Optional[str]

    @property
    def kind(self) -> str:
        return {2: "basic", 3: "bottleneck"}[len(self.stages)]


def _is_eval_identity(m) -> bool:
    return m is None or type(m).__name__ in _EVAL_IDENTITY_TYPES


def projection_reason(ds: nn.Module) -> Optional[str]:
    """Why `ds` is not a 1x1 conv + BN projection the last kernel can absorb."""
    if not is_plain_sequential(ds) or len(ds) != 2:
        return "downsample is not Sequential(Conv2d, BatchNorm)"
    conv, bn = ds[0], ds[1]
    why = conv_reason(conv) or bn_reason(bn, conv) if isinstance(conv, nn.Conv2d) else "downsample[0] is not a Conv2d"
    if why:
        return why
    if conv.kernel_size != (1, 1) or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        return "downsample conv is not a 1x1, groups=1, dilation=1 conv"
    if not isinstance(conv.padding, str) and tuple(conv.padding) != (0, 0) or conv.padding == "same":
        return "downsample conv is padded"
    return None


def _through_identities(e: Expr, ch) -> Expr:
    """Step back over calls of eval-identity children (drop_block, aa, ...)."""
    while e.op == "module" and e.target in _EVAL_IDENTITY_NAMES and _is_eval_identity(ch.get(e.target)) \
            and e.users == 1:
        e = e.args[0]
    return e


def forward_reason(block: nn.Module, spec: "BlockSpec", forward_of: type) -> Optional[str]:
    """Why `forward_of.forward`, run on `block`, does not compute `spec`'s
    data flow: out_act(last_bn(...conv1(x)) + shortcut(x)), every
    intermediate used once, x used by conv1 and the shortcut only."""
    view = block
    if forward_of is not type(block):  # a fused block: its original class's forward
        view = forward_of.__new__(forward_of)
        view.__dict__ = block.__dict__
    graph = trace(view)
    if isinstance(graph, str):
        return graph
    root = dataflow(graph)
    if isinstance(root, str):
        return root
    ch = block._modules

    def expect_module(e: Expr, name: str, what: str) -> Optional[str]:
        if e.op != "module" or e.target != name:
            return f"forward feeds {describe(e)} where the pattern has self.{name} ({what})"
        return single_user_reason(e)

    if root.op != "module" or root.target != spec.out_act:
        return f"forward returns {describe(root)}, not self.{spec.out_act}(branch + shortcut)"
    add = _through_identities(root.args[0], ch)
    if add.op != "add":
        return f"the last activation reads {describe(add)}, not the sum of the branch and the shortcut"
    why = single_user_reason(add)
    if why:
        return why
    branch, short = (_through_identities(a, ch) for a in add.args)
    if short.op != "input" and (branch.op == "input" or branch.target == spec.downsample):
        branch, short = short, branch
    if spec.downsample is None:
        if short.op != "input":
            return f"the shortcut is {describe(short)}, not the block's input"
    else:
        why = expect_module(short, spec.downsample, "the shortcut")
        if why:
            return why
        short = short.args[0]
        if short.op != "input":
            return f"the downsample reads {describe(short)}, not the block's input"
    e = branch
    for i, st in reversed(list(enumerate(spec.stages))):
        why = expect_module(e, st.bn, f"stage {i + 1}'s BatchNorm")
        if why:
            return why
        e = _through_identities(e.args[0], ch)
        why = expect_module(e, st.conv, f"stage {i + 1}'s conv")
        if why:
            return why
        e = _through_identities(e.args[0], ch)
        if i:
            prev = spec.stages[i - 1]
            why = expect_module(e, prev.act, f"the activation after stage {i}")
            if why:
                return why
            e = _through_identities(e.args[0], ch)
    if e.op != "input":
        return f"the first conv reads {describe(e)}, not the block's input"
    if e.users != 2:
        return f"the block's input is used {e.users} times, not by the first conv and the shortcut only"
    return None


def match_block(block: nn.Module, forward_of: Optional[type] = None) -> Union[BlockSpec, str]:
    """A BlockSpec, or the reason (str) why `block` is not a fusable residual
    block. `forward_of`: the class whose forward `block` runs (default its
    own type; a fused block passes the class it was made from)."""
    ch = dict(block.named_children())
    if "conv1" not in ch or "conv2" not in ch:
        return "no conv1/conv2 children"
    n = 3 if "conv3" in ch else 2
    if f"conv{n + 1}" in ch:
        return f"has conv{n + 1}: more convs than a BasicBlock/Bottleneck"
    used = set()
    stages = []
    for i in range(1, n + 1):
        conv, bn = ch.get(f"conv{i}"), ch.get(f"bn{i}")
        if not isinstance(conv, nn.Conv2d):
            return f"conv{i} is {type(conv).__name__}, not Conv2d"
        why = conv_reason(conv) or bn_reason(bn, conv)
        if why:
            return f"conv{i}/bn{i}: {why}"
        act_name = f"act{i}" if f"act{i}" in ch else "relu"
        act_mod = ch.get(act_name)
        activation = activation_of_module(act_mod) if act_mod is not None else None
        if activation is None:
            return f"no fusable activation after bn{i} (looked for act{i} / relu)"
        used.update((f"conv{i}", f"bn{i}", act_name))
        stages.append((f"conv{i}", f"bn{i}", act_name, activation))
    # The last stage's act child is the activation after the add.
    *first, last = stages
    spec_stages = tuple(Stage(c, b, a, act) for c, b, a, act in first)
    spec_stages += (Stage(last[0], last[1], None, "identity"),)
    out_act, out_activation = last[2], last[3]

    downsample = ch.get("downsample")
    if downsample is None:
        shortcut = "identity"
    elif projection_reason(downsample) is None:
        shortcut = "projection"
    else:
        shortcut = "module"
    used.add("downsample")
    for name, m in ch.items():
        if name in used:
            continue
        if name in _EVAL_IDENTITY_NAMES and _is_eval_identity(m):
            continue
        return f"child {name!r} ({type(m).__name__}) takes part in forward in a way resfuse does not model"
    hooked = next((hooks_reason(m, n or "block") for n, m in block.named_modules() if hooks_reason(m, n or "block")),
                  None)
    if hooked:
        return hooked
    spec = BlockSpec(spec_stages, out_act, out_activation, shortcut, "downsample" if downsample is not None else None)
    why = forward_reason(block, spec, forward_of or type(block))
    return spec if why is None else f"{(forward_of or type(block)).__name__}.forward: {why}"


register_prover("residual_block", match_block)


def convert_blocks(model: nn.Module, backend: str) -> set:
    """Replace every matching residual block in `model` (in place) by its
    fused version. Returns the ids of the downsample modules now computed
    inside a block's last kernel (projection shortcuts), which no other
    pass should touch."""
    absorbed = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedResidualBlock):
                child.backend = backend
            elif not isinstance(match_block(child), str):
                child = fuse_block(child, backend)
                setattr(parent, name, child)
            else:
                continue
            if child.spec.shortcut == "projection":
                absorbed.add(id(child._modules[child.spec.downsample]))
    return absorbed
