"""The second half of a HorBlock's MLP as one op:
``torch.ops.resfuse.gelu_conv1x1``.

    out = residual + sample_scale[n] * layer_scale * (W gelu(a) + b)

a is the pre-activation of ``pwconv1`` (written by ``layernorm_conv1x1``
with the block's ``norm2`` as its prologue), W/b are ``pwconv2``'s (a
Linear over channels is a 1x1 conv), ``layer_scale`` is ``gamma2``,
``sample_scale`` drop path's per-sample multiplier, ``residual`` the block's
stream. GELU is the exact (erf) form. The definition is
``resfuse.reference.gelu_conv1x1_reference``; the Triton kernel is
``kernels/conv1x1.py``'s 1x1 GEMM with the GELU as a prologue on its input
tiles and the scales and the add in its epilogue, so neither gelu(a) nor
the branch output reaches memory.

Backends: ``triton``, ``eager`` (the reference in the input's dtype) and
``cuda`` (resfuse._C's pixel_gemm with a GELU prologue, ``resfuse.ops_gnconv_cuda``).
Autograd: ``resfuse.ops_gnconv_bwd``.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from .. import dispatch
from .._backends import kernels_module, triton_reasons
from ..reference import gelu_conv1x1_reference
from . import gnconv_cuda
from .common import OnInput, alloc_output, check_tensor, output_memory_format
from .plans import PlanCache, call, signature
from .gnconv import _check_vec, _check_x, _launch

OP_GELU_CONV1X1 = "gelu_conv1x1"


@dataclass
class GeluConv1x1Problem(OnInput):
    x: torch.Tensor          # a, the pre-activation (named x for alloc_output)
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    layer_scale: Optional[torch.Tensor]
    sample_scale: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    out_shape: tuple
    prologue_gelu: bool = True


def make_gelu_conv1x1_problem(a, weight, bias, layer_scale, sample_scale, residual,
                              prologue_gelu: bool = True) -> GeluConv1x1Problem:
    _check_x(a, "a")
    N, C, H, W = a.shape
    if C == 0:
        raise ValueError(f"a has 0 channels (shape {tuple(a.shape)})")
    check_tensor(weight, "weight", dims=4, device=a.device, dtype=a.dtype)
    K = weight.shape[0]
    if K == 0 or tuple(weight.shape[1:]) != (C, 1, 1):
        raise ValueError(f"weight must be a 1x1 conv weight (K>0, {C}, 1, 1) for a with {C} channels, "
                         f"got {tuple(weight.shape)}")
    _check_vec(bias, "bias", K, a)
    _check_vec(layer_scale, "layer_scale", K, a)
    _check_vec(sample_scale, "sample_scale", N, a)
    if residual is not None:
        check_tensor(residual, "residual", dims=4, device=a.device, dtype=a.dtype, shape=(N, K, H, W))
    if not isinstance(prologue_gelu, bool):
        raise TypeError(f"prologue_gelu must be a bool, got {prologue_gelu!r}")
    return GeluConv1x1Problem(a, weight, bias, layer_scale, sample_scale, residual, (N, K, H, W), prologue_gelu)


def _eager(p: GeluConv1x1Problem):
    y = gelu_conv1x1_reference(p.x, p.weight, p.bias, p.layer_scale, p.sample_scale, p.residual, p.prologue_gelu)
    return y.contiguous(memory_format=output_memory_format(p.x))


def _triton(p: GeluConv1x1Problem):
    out = alloc_output(p)
    return _launch(kernels_module("conv1x1").ln_conv1x1_fwd, p.device, p.x, p.weight, p.bias, None, None, None,
                   out, prologue_gelu=p.prologue_gelu, layer_scale=p.layer_scale, sample_scale=p.sample_scale,
                   residual=p.residual)


dispatch.register(OP_GELU_CONV1X1, "eager", lambda p: [], _eager)
dispatch.register(OP_GELU_CONV1X1, "triton", lambda p: triton_reasons(p.device, p.dtype), _triton)
dispatch.register(OP_GELU_CONV1X1, "cuda", gnconv_cuda.check(OP_GELU_CONV1X1), gnconv_cuda.gelu_forward)


_PLANS = PlanCache(OP_GELU_CONV1X1)


def gelu_conv1x1_impl(a, weight, bias, layer_scale, sample_scale, residual, backend, prologue_gelu=True):
    """The implementation of ``torch.ops.resfuse.gelu_conv1x1`` (and of the
    direct path): validated and planned once per signature."""
    key = signature((a, weight, bias, layer_scale, sample_scale, residual, backend, prologue_gelu))
    return _PLANS.run(
        key, backend,
        lambda: make_gelu_conv1x1_problem(a, weight, bias, layer_scale, sample_scale, residual, prologue_gelu),
        lambda out_shape: GeluConv1x1Problem(a, weight, bias, layer_scale, sample_scale, residual, out_shape,
                                             prologue_gelu),
        lambda p: p.out_shape)


@torch.library.custom_op("resfuse::gelu_conv1x1", mutates_args=())
def _gelu_conv1x1_op(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     layer_scale: Optional[torch.Tensor], sample_scale: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor], backend: str, prologue_gelu: bool = True) -> torch.Tensor:
    return gelu_conv1x1_impl(a, weight, bias, layer_scale, sample_scale, residual, backend, prologue_gelu)


@_gelu_conv1x1_op.register_fake
def _gelu_conv1x1_fake(a, weight, bias, layer_scale, sample_scale, residual, backend, prologue_gelu=True):
    p = make_gelu_conv1x1_problem(a, weight, bias, layer_scale, sample_scale, residual, prologue_gelu)
    dispatch.validate_backend(backend)
    return torch.empty(p.out_shape, dtype=a.dtype, device=a.device, memory_format=output_memory_format(a))


def gelu_conv1x1(a, weight, bias=None, *, layer_scale=None, sample_scale=None, residual=None,
                 prologue_gelu: bool = True, backend: str = "auto"):
    """``residual + sample_scale[n] * layer_scale * conv1x1(gelu(a), weight, bias)``
    in one kernel. `weight`: (K, C, 1, 1) or a Linear's (K, C).
    ``prologue_gelu=False``: ``a`` is taken as is (already gelu'd by
    ``layernorm_conv1x1(epilogue_gelu=True)``): a plain GEMM main loop."""
    dispatch.validate_backend(backend)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        weight = weight[:, :, None, None]
    return call(gelu_conv1x1_impl, torch.ops.resfuse.gelu_conv1x1, a, weight, bias, layer_scale, sample_scale,
                residual, backend, bool(prologue_gelu))
