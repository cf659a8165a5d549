"""HorNet's gnconv: the ops (``layernorm_conv1x1``, ``gnconv_chain``), their
Triton kernels (kernels/gnconv.py), ``resfuse.nn.GnConv`` /
``FusedHorBlock``, ``convert`` and ``explain`` on HorNet-style models, and
the byte model (``bench.model.gnconv``).

Kernel tests run on the ``device`` fixture (CPU tensors through Triton's
interpreter here, CUDA tensors on a GPU box). Every kernel result is
compared with the float64 reference by the rule of GUIDE §3
(tests/numerics.py), outputs and the chain kernel's scratch start as NaN
(RESFUSE_POISON_OUTPUTS=1), and each kernel test proves what ran: the
launch counters of both kernels grew and the dispatch decisions say triton.
"""

import copy
import math
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resfuse
from resfuse.ops import gnconv as ops_gnconv
from resfuse._backends import kernels_module
from resfuse.nn import FusedHorBlock, GnConv
from resfuse.reference import gnconv_chain_reference, gnconv_dims, gnconv_reference, to_float64

from bench.model.gnconv import HORNET_T_STAGES, gnconv_bytes, hornet_t_table  # bench/: on sys.path (conftest)
from numerics import FLOOR, assert_matches, rel_err
from seed_hornet import GlobalLocalFilter, HorBlock, HorLayerNorm, HorNet, gnconv, randomize

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kern():
    return kernels_module("gnconv")


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


@pytest.fixture
def seed(request):
    s = seed_of(request.node.nodeid)
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


def _t64(v):
    if isinstance(v, (list, tuple)):
        return [None if t is None else t.detach().double() for t in v]
    return v.detach().double() if isinstance(v, torch.Tensor) else v


# ----------------------------------------------------------------------------
# Cases and inputs
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    dim: int
    order: int
    N: int
    H: int
    W: int
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"        # nchw | cl (channels_last) | view (x, residual: strided views of NaN buffers)
    s: float = 1.0 / 3.0
    norm: bool = False          # HorBlock's norm1 fused into the projection
    res: bool = False           # residual + layer_scale (gamma1) in the chain's epilogue
    gates: bool = False         # a gflayer's output given instead of the depthwise conv
    bias: bool = True
    ks: int = 7

    @property
    def name(self):
        parts = [f"d{self.dim}", f"o{self.order}", f"x{self.N}x{self.H}x{self.W}", DTYPE_NAMES[self.dtype],
                 self.layout, f"s{self.s:.3g}"]
        parts += [n for n, on in (("norm", self.norm), ("res", self.res), ("gates", self.gates),
                                  ("nobias", not self.bias)) if on]
        return "-".join(parts) + ("" if self.ks == 7 else f"-k{self.ks}")


def _nan_view(t: torch.Tensor) -> torch.Tensor:
    """`t`'s values in a channel- and column-strided view of a NaN buffer:
    a wrong stride reads NaN."""
    n, c, h, w = t.shape
    big = torch.full((n, c + 3, h + 1, 2 * w), float("nan"), dtype=t.dtype, device=t.device)
    view = big[:, 2:c + 2, 1:, ::2]
    view.copy_(t)
    return view


def make_inputs(case: Case, device, seed: int) -> dict:
    """Fresh random inputs with O(1) activations at every stage."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def signed(n):
        return (torch.rand(n, generator=g) + 0.5) * torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0)

    D, N, H, W = case.dim, case.N, case.H, case.W
    dims = gnconv_dims(D, case.order)
    S = sum(dims)
    b = (lambda n: randn(n, scale=0.5)) if case.bias else (lambda n: None)
    t = dict(
        x=randn(N, D, H, W) + (2.0 if case.norm else 0.0),  # an offset the LayerNorm must remove exactly
        w_in=randn(2 * D, D, 1, 1, scale=D ** -0.5), b_in=b(2 * D),
        w_dw=None if case.gates else randn(S, 1, case.ks, case.ks, scale=1.0 / case.ks),
        b_dw=None if case.gates else b(S),
        gates=randn(N, S, H, W) if case.gates else None,
        w_pws=[randn(dims[i + 1], dims[i], 1, 1, scale=dims[i] ** -0.5) for i in range(case.order - 1)],
        b_pws=[b(dims[i + 1]) for i in range(case.order - 1)],
        w_out=randn(D, D, 1, 1, scale=D ** -0.5), b_out=b(D),
        norm_weight=signed(D) if case.norm else None, norm_bias=randn(D, scale=0.5) if case.norm else None,
        norm_eps=1e-6 if case.norm else None,
        residual=randn(N, D, H, W) if case.res else None, layer_scale=signed(D) if case.res else None,
    )
    out = {}
    for k, v in t.items():
        if isinstance(v, list):
            out[k] = [None if z is None else z.to(device=device, dtype=case.dtype) for z in v]
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device=device, dtype=case.dtype)
        else:
            out[k] = v
    for k in ("x", "residual", "gates"):
        if out[k] is None:
            continue
        if case.layout == "cl":
            out[k] = out[k].contiguous(memory_format=torch.channels_last)
        elif case.layout == "view" and k != "gates":
            out[k] = _nan_view(out[k])
    return out


def chain_args(t, f):
    return (f, t["w_dw"], t["b_dw"], t["gates"], t["w_pws"], t["b_pws"], t["w_out"], t["b_out"])


def reference(t, s, to64=True):
    """HorNet's gnconv (+ norm1, + gamma1/residual), in float64 or in the
    inputs' dtype (eager PyTorch's own result)."""
    c = _t64 if to64 else (lambda v: v)
    f = resfuse.reference.layernorm_conv1x1_reference(c(t["x"]), c(t["w_in"]), c(t["b_in"]), c(t["norm_weight"]),
                                                      c(t["norm_bias"]), t["norm_eps"])
    return gnconv_chain_reference(f, c(t["w_dw"]), c(t["b_dw"]), c(t["gates"]), c(t["w_pws"]), c(t["b_pws"]),
                                  c(t["w_out"]), c(t["b_out"]), s, c(t["residual"]), c(t["layer_scale"]))


def run_fused(t, s, backend="triton", what=""):
    """Both ops; proves (for the triton backend) that each kernel ran once
    and the dispatcher chose triton for each."""
    kern = _kern()
    before = dict(kern.LAUNCHES_BY_KERNEL)
    f = resfuse.layernorm_conv1x1(t["x"], t["w_in"], t["b_in"], norm_weight=t["norm_weight"],
                                  norm_bias=t["norm_bias"], norm_eps=t["norm_eps"], backend=backend)
    d_proj = resfuse.last_decision()
    y = resfuse.gnconv_chain(f, t["w_pws"], t["b_pws"], t["w_out"], t["b_out"], w_dw=t["w_dw"], b_dw=t["b_dw"],
                             gates=t["gates"], scale=s, residual=t["residual"], layer_scale=t["layer_scale"],
                             backend=backend)
    d_chain = resfuse.last_decision()
    if backend == "triton":
        assert kern.LAUNCHES_BY_KERNEL["ln_conv1x1"] == before["ln_conv1x1"] + 1, f"{what}: kernel 1 did not run"
        assert kern.LAUNCHES_BY_KERNEL["gnconv_chain"] == before["gnconv_chain"] + 1, f"{what}: kernel 2 did not run"
        assert (d_proj.op, d_proj.backend, d_chain.op, d_chain.backend) == \
            ("layernorm_conv1x1", "triton", "gnconv_chain", "triton"), f"{what}: {d_proj}, {d_chain}"
    return f, y


# ----------------------------------------------------------------------------
# Op numerics through the kernels: orders 1..5, dims 8..64, odd H/W, N 1..2,
# NCHW / channels_last / strided views, fp32 / fp16 (bf16 too), any s
# ----------------------------------------------------------------------------

MATRIX = [
    Case(8, 1, 1, 5, 7),
    Case(16, 2, 2, 7, 9, layout="cl", s=1.0),                              # 126 px: 4 tiles, 2 programs
    Case(32, 3, 1, 7, 9, torch.float16, norm=True, res=True),
    Case(32, 4, 2, 3, 5, torch.float16, layout="cl", s=0.7),
    Case(64, 5, 1, 5, 5, norm=True, res=True),
    Case(64, 5, 2, 3, 7, torch.float16, layout="cl"),
    Case(16, 5, 1, 9, 3, layout="cl", norm=True),                          # dims [1, 2, 4, 8, 16]
    Case(24, 3, 2, 5, 7, layout="view", res=True),                         # dim 24: dims [6, 12, 24]
    Case(48, 4, 2, 7, 7, torch.float16, layout="view", norm=True),         # 98 px, dims [6, 12, 24, 48]
    Case(8, 2, 2, 1, 1, s=-0.5),                                           # 1x1 maps: only the centre tap
    Case(32, 3, 1, 2, 13, bias=False, ks=5),                               # no biases, 5x5 depthwise
    # bf16: the interpreter truncates fp32 -> bf16 stores (about 2x eager's
    # error here, which rounds to nearest as the GPU does); within the floor.
    Case(16, 3, 1, 5, 5, torch.bfloat16, norm=True),
    Case(32, 3, 2, 5, 7, layout="cl", gates=True, res=True),               # gflayer path
    Case(16, 4, 1, 4, 6, torch.float16, gates=True, norm=True),
]


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.name)
def test_ops_match_reference(case, device):
    s = seed_of(case.name)
    t = make_inputs(case, device, s)
    f, y = run_fused(t, case.s, what=case.name)
    ref, eager = reference(t, case.s), reference(t, case.s, to64=False)
    err, tol = assert_matches(y, ref, eager, case.dtype, case.name, s)
    print(f"{case.name}: rel err {err:.2e}, eager's {rel_err(eager, ref):.2e} (tol {tol:.2e})")
    fmt = torch.channels_last if case.layout == "cl" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and f.is_contiguous(memory_format=fmt), \
        f"{case.name}: outputs must follow the input's memory format"
    ref_f = resfuse.reference.layernorm_conv1x1_reference(_t64(t["x"]), _t64(t["w_in"]), _t64(t["b_in"]),
                                                          _t64(t["norm_weight"]), _t64(t["norm_bias"]), t["norm_eps"])
    eager_f = resfuse.reference.layernorm_conv1x1_reference(t["x"], t["w_in"], t["b_in"], t["norm_weight"],
                                                            t["norm_bias"], t["norm_eps"])
    assert_matches(f, ref_f, eager_f, case.dtype, case.name + " (projection)", s)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="RESFUSE_INTERPRET_BLOCKS sets the interpreter's tiles")
@pytest.mark.parametrize("first_in_regs", [True, False])
@pytest.mark.parametrize("case", [Case(64, 2, 1, 5, 7, torch.float16, layout="cl", norm=True, res=True),
                                  Case(64, 3, 1, 4, 5, torch.bfloat16, layout="cl"),
                                  Case(48, 2, 1, 3, 5)], ids=lambda c: c.name)
def test_chain_first_gemm_in_registers(case, first_in_regs, device, monkeypatch):
    """The GPU's 64x64x32 chain tile: with 2 * D0 <= BLOCK_N, x_0 stays in
    registers as stage 1's GEMM operand against a zero-padded W_0 tile
    loaded once per program (FIRST_IN_REGS); both that and the scratch
    path give the reference's result (D0 = 32, 16, and 24: not a power of
    two)."""
    monkeypatch.setenv("RESFUSE_INTERPRET_BLOCKS", "64,64,32")
    s = seed_of(case.name)
    t = make_inputs(case, device, s)
    f = resfuse.layernorm_conv1x1(t["x"], t["w_in"], t["b_in"], norm_weight=t["norm_weight"],
                                  norm_bias=t["norm_bias"], norm_eps=t["norm_eps"], backend="triton")
    y = torch.full((case.N, case.dim, case.H, case.W), float("nan"), dtype=case.dtype, device=device)
    if case.layout == "cl":
        y = y.contiguous(memory_format=torch.channels_last)
    _kern().gnconv_chain_fwd(*chain_args(t, f), case.s, t["residual"], t["layer_scale"], y, allow_tf32=False,
                             first_in_regs=first_in_regs)
    assert_matches(y, reference(t, case.s), reference(t, case.s, to64=False), case.dtype, case.name, s)


@pytest.mark.parametrize("kernel", ["ln_conv1x1", "gnconv_chain"])
def test_int64_offsets(kernel, device):
    """The 64-bit addressing path (taken when a tensor spans 2**31
    elements) computes the same result."""
    case = Case(16, 3, 2, 5, 7, layout="cl", norm=True, res=True)
    t = make_inputs(case, device, seed_of(case.name + kernel))
    kern = _kern()
    f = torch.empty(case.N, 2 * case.dim, case.H, case.W, dtype=case.dtype, device=device).fill_(float("nan"))
    kernels_module("conv1x1").ln_conv1x1_fwd(t["x"], t["w_in"], t["b_in"], t["norm_weight"], t["norm_bias"], t["norm_eps"], f,
                        allow_tf32=False, force_int64=kernel == "ln_conv1x1")
    y = torch.empty(case.N, case.dim, case.H, case.W, dtype=case.dtype, device=device).fill_(float("nan"))
    kern.gnconv_chain_fwd(*chain_args(t, f), case.s, t["residual"], t["layer_scale"], y, allow_tf32=False,
                          force_int64=kernel == "gnconv_chain")
    assert_matches(y, reference(t, case.s), reference(t, case.s, to64=False), case.dtype, kernel)


def test_nonfinite_propagates_as_eager(device):
    """NaN and Inf in x spread exactly as in eager: the LayerNorm makes the
    pixel NaN, the 7x7 halo carries it to the neighbours."""
    case = Case(16, 3, 1, 9, 11, norm=True, res=True)
    t = make_inputs(case, device, 7)
    t["x"][0, 3, 2, 2] = float("nan")
    t["x"][0, 5, 6, 9] = float("inf")
    _, y = run_fused(t, case.s)
    ref = reference(t, case.s)
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert_matches(y, ref, reference(t, case.s, to64=False), case.dtype, "nonfinite")


def test_outputs_are_poisoned_before_launch(device, monkeypatch):
    """An output element the kernel does not write must read NaN."""
    case = Case(8, 2, 1, 3, 5)
    t = make_inputs(case, device, 1)
    kern = _kern()
    monkeypatch.setattr(kern, "gnconv_chain_fwd", lambda *a, **k: a[11])  # a[11]: `out`, unwritten
    _, y = run_fused(t, case.s, backend="eager")  # the eager path is untouched
    assert not torch.isnan(y).any()
    f = resfuse.layernorm_conv1x1(t["x"], t["w_in"], t["b_in"], backend="triton")
    y = resfuse.gnconv_chain(f, t["w_pws"], t["b_pws"], t["w_out"], t["b_out"], w_dw=t["w_dw"], b_dw=t["b_dw"],
                             scale=case.s, backend="triton")
    assert torch.isnan(y).all()


def test_eager_backend_is_the_reference():
    case = Case(16, 3, 2, 5, 7, norm=True, res=True)
    t = make_inputs(case, "cpu", 3)
    before = _kern().LAUNCHES
    _, y = run_fused(t, case.s, backend="eager")
    assert _kern().LAUNCHES == before
    torch.testing.assert_close(y, reference(t, case.s, to64=False), rtol=0, atol=0)
    composite = resfuse.gnconv(t["x"], t["w_in"], t["b_in"], t["w_dw"], t["b_dw"], t["w_pws"], t["b_pws"],
                               t["w_out"], t["b_out"], case.s, norm_weight=t["norm_weight"],
                               norm_bias=t["norm_bias"], norm_eps=t["norm_eps"], residual=t["residual"],
                               layer_scale=t["layer_scale"], backend="eager")
    torch.testing.assert_close(composite, y, rtol=0, atol=0)


def test_autotune_pruning_reads_keyword_constexprs():
    """The autotuner hands constexprs to the pruner as keywords: D0/ORDER
    must be read from there (a GPU-only path, checked here directly)."""
    k = _kern()
    small = k._chain_fwd_prune(k._chain_configs(), {"M": 40}, D0=32, ORDER=5, KS=7)
    assert small and all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] == 64 for c in small)
    big = k._chain_fwd_prune(k._chain_configs(), {"M": 10 ** 7}, D0=1, ORDER=2, KS=7)
    assert big and all(c.kwargs["BLOCK_N"] <= 32 for c in big)
    wide = k._chain_fwd_prune(k._chain_configs(), {"M": 10 ** 7}, D0=32, ORDER=2, KS=7)
    assert [c.kwargs["BLOCK_M"] for c in wide][:1] == [64] and all(c.kwargs["BLOCK_N"] == 64 for c in wide)
    k1 = kernels_module("conv1x1")
    assert k1._ln_conv1x1_prune(k1._ln_conv1x1_configs(), {"M": 10 ** 6, "K": 1024, "C": 512})


# ----------------------------------------------------------------------------
# Dispatch, validation, autograd, torch.library
# ----------------------------------------------------------------------------

def test_dispatch_candidates_and_reasons(device, monkeypatch):
    monkeypatch.delenv("RESFUSE_BACKEND", raising=False)
    case = Case(8, 2, 1, 3, 3)
    t = make_inputs(case, device, 2)
    run_fused(t, case.s, backend="auto")  # asserts nothing: auto on this device...
    d = resfuse.last_decision()
    if device.type == "cpu":  # no extension built, or (built) it needs CUDA tensors
        assert d.backend == "triton" and d.skipped.get("cuda"), d
        assert any("resfuse._C" in r or "CUDA tensors" in r for r in d.skipped["cuda"]), d.skipped
    else:  # cuda first when resfuse._C is built, else triton with the reason
        assert d.backend == "cuda" or (d.backend == "triton" and d.skipped.get("cuda")), d
    # float64: the Triton kernels refuse it, auto falls back to eager and says why
    t64 = make_inputs(Case(8, 2, 1, 3, 3, torch.float64), device, 2)
    before = _kern().LAUNCHES
    run_fused(t64, case.s, backend="auto")
    d = resfuse.last_decision()
    assert d.backend == "eager" and any("float64" in r for r in d.skipped["triton"]) and _kern().LAUNCHES == before
    with pytest.raises(resfuse.BackendUnavailable, match="float64"):
        run_fused(t64, case.s, backend="triton")
    if device.type == "cpu":
        with pytest.raises(resfuse.BackendUnavailable, match="resfuse._C|CUDA tensors"):
            run_fused(t, case.s, backend="cuda")


def test_order_above_five_falls_back_with_reason(device):
    case = Case(64, 6, 1, 3, 3)
    t = make_inputs(case, device, 4)
    f = resfuse.layernorm_conv1x1(t["x"], t["w_in"], t["b_in"])
    y = resfuse.gnconv_chain(f, t["w_pws"], t["b_pws"], t["w_out"], t["b_out"], w_dw=t["w_dw"], b_dw=t["b_dw"],
                             scale=case.s)
    d = resfuse.last_decision()
    assert d.backend == "eager" and any("order 6 > 5" in r for r in d.skipped["triton"]), d
    assert_matches(y, reference(t, case.s), reference(t, case.s, to64=False), case.dtype, "order 6")
    with pytest.raises(resfuse.BackendUnavailable, match="order 6"):
        resfuse.gnconv_chain(f, t["w_pws"], t["b_pws"], t["w_out"], w_dw=t["w_dw"], scale=1.0, backend="triton")


def _bad(t, **change):
    t = dict(t, **change)
    return lambda: run_fused(t, 1.0, backend="eager")


@pytest.mark.parametrize("change,exc,text", [
    (dict(w_out=torch.randn(14, 14, 1, 1)), ValueError, "2\\^\\(order-1\\)"),
    (dict(w_pws=[torch.randn(8, 4, 3, 3), torch.randn(16, 8, 1, 1)]), ValueError, "w_pws\\[0\\]"),
    (dict(b_pws=[None]), ValueError, "b_pws has 1 entries"),
    (dict(gates=torch.randn(2, 28, 5, 7)), ValueError, "exactly one of w_dw"),
    (dict(w_dw=torch.randn(28, 1, 6, 6)), ValueError, "k odd"),
    (dict(w_in=torch.randn(30, 16, 1, 1), b_in=torch.randn(30)), ValueError, "2\\*dim = 32 channels"),
    (dict(residual=torch.randn(2, 16, 5, 6)), ValueError, "residual must have shape"),
    (dict(layer_scale=torch.randn(16).double()), TypeError, "layer_scale has dtype"),
    (dict(norm_weight=torch.randn(16), norm_eps=None), ValueError, "without norm_eps"),
    (dict(x=torch.randn(2, 16, 5)), ValueError, "4-D"),
])
def test_bad_input_clear_error(change, exc, text):
    t = make_inputs(Case(16, 3, 2, 5, 7), "cpu", 5)
    if "gates" in change:
        change = dict(change, b_dw=None)
    with pytest.raises(exc, match=text):
        _bad(t, **change)()


def _gradcheck_inputs(norm, res, gates, seed):
    case = Case(4, 2, 1, 3, 4, torch.float64, norm=norm, res=res, gates=gates, ks=3)
    t = make_inputs(case, "cpu", seed)
    for k, v in t.items():
        if isinstance(v, torch.Tensor):
            v.requires_grad_(True)
        elif isinstance(v, list):
            for z in v:
                if z is not None:
                    z.requires_grad_(True)
    return case, t


@pytest.mark.parametrize("norm,res,gates", [(False, False, False), (True, True, False), (False, True, True)])
def test_gradcheck_float64(norm, res, gates):
    """The explicit backward (eager recompute) is wired to the right
    arguments, list arguments included."""
    case, t = _gradcheck_inputs(norm, res, gates, 11)

    def fn(x, w_in, b_in, nw, nb, w_pw, b_pw, w_out, b_out, w_dw, b_dw, g, r, ls):
        f = torch.ops.resfuse.layernorm_conv1x1(x, w_in, b_in, nw, nb, t["norm_eps"], "eager")
        return torch.ops.resfuse.gnconv_chain(f, w_dw, b_dw, g, [w_pw], [b_pw], w_out, b_out, case.s, r, ls, None,
                                              "eager")

    args = (t["x"], t["w_in"], t["b_in"], t["norm_weight"], t["norm_bias"], t["w_pws"][0], t["b_pws"][0],
            t["w_out"], t["b_out"], t["w_dw"], t["b_dw"], t["gates"], t["residual"], t["layer_scale"])
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_opcheck(backend, device):
    """torch.library.opcheck: schema, fake kernels, autograd registration,
    AOT dispatch."""
    if backend == "eager" and device.type == "cuda":
        pytest.skip("eager is checked on cpu")
    case = Case(8, 2, 1, 3, 3, norm=True, res=True)
    t = make_inputs(case, device, 8)
    torch.library.opcheck(torch.ops.resfuse.layernorm_conv1x1.default,
                          (t["x"], t["w_in"], t["b_in"], t["norm_weight"], t["norm_bias"], 1e-6, backend))
    if backend == "eager":  # on triton its backward is refused by name (tests/test_gnconv_train.py)
        torch.library.opcheck(torch.ops.resfuse.layernorm_conv1x1.default,
                              (t["x"], t["w_in"], t["b_in"], t["norm_weight"], t["norm_bias"], 1e-6, backend, True))
    f = resfuse.layernorm_conv1x1(t["x"], t["w_in"], t["b_in"], backend=backend).detach()
    torch.library.opcheck(torch.ops.resfuse.gnconv_chain.default,
                          (*chain_args(t, f), case.s, t["residual"], t["layer_scale"], None, backend))


# ----------------------------------------------------------------------------
# The module: HorNet's names, from_module, train/eval, hooks, gflayer, compile
# ----------------------------------------------------------------------------

def _module_pair(dim, order, s, seed, gflayer=None, device="cpu"):
    plain = randomize(gnconv(dim, order=order, s=s, gflayer=gflayer, h=5, w=4), seed).to(device)
    return plain, GnConv.from_module(copy.deepcopy(plain), backend="triton")


def test_state_dict_round_trip_with_hornet_names(seed):
    plain = randomize(gnconv(32, order=4, s=1.0 / 3.0), seed)
    fused = GnConv(32, order=4, s=1.0 / 3.0)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert list(fused.state_dict()) == ["proj_in.weight", "proj_in.bias", "dwconv.weight", "dwconv.bias",
                                        "proj_out.weight", "proj_out.bias"] + \
        [f"pws.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    fused.load_state_dict(plain.state_dict())  # a HorNet checkpoint loads as it is
    back = gnconv(32, order=4, s=1.0 / 3.0)
    back.load_state_dict(fused.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert (fused.order, fused.dims, fused.scale) == (plain.order, plain.dims, plain.scale)


def test_module_forward_train_eval_and_gradients(seed, device):
    """The fused forward (two kernels) in train and eval, and gradients that
    are eager PyTorch's own (backward recomputes the reference)."""
    plain, fused = _module_pair(16, 3, 1.0 / 3.0, seed, device=device)
    x = torch.randn(2, 16, 5, 7, device=device)
    before = dict(_kern().LAUNCHES_BY_KERNEL)
    with torch.no_grad():
        fused.eval()
        y_eval = fused(x)
    ref = plain.double()(x.double())
    plain.float()
    assert_matches(y_eval, ref, plain(x), torch.float32, "eval", seed)
    assert _kern().LAUNCHES_BY_KERNEL["gnconv_chain"] == before["gnconv_chain"] + 1
    assert {k: d.backend for k, d in fused.last_decisions.items()} == {"proj_in": "triton", "chain": "triton"}

    fused.train()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_f, y_p = fused(xa), plain(xb)
    assert_matches(y_f, ref, y_p, torch.float32, "train forward", seed)
    r = torch.randn_like(y_p)
    (y_f * r).sum().backward()
    (y_p * r).sum().backward()
    grads = [("x", xa.grad, xb.grad)] + [(n, p.grad, q.grad) for (n, p), q in
                                         zip(fused.named_parameters(), plain.parameters())]
    for n, gf, gp in grads:
        assert gf is not None and gp is not None, n
        assert rel_err(gf, gp) <= 1e-6, f"grad {n}: {rel_err(gf, gp):.2e} from eager's (seed {seed})"


def test_from_module_shares_parameters_and_rejects_others(seed):
    plain, fused = _module_pair(16, 2, 1.0, seed)
    fused2 = GnConv.from_module(plain)
    assert fused2.proj_in is plain.proj_in and fused2.pws[0].weight is plain.pws[0].weight
    with pytest.raises(ValueError, match="not a gnconv: .*children proj_in"):
        GnConv.from_module(nn.Conv2d(3, 3, 1))
    bad = copy.deepcopy(plain)
    bad.pws[0] = nn.Conv2d(8, 16, 3, padding=1)
    with pytest.raises(ValueError, match="pws.0 is not a plain 1x1 conv"):
        GnConv.from_module(bad)
    with pytest.raises(ValueError, match="backend"):
        fused.backend = "fastest"


def test_hooks_run_the_original_forward(seed):
    plain, fused = _module_pair(16, 2, 1.0, seed)
    seen = []
    fused.pws[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    before = _kern().LAUNCHES
    x = torch.randn(1, 16, 3, 5)
    with torch.no_grad():
        y = fused(x)
    assert seen == [(1, 16, 3, 5)] and _kern().LAUNCHES == before
    assert "pws.0: its Conv2d has forward hooks" in fused.unfused_reason()
    torch.testing.assert_close(y, plain(x))


def test_no_eager_convolution_in_triton_mode(seed, device):
    """In Triton mode the forward of GnConv and FusedHorBlock calls no eager
    convolution (aten.convolution is refused by a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoConvolution(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.conv2d,
                                       torch.ops.aten._convolution, torch.ops.aten.linear):
                raise AssertionError(f"an eager {func} ran in Triton mode")
            return func(*args, **(kwargs or {}))

    block = randomize(HorBlock(16, gnconv=partial(gnconv, order=3, s=1.0 / 3.0)), seed).to(device).eval()
    fused = FusedHorBlock.from_module(copy.deepcopy(block), backend="triton")
    x = torch.randn(2, 16, 5, 7, device=device)
    with torch.no_grad():
        ref, eager = block.double()(x.double()), block.float()(x)
    before = dict(_kern().LAUNCHES_BY_KERNEL)
    with torch.no_grad(), NoConvolution():
        y = fused(x)
        y2 = fused.gnconv(x)
    # ln_conv1x1: norm1 + proj_in, norm2 + pwconv1, gelu + pwconv2; then the gnconv alone
    assert _kern().LAUNCHES_BY_KERNEL["ln_conv1x1"] == before["ln_conv1x1"] + 4
    assert _kern().LAUNCHES_BY_KERNEL["gnconv_chain"] == before["gnconv_chain"] + 2
    assert_matches(y, ref, eager, torch.float32, "FusedHorBlock", seed)
    assert y2.shape == x.shape and fused.unfused_reason() is None


def test_gflayer_filter_runs_eager_between_the_kernels(seed, device):
    gf = partial(GlobalLocalFilter)
    plain, fused = _module_pair(16, 3, 1.0 / 3.0, seed, gflayer=gf, device=device)
    plain.eval(), fused.eval()
    x = torch.randn(2, 16, 5, 7, device=device)
    before = dict(_kern().LAUNCHES_BY_KERNEL)
    with torch.no_grad():
        y = fused(x)
        ref, eager = plain.double()(x.double()), plain.float()(x)
    assert _kern().LAUNCHES_BY_KERNEL["gnconv_chain"] == before["gnconv_chain"] + 1
    assert_matches(y, ref, eager, torch.float32, "gflayer", seed)
    rows = {r.name: r for r in resfuse.explain(fused)}
    assert rows["dwconv.dw"].kind == "conv" and "gflayer filter" in rows["dwconv.dw"].reason
    assert rows["proj_in"].kind.startswith("conv1x1") and "dwconv" not in rows


def test_autocast_keeps_eager_dtypes(seed, device):
    """Under autocast the kernels run in the autocast dtype and the
    HorBlock's residual stream keeps x's dtype, as in eager."""
    block = randomize(HorBlock(16, gnconv=partial(gnconv, order=3, s=1.0 / 3.0)), seed).to(device).eval()
    fused = FusedHorBlock.from_module(copy.deepcopy(block), backend="triton")
    x = torch.randn(1, 16, 5, 3, device=device)
    with torch.no_grad():
        ref = block.double()(x.double())
        block.float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            eager, out, inner = block(x), fused(x), fused.gnconv(x)
    assert out.dtype == eager.dtype == torch.float32 and inner.dtype == torch.bfloat16
    assert fused.gnconv.last_decisions["chain"].backend == "triton"
    assert_matches(out, ref, eager, torch.bfloat16, "autocast", seed)


def test_torch_compile_fullgraph(seed, device):
    block = randomize(HorBlock(8, gnconv=partial(gnconv, order=2, s=1.0 / 3.0)), seed).to(device).eval()
    fused = resfuse.convert(block, backend="triton")
    assert isinstance(fused, FusedHorBlock)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 8, 3, 5, device=device)
    before = _kern().LAUNCHES
    with torch.no_grad():
        y = compiled(x)
        ref, eager = block.double()(x.double()), block.float()(x)
    assert _kern().LAUNCHES >= before + 2
    assert_matches(y, ref, eager, torch.float32, "compiled", seed)


# ----------------------------------------------------------------------------
# convert / explain on HorNet-style models
# ----------------------------------------------------------------------------

class RecursiveGatedConv(nn.Module):
    """A gnconv under another name, written differently: recognised by structure."""

    def __init__(self, dim, order):
        super().__init__()
        self.dims = gnconv_dims(dim, order)
        self.order = order
        self.scale = 0.25
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        self.dwconv = nn.Conv2d(sum(self.dims), sum(self.dims), 7, padding=3, groups=sum(self.dims))
        self.pws = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(self.dims[:-1], self.dims[1:]))
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        first, rest = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.scale * self.dwconv(rest), self.dims, dim=1)
        out = gates[0] * first
        for i, pw in enumerate(self.pws):
            out = gates[i + 1] * pw(out)
        return self.proj_out(out)


class FunctionalGnConv(RecursiveGatedConv):
    """gnconv's children, but a forward that never calls them (it computes
    the same function from their weights): not provably HorNet's, left alone."""

    def forward(self, x):
        return gnconv_reference(x, self.proj_in.weight, self.proj_in.bias, self.dwconv.weight, self.dwconv.bias,
                                [p.weight for p in self.pws], [p.bias for p in self.pws], self.proj_out.weight,
                                self.proj_out.bias, self.scale)


class UnscaledGnConv(RecursiveGatedConv):
    """gnconv's children, a forward that drops the scale: left alone."""

    def forward(self, x):
        first, rest = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        gates = torch.split(self.dwconv(rest), self.dims, dim=1)
        out = gates[0] * first
        for i, pw in enumerate(self.pws):
            out = gates[i + 1] * pw(out)
        return self.proj_out(out)


def test_convert_fuses_every_gnconv_of_a_hornet(seed, device):
    model = randomize(HorNet(0, 3, [1, 2, 1, 1], 8), seed).to(device).eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    conv = resfuse.convert(model, backend="triton")
    gns = [m for m in conv.modules() if isinstance(m, GnConv)]
    blocks = [m for m in conv.modules() if isinstance(m, FusedHorBlock)]
    assert len(gns) == 5 and len(blocks) == 5 and [g.order for g in gns] == [2, 3, 3, 4, 5]
    assert not any(type(m) is gnconv or type(m) is HorBlock for m in conv.modules())
    sd = conv.state_dict()
    assert list(sd) == list(keys) and all(torch.equal(sd[k], v) for k, v in keys.items())
    rows = resfuse.explain(conv)
    fused_rows = [r for r in rows if r.name.startswith("stages.")]
    # gnconv: proj_in, dwconv, pws, proj_out; the HorBlock's MLP: pwconv1, pwconv2
    assert len(fused_rows) == sum(2 + g.order for g in gns) + 2 * len(blocks)
    assert all(r.kind != "conv" for r in fused_rows)
    assert all(r.backend == "triton" for r in fused_rows)
    # every stage, through the kernels
    x = torch.randn(1, 3, 48, 56, device=device)  # stages at 12x14, 6x7, 3x3, 1x1
    for index in range(4):
        model.index = conv.index = index
        with torch.no_grad():
            ref, eager, out = model.double()(x.double()), model.float()(x), conv(x)
            x = eager
        assert_matches(out, ref, eager, torch.float32, f"stage {index}", seed)
    observed = resfuse.explain(conv, torch.randn(1, 32, 4, 6, device=device))  # conv.index == 3
    rows = {r.name: r for r in observed}
    assert rows["stages.3.0.gnconv.pws.3"].observed and rows["stages.3.0.gnconv.pws.3"].backend == "triton"
    assert rows["stages.3.0.gnconv.proj_in"].kind == "norm1+conv1x1 [gnconv op 1/2]"
    assert rows["stages.3.0.gnconv.proj_out"].kind == "conv1x1+gamma1+residual [gnconv op 2/2]"
    assert rows["stages.3.0.gnconv.dwconv"].kind == "dw7x7+bias+scale+gate [gnconv op 2/2]"
    assert rows["stages.3.0.pwconv1"].kind == "norm2+linear [mlp op 1/2]" and rows["stages.3.0.pwconv1"].observed
    assert rows["stages.3.0.pwconv2"].backend == "triton" and rows["stages.3.0.pwconv2"].observed
    # the stem (conv 4x4/4 -> LayerNorm) runs as one patchify_conv kernel (tests/test_patchify.py)
    assert rows["downsample_layers.0.0"].kind == "conv4x4/4+ln (patchify)"


def test_convert_recognises_structure_not_names(seed):
    model = nn.Sequential(nn.Conv2d(3, 16, 1), RecursiveGatedConv(16, 3))
    before = resfuse.explain(model)
    assert {r.name: r.reason for r in before}["1.proj_in"].startswith("HorNet gnconv: fusable")
    conv = resfuse.convert(model, backend="triton")
    assert isinstance(conv[1], GnConv) and conv[1]._source_cls is RecursiveGatedConv
    x = torch.randn(1, 3, 5, 3)
    with torch.no_grad():
        assert_matches(conv(x), model.double()(x.double()), model.float()(x), torch.float32, "look-alike", seed)
    for cls, why in ((FunctionalGnConv, "does not trace with torch.fx"),
                     (UnscaledGnConv, "does not compute what HorNet's gnconv.forward computes")):
        other = nn.Sequential(nn.Conv2d(3, 16, 1), cls(16, 3))
        kept = resfuse.convert(other, backend="triton")
        assert type(kept[1]) is cls, f"{cls.__name__} was replaced"
        reason = {r.name: r.reason for r in resfuse.explain(kept)}["1.proj_in"]
        assert reason.startswith(f"gnconv not fused: {cls.__name__}.forward: ") and why in reason, reason
    lone = resfuse.convert(gnconv(8, order=2))
    assert isinstance(lone, GnConv)
    odd = gnconv(8, order=2)
    odd.dwconv = nn.Conv2d(12, 12, 7, padding=2, groups=12)
    assert not isinstance(resfuse.convert(nn.Sequential(odd))[0], GnConv)
    reasons = {r.name: r.reason for r in resfuse.explain(nn.Sequential(odd))}
    assert reasons["0.dwconv"].startswith("gnconv not fused: dwconv is not a depthwise kxk conv")


def test_explain_shows_hooked_gnconv_as_eager(seed):
    conv = resfuse.convert(nn.Sequential(gnconv(8, order=2)))
    conv[0].proj_out.register_forward_pre_hook(lambda m, i: None)
    rows = {r.name: r for r in resfuse.explain(conv)}
    assert rows["0.proj_out"].kind == "conv" and "forward_pre hooks" in rows["0.proj_out"].reason
    assert len(rows) == 4


# ----------------------------------------------------------------------------
# The byte model
# ----------------------------------------------------------------------------

def test_byte_model_by_hand():
    # dim 8, order 2: dims [4, 8], S 12; 1 image of 1x1; fp32; 3x3 depthwise
    t = gnconv_bytes(8, 2, 1, 1, 1, "float32", ksize=3)
    weights = (2 * 64 + 16) + (12 * 9 + 12) + (4 * 8 + 8) + (64 + 8)
    assert t.weight_bytes == 4 * weights
    eager_px = 24 + 24 + 24 + 12 + (4 + 8 + 24) + 16
    assert t.eager_bytes == 4 * (eager_px + weights)
    assert t.fused_bytes == 4 * (6 * 8 + weights) and t.minimal_bytes == 4 * (16 + weights)
    assert t.stepwise_bytes == 4 * (24 + (16 + 12) + (4 + 16) + 16 + weights)
    assert t.flops == 2 * (128 + 12 * 9 + 32 + 64)
    assert (t.eager_launches, t.fused_launches, t.stepwise_launches) == (7, 2, 4)
    n = gnconv_bytes(8, 2, 1, 1, 1, "float32", ksize=3, norm=True, residual=True)
    assert n.eager_bytes - t.eager_bytes == 4 * (14 * 8 + 9 + 5 * 8 + 2 * 8 + 8)
    assert n.fused_bytes - t.fused_bytes == 4 * (8 + 2 * 8 + 8)
    assert n.eager_launches == 7 + 12


def test_byte_model_hornet_t_numbers():
    """The numbers the kernel docstring quotes (batch 32, fp16)."""
    table = hornet_t_table(32, "float16")
    assert [(d, o, h) for d, o, h, _ in table] == list(HORNET_T_STAGES)
    mb = [(round(t.eager_bytes / 1e6, 1), round(t.fused_bytes / 1e6, 1)) for *_, t in table]
    assert mb == [(218.4, 77.1), (125.4, 38.7), (67.2, 19.8), (36.3, 11.7)]
    for *_, t in table:
        assert t.minimal_bytes < t.fused_bytes < t.stepwise_bytes < t.eager_bytes
    with pytest.raises(ValueError):
        gnconv_bytes(14, 3, 7, 7, 1)


# ----------------------------------------------------------------------------
# The kernels lower for sm_90 (no GPU needed)
# ----------------------------------------------------------------------------

_AOT = r"""
import os, sys, json
sys.path.insert(0, sys.argv[1])
import triton
try:
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
except ImportError as e:
    print(json.dumps({"skip": f"no AOT API: {e}"})); sys.exit(0)
from resfuse._backends import kernels_module
k = kernels_module("gnconv")
k1 = kernels_module("conv1x1")
out = []

def compile_(fn, consts, warps, stages, scalar_f32):
    # constexprs not named take their defaults (as the launcher's call does)
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    sig = {n: ("constexpr" if n in consts else "*fp32" if n in ("lnu_ptr", "lnv_ptr") else
               "*fp16" if n.endswith("_ptr") else
               "fp32" if n == scalar_f32 else "i32") for n in fn.arg_names}
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "num_stages": stages})
    return ck.metadata.shared

for cfg in k._chain_configs():
    consts = dict(D0=32, ORDER=5, KS=7, GATES_GIVEN=False, HAS_B_DW=True, PWS_BIAS=15, HAS_B_OUT=True,
                  HAS_LS=True, HAS_RES=True, INT64=False, DOT_IN_FP32=False, INPUT_PRECISION="ieee", **cfg.kwargs)
    out.append(("chain", cfg.kwargs, compile_(k._gnconv_chain_kernel, consts, cfg.num_warps, cfg.num_stages, "scale")))
for cfg in k1._ln_conv1x1_configs()[:2]:
    consts = dict(HAS_BIAS=True, HAS_NORM=True, HAS_NORM_W=True, HAS_NORM_B=True, INT64=False, DOT_IN_FP32=False,
                  INPUT_PRECISION="ieee", PROLOGUE_GELU=False, HAS_LS=False, HAS_SS=False, HAS_RES=False, FLAT=True,
                  LN_FOLDED=True, **cfg.kwargs)  # fp16 pointers: the launcher folds the LN
    out.append(("ln", cfg.kwargs, compile_(k1._ln_conv1x1_kernel, consts, cfg.num_warps, cfg.num_stages, "eps")))
print(json.dumps({"compiled": out}))
"""


def test_kernels_compile_for_sm90():
    """Every GPU autotune config of the chain kernel (order 5, D = 512) and
    the LayerNorm projection compiles to sm_90 code within shared memory:
    catches what the interpreter accepts but the compiler does not."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT, ROOT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert len(res["compiled"]) == len(_kern()._chain_configs()) + 2
    for name, cfg, shared in res["compiled"]:
        assert 0 < shared <= 227 * 1024, (name, cfg, shared)


def test_floors_are_the_guide_values():
    assert FLOOR[torch.float32] == 1e-5 and FLOOR[torch.float16] == 2e-3 and math.isclose(FLOOR[torch.bfloat16], 1.6e-2)
