"""The op ``torch.ops.resfuse.conv_bn_act``: schema, validation, dispatch,
fake kernel and autograd.

    y = act(conv(x, W, b) * s + beta - mean * s [+ residual]),  s = gamma / sqrt(var + eps)

(``act`` one of ``resfuse.activations.ACTIVATIONS``; ``negative_slope``,
the schema's optional last argument, is LeakyReLU's slope)

i.e. Conv2d -> BatchNorm2d (eval, running statistics) -> (+ residual) ->
activation. Without BN (``bn_mean is None``) it is conv + bias (+ residual)
-> activation. The BN fold is computed from the live BN tensors at every
call (in the Triton kernel's epilogue, or as per-channel vectors on the
eager path), so there is no folded copy of the weights that could go stale.

Implementations (see ``resfuse.dispatch``): ``triton`` (kernels/
conv_bn_act.py), ``cuda`` (resfuse._C, when built with a kernel for it) and
``eager`` (plain PyTorch, any dtype/groups/device).
"""

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import dispatch
from .._backends import conv_allows_tf32, cuda_reasons, kernels_module, triton_reasons
from ..activations import (ACTIVATIONS, DEFAULT_NEGATIVE_SLOPE, activation_grad, check_negative_slope,
                          get_activation)
from .plans import PlanCache, direct_call_ok, tensor_keys
from .common import (FLOAT_DTYPES, OnInput, acc_dtype, alloc_output, check_tensor, conv_output_memory_format,
                     empty_output, pair)

OP = "conv_bn_act"
#: The dtypes the eager implementations compute in as they are (16-bit ones go through fp32).
WIDE_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------
# Validation (shared by the real and the fake kernel)
# ----------------------------------------------------------------------------

@dataclass
class ConvBNActProblem(OnInput):  # device, dtype: x's
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    bn_mean: Optional[torch.Tensor]
    bn_var: Optional[torch.Tensor]
    bn_weight: Optional[torch.Tensor]
    bn_bias: Optional[torch.Tensor]
    eps: float
    residual: Optional[torch.Tensor]
    stride: List[int]
    padding: List[int]
    dilation: List[int]
    groups: int
    activation: str
    out_shape: Tuple[int, int, int, int]
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE   # leaky_relu's; the other activations ignore it
    out_format: torch.memory_format = torch.contiguous_format  # conv_output_memory_format(x, weight)
    #: The launcher's memo for this problem's signature (``kernels.conv_bn_act.conv_bn_act_fwd``),
    #: kept by the cached plan; None: prepare the launch afresh.
    launch_memo: ClassVar[Optional[dict]] = None

    def act(self, t: torch.Tensor) -> torch.Tensor:
        return get_activation(self.activation).eager(t, self.negative_slope)



def make_problem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
                 stride, padding, dilation, groups, activation,
                 negative_slope=DEFAULT_NEGATIVE_SLOPE) -> ConvBNActProblem:
    """Validate every argument; raise a clear error naming the bad one."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    dev = x.device
    check_tensor(weight, "weight", dims=4, device=dev, dtype=x.dtype)
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    if C == 0:
        # F.conv2d answers a 0-channel input with a 0-channel output whatever
        # weight says; the backends would disagree with it and each other.
        raise ValueError(f"x has 0 channels (shape {tuple(x.shape)}); conv_bn_act needs C >= 1")
    if K == 0:
        # As F.conv2d, which refuses it ("expected weight to be at least 1 at dimension 0").
        raise ValueError(f"weight has 0 output channels (shape {tuple(weight.shape)}); conv_bn_act needs K >= 1")
    if Cg * groups != C:
        raise ValueError(f"x has {C} channels but weight of shape {tuple(weight.shape)} with groups={groups} "
                         f"expects {Cg * groups}")
    if K % groups != 0:
        raise ValueError(f"weight has {K} output channels, not divisible by groups={groups}")
    if bias is not None:
        check_tensor(bias, "bias", dims=1, device=dev, dtype=x.dtype, shape=(K,))
    if (bn_mean is None) != (bn_var is None):
        raise ValueError("bn_mean and bn_var must be given together (both or neither)")
    if bn_mean is None and (bn_weight is not None or bn_bias is not None):
        raise ValueError("bn_weight/bn_bias given without bn_mean/bn_var")
    for t, name in ((bn_mean, "bn_mean"), (bn_var, "bn_var"), (bn_weight, "bn_weight"), (bn_bias, "bn_bias")):
        if t is not None:
            check_tensor(t, name, dims=1, device=dev, shape=(K,))
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    get_activation(activation)
    negative_slope = check_negative_slope(negative_slope)
    hp, wp = H + 2 * padding[0], W + 2 * padding[1]
    rd, sd = dilation[0] * (R - 1) + 1, dilation[1] * (S - 1) + 1
    if hp < rd or wp < sd:
        raise ValueError(f"x of spatial size {H}x{W} (padded to {hp}x{wp}) is smaller than the "
                         f"kernel {R}x{S} dilated to {rd}x{sd}")
    P, Q = (hp - rd) // stride[0] + 1, (wp - sd) // stride[1] + 1
    out_shape = (N, K, P, Q)
    if residual is not None:
        check_tensor(residual, "residual", dims=4, device=dev, dtype=x.dtype, shape=out_shape)
    return ConvBNActProblem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, float(eps), residual,
                            stride, padding, dilation, groups, activation, out_shape, negative_slope,
                            conv_output_memory_format(x, weight))


# ----------------------------------------------------------------------------
# BN fold as per-channel vectors (eager path and backward)
# ----------------------------------------------------------------------------

def fold_bn(bias, bn_mean, bn_var, bn_weight, bn_bias, eps, out_channels, dtype, device):
    """Per-channel (scale, shift) with ``BN(conv(x) + bias) = conv(x) * scale + shift``.
    scale is None without BN."""
    b = bias.to(dtype) if bias is not None else None
    if bn_mean is None:
        shift = b if b is not None else torch.zeros(out_channels, dtype=dtype, device=device)
        return None, shift
    scale = torch.rsqrt(bn_var.to(dtype) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dtype)
    centered = -bn_mean.to(dtype) if b is None else b - bn_mean.to(dtype)
    shift = centered * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dtype)
    return scale, shift


def pre_activation(p: ConvBNActProblem, x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, residual):
    """u = conv(x, W) * scale + shift (+ residual), in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    z = F.conv2d(x, weight, None, p.stride, p.padding, p.dilation, p.groups).to(acc)
    scale, shift = fold_bn(bias, bn_mean, bn_var, bn_weight, bn_bias, p.eps, weight.shape[0], acc, x.device)
    u = z * scale.view(1, -1, 1, 1) if scale is not None else z
    u = u + shift.view(1, -1, 1, 1)
    if residual is not None:
        u = u + residual.to(acc)
    return z, u


def conv_bn(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, stride, padding, dilation,
            groups) -> torch.Tensor:
    """``BN(conv(x, W, b))`` in float32/float64, as a new tensor (the eager
    implementations' main part; without BN, conv + bias). The BN runs as
    eager runs it (``torch.batch_norm`` on the conv output: one op, the
    original modules' rounding) unless the output has many pixels per
    weight row: then it is folded into this call's conv weight and bias (a
    pass over the weight instead of one over the larger output; "many":
    N*H*W/stride^2, about N*P*Q, at least 4 * C/groups * R * S)."""
    if bn_mean is None:
        return torch.conv2d(x, weight, bias, stride, padding, dilation, groups)
    K, Cg, R, S = weight.shape
    if (x.shape[0] * x.shape[2] * x.shape[3] < 4 * Cg * R * S * stride[0] * stride[1]
            and same_dtype(x.dtype, bn_mean, bn_var, bn_weight, bn_bias)):
        y = torch.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return torch.batch_norm(y, bn_weight, bn_bias, bn_mean, bn_var, False, 0.0, eps,
                                torch._C._get_cudnn_enabled())  # the flag F.batch_norm passes
    if bn_mean.shape != (K,):  # the fold would broadcast it; eager's batch_norm raises
        raise ValueError(f"bn_mean must have shape ({K},) (the conv's output channels), got {tuple(bn_mean.shape)}")
    scale, shift = fold_bn(bias, bn_mean, bn_var, bn_weight, bn_bias, eps, K, x.dtype, x.device)
    return torch.conv2d(x, weight * scale.view(-1, 1, 1, 1), shift, stride, padding, dilation, groups)


def activate_(activation: str, y: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """`activation` of `y`: ReLU in place where autograd does not record
    `y`. Where it does, every activation is out of place and saves its
    input, not its output (ReLU as ``threshold(y, 0, 0)``), so a caller
    that modifies the result in place (an idempotent ReLU after a fused
    head, ``nn.ReLU(inplace=True)``) leaves the gradient intact."""
    if activation == "relu":
        return torch.relu_(y) if not y.requires_grad else torch.threshold(y, 0.0, 0.0)
    return get_activation(activation).eager(y, negative_slope)


def conv_bn_act_eager(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding,
                      dilation, groups, activation, negative_slope) -> torch.Tensor:
    """The eager implementation in float32/float64 on the op's arguments:
    ``conv_bn`` (+ residual, in place), the activation (in place where it
    can). It runs below autograd or with no gradient to record, so the
    in-place steps are safe. The op calls it after validation; the fused
    modules' eager path (``nn._call``) calls it with their children's own
    tensors, where anything wrong raises what those children's ops raise."""
    y = conv_bn(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, stride, padding, dilation, groups)
    if residual is not None:
        y.add_(residual)
    return activate_(activation, y, negative_slope)


def _eager_run(p: ConvBNActProblem) -> torch.Tensor:
    """The eager implementation: ``conv_bn_act_eager`` in float32/float64;
    in 16-bit types the affine runs in fp32 on the conv output, as the
    kernels do."""
    if p.x.dtype in WIDE_DTYPES:
        return conv_bn_act_eager(p.x, p.weight, p.bias, p.bn_mean, p.bn_var, p.bn_weight, p.bn_bias, p.eps,
                                 p.residual, p.stride, p.padding, p.dilation, p.groups, p.activation,
                                 p.negative_slope)
    _, u = pre_activation(p, p.x, p.weight, p.bias, p.bn_mean, p.bn_var, p.bn_weight, p.bn_bias, p.residual)
    return p.act(u).to(p.x.dtype).contiguous(memory_format=p.out_format)


def same_dtype(dtype, *vectors) -> bool:
    """Whether every given vector has `dtype` (torch.batch_norm on CPU needs it)."""
    for t in vectors:
        if t is not None and t.dtype != dtype:
            return False
    return True


def triton_check(sig) -> List[str]:
    """Why the Triton conv kernel cannot run a problem of signature `sig`
    (a ``dispatch.Signature``; any op built on the kernel)."""
    reasons = triton_reasons(sig.device, sig.dtype)
    if sig.groups != 1:
        reasons.append(f"groups={sig.groups}: the Triton kernel implements groups=1 only")
    return reasons


#: Per-call repacks to channels_last on the Triton conv path, by operand
#: ("x", "weight", "xs", "wd"); resfuse.inspect reports them.
REPACKS: Counter = Counter()


def channels_last(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` with channels innermost (NHWC / OHWI strides): itself when it
    already is, else a copy (counted in ``REPACKS``). The Triton conv
    kernel's operand tiles are then rows of contiguous channels, which it
    loads with 16-byte async copies. ``resfuse.convert`` lays weights out
    so once where the kernels read them (``channels_last_weights``: by
    default the weights on CUDA, now or when moved there); with them an
    NCHW model input is copied once, at the first fused conv (its output is
    channels_last, by eager's rule for a channels_last weight)."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return t
    REPACKS[what] += 1
    return t.contiguous(memory_format=torch.channels_last)


def launch_triton_conv(p: ConvBNActProblem, projection=None, prologue=None) -> torch.Tensor:
    """``triton_conv`` on problem `p` (`projection` / `prologue` as there)."""
    return triton_conv(p.x, p.weight, p.bias, p.bn_mean, p.bn_var, p.bn_weight, p.bn_bias, p.eps, p.residual,
                       p.stride, p.padding, p.dilation, p.activation, p.negative_slope, p.out_shape, p.out_format,
                       p.launch_memo, projection, prologue)


def triton_conv(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding, dilation,
                activation, negative_slope, out_shape, out_format, memo, projection=None,
                prologue=None) -> torch.Tensor:
    """Run the Triton conv kernel into a fresh `out_shape` output of
    `out_format` (a validated problem's arguments, as a cached plan holds
    them: no problem object is built per call); `projection` (xs, wd,
    bias_d, mean_d, var_d, gamma_d, beta_d, eps_d, stride_d) and `prologue`
    (the launcher's) select its optional epilogue and prologue; `memo`: the
    plan's launch memo. x, the weights and a projection's xs/wd reach the
    kernel channels_last (``channels_last``: a per-call copy of an operand
    that is not; slower, see ``resfuse.convert``'s ``channels_last_weights``).
    On CUDA the launch runs under x's device only when it is not already
    the current one."""
    kern = kernels_module("conv_bn_act")
    out = empty_output(out_shape, x, out_format)
    if projection is not None:
        projection = (channels_last(projection[0], "xs"), channels_last(projection[1], "wd"),
                      *projection[2:])
    args = (channels_last(x, "x"), channels_last(weight, "weight"), bias, bn_mean, bn_var, bn_weight, bn_bias, eps,
            residual, stride, padding, dilation, ACTIVATIONS[activation].triton_id, negative_slope, out)
    if not x.is_cuda:
        return kern.conv_bn_act_fwd(*args, allow_tf32=False, projection=projection, prologue=prologue, memo=memo)
    index = x.get_device()
    if index == torch.cuda.current_device():
        return kern.conv_bn_act_fwd(*args, allow_tf32=conv_allows_tf32(), projection=projection, prologue=prologue,
                                    memo=memo)
    with torch.cuda.device(index):
        return kern.conv_bn_act_fwd(*args, allow_tf32=conv_allows_tf32(), projection=projection, prologue=prologue,
                                    memo=memo)


def cuda_check_of(op: str):
    """The check of resfuse._C's conv kernel for `op` (conv_bn_act or
    conv_bn_proj_act): why it cannot run a problem of that signature."""
    def cuda_check(sig) -> List[str]:
        reasons = cuda_reasons(op, sig.device, sig.dtype)
        if sig.groups != 1:
            reasons.append(f"groups={sig.groups}: the CUDA kernel implements groups=1 only")
        return reasons
    return cuda_check


def _cuda_run(p: ConvBNActProblem) -> torch.Tensor:
    out = alloc_output(p, p.out_format)
    with torch.cuda.device(p.device):
        torch.ops.resfuse_cuda.conv_bn_act(p.x, p.weight, p.bias, p.bn_mean, p.bn_var, p.bn_weight, p.bn_bias,
                                           p.eps, p.residual, p.stride, p.padding, p.dilation, p.groups,
                                           ACTIVATIONS[p.activation].triton_id, p.negative_slope,
                                           conv_allows_tf32(), out)
    return out


dispatch.register(OP, "eager", lambda p: [], _eager_run)
dispatch.register(OP, "triton", triton_check, launch_triton_conv)
dispatch.register(OP, "cuda", cuda_check_of(OP), _cuda_run)


# ----------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------

_PLANS = PlanCache(OP)


def conv_bn_act_impl(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
                     stride, padding, dilation, groups, activation, backend,
                     negative_slope=DEFAULT_NEGATIVE_SLOPE):
    """The implementation of ``torch.ops.resfuse.conv_bn_act`` (and of the
    direct path, ``ops.plans``): validated and planned once per signature;
    a cached plan on the eager backend in float32/float64 runs
    ``conv_bn_act_eager``, on Triton ``triton_conv``, on the arguments as
    they are."""
    key = (tensor_keys(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, residual), eps, tuple(stride),
           tuple(padding), tuple(dilation), groups, activation, backend, negative_slope, dispatch.environment())
    plan = _PLANS.plans.get(key)
    if plan is None:
        p = make_problem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
                         stride, padding, dilation, groups, activation, negative_slope)
        p.launch_memo = {}
        return _PLANS.miss(key, backend, p, _derived, dispatch.decide(OP, backend, x.device, x.dtype, groups))
    decision, run, (out_shape, out_format, stride, padding, dilation, memo) = plan
    dispatch.record(decision)
    if run is _eager_run and x.dtype in WIDE_DTYPES:
        return conv_bn_act_eager(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride,
                                 padding, dilation, groups, activation, negative_slope)
    if run is launch_triton_conv:
        return triton_conv(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding,
                           dilation, activation, negative_slope, out_shape, out_format, memo)
    p = ConvBNActProblem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, float(eps), residual,
                         stride, padding, dilation, groups, activation, out_shape, negative_slope, out_format)
    p.launch_memo = memo
    return run(p)


def _derived(p: ConvBNActProblem):
    """What a cached plan keeps of a validated problem (no tensors)."""
    return p.out_shape, p.out_format, p.stride, p.padding, p.dilation, p.launch_memo


@torch.library.custom_op("resfuse::conv_bn_act", mutates_args=())
def _conv_bn_act_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    bn_mean: Optional[torch.Tensor],
    bn_var: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    activation: str,
    backend: str,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> torch.Tensor:
    return conv_bn_act_impl(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
                            stride, padding, dilation, groups, activation, backend, negative_slope)


@_conv_bn_act_op.register_fake
def _conv_bn_act_fake(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
                      stride, padding, dilation, groups, activation, backend,
                      negative_slope=DEFAULT_NEGATIVE_SLOPE):
    p = make_problem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
                     stride, padding, dilation, groups, activation, negative_slope)
    dispatch.validate_backend(backend)
    return torch.empty(p.out_shape, dtype=x.dtype, device=x.device,
                       memory_format=conv_output_memory_format(x, weight))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
     stride, padding, dilation, groups, activation, backend, negative_slope) = inputs
    ctx.save_for_backward(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, residual)
    ctx.conf = (eps, list(stride), list(padding), list(dilation), groups, activation, negative_slope)


def branch_grads(gu, z, x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps,
                 stride, padding, dilation, groups, need) -> dict:
    """Gradients of one conv + BN branch given gu = dL/du, where
    u = z*s + beta + (b - mean)*s (+ other terms), z = conv(x, W),
    s = gamma*rsqrt(var+eps). `need` maps argument names to booleans;
    returns a dict with a gradient (or None) per name."""
    acc = gu.dtype
    scale, _ = fold_bn(bias, bn_mean, bn_var, bn_weight, bn_bias, eps, weight.shape[0], acc, x.device)
    gz = gu * scale.view(1, -1, 1, 1) if scale is not None else gu
    out = dict.fromkeys(("x", "weight", "bias", "bn_mean", "bn_var", "bn_weight", "bn_bias"))
    if need.get("x") or need.get("weight"):
        out["x"], out["weight"], _ = torch.ops.aten.convolution_backward(
            gz.to(x.dtype), x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [bool(need.get("x")), bool(need.get("weight")), False])
    if bn_mean is None:
        if need.get("bias"):
            out["bias"] = gu.sum(dim=(0, 2, 3)).to(bias.dtype)
        return out
    centered = z if bias is None else z + bias.to(acc).view(1, -1, 1, 1)
    out.update(bn_param_grads(gu, centered, bn_mean, bn_var, bn_weight, bn_bias, eps, need))
    if need.get("bias"):
        out["bias"] = (gu.sum(dim=(0, 2, 3)) * scale).to(bias.dtype)
    return out


def bn_param_grads(gv, t, bn_mean, bn_var, bn_weight, bn_bias, eps, need) -> dict:
    """Gradients of v = (t - mean) * gamma * rsqrt(var + eps) + beta with
    respect to the BN's vectors, given gv = dL/dv (channels on dim 1).
    Keys: bn_mean, bn_var, bn_weight, bn_bias (None unless `need` asks)."""
    acc = gv.dtype
    rstd = torch.rsqrt(bn_var.to(acc) + eps)
    gamma = bn_weight.to(acc) if bn_weight is not None else torch.ones_like(rstd)
    s = gamma * rstd
    sum_gv = gv.sum(dim=(0, 2, 3))
    out = dict.fromkeys(("bn_mean", "bn_var", "bn_weight", "bn_bias"))
    if need.get("bn_bias"):
        out["bn_bias"] = sum_gv.to(bn_bias.dtype)
    if need.get("bn_mean"):
        out["bn_mean"] = (-sum_gv * s).to(bn_mean.dtype)
    if need.get("bn_weight") or need.get("bn_var"):
        gs = (gv * (t - bn_mean.to(acc).view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
        if need.get("bn_weight"):
            out["bn_weight"] = (gs * rstd).to(bn_weight.dtype)
        if need.get("bn_var"):
            out["bn_var"] = (gs * gamma * -0.5 * rstd ** 3).to(bn_var.dtype)
    return out


def _backward(ctx, grad):
    """Explicit derivatives, eager (training kernels are a later step)."""
    x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, residual = ctx.saved_tensors
    eps, stride, padding, dilation, groups, activation, negative_slope = ctx.conf
    need = dict(zip(("x", "weight", "bias", "bn_mean", "bn_var", "bn_weight", "bn_bias", "eps",
                     "residual"), ctx.needs_input_grad[:9]))
    p = ConvBNActProblem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
                         stride, padding, dilation, groups, activation, tuple(grad.shape))
    z, u = pre_activation(p, x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, residual)
    gu = activation_grad(activation, u, grad.to(u.dtype), negative_slope)
    out = branch_grads(gu, z, x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps,
                       stride, padding, dilation, groups, need)
    g_res = gu.to(residual.dtype) if need["residual"] else None
    return (out["x"], out["weight"], out["bias"], out["bn_mean"], out["bn_var"], out["bn_weight"],
            out["bn_bias"], None, g_res, None, None, None, None, None, None, None)


_conv_bn_act_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Python entry point
# ----------------------------------------------------------------------------

PaddingArg = Union[int, Sequence[int], str]


def resolve_padding(padding: PaddingArg, kernel_size: Sequence[int], dilation: Sequence[int]) -> List[int]:
    """Conv2d's padding, including the strings 'valid' and 'same' (the latter
    only where it is symmetric, as the kernel pads both sides equally)."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError(f"padding='same' with kernel {tuple(kernel_size)} and dilation "
                                 f"{tuple(dilation)} pads asymmetrically, which conv_bn_act does not")
            return [t // 2 for t in total]
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    return pair(padding, "padding")


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    bn_mean: Optional[torch.Tensor] = None,
    bn_var: Optional[torch.Tensor] = None,
    bn_weight: Optional[torch.Tensor] = None,
    bn_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    stride=1,
    padding: PaddingArg = 0,
    dilation=1,
    groups: int = 1,
    activation: str = "identity",
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    backend: str = "auto",
) -> torch.Tensor:
    """``act(BN_eval(conv2d(x, weight, bias)) [+ residual])`` in one kernel.

    Arguments mirror ``F.conv2d`` and ``F.batch_norm`` (running statistics);
    stride/padding/dilation take an int or a pair, padding also 'valid' or
    'same'. ``activation`` is one of ``resfuse.activations.ACTIVATIONS``;
    ``negative_slope`` is leaky_relu's slope (ignored by the others).
    ``backend`` is 'auto', 'triton', 'cuda' or 'eager'.
    """
    dispatch.validate_backend(backend)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor (K, C/groups, R, S), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    dilation = pair(dilation, "dilation")
    padding = resolve_padding(padding, weight.shape[2:], dilation)
    args = (x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, float(eps), residual,
            pair(stride, "stride"), padding, dilation, int(groups), activation, backend,
            check_negative_slope(negative_slope))
    if direct_call_ok(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, residual):
        return conv_bn_act_impl(*args)
    return torch.ops.resfuse.conv_bn_act(*args)
