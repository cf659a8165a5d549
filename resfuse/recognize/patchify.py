"""Patchify convs and their channels-first LayerNorms: HorNet's and
ConvNeXt's stems (conv k=s -> LayerNorm) and downsampling layers
(LayerNorm -> conv k=s), found in any module's traced forward, proven, and
fused in place (``nn.patchify``).

A LayerNorm is taken only when its own forward, traced, computes HorNet's
channels-first LayerNorm or torchvision's / timm's LayerNorm2d
(``references``); the owner's forward must feed the LayerNorm's output to
the conv alone (pre) or the conv's output to the LayerNorm alone (post),
each called once."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch.fx as fx
import torch.nn as nn

from ..nn.patchify import PatchifyConv, fuse_patchify, layernorm_params, patchify_reason
from .dataflow import same_forward_reason, trace
from .heads import _single_call, shared_modules
from .references import HorNetLayerNorm, LayerNorm2d


def layernorm_reason(ln: nn.Module, channels: int) -> Optional[str]:
    """Why `ln` is not a channels-first LayerNorm over `channels` whose
    forward is proven (None: it is)."""
    p = layernorm_params(ln, channels)
    if isinstance(p, str):
        return p
    reference = LayerNorm2d if isinstance(ln, nn.LayerNorm) else HorNetLayerNorm
    why = same_forward_reason(ln, reference)
    return f"{type(ln).__name__}.forward: {why}" if why else None


@dataclass(frozen=True)
class PatchifyChain:
    conv: str
    pre: Optional[str]   # the LayerNorm child before it, or None
    post: Optional[str]  # the LayerNorm child after it, or None


def _norm_child(owner: nn.Module, node: fx.Node) -> Optional[str]:
    if node.op == "call_module" and "." not in node.target and not node.kwargs:
        return node.target
    return None


def find_patchify(owner: nn.Module, shared: frozenset = frozenset()) -> Union[List[PatchifyChain], str]:
    """The LN -> patchify conv -> LN chains of `owner`'s forward (at least
    one LayerNorm each), or why its forward cannot be read."""
    ch = owner._modules
    convs = {n: m for n, m in ch.items() if type(m) is nn.Conv2d and patchify_reason(m) is None}
    if not convs:
        return []
    graph = trace(owner)
    if isinstance(graph, str):
        return f"{type(owner).__name__}.forward: {graph}"
    out, claimed = [], set()  # a LayerNorm between two patchify convs is given to one of them
    for name, conv in convs.items():
        cnode = _single_call(graph, name)
        if cnode is None or id(conv) in shared or len(cnode.args) != 1 or cnode.kwargs:
            continue
        pre = post = None
        src = cnode.args[0]
        if isinstance(src, fx.Node) and len(src.users) == 1:
            cand = _norm_child(owner, src)
            if cand is not None and cand not in claimed and _single_call(graph, cand) is src and src.args \
                    and len(src.args) == 1 and id(ch[cand]) not in shared \
                    and layernorm_reason(ch[cand], conv.in_channels) is None:
                pre = cand
        if len(cnode.users) == 1:
            user = next(iter(cnode.users))
            cand = _norm_child(owner, user)
            if cand is not None and cand not in claimed and user.args == (cnode,) \
                    and _single_call(graph, cand) is user and id(ch[cand]) not in shared \
                    and layernorm_reason(ch[cand], conv.out_channels) is None:
                post = cand
        if pre or post:
            claimed.update(n for n in (pre, post) if n)
            out.append(PatchifyChain(name, pre, post))
    return out


def convert_patchify(model: nn.Module, backend: str, skip: set) -> None:
    """Fuse in place every patchify chain of every module of `model` not in
    `skip` (ids of modules other passes own)."""
    shared = shared_modules(model)
    for owner in list(model.modules()):
        if id(owner) in skip:
            continue
        if isinstance(owner, PatchifyConv):
            owner.backend = backend
            continue
        chains = find_patchify(owner, shared)
        for c in [] if isinstance(chains, str) else chains:
            ch = owner._modules
            fuse_patchify(ch[c.conv], ch[c.pre] if c.pre else None, ch[c.post] if c.post else None, backend)


def unfused_reasons(owner: nn.Module) -> Dict[str, str]:
    """For explain: conv children of `owner` that a converted model would
    fuse with a LayerNorm (their names -> a 'not converted' note)."""
    chains = find_patchify(owner)
    return {} if isinstance(chains, str) else \
        {c.conv: "fusable LayerNorm + patchify conv, but not converted (resfuse.convert)" for c in chains}
