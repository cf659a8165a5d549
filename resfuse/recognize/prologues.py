"""BatchNorm -> activation -> conv (pre-activation) wherever a forward computes it.

DenseNet's ``_DenseLayer`` (``conv1(relu1(norm1(cat)))``), its transition
(``norm -> relu -> conv -> pool``), timm's DPN ``BnActConv2d``
(``conv(bn(x))`` with a ``BatchNormAct2d``), pre-activation ResNets: the
conv's input is act(BN(t)) of the owner's own children, each called
exactly once and each output read by the next alone. Such a conv runs
``torch.ops.resfuse.bn_act_conv`` (the BN and activation as the kernel's
prologue) and the BN and activation modules become the identity while the
conv applies them (``nn.stem.fuse_prologue``), so the owner's forward,
unchanged, computes the same thing.

The prologue is

- a ``BatchNorm2d`` child followed by an activation child the kernels have
  (``activation_of_module``; a functional ``F.relu`` cannot be switched
  off in place, so it is not fused), or by nothing (BN -> conv), or
- timm's ``BatchNormAct2d`` (its ``act``, with its ``drop`` the identity).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch.fx as fx
import torch.nn as nn

from ..activations import activation_of_module
from ..nn.guards import conv_reason, hooks_reason
from .dataflow import trace
from .heads import Head, is_batchnorm_act


@dataclass(frozen=True)
class Prologue:
    conv: str                 # child names in the owner
    bn: str
    act: Optional[str]        # the activation child (None: none, or the BatchNormAct2d's own)
    activation: str


@dataclass(frozen=True)
class ProloguePlan:
    prologues: List[Prologue]
    unfused: Dict[str, str]   # conv child -> why its input is not a fusable BN (-> act)


def _call(graph: fx.Graph, target: str) -> List[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_module" and n.target == target]


def _plain_call(node: fx.Node, owner: nn.Module) -> Optional[str]:
    """The direct child `node` calls on exactly one tensor, or None."""
    if node.op != "call_module" or "." in node.target or node.kwargs or len(node.args) != 1 \
            or not isinstance(node.args[0], fx.Node) or node.target not in owner._modules:
        return None
    return node.target


def _bn_reason(bn: nn.Module, conv: nn.Conv2d, shared: frozenset) -> Optional[str]:
    if not bn.track_running_stats or bn.running_mean is None:
        return "the BatchNorm before it has no running statistics (it normalizes with batch statistics)"
    if bn.num_features != conv.in_channels:
        return f"the BatchNorm before it has {bn.num_features} features but the conv {conv.in_channels} inputs"
    if id(bn) in shared:
        return "the BatchNorm before it is registered in more than one module (folding it would change the other)"
    return next((hooks_reason(m, n or type(bn).__name__) for n, m in bn.named_modules() if hooks_reason(m, n)),
                None)


def find_prologues(owner: nn.Module, shared: frozenset = frozenset()) -> Union[ProloguePlan, str]:
    """The BN (-> act) -> conv chains of `owner`'s forward that fuse in
    place, and why not for its other convs whose input is some BN's output;
    or why the forward cannot be read. `shared`: ids of modules registered
    in more than one place of the model (never folded in place)."""
    ch = owner._modules
    convs = {n: c for n, c in ch.items() if isinstance(c, nn.Conv2d)}
    if not convs or not any(isinstance(m, nn.BatchNorm2d) for m in ch.values()):
        return ProloguePlan([], {})
    graph = trace(owner)
    if isinstance(graph, str):
        return f"{type(owner).__name__}.forward: {graph}"
    found, unfused = [], {}
    for name, conv in convs.items():
        if conv.__dict__.get("_pre_bn") is not None:
            continue  # already has its prologue
        calls = _call(graph, name)
        if len(calls) != 1 or _plain_call(calls[0], owner) is None:
            continue
        src = calls[0].args[0]
        first = _plain_call(src, owner)
        if first is None:
            continue
        act_name, act_node = None, None
        if not isinstance(ch[first], nn.BatchNorm2d):   # an activation child before the conv?
            act_name, act_node = first, src
            src = src.args[0]
            first = _plain_call(src, owner)
            if first is None or not isinstance(ch[first], nn.BatchNorm2d):
                continue
        bn = ch[first]
        if "_head_conv" in bn.__dict__:
            unfused[name] = "the BN before it is applied in the kernel of another conv (its epilogue)"
            continue
        if type(bn) is not nn.BatchNorm2d and not is_batchnorm_act(bn):
            continue  # a BN of unknown forward: not a prologue
        why = conv_reason(conv) if type(conv) is nn.Conv2d else None
        if why is None and id(conv) in shared:
            why = "it is registered in more than one module"
        if why is None and len(_call(graph, first)) != 1:
            why = f"{type(owner).__name__}.forward calls self.{first} more than once"
        if why is None and list(src.users) != [act_node or calls[0]]:
            why = f"self.{first}'s output is read by more than the conv in forward"
        if why is None:
            why = _bn_reason(bn, conv, shared)
        activation = "identity"
        if why is None and is_batchnorm_act(bn):
            if act_name is not None:
                why = "a BatchNormAct2d and another activation before it"
            elif type(bn.drop) is not nn.Identity:
                why = "its BatchNormAct2d has a drop layer between the BN and the activation"
            else:
                activation = activation_of_module(bn.act)
                if activation is None:
                    why = f"its BatchNormAct2d's activation {type(bn.act).__name__} is not one the kernels fuse"
        elif why is None and act_name is not None:
            act = ch[act_name]
            activation = activation_of_module(act)
            if activation is None:
                why = f"the activation before it, {type(act).__name__}, is not one the kernels fuse"
            elif len(_call(graph, act_name)) != 1 or list(act_node.users) != [calls[0]]:
                why = f"self.{act_name} is called more than once or its output is read by more than the conv"
            elif id(act) in shared:
                why = f"self.{act_name} is registered in more than one module (folding it would change the other)"
            else:
                why = hooks_reason(act, "activation")
        if why:
            unfused[name] = why
        else:
            found.append(Prologue(name, first, act_name, activation))
    return ProloguePlan(found, unfused)


def resolve_chains(heads: List[Head], prologues: List[Prologue]):
    """Give each BatchNorm to one conv when it could be the epilogue of the
    conv before it (a head) and the prologue of the conv after it:

        conv_a -> BN -> act -> conv_b

    conv_b takes it when conv_a already has a prologue of its own
    (DenseNet's norm1 -> relu1 -> conv1 -> norm2 -> relu2 -> conv2: both
    convs fused, and relu2 switched off rather than run again); otherwise
    conv_a does (VGG's conv -> BN -> ReLU -> conv: conv_a would have nothing
    else). Decided along the forward: conv_a's own prologue BN comes earlier.
    Returns the (heads, prologues) to apply."""
    head_of_bn = {h.bn: h for h in heads}
    pro_of_conv = {p.conv: p for p in prologues}
    memo = {}

    def takes_prologue(conv: str, depth: int = 0) -> bool:
        if conv not in memo:
            p = pro_of_conv.get(conv)
            rival = head_of_bn.get(p.bn) if p is not None else None
            memo[conv] = p is not None and (rival is None or (depth < len(heads) and
                                                              takes_prologue(rival.conv, depth + 1)))
        return memo[conv]

    kept_pro = [p for p in prologues if takes_prologue(p.conv)]
    taken = {p.bn for p in kept_pro}
    return [h for h in heads if h.bn not in taken], kept_pro
