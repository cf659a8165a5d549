"""The ``cuda`` backend of the gnconv / HorBlock ops: resfuse._C's kernels
(csrc/gnconv.h, bound in csrc/bindings_gnconv.cpp) composed per op.

Every activation is handled as channels_last pixel rows; a channel slice of
one (f's ``pwa`` / ``abc`` halves, one stage of the gate buffer) is passed
as is, the kernels address it through its row stride. NCHW inputs are
copied to channels_last once, and outputs follow the input's memory format
(``ops.output_memory_format``), as for the other backends.

Forward (o = order, dims/S/d0 as in kernels/gnconv.py)::

    layernorm_conv1x1  pixel_gemm(x, W_in, LayerNorm prologue)                      1 launch
    gnconv_chain       dwconv_gate: buf = [pwa*g_0 | g_1 | ... | g_{o-1}]           1
                       pixel_gemm per pws: buf_i = (W buf_{i-1} + b) * buf_i, in place   o - 1
                       pixel_gemm proj_out: residual + ss * ls * (W buf_{o-1} + b)   1
    gelu_conv1x1       pixel_gemm(a, W, GELU prologue, ls/ss/residual epilogue)      1

Backward: the gates are recomputed (dwconv_gate, raw), the stages replayed
with both x_i and z_i written (the weight gradients need x_i, the gate
gradients z_i), then one data-gradient GEMM per stage whose epilogue gives
dz = acc * g and dg = acc * z (dpwa and dg_0 for stage 0),
dwconv_gate_backward for d(abc), d(w_dw), d(b_dw), and pixel_wgrad per
weight. Where the kernels lack a fusion it is one torch op, stated here:
x_0 = pwa * g_0 in the backward's replay, dout * sample_scale before the
first data gradient (drop path in training), scale * dg for given gates,
and the layer scale folded into a (D x D) weight copy; in the forward,
``layernorm_conv1x1(epilogue_gelu=True)``'s GELU after its GEMM.
"""

import os
from collections import Counter
from typing import List

import torch

from .._backends import conv_allows_tf32, cuda_reasons
from ..reference import gnconv_dims
from .common import output_memory_format
from .gnconv_grads import _chain_likes, _chain_needs, _finish, _gelu_likes, _proj_likes, _scale_grads

_NONE, _LAYERNORM, _GELU = 0, 1, 2

#: resfuse._C kernel calls made by this backend, by op name (tests prove with
#: it that the CUDA kernels, not a fallback, computed a result).
LAUNCHES: Counter = Counter()


#: Limits of the kernels (csrc/gnconv_dw.cu kMaxK, csrc/gnconv_wgrad.cu kMaxC).
MAX_KSIZE = 1023
MAX_LN_BACKWARD_CHANNELS = 4096


def _shape_reasons(op: str, p) -> List[str]:
    """Problems the kernels refuse (beyond device and dtype); `p` may be a
    signature without tensors (``explain``)."""
    out = []
    args = getattr(p, "args", None)
    w_dw = getattr(p, "w_dw", None) if args is None else args.get("w_dw")
    if w_dw is not None and w_dw.shape[-1] > MAX_KSIZE:
        out.append(f"depthwise kernel size {w_dw.shape[-1]} > {MAX_KSIZE}")
    if op == "layernorm_conv1x1_backward" and args["norm_eps"] is not None and \
            args["x"].shape[1] > MAX_LN_BACKWARD_CHANNELS and \
            (args["norm_weight"] is not None or args["norm_bias"] is not None):
        out.append(f"LayerNorm backward over {args['x'].shape[1]} > {MAX_LN_BACKWARD_CHANNELS} channels "
                   "(its weight/bias gradient partials live in shared memory)")
    return out


def check(op: str):
    """The cuda candidate's "can I run this?" for `op` (forward or backward)."""
    def reasons(p) -> List[str]:
        return cuda_reasons(op, p.device, p.dtype) + _shape_reasons(op, p)
    return reasons


class _CountingOps:
    """torch.ops.resfuse_cuda (or ``kernels``: a stand-in with the same
    signatures, tests/test_gnconv_cuda_composition.py), counting each call
    in LAUNCHES."""
    kernels = None

    def __getattr__(self, name):
        op = getattr(self.kernels if self.kernels is not None else torch.ops.resfuse_cuda, name)

        def call(*args):
            LAUNCHES[name] += 1
            return op(*args)
        return call


_COUNTING = _CountingOps()


def _ops():
    return _COUNTING


def _rows(t):
    """t as channels_last pixel rows (a copy only for other layouts)."""
    if t is None:
        return None
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def _empty_rows(N, C, H, W, like, poison=False):
    out = torch.empty((N, C, H, W), dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
    if poison and os.environ.get("RESFUSE_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out


def _like(y, x):
    return y.contiguous(memory_format=output_memory_format(x))


def _gemm(a, w, out, *, bias=None, prologue=_NONE, norm_weight=None, norm_bias=None, eps=0.0, mul=None,
          mul_gelu_grad=False, col_scale=None, row_scale=None, residual=None, aux_out=None, aux_mul=None):
    _ops().pixel_gemm(a, w, bias, prologue, norm_weight, norm_bias, float(eps), mul, mul_gelu_grad, col_scale,
                      row_scale, residual, conv_allows_tf32(), out, aux_out, aux_mul)
    return out


def _wgrad(dy, b, nout, k, *, want_db, prologue=_NONE, mean=None, rstd=None, norm_weight=None, norm_bias=None,
           row_scale=None):
    """(dW (nout, k) fp32, db (nout,) fp32 or None)."""
    dw = torch.empty((nout, k), dtype=torch.float32, device=dy.device)
    db = torch.empty((nout,), dtype=torch.float32, device=dy.device) if want_db else None
    _ops().pixel_wgrad(dy, b, prologue, mean, rstd, norm_weight, norm_bias, row_scale, conv_allows_tf32(), dw, db)
    return dw, db


def _run(device, fn, *args):
    if device.type != "cuda":  # only a stand-in for the kernels runs on other devices (tests)
        return fn(*args)
    with torch.cuda.device(device):
        return fn(*args)


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------

def _proj_forward(p):
    x = _rows(p.x)
    N, C, H, W = x.shape
    out = _empty_rows(N, p.weight.shape[0], H, W, x, poison=True)
    if p.norm_eps is None:
        _gemm(x, p.weight, out, bias=p.bias)
    else:
        _gemm(x, p.weight, out, bias=p.bias, prologue=_LAYERNORM, norm_weight=p.norm_weight, norm_bias=p.norm_bias,
              eps=p.norm_eps)
    if p.epilogue_gelu:  # pixel_gemm has no GELU epilogue: one torch op
        out = torch.nn.functional.gelu(out)
    return _like(out, p.x)


def proj_forward(p):
    return _run(p.device, _proj_forward, p)


def _offsets(dims):
    return [sum(dims[:i]) for i in range(len(dims))]


def _chain_forward(p):
    f = _rows(p.fused)
    dims, N, H, W = p.dims, f.shape[0], f.shape[2], f.shape[3]
    d0, S, D = dims[0], sum(dims), dims[-1]
    off = _offsets(dims)
    buf = _empty_rows(N, S, H, W, f, poison=True)
    _ops().dwconv_gate(f[:, d0:], p.w_dw, p.b_dw, _rows(p.gates), f[:, :d0], p.scale, buf)
    for i, (w, b) in enumerate(zip(p.w_pws, p.b_pws)):
        g = buf[:, off[i + 1]: off[i + 1] + dims[i + 1]]
        _gemm(buf[:, off[i]: off[i] + dims[i]], w, g, bias=b, mul=g)
    out = _empty_rows(N, D, H, W, f, poison=True)
    _gemm(buf[:, S - D:], p.w_out, out, bias=p.b_out, col_scale=p.layer_scale, row_scale=p.sample_scale,
          residual=_rows(p.residual))
    return _like(out, p.fused)


def chain_forward(p):
    return _run(p.device, _chain_forward, p)


def _gelu_forward(p):
    a = _rows(p.x)
    N, C, H, W = a.shape
    out = _empty_rows(N, p.weight.shape[0], H, W, a, poison=True)
    _gemm(a, p.weight, out, bias=p.bias, prologue=_GELU if p.prologue_gelu else _NONE, col_scale=p.layer_scale, row_scale=p.sample_scale,
          residual=_rows(p.residual))
    return _like(out, p.x)


def gelu_forward(p):
    return _run(p.device, _gelu_forward, p)


# ----------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------

def _transposed(weight, layer_scale=None):
    """(in, out) contiguous copy of a 1x1 weight, optionally scaled per output
    channel: the data gradient's GEMM operand."""
    w = weight.reshape(weight.shape[0], -1)
    if layer_scale is not None:
        w = (w.float() * layer_scale.float()[:, None]).to(weight.dtype)
    return w.t().contiguous()


def _scaled(dout, sample_scale):
    return dout if sample_scale is None else _rows(dout * sample_scale[:, None, None, None])


def _proj_backward(p):
    a, needs = p.args, p.needs
    x, dh = _rows(a["x"]), _rows(p.grad)
    weight, bias, nw, nb, eps = a["weight"], a["bias"], a["norm_weight"], a["norm_bias"], a["norm_eps"]
    N, C, H, W = x.shape
    K = weight.shape[0]
    grads = [None] * 5
    want_w, want_b = needs[1], needs[2] and bias is not None
    if eps is None:
        if needs[0]:
            grads[0] = _gemm(dh, _transposed(weight), _empty_rows(N, C, H, W, x, poison=True))
        if want_w or want_b:
            grads[1], grads[2] = _wgrad(dh, x, K, C, want_db=want_b)
    else:
        dxhat = _gemm(dh, _transposed(weight), _empty_rows(N, C, H, W, x, poison=True))
        dx = _empty_rows(N, C, H, W, x, poison=True)
        M = N * H * W
        mean = torch.empty((M,), dtype=torch.float32, device=x.device)
        rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
        f32 = lambda want: torch.empty((C,), dtype=torch.float32, device=x.device) if want else None  # noqa: E731
        dnw, dnb = f32(needs[3] and nw is not None), f32(needs[4] and nb is not None)
        _ops().layernorm_rows_backward(x, dxhat, nw, float(eps), dx, mean, rstd, dnw, dnb)
        grads[0], grads[3], grads[4] = dx, dnw, dnb
        if want_w or want_b:
            grads[1], grads[2] = _wgrad(dh, x, K, C, want_db=want_b, prologue=_LAYERNORM, mean=mean, rstd=rstd,
                                        norm_weight=nw, norm_bias=nb)
    return _finish(grads, _proj_likes(p), needs)


def proj_backward(p):
    return _run(p.device, _proj_backward, p)


def _chain_backward(p):
    a = p.args
    needs = _chain_needs(p)
    fused, gates, dout = _rows(a["fused"]), _rows(a["gates"]), _rows(p.grad)
    w_dw, b_dw, w_pws, b_pws = a["w_dw"], a["b_dw"], a["w_pws"], a["b_pws"]
    w_out, b_out, ls, ss, scale = a["w_out"], a["b_out"], a["layer_scale"], a["sample_scale"], a["scale"]
    n = len(w_pws)
    D = w_out.shape[0]
    dims = gnconv_dims(D, n + 1)
    d0, S = dims[0], sum(dims)
    off = _offsets(dims)
    N, _, H, W = fused.shape
    pwa, abc = fused[:, :d0], fused[:, d0:]
    sl = lambda t, i: t[:, off[i]: off[i] + dims[i]]  # noqa: E731  stage i's channels of an S-channel buffer

    # Replay: raw gates, x_i (i >= 0) and z_i (i >= 1).
    g = _empty_rows(N, S, H, W, fused, poison=True)
    _ops().dwconv_gate(abc, w_dw, b_dw, gates, None, scale, g)
    x = _empty_rows(N, S, H, W, fused, poison=True)
    z = _empty_rows(N, S, H, W, fused, poison=True) if n else None
    torch.mul(pwa, sl(g, 0), out=sl(x, 0))
    for i in range(n):
        _gemm(sl(x, i), w_pws[i], sl(x, i + 1), bias=b_pws[i], mul=sl(g, i + 1), aux_out=sl(z, i + 1))

    # Data gradients, last stage first: d x_i -> (dz_i, dg_i), or (dpwa, dg_0) for i = 0.
    d_f = _empty_rows(N, d0 + S, H, W, fused, poison=True)
    dz = _empty_rows(N, S, H, W, fused, poison=True) if n else None
    dg = _empty_rows(N, S, H, W, fused, poison=True)

    def stage_grad(i, a_in, w_t):
        if i == 0:
            _gemm(a_in, w_t, d_f[:, :d0], mul=sl(g, 0), aux_out=sl(dg, 0), aux_mul=pwa)
        else:
            _gemm(a_in, w_t, sl(dz, i), mul=sl(g, i), aux_out=sl(dg, i), aux_mul=sl(z, i))

    stage_grad(n, _scaled(dout, ss), _transposed(w_out, ls))
    for i in range(n, 0, -1):
        stage_grad(i - 1, sl(dz, i), _transposed(w_pws[i - 1]))

    grads = [None] * len(needs)
    if gates is None:
        k = w_dw.shape[-1]
        dw_dw = torch.empty((S, 1, k, k), dtype=torch.float32, device=fused.device) if needs[1] else None
        db_dw = torch.empty((S,), dtype=torch.float32, device=fused.device) if needs[2] and b_dw is not None \
            else None
        _ops().dwconv_gate_backward(dg, abc, w_dw, scale, d_f[:, d0:], dw_dw, db_dw)
        grads[1], grads[2] = dw_dw, db_dw
    else:
        d_f[:, d0:].zero_()  # abc reaches the chain only through the given gates
        grads[3] = dg * scale if needs[3] else None
    grads[0] = d_f
    for i in range(n):  # pws i: dims[i] -> dims[i + 1]
        want_b = needs[7 + n + i] and b_pws[i] is not None
        if needs[7 + i] or want_b:
            grads[7 + i], grads[7 + n + i] = _wgrad(sl(dz, i + 1), sl(x, i), dims[i + 1], dims[i], want_db=want_b)
    if needs[4] or needs[5] or needs[6]:
        G, rs = _wgrad(dout, sl(x, n), D, D, want_db=needs[5] or (needs[6] and b_out is not None), row_scale=ss)
        grads[4], grads[5], grads[6] = _scale_grads(G, rs, w_out, b_out, ls, needs[4], needs[5], needs[6])
    return _finish(grads, _chain_likes(p), needs)


def chain_backward(p):
    return _run(p.device, _chain_backward, p)


def _gelu_backward(p):
    a, needs = p.args, p.needs
    x, dout = _rows(a["a"]), _rows(p.grad)
    w, b, ls, ss = a["weight"], a["bias"], a["layer_scale"], a["sample_scale"]
    N, C, H, W = x.shape
    K = w.shape[0]
    gelu = a["prologue_gelu"]
    grads = [None] * 4
    if needs[0]:
        da = _empty_rows(N, C, H, W, x, poison=True)
        if gelu:
            grads[0] = _gemm(dout, _transposed(w, ls), da, mul=x, mul_gelu_grad=True, row_scale=ss)
        else:
            grads[0] = _gemm(dout, _transposed(w, ls), da, row_scale=ss)
    if needs[1] or needs[2] or needs[3]:
        G, rs = _wgrad(dout, x, K, C, want_db=needs[2] or (needs[3] and b is not None),
                       prologue=_GELU if gelu else _NONE, row_scale=ss)
        grads[1], grads[2], grads[3] = _scale_grads(G, rs, w, b, ls, needs[1], needs[2], needs[3])
    return _finish(grads, _gelu_likes(p), needs)


def gelu_backward(p):
    return _run(p.device, _gelu_backward, p)
