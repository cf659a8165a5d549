"""conv -> BatchNorm (-> activation) wherever a forward computes it.

Any module's forward (googlenet's ``BasicConv2d``, timm's ``ConvNormAct``,
a DLA or VoVNet block, a user's own) is traced (``dataflow.trace``) and
every chain ``self.<conv>(t) -> self.<bn>(.) [-> act(.)]`` of its direct
children is found where each is called exactly once and each output is
read by the next alone. Such a chain is fused in place by
``nn.stem.fuse_head``: the Conv2d computes act(BN(conv)) and the BN
becomes the identity, so the owner's forward, unchanged, computes the
same thing. The activation is fused when it is

- timm's ``BatchNormAct2d`` own ``act`` (the BN module applies it; any
  activation the kernels have, with its ``drop`` the identity), or
- a following idempotent activation (ReLU, ReLU6; a child module or
  ``F.relu`` / ``torch.relu`` / ``F.relu6``), which then runs again on an
  already-activated tensor, harmlessly.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..activations import activation_of_module, get_activation
from ..nn.guards import bn_reason, conv_reason, hooks_reason
from .dataflow import trace

_FUNCTIONAL_IDEMPOTENT = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


def is_batchnorm_act(bn: nn.Module) -> bool:
    """timm's BatchNormAct2d (exact type): BN on running statistics in eval,
    then its ``drop`` and ``act`` children."""
    t = type(bn)
    return t.__name__ == "BatchNormAct2d" and t.__module__.startswith("timm.") and isinstance(bn, nn.BatchNorm2d)


def _bn_act_reason(bn: nn.Module, conv: nn.Conv2d) -> Optional[str]:
    if not bn.track_running_stats or bn.running_mean is None:
        return "BatchNormAct2d without running statistics normalizes with batch statistics"
    if bn.num_features != conv.out_channels:
        return f"BatchNorm has {bn.num_features} features but the conv has {conv.out_channels} output channels"
    return next((hooks_reason(m, n or "BatchNormAct2d") for n, m in bn.named_modules() if hooks_reason(m, n)),
                None)


@dataclass(frozen=True)
class Head:
    conv: str                 # child names in the owner
    bn: str
    activation: str           # fused into the conv's kernel ('identity': none)


def _single_call(graph: fx.Graph, target: str) -> Optional[fx.Node]:
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
    return nodes[0] if len(nodes) == 1 else None


def _idempotent_act(owner: nn.Module, node: fx.Node, source: fx.Node) -> Optional[str]:
    """The idempotent activation `node` applies to `source` alone, if any."""
    if node.op == "call_module" and node.args == (source,) and not node.kwargs:
        act = activation_of_module(owner._modules.get(node.target)) if "." not in node.target else None
        return act if act and act != "identity" and get_activation(act).idempotent else None
    if node.op == "call_function" and node.target in _FUNCTIONAL_IDEMPOTENT and node.args[:1] == (source,):
        extra = list(node.args[1:]) + list(node.kwargs.values())
        if all(isinstance(a, bool) for a in extra):  # inplace=
            return _FUNCTIONAL_IDEMPOTENT[node.target]
    return None


@dataclass(frozen=True)
class HeadPlan:
    heads: List[Head]
    unfused: Dict[str, str]   # conv child -> why it is not the start of a fusable chain


def shared_modules(model: nn.Module) -> frozenset:
    """Ids of the modules registered at more than one place in `model`: a
    module folded in place would change every place that uses it."""
    seen, shared = set(), set()
    for _, m in model.named_modules(remove_duplicate=False):
        (shared if id(m) in seen else seen).add(id(m))
    return frozenset(shared)


def find_heads(owner: nn.Module, shared: frozenset = frozenset()) -> Union[HeadPlan, str]:
    """The conv -> BN (-> act) chains of `owner`'s forward that fuse in
    place and, for its other Conv2d children, why not; or why its forward
    cannot be read. `shared`: ids of modules registered at more than one
    place of the model (``shared_modules``), never folded in place."""
    ch = owner._modules
    if not any(isinstance(m, nn.Conv2d) for m in ch.values()):
        return HeadPlan([], {})
    graph = trace(owner)
    if isinstance(graph, str):
        return f"{type(owner).__name__}.forward: {graph}"
    heads, unfused = [], {}
    for name, conv in ch.items():
        if not isinstance(conv, nn.Conv2d):
            continue
        why = conv_reason(conv)
        if why:
            unfused[name] = why
            continue
        cnode = _single_call(graph, name)
        if cnode is None:
            unfused[name] = f"{type(owner).__name__}.forward does not call it exactly once"
            continue
        bnode = next(iter(cnode.users)) if len(cnode.users) == 1 else None
        if bnode is None or bnode.op != "call_module" or bnode.args != (cnode,) or bnode.kwargs \
                or "." in bnode.target or not isinstance(ch.get(bnode.target), nn.BatchNorm2d):
            unfused[name] = (f"in {type(owner).__name__}.forward its output is not read by one BatchNorm2d "
                             f"child alone")
            continue
        bn = ch[bnode.target]
        if _single_call(graph, bnode.target) is None:
            unfused[name] = f"{type(owner).__name__}.forward calls self.{bnode.target} more than once"
            continue
        if is_batchnorm_act(bn):
            why = _bn_act_reason(bn, conv)
            act = activation_of_module(bn.act) if type(bn.drop) is nn.Identity else None
        else:
            why = bn_reason(bn, conv) if type(bn) is nn.BatchNorm2d else \
                f"followed by {type(bn).__name__}, whose forward is not BatchNorm2d's"
            act = _idempotent_act(owner, next(iter(bnode.users)), bnode) if len(bnode.users) == 1 else None
        if not why and (id(conv) in shared or id(bn) in shared):
            why = (f"self.{name if id(conv) in shared else bnode.target} is registered in more than one module "
                   f"(folding it would change the other)")
        if why:
            unfused[name] = why
        else:
            heads.append(Head(name, bnode.target, act or "identity"))
    return HeadPlan(heads, unfused)
