"""HorNet's benchmark ops and cases: the gnconv (forward; forward +
backward) and the whole HorBlock (eval forward; forward + backward), at
HorNet-T's four stage shapes. Imported by ``bench.cases`` at its end, which
re-exports these names (``from bench.cases import GnConvCaseSpec`` works).

    op               kind      one timed call
    gnconv           gnconv    y = gnconv(x), eval, no grad
    gnconv_train     train     zero_grad(set_to_none); y = gnconv(x); y.backward(g)   (train mode)
    horblock         horblock  y = block(x), eval, no grad
    horblock_train   train     zero_grad(set_to_none); y = block(x); y.backward(g)    (train mode)

Modules: ``bench.models.make_gnconv`` / ``make_horblock`` (HorNet's
structure and forward, random O(1) weights; the HorBlock's layer scales
O(1) too, drop_path 0 so timings are deterministic), channels_last. eager
is the plain module; compile* ``torch.compile`` of its call (AOTAutograd
compiles the backward); resfuse-* ``resfuse.convert(module, backend=...)``
(a deep copy: ``resfuse.nn.GnConv`` / ``FusedHorBlock``), checked to have
run its fused forward on that backend (``last_decisions``) and, for the
training ops on backend triton, the Triton backward kernels (launch
counters); a row that ran something else is an error or says so.

The check (tests/numerics.py's rule, per tensor) compares the output and,
for the training ops, x's gradient and the main parameters' gradients
with float64 autograd of a float64 copy of the module; a provider that
fails any of them is WRONG and not timed. Costs: ``bench.model.gnconv``
(``gnconv_bytes``; ``gnconv_train_bytes``; ``horblock_bytes``).
"""

import abc
import copy
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch

from resfuse.hornet import HORNET_T_DEPTHS, HORNET_T_SCALE  # noqa: F401  (blocks per stage; s of every gnconv)
from resfuse.reference import gnconv_dims

from .model.gnconv import (HORNET_T_STAGES, GnConvTraffic, StepTraffic, gnconv_bytes, gnconv_train_bytes,
                           horblock_bytes)

from . import case_base as _cases
from . import model as cost_model
from .case_base import Case, Op, Workload, _call_block, _check_fused_ran, _kernels_note, dtype_name
from .model import Cost
from .providers import compiled, reset_compile_state, resfuse_backend

# ----------------------------------------------------------------------------
# HorNet's gnconv
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GnConvCaseSpec:
    """One gnconv shape: dim x H x W in and out, ``order`` gated 1x1
    stages, a ksize x ksize depthwise conv, scale ``s``. The gnconv ops
    run the token mixer alone (no norm, no residual, as HorNet's ``gnconv``
    module runs); the horblock ops the whole HorBlock around it."""
    dim: int
    order: int
    H: int
    W: int
    s: float = HORNET_T_SCALE
    ksize: int = 7

    @property
    def dims(self) -> List[int]:
        return gnconv_dims(self.dim, self.order)

    def mixer(self) -> str:
        s = "1/3" if abs(self.s - 1 / 3) < 1e-12 else f"{self.s:g}"
        return f"order {self.order} dims {'/'.join(map(str, self.dims))} dw{self.ksize}x{self.ksize} s={s}"

    def describe(self) -> str:
        return f"gnconv {self.dim}x{self.H}x{self.W} {self.mixer()}"


def gnconv_traffic(spec: GnConvCaseSpec, batch: int, dtype: torch.dtype) -> GnConvTraffic:
    """``bench.model.gnconv.gnconv_bytes`` for the case (the one byte model)."""
    return gnconv_bytes(spec.dim, spec.order, spec.H, spec.W, batch, dtype_name(dtype), ksize=spec.ksize)


def gnconv_cost(spec: GnConvCaseSpec, batch: int, dtype: torch.dtype) -> Cost:
    """The columns, meaning what they mean for the other ops: ``fused_bytes``
    = what resfuse's fused design moves (its 2 kernels: ``fused_bytes`` of
    the traffic model, not its single-kernel ``minimal_bytes``),
    ``unfused_bytes`` = what HorNet's eager op sequence moves (``eager_bytes``)."""
    t = gnconv_traffic(spec, batch, dtype)
    return Cost(t.flops, t.fused_bytes, t.eager_bytes)


def kernel_costs(t: StepTraffic) -> List[Cost]:
    """One Cost per fused kernel of a step model, then one for its
    parameters (read at the bandwidth): a case's floor is their
    ``layers_floor``. They sum to the model's fused totals."""
    return [Cost(f, b, b) for _, f, b in t.fused_kernel_costs()]


def gnconv_kernel_costs(spec: GnConvCaseSpec, batch: int, dtype: torch.dtype) -> List[Cost]:
    """The gnconv case's kernels: proj_in, the chain (``bench.model.gnconv``'s
    fused steps), then the parameters; they sum to ``gnconv_cost``."""
    return kernel_costs(gnconv_traffic(spec, batch, dtype).steps)


@lru_cache(maxsize=4)
def _seeded_gnconv(spec: GnConvCaseSpec, seed: int):
    from .models import make_gnconv
    return make_gnconv(spec.dim, spec.order, spec.s, spec.ksize, seed=seed)


class GnConvOp(Op):
    """HorNet's gnconv (``bench.models.PlainGnConv``: HorNet's structure and
    forward, random O(1)-gain weights, eval, channels_last), input
    dim x H x W.

    eager: the plain module (one PyTorch op per step); compile*:
    torch.compile of it; resfuse-*: ``resfuse.nn.GnConv.from_module(plain,
    backend=...)`` (2 kernels: proj_in, then dwconv + gates + pws chain +
    proj_out). Each argument set holds its own input and its own module copy,
    so weights rotate too. Byte/FLOP model: ``bench.model.gnconv``."""
    name = "gnconv"

    def describe(self, case):
        return case.spec.describe()

    def cost(self, case, batch, dtype):
        return gnconv_cost(case.spec, batch, dtype)

    def floor(self, case, batch, dtype, ceilings):
        peak = ceilings.peak(dtype_name(dtype))
        if peak is None:
            return None
        return cost_model.layers_floor(gnconv_kernel_costs(case.spec, batch, dtype), peak, ceilings.bandwidth)

    def max_sets(self):
        return 64

    def make_workload(self, case, device, dtype, batch, n_sets, seed):
        s: GnConvCaseSpec = case.spec
        base = _seeded_gnconv(s, seed)
        cl = torch.channels_last
        mods = [copy.deepcopy(base).to(device=device, dtype=dtype).to(memory_format=cl).eval()
                for _ in range(n_sets)]
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        sets = [(torch.randn(batch, s.dim, s.H, s.W, generator=gen, device=device).to(dtype)
                 .contiguous(memory_format=cl), m) for m in mods]
        from resfuse.reference import gnconv_reference, to_float64
        m0 = mods[0]
        x, w_in, b_in, w_dw, b_dw, w_out, b_out = to_float64(
            sets[0][0], m0.proj_in.weight, m0.proj_in.bias, m0.dwconv.weight, m0.dwconv.bias,
            m0.proj_out.weight, m0.proj_out.bias)
        w_pws = list(to_float64(*[p.weight for p in m0.pws])) if len(m0.pws) else []
        b_pws = list(to_float64(*[p.bias for p in m0.pws])) if len(m0.pws) else []
        with torch.no_grad():
            ref = gnconv_reference(x.contiguous(), w_in.contiguous(), b_in, w_dw.contiguous(), b_dw,
                                   [w.contiguous() for w in w_pws], b_pws, w_out.contiguous(), b_out, float(m0.scale))
        return Workload(case, device, dtype, batch, sets, ref, state={"modules": mods})

    def build(self, provider, wl):
        if provider == "eager":
            return _call_block
        if provider.startswith("compile"):
            reset_compile_state()
            return compiled(_call_block, provider)
        if provider.startswith("resfuse-"):
            from resfuse.nn import GnConv
            backend = resfuse_backend(provider)
            fused = {id(m): GnConv.from_module(m, backend=backend) for m in wl.state["modules"]}
            # What ran, checked once: both kernels on this backend (a module that
            # silently ran its original forward would time eager under resfuse's name).
            x0, m0 = wl.arg_sets[0]
            before = _cuda_counters()
            _check_fused_ran(wl, provider, backend, fused[id(m0)], x0, ["proj_in", "chain"], "fused gnconv")
            if backend == "cuda":
                wl.state.setdefault("cuda_launches", {})[provider] = _grown(before, _cuda_counters())

            def run(x, m):
                return fused[id(m)](x)
            return run
        raise ValueError(f"gnconv has no provider {provider!r}")

    def note(self, wl, provider):
        grew = wl.state.get("cuda_launches", {}).get(provider)
        if grew:  # two ops, o + 2 resfuse._C kernels
            return "2 ops, resfuse._C launches: " + ", ".join(f"{k} {v}" for k, v in grew.items())
        return _kernels_note(wl, provider)


# ----------------------------------------------------------------------------
# gnconv forward + backward, HorBlock forward and forward + backward
# ----------------------------------------------------------------------------

#: The Triton backward kernels (kernels/gnconv_bwd.py, kernels/conv1x1.py)
#: a resfuse-triton training row must show launches of, once they exist.
BWD_KERNELS = ("gnconv_chain_bwd", "dwconv_bwd", "conv1x1_dgrad", "conv1x1_wgrad")


def _launch_counters() -> Optional[Dict[str, int]]:
    """A copy of resfuse's Triton launch counters (None where the kernels
    cannot be imported)."""
    try:
        from resfuse._backends import kernels_module
        return dict(kernels_module("_common").LAUNCHES_BY_KERNEL)
    except Exception:  # noqa: BLE001  (no Triton here)
        return None


def _cuda_counters() -> Dict[str, int]:
    """A copy of the cuda backend's resfuse._C call counters."""
    from resfuse.ops import gnconv_cuda
    return dict(gnconv_cuda.LAUNCHES)


def _grown(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


#: resfuse._C kernels a resfuse-cuda training row must show calls of.
CUDA_BWD_KERNELS = ("dwconv_gate_backward", "pixel_wgrad")


def fused_decisions(module) -> Dict[str, str]:
    """'gnconv.proj_in' -> 'layernorm_conv1x1:triton': the dispatch
    decision of every fused submodule's last call (``last_decisions``)."""
    out = {}
    for name, m in module.named_modules():
        for k, d in (getattr(m, "last_decisions", None) or {}).items():
            out[f"{name}.{k}" if name else k] = f"{d.op}:{d.backend}"
    return out


@lru_cache(maxsize=4)
def _seeded_horblock(spec: GnConvCaseSpec, seed: int):
    from .models import make_horblock
    return make_horblock(spec.dim, spec.order, spec.s, spec.ksize, seed=seed)


class _HornetModuleOp(Op):
    """A HorNet module (gnconv or HorBlock) per argument set, channels_last;
    eval forward, or (``train``) one training step: every parameter's and
    x's gradient set to None, ``y = module(x)``, ``y.backward(g)``. The
    callable returns the output (eval) or {'y', 'dx', '<param>.grad' for
    each of ``grads``} (train), compared with float64 autograd of a float64
    copy of the module."""
    train = False
    #: fused ops (keys of ``fused_decisions``) a resfuse row must have run
    want: Tuple[str, ...] = ()
    #: parameters whose gradients the training check compares
    grads: Tuple[str, ...] = ()

    @abc.abstractmethod
    def base_module(self, spec: GnConvCaseSpec, seed: int):
        """The plain module (HorNet's structure, seeded weights) for ``spec``."""

    @abc.abstractmethod
    def traffic(self, case, batch, dtype) -> StepTraffic:
        """The byte/FLOP step model of one call."""

    @abc.abstractmethod
    def label(self, spec: GnConvCaseSpec) -> str:
        """The case's one-line description."""

    def describe(self, case):
        return self.label(case.spec)

    def cost(self, case, batch, dtype):
        t = self.traffic(case, batch, dtype)
        return Cost(t.flops, t.fused_bytes, t.eager_bytes)

    def floor(self, case, batch, dtype, ceilings):
        """The sum of the fused design's kernels' floors (recomputation
        included), its parameter traffic at the bandwidth."""
        peak = ceilings.peak(dtype_name(dtype))
        if peak is None:
            return None
        return cost_model.layers_floor(kernel_costs(self.traffic(case, batch, dtype)), peak, ceilings.bandwidth)

    def max_sets(self):
        return 64

    def make_workload(self, case, device, dtype, batch, n_sets, seed):
        s: GnConvCaseSpec = case.spec
        base = self.base_module(s, seed)
        cl = torch.channels_last
        mods = [copy.deepcopy(base).to(device=device, dtype=dtype).to(memory_format=cl).train(self.train)
                for _ in range(n_sets)]
        gen = torch.Generator(device=device).manual_seed(seed + 1)

        def randn():
            return torch.randn(batch, s.dim, s.H, s.W, generator=gen, device=device).to(dtype).contiguous(
                memory_format=cl)

        if self.train:  # x is a leaf that requires grad; g is the fixed gradient of the output
            sets = [(randn().requires_grad_(), m, randn()) for m in mods]
        else:
            sets = [(randn(), m) for m in mods]
        return Workload(case, device, dtype, batch, sets, self.reference(mods[0], sets[0]), state={"modules": mods})

    def reference(self, module, args):
        ref = copy.deepcopy(module).to(torch.float64).to(memory_format=torch.contiguous_format)
        x = args[0].detach().to(torch.float64).contiguous()
        if not self.train:
            with torch.no_grad():
                return ref(x)
        x.requires_grad_()
        with torch.enable_grad():
            y = ref(x)
            y.backward(args[2].detach().to(torch.float64).contiguous())
        params = dict(ref.named_parameters())
        return self._outputs(y, x, [(n, params[n]) for n in self.grads])

    @staticmethod
    def _outputs(y, x, checked):
        out = {"y": y.detach(), "dx": x.grad}
        out.update((f"{n}.grad", p.grad) for n, p in checked)
        return out

    def build(self, provider, wl):
        mods = wl.state["modules"]
        call, backend = _call_block, None
        if provider == "eager":
            targets = {id(m): m for m in mods}
        elif provider.startswith("compile"):
            reset_compile_state()
            targets, call = {id(m): m for m in mods}, compiled(_call_block, provider)
        elif provider.startswith("resfuse-"):
            import resfuse
            backend = resfuse_backend(provider)
            targets = {id(m): resfuse.convert(m, backend=backend) for m in mods}  # deep copies
        else:
            raise ValueError(f"{self.name} has no provider {provider!r}")
        if self.train:
            # the parameter lists, found once: a timed call only clears and runs
            params = {k: list(t.parameters()) for k, t in targets.items()}
            checked = {k: [(n, dict(t.named_parameters())[n]) for n in self.grads] for k, t in targets.items()}

            def run(x, m, g):
                key = id(m)
                with torch.enable_grad():
                    for p in params[key]:  # zero_grad(set_to_none=True)
                        p.grad = None
                    x.grad = None
                    y = call(x, targets[key])
                    y.backward(g)
                return self._outputs(y, x, checked[key])
        else:
            def run(x, m):
                return call(x, targets[id(m)])
        if backend is not None:
            self._check_ran(wl, provider, backend, targets[id(wl.arg_sets[0][1])], lambda: run(*wl.arg_sets[0]))
        return run

    def _check_ran(self, wl, provider, backend, module, call):
        """Run once and require that the fused ops ``want`` ran, each on
        `backend` (a module that silently ran its original forward would
        time eager under resfuse's name). On triton, count the Triton
        launches of the call; a training step must have launched every
        backward kernel once they exist (before that, the note says that
        the backward ran autograd's eager recomputation). Records all of it
        for the row's note."""
        before = _launch_counters() if backend == "triton" else None
        before_cuda = _cuda_counters()
        if self.train:
            call()
        else:
            with torch.no_grad():
                call()
        ran = fused_decisions(module)
        if any(w not in ran for w in self.want) or any(not v.endswith(":" + backend) for v in ran.values()):
            raise RuntimeError(f"fused {self.name} did not run {list(self.want)} on {backend}: "
                               f"ran {ran or 'nothing fused'}")
        info = {"fwd": list(dict.fromkeys(v.split(":")[0] for v in ran.values()))}
        if before is not None:
            after = _launch_counters() or {}
            info["launches"] = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
            if self.train:
                if "gnconv_chain_bwd" in after:  # the backward kernels have landed: they must have run
                    idle = [k for k in BWD_KERNELS if not info["launches"].get(k)]
                    if idle:
                        raise RuntimeError(f"fused {self.name}: the backward launched no {', '.join(idle)} on "
                                           f"triton (launched {info['launches'] or 'nothing'})")
                    info["bwd"] = "Triton kernels"
                else:
                    info["bwd"] = "autograd's eager recomputation (no Triton backward kernels yet)"
        elif backend == "cuda":
            info["cuda_launches"] = _grown(before_cuda, _cuda_counters())
            if self.train:
                idle = [k for k in CUDA_BWD_KERNELS if not info["cuda_launches"].get(k)]
                if idle:
                    raise RuntimeError(f"fused {self.name}: the backward called no {', '.join(idle)} on cuda "
                                       f"(called {info['cuda_launches'] or 'nothing'})")
                info["bwd"] = "resfuse._C kernels"
        elif self.train:
            info["bwd"] = f"{backend} autograd"
        wl.state.setdefault("ran", {})[provider] = info

    def note(self, wl, provider):
        info = wl.state.get("ran", {}).get(provider)
        if not info:
            return ""
        parts = [f"fused fwd: {', '.join(info['fwd'])}"]
        if info.get("launches") is not None:
            t = self.traffic(wl.case, wl.batch, wl.dtype)
            adds = t.fused_launches - t.fused_kernels
            design = f"{t.fused_kernels}" + (f" + {adds} autograd add{'s' if adds > 1 else ''}" if adds else "")
            parts.append(f"Triton launches {sum(info['launches'].values())} (design: {design}): "
                         + ", ".join(f"{k} {v}" for k, v in info["launches"].items()))
        if info.get("cuda_launches"):
            parts.append(f"resfuse._C launches {sum(info['cuda_launches'].values())}: "
                         + ", ".join(f"{k} {v}" for k, v in info["cuda_launches"].items()))
        if info.get("bwd"):
            parts.append(f"bwd: {info['bwd']}")
        return "; ".join(parts)


class GnConvTrainOp(_HornetModuleOp):
    """HorNet's gnconv (``make_gnconv``, train mode), one training step
    (forward + backward, x requiring grad). resfuse-*:
    ``resfuse.convert`` -> ``resfuse.nn.GnConv``. Bytes:
    ``gnconv_train_bytes`` (eager 2o + 3 + 5o + 9 kernels, fused 2 + o + 4)."""
    name = "gnconv_train"
    train = True
    want = ("proj_in", "chain")
    grads = ("proj_in.weight", "proj_in.bias", "dwconv.weight", "dwconv.bias", "pws.0.weight", "proj_out.weight")

    def label(self, spec):
        return f"{spec.describe()}, forward + backward"

    def base_module(self, spec, seed):
        return _seeded_gnconv(spec, seed)

    def traffic(self, case, batch, dtype):
        s = case.spec
        return gnconv_train_bytes(s.dim, s.order, s.H, s.W, batch, dtype_name(dtype), ksize=s.ksize)


class HorBlockOp(_HornetModuleOp):
    """HorNet's HorBlock (``make_horblock``: O(1) layer scales, drop_path 0,
    eval), forward. resfuse-*: ``resfuse.convert`` ->
    ``resfuse.nn.FusedHorBlock`` (norm1 + gnconv + gamma1 + residual fused;
    the MLP half as that module runs it: the note's launch count says).
    Bytes: ``horblock_bytes(train=False)`` (the fused design: 4 kernels)."""
    name = "horblock"
    want = ("gnconv.proj_in", "gnconv.chain")

    def label(self, spec):
        return (f"HorBlock {spec.dim}x{spec.H}x{spec.W} (gnconv {spec.mixer()}; MLP {spec.dim}-{4 * spec.dim}-"
                f"{spec.dim}), eval forward")

    def base_module(self, spec, seed):
        return _seeded_horblock(spec, seed)

    def traffic(self, case, batch, dtype):
        s = case.spec
        return horblock_bytes(s.dim, s.order, s.H, s.W, batch, dtype_name(dtype), ksize=s.ksize, train=False)


class HorBlockTrainOp(HorBlockOp):
    """The HorBlock in train mode, one training step (forward + backward).
    Bytes: ``horblock_bytes(train=True)``."""
    name = "horblock_train"
    train = True
    grads = ("norm1.weight", "gnconv.proj_in.weight", "gnconv.dwconv.weight", "gnconv.pws.0.weight",
             "gnconv.proj_out.weight", "gamma1", "norm2.weight", "pwconv1.weight", "pwconv2.weight", "gamma2")

    def label(self, spec):
        return super().label(spec).replace("eval forward", "forward + backward")

    def traffic(self, case, batch, dtype):
        s = case.spec
        return horblock_bytes(s.dim, s.order, s.H, s.W, batch, dtype_name(dtype), ksize=s.ksize, train=True)


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------

#: gnconv in --quick: HorNet-T stage 3 (256 x 14 x 14, order 4: 18 of the
#: model's 25 gnconvs), at the first quick batch only and without
#: torch.compile (its compile and the Triton autotuning would crowd the GPU
#: box's quick budget; the full run has every provider at every batch).
QUICK_GNCONV = {"gnconv.hornet_t.stage3"}
QUICK_GNCONV_PROVIDERS = ("eager", "resfuse-triton", "resfuse-cuda", "resfuse-eager")
#: Training in --quick: stage 3's gnconv and HorBlock, likewise.
QUICK_HORNET_TRAIN = {"gnconv_train.hornet_t.stage3", "horblock_train.hornet_t.stage3"}

OPS: Dict[str, Op] = {"gnconv": GnConvOp(), "gnconv_train": GnConvTrainOp(), "horblock": HorBlockOp(),
                      "horblock_train": HorBlockTrainOp()}
KINDS = {"gnconv": "gnconv", "gnconv_train": "train", "horblock": "horblock", "horblock_train": "train"}


def _register() -> None:
    _cases.OPS.update(OPS)
    _cases.KINDS.update(KINDS)
    quick_sets = {"gnconv": QUICK_GNCONV, "gnconv_train": QUICK_HORNET_TRAIN, "horblock": set(),
                  "horblock_train": QUICK_HORNET_TRAIN}
    for op in OPS:
        part = ".gnconv" if op.startswith("gnconv") else ""  # a gnconv case stands for gnconvs, a block's for blocks
        for i, ((dim, order, hw), depth) in enumerate(zip(HORNET_T_STAGES, HORNET_T_DEPTHS)):
            name = f"{op}.hornet_t.stage{i + 1}"
            quick = name in quick_sets[op]
            _cases.register(Case(name, op, "hornet_t", GnConvCaseSpec(dim, order, hw, hw, HORNET_T_SCALE, 7),
                                 tuple(f"stages.{i}.{j}{part}" for j in range(depth)), quick=quick,
                                 quick_providers=QUICK_GNCONV_PROVIDERS if quick else None))


_register()
