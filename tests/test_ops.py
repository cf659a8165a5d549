"""Op-level tests of ``torch.ops.resfuse.conv_bn_act`` (``resfuse.conv_bn_act``).

Kernel tests run on the ``device`` fixture: CPU tensors through Triton's
interpreter here, CUDA tensors on a GPU box (marked ``gpu``, skipped
visibly elsewhere). Every kernel result is compared with the float64
reference by the rule of GUIDE §3 (tests/numerics.py); outputs start as NaN
(conftest sets RESFUSE_POISON_OUTPUTS=1, and a test below proves the op
honours it); every kernel test proves that the Triton kernel ran
(``LAUNCHES`` grew and ``last_decision().backend == 'triton'``).
"""

import math
import os
import zlib
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import resfuse
from resfuse._backends import conv_allows_tf32, cuda_reasons, kernels_module
from resfuse.activations import ACTIVATIONS
from resfuse.reference import conv_bn_act_reference, to_float64

from numerics import FLOOR, assert_matches

ACTS = tuple(ACTIVATIONS)  # identity, relu, relu6, silu, gelu, leaky_relu, hardswish, hardsigmoid, gelu_tanh
NA = len(ACTS)
SLOPE = 0.3  # leaky_relu's slope in every test (not the default 0.01, so a dropped argument shows)
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


def _kern():
    return kernels_module("conv_bn_act")


def seed_of(text: str) -> int:
    """A stable per-case seed (printed in every failure message)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------
# Cases and inputs
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    N: int
    C: int
    K: int
    H: int
    W: int
    R: int
    S: int
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    bias: bool = True
    bn: str = "full"            # none | full | plain (no gamma/beta) | gamma | beta
    residual: str = "none"      # none | contig | strided | cl | expand
    act: str = "relu"
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"        # nchw | cl (x and weight channels_last) | view (strided slice of x)
    bn_dtype: Optional[torch.dtype] = None   # None: the dtype of x
    strided_vecs: bool = False  # bias and BN vectors are stride-2 views
    eps: float = 1e-5

    @property
    def out_hw(self):
        P = (self.H + 2 * self.padding[0] - self.dilation[0] * (self.R - 1) - 1) // self.stride[0] + 1
        Q = (self.W + 2 * self.padding[1] - self.dilation[1] * (self.S - 1) - 1) // self.stride[1] + 1
        return P, Q

    @property
    def name(self) -> str:
        def hw(t):
            return f"{t[0]}" if t[0] == t[1] else f"{t[0]}x{t[1]}"
        parts = [f"x{self.N}x{self.C}x{self.H}x{self.W}", f"w{self.K}x{self.R}x{self.S}",
                 f"s{hw(self.stride)}", f"p{hw(self.padding)}", f"d{hw(self.dilation)}",
                 "b" if self.bias else "nob", f"bn-{self.bn}", f"res-{self.residual}", self.act,
                 DTYPE_NAMES[self.dtype], self.layout]
        if self.bn_dtype is not None:
            parts.append(f"bn{DTYPE_NAMES[self.bn_dtype]}")
        if self.strided_vecs:
            parts.append("svec")
        return "-".join(parts)


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    bn_mean: Optional[torch.Tensor]
    bn_var: Optional[torch.Tensor]
    bn_weight: Optional[torch.Tensor]
    bn_bias: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]

    def tensors(self):
        return (self.x, self.weight, self.bias, self.bn_mean, self.bn_var, self.bn_weight, self.bn_bias,
                self.residual)


def _nan_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """`t`'s values in a strided view of a larger NaN-filled buffer, so that
    a read outside the view (a wrong stride) poisons the result."""
    if t.dim() == 1:
        big = torch.full((2 * t.shape[0] + 1,), float("nan"), dtype=t.dtype, device=t.device)
        view = big[1::2]
    elif kind == "strided":
        n, c, h, w = t.shape
        big = torch.full((n, 2 * c + 1, h + 2, 2 * w + 1), float("nan"), dtype=t.dtype, device=t.device)
        view = big[:, 1::2, 1:h + 1, 1::2]
    else:  # "view": channel and row slices, column stride 2
        n, c, h, w = t.shape
        big = torch.full((n, c + 3, h + 1, 2 * w), float("nan"), dtype=t.dtype, device=t.device)
        view = big[:, 2:c + 2, 1:, ::2]
    view.copy_(t)
    return view


def make_inputs(case: Case, device, seed: int) -> Inputs:
    """Fresh random inputs: x ~ N(0,1), weight scaled to keep conv outputs
    O(1), BN mean ~ N(0,1), var ~ U[0.5, 2], gamma ~ ±U[0.5, 1.5], beta ~ N(0,1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    N, C, K = case.N, case.C, case.K
    P, Q = case.out_hw
    x = randn(N, C, case.H, case.W)
    weight = randn(K, C, case.R, case.S) / math.sqrt(C * case.R * case.S)
    bias = randn(K) if case.bias else None
    mean = var = gamma = beta = None
    if case.bn != "none":
        mean = randn(K)
        var = torch.rand(K, generator=g) * 1.5 + 0.5
        if case.bn in ("full", "gamma"):
            gamma = (torch.rand(K, generator=g) + 0.5) * torch.where(torch.rand(K, generator=g) < 0.3, -1.0, 1.0)
        if case.bn in ("full", "beta"):
            beta = randn(K)
    res = None
    if case.residual == "expand":
        res = randn(1, K, P, Q).expand(N, K, P, Q)
    elif case.residual != "none":
        res = randn(N, K, P, Q)

    dt, bdt = case.dtype, case.bn_dtype or case.dtype

    def put(t, dtype):
        return None if t is None else t.to(device=device, dtype=dtype)

    x, weight, bias, res = put(x, dt), put(weight, dt), put(bias, dt), put(res, dt)
    mean, var, gamma, beta = (put(t, bdt) for t in (mean, var, gamma, beta))
    if case.layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    elif case.layout == "view":
        x = _nan_view(x, "view")
    if case.residual == "strided":
        res = _nan_view(res, "strided")
    elif case.residual == "cl":
        res = res.contiguous(memory_format=torch.channels_last)
    if case.strided_vecs:
        bias, mean, var, gamma, beta = (None if t is None else _nan_view(t, "")
                                        for t in (bias, mean, var, gamma, beta))
    return Inputs(x, weight, bias, mean, var, gamma, beta, res)


def run_op(inp: Inputs, case: Case, backend: str, **over):
    kw = dict(bn_mean=inp.bn_mean, bn_var=inp.bn_var, bn_weight=inp.bn_weight, bn_bias=inp.bn_bias,
              eps=case.eps, residual=inp.residual, stride=case.stride, padding=case.padding,
              dilation=case.dilation, activation=case.act, negative_slope=SLOPE, backend=backend)
    kw.update(over)
    return resfuse.conv_bn_act(inp.x, inp.weight, inp.bias, **kw)


def run_triton(fn, what=""):
    """Run `fn` and prove the Triton kernel (not the eager fallback) ran it."""
    kern = _kern()
    before = kern.LAUNCHES
    out = fn()
    assert kern.LAUNCHES == before + 1, f"{what}: the Triton kernel did not run (LAUNCHES unchanged)"
    decision = resfuse.last_decision()
    assert decision is not None and decision.backend == "triton", f"{what}: ran on {decision}"
    return out


def references(inp: Inputs, case: Case):
    """(float64 reference, eager PyTorch in the tested dtype)."""
    kw = dict(eps=case.eps, stride=case.stride, padding=case.padding, dilation=case.dilation,
              activation=case.act, negative_slope=SLOPE)
    ref64 = conv_bn_act_reference(*to_float64(*inp.tensors()[:7]), residual=to_float64(inp.residual)[0], **kw)
    eager = conv_bn_act_reference(*inp.tensors()[:7], residual=inp.residual, **kw)
    return ref64, eager


def check(out, ref64, eager_out, dtype, what, seed):
    """GUIDE §3's rule, with non-finite entries compared explicitly.

    numerics.rel_err compares the non-finite entries with torch.equal, which
    is False for NaN == NaN, so a reference holding a NaN makes both err and
    tol infinite and assert_matches pass anything. Here NaN positions must
    match exactly, Inf positions and signs exactly, and the finite rest is
    judged by the rule; the tolerance must be finite."""
    o, r, e = (t.detach().to(torch.float64).cpu() for t in (out, ref64, eager_out))
    assert o.shape == r.shape, f"{what}: shape {tuple(o.shape)} != {tuple(r.shape)} (seed {seed})"
    nan = torch.isnan(r)
    assert torch.equal(torch.isnan(o), nan), (
        f"{what}: NaN pattern differs from the float64 reference: {int(torch.isnan(o).sum())} NaN in out, "
        f"{int(nan.sum())} in ref (seed {seed})")
    inf = torch.isinf(r)
    assert torch.equal(torch.isinf(o), inf) and torch.equal(o[inf], r[inf]), (
        f"{what}: Inf entries differ from the float64 reference (seed {seed})")
    fin = ~(nan | inf)
    o, r, e = o.where(fin, 0.0), r.where(fin, 0.0), e.where(fin, 0.0)
    err, tol = assert_matches(o, r, e, dtype, what, seed)
    assert math.isfinite(tol), f"{what}: eager itself is not finite where the reference is (seed {seed})"
    return err, tol


def check_case(case: Case, device, backend="triton"):
    seed = seed_of(case.name)
    torch.manual_seed(seed)
    inp = make_inputs(case, device, seed)
    what = f"{case.name} on {device} via {backend}"
    if backend == "triton":
        out = run_triton(lambda: run_op(inp, case, backend), what)
    else:
        out = run_op(inp, case, backend)
    ref64, eager = references(inp, case)
    assert out.dtype == case.dtype and out.device == inp.x.device, what
    assert tuple(out.shape) == (case.N, case.K) + case.out_hw, what
    want_cl = case.layout == "cl" and not inp.x.is_contiguous()
    fmt = torch.channels_last if want_cl else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"{what}: output is not in the input's memory format"
    check(out, ref64, eager, case.dtype, what, seed)
    return inp, out


# ----------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------

def _t(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# Geometry: kernel 1/3/5/7 (and non-square), stride 1/2, padding 0..3,
# dilation 1/2, odd H/W, N=1, channel counts off the interpreter's tiles
# (kernels/conv_bn_act.py::_interpreter_blocks: BLOCK_K 16 up to C=16, 32 up
# to 64, then 64; BLOCK_N 32 up to K=32, then 64): C=17/33/70 end in a
# partial BLOCK_K step, K=5/33/40/70 in a partial BLOCK_N tile (70: two
# tiles); 1x1 outputs; H smaller than the kernel but padded enough.
# test_kernels_conv_bn_act.py::test_tile_boundaries shrinks the tiles.
# (N, C, K, H, W, R, S, stride, padding, dilation)
_GEOMETRY = [
    (2, 3, 5, 7, 9, 1, 1, 1, 0, 1),
    (1, 17, 33, 9, 7, 1, 1, 2, 0, 1),
    (2, 5, 7, 5, 5, 1, 1, 1, 1, 1),
    (1, 33, 3, 5, 7, 1, 1, 2, 2, 2),
    (2, 3, 5, 7, 7, 3, 3, 1, 1, 1),
    (1, 5, 7, 9, 11, 3, 3, 2, 1, 1),
    (2, 17, 9, 5, 7, 3, 3, 1, 0, 1),
    (1, 4, 6, 11, 9, 3, 3, 1, 2, 2),
    (1, 3, 40, 7, 5, 3, 3, 2, 3, 2),
    (1, 33, 5, 6, 6, 3, 3, 2, 0, 1),
    (2, 1, 1, 5, 5, 3, 3, 1, 1, 1),
    (1, 3, 5, 2, 3, 3, 3, 1, 1, 1),
    (1, 3, 5, 9, 9, 5, 5, 1, 2, 1),
    (2, 5, 3, 7, 9, 5, 5, 2, 1, 1),
    (1, 6, 7, 13, 11, 5, 5, 1, 3, 2),
    (1, 3, 9, 5, 5, 5, 5, 1, 0, 1),
    (1, 2, 5, 11, 13, 5, 5, 2, 2, 2),
    (1, 3, 5, 9, 9, 7, 7, 1, 3, 1),
    (1, 3, 4, 11, 9, 7, 7, 2, 3, 1),
    (1, 2, 3, 13, 13, 7, 7, 1, 0, 2),
    (1, 3, 3, 7, 7, 7, 7, 2, 2, 1),
    (1, 5, 6, 9, 7, 1, 3, (1, 2), (0, 1), (2, 1)),
    (1, 4, 5, 7, 11, 3, 5, (2, 1), (1, 2), (1, 2)),
    (1, 3, 5, 5, 9, 7, 1, 1, (3, 0), 1),
    (1, 70, 9, 5, 5, 3, 3, 1, 1, 1),
    (2, 6, 70, 5, 3, 3, 3, 2, 1, 1),
]
_BN = ("full", "plain", "gamma", "beta", "none")
_RES = ("none", "contig", "strided", "cl", "expand")
_LAYOUTS = ("nchw", "cl", "view")


def _geometry_cases():
    cases = []
    for i, (N, C, K, H, W, R, S, st, pad, dil) in enumerate(_GEOMETRY):
        # Features rotate with co-prime periods, so the geometry cases also
        # mix bias/BN/residual/activation/layout combinations.
        cases.append(Case(N, C, K, H, W, R, S, _t(st), _t(pad), _t(dil),
                          bias=i % 2 == 0, bn=_BN[i % 5], residual=_RES[i % 5 if i % 3 else (i + 1) % 5],
                          act=ACTS[i % NA if i % 2 else (i + 2) % NA], layout=_LAYOUTS[i % 3],
                          strided_vecs=i % 7 == 3))
    return cases


GEOMETRY_CASES = _geometry_cases()


@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=lambda c: c.name)
def test_geometry_fp32(case, device):
    check_case(case, device)


_SMALL = Case(2, 5, 7, 5, 7, 3, 3, (1, 1), (1, 1), (1, 1))
FEATURE_CASES = [
    replace(_SMALL, bias=b, bn=bn, residual=res, act=ACTS[(i + j) % NA])
    for i, (b, bn) in enumerate((b, bn) for bn in _BN for b in (True, False))
    for j, res in enumerate(("none", "contig", "strided", "expand"))
]


@pytest.mark.parametrize("case", FEATURE_CASES, ids=lambda c: c.name)
def test_features_fp32(case, device):
    """Every bias x BN x residual combination, activations rotating."""
    check_case(case, device)


_MID = Case(2, 17, 33, 7, 5, 3, 3, (2, 2), (1, 1), (1, 1), residual="strided")
DTYPE_LAYOUT_CASES = [
    replace(_MID, dtype=dt, layout=lay, act=ACTS[(i + 1) % NA])
    for i, (dt, lay) in enumerate((dt, lay) for dt in (torch.float32, torch.float16, torch.bfloat16)
                                  for lay in _LAYOUTS)
] + [
    # fp32 BN statistics with a 16-bit input (a half model with fp32 BN buffers).
    replace(_MID, dtype=torch.float16, bn_dtype=torch.float32, layout="cl", act="silu"),
    replace(_MID, dtype=torch.bfloat16, bn_dtype=torch.float32, residual="cl", act="gelu"),
    replace(_SMALL, dtype=torch.float16, residual="contig", strided_vecs=True),
]


@pytest.mark.parametrize("case", DTYPE_LAYOUT_CASES, ids=lambda c: c.name)
def test_dtypes_and_layouts(case, device):
    """fp32/fp16/bf16 x NCHW/channels_last/strided view. bf16: the
    interpreter widens bf16 tiles to fp32 before tl.dot (GUIDE §3), so this
    checks the bf16 loads/stores and epilogue here and everything on a GPU."""
    check_case(case, device)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_NAMES.get)
def test_activations_through_kernel(act, dtype, device):
    """Each activation in the epilogue, with a pre-activation spread wide
    enough (|u| up to ~10) that relu6's upper clamp and gelu/silu tails are hit."""
    case = replace(_SMALL, act=act, dtype=dtype, residual="contig", eps=1e-3)
    seed = seed_of(case.name)
    inp = make_inputs(case, device, seed)
    inp.bn_weight.mul_(6.0)
    inp.bn_bias.mul_(3.0)
    out = run_triton(lambda: run_op(inp, case, "triton"), case.name)
    ref64, eager = references(inp, case)
    if act == "relu6":
        assert (ref64 == 6).any() and (ref64 == 0).any() and ((ref64 > 0) & (ref64 < 6)).any()
    check(out, ref64, eager, dtype, case.name, seed)


def test_eager_backend_matches_reference():
    """The eager backend (the fallback) under the same rule, on a spread of
    cases; float64 too, which only it runs."""
    for case in GEOMETRY_CASES[::3] + [replace(_MID, dtype=torch.float16), replace(_MID, dtype=torch.bfloat16),
                                       replace(_MID, dtype=torch.float64, layout="cl")]:
        check_case(case, torch.device("cpu"), backend="eager")
        assert resfuse.last_decision().backend == "eager"


# ----------------------------------------------------------------------------
# The Triton path really runs, on poisoned outputs
# ----------------------------------------------------------------------------

def test_outputs_are_poisoned_before_launch(device, monkeypatch):
    """With the launch skipped, the op's output is all NaN: the poison is
    real, so an element the kernel fails to write fails the comparison."""
    assert os.environ.get("RESFUSE_POISON_OUTPUTS") == "1"
    kern = _kern()
    monkeypatch.setattr(kern, "conv_bn_act_fwd", lambda *a, **k: a[14])  # a[14]: `out`, unwritten
    case = replace(_SMALL, residual="contig")
    inp = make_inputs(case, device, 0)
    out = run_op(inp, case, "triton")
    assert out.shape == (2, 7, 5, 7) and torch.isnan(out).all()


def test_auto_picks_triton_and_env_var(device, monkeypatch):
    """backend='auto' runs Triton where the CUDA extension has no kernel;
    RESFUSE_BACKEND replaces 'auto' (and only 'auto')."""
    case = replace(_SMALL, act="silu")
    inp = make_inputs(case, device, 1)
    monkeypatch.delenv("RESFUSE_BACKEND", raising=False)
    if "cuda" not in resfuse.dispatch.plan("conv_bn_act", "auto", _problem(inp, case))[0].skipped:
        pytest.skip("the CUDA extension runs conv_bn_act here; auto does not pick Triton")
    out = run_triton(lambda: run_op(inp, case, "auto"), "auto")
    d = resfuse.last_decision()
    assert d.requested == "auto" and "cuda" in d.skipped
    ref64, eager = references(inp, case)
    check(out, ref64, eager, case.dtype, "auto", 1)

    kern = _kern()
    monkeypatch.setenv("RESFUSE_BACKEND", "eager")
    before = kern.LAUNCHES
    out_env = run_op(inp, case, "auto")
    assert kern.LAUNCHES == before and resfuse.last_decision().backend == "eager"
    assert resfuse.last_decision().requested == "eager"
    check(out_env, ref64, eager, case.dtype, "RESFUSE_BACKEND=eager", 1)
    # An explicit backend wins over the environment.
    run_triton(lambda: run_op(inp, case, "triton"), "explicit triton under RESFUSE_BACKEND=eager")
    monkeypatch.setenv("RESFUSE_BACKEND", "triton")
    run_triton(lambda: run_op(inp, case, "auto"), "RESFUSE_BACKEND=triton")
    monkeypatch.setenv("RESFUSE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="RESFUSE_BACKEND"):
        run_op(inp, case, "auto")


def _problem(inp: Inputs, case: Case):
    from resfuse.ops.conv_bn_act import make_problem
    return make_problem(inp.x, inp.weight, inp.bias, inp.bn_mean, inp.bn_var, inp.bn_weight, inp.bn_bias,
                        case.eps, inp.residual, list(case.stride), list(case.padding), list(case.dilation),
                        1, case.act, SLOPE)


# ----------------------------------------------------------------------------
# NaN / Inf propagate as in eager (the float64 reference)
# ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("where", ["x_nan", "x_inf", "x_neginf", "var_nan", "var_negative", "mean_inf",
                                   "residual_nan", "weight_nan"])
def test_nonfinite_propagates(where, device):
    # The activations rotate per case; all of them see the non-finite value
    # in at least one case, with the fp16 path on half of them.
    i = ["x_nan", "x_inf", "x_neginf", "var_nan", "var_negative", "mean_inf", "residual_nan",
         "weight_nan"].index(where)
    case = replace(_SMALL, act=ACTS[i % NA], residual="contig", dtype=(torch.float32, torch.float16)[i % 2])
    seed = seed_of(case.name + where)
    inp = make_inputs(case, device, seed)
    n, c, h, w = 1, 2, 3, 4
    if where == "x_nan":
        inp.x[n, c, h, w] = float("nan")
    elif where == "x_inf":
        inp.x[n, c, h, w] = float("inf")
    elif where == "x_neginf":
        inp.x[0, 4, 0, 0] = float("-inf")
    elif where == "var_nan":
        inp.bn_var[3] = float("nan")
    elif where == "var_negative":
        inp.bn_var[5] = -1.0   # sqrt of a negative: NaN channel, as in eager
    elif where == "mean_inf":
        inp.bn_mean[0] = float("inf")
    elif where == "residual_nan":
        inp.residual[1, 6, 4, 6] = float("nan")
    elif where == "weight_nan":
        inp.weight[2, 1, 0, 2] = float("nan")
    out = run_triton(lambda: run_op(inp, case, "triton"), f"{case.name} {where}")
    ref64, eager = references(inp, case)
    pre64, _ = references(inp, replace(case, act="identity"))
    assert not torch.isfinite(pre64).all(), "the case must produce a non-finite pre-activation"
    check(out, ref64, eager, case.dtype, f"{case.name} {where}", seed)
    # And the op's own eager backend agrees with PyTorch in the tested dtype:
    # a CPU conv that skips zero-padded taps (oneDNN on AVX-512 machines, fp16
    # and fp32 alike) never multiplies a NaN weight by a padded 0, so border
    # outputs stay finite there while the float64 reference (and the Triton
    # kernel, which multiplies by the 0) have NaN. Where eager itself differs
    # from float64 that way, eager's value is the reference for the backend
    # that is eager.
    out_eager = run_op(inp, case, "eager")
    e64 = eager.detach().to(torch.float64)
    skipped = torch.isnan(ref64) & ~torch.isnan(e64)
    check(out_eager, torch.where(skipped, e64, ref64), eager, case.dtype, f"{case.name} {where} (eager backend)",
          seed)


# ----------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------

def autograd_reference(x, w, b, m, v, g, be, eps, res, stride, padding, dilation, act):
    """The op in plain differentiable ops (F.batch_norm is not differentiable
    in its running statistics, so BN is written out)."""
    y = F.conv2d(x, w, b, stride, padding, dilation)
    if m is not None:
        s = torch.rsqrt(v + eps)
        if g is not None:
            s = s * g
        y = (y - m.view(1, -1, 1, 1)) * s.view(1, -1, 1, 1)
        if be is not None:
            y = y + be.view(1, -1, 1, 1)
    if res is not None:
        y = y + res
    return ACTIVATIONS[act].eager(y, SLOPE)


_NAMES = ("x", "weight", "bias", "bn_mean", "bn_var", "bn_weight", "bn_bias", "residual")


def _leaves(inp: Inputs, dtype=None):
    out = []
    for t in inp.tensors():
        if t is None:
            out.append(None)
        else:
            t = t.detach().to(dtype or t.dtype)
            out.append(t.clone(memory_format=torch.preserve_format).requires_grad_())
    return out


def _kink_free_inputs(case: Case, device, seed0: int):
    """Inputs whose pre-activation stays away from the kinks of relu and
    leaky_relu (0), relu6 (0, 6), hardswish and hardsigmoid (-3, 3) by more
    than gradcheck's step can cross, while the clamped ones still see all
    three branches. Tries successive seeds (deterministically)."""
    lo, hi = {"relu6": (0, 6), "hardswish": (-3, 3), "hardsigmoid": (-3, 3)}.get(case.act, (0, 0))
    for seed in range(seed0, seed0 + 50):
        inp = make_inputs(case, device, seed)
        if hi > lo:
            inp.bn_weight.mul_(5.0)
        t = inp.tensors()
        u = autograd_reference(*t[:7], case.eps, t[7], case.stride, case.padding, case.dilation, "identity")
        gap = min((u - k).abs().min().item() for k in (0, 6, -3, 3))
        branches = (u < lo).any() and (u > hi).any() and ((u > lo) & (u < hi)).any() if hi > lo else \
            (u < 0).any() and (u > 0).any()
        if gap > 1e-3 and branches:
            return inp, seed
    raise AssertionError(f"no kink-free inputs for {case.name} from seed {seed0}")


GRADCHECK_CASES = [
    replace(Case(1, 2, 3, 4, 5, 3, 3, (1, 1), (1, 1), (1, 1), residual="contig", dtype=torch.float64), act=a)
    for a in ACTS
] + [
    Case(2, 2, 3, 5, 5, 3, 2, (2, 1), (1, 0), (1, 2), bn="none", residual="strided", act="silu",
         dtype=torch.float64),
    Case(1, 3, 2, 5, 4, 3, 3, (2, 2), (2, 1), (2, 1), bias=False, bn="plain", act="gelu", dtype=torch.float64,
         layout="cl"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GEOMETRY_CASES + FEATURE_CASES + DTYPE_LAYOUT_CASES, ids=lambda c: c.name)
def test_matrix_through_the_cuda_backend(case):
    """The Triton kernel's whole matrix through resfuse._C's CUDA kernel
    (csrc/conv_bn_act.cu), by the same rule."""
    from resfuse._backends import cuda_extension
    if cuda_extension()[0] is None:
        pytest.fail(f"resfuse._C is not built on this GPU machine: {cuda_extension()[1]}")
    check_case(case, torch.device("cuda"), backend="cuda")
    assert resfuse.last_decision().backend == "cuda"


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.name)
def test_gradcheck_eager_float64(case):
    """gradcheck of every differentiable input (x, weight, bias, the four BN
    tensors, residual) through the eager backend, in float64."""
    inp, seed = _kink_free_inputs(case, torch.device("cpu"), seed_of(case.name))
    leaves = _leaves(inp)
    present = [i for i, t in enumerate(leaves) if t is not None]

    def fn(*ts):
        full = list(leaves)
        for i, t in zip(present, ts):
            full[i] = t
        return resfuse.conv_bn_act(full[0], full[1], full[2], bn_mean=full[3], bn_var=full[4],
                                   bn_weight=full[5], bn_bias=full[6], eps=case.eps, residual=full[7],
                                   stride=case.stride, padding=case.padding, dilation=case.dilation,
                                   activation=case.act, negative_slope=SLOPE, backend="eager")

    assert torch.autograd.gradcheck(fn, tuple(leaves[i] for i in present), eps=1e-6, atol=1e-6, rtol=1e-5), (
        f"{case.name} seed {seed}")


BACKWARD_CASES = [
    Case(2, 5, 7, 6, 7, 3, 3, (2, 2), (1, 1), (1, 1), residual="contig", act="relu"),
    Case(1, 17, 33, 7, 5, 3, 3, (1, 1), (2, 2), (2, 2), residual="strided", act="silu"),
    Case(2, 3, 5, 5, 7, 5, 5, (1, 2), (2, 1), (1, 1), bias=False, bn="plain", residual="cl", act="gelu",
         layout="cl"),
    Case(2, 5, 7, 6, 7, 3, 3, (1, 1), (1, 1), (1, 1), residual="contig", act="relu6", dtype=torch.float16),
    Case(1, 6, 9, 5, 5, 1, 1, (1, 1), (0, 0), (1, 1), bn="none", residual="contig", act="identity",
         dtype=torch.float16, layout="cl"),
    Case(1, 4, 6, 5, 6, 3, 3, (1, 1), (1, 1), (1, 1), residual="contig", act="leaky_relu"),
    Case(1, 4, 6, 5, 6, 3, 3, (1, 1), (1, 1), (1, 1), bn="gamma", act="hardswish", dtype=torch.float16),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c.name)
def test_triton_forward_backward_vs_eager_autograd(case, device):
    """Forward on the Triton kernel, backward through the op's autograd,
    every gradient by the rule against float64 autograd of the plain
    formula (err_eager from the same formula's autograd in the tested dtype)."""
    seed = seed_of(case.name)
    inp, seed = _kink_free_inputs(case, device, seed)
    leaves = _leaves(inp)
    out = run_triton(lambda: resfuse.conv_bn_act(
        leaves[0], leaves[1], leaves[2], bn_mean=leaves[3], bn_var=leaves[4], bn_weight=leaves[5],
        bn_bias=leaves[6], eps=case.eps, residual=leaves[7], stride=case.stride, padding=case.padding,
        dilation=case.dilation, activation=case.act, negative_slope=SLOPE, backend="triton"), case.name)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    present = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(out, [leaves[i] for i in present], grad_out)

    def ref_grads(dtype):
        ls = _leaves(inp, dtype)
        y = autograd_reference(*ls[:7], case.eps, ls[7], case.stride, case.padding, case.dilation, case.act)
        return y, torch.autograd.grad(y, [ls[i] for i in present], grad_out.to(dtype))

    y64, g64 = ref_grads(torch.float64)
    y_eager, g_eager = ref_grads(None)
    check(out, y64, y_eager, case.dtype, f"{case.name} forward", seed)
    for i, g, r, e in zip(present, grads, g64, g_eager):
        assert g.dtype == leaves[i].dtype and g.shape == leaves[i].shape
        # BN vectors are reduced over N*P*Q in fp32 by both; the floor of
        # their dtype is the yardstick.
        check(g, r, e, leaves[i].dtype, f"{case.name} d/d{_NAMES[i]}", seed)


# ----------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------

def _opcheck_args(case: Case, device, seed):
    inp = make_inputs(case, device, seed)
    ls = _leaves(inp)
    return (ls[0], ls[1], ls[2], ls[3], ls[4], ls[5], ls[6], case.eps, ls[7], list(case.stride),
            list(case.padding), list(case.dilation), 1, case.act)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_opcheck(backend, device):
    """torch.library.opcheck: schema, autograd registration, the fake kernel
    and AOT dispatch, with all optionals given and with none."""
    full = Case(1, 3, 5, 5, 4, 3, 3, (2, 1), (1, 1), (1, 1), residual="contig", act="silu")
    bare = Case(2, 3, 4, 5, 5, 3, 3, (1, 1), (0, 0), (1, 1), bias=False, bn="none", act="identity")
    leaky = Case(1, 3, 5, 4, 5, 3, 3, (1, 1), (1, 1), (1, 1), act="leaky_relu")
    for case, tail in ((full, ()), (bare, ()), (leaky, (SLOPE,))):  # the slope: optional, trailing
        args = _opcheck_args(case, device, seed_of(case.name))
        torch.library.opcheck(torch.ops.resfuse.conv_bn_act.default, args + (backend,) + tail)
        assert resfuse.last_decision().backend == backend


# ----------------------------------------------------------------------------
# Backend selection and TF32
# ----------------------------------------------------------------------------

def test_explicit_triton_unavailable_raises(device):
    case = replace(_SMALL, residual="none")
    inp = make_inputs(case, device, 3)
    # groups=2
    w2 = inp.weight[:6, :2].contiguous()  # weight (6, 2, 3, 3): groups=2 on a 4-channel input
    x4 = inp.x[:, :4].contiguous()
    with pytest.raises(resfuse.BackendUnavailable, match="groups=2") as ei:
        resfuse.conv_bn_act(x4, w2, groups=2, backend="triton")
    assert ei.value.backend == "triton" and ei.value.reasons
    # float64
    with pytest.raises(resfuse.BackendUnavailable, match="float64") as ei:
        resfuse.conv_bn_act(inp.x.double(), inp.weight.double(), backend="triton")
    assert any("float64" in r for r in ei.value.reasons)
    # backend='cuda' where the extension has no kernel for these tensors
    reasons = cuda_reasons("conv_bn_act", inp.x.device)
    if reasons:
        with pytest.raises(resfuse.BackendUnavailable, match="cuda") as ei:
            resfuse.conv_bn_act(inp.x, inp.weight, backend="cuda")
        assert ei.value.reasons == reasons


def test_auto_falls_back_to_eager_for_groups(device):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 7, 5, generator=gen).to(device)
    w = torch.randn(6, 2, 3, 3, generator=gen).to(device)
    b = torch.randn(6, generator=gen).to(device)
    mean, var = torch.randn(6, generator=gen).to(device), (torch.rand(6, generator=gen) + 0.5).to(device)
    kern = _kern()
    before = kern.LAUNCHES
    out = resfuse.conv_bn_act(x, w, b, bn_mean=mean, bn_var=var, padding=1, groups=2, activation="relu",
                              backend="auto")
    assert kern.LAUNCHES == before
    d = resfuse.last_decision()
    assert d.backend == "eager" and d.fell_back and "triton" in d.skipped
    assert any("groups=2" in r for r in d.skipped["triton"]), d.skipped
    assert "groups=2" in d.reason()
    kw = dict(padding=(1, 1), groups=2, activation="relu")
    ref64 = conv_bn_act_reference(*to_float64(x, w, b, mean, var), **kw)
    check(out, ref64, conv_bn_act_reference(x, w, b, mean, var, **kw), torch.float32, "groups=2 auto", 11)


def test_float64_auto_runs_eager():
    case = replace(_SMALL, dtype=torch.float64, residual="contig", act="gelu")
    inp, out = check_case(case, torch.device("cpu"), backend="auto")
    d = resfuse.last_decision()
    assert d.backend == "eager" and any("float64" in r for r in d.skipped["triton"])


@pytest.mark.parametrize("bad", ["Triton", "gpu", "", None, 1])
def test_invalid_backend_names_backend(bad):
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="backend"):
        resfuse.conv_bn_act(x, w, backend=bad)
    if isinstance(bad, str):  # the op itself checks too (its schema takes a str)
        with pytest.raises(ValueError, match="backend"):
            torch.ops.resfuse.conv_bn_act(x, w, None, None, None, None, None, 1e-5, None, [1, 1], [0, 0],
                                          [1, 1], 1, "identity", bad)


@pytest.mark.parametrize("allow", [False, True])
def test_tf32_flag_reaches_launcher(allow, device, monkeypatch):
    """The launcher's allow_tf32 follows conv_allows_tf32() (cuDNN's conv
    TF32 setting) on CUDA tensors; CPU tensors never use TF32 (neither does
    eager's CPU conv), so they get allow_tf32=False."""
    import resfuse.ops.conv_bn_act as ops
    monkeypatch.setattr(ops, "conv_allows_tf32", lambda: allow)
    kern = _kern()
    seen = []
    real = kern.conv_bn_act_fwd

    def spy(*a, **k):
        seen.append(k["allow_tf32"])
        return real(*a, **k)

    monkeypatch.setattr(kern, "conv_bn_act_fwd", spy)
    case = replace(_SMALL, act="identity")
    inp = make_inputs(case, device, 5)
    run_op(inp, case, "triton")
    assert seen == [allow if device.type == "cuda" else False]


def test_tf32_default_matches_torch_setting(device):
    """Without monkeypatching, what the op passes is torch's own setting."""
    kern = _kern()
    seen = []
    real = kern.conv_bn_act_fwd
    try:
        kern.conv_bn_act_fwd = lambda *a, **k: seen.append(k["allow_tf32"]) or real(*a, **k)
        case = replace(_SMALL, act="identity")
        run_op(make_inputs(case, device, 6), case, "triton")
    finally:
        kern.conv_bn_act_fwd = real
    assert seen == [conv_allows_tf32() if device.type == "cuda" else False]


# ----------------------------------------------------------------------------
# Bad input: a clear error naming the argument, or exactly eager's behaviour
# ----------------------------------------------------------------------------

def _good(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 3, 6, 5, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(4, 3, 3, 3, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(4, generator=gen).to(device=device, dtype=dtype)
    mean = torch.randn(4, generator=gen).to(device=device, dtype=dtype)
    var = (torch.rand(4, generator=gen) + 0.5).to(device=device, dtype=dtype)
    res = torch.randn(2, 4, 4, 3, generator=gen).to(device=device, dtype=dtype)
    return dict(x=x, weight=w, bias=b, bn_mean=mean, bn_var=var, residual=res)


def _call(backend="auto", **kw):
    a = dict(kw)
    x, w, b = a.pop("x"), a.pop("weight"), a.pop("bias", None)
    return resfuse.conv_bn_act(x, w, b, backend=backend, **a)


BAD_INPUTS = [
    # (id, change to the good arguments, exception, text the message must contain)
    ("x_int", lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "x must be"),
    ("x_int64_all", lambda a: a.update({k: v.to(torch.int64) for k, v in a.items()}), TypeError, "x must be"),
    ("weight_int", lambda a: a.update(weight=a["weight"].to(torch.int32)), TypeError, "weight"),
    ("weight_f64", lambda a: a.update(weight=a["weight"].double()), TypeError, "weight"),
    ("bias_f16", lambda a: a.update(bias=a["bias"].half()), TypeError, "bias"),
    ("residual_f64", lambda a: a.update(residual=a["residual"].double()), TypeError, "residual"),
    ("bn_var_int", lambda a: a.update(bn_var=a["bn_var"].to(torch.int32)), TypeError, "bn_var"),
    ("x_channels", lambda a: a.update(x=a["x"][:, :2]), ValueError, "channels"),
    ("weight_channels", lambda a: a.update(weight=a["weight"][:, :2]), ValueError, "channels"),
    ("x_3d", lambda a: a.update(x=a["x"][0]), ValueError, "x must be 4-D"),
    ("weight_2d", lambda a: a.update(weight=a["weight"][:, :, 0, 0]), ValueError, "weight"),
    ("x_zero_channels", lambda a: a.update(x=a["x"][:, :0], weight=a["weight"][:, :0]), ValueError, "x has 0 channels"),
    ("bias_shape", lambda a: a.update(bias=a["bias"][:3]), ValueError, "bias"),
    ("bn_mean_shape", lambda a: a.update(bn_mean=a["bn_mean"][:3]), ValueError, "bn_mean"),
    ("bn_var_2d", lambda a: a.update(bn_var=a["bn_var"][None]), ValueError, "bn_var"),
    ("bn_mean_alone", lambda a: a.pop("bn_var"), ValueError, "bn_mean and bn_var"),
    ("bn_weight_without_bn", lambda a: (a.pop("bn_mean"), a.pop("bn_var"), a.update(bn_weight=a["bias"])),
     ValueError, "bn_weight"),
    ("residual_shape", lambda a: a.update(residual=a["residual"][:, :, :3]), ValueError, "residual"),
    ("residual_channels", lambda a: a.update(residual=a["residual"][:, :3]), ValueError, "residual"),
    ("residual_batch", lambda a: a.update(residual=a["residual"][:1]), ValueError, "residual"),
    ("residual_unstrided_for_stride2", lambda a: a.update(stride=2), ValueError, "residual"),
    ("kernel_larger_than_input", lambda a: (a.update(x=a["x"][:, :, :2, :2]), a.pop("residual")),
     ValueError, "smaller than the kernel"),
    ("dilated_kernel_larger", lambda a: (a.update(dilation=3), a.pop("residual")), ValueError,
     "smaller than the kernel"),
    ("stride_0", lambda a: a.update(stride=0), ValueError, "stride"),
    ("stride_3_elems", lambda a: a.update(stride=(1, 1, 1)), ValueError, "stride"),
    ("padding_negative", lambda a: a.update(padding=-1), ValueError, "padding"),
    ("padding_same_asymmetric", lambda a: (a.update(weight=a["weight"][:, :, :2, :2]), a.pop("residual"),
                                           a.update(padding="same")), ValueError, "padding"),
    ("padding_word", lambda a: a.update(padding="full"), ValueError, "padding"),
    ("dilation_0", lambda a: a.update(dilation=0), ValueError, "dilation"),
    ("groups_0", lambda a: a.update(groups=0), ValueError, "groups"),
    ("groups_mismatch", lambda a: a.update(groups=2), ValueError, "groups"),
    ("eps_negative", lambda a: a.update(eps=-1.0), ValueError, "eps"),
    ("activation", lambda a: a.update(activation="tanh"), ValueError, "activation"),
]


@pytest.mark.parametrize("backend", ["auto", "triton", "eager"])
@pytest.mark.parametrize("change,exc,text", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_clear_error(change, exc, text, backend, device):
    args = _good(device)
    _call("eager", **dict(args))  # the unchanged arguments are fine
    change(args)
    kern = _kern()
    before = kern.LAUNCHES
    with pytest.raises(exc, match=text):
        _call(backend, **args)
    assert kern.LAUNCHES == before


def test_mixed_devices(device):
    """Tensors on another device than x: a clear error naming the tensor.
    'meta' stands in for the other device where there is no second one."""
    other = torch.device("meta") if device.type == "cpu" else torch.device("cpu")
    for name in ("weight", "bias", "bn_mean", "bn_var", "residual"):
        args = _good(device)
        args[name] = args[name].to(other)
        with pytest.raises((ValueError, RuntimeError), match=name):
            _call("auto", **args)
    args = _good(device)
    args["x"] = args["x"].to(other)
    with pytest.raises((ValueError, RuntimeError), match="weight"):
        _call("auto", **args)


@pytest.mark.parametrize("backend", ["auto", "triton", "eager"])
def test_empty_batch_and_no_output_channels(backend, device):
    """N=0 gives eager's empty result, with the right shape and nothing
    launched; K=0 (eager: "expected weight to be at least 1 at dimension 0")
    a clear error naming weight."""
    args = _good(device)
    a = dict(args, x=args["x"][:0], residual=args["residual"][:0])
    kern = _kern()
    before = kern.LAUNCHES
    out = _call(backend, **a)
    want = F.conv2d(a["x"], a["weight"], a["bias"])
    assert out.shape == want.shape == (0, 4, 4, 3) and out.dtype == want.dtype and out.device == want.device
    assert kern.LAUNCHES == before
    if backend != "auto":
        assert resfuse.last_decision().backend == backend
    a = dict(args, weight=args["weight"][:0], residual=args["residual"][:, :0])
    for v in ("bias", "bn_mean", "bn_var"):
        a[v] = args[v][:0]
    with pytest.raises(RuntimeError):
        F.conv2d(a["x"], a["weight"], a["bias"])
    with pytest.raises(ValueError, match="weight"):
        _call(backend, **a)


def test_unbatched_and_list_inputs_rejected():
    """Non-tensor inputs reach the op's schema: an error naming the argument."""
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises((TypeError, RuntimeError), match="x"):
        resfuse.conv_bn_act(x.tolist(), w)
    with pytest.raises((TypeError, ValueError), match="weight"):
        resfuse.conv_bn_act(x, w.tolist())
    with pytest.raises((TypeError, RuntimeError), match="residual"):
        resfuse.conv_bn_act(x, w, residual=[1.0])


def test_padding_same_and_valid(device):
    case = replace(_SMALL, padding=(1, 1), act="relu")
    inp = make_inputs(case, device, 9)
    a = run_triton(lambda: run_op(inp, case, "triton", padding="same"), "same")
    b = run_triton(lambda: run_op(inp, case, "triton"), "padding=1")
    assert a.shape[2:] == inp.x.shape[2:] and torch.equal(a, b)
    c = run_triton(lambda: run_op(inp, case, "triton", padding="valid", residual=None), "valid")
    assert c.shape[2:] == (3, 5)


def test_floors_are_the_guide_values():
    """The tolerance floors the tests rely on are GUIDE §3's."""
    assert FLOOR[torch.float32] == 1e-5 and FLOOR[torch.float16] == 2e-3 and FLOOR[torch.bfloat16] == 1.6e-2
