"""The ops of HorNet's gnconv: ``torch.ops.resfuse.layernorm_conv1x1`` and
``torch.ops.resfuse.gnconv_chain`` (schema, validation, dispatch, fake
kernels, autograd), and the composite ``resfuse.gnconv``.

    f = layernorm_conv1x1(x, W_in, b_in, [LN])              proj_in (after norm1)
    y = gnconv_chain(f, W_dw, b_dw | gates, pws, W_out, b_out, s, [residual, layer_scale])

Two ops, not one, because the projection's output must reach memory: the
7x7 depthwise conv needs a 3-pixel halo of it around every tile. The split
is also where HorNet's gflayer variant runs its FFT filter eagerly on
``abc = f[:, d0:]`` before the chain op takes the filter's output as
``gates``. The definition of both is ``resfuse/reference.py``
(``layernorm_conv1x1_reference``, ``gnconv_chain_reference``), the kernels
``kernels/gnconv.py``.

Backends: ``cuda`` (resfuse._C's kernels composed by
``resfuse.ops_gnconv_cuda``: a LayerNorm-prologue GEMM, then the depthwise
gate kernel, one gated GEMM per pws and proj_out), ``triton`` and ``eager``
(the reference in the input's dtype: HorNet's own op sequence).

Autograd: ``resfuse.ops_gnconv_bwd`` registers it: each op's backward is
an op of its own (``*_backward``) with Triton kernels and an eager
fallback; double backward raises.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .. import dispatch
from .._backends import conv_allows_tf32, kernels_module, triton_reasons
from ..reference import gnconv_chain_reference, gnconv_dims, layernorm_conv1x1_reference
from . import gnconv_cuda
from .common import OnInput, alloc_output, check_tensor, output_memory_format
from .plans import PlanCache, call, signature

OP_PROJ = "layernorm_conv1x1"
OP_CHAIN = "gnconv_chain"
MAX_TRITON_ORDER = 5  # the chain kernel addresses at most four pws convs
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------
# Problems and validation
# ----------------------------------------------------------------------------

def _check_x(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_vec(t, name, n, like):
    if t is not None:
        check_tensor(t, name, dims=1, device=like.device, dtype=like.dtype, shape=(n,))


@dataclass
class LNConv1x1Problem(OnInput):
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    norm_weight: Optional[torch.Tensor]
    norm_bias: Optional[torch.Tensor]
    norm_eps: Optional[float]
    out_shape: tuple
    epilogue_gelu: bool = False


def make_ln_conv1x1_problem(x, weight, bias, norm_weight, norm_bias, norm_eps,
                            epilogue_gelu: bool = False) -> LNConv1x1Problem:
    _check_x(x, "x")
    N, C, H, W = x.shape
    if C == 0:
        raise ValueError(f"x has 0 channels (shape {tuple(x.shape)})")
    check_tensor(weight, "weight", dims=4, device=x.device, dtype=x.dtype)
    K = weight.shape[0]
    if K == 0 or tuple(weight.shape[1:]) != (C, 1, 1):
        raise ValueError(f"weight must be a 1x1 conv weight (K>0, {C}, 1, 1) for x with {C} channels, "
                         f"got {tuple(weight.shape)}")
    _check_vec(bias, "bias", K, x)
    if norm_eps is None:
        if norm_weight is not None or norm_bias is not None:
            raise ValueError("norm_weight/norm_bias given without norm_eps (the LayerNorm is off)")
    else:
        if not isinstance(norm_eps, (int, float)) or not norm_eps >= 0:
            raise ValueError(f"norm_eps must be a non-negative float, got {norm_eps!r}")
        _check_vec(norm_weight, "norm_weight", C, x)
        _check_vec(norm_bias, "norm_bias", C, x)
    if not isinstance(epilogue_gelu, bool):
        raise TypeError(f"epilogue_gelu must be a bool, got {epilogue_gelu!r}")
    return LNConv1x1Problem(x, weight, bias, norm_weight, norm_bias,
                            None if norm_eps is None else float(norm_eps), (N, K, H, W), epilogue_gelu)


@dataclass
class GnConvChainProblem(OnInput):
    fused: torch.Tensor
    w_dw: Optional[torch.Tensor]
    b_dw: Optional[torch.Tensor]
    gates: Optional[torch.Tensor]
    w_pws: List[torch.Tensor]
    b_pws: List[Optional[torch.Tensor]]
    w_out: torch.Tensor
    b_out: Optional[torch.Tensor]
    scale: float
    residual: Optional[torch.Tensor]
    layer_scale: Optional[torch.Tensor]
    sample_scale: Optional[torch.Tensor]
    dims: List[int]
    out_shape: tuple

    @property
    def x(self):  # what alloc_output and OnInput read: dtype, device, memory format
        return self.fused

    @property
    def order(self) -> int:
        return len(self.dims)


def make_chain_problem(fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, residual,
                       layer_scale, sample_scale=None) -> GnConvChainProblem:
    _check_x(fused, "fused")
    dev, dt = fused.device, fused.dtype
    check_tensor(w_out, "w_out", dims=4, device=dev, dtype=dt)
    D = w_out.shape[0]
    if D == 0 or tuple(w_out.shape[1:]) != (D, 1, 1):
        raise ValueError(f"w_out must be a 1x1 conv weight (dim, dim, 1, 1), got {tuple(w_out.shape)}")
    if not isinstance(w_pws, (list, tuple)) or not isinstance(b_pws, (list, tuple)):
        raise TypeError("w_pws and b_pws must be lists (one entry per pws conv)")
    if len(b_pws) != len(w_pws):
        raise ValueError(f"b_pws has {len(b_pws)} entries, w_pws {len(w_pws)}; give None for a conv without bias")
    order = len(w_pws) + 1
    try:
        dims = gnconv_dims(D, order)
    except ValueError as e:
        raise ValueError(f"w_out's dim and len(w_pws)+1 = order: {e}") from None
    S = sum(dims)
    N, C2, H, W = fused.shape
    if C2 != dims[0] + S:
        raise ValueError(f"fused must have dims[0] + sum(dims) = 2*dim = {dims[0] + S} channels "
                         f"([pwa | abc], dims={dims}), got {C2}")
    if (w_dw is None) == (gates is None):
        raise ValueError("give exactly one of w_dw (the depthwise conv) and gates (a gflayer's output)")
    if w_dw is not None:
        check_tensor(w_dw, "w_dw", dims=4, device=dev, dtype=dt)
        k = w_dw.shape[-1]
        if tuple(w_dw.shape) != (S, 1, k, k) or k % 2 == 0:
            raise ValueError(f"w_dw must be a depthwise weight ({S}, 1, k, k) with k odd, got {tuple(w_dw.shape)}")
        _check_vec(b_dw, "b_dw", S, fused)
    else:
        if b_dw is not None:
            raise ValueError("b_dw given with gates: the bias belongs to the depthwise conv")
        check_tensor(gates, "gates", dims=4, device=dev, dtype=dt, shape=(N, S, H, W))
    for i, (w, b) in enumerate(zip(w_pws, b_pws)):
        check_tensor(w, f"w_pws[{i}]", dims=4, device=dev, dtype=dt, shape=(dims[i + 1], dims[i], 1, 1))
        _check_vec(b, f"b_pws[{i}]", dims[i + 1], fused)
    _check_vec(b_out, "b_out", D, fused)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {scale!r}")
    if residual is not None:
        check_tensor(residual, "residual", dims=4, device=dev, dtype=dt, shape=(N, D, H, W))
    _check_vec(layer_scale, "layer_scale", D, fused)
    _check_vec(sample_scale, "sample_scale", N, fused)
    return GnConvChainProblem(fused, w_dw, b_dw, gates, list(w_pws), list(b_pws), w_out, b_out, float(scale),
                              residual, layer_scale, sample_scale, dims, (N, D, H, W))


@dataclass
class GnConvSignature:
    """Enough of a problem to ask the backends (``explain``, before any input)."""
    device: torch.device
    dtype: torch.dtype
    order: int = 1


# ----------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------

def _proj_eager(p: LNConv1x1Problem):
    y = layernorm_conv1x1_reference(p.x, p.weight, p.bias, p.norm_weight, p.norm_bias, p.norm_eps, p.epilogue_gelu)
    return y.contiguous(memory_format=output_memory_format(p.x))


def _launch(fn, device, *args, **kw):
    if device.type == "cuda":
        with torch.cuda.device(device):
            return fn(*args, allow_tf32=conv_allows_tf32(), **kw)
    return fn(*args, allow_tf32=False, **kw)


def _proj_triton(p: LNConv1x1Problem):
    out = alloc_output(p)
    return _launch(kernels_module("conv1x1").ln_conv1x1_fwd, p.device, p.x, p.weight, p.bias, p.norm_weight,
                   p.norm_bias, p.norm_eps, out, epilogue_gelu=p.epilogue_gelu)


def _chain_eager(p: GnConvChainProblem):
    y = gnconv_chain_reference(p.fused, p.w_dw, p.b_dw, p.gates, p.w_pws, p.b_pws, p.w_out, p.b_out, p.scale,
                               p.residual, p.layer_scale, p.sample_scale)
    return y.contiguous(memory_format=output_memory_format(p.fused))


def _chain_triton_check(p) -> List[str]:
    reasons = triton_reasons(p.device, p.dtype)
    if p.order > MAX_TRITON_ORDER:
        reasons.append(f"order {p.order} > {MAX_TRITON_ORDER}: the chain kernel addresses at most "
                       f"{MAX_TRITON_ORDER - 1} pws convs")
    return reasons


def _chain_triton(p: GnConvChainProblem):
    out = alloc_output(p)
    extra = {} if p.sample_scale is None else {"sample_scale": p.sample_scale}
    return _launch(kernels_module("gnconv").gnconv_chain_fwd, p.device, p.fused, p.w_dw, p.b_dw, p.gates,
                   p.w_pws, p.b_pws, p.w_out, p.b_out, p.scale, p.residual, p.layer_scale, out, **extra)


dispatch.register(OP_PROJ, "eager", lambda p: [], _proj_eager)
dispatch.register(OP_PROJ, "triton", lambda p: triton_reasons(p.device, p.dtype), _proj_triton)
dispatch.register(OP_PROJ, "cuda", gnconv_cuda.check(OP_PROJ), gnconv_cuda.proj_forward)
dispatch.register(OP_CHAIN, "eager", lambda p: [], _chain_eager)
dispatch.register(OP_CHAIN, "triton", _chain_triton_check, _chain_triton)
dispatch.register(OP_CHAIN, "cuda", gnconv_cuda.check(OP_CHAIN), gnconv_cuda.chain_forward)


# ----------------------------------------------------------------------------
# torch.library: layernorm_conv1x1
# ----------------------------------------------------------------------------

_PROJ_PLANS = PlanCache(OP_PROJ)


def layernorm_conv1x1_impl(x, weight, bias, norm_weight, norm_bias, norm_eps, backend, epilogue_gelu=False):
    """The implementation of ``torch.ops.resfuse.layernorm_conv1x1`` (and of
    the direct path, ``ops.plans``): validated and planned once per
    signature."""
    key = signature((x, weight, bias, norm_weight, norm_bias, norm_eps, backend, epilogue_gelu))
    return _PROJ_PLANS.run(
        key, backend,
        lambda: make_ln_conv1x1_problem(x, weight, bias, norm_weight, norm_bias, norm_eps, epilogue_gelu),
        lambda d: LNConv1x1Problem(x, weight, bias, norm_weight, norm_bias, d[0], d[1], epilogue_gelu),
        lambda p: (p.norm_eps, p.out_shape))


@torch.library.custom_op("resfuse::layernorm_conv1x1", mutates_args=())
def _layernorm_conv1x1_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                          norm_eps: Optional[float], backend: str, epilogue_gelu: bool = False) -> torch.Tensor:
    return layernorm_conv1x1_impl(x, weight, bias, norm_weight, norm_bias, norm_eps, backend, epilogue_gelu)


@_layernorm_conv1x1_op.register_fake
def _layernorm_conv1x1_fake(x, weight, bias, norm_weight, norm_bias, norm_eps, backend, epilogue_gelu=False):
    p = make_ln_conv1x1_problem(x, weight, bias, norm_weight, norm_bias, norm_eps, epilogue_gelu)
    dispatch.validate_backend(backend)
    return torch.empty(p.out_shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


# ----------------------------------------------------------------------------
# torch.library: gnconv_chain
# ----------------------------------------------------------------------------

_CHAIN_PLANS = PlanCache(OP_CHAIN)


def gnconv_chain_impl(fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, residual, layer_scale,
                      sample_scale, backend):
    """The implementation of ``torch.ops.resfuse.gnconv_chain`` (and of the
    direct path): validated and planned once per signature."""
    key = signature((fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, residual, layer_scale,
                     sample_scale, backend))
    return _CHAIN_PLANS.run(
        key, backend,
        lambda: make_chain_problem(fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, residual,
                                   layer_scale, sample_scale),
        lambda d: GnConvChainProblem(fused, w_dw, b_dw, gates, list(w_pws), list(b_pws), w_out, b_out, d[0],
                                     residual, layer_scale, sample_scale, d[1], d[2]),
        lambda p: (p.scale, p.dims, p.out_shape))


@torch.library.custom_op("resfuse::gnconv_chain", mutates_args=())
def _gnconv_chain_op(fused: torch.Tensor, w_dw: Optional[torch.Tensor], b_dw: Optional[torch.Tensor],
                     gates: Optional[torch.Tensor], w_pws: List[torch.Tensor], b_pws: List[Optional[torch.Tensor]],
                     w_out: torch.Tensor, b_out: Optional[torch.Tensor], scale: float,
                     residual: Optional[torch.Tensor], layer_scale: Optional[torch.Tensor],
                     sample_scale: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return gnconv_chain_impl(fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, residual, layer_scale,
                             sample_scale, backend)


@_gnconv_chain_op.register_fake
def _gnconv_chain_fake(fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, residual, layer_scale,
                       sample_scale, backend):
    p = make_chain_problem(fused, w_dw, b_dw, gates, w_pws, b_pws, w_out, b_out, scale, residual, layer_scale,
                           sample_scale)
    dispatch.validate_backend(backend)
    return torch.empty(p.out_shape, dtype=fused.dtype, device=fused.device,
                       memory_format=output_memory_format(fused))


# ----------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------

def layernorm_conv1x1(x, weight, bias=None, *, norm_weight=None, norm_bias=None, norm_eps=None,
                      epilogue_gelu: bool = False, backend: str = "auto"):
    """``conv1x1(LN_channels_first(x), weight, bias)`` in one kernel (no
    LayerNorm when ``norm_eps`` is None): a HorBlock's norm1 + proj_in.
    ``epilogue_gelu``: the exact GELU of that, in the same kernel (a
    HorBlock's norm2 + pwconv1 + act; ``gelu_conv1x1(prologue_gelu=False)``
    then takes the output as is). With ``epilogue_gelu`` the backward
    recomputes the pre-activation (one more forward GEMM, on the same
    backend) for GELU': differentiable, but the fusion is for inference."""
    dispatch.validate_backend(backend)
    return call(layernorm_conv1x1_impl, torch.ops.resfuse.layernorm_conv1x1, x, weight, bias, norm_weight,
                norm_bias, None if norm_eps is None else float(norm_eps), backend, bool(epilogue_gelu))


def gnconv_chain(fused, w_pws: Sequence, b_pws: Sequence, w_out, b_out=None, *, w_dw=None, b_dw=None, gates=None,
                 scale: float = 1.0, residual=None, layer_scale=None, sample_scale=None, backend: str = "auto"):
    """gnconv after proj_in in one kernel: depthwise conv (or given gates),
    bias, scale, the gated 1x1 chain, proj_out, and optionally
    ``residual + sample_scale[n] * layer_scale * y`` (sample_scale: drop
    path's per-sample multiplier, not differentiated)."""
    dispatch.validate_backend(backend)
    return call(gnconv_chain_impl, torch.ops.resfuse.gnconv_chain, fused, w_dw, b_dw, gates, list(w_pws),
                list(b_pws), w_out, b_out, float(scale), residual, layer_scale, sample_scale, backend)


def gnconv(x, w_in, b_in, w_dw, b_dw, w_pws: Sequence, b_pws: Sequence, w_out, b_out, scale: float = 1.0, *,
           norm_weight=None, norm_bias=None, norm_eps=None, residual=None, layer_scale=None, sample_scale=None,
           backend: str = "auto"):
    """HorNet's gnconv forward (``resfuse.reference.gnconv_reference``) in two
    kernels: ``layernorm_conv1x1`` then ``gnconv_chain``."""
    f = layernorm_conv1x1(x, w_in, b_in, norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps,
                          backend=backend)
    return gnconv_chain(f, w_pws, b_pws, w_out, b_out, w_dw=w_dw, b_dw=b_dw, scale=scale, residual=residual,
                        layer_scale=layer_scale, sample_scale=sample_scale, backend=backend)


def signature_reasons(device, dtype, order: int, backend: str):
    """(decision, None) or (None, BackendUnavailable) for both ops of a
    gnconv of this device/dtype/order (for ``explain``)."""
    sig = GnConvSignature(device, dtype, order)
    out = {}
    for op in (OP_PROJ, OP_CHAIN):
        try:
            out[op] = dispatch.plan(op, backend, sig)[0]
        except dispatch.BackendUnavailable as e:
            out[op] = e
    return out

