"""The 1x1-conv kernels of kernels/conv1x1.py that the HorBlock MLP half and
the gnconv backward are built from, called through their launchers:

  ln_conv1x1_fwd   out = residual + ss[n] * ls[k] * (b + W @ P(x)),
                   P = LayerNorm | GELU | identity
  conv1x1_dgrad    out = (W^T @ (dy * cs * ss)) [* GELU'(a) | LayerNorm backward]
  conv1x1_wgrad    G = sum_p (a * ss) P(b)^T, rowsum = sum_p a * ss (split-K)

Every output is compared with eager PyTorch in float64 (F.conv2d and
torch.autograd.grad of the reference composition) by the rule of GUIDE §3
(tests/numerics.py): rel err <= max(2 x eager's own error in the tested
dtype, floor). Outputs start as NaN; views sit inside NaN buffers, so an
element written or read outside a view fails too. Each test proves that the
Triton launcher ran (launch counters).
"""

import os
import subprocess
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from resfuse._backends import kernels_module
from resfuse.reference import layer_norm_channels_first_reference as ln_ref

from numerics import FLOOR, assert_matches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")
EPS = 1e-6


def _k():
    """The forward (kernels/conv1x1.py) and backward (kernels/conv1x1_bwd.py)
    launchers and kernels under one name."""
    return SimpleNamespace(**{**vars(kernels_module("conv1x1")), **vars(kernels_module("conv1x1_bwd"))})


def _launches(name):
    return kernels_module("_common").LAUNCHES_BY_KERNEL[name]


# ----------------------------------------------------------------------------
# Layouts and inputs
# ----------------------------------------------------------------------------

def _buffer(shape, layout, dtype, device):
    """(view of `shape`, the NaN buffer it lives in) for a layout:
    nchw, cl (channels_last), view (channel slice of a wider NCHW buffer),
    clview (channel slice of a channels_last buffer), spatial (an H/W
    window of a larger buffer: h-stride != W * w-stride, the kernels'
    non-flat path)."""
    N, C, H, W = shape
    if layout == "nchw":
        buf = torch.full(shape, NAN, dtype=dtype, device=device)
        return buf, buf
    if layout == "cl":
        buf = torch.full(shape, NAN, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
        return buf, buf
    if layout in ("view", "clview"):
        buf = torch.full((N, C + 11, H, W), NAN, dtype=dtype, device=device)
        if layout == "clview":
            buf = buf.contiguous(memory_format=torch.channels_last)
        return buf[:, 5:5 + C], buf
    if layout == "spatial":
        buf = torch.full((N, C, H + 2, W + 3), NAN, dtype=dtype, device=device)
        return buf[:, :, 1:1 + H, 2:2 + W], buf
    raise ValueError(layout)


def _place(t, layout):
    v, _ = _buffer(tuple(t.shape), layout, t.dtype, t.device)
    v.copy_(t)
    return v


def _weight(K, C, form, dtype, device, g):
    """W (K, C) as a Linear weight (2d), a conv weight (4d) or a transposed
    view (t: strides (1, K))."""
    w = (torch.randn(K, C, generator=g) / C ** 0.5).to(dtype)
    if form == "4d":
        w = w[:, :, None, None].contiguous()
    elif form == "t":
        w = w.t().contiguous().t()
    return w.to(device)


def _w4(w):
    return w.reshape(w.shape[0], w.shape[1], 1, 1)


def _rand(shape, dtype, device, g, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=g) * scale + offset).to(dtype).to(device)


def _c(v, dt):
    return None if v is None else v.to(dt)


def _outside_untouched(view, buf):
    """The kernel wrote nothing outside `view` (the rest of buf is NaN)."""
    if view is buf:
        return
    n_nan = int(torch.isnan(buf).sum()) - int(torch.isnan(view).sum())
    assert n_nan == buf.numel() - view.numel(), "a kernel wrote outside its output view"


def _sample_scale(N, dtype, device, g):
    """A drop-path mask (one sample dropped when N = 2) or a random scale."""
    if N == 2:
        return torch.tensor([1.0 / 0.7, 0.0], dtype=dtype, device=device)
    return (torch.rand(N, generator=g) + 0.5).to(dtype).to(device)


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Fwd:
    N: int
    C: int
    K: int
    H: int
    W: int
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"
    wform: str = "2d"
    prologue: str = "none"     # none | ln | gelu
    bias: bool = True
    ls: bool = False
    ss: bool = False
    res: bool = False

    @property
    def name(self):
        on = [f for f in ("bias", "ls", "ss", "res") if getattr(self, f)]
        return (f"{self.N}x{self.C}->{self.K}@{self.H}x{self.W}-{str(self.dtype)[6:]}-{self.layout}-{self.wform}"
                f"-{self.prologue}-{'+'.join(on) or 'plain'}")


FWD_CASES = [
    # HorBlock pwconv2: GELU prologue, gamma2, drop path, residual
    Fwd(2, 40, 24, 5, 7, prologue="gelu", ls=True, ss=True, res=True),
    Fwd(1, 96, 40, 3, 5, torch.float16, "cl", "4d", prologue="gelu", bias=False),
    # HorBlock pwconv1: norm2 prologue (+ epilogues the MLP does not use)
    Fwd(2, 24, 96, 5, 7, layout="view", prologue="ln", ls=True, res=True),
    Fwd(2, 40, 24, 7, 3, torch.float16, "view", "4d", prologue="ln", ls=True, ss=True, res=True),
    Fwd(2, 24, 40, 5, 7, torch.float16, "nchw", "4d", ss=True),
    Fwd(1, 24, 40, 5, 7, torch.float32, "spatial", "2d", res=True),
    Fwd(2, 40, 24, 3, 5, torch.float32, "clview", "t", prologue="gelu", ss=True, res=True),
    Fwd(2, 40, 24, 5, 7, torch.bfloat16, "nchw", "2d", prologue="gelu", ls=True, ss=True, res=True),
    Fwd(1, 24, 24, 1, 9, torch.float32, "nchw", "4d", prologue="gelu", ls=True),
]


def _fwd_inputs(case, device, seed):
    g = torch.Generator().manual_seed(seed)
    dt = case.dtype
    x = _rand((case.N, case.C, case.H, case.W), dt, device, g, offset=0.3 if case.prologue == "ln" else 0.0)
    t = dict(x=_place(x, case.layout), w=_weight(case.K, case.C, case.wform, dt, device, g),
             b=_rand((case.K,), dt, device, g) if case.bias else None,
             nw=_rand((case.C,), dt, device, g, 0.5, 1.0) if case.prologue == "ln" else None,
             nb=_rand((case.C,), dt, device, g, 0.5) if case.prologue == "ln" else None,
             ls=_rand((case.K,), dt, device, g) if case.ls else None,
             ss=_sample_scale(case.N, dt, device, g) if case.ss else None,
             res=_place(_rand((case.N, case.K, case.H, case.W), dt, device, g), case.layout) if case.res else None)
    return t


def _fwd_reference(t, case, dt):
    x = t["x"].to(dt)
    if case.prologue == "ln":
        h = ln_ref(x, _c(t["nw"], dt), _c(t["nb"], dt), EPS)
    elif case.prologue == "gelu":
        h = F.gelu(x)
    else:
        h = x
    y = F.conv2d(h, _w4(t["w"]).to(dt), _c(t["b"], dt))
    if t["ls"] is not None:
        y = y * t["ls"].to(dt).view(1, -1, 1, 1)
    if t["ss"] is not None:
        y = y * t["ss"].to(dt).view(-1, 1, 1, 1)
    if t["res"] is not None:
        y = y + t["res"].to(dt)
    return y


def _run_fwd(t, case, device, **kw):
    out, buf = _buffer((case.N, case.K, case.H, case.W), case.layout, case.dtype, device)
    before = _launches("ln_conv1x1")
    _k().ln_conv1x1_fwd(t["x"], t["w"], t["b"], t["nw"], t["nb"], EPS if case.prologue == "ln" else None, out,
                        allow_tf32=False, prologue_gelu=case.prologue == "gelu", layer_scale=t["ls"],
                        sample_scale=t["ss"], residual=t["res"], **kw)
    assert _launches("ln_conv1x1") == before + 1
    return out, buf


@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: c.name)
def test_forward(case, device, seed):
    t = _fwd_inputs(case, device, seed)
    out, buf = _run_fwd(t, case, device)
    _outside_untouched(out, buf)
    err, tol = assert_matches(out, _fwd_reference(t, case, torch.float64), _fwd_reference(t, case, case.dtype),
                              case.dtype, case.name, seed)
    print(f"{case.name}: err {err:.2e} tol {tol:.2e}")


def test_forward_gelu_rounds_like_eager(device, seed):
    """P(x) = GELU(x) is rounded to x's dtype before the dot: the fp16
    kernel matches eager fp16 F.conv2d(F.gelu(x)) more closely than it
    matches the float64 result (one GELU rounding either way)."""
    case = Fwd(1, 96, 24, 5, 7, torch.float16, prologue="gelu", bias=False)
    t = _fwd_inputs(case, device, seed)
    out, _ = _run_fwd(t, case, device)
    rounded = F.conv2d(F.gelu(t["x"].double()).half().double(), _w4(t["w"]).double())
    exact = _fwd_reference(t, case, torch.float64)
    d_r = (out.double() - rounded).norm() / rounded.norm()
    d_e = (out.double() - exact).norm() / exact.norm()
    assert d_r < d_e


@pytest.mark.parametrize("dtype,offset", [(torch.float16, 1000.0), (torch.bfloat16, 300.0)], ids=["fp16", "bf16"])
def test_forward_ln_fold_when_mean_dominates(dtype, offset, device, seed):
    """16-bit LayerNorm prologue runs folded (W' = W diag(lnw), the mean
    subtracted in the epilogue): exactly one fold launch per call, within
    the rule when |mean| >> std (the cancellation the fold must survive),
    and an edit of the LN weight through .data is seen at the next call."""
    case = Fwd(2, 40, 24, 5, 7, dtype, "cl", "4d", prologue="ln")
    t = _fwd_inputs(case, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    t["x"] = _place(_rand((case.N, case.C, case.H, case.W), dtype, device, g, 4.0, offset), case.layout)
    for step in range(2):
        before = _launches("ln_fold_weight")
        out, _ = _run_fwd(t, case, device)
        assert _launches("ln_fold_weight") == before + 1, "the 16-bit LN prologue did not run folded"
        ref = _fwd_reference(t, case, torch.float64)
        err, _ = assert_matches(out, ref, _fwd_reference(t, case, dtype), dtype, f"{case.name} step {step}", seed)
        # The 16-bit reference's own LayerNorm loses bits to the offset, so
        # the rule's 2x-eager bound is loose here; the fold must stay at the
        # dtype's floor (u from the unrounded W' lands at 4e-2 / 2e-1).
        assert err <= FLOOR[dtype], f"{case.name} step {step}: rel err {err:.2e} > floor {FLOOR[dtype]:.1e}"
        t["nw"].data.mul_(-0.5).add_(0.25)


@pytest.mark.parametrize("C,nw_scale,offset", [(64, 1e-5, 0.0), (512, 1.0, 100.0)], ids=["small-lnw", "C512-mean"])
def test_forward_ln_fold_scale_and_width(C, nw_scale, offset, device, seed):
    """fp16 fold at the edges: LN weights of 1e-5 (W diag(lnw) would be
    fp16 subnormals without the per-row power-of-two scale; a layer scale
    of 1e3 brings the output back to the normal range) and 512 channels
    with |mean|/std = 50; held to the dtype floor."""
    dtype = torch.float16
    case = Fwd(1, C, 24, 3, 5, dtype, "cl", "4d", prologue="ln", ls=True)
    t = _fwd_inputs(case, device, seed)
    g = torch.Generator().manual_seed(seed + 2)
    t["x"] = _place(_rand((1, C, 3, 5), dtype, device, g, 2.0, offset), case.layout)
    t["nw"] = (t["nw"].float() * nw_scale).to(dtype)
    t["nb"] = (t["nb"].float() * nw_scale).to(dtype)
    t["ls"] = (t["ls"].float() * min(1e3, 1 / nw_scale)).to(dtype)
    t["b"] = (t["b"].float() * nw_scale).to(dtype)
    out, _ = _run_fwd(t, case, device)
    err, _ = assert_matches(out, _fwd_reference(t, case, torch.float64), _fwd_reference(t, case, dtype), dtype,
                            case.name, seed)
    assert err <= FLOOR[dtype], f"{case.name}: rel err {err:.2e} > floor {FLOOR[dtype]:.1e}"


def test_forward_ln_fp32_is_not_folded(device, seed):
    """fp32 keeps the LayerNorm in the prologue (the fold's x @ W' would
    lose TF32 bits to the mean term)."""
    case = Fwd(1, 24, 40, 3, 5, torch.float32, prologue="ln")
    before = _launches("ln_fold_weight")
    _run_fwd(_fwd_inputs(case, device, seed), case, device)
    assert _launches("ln_fold_weight") == before


# ----------------------------------------------------------------------------
# Data gradient
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Dgrad:
    N: int
    K: int
    C: int
    H: int
    W: int
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"
    wform: str = "2d"
    epi: str = "none"          # none | gelu | ln
    cs: bool = False
    ss: bool = False
    nw: bool = True            # LayerNorm affine weight / bias present (epi == ln)
    nb: bool = True
    offset: float = 0.0        # added to the LayerNorm input (|mean| >> std)

    @property
    def name(self):
        on = [f for f in ("cs", "ss") if getattr(self, f)]
        if self.epi == "ln":
            on += [f for f in ("nw", "nb") if getattr(self, f)]
        return (f"{self.N}x{self.K}->{self.C}@{self.H}x{self.W}-{str(self.dtype)[6:]}-{self.layout}-{self.wform}"
                f"-{self.epi}-{'+'.join(on) or 'plain'}{'-off' if self.offset else ''}")


DGRAD_CASES = [
    Dgrad(2, 24, 40, 5, 7),
    Dgrad(2, 96, 24, 5, 7, layout="cl", wform="4d", epi="gelu", cs=True, ss=True),   # HorBlock pwconv2 bwd
    Dgrad(1, 40, 96, 3, 5, torch.float16, "view", "t", epi="gelu"),
    Dgrad(2, 96, 40, 5, 7, epi="ln", cs=True, ss=True),                               # HorBlock pwconv1 bwd
    Dgrad(2, 40, 24, 7, 3, torch.float16, "cl", "4d", epi="ln", nw=False, nb=False),
    Dgrad(1, 24, 40, 5, 7, torch.float32, "view", "4d", epi="ln", cs=True, nb=False),
    Dgrad(2, 24, 40, 3, 5, torch.float32, "spatial", "t", epi="ln", ss=True, nw=False),
    Dgrad(1, 40, 24, 5, 7, torch.float32, "nchw", "2d", epi="ln", offset=30.0),
    Dgrad(2, 24, 40, 3, 5, torch.float32, "spatial", "2d", epi="gelu", ss=True),
    Dgrad(2, 40, 24, 5, 7, torch.float16, "clview", "2d", epi="none", cs=True, ss=True),
    Dgrad(2, 40, 24, 5, 7, torch.bfloat16, "nchw", "2d", epi="gelu", cs=True),
    Dgrad(1, 40, 24, 5, 7, torch.bfloat16, "nchw", "2d", epi="ln", cs=True),
]


def _dgrad_inputs(case, device, seed):
    g = torch.Generator().manual_seed(seed)
    dt = case.dtype
    shape_in = (case.N, case.C, case.H, case.W)
    t = dict(dy=_place(_rand((case.N, case.K, case.H, case.W), dt, device, g), case.layout),
             w=_weight(case.K, case.C, case.wform, dt, device, g),
             cs=_rand((case.K,), dt, device, g) if case.cs else None,
             ss=_sample_scale(case.N, dt, device, g) if case.ss else None,
             a=_place(_rand(shape_in, dt, device, g, 1.5), case.layout) if case.epi == "gelu" else None,
             x=None, nw=None, nb=None)
    if case.epi == "ln":
        t["x"] = _place(_rand(shape_in, dt, device, g, 1.0, case.offset) + _rand((1, case.C, 1, 1), dt, device, g, 0.3),
                        case.layout)
        t["nw"] = _rand((case.C,), dt, device, g, 0.5, 1.0) if case.nw else None
        t["nb"] = _rand((case.C,), dt, device, g, 0.5) if case.nb else None
    return t


def _dgrad_reference(t, case, dt):
    """{out, mean, rstd, dnw, dnb} by eager autograd in dtype dt."""
    with torch.enable_grad():
        leaves, nw, nb = [], None, None
        if case.epi == "ln":
            x = t["x"].to(dt).requires_grad_()
            nw = None if t["nw"] is None else t["nw"].to(dt).requires_grad_()
            nb = None if t["nb"] is None else t["nb"].to(dt).requires_grad_()
            leaves = [x] + [v for v in (nw, nb) if v is not None]
            h = ln_ref(x, nw, nb, EPS)
        elif case.epi == "gelu":
            a = t["a"].to(dt).requires_grad_()
            leaves, h = [a], F.gelu(a)
        else:
            h = torch.zeros(case.N, case.C, case.H, case.W, dtype=dt, device=t["dy"].device).requires_grad_()
            leaves = [h]
        y = F.conv2d(h, _w4(t["w"]).to(dt))
        if t["cs"] is not None:
            y = y * t["cs"].to(dt).view(1, -1, 1, 1)
        if t["ss"] is not None:
            y = y * t["ss"].to(dt).view(-1, 1, 1, 1)
        grads = list(torch.autograd.grad(y, leaves, t["dy"].to(dt)))
    r = dict(out=grads.pop(0))
    if case.epi == "ln":
        x = t["x"].to(dt)
        mean = x.mean(1)
        r["mean"] = mean.reshape(-1)
        r["rstd"] = (1.0 / torch.sqrt((x - mean[:, None]).pow(2).mean(1) + EPS)).reshape(-1)
        r["dnw"] = grads.pop(0) if nw is not None else None
        r["dnb"] = grads.pop(0) if nb is not None else None
    return r


def _run_dgrad(t, case, device, **kw):
    out, buf = _buffer((case.N, case.C, case.H, case.W), case.layout, case.dtype, device)
    before = _launches("conv1x1_dgrad")
    ret = _k().conv1x1_dgrad(t["dy"], t["w"], out, allow_tf32=False, channel_scale=t["cs"], sample_scale=t["ss"],
                             gelu_input=t["a"], norm=(t["x"], t["nw"], t["nb"], EPS) if case.epi == "ln" else None,
                             **kw)
    assert _launches("conv1x1_dgrad") == before + 1
    return out, buf, ret


@pytest.mark.parametrize("case", DGRAD_CASES, ids=lambda c: c.name)
def test_dgrad(case, device, seed):
    t = _dgrad_inputs(case, device, seed)
    out, buf, ret = _run_dgrad(t, case, device)
    _outside_untouched(out, buf)
    ref, eager = _dgrad_reference(t, case, torch.float64), _dgrad_reference(t, case, case.dtype)
    got = dict(out=out)
    if case.epi == "ln":
        mean, rstd, dnw, dnb = ret
        assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (case.N * case.H * case.W,)
        assert (dnw is None) == (not case.nw) and (dnb is None) == (not case.nb)
        got.update(mean=mean, rstd=rstd, dnw=dnw, dnb=dnb)
        for v in (dnw, dnb):
            assert v is None or (v.dtype == torch.float32 and v.shape == (case.C,))
    else:
        assert ret is None
    for key, v in got.items():
        if v is None:
            continue
        err, tol = assert_matches(v, ref[key], eager[key], case.dtype, f"{case.name} [{key}]", seed)
        print(f"{case.name} [{key}]: err {err:.2e} tol {tol:.2e}")


# ----------------------------------------------------------------------------
# Weight gradient
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Wgrad:
    N: int
    K: int
    C: int
    H: int
    W: int
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"
    pro: str = "none"          # none | gelu | ln (prologue on b)
    ss: bool = False
    nw: bool = True
    nb: bool = True
    rowsum: bool = True
    split: Optional[int] = None

    @property
    def name(self):
        on = [f for f in ("ss",) if getattr(self, f)]
        if self.pro == "ln":
            on += [f for f in ("nw", "nb") if getattr(self, f)]
        return (f"{self.N}x{self.K}x{self.C}@{self.H}x{self.W}-{str(self.dtype)[6:]}-{self.layout}-{self.pro}"
                f"-{'+'.join(on) or 'plain'}-split{self.split}{'' if self.rowsum else '-norowsum'}")


WGRAD_CASES = [
    Wgrad(2, 24, 40, 5, 7),
    Wgrad(2, 24, 96, 5, 7, layout="cl", pro="gelu", ss=True, split=3),               # HorBlock W2 grad
    Wgrad(2, 96, 24, 7, 3, torch.float16, "view", pro="ln", ss=True, split=2),      # HorBlock W1 grad
    Wgrad(1, 40, 24, 3, 5, torch.float32, "spatial", pro="ln", nw=False, nb=False, rowsum=False),
    Wgrad(1, 96, 40, 3, 5, torch.float16, "clview", pro="none", ss=True, split=4),   # 1 pixel block, 4 splits
    Wgrad(2, 40, 24, 5, 7, torch.float32, "nchw", pro="ln", nb=False, split=5),
    Wgrad(2, 24, 40, 5, 7, torch.bfloat16, "nchw", pro="gelu", ss=True, split=2),
]


def _wgrad_inputs(case, device, seed):
    g = torch.Generator().manual_seed(seed)
    dt = case.dtype
    t = dict(a=_place(_rand((case.N, case.K, case.H, case.W), dt, device, g), case.layout),
             b=_place(_rand((case.N, case.C, case.H, case.W), dt, device, g, 1.5, 0.2), case.layout),
             ss=_sample_scale(case.N, dt, device, g) if case.ss else None, stats=None,
             nw=_rand((case.C,), dt, device, g, 0.5, 1.0) if case.pro == "ln" and case.nw else None,
             nb=_rand((case.C,), dt, device, g, 0.5) if case.pro == "ln" and case.nb else None)
    if case.pro == "ln":
        b64 = t["b"].double()
        mean = b64.mean(1)
        rstd = 1.0 / torch.sqrt((b64 - mean[:, None]).pow(2).mean(1) + EPS)
        t["stats"] = (mean.reshape(-1).float(), rstd.reshape(-1).float())
    return t


def _wgrad_reference(t, case, dt):
    """(G, rowsum): the weight and bias gradients of conv2d(P(b), W, bias)
    with upstream gradient a * ss, by eager autograd in dtype dt."""
    a, b = t["a"].to(dt), t["b"].to(dt)
    if t["ss"] is not None:
        a = a * t["ss"].to(dt).view(-1, 1, 1, 1)
    if case.pro == "gelu":
        b = F.gelu(b)
    elif case.pro == "ln":
        b = ln_ref(b, _c(t["nw"], dt), _c(t["nb"], dt), EPS)
    with torch.enable_grad():
        w = torch.zeros(case.K, case.C, 1, 1, dtype=dt, device=a.device, requires_grad=True)
        bias = torch.zeros(case.K, dtype=dt, device=a.device, requires_grad=True)
        gw, gb = torch.autograd.grad(F.conv2d(b, w, bias), (w, bias), a)
    return gw[:, :, 0, 0], gb


def _run_wgrad(t, case, **kw):
    before = _launches("conv1x1_wgrad")
    b_norm = None if case.pro != "ln" else (*t["stats"], t["nw"], t["nb"])
    ret = _k().conv1x1_wgrad(t["a"], t["b"], allow_tf32=False, sample_scale=t["ss"], b_gelu=case.pro == "gelu",
                             b_norm=b_norm, want_rowsum=case.rowsum, split=case.split, **kw)
    assert _launches("conv1x1_wgrad") == before + 1
    return ret


@pytest.mark.parametrize("case", WGRAD_CASES, ids=lambda c: c.name)
def test_wgrad(case, device, seed):
    t = _wgrad_inputs(case, device, seed)
    g, rs = _run_wgrad(t, case)
    assert g.dtype == torch.float32 and g.shape == (case.K, case.C)
    ref_g, ref_rs = _wgrad_reference(t, case, torch.float64)
    eager_g, eager_rs = _wgrad_reference(t, case, case.dtype)
    err, tol = assert_matches(g, ref_g, eager_g, case.dtype, f"{case.name} [G]", seed)
    print(f"{case.name} [G]: err {err:.2e} tol {tol:.2e}")
    if case.rowsum:
        assert rs.dtype == torch.float32 and rs.shape == (case.K,)
        err, tol = assert_matches(rs, ref_rs, eager_rs, case.dtype, f"{case.name} [rowsum]", seed)
        print(f"{case.name} [rowsum]: err {err:.2e} tol {tol:.2e}")
    else:
        assert rs is None


def test_wgrad_split_rule():
    """Two programs per SM at 64x64 tiles, no split under 2048 pixels."""
    k = _k()
    assert k.WGRAD_MIN_PIXELS_PER_SPLIT == 2048
    assert k.wgrad_split(35, 24, 40, 132) == 1                 # tiny: one split
    assert k.wgrad_split(64 * 56 * 56, 256, 64, 132) == 66     # 4 tiles: ceil(264 / 4)
    assert k.wgrad_split(32 * 56 * 56, 256, 64, 132) == 49     # ... capped at 100352 // 2048
    assert k.wgrad_split(32 * 7 * 7, 768, 3072, 132) == 1      # enough tiles already
    assert k.wgrad_split(4096, 64, 64, 132) == 2               # capped by pixels


def test_wgrad_split_count_does_not_change_the_answer(device, seed):
    case = Wgrad(2, 40, 24, 5, 7, pro="gelu", ss=True)
    t = _wgrad_inputs(case, device, seed)
    g1, r1 = _run_wgrad(t, replace(case, split=1))
    for s in (2, 3, 7):
        g, r = _run_wgrad(t, replace(case, split=s))
        torch.testing.assert_close(g, g1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r, r1, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# The HorBlock MLP, forward and backward, through the kernels
# ----------------------------------------------------------------------------

def test_horblock_mlp_forward_and_backward(device, seed):
    """y = x + dp * gamma2 * pwconv2(GELU(pwconv1(LN(x)))) and every
    gradient of it, composed from the three launchers exactly as the MLP
    half will be (dgrad's LayerNorm statistics feed wgrad)."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W, dt = 2, 24, 5, 7, torch.float32
    x = _rand((N, C, H, W), dt, device, g).contiguous(memory_format=torch.channels_last)
    nw, nb = _rand((C,), dt, device, g, 0.5, 1.0), _rand((C,), dt, device, g, 0.5)
    w1, b1 = _weight(4 * C, C, "2d", dt, device, g), _rand((4 * C,), dt, device, g)
    w2, b2 = _weight(C, 4 * C, "2d", dt, device, g), _rand((C,), dt, device, g)
    gamma, dp = _rand((C,), dt, device, g), _sample_scale(N, dt, device, g)
    dy = _rand((N, C, H, W), dt, device, g)
    k = _k()

    a = torch.full((N, 4 * C, H, W), NAN, dtype=dt, device=device)
    k.ln_conv1x1_fwd(x, w1, b1, nw, nb, EPS, a, allow_tf32=False)
    y = torch.full_like(x, NAN)
    k.ln_conv1x1_fwd(a, w2, b2, None, None, None, y, allow_tf32=False, prologue_gelu=True, layer_scale=gamma,
                     sample_scale=dp, residual=x)
    da = torch.full_like(a, NAN)
    k.conv1x1_dgrad(dy, w2, da, allow_tf32=False, channel_scale=gamma, sample_scale=dp, gelu_input=a)
    dw2, db2 = k.conv1x1_wgrad(dy, a, allow_tf32=False, sample_scale=dp, b_gelu=True)
    # wgrad has no channel scale: gamma2 scales rows k of dW2 and db2 afterwards.
    dw2, db2 = dw2 * gamma[:, None].float(), db2 * gamma.float()
    dx = torch.full_like(x, NAN)
    mean, rstd, dnw, dnb = k.conv1x1_dgrad(da, w1, dx, allow_tf32=False, norm=(x, nw, nb, EPS))
    dx = dx + dy
    dw1, db1 = k.conv1x1_wgrad(da, x, allow_tf32=False, b_norm=(mean, rstd, nw, nb))
    # d(gamma) is a per-channel reduction the MLP does outside these kernels.

    def mlp(dtype):
        p = [v.detach().to(dtype).requires_grad_() for v in (x, nw, nb, w1, b1, w2, b2)]
        xx, nw_, nb_, w1_, b1_, w2_, b2_ = p
        h = F.conv2d(ln_ref(xx, nw_, nb_, EPS), _w4(w1_), b1_)
        out = F.conv2d(F.gelu(h), _w4(w2_), b2_) * gamma.to(dtype).view(1, -1, 1, 1) * dp.to(dtype).view(-1, 1, 1, 1)
        out = xx + out
        return out, h, torch.autograd.grad(out, p, dy.to(dtype))

    with torch.enable_grad():
        ref, ref_h, ref_g = mlp(torch.float64)
        eager, eager_h, eager_g = mlp(dt)
    assert_matches(a, ref_h, eager_h, dt, "pwconv1", seed)
    assert_matches(y, ref, eager, dt, "y", seed)
    names = ["dx", "dnw", "dnb", "dw1", "db1", "dw2", "db2"]
    for name, got, r, e in zip(names, (dx, dnw, dnb, dw1, db1, dw2, db2), ref_g, eager_g):
        err, tol = assert_matches(got.reshape(r.shape), r, e, dt, name, seed)
        print(f"mlp {name}: err {err:.2e} tol {tol:.2e}")


# ----------------------------------------------------------------------------
# int64 offsets, non-finite values, errors, pruning
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["fwd", "dgrad_gelu", "dgrad_ln", "wgrad"])
def test_force_int64_same_answer(kernel, device, seed):
    """The 64-bit addressing path (taken when a tensor spans 2**31
    elements) computes the same result as the 32-bit one."""
    if kernel == "fwd":
        case = Fwd(2, 40, 24, 5, 7, layout="view", prologue="gelu", ls=True, ss=True, res=True)
        t = _fwd_inputs(case, device, seed)
        o64, _ = _run_fwd(t, case, device, force_int64=True)
        o32, _ = _run_fwd(t, case, device)
        pairs = [(o64, o32)]
    elif kernel.startswith("dgrad"):
        case = Dgrad(2, 24, 40, 5, 7, layout="cl", epi=kernel[6:], cs=True, ss=True)
        t = _dgrad_inputs(case, device, seed)
        o64, _, r64 = _run_dgrad(t, case, device, force_int64=True)
        o32, _, r32 = _run_dgrad(t, case, device)
        pairs = [(o64, o32)] + ([] if r64 is None else list(zip(r64, r32)))
    else:
        case = Wgrad(2, 24, 40, 5, 7, layout="view", pro="ln", ss=True, split=2)
        t = _wgrad_inputs(case, device, seed)
        pairs = list(zip(_run_wgrad(t, case, force_int64=True), _run_wgrad(t, case)))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=False)


def test_nonfinite_propagates_as_eager(device, seed):
    """NaN/Inf in an input reach exactly the outputs they reach in eager."""
    case = Fwd(1, 40, 24, 5, 7, prologue="gelu", ls=True, res=True)
    t = _fwd_inputs(case, device, seed)
    t["x"][0, 3, 2, 4] = NAN
    out, _ = _run_fwd(t, case, device)
    ref = _fwd_reference(t, case, torch.float64)
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert_matches(out, ref, _fwd_reference(t, case, case.dtype), case.dtype, "fwd NaN", seed)

    case = Dgrad(1, 24, 40, 5, 7, epi="ln")
    t = _dgrad_inputs(case, device, seed)
    t["dy"][0, 5, 1, 1] = float("inf")
    t["x"][0, 7, 3, 6] = NAN
    out, _, (mean, rstd, dnw, dnb) = _run_dgrad(t, case, device)
    ref, eager = _dgrad_reference(t, case, torch.float64), _dgrad_reference(t, case, case.dtype)
    assert torch.isnan(ref["out"]).any() and not torch.isnan(ref["out"]).all()
    for key, v in dict(out=out, mean=mean, rstd=rstd, dnw=dnw, dnb=dnb).items():
        assert_matches(v, ref[key], eager[key], case.dtype, f"dgrad_ln non-finite [{key}]", seed)


def test_bad_combinations_raise(device):
    k = _k()
    x = torch.randn(1, 8, 3, 3, device=device)
    w = torch.randn(4, 8, device=device)
    out = torch.empty(1, 4, 3, 3, device=device)
    with pytest.raises(ValueError, match="exclusive"):
        k.ln_conv1x1_fwd(x, w, None, None, None, 1e-6, out, allow_tf32=False, prologue_gelu=True)
    with pytest.raises(ValueError, match="layer_scale"):
        k.ln_conv1x1_fwd(x, w, None, None, None, None, out, allow_tf32=False, layer_scale=torch.ones(5))
    with pytest.raises(ValueError, match="residual"):
        k.ln_conv1x1_fwd(x, w, None, None, None, None, out, allow_tf32=False, residual=torch.ones(1, 4, 3, 4))
    with pytest.raises(ValueError, match="alias"):
        k.ln_conv1x1_fwd(x, w, None, None, None, None, out, allow_tf32=False, residual=out)
    with pytest.raises(ValueError, match="1x1"):
        k.ln_conv1x1_fwd(x, torch.randn(4, 8, 3, 3), None, None, None, None, out, allow_tf32=False)
    dy = torch.randn(1, 4, 3, 3, device=device)
    dx = torch.empty(1, 8, 3, 3, device=device)
    with pytest.raises(ValueError, match="exclusive"):
        k.conv1x1_dgrad(dy, w, dx, allow_tf32=False, gelu_input=x, norm=(x, None, None, 1e-6))
    with pytest.raises(ValueError, match="dtype"):
        k.conv1x1_dgrad(dy, w.half(), dx, allow_tf32=False)
    with pytest.raises(ValueError, match="out must be"):
        k.conv1x1_dgrad(dy, w, torch.empty(1, 8, 3, 4, device=device), allow_tf32=False)
    with pytest.raises(ValueError, match="exclusive"):
        k.conv1x1_wgrad(dy, x, allow_tf32=False, b_gelu=True, b_norm=(torch.zeros(9), torch.ones(9), None, None))
    with pytest.raises(ValueError, match="statistics"):
        k.conv1x1_wgrad(dy, x, allow_tf32=False, b_norm=(torch.zeros(8), torch.ones(8), None, None))
    with pytest.raises(ValueError, match="does not match"):
        k.conv1x1_wgrad(dy, torch.randn(2, 8, 3, 3, device=device), allow_tf32=False)


def test_pruning_keeps_a_config_and_respects_the_image():
    """The autotuners' pruners read M/HW/K/C from the launch arguments;
    pixel tiles never exceed an image, so HW (not M) bounds them."""
    k = _k()
    big = {"M": 10 ** 6, "HW": 56 * 56, "K": 1024, "C": 512}
    small = {"M": 32 * 49, "HW": 49, "K": 40, "C": 24}
    for prune, cfgs, pix in [(k._ln_conv1x1_prune, k._ln_conv1x1_configs(), "BLOCK_M"),
                             (k._dgrad_prune, k._dgrad_configs(), "BLOCK_M"),
                             (k._dgrad_ln_prune, k._dgrad_ln_configs(), "BLOCK_M"),
                             (k._wgrad_prune, k._wgrad_configs(), "BLOCK_P")]:
        assert len(prune(cfgs, big)) == len(cfgs)
        kept = prune(cfgs, small)
        assert kept and all(c.kwargs[pix] <= 64 for c in kept)
    assert k._ln_conv1x1_prune(k._ln_conv1x1_configs(), {"M": 10 ** 6, "K": 1024, "C": 512})  # no HW: as before


def test_empty_problems(device):
    k = _k()
    before = dict(kernels_module("_common").LAUNCHES_BY_KERNEL)
    x = torch.randn(0, 8, 3, 3, device=device)
    w = torch.randn(4, 8, device=device)
    k.ln_conv1x1_fwd(x, w, None, None, None, None, torch.empty(0, 4, 3, 3, device=device), allow_tf32=False)
    assert k.conv1x1_dgrad(torch.randn(0, 4, 3, 3, device=device), w, torch.empty(0, 8, 3, 3, device=device),
                           allow_tf32=False) is None
    mean, rstd, dnw, dnb = k.conv1x1_dgrad(torch.randn(0, 4, 3, 3, device=device), w,
                                           torch.empty(0, 8, 3, 3, device=device), allow_tf32=False,
                                           norm=(x, torch.ones(8, device=device), None, 1e-6))
    assert mean.numel() == 0 and dnw.shape == (8,) and not dnw.any() and dnb is None
    g, rs = k.conv1x1_wgrad(torch.randn(0, 4, 3, 3, device=device), x, allow_tf32=False)
    assert g.shape == (4, 8) and not g.any() and not rs.any()
    assert dict(kernels_module("_common").LAUNCHES_BY_KERNEL) == before


# ----------------------------------------------------------------------------
# sm_90 compilation of every GPU autotune config
# ----------------------------------------------------------------------------

_AOT = r"""
import json, os, re, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
import triton
try:
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
except ImportError as e:
    print(json.dumps({"skip": f"no AOT API: {e}"})); sys.exit(0)
from types import SimpleNamespace
from resfuse._backends import kernels_module
k = SimpleNamespace(**{**vars(kernels_module("conv1x1")), **vars(kernels_module("conv1x1_bwd"))})
CUOBJ = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
F32 = {"mean_ptr", "rstd_ptr", "dlnw_ptr", "dlnb_ptr", "g_ptr", "rs_ptr", "lnu_ptr", "lnv_ptr"}

def compile_(name, fn, flags, cfg, flat=True):
    # As the JIT specializes an fp16 NCHW launch: unit pixel strides constant,
    # other strides and pointers 16-divisible (flat=False: nothing specialized).
    consts = dict(flags, INT64=False, DOT_IN_FP32=False, INPUT_PRECISION="ieee", FLAT=flat, **cfg.kwargs)
    # constexprs not named take their defaults, as the launcher's call does
    # (left out, they would compile as runtime ints with both branches in)
    consts.update({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default
                   and p.name not in consts})
    if flat:
        consts.update({n: 1 for n in fn.arg_names if re.fullmatch(r"s[a-z]+_w|sw_c", n)})
    sig = {n: ("constexpr" if n in consts else "*fp32" if n in F32 else "*fp16" if n.endswith("_ptr") else
               "fp32" if n == "eps" else "i32") for n in fn.arg_names}
    attrs = ({(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
              if n not in consts and (n.endswith("_ptr") or re.fullmatch(r"s[a-z]*_[nchwk]", n))} if flat else None)
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    usage = ""
    if os.path.exists(CUOBJ):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
            f.write(ck.asm["cubin"]); f.flush()
            r = subprocess.run([CUOBJ, "--dump-resource-usage", f.name], capture_output=True, text=True)
            usage = " ".join(re.findall(r"REG:\d+ STACK:\d+", r.stdout))
    return (name, cfg.kwargs, cfg.num_warps, flat, ck.metadata.shared, usage)

out = []
fwd = dict(HAS_BIAS=True, HAS_NORM_W=True, HAS_NORM_B=True, HAS_LS=True, HAS_SS=True, HAS_RES=True)
dg = dict(HAS_CS=True, HAS_SS=True)
for cfg in k._ln_conv1x1_configs():
    out.append(compile_("fwd_gelu", k._ln_conv1x1_kernel, dict(fwd, HAS_NORM=False, PROLOGUE_GELU=True), cfg))
    out.append(compile_("fwd_ln", k._ln_conv1x1_kernel, dict(fwd, HAS_NORM=True, PROLOGUE_GELU=False), cfg))
    out.append(compile_("fwd_ln_folded", k._ln_conv1x1_kernel,
                        dict(fwd, HAS_NORM=True, PROLOGUE_GELU=False, LN_FOLDED=True), cfg))
    out.append(compile_("fwd_ln_folded_gelu", k._ln_conv1x1_kernel,
                        dict(fwd, HAS_NORM=True, PROLOGUE_GELU=False, LN_FOLDED=True, EPILOGUE_GELU=True), cfg))
for cfg in k._dgrad_configs():
    out.append(compile_("dgrad_gelu", k._conv1x1_dgrad_kernel, dict(dg, GELU_EPI=True), cfg))
for cfg in k._dgrad_ln_configs():
    out.append(compile_("dgrad_ln", k._conv1x1_dgrad_ln_kernel,
                        dict(dg, HAS_NORM_W=True, WANT_DW=True, WANT_DB=True), cfg))
wg = dict(HAS_SS=True, HAS_NORM_W=True, HAS_NORM_B=True, WANT_ROWSUM=True)
for cfg in k._wgrad_configs():
    out.append(compile_("wgrad_gelu", k._conv1x1_wgrad_kernel, dict(wg, B_GELU=True, B_NORM=False), cfg))
    out.append(compile_("wgrad_ln", k._conv1x1_wgrad_kernel, dict(wg, B_GELU=False, B_NORM=True), cfg))
# The general (non-flat, unspecialized) path of each kernel, largest tiles.
out.append(compile_("fwd_gelu", k._ln_conv1x1_kernel, dict(fwd, HAS_NORM=False, PROLOGUE_GELU=True),
                    k._ln_conv1x1_configs()[0], flat=False))
out.append(compile_("dgrad_gelu", k._conv1x1_dgrad_kernel, dict(dg, GELU_EPI=True), k._dgrad_configs()[0], flat=False))
out.append(compile_("dgrad_ln", k._conv1x1_dgrad_ln_kernel, dict(dg, HAS_NORM_W=True, WANT_DW=True, WANT_DB=True),
                    k._dgrad_ln_configs()[1], flat=False))
out.append(compile_("wgrad_ln", k._conv1x1_wgrad_kernel, dict(wg, B_GELU=False, B_NORM=True),
                    k._wgrad_configs()[3], flat=False))
print(json.dumps({"compiled": out}))
"""


def test_kernels_compile_for_sm90():
    """Every GPU autotune config of the forward (GELU and LayerNorm
    prologues with every epilogue), the data gradients and the weight
    gradient compiles to sm_90 code within 227 KB of shared memory
    (registers/stack printed where cuobjdump is found): catches what the
    interpreter accepts but the compiler does not."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT, ROOT], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    k = _k()
    n_cfg = 4 * len(k._ln_conv1x1_configs()) + len(k._dgrad_configs()) + len(k._dgrad_ln_configs()) \
        + 2 * len(k._wgrad_configs()) + 4
    assert len(res["compiled"]) == n_cfg
    for name, cfg, warps, flat, shared, usage in res["compiled"]:
        print(name, cfg, f"warps={warps}", "flat" if flat else "general", f"shared={shared}", usage)
        assert 0 < shared <= 227 * 1024, (name, cfg, shared)
        if flat and usage:  # every config as the launcher specializes it: no spills on sm_90 (the
            assert "STACK:0" in usage, (name, cfg, warps, usage)  # general path's 128x64 GELU spills 72 B)
