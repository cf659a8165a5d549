"""Once per signature, not once per call: the plan cache of the ops'
implementations, and when an op may be called without its
``torch.library`` wrapper.

A *plan* is what validation and backend selection conclude about a call:
the dispatch ``Decision``, the implementation to run and what the op
derives from its arguments' metadata (the output's shape and memory
format). It depends only on the call's *signature* (``tensor_key`` of each
tensor argument, the other arguments, ``dispatch.environment()``), so a
call whose signature was seen before skips both. The key holds everything
Triton specialises a kernel on: dtypes, shapes and strides (hence which
ints equal 1 or are divisible by 16) and whether each data pointer is
16-byte aligned, so a plan made for an aligned tensor is never used for an
offset view of the same shape. Tensor *values* are never part of a plan
(the BN fold reads the live tensors at every call).

The direct path (``direct_call_ok``): with no gradient to record, no
``torch.compile``/``jit`` tracing, no dispatch or function mode
(``FakeTensorMode``, ``make_fx``, ``FlopCounterMode``, a
``TorchFunctionMode`` watching the ops...), no functorch transform and
plain tensors, the op's implementation is called as a Python function: what the
custom op's dispatcher round trip (its autograd kernel, the redispatch and
the dynamo-disable frame) would add is then pure host time. Every other
call goes through ``torch.ops.resfuse.*``, which ``torch.compile`` and the
modes need to see.

CUDA graphs: a plan is stored after its first call ran, so a Triton kernel
of a cached plan has been compiled (and, with RESFUSE_AUTOTUNE=1, tuned).
A new signature met while the current stream is capturing raises
``CaptureError`` before anything compiles.
"""

from typing import Any, Callable, Dict, List, Optional

import torch

from .. import dispatch

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter


def tensor_key(t: Optional[torch.Tensor]):
    """What a plan depends on of one tensor argument (None for None)."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15


def tensor_keys(*tensors: Optional[torch.Tensor]) -> tuple:
    """``tensor_key`` of each of `tensors`, as one tuple (one call)."""
    return tuple([tensor_key(t) for t in tensors])


try:
    from torch.utils._device import DeviceContext as _DeviceContext
except ImportError:  # a torch without it: every function mode counts
    _DeviceContext = None


def _device_modes_only() -> bool:
    """Whether every active TorchFunctionMode is a default-device context
    (``torch.set_default_device``, ``with torch.device(...)``). Those only
    place factory calls that name no device, and the ops' implementations
    name theirs (they allocate on their inputs' device), so the op need not
    be seen by them."""
    if _DeviceContext is None:
        return False
    stack = torch.overrides._get_current_function_mode_stack()
    return bool(stack) and all(type(m) is _DeviceContext for m in stack)


def plain_call_ok(*tensors: Optional[torch.Tensor]) -> bool:
    """No ``torch.compile``/``jit`` tracing, no dispatch mode, no function
    mode but default-device contexts, no functorch transform, and every
    given tensor a plain Tensor or Parameter: what ``direct_call_ok`` asks
    besides gradients."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or (torch._C._is_torch_function_mode_enabled() and not _device_modes_only())
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None):
        return False
    for t in tensors:
        if t is not None:
            cls = type(t)
            if cls is not _Tensor and cls is not _Parameter:
                return False
    return True


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record a graph for an op on `tensors`."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def direct_call_ok(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an op may run its implementation directly (module docstring)."""
    return plain_call_ok(*tensors) and not needs_grad(*tensors)


def signature(args) -> tuple:
    """The key of an op call's arguments (schema order): each tensor by
    ``tensor_key``, a list of tensors element-wise, the rest as they are,
    and ``dispatch.environment()``."""
    return tuple([tensor_key(a) if isinstance(a, _Tensor)
                  else tuple([tensor_key(t) for t in a]) if isinstance(a, list) else a
                  for a in args]) + (dispatch.environment(),)


def call(impl: Callable, op, *args):
    """``impl(*args)`` where ``direct_call_ok`` for the call's tensors
    (lists of tensors included), else ``op(*args)`` (the
    ``torch.ops.resfuse`` overload packet of the same op)."""
    tensors = []
    for a in args:
        if isinstance(a, list):
            tensors += a
        elif isinstance(a, _Tensor):
            tensors.append(a)
    return impl(*args) if direct_call_ok(*tensors) else op(*args)


class CaptureError(RuntimeError):
    """A fused op met a new signature during CUDA graph capture."""


def _capturing() -> bool:
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


_CACHES: List["PlanCache"] = []


class PlanCache:
    """Plans of one op by signature key, bounded by
    ``dispatch.MAX_REMEMBERED`` (cleared when full)."""

    MAX_PLANS = dispatch.MAX_REMEMBERED

    def __init__(self, op: str):
        self.op = op
        self.plans: Dict[Any, Any] = {}
        _CACHES.append(self)

    def miss(self, key, backend: str, problem, derive: Callable[[Any], Any] = lambda p: None, decided=None):
        """Plan `problem` (already validated), run it and remember the plan
        under `key`: (decision, run, derive(problem)). `decided`: the
        (decision, run) ``dispatch.decide`` gave, else ``dispatch.plan``
        picks them. Returns the output."""
        decision, run = decided or dispatch.plan(self.op, backend, problem)
        if decision.backend == "triton" and _capturing():
            raise CaptureError(
                f"resfuse: {self.op} met a new input signature while a CUDA graph is being captured; its "
                f"Triton kernel would compile (RESFUSE_AUTOTUNE=1: benchmark) inside the capture. Run the "
                f"model once outside the capture with the same shapes, dtypes and memory formats first "
                f"(torch.cuda.make_graphed_callables and torch.compile(mode='reduce-overhead') do).")
        dispatch.record(decision)
        out = run(problem)
        if len(self.plans) >= self.MAX_PLANS:
            self.plans.clear()
        self.plans[key] = (decision, run, derive(problem))
        return out

    def run(self, key, backend: str, make: Callable[[], Any], rebuild: Callable[[Any], Any],
            derive: Callable[[Any], Any]):
        """The op's output for a call of signature `key`: the first time
        `make()` validates the problem and ``miss`` plans and runs it,
        remembering ``derive(problem)`` (its metadata, no tensors); later
        calls run the cached plan on ``rebuild(derived)``, the problem
        built from this call's arguments without validating them again."""
        plan = self.plans.get(key)
        if plan is None:
            return self.miss(key, backend, make(), derive)
        dispatch.record(plan[0])
        return plan[1](rebuild(plan[2]))


def clear_plans() -> None:
    """Forget every op's plans and prepared launches and ``dispatch``'s
    remembered decisions (the test suite does after each test, whose
    patches they may have captured; a change of environment or registry
    needs none: ``dispatch.environment()`` is in every key)."""
    for c in _CACHES:
        c.plans.clear()
    dispatch.forget_decisions()
