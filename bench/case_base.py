"""What every benchmark case module shares: ``Case``, ``Workload``, the
``Op`` interface, the output check, the registries (``OPS``, ``KINDS``,
``REGISTRY``) and ``register``. ``bench/cases.py`` (conv layers, ResNet
blocks, whole models) and ``bench/cases_hornet.py`` (HorNet's ops) each
import this and add their ops and cases; neither imports the other's
internals.
"""

import abc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import model as cost_model
from .model import Cost, Floor

BATCHES = (1, 32, 256)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_FULL_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the cost model's name)."""
    return _FULL_DTYPE[dtype]


@dataclass(frozen=True)
class Case:
    name: str                   # 'resnet50.conv3_x.0.conv2', 'block.resnet50.conv3_x.0', 'model.resnet50'
    op: str                     # key of OPS
    group: str                  # the model it comes from
    spec: object                # ConvSpec (conv_bn_act), BlockSpec (resnet_block), the arch name (model)
    layers: Tuple[str, ...] = ()  # the model layers (or blocks) this case stands for
    quick: bool = False         # part of --quick
    batches: Tuple[int, ...] = BATCHES
    #: --quick runs only these providers on this case (None: all of the run's);
    #: keeps a costly set-up (torch.compile) out of the GPU box's quick budget
    quick_providers: Optional[Tuple[str, ...]] = None

    @property
    def count(self) -> int:
        return max(1, len(self.layers))

    @property
    def kind(self) -> str:
        """One of ``KIND_ORDER``: 'layer', 'block', 'gnconv', 'model', 'horblock'
        or 'train' (``run.py --kind``, the summary's groups)."""
        return KINDS.get(self.op, "layer")

    def describe(self) -> str:
        return OPS[self.op].describe(self)

    def cost(self, batch: int, dtype: torch.dtype) -> Cost:
        return OPS[self.op].cost(self, batch, dtype)

    def floor(self, batch: int, dtype: torch.dtype, ceilings: cost_model.Ceilings) -> Optional[Floor]:
        return OPS[self.op].floor(self, batch, dtype, ceilings)


@dataclass
class Workload:
    """A case on a device, in a dtype, at a batch size.

    ``arg_sets``: argument tuples of identical shapes, cycled through by the
    timer so the working set exceeds L2; every provider's callable takes
    ``*arg_sets[i]`` (a block case's sets are ``(x, block)``: each set has its
    own copy of the block, so its weights rotate too). ``reference``: float64
    output for ``arg_sets[0]``: a tensor, or for an op whose call yields
    several (a training step: the output and gradients) a dict of them,
    which every provider's callable returns too (see ``check``)."""
    case: Case
    device: torch.device
    dtype: torch.dtype
    batch: int
    arg_sets: List[tuple]
    reference: torch.Tensor
    state: dict = field(default_factory=dict)  # op-private (the model, say)


def tolerances(numerics, eager_out, reference, dtype: torch.dtype):
    """The check's tolerance (tests/numerics.py: max(2 x eager's error,
    floor)) of each output: a float, or a dict like ``reference``."""
    if isinstance(reference, dict):
        return {k: numerics.tolerance(eager_out[k], ref, dtype) for k, ref in reference.items()}
    return numerics.tolerance(eager_out, reference, dtype)


def check(numerics, out, reference, tol) -> Tuple[float, float, str]:
    """(rel err, tolerance, name) of the output furthest beyond its
    tolerance (largest err / tol; name '' for a single tensor). The
    provider passes iff err <= tolerance there, i.e. everywhere."""
    if not isinstance(reference, dict):
        return numerics.rel_err(out, reference), tol, ""
    worst = None
    for k, ref in reference.items():
        got = out.get(k) if isinstance(out, dict) else None
        err = float("inf") if got is None else numerics.rel_err(got, ref)
        if worst is None or err / tol[k] > worst[0] / worst[1]:
            worst = (err, tol[k], k)
    return worst


class Op(abc.ABC):
    """How one kind of case is costed, instantiated and run per provider
    (the abstract methods are what each kind must say)."""
    name = ""

    @abc.abstractmethod
    def describe(self, case: Case) -> str:
        """The case's one-line description (its shapes)."""

    @abc.abstractmethod
    def cost(self, case: Case, batch: int, dtype: torch.dtype) -> Cost:
        """FLOPs, fused and eager bytes of one call (``bench.model``)."""

    def floor(self, case, batch, dtype, ceilings) -> Optional[Floor]:
        peak = ceilings.peak(dtype_name(dtype))
        if peak is None:
            return None
        c = self.cost(case, batch, dtype)
        return cost_model.floor_time(c.flops, c.fused_bytes, peak, ceilings.bandwidth)

    def set_bytes(self, case: Case, batch: int, dtype: torch.dtype) -> int:
        """Bytes one argument set brings into the caches (for the rotation count)."""
        return self.cost(case, batch, dtype).fused_bytes

    def max_sets(self) -> int:
        return 256

    @abc.abstractmethod
    def make_workload(self, case, device, dtype, batch, n_sets, seed) -> Workload:
        """``n_sets`` argument sets on ``device`` and the float64 reference."""

    @abc.abstractmethod
    def build(self, provider: str, wl: Workload) -> Callable:
        """The callable ``provider`` times on ``wl`` (ValueError for a provider the op does not know)."""

    def note(self, wl: Workload, provider: str) -> str:
        """A remark for the result row once `provider` has run ('' if none)."""
        return ""


def _call_block(x, block):
    """Every provider's call: the set's own block copy on the set's input
    (torch.compile traces this once; the copies' parameters are graph
    inputs, so the other copies reuse the compiled code)."""
    return block(x)


def _check_fused_ran(wl, provider, backend, module, x, want, what):
    """Run a fused module once and require that exactly the ops `want` ran,
    each on `backend` (a module that silently ran its original forward would
    time eager under resfuse's name). Records them for the row's note."""
    with torch.no_grad():
        module(x)
    ran = {name: f"{d.op}:{d.backend}" for name, d in module.last_decisions.items()}
    if sorted(ran) != sorted(want) or any(not v.endswith(":" + backend) for v in ran.values()):
        raise RuntimeError(f"{what} did not run {want} on {backend}: ran {ran or 'nothing fused'}")
    wl.state.setdefault("ran", {})[provider] = [ran[n] for n in want]


def _kernels_note(wl, provider) -> str:
    ran = wl.state.get("ran", {}).get(provider)
    return f"{len(ran)} kernels: " + ", ".join(r.split(":")[0] for r in ran) if ran else ""


#: Every op and its kind: bench/cases.py adds the conv, block and model ops, bench/cases_hornet.py HorNet's.
OPS: Dict[str, "Op"] = {}
KINDS: Dict[str, str] = {}
#: The kinds in run order (``select`` sorts by it, then by registration),
#: and the ones ``--quick`` runs at its first batch size only.
KIND_ORDER = ("layer", "block", "gnconv", "model", "horblock", "train")
FIRST_BATCH_ONLY_KINDS = ("gnconv", "model", "horblock", "train")
REGISTRY: Dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.op not in OPS:
        raise ValueError(f"case {case.name!r}: unknown op {case.op!r}; known: {sorted(OPS)}")
    if case.name in REGISTRY:
        raise ValueError(f"case {case.name!r} registered twice")
    REGISTRY[case.name] = case
    return case
