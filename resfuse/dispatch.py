"""Backend selection: which implementation of an op runs, and why.

Every op registers candidate implementations under the backend names
``cuda``, ``triton`` and ``eager``. Each candidate answers "can I run this
problem?" with a list of reasons it cannot (empty means yes). ``auto`` tries
them in ``auto_order(problem)`` (``AUTO_ORDER``, except on sm_90 where
Triton goes first) and records the reasons of every candidate it passed
over; an explicit backend that cannot run raises ``BackendUnavailable`` with
its reasons. ``RESFUSE_BACKEND`` replaces ``auto`` when set.
"""

import logging
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from ._backends import cuda_reasons, recording_launches, triton_reasons

log = logging.getLogger("resfuse")

AUTO_ORDER = ("cuda", "triton", "eager")
#: On sm_90 the Triton kernels compile to wgmma with pipelined 16-byte async
#: loads (``python -m resfuse.inspect``) and resfuse._C's kernels to mma.sync
#: only, so Triton goes first there, until a GPU benchmark in bench/results/
#: shows otherwise (none has run yet).
HOPPER_ORDER = ("triton", "cuda", "eager")
BACKENDS = ("auto",) + AUTO_ORDER
ENV_VAR = "RESFUSE_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given problem."""

    def __init__(self, op: str, backend: str, reasons: List[str]):
        self.op, self.backend, self.reasons = op, backend, list(reasons)
        super().__init__(f"resfuse: backend {backend!r} cannot run {op}: " + "; ".join(reasons))


@dataclass
class Decision:
    """What ran for one call: the backend, what was asked for, and for each
    candidate passed over, why."""
    op: str
    backend: str
    requested: str
    skipped: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def fell_back(self) -> bool:
        return self.requested == "auto" and bool(self.skipped)

    def reason(self) -> str:
        return "; ".join(f"{b}: {', '.join(r)}" for b, r in self.skipped.items())


Check = Callable[[object], List[str]]
Run = Callable[[object], object]
_REGISTRY: Dict[str, Dict[str, Tuple[Check, Run]]] = {}
_generation = 0  # bumped by every register(): part of environment()
_last = threading.local()
_logged = set()


def register(op: str, backend: str, check: Check, run: Optional[Run] = None) -> None:
    """Register `backend`'s implementation of `op`. With run=None the backend
    has no implementation of it yet: `check` still supplies the reasons
    (e.g. the extension is not built), and it never runs."""
    if backend not in AUTO_ORDER:
        raise ValueError(f"backend must be one of {AUTO_ORDER}, got {backend!r}")
    if run is None:
        check = _never(op, backend, check)
    _REGISTRY.setdefault(op, {})[backend] = (check, run)
    global _generation
    _generation += 1  # plans made before chose among other implementations


def _never(op: str, backend: str, check: Check) -> Check:
    def reasons(problem) -> List[str]:
        return check(problem) + [f"no {backend} implementation of {op} yet"]
    return reasons


def validate_backend(backend: str, argname: str = "backend") -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{argname} must be one of {BACKENDS}, got {backend!r}")
    return backend


def effective_backend(backend: str) -> str:
    """``auto`` unless the caller or RESFUSE_BACKEND names one."""
    validate_backend(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            return validate_backend(env, argname=f"${ENV_VAR}")
    return backend


@lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    import torch
    return torch.cuda.get_device_capability(index)[0]


def auto_order(problem) -> Tuple[str, ...]:
    """The order ``auto`` tries the backends in for `problem`'s device."""
    dev = getattr(problem, "device", None)
    if getattr(dev, "type", None) == "cuda":
        import torch
        if _capability_major(dev.index if dev.index is not None else torch.cuda.current_device()) == 9:
            return HOPPER_ORDER
    return AUTO_ORDER


def plan(op: str, backend: str, problem) -> Tuple[Decision, Run]:
    """Pick the implementation of `op` for `problem` without running it."""
    impls = _REGISTRY[op]
    requested = effective_backend(backend)
    if requested != "auto":
        if requested not in impls:
            raise BackendUnavailable(op, requested, [f"no {requested} implementation of {op}"])
        check, run = impls[requested]
        reasons = check(problem)
        if reasons:
            raise BackendUnavailable(op, requested, reasons)
        return Decision(op, requested, requested), run
    skipped = {}
    for name in auto_order(problem):
        if name not in impls:
            skipped[name] = [f"no {name} implementation of {op}"]
            continue
        check, run = impls[name]
        reasons = check(problem)
        if not reasons:
            decision = Decision(op, name, "auto", skipped)
            if skipped:
                key = (op, name, decision.reason())
                if key not in _logged:
                    _logged.add(key)
                    log.info("resfuse: %s runs on %s (%s)", op, name, decision.reason())
            return decision, run
        skipped[name] = reasons
    raise BackendUnavailable(op, "auto", [f"{b}: {', '.join(r)}" for b, r in skipped.items()])


class Signature(NamedTuple):
    """What the conv family's backend checks read of a problem: all they
    may read, so ``decide`` can answer from it (and ``explain`` can ask
    before any input is seen)."""
    device: object  # torch.device
    dtype: object   # torch.dtype
    groups: int


#: How many entries ``decide``, ``eager_for_sure`` and each ``ops.plans.PlanCache`` keep before
#: starting afresh (a model sees a few hundred signatures; ever-new shapes must not grow them forever).
MAX_REMEMBERED = 4096
_DECIDED: Dict[tuple, Tuple[Decision, Run]] = {}


def decide(op: str, backend: str, device, dtype, groups: int) -> Tuple[Decision, Run]:
    """``plan`` for an op whose checks read only a ``Signature`` (the conv
    family), remembered per signature, backend and ``environment()``: one
    dict lookup per call once seen. Raises ``BackendUnavailable`` (not
    remembered) as ``plan`` does."""
    key = (op, backend, device, dtype, groups, environment())
    hit = _DECIDED.get(key)
    if hit is None:
        hit = plan(op, backend, Signature(device, dtype, groups))
        if len(_DECIDED) >= MAX_REMEMBERED:
            _DECIDED.clear()
        _DECIDED[key] = hit
    return hit


_EAGER_ONLY: Dict[tuple, Optional[Dict[str, Decision]]] = {}


def eager_for_sure(ops: Tuple[str, ...], backend: str, device, dtype) -> Optional[Dict[str, Decision]]:
    """{op: Decision} when `backend` is 'auto' (after RESFUSE_BACKEND) and
    neither Triton nor resfuse._C can run any of `ops` on tensors of this
    device and dtype at all, whatever their shapes (a CPU without the
    interpreter): the CPU fallback. Else None: the ops decide per problem
    (an explicit 'eager' runs the ops' eager implementations, which the
    tests and ``bench/`` compare with the kernels). Remembered per argument
    and ``environment()``. A fused HorNet module whose parts would all fall
    back runs its original forward then: exactly the eager computation, and
    no slower."""
    key = (ops, backend, device, dtype, environment())
    if key in _EAGER_ONLY:
        return _EAGER_ONLY[key]
    out = None
    if effective_backend(backend) == "auto":
        out = {}
        for op in ops:
            skipped = {"cuda": cuda_reasons(op, device, dtype), "triton": triton_reasons(device, dtype)}
            if not all(skipped.values()):
                out = None
                break
            out[op] = Decision(op, "eager", "auto", skipped)
    if len(_EAGER_ONLY) >= MAX_REMEMBERED:
        _EAGER_ONLY.clear()
    _EAGER_ONLY[key] = out
    return out


def forget_decisions() -> None:
    """Empty ``decide``'s and ``eager_for_sure``'s memory
    (``ops.plans.clear_plans`` calls it)."""
    _DECIDED.clear()
    _EAGER_ONLY.clear()


def run(op: str, backend: str, problem):
    decision, impl = plan(op, backend, problem)
    record(decision)
    return impl(problem)


def record(decision: Decision) -> None:
    """Make `decision` what ``last_decision`` answers (a cached plan's)."""
    _last.decision = decision


def environment() -> tuple:
    """What ``plan`` reads besides the op, the backend and the problem and
    may change while a process runs: RESFUSE_BACKEND, whether launches are
    recorded (``resfuse.inspect``) and the registry's generation; part of
    every cached plan's key. (TRITON_INTERPRET is not: the kernels fix it
    when first imported, and a plan keeps running them as imported.)"""
    return os.environ.get(ENV_VAR), recording_launches(), _generation


def last_decision():
    """The Decision of the most recent op call on this thread (None before any)."""
    return getattr(_last, "decision", None)
