"""What a module's forward computes, read with torch.fx.

A module's children can look like a pattern while its forward does
something else (scales a branch, skips the last activation, takes more
inputs). Before a module is replaced, its own ``forward`` is traced with
every submodule call kept as one opaque node (the submodules' semantics are
checked on their own: exact types, no overridden forward, no hooks), and the
traced data flow must be the pattern's, node for node.

``trace(module)`` gives the graph (or why there is none); ``Expr`` is its
data flow as a tree rooted at the output, with each node's number of users,
so a matcher can check that every intermediate is used exactly once.
Tracing runs the forward on fx proxies in eval mode (the only mode a fused
module computes fused; in train mode fused modules run the original
forward), and restores every ``training`` flag afterwards.
"""

import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn


class _SubmodulesAsLeaves(fx.Tracer):
    """Records every submodule call as one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _trace_in_mode(module: nn.Module, training: bool) -> fx.Graph:
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = training
        return _SubmodulesAsLeaves().trace(module)
    finally:
        for m, t in flags:
            m.training = t


def trace(module: nn.Module) -> Union[fx.Graph, str]:
    """The fx graph of ``type(module).forward`` in eval mode, or the reason
    (str) it cannot be traced. The forward must trace to the same code in
    train mode too: a fused module decides per call whether to run fused
    (its BatchNorms on running statistics), which can hold while the owner
    is in train mode (frozen BN fine-tuning), so a forward that branches on
    ``self.training`` is not proven by its eval graph alone."""
    try:
        graph = _trace_in_mode(module, False)
        train = _trace_in_mode(module, True)
    except Exception as e:  # noqa: BLE001  (any failure means: unknown data flow)
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        return f"its forward does not trace with torch.fx ({type(e).__name__}{': ' + msg if msg else ''})"
    if graph.python_code("self").src != train.python_code("self").src:
        return "its forward computes something else in train mode than in eval mode"
    return graph


@dataclass(frozen=True)
class Expr:
    """One value of the traced forward. ``op``: 'input' (the forward's one
    argument), 'module' (a submodule called on one tensor; ``target`` = its
    qualified name), 'add' (tensor + tensor), 'other' (anything else the
    forward computes; ``target`` = the callable or method name).
    ``users`` counts the values and outputs that read this one."""
    op: str
    target: object
    args: Tuple["Expr", ...]
    users: int
    node: str


_ADDS = (operator.add, operator.iadd, torch.add)


def dataflow(graph: fx.Graph) -> Union[Expr, str]:
    """The output of `graph` as an Expr tree, or why it is not one tensor
    computed from one input by submodules, additions and calls."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        names = ", ".join(n.target for n in placeholders)
        return f"its forward takes {len(placeholders)} inputs ({names}), not one"
    (out,) = [n for n in graph.nodes if n.op == "output"]
    if not isinstance(out.args[0], fx.Node):
        return "its forward does not return one tensor"
    dead = [n.name for n in graph.nodes if n.op not in ("output", "placeholder") and not n.users]
    if dead:
        return f"its forward computes values it never uses ({', '.join(dead)})"
    memo = {}

    def build(n: fx.Node) -> Expr:
        if n in memo:
            return memo[n]
        users = len(n.users)
        if n.op == "placeholder":
            e = Expr("input", n.target, (), users, n.name)
        else:
            tensor_args = tuple(build(a) for a in n.args if isinstance(a, fx.Node))
            plain = not n.kwargs and len(tensor_args) == len(n.args)
            if n.op == "call_module" and plain and len(tensor_args) == 1:
                op = "module"
            elif n.op == "call_function" and n.target in _ADDS and plain and len(tensor_args) == 2:
                op = "add"
            else:  # anything else the forward computes: a matcher sees it and refuses
                op = "other"
            e = Expr(op, n.target, tensor_args, users, n.name)
        memo[n] = e
        return e

    return build(out.args[0])


def describe(e: Expr) -> str:
    """A short name of a value for reasons: the submodule or the callable."""
    if e.op == "module":
        return f"self.{e.target}"
    if e.op == "input":
        return "the input"
    if e.op == "add":
        return "an addition"
    t = e.target
    return getattr(t, "__name__", str(t))


def single_user_reason(e: Expr, allowed: int = 1) -> Optional[str]:
    """Why value `e` cannot be fused away: another computation reads it too."""
    if e.users != allowed:
        return f"{describe(e)}'s output is used {e.users} times in forward, so it cannot stay inside a kernel"
    return None


def chain_reason(graph: fx.Graph, names: Sequence[str]) -> Optional[str]:
    """Why `graph` (a traced forward) does not run the submodules `names`
    as one chain: each called exactly once, on one tensor, and each one's
    output read by the next alone (the last one's output may go anywhere)."""
    calls = {}
    for name in names:
        nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
        if len(nodes) != 1:
            return f"its forward calls self.{name} {len(nodes)} times, not once"
        calls[name] = nodes[0]
    for a, b in zip(names, names[1:]):
        na, nb = calls[a], calls[b]
        if nb.args != (na,) or nb.kwargs:
            return f"its forward does not call self.{b} on self.{a}'s output alone"
        if list(na.users) != [nb]:
            return f"self.{a}'s output is read by more than self.{b} in forward, so it cannot stay inside a kernel"
    return None


# Pure reads a forward may compute and drop (``B, C, H, W = x.shape``).
_PURE_READS = (getattr, operator.getitem)
_COMMUTATIVE = (operator.add, operator.mul, torch.add, torch.mul)


def _const_key(a) -> str:
    if isinstance(a, (list, tuple)):
        return type(a).__name__ + "(" + ",".join(_const_key(x) for x in a) + ")"
    if isinstance(a, slice):
        return f"slice({_const_key(a.start)},{_const_key(a.stop)},{_const_key(a.step)})"
    if isinstance(a, (bool, int, float, str, type(None), torch.dtype, torch.memory_format)):
        return f"{type(a).__name__}:{a!r}"
    raise TypeError(f"a {type(a).__name__} argument")


def computation_key(graph: fx.Graph) -> Union[str, Tuple]:
    """A canonical key of what `graph` returns, as a function of its
    inputs: equal keys mean the same operations on the same submodules,
    parameters and constants (operands of commutative + and * in any order;
    names of intermediates and the order of independent lines do not
    matter). A str is the reason there is no key."""
    dead = [n.name for n in graph.nodes if n.op not in ("output", "placeholder") and not n.users
            and not (n.op == "call_function" and n.target in _PURE_READS)]
    if dead:
        return f"its forward computes values it never uses ({', '.join(dead)})"
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    memo = {}

    def key(a):
        if isinstance(a, fx.Node):
            return memo[a]
        return _const_key(a)

    for n in graph.nodes:
        if n.op == "output":
            continue
        try:
            if n.op == "placeholder":
                k = ("input", placeholders.index(n))
            else:
                args = [key(a) for a in n.args]
                if n.op == "call_function" and n.target in _COMMUTATIVE and len(args) == 2 and not n.kwargs:
                    args = sorted(args, key=repr)
                kwargs = tuple(sorted((k, key(v)) for k, v in n.kwargs.items()))
                target = n.target if isinstance(n.target, str) else \
                    f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__qualname__', n.target)}"
                k = (n.op, target, tuple(args), kwargs)
        except (TypeError, KeyError) as e:
            return f"its forward passes {e} to {n.target} (not a tensor or a plain constant)"
        memo[n] = k
    (out,) = [n for n in graph.nodes if n.op == "output"]
    return key(out.args[0])


def same_forward_reason(module: nn.Module, reference: type, forward_of: Optional[type] = None) -> Optional[str]:
    """Why `module`'s forward (``forward_of.forward``, default its own
    class's) does not compute what ``reference.forward`` computes on the
    same submodules, parameters and attributes (None: it does)."""
    keys = []
    for cls in (forward_of or type(module), reference):
        view = module
        if cls is not type(module):
            view = cls.__new__(cls)
            view.__dict__ = module.__dict__
        graph = trace(view)
        k = graph if isinstance(graph, str) else computation_key(graph)
        if isinstance(k, str):
            return k if cls is not reference else f"the reference {reference.__name__} does not trace: {k}"
        keys.append(k)
    if keys[0] != keys[1]:
        return f"its forward does not compute what {reference.__doc__.splitlines()[0].rstrip('.')} computes"
    return None
