"""The cuda backend's composition (resfuse/ops/gnconv_cuda.py) checked on the CPU.

The CUDA kernels themselves are checked against their contract
(csrc/gnconv.h) by the CPU emulator (tests/test_csrc_gnconv_*_emulation.py).
What those runs cannot show is that the ops compose the kernels right:
channel slices and offsets of the gate buffer, the order of the stages,
transposed and gamma-scaled weights, which epilogue multiplies what, the
gradients' bookkeeping. Here each kernel is replaced by a float64
implementation of its header formula (rounded to the dtype where the kernel
writes), the ops' cuda composition runs on CPU tensors, and its results
are compared with the ops' eager backend (the reference differentiated by
torch.func) by GUIDE §3's rule. The per-kernel call counts are the ones the
gpu tests (tests/test_csrc_gnconv.py) require on a GPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from resfuse.ops import gnconv_cuda as oc
from resfuse.ops.gnconv import make_chain_problem, make_ln_conv1x1_problem
from resfuse.ops.gnconv_backward import (_chain_bwd_eager, _chain_problem, _gelu_bwd_eager, _gelu_problem,
                                    _proj_bwd_eager, _proj_problem)
from resfuse.ops.horblock_mlp import make_gelu_conv1x1_problem
from resfuse.reference import gelu_conv1x1_reference, gnconv_chain_reference, gnconv_dims, \
    layernorm_conv1x1_reference

from numerics import assert_matches


# ----------------------------------------------------------------------------
# The kernels' contracts (csrc/gnconv.h), in float64
# ----------------------------------------------------------------------------

def _rows(t):
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()


def _write(out, v):
    N, C, H, W = out.shape
    out.copy_(v.reshape(N, H, W, C).permute(0, 3, 1, 2).to(out.dtype))


def _per_row(vec, t):  # row_scale[m / HW]
    return vec.double().repeat_interleave(t.shape[2] * t.shape[3])[:, None]


def _gelu_grad(h):
    return 0.5 * (1 + torch.erf(h / math.sqrt(2))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)


class ContractKernels:
    """torch.ops.resfuse_cuda's gnconv ops as their header formulas."""

    @staticmethod
    def pixel_gemm(a, weight, bias, prologue, norm_weight, norm_bias, eps, mul, mul_gelu_grad, col_scale, row_scale,
                   residual, allow_tf32, out, aux_out, aux_mul):
        A = _rows(a)
        if prologue == 1:
            mean = A.mean(1, keepdim=True)
            A = (A - mean) / torch.sqrt(((A - mean) ** 2).mean(1, keepdim=True) + eps)
            A = A * (1 if norm_weight is None else norm_weight.double()) + (0 if norm_bias is None else norm_bias.double())
        elif prologue == 2:
            A = F.gelu(A)
        if prologue:
            A = A.to(a.dtype).double()  # the prologue's result is rounded before the MMA
        z = A @ weight.reshape(weight.shape[0], -1).double().t()
        if bias is not None:
            z = z + bias.double()
        v = z.clone()
        if mul is not None:
            m = _rows(mul)
            v = v * (_gelu_grad(m) if mul_gelu_grad else m)
        if col_scale is not None:
            v = v * col_scale.double()
        if row_scale is not None:
            v = v * _per_row(row_scale, a)
        if residual is not None:
            v = v + _rows(residual)
        aux = None if aux_out is None else z * (1 if aux_mul is None else _rows(aux_mul))  # read before writes
        _write(out, v)
        if aux_out is not None:
            _write(aux_out, aux)

    @staticmethod
    def pixel_wgrad(dy, b, prologue, mean, rstd, norm_weight, norm_bias, row_scale, allow_tf32, dw, db):
        D, B = _rows(dy), _rows(b)
        if row_scale is not None:
            D = D * _per_row(row_scale, dy)
        if prologue == 1:
            B = (B - mean.double()[:, None]) * rstd.double()[:, None]
            B = B * (1 if norm_weight is None else norm_weight.double()) + (0 if norm_bias is None else norm_bias.double())
        elif prologue == 2:
            B = F.gelu(B)
        if prologue:
            B = B.to(b.dtype).double()
        if row_scale is not None:
            D = D.to(dy.dtype).double()
        dw.copy_(D.t() @ B)
        if db is not None:
            db.copy_(D.sum(0))

    @staticmethod
    def layernorm_rows_backward(x, dy, norm_weight, eps, dx, mean, rstd, dnw, dnb):
        X, G0 = _rows(x), _rows(dy)
        mu = X.mean(1, keepdim=True)
        r = 1 / torch.sqrt(((X - mu) ** 2).mean(1, keepdim=True) + eps)
        xhat = (X - mu) * r
        g = G0 * (1 if norm_weight is None else norm_weight.double())
        _write(dx, r * (g - g.mean(1, keepdim=True) - xhat * (g * xhat).mean(1, keepdim=True)))
        for t, v in ((mean, mu[:, 0]), (rstd, r[:, 0]), (dnw, (G0 * xhat).sum(0)), (dnb, G0.sum(0))):
            if t is not None:
                t.copy_(v)

    @staticmethod
    def dwconv_gate(abc, w_dw, b_dw, gates, pwa, scale, out):
        if gates is not None:
            g = scale * gates.double()
        else:
            k = w_dw.shape[-1]
            g = scale * F.conv2d(abc.double(), w_dw.double(), None if b_dw is None else b_dw.double(),
                                 padding=k // 2, groups=abc.shape[1])
        if pwa is not None:
            g = torch.cat([g[:, :pwa.shape[1]] * pwa.double(), g[:, pwa.shape[1]:]], 1)
        out.copy_(g.to(out.dtype))

    @staticmethod
    def dwconv_gate_backward(dg, abc, w_dw, scale, dabc, dw_dw, db_dw):
        k = w_dw.shape[-1]
        a = abc.double().requires_grad_(True)
        w = w_dw.double().requires_grad_(True)
        b = torch.zeros(abc.shape[1], dtype=torch.float64, requires_grad=True)
        y = scale * F.conv2d(a, w, b, padding=k // 2, groups=abc.shape[1])
        ga, gw, gb = torch.autograd.grad(y, (a, w, b), dg.double())
        for t, v in ((dabc, ga), (dw_dw, gw), (db_dw, gb)):
            if t is not None:
                t.copy_(v.to(t.dtype))


@pytest.fixture
def contract_kernels(monkeypatch):
    monkeypatch.setattr(oc._CountingOps, "kernels", ContractKernels())
    monkeypatch.setenv("RESFUSE_POISON_OUTPUTS", "1")


def _grew(before):
    return {k: v - before.get(k, 0) for k, v in oc.LAUNCHES.items() if v != before.get(k, 0)}


def _t(g, *shape, dtype, scale=1.0, cl=False):
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t


def _f64(v):
    if isinstance(v, (list, tuple)):
        return [None if t is None else t.double() for t in v]
    return None if v is None else v.double()


# ----------------------------------------------------------------------------
# Cases: order 1..5, gates given, residual / layer scale / drop-path scale,
# NCHW and channels_last, fp32 and fp16, odd H/W
# ----------------------------------------------------------------------------

CASES = [
    # dim, order, N, H, W, dtype, cl, gates, res, ss, bias
    (8, 1, 2, 3, 5, torch.float32, False, False, False, False, True),
    (16, 2, 1, 5, 7, torch.float32, True, False, True, True, True),
    (16, 3, 2, 4, 3, torch.float16, False, False, True, False, True),
    (32, 4, 1, 3, 3, torch.float32, True, True, False, True, False),
    (16, 5, 2, 5, 5, torch.float32, False, False, True, True, True),
    (32, 5, 1, 2, 6, torch.float16, True, False, False, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-o{c[1]}-{c[2]}x{c[3]}x{c[4]}-"
                         f"{str(c[5])[6:]}-{'cl' if c[6] else 'nchw'}{'-gates' if c[7] else ''}"
                         f"{'-res' if c[8] else ''}{'-ss' if c[9] else ''}")
def test_chain_forward_and_backward_composition(case, contract_kernels):
    dim, order, N, H, W, dt, cl, given, res, ss, bias = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    dims = gnconv_dims(dim, order)
    d0, S, k = dims[0], sum(dims), 5
    fused = _t(g, N, d0 + S, H, W, dtype=dt, cl=cl)
    w_dw = None if given else _t(g, S, 1, k, k, dtype=dt, scale=0.3)
    b_dw = _t(g, S, dtype=dt) if bias and not given else None
    gates = _t(g, N, S, H, W, dtype=dt, cl=cl) if given else None
    w_pws = [_t(g, b, a, 1, 1, dtype=dt, scale=a ** -0.5) for a, b in zip(dims[:-1], dims[1:])]
    b_pws = [_t(g, b, dtype=dt) if bias else None for b in dims[1:]]
    w_out, b_out = _t(g, dim, dim, 1, 1, dtype=dt, scale=dim ** -0.5), _t(g, dim, dtype=dt) if bias else None
    residual = _t(g, N, dim, H, W, dtype=dt, cl=cl) if res else None
    ls = _t(g, dim, dtype=dt) if res else None
    sample = (torch.rand(N, generator=g, dtype=torch.float64) * 2).to(dt) if ss else None
    s = 1.0 / 3.0
    args = (fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, s, residual, ls, sample)
    name = str(case)

    before = dict(oc.LAUNCHES)
    y = oc.chain_forward(make_chain_problem(*args))
    assert _grew(before) == {"dwconv_gate": 1, "pixel_gemm": order}, _grew(before)
    ref = gnconv_chain_reference(_f64(fused), _f64(w_dw), _f64(b_dw), _f64(gates), _f64(w_pws), _f64(b_pws),
                                 _f64(w_out), _f64(b_out), s, _f64(residual), _f64(ls), _f64(sample))
    eager = gnconv_chain_reference(*args)
    assert_matches(y, ref, eager, dt, name + " forward", 0)
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)

    dout = _t(g, N, dim, H, W, dtype=dt, cl=cl)
    n = order - 1
    needs = [True, not given, bias and not given, given, True, bias, res] + [True] * n + [bias] * n
    p = _chain_problem(dout, fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, s, ls, sample, needs)
    before = dict(oc.LAUNCHES)
    got = oc.chain_backward(p)
    grew = _grew(before)
    want_calls = {"dwconv_gate": 1, "pixel_gemm": 2 * order - 1, "pixel_wgrad": order}
    if not given:
        want_calls["dwconv_gate_backward"] = 1
    assert grew == want_calls, grew
    p64 = _chain_problem(_f64(dout), _f64(fused), _f64(w_dw), _f64(b_dw), _f64(gates), _f64(w_pws), _f64(b_pws),
                         _f64(w_out), _f64(b_out), s, _f64(ls), _f64(sample), needs)
    ref_g, eager_g = _chain_bwd_eager(p64), _chain_bwd_eager(p)
    names = ["d_fused", "d_w_dw", "d_b_dw", "d_gates", "d_w_out", "d_b_out", "d_ls"] + \
        [f"d_w_pws{i}" for i in range(n)] + [f"d_b_pws{i}" for i in range(n)]
    for nm, need, a, r, e in zip(names, needs, got, ref_g, eager_g):
        if need:
            assert a.shape == e.shape and a.dtype == e.dtype, (nm, a.shape, e.shape, a.dtype, e.dtype)
            assert_matches(a, r, e, dt, f"{name} {nm}", 0)
        else:
            assert a.numel() == 0, nm


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dt,cl", [(torch.float32, False), (torch.float16, True)])
def test_projection_forward_and_backward_composition(norm, dt, cl, contract_kernels):
    g = torch.Generator().manual_seed(11 + norm)
    C, K, N, H, W = 12, 20, 2, 3, 5
    x = (_t(g, N, C, H, W, dtype=torch.float64) + 1.5).to(dt)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    w, b = _t(g, K, C, 1, 1, dtype=dt, scale=C ** -0.5), _t(g, K, dtype=dt)
    nw, nb, eps = (_t(g, C, dtype=dt), _t(g, C, dtype=dt), 1e-6) if norm else (None, None, None)
    before = dict(oc.LAUNCHES)
    y = oc.proj_forward(make_ln_conv1x1_problem(x, w, b, nw, nb, eps))
    assert _grew(before) == {"pixel_gemm": 1}
    ref = layernorm_conv1x1_reference(*_f64([x, w, b, nw, nb]), eps)
    assert_matches(y, ref, layernorm_conv1x1_reference(x, w, b, nw, nb, eps), dt, "proj forward", 0)
    dh = _t(g, N, K, H, W, dtype=dt, cl=cl)
    needs = [True, True, True, norm, norm]
    p = _proj_problem(dh, x, w, b, nw, nb, eps, needs)
    before = dict(oc.LAUNCHES)
    got = oc.proj_backward(p)
    assert _grew(before) == ({"pixel_gemm": 1, "layernorm_rows_backward": 1, "pixel_wgrad": 1} if norm
                             else {"pixel_gemm": 1, "pixel_wgrad": 1}), _grew(before)
    ref_g = _proj_bwd_eager(_proj_problem(*_f64([dh, x, w, b, nw, nb]), eps, needs))
    for nm, need, a, r, e in zip(["dx", "dw", "db", "dnw", "dnb"], needs, got, ref_g, _proj_bwd_eager(p)):
        if need:
            assert_matches(a, r, e, dt, f"proj {nm}", 0)
    # the inference split: pwconv1's GELU after the GEMM (one torch op on this backend)
    y = oc.proj_forward(make_ln_conv1x1_problem(x, w, b, nw, nb, eps, True))
    ref = layernorm_conv1x1_reference(*_f64([x, w, b, nw, nb]), eps, True)
    assert_matches(y, ref, layernorm_conv1x1_reference(x, w, b, nw, nb, eps, True), dt, "proj + GELU forward", 0)
    assert y.is_contiguous(memory_format=torch.channels_last) == cl


@pytest.mark.parametrize("ls,ss,res,pg", [(False, False, False, True), (True, True, True, True),
                                         (True, True, True, False)])
def test_gelu_conv1x1_forward_and_backward_composition(ls, ss, res, pg, contract_kernels):
    """pg: the GELU prologue (False: a is taken as is, the inference split)."""
    g = torch.Generator().manual_seed(5 + ls)
    C, K, N, H, W = 24, 7, 3, 3, 4
    dt = torch.float32
    a = _t(g, N, C, H, W, dtype=dt, cl=True)
    w, b = _t(g, K, C, 1, 1, dtype=dt, scale=C ** -0.5), _t(g, K, dtype=dt)
    lsv = _t(g, K, dtype=dt) if ls else None
    ssv = torch.rand(N, generator=g) * 2 if ss else None
    resv = _t(g, N, K, H, W, dtype=dt, cl=True) if res else None
    before = dict(oc.LAUNCHES)
    y = oc.gelu_forward(make_gelu_conv1x1_problem(a, w, b, lsv, ssv, resv, pg))
    assert _grew(before) == {"pixel_gemm": 1}
    ref = gelu_conv1x1_reference(*_f64([a, w, b, lsv, ssv, resv]), pg)
    assert_matches(y, ref, gelu_conv1x1_reference(a, w, b, lsv, ssv, resv, pg), dt, "gelu forward", 0)
    dout = _t(g, N, K, H, W, dtype=dt, cl=True)
    needs = [True, True, True, ls]
    p = _gelu_problem(dout, a, w, b, lsv, ssv, needs, pg)
    before = dict(oc.LAUNCHES)
    got = oc.gelu_backward(p)
    assert _grew(before) == {"pixel_gemm": 1, "pixel_wgrad": 1}
    ref_g = _gelu_bwd_eager(_gelu_problem(*_f64([dout, a, w, b, lsv, ssv]), needs, pg))
    for nm, need, x, r, e in zip(["da", "dw", "db", "dls"], needs, got, ref_g, _gelu_bwd_eager(p)):
        if need:
            assert_matches(x, r, e, dt, f"gelu {nm}", 0)


def test_eval_horblock_on_cuda_keeps_the_gelu_prologue(contract_kernels, monkeypatch):
    """Without autograd a fused HorBlock moves the MLP's GELU into pwconv1's
    epilogue only where that is free (Triton): the cuda backend has no GELU
    epilogue, so it keeps pwconv2's GELU prologue (2 MLP GEMMs, no extra
    GELU pass). The cuda candidates are made runnable on the CPU here, over
    the contract stand-ins."""
    import copy
    from functools import partial
    from resfuse import dispatch
    from resfuse.hornet import HorBlock, PlainGnConv
    from resfuse.nn import FusedHorBlock
    seen = []
    for op in ("layernorm_conv1x1", "gnconv_chain", "gelu_conv1x1"):
        _, run = dispatch._REGISTRY[op]["cuda"]
        if op == "gelu_conv1x1":
            run = (lambda r: lambda p: seen.append(p.prologue_gelu) or r(p))(run)
        monkeypatch.setitem(dispatch._REGISTRY[op], "cuda", (lambda p: [], run))
    torch.manual_seed(2)
    plain = HorBlock(16, gnconv=partial(PlainGnConv, order=2, s=1 / 3)).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    block = FusedHorBlock.from_module(copy.deepcopy(plain), backend="cuda")
    x = torch.randn(2, 16, 4, 5).contiguous(memory_format=torch.channels_last)
    before = dict(oc.LAUNCHES)
    with torch.no_grad():
        y = block(x)
        ref = copy.deepcopy(plain).double()(x.double())
        eager = plain(x)
    assert seen == [True], seen
    assert _grew(before)["pixel_gemm"] == 3 + 2, _grew(before)  # proj_in, pws0, proj_out; pwconv1, pwconv2
    assert_matches(y, ref, eager, torch.float32, "eval HorBlock on cuda", 0)
