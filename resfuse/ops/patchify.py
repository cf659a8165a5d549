"""Patchify convolutions with a channels-first LayerNorm before or after:
``torch.ops.resfuse.patchify_conv``.

    y = LN_post(conv2d(LN_pre(x), W, b, stride=P))       W: (K, C, P, P), no padding

HorNet's and ConvNeXt's stems (a 4x4 stride-4 conv, then LayerNorm) and
downsampling layers (LayerNorm, then a 2x2 stride-2 conv). The definition
is ``resfuse.reference.patchify_conv_reference``; the Triton kernel is
``kernels/patchify.py`` (one kernel: the LayerNorm of the input as the
GEMM's per-tap prologue or folded into the weights, the LayerNorm of the
output in the epilogue).

Backends: ``triton``, ``eager`` (the reference in the input's dtype). The
CUDA C++ backend has no patchify kernel: it reports that, and ``auto``
runs Triton (or eager).

Autograd: the gradients of the eager reference (recomputed, exact in the
input's dtype); no fused backward kernels yet; double backward raises.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch

from .. import dispatch
from .._backends import kernels_module, triton_reasons
from ..reference import patchify_conv_reference
from .common import OnInput, alloc_output, check_tensor, conv_output_memory_format
from .plans import PlanCache, call, signature
from .gnconv import _check_vec, _check_x, _launch
from .gnconv_backward import _vjp

OP = "patchify_conv"


@dataclass
class PatchifyProblem(OnInput):
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    pre_weight: Optional[torch.Tensor]
    pre_bias: Optional[torch.Tensor]
    pre_eps: Optional[float]
    post_weight: Optional[torch.Tensor]
    post_bias: Optional[torch.Tensor]
    post_eps: Optional[float]
    out_shape: tuple

    @property
    def patch(self) -> int:
        return self.weight.shape[-1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


def _check_norm(w, b, eps, n, like, which):
    if eps is None:
        if w is not None or b is not None:
            raise ValueError(f"{which}_weight/{which}_bias given without {which}_eps (that LayerNorm is off)")
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{which}_eps must be a non-negative float, got {eps!r}")
    _check_vec(w, f"{which}_weight", n, like)
    _check_vec(b, f"{which}_bias", n, like)
    return float(eps)


def make_patchify_problem(x, weight, bias, pre_weight, pre_bias, pre_eps, post_weight, post_bias,
                          post_eps) -> PatchifyProblem:
    _check_x(x, "x")
    N, C, H, W = x.shape
    if C == 0:
        raise ValueError(f"x has 0 channels (shape {tuple(x.shape)})")
    check_tensor(weight, "weight", dims=4, device=x.device, dtype=x.dtype)
    K, wc, P, P2 = weight.shape
    if K == 0 or wc != C or P != P2 or P == 0:
        raise ValueError(f"weight must be a square patchify conv weight (K>0, {C}, P, P) for x with {C} "
                         f"channels, got {tuple(weight.shape)}")
    if H < P or W < P:
        raise ValueError(f"x's spatial size {H}x{W} is smaller than the {P}x{P} patch (F.conv2d refuses it too)")
    _check_vec(bias, "bias", K, x)
    pre_eps = _check_norm(pre_weight, pre_bias, pre_eps, C, x, "pre")
    post_eps = _check_norm(post_weight, post_bias, post_eps, K, x, "post")
    return PatchifyProblem(x, weight, bias, pre_weight, pre_bias, pre_eps, post_weight, post_bias, post_eps,
                           (N, K, H // P, W // P))


def _out_format(p: PatchifyProblem):
    return conv_output_memory_format(p.x, p.weight)


def _eager(p: PatchifyProblem):
    y = patchify_conv_reference(p.x, p.weight, p.bias, p.pre_weight, p.pre_bias, p.pre_eps, p.post_weight,
                                p.post_bias, p.post_eps)
    return y.contiguous(memory_format=_out_format(p))


def triton_check(p) -> List[str]:
    reasons = triton_reasons(p.device, p.dtype)
    if not reasons and p.post_eps is not None:
        most = kernels_module("patchify").MAX_POST_NORM_CHANNELS
        if p.out_channels > most:
            reasons.append(f"LayerNorm after the conv over {p.out_channels} > {most} channels: the kernel "
                           f"holds all of a pixel's channels in one tile")
    return reasons


def _triton(p: PatchifyProblem):
    out = alloc_output(p, _out_format(p))
    pre = None if p.pre_eps is None else (p.pre_weight, p.pre_bias, p.pre_eps)
    post = None if p.post_eps is None else (p.post_weight, p.post_bias, p.post_eps)
    return _launch(kernels_module("patchify").patchify_conv_fwd, p.device, p.x, p.weight, p.bias, pre, post, out)


dispatch.register(OP, "eager", lambda p: [], _eager)
dispatch.register(OP, "triton", triton_check, _triton)
dispatch.register(OP, "cuda", lambda p: [], None)


@dataclass(frozen=True)
class PatchifySignature:
    """What the backend choice depends on (for ``explain``'s predictions)."""
    device: torch.device
    dtype: torch.dtype
    out_channels: int
    post_eps: Optional[float]


# ----------------------------------------------------------------------------
# torch.library
# ----------------------------------------------------------------------------

_PLANS = PlanCache(OP)


def patchify_conv_impl(x, weight, bias, pre_weight, pre_bias, pre_eps, post_weight, post_bias, post_eps, backend):
    """The implementation of ``torch.ops.resfuse.patchify_conv`` (and of the
    direct path): validated and planned once per signature."""
    key = signature((x, weight, bias, pre_weight, pre_bias, pre_eps, post_weight, post_bias, post_eps, backend))
    return _PLANS.run(
        key, backend,
        lambda: make_patchify_problem(x, weight, bias, pre_weight, pre_bias, pre_eps, post_weight, post_bias,
                                      post_eps),
        lambda d: PatchifyProblem(x, weight, bias, pre_weight, pre_bias, d[0], post_weight, post_bias, d[1], d[2]),
        lambda p: (p.pre_eps, p.post_eps, p.out_shape))


@torch.library.custom_op("resfuse::patchify_conv", mutates_args=())
def _patchify_conv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      pre_weight: Optional[torch.Tensor], pre_bias: Optional[torch.Tensor], pre_eps: Optional[float],
                      post_weight: Optional[torch.Tensor], post_bias: Optional[torch.Tensor],
                      post_eps: Optional[float], backend: str) -> torch.Tensor:
    return patchify_conv_impl(x, weight, bias, pre_weight, pre_bias, pre_eps, post_weight, post_bias, post_eps,
                              backend)


@_patchify_conv_op.register_fake
def _patchify_conv_fake(x, weight, bias, pre_weight, pre_bias, pre_eps, post_weight, post_bias, post_eps, backend):
    p = make_patchify_problem(x, weight, bias, pre_weight, pre_bias, pre_eps, post_weight, post_bias, post_eps)
    dispatch.validate_backend(backend)
    return torch.empty(p.out_shape, dtype=x.dtype, device=x.device, memory_format=_out_format(p))


_TENSOR_ARGS = (0, 1, 2, 3, 4, 6, 7)  # x, weight, bias, pre_weight, pre_bias, post_weight, post_bias


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*[inputs[i] for i in _TENSOR_ARGS])
    ctx.eps = (inputs[5], inputs[8])


def _backward(ctx, grad):
    """The eager reference's gradients (recomputed in the inputs' dtype).
    Not differentiable itself: with create_graph (grad mode on in here)
    it raises instead of returning gradients without a graph."""
    if torch.is_grad_enabled():
        raise RuntimeError("resfuse: double backward through patchify_conv is not supported; for higher-order "
                           "gradients use the original, unconverted modules")
    pre_eps, post_eps = ctx.eps
    leaves = list(ctx.saved_tensors)
    needs = [ctx.needs_input_grad[i] for i in _TENSOR_ARGS]

    def ref(x, w, b, pw, pb, qw, qb):
        return patchify_conv_reference(x, w, b, pw, pb, pre_eps, qw, qb, post_eps)

    g = _vjp(ref, leaves, needs, grad.to(leaves[0].dtype))
    out = [None] * 10
    for slot, gi in zip(_TENSOR_ARGS, g):
        out[slot] = gi
    return tuple(out)


_patchify_conv_op.register_autograd(_backward, setup_context=_setup_context)


def patchify_conv(x, weight, bias=None, *, pre_weight=None, pre_bias=None, pre_eps=None, post_weight=None,
                  post_bias=None, post_eps=None, backend: str = "auto"):
    """``LN_post(conv2d(LN_pre(x), weight, bias, stride=P))`` in one kernel,
    for a square (K, C, P, P) weight (kernel = stride, no padding); each
    channels-first LayerNorm (HorNet's / ConvNeXt's) is on when its eps is
    given. A HorNet downsampling layer is ``pre_*``, its stem ``post_*``."""
    dispatch.validate_backend(backend)
    return call(patchify_conv_impl, torch.ops.resfuse.patchify_conv, x, weight, bias, pre_weight, pre_bias,
                None if pre_eps is None else float(pre_eps), post_weight, post_bias,
                None if post_eps is None else float(post_eps), backend)
