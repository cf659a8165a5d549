"""Op-level tests of ``torch.ops.resfuse.bn_act_conv`` (``resfuse.bn_act_conv``):
BatchNorm (eval) -> activation -> conv [-> BN] [+ residual] [-> activation],
the prologue fused into the conv kernel.

Kernel results are compared with the float64 reference (BN, activation and
conv as separate eager ops) by GUIDE §3's rule; outputs start as NaN
(conftest); every kernel test proves the Triton kernel ran.
"""

import zlib
from dataclasses import dataclass, replace
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F

import resfuse
from resfuse._backends import kernels_module
from resfuse.activations import ACTIVATIONS, get_activation
from resfuse.reference import bn_act_conv_reference

from numerics import assert_matches

ACTS = tuple(ACTIVATIONS)
SLOPE_IN, SLOPE = 0.3, 0.2   # not the default, so a dropped argument shows
_NAMES = ("x", "in_mean", "in_var", "in_weight", "in_bias", "weight", "bias", "bn_mean", "bn_var", "bn_weight",
          "bn_bias", "residual")


@dataclass(frozen=True)
class Case:
    N: int
    C: int
    K: int
    H: int
    W: int
    R: int
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    in_act: str = "relu"
    in_affine: bool = True      # the input BN has gamma/beta
    out_bn: bool = True
    bias: bool = False
    residual: bool = False
    act: str = "identity"
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    @property
    def name(self) -> str:
        return (f"x{self.N}x{self.C}x{self.H}x{self.W}-w{self.K}x{self.R}-s{self.stride}-p{self.padding}-"
                f"d{self.dilation}-{self.in_act}{'' if self.in_affine else '-noaffine'}-"
                f"{'bn' if self.out_bn else 'nobn'}{'-bias' if self.bias else ''}{'-res' if self.residual else ''}-"
                f"{self.act}-{str(self.dtype)[6:]}{'-cl' if self.channels_last else ''}").replace(" ", "")


def _seed(case: Case) -> int:
    return zlib.crc32(case.name.encode()) & 0x7FFFFFFF


def make_leaves(case: Case, device, seed=None, dtype=None):
    """The op's tensor arguments in `_NAMES` order (None where absent),
    x in the case's dtype/layout; the BN statistics spread so that the
    input activation sees both sides of its kinks."""
    g = torch.Generator().manual_seed(_seed(case) if seed is None else seed)
    dt = dtype or case.dtype
    C, K = case.C, case.K

    def r(*shape, lo=None):
        t = torch.randn(*shape, generator=g)
        return (t.abs() + lo if lo is not None else t).to(device=device, dtype=dt)

    x = r(case.N, C, case.H, case.W)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    P = (case.H + 2 * case.padding[0] - case.dilation[0] * (case.R - 1) - 1) // case.stride[0] + 1
    Q = (case.W + 2 * case.padding[1] - case.dilation[1] * (case.R - 1) - 1) // case.stride[1] + 1
    leaves = [x, r(C), r(C, lo=0.3), r(C) * 2 if case.in_affine else None, r(C) if case.in_affine else None,
              r(K, C, case.R, case.R) / (C * case.R * case.R) ** 0.5, r(K) if case.bias else None]
    leaves += [r(K), r(K, lo=0.3), r(K), r(K)] if case.out_bn else [None] * 4
    leaves.append(r(case.N, K, P, Q) if case.residual else None)
    return leaves


def run(leaves, case: Case, backend: str):
    x, m, v, gi, bi, w, b, bm, bv, bg, bb, res = leaves
    return resfuse.bn_act_conv(x, w, b, in_mean=m, in_var=v, in_weight=gi, in_bias=bi, in_eps=1e-3,
                               in_activation=case.in_act, in_negative_slope=SLOPE_IN, bn_mean=bm, bn_var=bv,
                               bn_weight=bg, bn_bias=bb, eps=1e-5, residual=res, stride=case.stride,
                               padding=case.padding, dilation=case.dilation, activation=case.act,
                               negative_slope=SLOPE, backend=backend)


def reference(leaves, case: Case):
    x, m, v, gi, bi, w, b, bm, bv, bg, bb, res = leaves
    return bn_act_conv_reference(x, m, v, gi, bi, 1e-3, case.in_act, w, b, in_negative_slope=SLOPE_IN,
                                 bn_mean=bm, bn_var=bv, bn_weight=bg, bn_bias=bb, eps=1e-5, residual=res,
                                 stride=case.stride, padding=case.padding, dilation=case.dilation,
                                 activation=case.act, negative_slope=SLOPE)


def _bn(t, m, v, g, b, eps):
    """Eval BatchNorm written out, so that autograd reaches the statistics too."""
    y = (t - m.view(1, -1, 1, 1)) * torch.rsqrt(v.view(1, -1, 1, 1) + eps)
    y = y * g.view(1, -1, 1, 1) if g is not None else y
    return y + b.view(1, -1, 1, 1) if b is not None else y


def autograd_reference(leaves, case: Case):
    """The module chain as differentiable eager ops (the statistics included)."""
    x, m, v, gi, bi, w, b, bm, bv, bg, bb, res = leaves
    h = get_activation(case.in_act).eager(_bn(x, m, v, gi, bi, 1e-3), SLOPE_IN)
    y = F.conv2d(h, w, b, case.stride, case.padding, case.dilation)
    y = _bn(y, bm, bv, bg, bb, 1e-5) if bm is not None else y
    return get_activation(case.act).eager(y + res if res is not None else y, SLOPE)


def _f64(leaves):
    return [None if t is None else t.detach().double().cpu() for t in leaves]


def run_triton(fn, what):
    kern = kernels_module("conv_bn_act")
    before = kern.LAUNCHES
    out = fn()
    assert kern.LAUNCHES == before + 1, f"{what}: the Triton kernel did not run"
    d = resfuse.last_decision()
    assert d.op == "bn_act_conv" and d.backend == "triton", f"{what}: ran on {d}"
    return out


FORWARD_CASES = [
    # every input activation, rotating the rest (odd C/K, padding, stride, dilation, epilogues)
    Case(2, 5, 7, 7, 6, 3, (2, 1), (1, 1), in_act=a, act=ACTS[(i + 3) % len(ACTS)], residual=i % 3 == 0,
         bias=i % 2 == 1, out_bn=i % 4 != 2, in_affine=i % 5 != 4)
    for i, a in enumerate(ACTS)
] + [
    Case(1, 17, 33, 9, 7, 1),                                              # 1x1: DenseNet's conv1, DPN
    Case(2, 36, 9, 6, 5, 3, (1, 1), (2, 2), (2, 2), act="relu"),           # two channel tiles, dilated
    Case(1, 6, 10, 8, 8, 5, (2, 2), (2, 2), in_act="silu", channels_last=True, residual=True, act="silu"),
    Case(2, 12, 16, 6, 6, 3, (1, 1), (1, 1), dtype=torch.float16, act="relu"),
    Case(1, 12, 16, 6, 5, 3, (1, 1), (1, 1), in_act="silu", dtype=torch.bfloat16, channels_last=True),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.name)
def test_forward_matches_float64(case, device):
    leaves = make_leaves(case, device)
    out = run_triton(lambda: run(leaves, case, "triton"), case.name)
    ref = reference(_f64(leaves), case)
    eager = reference(leaves, case)
    assert out.is_contiguous(memory_format=torch.channels_last if case.channels_last else torch.contiguous_format)
    assert_matches(out, ref, eager, case.dtype, case.name, _seed(case))
    # the eager backend computes the same
    assert_matches(run(leaves, case, "eager"), ref, eager, case.dtype, case.name + " eager", _seed(case))


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_padding_is_zero_after_the_activation(backend, device):
    """A padded position contributes 0, not act_in(shift_in): with a large
    positive input-BN shift the two differ by a lot, and the op matches the
    eager module chain (which pads the activated tensor)."""
    case = Case(1, 4, 3, 5, 5, 3, (1, 1), (2, 2), in_act="hardsigmoid", out_bn=False)
    leaves = make_leaves(case, device)
    leaves[4] = torch.full_like(leaves[4], 5.0)   # in_bias: act_in(shift) = 1 at every padded position
    out = run_triton(lambda: run(leaves, case, "triton"), "pad") if backend == "triton" else \
        run(leaves, case, "eager")
    f = _f64(leaves)
    ref = reference(f, case)
    # the wrong semantics: pad x first, then BN + act the padded tensor
    xp = F.pad(f[0], (2, 2, 2, 2))
    wrong = bn_act_conv_reference(xp, *f[1:5], 1e-3, case.in_act, f[5], None, in_negative_slope=SLOPE_IN)
    assert (wrong - ref).abs().max() > 0.1
    assert_matches(out, ref, reference(leaves, case), case.dtype, "padding")


def _kink_free(case, seed0):
    """float64 leaves whose input-BN output and conv pre-activation stay
    away from every activation's kinks (0, +-3, 6) by more than gradcheck's
    step."""
    for seed in range(seed0, seed0 + 50):
        ls = make_leaves(case, "cpu", seed, torch.float64)
        x, m, v, gi, bi = ls[:5]
        pre = F.batch_norm(x, m, v, gi, bi, False, 0.0, 1e-3)
        h = get_activation(case.in_act).eager(pre, SLOPE_IN)
        u = bn_act_conv_reference(x, m, v, gi, bi, 1e-3, case.in_act, ls[5], ls[6], in_negative_slope=SLOPE_IN,
                                  bn_mean=ls[7], bn_var=ls[8], bn_weight=ls[9], bn_bias=ls[10], residual=ls[11],
                                  stride=case.stride, padding=case.padding, dilation=case.dilation)
        if min((t - k).abs().min().item() for t in (pre, u) for k in (0, 6, -3, 3)) > 1e-3 and h.abs().sum() > 0:
            return ls
    raise AssertionError(f"no kink-free inputs for {case.name}")


GRAD_CASES = [
    Case(1, 3, 4, 5, 4, 3, (2, 1), (1, 1), in_act="relu", act="silu", bias=True, residual=True,
         dtype=torch.float64),
    Case(2, 2, 3, 4, 5, 3, (1, 1), (2, 1), (2, 1), in_act="leaky_relu", act="identity", out_bn=False, bias=True,
         in_affine=False, dtype=torch.float64),
    Case(1, 3, 3, 4, 4, 1, in_act="hardswish", act="relu6", dtype=torch.float64),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.name)
def test_gradcheck_eager_float64(case):
    """gradcheck of every tensor argument (x, the input BN's four vectors,
    weight, bias, the output BN's four, residual) through the eager backend."""
    leaves = _kink_free(case, _seed(case))
    present = [i for i, t in enumerate(leaves) if t is not None]
    for i in present:
        leaves[i].requires_grad_(True)

    def fn(*ts):
        full = list(leaves)
        for i, t in zip(present, ts):
            full[i] = t
        return run(full, case, "eager")

    assert torch.autograd.gradcheck(fn, tuple(leaves[i] for i in present), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", [
    Case(2, 5, 6, 6, 5, 3, (1, 1), (1, 1), in_act="relu", act="relu", residual=True),
    Case(1, 6, 7, 5, 5, 3, (2, 2), (1, 1), in_act="silu", act="identity", dtype=torch.float16, channels_last=True),
], ids=lambda c: c.name)
def test_triton_forward_backward_vs_float64_autograd(case, device):
    """Forward on the kernel, backward through the op's autograd; every
    gradient by the rule against float64 autograd of the eager module chain."""
    leaves = [None if t is None else t.requires_grad_(True) for t in make_leaves(case, device)]
    out = run_triton(lambda: run(leaves, case, "triton"), case.name)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    present = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(out, [leaves[i] for i in present], grad_out)

    def ref_grads(ls):
        ls = [None if t is None else t.detach().clone().requires_grad_(True) for t in ls]
        y = autograd_reference(ls, case)
        return torch.autograd.grad(y, [ls[i] for i in present], grad_out.to(y.dtype).to(y.device))

    g64, g_eager = ref_grads(_f64(leaves)), ref_grads(leaves)
    for i, g, r, e in zip(present, grads, g64, g_eager):
        assert g.shape == leaves[i].shape and g.dtype == leaves[i].dtype
        assert_matches(g, r, e, leaves[i].dtype, f"{case.name} d/d{_NAMES[i]}")


def _op_args(case, device):
    x, m, v, gi, bi, w, b, bm, bv, bg, bb, res = make_leaves(case, device)
    return (x, m, v, gi, bi, 1e-3, case.in_act, w, b, bm, bv, bg, bb, 1e-5, res, list(case.stride),
            list(case.padding), list(case.dilation), 1, case.act)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_opcheck(backend, device):
    """Schema, autograd registration, fake kernel and AOT dispatch, with
    every optional given (and both slopes) and with none."""
    full = Case(1, 3, 5, 5, 4, 3, (2, 1), (1, 1), in_act="leaky_relu", act="leaky_relu", bias=True, residual=True)
    bare = Case(2, 3, 4, 5, 5, 1, in_affine=False, out_bn=False)
    for case, tail in ((full, (SLOPE_IN, SLOPE)), (bare, ())):
        torch.library.opcheck(torch.ops.resfuse.bn_act_conv.default, _op_args(case, device) + (backend,) + tail)
        assert resfuse.last_decision().backend == backend


def test_torch_compile_fullgraph(device):
    case = Case(1, 4, 6, 6, 6, 3, (1, 1), (1, 1), act="relu")
    leaves = make_leaves(case, device)
    compiled = torch.compile(lambda ls: run(ls, case, "auto"), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(leaves)
    assert_matches(out, reference(_f64(leaves), case), reference(leaves, case), torch.float32, "compiled")


def test_auto_says_there_is_no_cuda_kernel(device):
    case = Case(1, 3, 4, 5, 5, 3, (1, 1), (1, 1))
    run(make_leaves(case, device), case, "auto")
    d = resfuse.last_decision()
    assert d.backend == "triton"
    assert "no cuda implementation of bn_act_conv yet" in d.reason()
    with pytest.raises(resfuse.BackendUnavailable, match="no cuda implementation of bn_act_conv"):
        run(make_leaves(case, device), case, "cuda")


_BASE = Case(1, 3, 4, 5, 5, 3, (1, 1), (1, 1), bias=True)


@pytest.mark.parametrize("change, exc, text", [
    (lambda a: a.__setitem__(1, a[1][:2]), ValueError, r"in_mean must have shape \(3,\)"),
    (lambda a: a.__setitem__(2, None), ValueError, "in_mean and in_var"),
    (lambda a: a.__setitem__(3, a[3][None]), ValueError, "in_weight must be 1-D"),
    (lambda a: a.__setitem__(4, a[4].to(torch.int64)), TypeError, "in_bias must be a floating-point"),
    (lambda a: a.__setitem__(5, -1.0), ValueError, "in_eps must be a non-negative"),
    (lambda a: a.__setitem__(6, "tanh"), ValueError, "in_activation must be one of"),
    (lambda a: a.append(float("nan")), ValueError, "in_negative_slope"),
    (lambda a: a.__setitem__(7, a[7][:, :2]), ValueError, "x has 3 channels but weight"),
    (lambda a: a.__setitem__(9, a[9][:3]), ValueError, r"bn_mean must have shape \(4,\)"),
    (lambda a: a.__setitem__(19, "swish"), ValueError, "activation must be one of"),
])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bad_input_names_the_argument(change, exc, text, backend, device):
    args = list(_op_args(_BASE, device))
    change(args)
    tail = args[20:]
    with pytest.raises(exc, match=text):
        torch.ops.resfuse.bn_act_conv(*args[:20], backend, *tail)


def test_python_entry_point_validates_padding_and_backend():
    case = _BASE
    ls = make_leaves(case, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        run(ls, case, "gpu")
    with pytest.raises(ValueError, match="padding='same'"):
        resfuse.bn_act_conv(ls[0], torch.randn(4, 3, 2, 2), in_mean=ls[1], in_var=ls[2], padding="same")
    y = resfuse.bn_act_conv(ls[0], ls[5], in_mean=ls[1], in_var=ls[2], padding="same", backend="eager")
    assert y.shape == (1, 4, 5, 5)
