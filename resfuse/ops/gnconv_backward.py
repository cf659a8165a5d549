"""Backward of the gnconv and HorBlock ops, and their autograd.

Each forward op (``layernorm_conv1x1``, ``gnconv_chain``, ``gelu_conv1x1``)
has a backward op of its own, ``torch.ops.resfuse.<op>_backward`` (schema,
fake kernel, dispatch: cuda -> triton -> eager), and ``register_autograd``
calls it. The cuda backend is ``resfuse.ops_gnconv_cuda``.
Backward ops are custom ops so that ``torch.compile`` traces through them
like the forward ones.

Triton (kernels/gnconv_bwd.py, kernels/conv1x1_bwd.py; o = order):

* ``gnconv_chain``: ``gnconv_chain_bwd`` recomputes the forward stages of
  each pixel tile from f (gates included: the 7x7 depthwise costs FLOPs, not
  bytes, where storing the gates would cost S elements written and read per
  pixel), walks the chain backward with the gate products in registers, and
  writes dpwa, the gradient of the depthwise output, and the stage tensors
  the weight gradients need; ``dwconv_bwd`` turns the depthwise gradient
  into d(abc) (data) and d(w_dw), d(b_dw) (per-program partial sums, one
  reduction); ``conv1x1_wgrad`` (a GEMM over pixels) gives each pws
  weight and bias gradient and proj_out's. The layer scale's gradient needs
  no pass over y: with G = sum_p (dout * sample_scale) x_{o-1}^T (what
  proj_out's weight gradient is made of),
  ``d gamma = rowsum(W_out * G) + b_out * rowsum(dout * sample_scale)``.
  o + 2 launches.
* ``layernorm_conv1x1``: ``conv1x1_dgrad`` with the LayerNorm backward in its
  epilogue (it also returns the per-pixel statistics and the LayerNorm's
  weight and bias gradients), then ``conv1x1_wgrad`` with the LayerNorm
  recomputed as a prologue from those statistics: 2 launches. With
  ``epilogue_gelu`` (the forward wrote GELU(h), not h) autograd first
  recomputes h with the forward op (no GELU) and applies GELU'(h): 2 more.
* ``gelu_conv1x1``: ``conv1x1_dgrad`` scaling dout by gamma and the drop-path
  multiplier on load and multiplying by gelu'(a) in the epilogue, then
  ``conv1x1_wgrad`` with GELU recomputed on load; gamma's gradient by the
  same identity as above: 2 launches (``prologue_gelu=False``: neither
  GELU step).

Eager (the fallback, and the reference the tests compare with): recompute
the op's reference in the inputs' dtype and differentiate it with
torch.autograd.

``sample_scale`` (drop path's multiplier) is not differentiable: passing one
that requires grad raises. Double backward raises (the backward ops have no
derivative of their own).
"""

from typing import List, Optional

import torch

from .. import dispatch
from .._backends import kernels_module, triton_reasons
from ..reference import gelu_conv1x1_reference, gnconv_chain_reference, gnconv_dims, layernorm_conv1x1_reference
from . import gnconv_cuda
from .gnconv import MAX_TRITON_ORDER, _gnconv_chain_op, _launch, _layernorm_conv1x1_op
from .gnconv_grads import (BackwardProblem, _activation_like, _chain_likes, _chain_needs, _fake, _finish, _gelu_likes,
                           _proj_likes, _scale_grads)
from .horblock_mlp import _gelu_conv1x1_op

OP_PROJ_BWD = "layernorm_conv1x1_backward"
OP_CHAIN_BWD = "gnconv_chain_backward"
OP_GELU_BWD = "gelu_conv1x1_backward"


def _vjp(reference, leaves_in, needs, grad):
    """Gradients of ``reference(*leaves)`` for the leaves whose need is set,
    recomputed with eager PyTorch in the inputs' dtype. torch.func.vjp, not
    torch.autograd.grad: an op's implementation runs below the autograd
    dispatch key, where a plain autograd graph is not recorded."""
    wanted = [i for i, (t, n) in enumerate(zip(leaves_in, needs)) if t is not None and n]
    grads = [None] * len(leaves_in)
    if wanted:
        def f(*ws):
            leaves = list(leaves_in)
            for i, w in zip(wanted, ws):
                leaves[i] = w
            return reference(*leaves)
        _, vjp_fn = torch.func.vjp(f, *[leaves_in[i].detach() for i in wanted])
        for i, g in zip(wanted, vjp_fn(grad)):
            grads[i] = g
    return grads


def _wgrad(k, device, a, b, *, want_rowsum, **kw):
    return _launch(k.conv1x1_wgrad, device, a, b, want_rowsum=want_rowsum, **kw)


# ----------------------------------------------------------------------------
# layernorm_conv1x1
# ----------------------------------------------------------------------------

def _proj_bwd_eager(p):
    a = p.args
    eps = a["norm_eps"]
    g = _vjp(lambda x, w, b, nw, nb: layernorm_conv1x1_reference(x, w, b, nw, nb, eps), _proj_likes(p),
             p.needs, p.grad)
    return _finish(g, _proj_likes(p), p.needs)


def _ln_stats(x, eps):
    """Per-pixel mean and 1/std over channels (fp32, pixel order n, h, w):
    only when the input needs no gradient (the dgrad kernel returns them)."""
    xf = x.float()
    mean = xf.mean(1)
    rstd = torch.rsqrt(((xf - mean[:, None]) ** 2).mean(1) + eps)
    return mean.reshape(-1), rstd.reshape(-1)


def _proj_bwd_triton(p):
    a, needs, dev = p.args, p.needs, p.device
    k = kernels_module("conv1x1_bwd")
    x, w, nw, nb, eps = a["x"], a["weight"], a["norm_weight"], a["norm_bias"], a["norm_eps"]
    norm = eps is not None
    grads = [None] * 5
    stats = None
    if needs[0] or (norm and (needs[3] or needs[4])):
        dx = _activation_like(x, poison=True)
        if norm:
            mean, rstd, dnw, dnb = _launch(k.conv1x1_dgrad, dev, p.grad, w, dx, norm=(x, nw, nb, eps))
            stats = (mean, rstd)
            grads[3], grads[4] = dnw, dnb
        else:
            _launch(k.conv1x1_dgrad, dev, p.grad, w, dx)
        grads[0] = dx
    if needs[1] or needs[2]:
        kw = {}
        if norm:
            mean, rstd = stats if stats is not None else _ln_stats(x, eps)
            kw["b_norm"] = (mean, rstd, nw, nb)
        G, rs = _wgrad(k, dev, p.grad, x, want_rowsum=needs[2], **kw)
        grads[1], grads[2] = G, rs
    return _finish(grads, _proj_likes(p), needs)


# ----------------------------------------------------------------------------
# gnconv_chain
# ----------------------------------------------------------------------------

def _chain_bwd_eager(p):
    a = p.args
    n = len(a["w_pws"])

    def ref(fused, w_dw, b_dw, gates, w_out, b_out, ls, *pws):
        return gnconv_chain_reference(fused, w_dw, b_dw, gates, list(pws[:n]), list(pws[n:]), w_out, b_out,
                                      a["scale"], None, ls, a["sample_scale"])
    likes, needs = _chain_likes(p), _chain_needs(p)
    return _finish(_vjp(ref, likes, needs, p.grad), likes, needs)


def _chain_bwd_triton_check(p) -> List[str]:
    reasons = triton_reasons(p.device, p.dtype)
    if p.order > MAX_TRITON_ORDER:
        reasons.append(f"order {p.order} > {MAX_TRITON_ORDER}: the chain kernels address at most "
                       f"{MAX_TRITON_ORDER - 1} pws convs")
    return reasons


def _chain_bwd_triton(p):
    a, dev = p.args, p.device
    needs = _chain_needs(p)
    kg, k1 = kernels_module("gnconv_bwd"), kernels_module("conv1x1_bwd")
    fused, w_dw, gates, w_pws, b_pws = a["fused"], a["w_dw"], a["gates"], a["w_pws"], a["b_pws"]
    w_out, b_out, ls, ss = a["w_out"], a["b_out"], a["layer_scale"], a["sample_scale"]
    n = len(w_pws)
    D = w_out.shape[0]
    dims = gnconv_dims(D, n + 1)
    d0, S = dims[0], sum(dims)

    d_f = _activation_like(fused, poison=True)
    d_a, x_save = _activation_like(fused, S, poison=True), _activation_like(fused, S, poison=True)
    dz_save = _activation_like(fused, S - d0, poison=True) if n else None
    _launch(kg.gnconv_chain_bwd, dev, fused, w_dw, a["b_dw"], gates, w_pws, b_pws, w_out, a["scale"], p.grad, ls,
            ss, d_f, d_a, x_save, dz_save)
    grads = [None] * len(needs)
    if w_dw is not None:
        d_w, d_b = _launch(kg.dwconv_bwd, dev, d_a, fused[:, d0:], w_dw, d_f[:, d0:],
                           need_weight_grad=needs[1], need_bias_grad=needs[2] and a["b_dw"] is not None)
        grads[1], grads[2] = d_w, d_b
    else:
        d_f[:, d0:].zero_()  # abc reaches the chain only through the given gates
        grads[3] = d_a
    grads[0] = d_f
    x_off = [sum(dims[:i]) for i in range(n + 1)]
    for i in range(n):  # pws i: dims[i] -> dims[i + 1]; its output's gradient dz_{i+1}
        if needs[7 + i] or needs[7 + n + i]:
            dz = dz_save[:, x_off[i + 1] - d0: x_off[i + 1] - d0 + dims[i + 1]]
            G, rs = _wgrad(k1, dev, dz, x_save[:, x_off[i]: x_off[i] + dims[i]],
                           want_rowsum=needs[7 + n + i] and b_pws[i] is not None)
            grads[7 + i], grads[7 + n + i] = G, rs
    if needs[4] or needs[5] or needs[6]:
        G, rs = _wgrad(k1, dev, p.grad, x_save[:, S - D:], sample_scale=ss,
                       want_rowsum=needs[5] or (needs[6] and b_out is not None))
        grads[4], grads[5], grads[6] = _scale_grads(G, rs, w_out, b_out, ls, needs[4], needs[5], needs[6])
    return _finish(grads, _chain_likes(p), needs)


# ----------------------------------------------------------------------------
# gelu_conv1x1
# ----------------------------------------------------------------------------

def _gelu_bwd_eager(p):
    a = p.args
    ss = a["sample_scale"]
    gelu = a["prologue_gelu"]
    g = _vjp(lambda x, w, b, ls: gelu_conv1x1_reference(x, w, b, ls, ss, None, gelu), _gelu_likes(p), p.needs,
             p.grad)
    return _finish(g, _gelu_likes(p), p.needs)


def _gelu_bwd_triton(p):
    a, needs, dev = p.args, p.needs, p.device
    k = kernels_module("conv1x1_bwd")
    x, w, b, ls, ss = a["a"], a["weight"], a["bias"], a["layer_scale"], a["sample_scale"]
    gelu = a["prologue_gelu"]
    grads = [None] * 4
    if needs[0]:
        da = _activation_like(x, poison=True)
        _launch(k.conv1x1_dgrad, dev, p.grad, w, da, channel_scale=ls, sample_scale=ss,
                gelu_input=x if gelu else None)
        grads[0] = da
    if needs[1] or needs[2] or needs[3]:
        G, rs = _wgrad(k, dev, p.grad, x, sample_scale=ss, b_gelu=gelu,
                       want_rowsum=needs[2] or (needs[3] and b is not None))
        grads[1], grads[2], grads[3] = _scale_grads(G, rs, w, b, ls, needs[1], needs[2], needs[3])
    return _finish(grads, _gelu_likes(p), needs)


# ----------------------------------------------------------------------------
# Registration: dispatch, custom ops, fakes
# ----------------------------------------------------------------------------

for _op, _eager_fn, _triton_check, _triton_fn, _cuda_fn in (
        (OP_PROJ_BWD, _proj_bwd_eager, lambda p: triton_reasons(p.device, p.dtype), _proj_bwd_triton,
         gnconv_cuda.proj_backward),
        (OP_CHAIN_BWD, _chain_bwd_eager, _chain_bwd_triton_check, _chain_bwd_triton, gnconv_cuda.chain_backward),
        (OP_GELU_BWD, _gelu_bwd_eager, lambda p: triton_reasons(p.device, p.dtype), _gelu_bwd_triton,
         gnconv_cuda.gelu_backward)):
    dispatch.register(_op, "eager", lambda p: [], _eager_fn)
    dispatch.register(_op, "triton", _triton_check, _triton_fn)
    dispatch.register(_op, "cuda", gnconv_cuda.check(_op), _cuda_fn)


def _proj_problem(grad, x, weight, bias, norm_weight, norm_bias, norm_eps, needs):
    return BackwardProblem(grad, dict(x=x, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias,
                                      norm_eps=norm_eps), list(needs))


@torch.library.custom_op("resfuse::layernorm_conv1x1_backward", mutates_args=())
def _layernorm_conv1x1_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                   bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
                                   norm_bias: Optional[torch.Tensor], norm_eps: Optional[float], needs: List[bool],
                                   backend: str) -> List[torch.Tensor]:
    """[dx, d weight, d bias, d norm_weight, d norm_bias]; an empty tensor
    where `needs` is False. The gradient is of the 1x1's output before any
    epilogue GELU (the autograd of ``layernorm_conv1x1`` applies GELU' first)."""
    p = _proj_problem(grad, x, weight, bias, norm_weight, norm_bias, norm_eps, needs)
    return dispatch.run(OP_PROJ_BWD, backend, p)


@_layernorm_conv1x1_backward_op.register_fake
def _(grad, x, weight, bias, norm_weight, norm_bias, norm_eps, needs, backend):
    return _fake(_proj_likes(_proj_problem(grad, x, weight, bias, norm_weight, norm_bias, norm_eps, needs)),
                 list(needs))


def _chain_problem(grad, fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, layer_scale, sample_scale,
                   needs):
    return BackwardProblem(grad, dict(fused=fused, w_dw=w_dw, b_dw=b_dw, gates=gates, w_pws=list(w_pws),
                                      b_pws=list(b_pws), w_out=w_out, b_out=b_out, scale=scale,
                                      layer_scale=layer_scale, sample_scale=sample_scale),
                           list(needs), order=len(w_pws) + 1)


@torch.library.custom_op("resfuse::gnconv_chain_backward", mutates_args=())
def _gnconv_chain_backward_op(grad: torch.Tensor, fused: torch.Tensor, w_dw: Optional[torch.Tensor],
                              b_dw: Optional[torch.Tensor], gates: Optional[torch.Tensor], w_pws: List[torch.Tensor],
                              b_pws: List[Optional[torch.Tensor]], w_out: torch.Tensor,
                              b_out: Optional[torch.Tensor], scale: float, layer_scale: Optional[torch.Tensor],
                              sample_scale: Optional[torch.Tensor], needs: List[bool],
                              backend: str) -> List[torch.Tensor]:
    """[d fused, d w_dw, d b_dw, d gates, d w_out, d b_out, d layer_scale,
    d w_pws..., d b_pws...]; `needs` has one flag per returned gradient;
    an empty tensor where not needed. The residual's
    gradient is `grad` itself (the caller's)."""
    p = _chain_problem(grad, fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, layer_scale,
                       sample_scale, needs)
    return dispatch.run(OP_CHAIN_BWD, backend, p)


@_gnconv_chain_backward_op.register_fake
def _(grad, fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, layer_scale, sample_scale, needs, backend):
    p = _chain_problem(grad, fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, layer_scale,
                       sample_scale, needs)
    return _fake(_chain_likes(p), _chain_needs(p))


def _gelu_problem(grad, a, weight, bias, layer_scale, sample_scale, needs, prologue_gelu=True):
    return BackwardProblem(grad, dict(a=a, weight=weight, bias=bias, layer_scale=layer_scale,
                                      sample_scale=sample_scale, prologue_gelu=bool(prologue_gelu)), list(needs))


@torch.library.custom_op("resfuse::gelu_conv1x1_backward", mutates_args=())
def _gelu_conv1x1_backward_op(grad: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], layer_scale: Optional[torch.Tensor],
                              sample_scale: Optional[torch.Tensor], needs: List[bool],
                              backend: str, prologue_gelu: bool = True) -> List[torch.Tensor]:
    """[d a, d weight, d bias, d layer_scale]; an empty tensor where not needed."""
    return dispatch.run(OP_GELU_BWD, backend, _gelu_problem(grad, a, weight, bias, layer_scale, sample_scale, needs,
                                                            prologue_gelu))


@_gelu_conv1x1_backward_op.register_fake
def _(grad, a, weight, bias, layer_scale, sample_scale, needs, backend, prologue_gelu=True):
    return _fake(_gelu_likes(_gelu_problem(grad, a, weight, bias, layer_scale, sample_scale, needs, prologue_gelu)),
                 list(needs))


# ----------------------------------------------------------------------------
# Autograd of the forward ops
# ----------------------------------------------------------------------------

def _not_differentiable(t, what):
    if t is not None and t.requires_grad:
        raise RuntimeError(f"{what} is not differentiable (drop path's per-sample multiplier): pass it detached")


def _proj_setup(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, norm_eps, backend, *gelu = inputs
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias)
    ctx.norm_eps, ctx.backend, ctx.epilogue_gelu = norm_eps, backend, bool(gelu and gelu[0])


def _proj_backward(ctx, grad):
    needs = list(ctx.needs_input_grad[:5])
    if ctx.epilogue_gelu:
        # GELU' needs the pre-activation, which the forward did not keep:
        # recompute it (one more forward GEMM, the op without its GELU).
        x, weight, bias, norm_weight, norm_bias = ctx.saved_tensors
        pre = torch.ops.resfuse.layernorm_conv1x1(x, weight, bias, norm_weight, norm_bias, ctx.norm_eps,
                                                  ctx.backend, False)
        grad = torch.ops.aten.gelu_backward(grad, pre)
    g = torch.ops.resfuse.layernorm_conv1x1_backward(grad, *ctx.saved_tensors, ctx.norm_eps, needs, ctx.backend)
    return tuple(gi if n else None for gi, n in zip(g, needs)) + (None, None, None)


def _chain_setup(ctx, inputs, output):
    fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, residual, layer_scale, sample_scale, backend = inputs
    _not_differentiable(sample_scale, "gnconv_chain's sample_scale")
    ctx.n_pws, ctx.scale, ctx.backend = len(w_pws), scale, backend
    ctx.save_for_backward(fused, w_dw, b_dw, gates, w_out, b_out, layer_scale, sample_scale, *w_pws, *b_pws)


def _chain_backward(ctx, grad):
    t, n, need = ctx.saved_tensors, ctx.n_pws, ctx.needs_input_grad
    fused, w_dw, b_dw, gates, w_out, b_out, layer_scale, sample_scale = t[:8]
    w_pws, b_pws = list(t[8:8 + n]), list(t[8 + n:])
    # A list argument's flag is a list: one flag per tensor.
    pw_need = [bool(v) for v in need[4]] if isinstance(need[4], (list, tuple)) else [bool(need[4])] * n
    pb_need = [bool(v) for v in need[5]] if isinstance(need[5], (list, tuple)) else [bool(need[5])] * n
    needs = [bool(need[i]) for i in (0, 1, 2, 3, 6, 7, 10)] + pw_need + pb_need
    g = torch.ops.resfuse.gnconv_chain_backward(grad, fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out,
                                                ctx.scale, layer_scale, sample_scale, needs, ctx.backend)

    def pick(i, flag):
        return g[i] if flag else None
    # List arguments get lists back (autograd checks the structure), None per unneeded entry.
    g_pws = [g[7 + i] if pw_need[i] else None for i in range(n)]
    g_bpws = [g[7 + n + i] if pb_need[i] else None for i in range(n)]
    return (pick(0, needs[0]), pick(1, needs[1]), pick(2, needs[2]), pick(3, needs[3]), g_pws, g_bpws,
            pick(4, needs[4]), pick(5, needs[5]), None, grad if need[9] else None, pick(6, needs[6]), None, None)


def _gelu_setup(ctx, inputs, output):
    a, weight, bias, layer_scale, sample_scale, residual, backend, *gelu = inputs
    _not_differentiable(sample_scale, "gelu_conv1x1's sample_scale")
    ctx.backend, ctx.prologue_gelu = backend, bool(gelu[0]) if gelu else True
    ctx.save_for_backward(a, weight, bias, layer_scale, sample_scale)


def _gelu_backward(ctx, grad):
    a, weight, bias, layer_scale, sample_scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[2], need[3]]
    g = torch.ops.resfuse.gelu_conv1x1_backward(grad, a, weight, bias, layer_scale, sample_scale, needs,
                                                ctx.backend, ctx.prologue_gelu)
    return (g[0] if need[0] else None, g[1] if need[1] else None, g[2] if need[2] else None,
            g[3] if need[3] else None, None, grad if need[5] else None, None, None)


_layernorm_conv1x1_op.register_autograd(_proj_backward, setup_context=_proj_setup)
_gnconv_chain_op.register_autograd(_chain_backward, setup_context=_chain_setup)
_gelu_conv1x1_op.register_autograd(_gelu_backward, setup_context=_gelu_setup)


def _no_double_backward(name):
    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"resfuse: double backward through {name} is not supported (its backward is an op "
                           f"without a derivative of its own, on every backend); for higher-order gradients "
                           f"use the original, unconverted module")
    return backward, setup


for _bop, _name in ((_layernorm_conv1x1_backward_op, "layernorm_conv1x1"),
                    (_gnconv_chain_backward_op, "gnconv_chain"), (_gelu_conv1x1_backward_op, "gelu_conv1x1")):
    _bw, _setup = _no_double_backward(_name)
    _bop.register_autograd(_bw, setup_context=_setup)
