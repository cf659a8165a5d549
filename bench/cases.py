"""The case registry: what the benchmarks measure.

A ``Case`` is one benchmark problem without its batch size and dtype: a
conv -> BN -> (+ residual) -> act layer (op ``conv_bn_act``), a whole
ResNet residual block (op ``resnet_block``) or a whole model (op
``model``). Each op is an ``Op`` object registered in ``OPS``: it
knows the case's cost (``bench.model``), makes a ``Workload`` (inputs on a
device, in a dtype, at a batch; several rotated argument sets; the float64
reference) and builds each provider's callable for it.

Adding an op is: write an ``Op`` subclass, put it in ``OPS`` (and its
kind in ``KINDS``), and ``register`` its cases.

Registered here: the distinct conv-BN-act layers of ResNet-18, ResNet-50
(stem, conv2_x..conv5_x, strided and downsample convs) and VGG16-bn, each
with the layers it stands for; the distinct residual blocks of ResNet-18
(BasicBlock) and ResNet-50 (Bottleneck), identity and projection shortcut,
strided or not, each with the blocks it stands for (``block.resnet50.conv3_x.0``
stands for ``layer2.0``); and the three whole models. HorNet's ops and
cases (gnconv forward, gnconv forward + backward, HorBlock forward and
forward + backward, at HorNet-T's four stage shapes) live in
``bench/cases_hornet.py``, which this module imports at its end (its names
are still importable from here).
"""

import copy
from functools import lru_cache
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import model as cost_model
from .archs import ARCHS, RESNET_BLOCK_ARCHS, distinct_blocks, distinct_convs, friendly_name, resnet_blocks
from .model import BlockSpec, ConvSpec
# The shared names, importable from here as before (bench/run.py, the tests).
from .case_base import (BATCHES, DTYPE_NAMES, DTYPES, FIRST_BATCH_ONLY_KINDS, KIND_ORDER, KINDS, OPS,  # noqa: F401
                        REGISTRY, Case, Op, Workload, _call_block, _check_fused_ran, _kernels_note, check,
                        dtype_name, register, tolerances)
from .providers import compiled, reset_compile_state, resfuse_backend

# ----------------------------------------------------------------------------
# conv -> BN -> (+ residual) -> act
# ----------------------------------------------------------------------------

def _eager_conv_bn_act(x, w, b, mean, var, gamma, beta, res, *, spec: ConvSpec):
    """What PyTorch eager runs for Conv2d -> BatchNorm2d -> (+=) -> ReLU,
    in-place where torchvision is in-place."""
    y = F.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups)
    if spec.bn:
        y = F.batch_norm(y, mean, var, gamma, beta, False, 0.0, spec.eps)
    if res is not None:
        y += res
    if spec.act == "relu":
        y = y.relu_()
    elif spec.act != "identity":
        from resfuse.activations import get_activation
        y = get_activation(spec.act).eager(y, 0.01)
    return y


class ConvBNActOp(Op):
    name = "conv_bn_act"

    def describe(self, case):
        return case.spec.describe()

    def cost(self, case, batch, dtype):
        return cost_model.conv_cost(case.spec, batch, dtype_name(dtype))

    def make_workload(self, case, device, dtype, batch, n_sets, seed):
        s: ConvSpec = case.spec
        gen = torch.Generator(device=device).manual_seed(seed)
        cl = torch.channels_last

        def randn(*shape, scale=1.0):
            return torch.randn(*shape, generator=gen, device=device) * scale

        def rand(*shape):
            return torch.rand(*shape, generator=gen, device=device)

        sets = []
        fan_in = (s.C // s.groups) * s.R * s.S
        for _ in range(n_sets):
            x = randn(batch, s.C, s.H, s.W)
            w = randn(s.K, s.C // s.groups, s.R, s.S, scale=fan_in ** -0.5)
            b = randn(s.K, scale=0.1) if s.bias else None
            if s.bn:
                mean = randn(s.K, scale=0.1)
                var = rand(s.K) + 0.5
                gamma = rand(s.K) + 0.5
                beta = randn(s.K, scale=0.1)
            else:
                mean = var = gamma = beta = None
            res = randn(batch, s.K, s.P, s.Q) if s.residual else None
            args = (x, w, b, mean, var, gamma, beta, res)
            sets.append(tuple(None if t is None else
                              t.to(device, dtype).contiguous(memory_format=cl if t.dim() == 4 else
                                                             torch.contiguous_format)
                              for t in args))
        from resfuse.reference import conv_bn_act_reference, to_float64
        x, w, b, mean, var, gamma, beta, res = to_float64(*sets[0])
        ref = conv_bn_act_reference(x.contiguous(), w.contiguous(), b, mean, var, gamma, beta, s.eps,
                                    None if res is None else res.contiguous(),
                                    (s.stride,) * 2, (s.padding,) * 2, (s.dilation,) * 2, s.groups, s.act)
        return Workload(case, device, dtype, batch, sets, ref)

    def build(self, provider, wl):
        s: ConvSpec = wl.case.spec

        def eager(*args):
            return _eager_conv_bn_act(*args, spec=s)

        if provider == "eager":
            return eager
        if provider.startswith("compile"):
            reset_compile_state()
            return compiled(eager, provider)
        if provider.startswith("resfuse-"):
            import resfuse
            backend = resfuse_backend(provider)

            def fused(x, w, b, mean, var, gamma, beta, res):
                return resfuse.conv_bn_act(x, w, b, bn_mean=mean, bn_var=var, bn_weight=gamma, bn_bias=beta,
                                           eps=s.eps, residual=res, stride=s.stride, padding=s.padding,
                                           dilation=s.dilation, groups=s.groups, activation=s.act,
                                           backend=backend)
            return fused
        raise ValueError(f"conv_bn_act has no provider {provider!r}")


# ----------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _calibrated_model(name: str, seed: int, image: int):
    from .models import make_model
    return make_model(name, seed=seed, image=image)


class ModelOp(Op):
    name = "model"
    image = 224

    def describe(self, case):
        return f"{case.spec} {self.image}x{self.image} eval forward"

    def layers(self, case):
        return ARCHS[case.spec](self.image)

    def cost(self, case, batch, dtype):
        return cost_model.model_cost(self.layers(case), batch, dtype_name(dtype))

    def floor(self, case, batch, dtype, ceilings):
        peak = ceilings.peak(dtype_name(dtype))
        if peak is None:
            return None
        costs = [cost_model.layer_cost(spec, batch, dtype_name(dtype)) for _, spec in self.layers(case)]
        return cost_model.layers_floor(costs, peak, ceilings.bandwidth)

    def set_bytes(self, case, batch, dtype):
        return batch * 3 * self.image * self.image * cost_model.elem_bytes(dtype_name(dtype))

    def max_sets(self):
        return 8  # the model's own activations and weights dwarf its input

    def make_workload(self, case, device, dtype, batch, n_sets, seed):
        base = _calibrated_model(case.spec, seed, self.image)
        model = copy.deepcopy(base).to(device=device, dtype=dtype).to(memory_format=torch.channels_last).eval()
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        sets = [(torch.randn(batch, 3, self.image, self.image, generator=gen, device=device)
                 .to(dtype).contiguous(memory_format=torch.channels_last),) for _ in range(n_sets)]
        ref_model = copy.deepcopy(model).to(torch.float64).to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            ref = ref_model(sets[0][0].to(torch.float64).contiguous())
        del ref_model
        return Workload(case, device, dtype, batch, sets, ref, state={"model": model})

    def build(self, provider, wl):
        model = wl.state["model"]
        if provider == "eager":
            fn = model
        elif provider.startswith("compile"):
            reset_compile_state()
            fn = compiled(model, provider)
        elif provider.startswith("resfuse-"):
            import resfuse
            fn = resfuse.convert(model, backend=resfuse_backend(provider))
            wl.state.setdefault("converted", {})[provider] = fn
        else:
            raise ValueError(f"model has no provider {provider!r}")

        def run(x):
            with torch.no_grad():
                return fn(x)
        return run

    def note(self, wl, provider):
        return self.fused_summary(wl, provider) if provider.startswith("resfuse-") else ""

    @staticmethod
    def fused_summary(wl: Workload, provider: str) -> str:
        """'3/20 convs fused' for a resfuse provider after it ran."""
        conv = wl.state.get("converted", {}).get(provider)
        if conv is None:
            return ""
        import resfuse
        rep = resfuse.explain(conv)
        return f"{len(rep.fused)}/{len(rep)} convs fused"


# ----------------------------------------------------------------------------
# ResNet residual blocks
# ----------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _calibrated_block(spec: BlockSpec, seed: int):
    from .models import make_block
    return make_block(spec, seed=seed)


class ResNetBlockOp(Op):
    """A torchvision-layout BasicBlock / Bottleneck (``bench.models``, random
    weights, calibrated BN, eval, channels_last), input C x H x W.

    eager: the plain block; compile*: torch.compile of it; resfuse-*:
    ``resfuse.nn.fuse_block(block, backend=...)`` (2 or 3 kernels, the
    projection shortcut inside the last). Each argument set holds its own
    input and its own copy of the block (same values, own memory), so a sweep
    moves the weights as well as the activations through memory."""
    name = "resnet_block"

    def describe(self, case):
        return case.spec.describe()

    def cost(self, case, batch, dtype):
        return cost_model.block_cost(case.spec, batch, dtype_name(dtype))

    def floor(self, case, batch, dtype, ceilings):
        peak = ceilings.peak(dtype_name(dtype))
        if peak is None:
            return None
        return cost_model.block_floor(case.spec, batch, dtype_name(dtype), peak, ceilings.bandwidth)

    def max_sets(self):
        return 64  # each set is a block copy: bounded like the layers' sets, but by fewer

    def make_workload(self, case, device, dtype, batch, n_sets, seed):
        s: BlockSpec = case.spec
        base = _calibrated_block(s, seed)
        cl = torch.channels_last
        blocks = [copy.deepcopy(base).to(device=device, dtype=dtype).to(memory_format=cl).eval()
                  for _ in range(n_sets)]
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        sets = [(torch.randn(batch, s.C, s.H, s.W, generator=gen, device=device).to(dtype)
                 .contiguous(memory_format=cl), blk) for blk in blocks]
        ref_block = copy.deepcopy(blocks[0]).to(torch.float64).to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            ref = ref_block(sets[0][0].to(torch.float64).contiguous())
        del ref_block
        return Workload(case, device, dtype, batch, sets, ref, state={"blocks": blocks})

    def build(self, provider, wl):
        if provider == "eager":
            return _call_block
        if provider.startswith("compile"):
            reset_compile_state()
            return compiled(_call_block, provider)
        if provider.startswith("resfuse-"):
            from resfuse.nn import fuse_block
            backend = resfuse_backend(provider)
            fused = {id(b): fuse_block(b, backend=backend) for b in wl.state["blocks"]}
            # What ran, checked once: every conv of the main branch in a fused
            # kernel on this backend (a block that silently ran its original
            # forward would time eager under resfuse's name).
            x0, b0 = wl.arg_sets[0]
            _check_fused_ran(wl, provider, backend, fused[id(b0)], x0,
                             [name for name, _ in wl.case.spec.main_convs()], "fused block")

            def run(x, block):
                return fused[id(block)](x)
            return run
        raise ValueError(f"resnet_block has no provider {provider!r}")

    def note(self, wl, provider):
        return _kernels_note(wl, provider)


OPS.update({"conv_bn_act": ConvBNActOp(), "resnet_block": ResNetBlockOp(), "model": ModelOp()})
KINDS.update({"conv_bn_act": "layer", "resnet_block": "block", "model": "model"})


#: Layers in --quick: the shapes that matter most for ResNet-50 (the
#: 3x3 of conv2_x, a strided 3x3, a residual 1x1, the stem), one
#: residual 3x3 of ResNet-18 and VGG's 64-channel 224x224 layer (the most
#: activation bytes per FLOP, where fusion saves the most).
QUICK_LAYERS = {"resnet50.stem", "resnet50.conv2_x.0.conv2", "resnet50.conv2_x.0.conv3",
                "resnet50.conv3_x.0.conv2", "resnet18.conv2_x.0.conv2", "vgg16_bn.features.3"}
QUICK_MODELS = {"model.resnet18", "model.resnet50"}
#: Blocks in --quick: ResNet-50's first block (projection shortcut at
#: stride 1, the block the byte model's hand test spells out), a ResNet-50
#: identity block and ResNet-18's strided projection block.
QUICK_BLOCKS = {"block.resnet50.conv2_x.0", "block.resnet50.conv3_x.1", "block.resnet18.conv3_x.0"}


def _register_builtin() -> None:
    for arch in ARCHS:
        for spec, names in distinct_convs(ARCHS[arch]()).items():
            name = f"{arch}.{friendly_name(arch, names[0])}"
            register(Case(name, "conv_bn_act", arch, spec, tuple(names), quick=name in QUICK_LAYERS))
    for arch, depth in RESNET_BLOCK_ARCHS.items():
        for spec, names in distinct_blocks(resnet_blocks(depth)).items():
            name = f"block.{arch}.{friendly_name(arch, names[0])}"
            register(Case(name, "resnet_block", arch, spec, tuple(names), quick=name in QUICK_BLOCKS))
    for arch in ARCHS:
        name = f"model.{arch}"
        register(Case(name, "model", arch, arch, (), quick=name in QUICK_MODELS))


_register_builtin()
from . import cases_hornet  # noqa: E402,F401  (HorNet's ops and cases: gnconv, HorBlock, training)

#: What bench/cases_hornet.py defines and ``from bench.cases import ...`` still finds.
_HORNET_NAMES = ("HORNET_T_DEPTHS", "HORNET_T_SCALE", "GnConvCaseSpec", "GnConvOp", "GnConvTrainOp", "HorBlockOp",
                 "HorBlockTrainOp", "QUICK_GNCONV", "QUICK_GNCONV_PROVIDERS", "QUICK_HORNET_TRAIN", "gnconv_cost",
                 "gnconv_kernel_costs", "gnconv_traffic")


def __getattr__(name):
    if name in _HORNET_NAMES:
        return getattr(cases_hornet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def select(patterns: Optional[Sequence[str]] = None, quick: bool = False, kinds: Optional[Sequence[str]] = None
           ) -> List[Case]:
    """Cases whose name contains any of `patterns` (all when None), in
    ``KIND_ORDER`` and, within a kind, registry order; only the quick
    subset when `quick`."""
    out = []
    for case in REGISTRY.values():
        if quick and not case.quick:
            continue
        if kinds and case.kind not in kinds:
            continue
        if patterns and not any(p in case.name for p in patterns):
            continue
        out.append(case)
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(out, key=lambda c: rank.get(c.kind, len(rank)))  # stable: registry order within a kind
