"""The op ``torch.ops.resfuse.bn_act_conv``: a pre-activation conv, with the
input BatchNorm and activation fused as a prologue of the conv.

    h = act_in(x * s_in + beta_in - mean_in * s_in),   s_in = gamma_in / sqrt(var_in + eps_in)
    y = act(conv(h, W, b) * s + beta - mean * s [+ residual])

i.e. BatchNorm2d (eval) -> activation -> Conv2d [-> BatchNorm2d] [(+ residual)]
[-> activation], the layer of DenseNet (``norm1 -> relu1 -> conv1 ->
norm2 -> relu2``), DPN (``BnActConv2d``) and pre-activation ResNets. The
output BN is optional (``bn_mean is None``: conv + bias). h never exists in
memory: the Triton kernel normalises and activates each input tile as it
loads it, and the conv's zero padding applies to h (a padded position
contributes 0, not act_in(shift_in)), as eager's Conv2d pads its input.
Both folds are computed from the live BN tensors at every call.

Implementations: ``triton`` (kernels/conv_bn_act.py with its prologue) and
``eager``; there is no CUDA C++ kernel for it yet (``auto`` says so in its
reasons and runs Triton or eager).
"""

import copy
import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch

from .. import dispatch
from ..activations import ACTIVATIONS, DEFAULT_NEGATIVE_SLOPE, activation_grad, check_negative_slope, get_activation
from .plans import PlanCache, direct_call_ok, tensor_keys
from .common import acc_dtype, check_tensor, conv_output_memory_format, pair
from .conv_bn_act import (WIDE_DTYPES, ConvBNActProblem, _eager_run, activate_, bn_param_grads, branch_grads,
                          conv_bn_act_eager, fold_bn, launch_triton_conv, make_problem, pre_activation,
                          resolve_padding, same_dtype, triton_check, triton_conv)

OP = "bn_act_conv"


@dataclass
class BNActConvProblem(ConvBNActProblem):
    in_mean: Optional[torch.Tensor] = None
    in_var: Optional[torch.Tensor] = None
    in_weight: Optional[torch.Tensor] = None
    in_bias: Optional[torch.Tensor] = None
    in_eps: float = 1e-5
    in_activation: str = "identity"
    in_negative_slope: float = DEFAULT_NEGATIVE_SLOPE

    def prologue(self, x: torch.Tensor) -> torch.Tensor:
        """(v, h): v = BN_in(x), h = act_in(v), in the accumulation dtype."""
        acc = acc_dtype(x.dtype)
        scale, shift = fold_bn(None, self.in_mean, self.in_var, self.in_weight, self.in_bias, self.in_eps,
                               x.shape[1], acc, x.device)
        v = x.to(acc) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return v, get_activation(self.in_activation).eager(v, self.in_negative_slope)


def make_bn_act_conv_problem(x, in_mean, in_var, in_weight, in_bias, in_eps, in_activation,
                             weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
                             stride, padding, dilation, groups, activation,
                             in_negative_slope=DEFAULT_NEGATIVE_SLOPE,
                             negative_slope=DEFAULT_NEGATIVE_SLOPE) -> BNActConvProblem:
    """Validate every argument; raise a clear error naming the bad one."""
    main = make_problem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual,
                        stride, padding, dilation, groups, activation, negative_slope)
    C = x.shape[1]
    if in_mean is None or in_var is None:
        raise ValueError("in_mean and in_var (the input BatchNorm's running statistics) are required")
    for t, name in ((in_mean, "in_mean"), (in_var, "in_var"), (in_weight, "in_weight"), (in_bias, "in_bias")):
        if t is not None:
            check_tensor(t, name, dims=1, device=x.device, shape=(C,))
    if not isinstance(in_eps, (int, float)) or in_eps < 0:
        raise ValueError(f"in_eps must be a non-negative float, got {in_eps!r}")
    try:
        get_activation(in_activation)
    except ValueError as e:
        raise ValueError(f"in_{e}") from None
    try:
        in_negative_slope = check_negative_slope(in_negative_slope)
    except (TypeError, ValueError) as e:
        raise type(e)(f"in_{e}") from None
    fields = {f.name: getattr(main, f.name) for f in dataclasses.fields(main)}
    return BNActConvProblem(**fields, in_mean=in_mean, in_var=in_var, in_weight=in_weight, in_bias=in_bias,
                            in_eps=float(in_eps), in_activation=in_activation,
                            in_negative_slope=in_negative_slope)


def bn_act_conv_eager(x, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, weight, bias, bn_mean,
                      bn_var, bn_weight, bn_bias, eps, residual, stride, padding, dilation, groups, activation,
                      in_negative_slope, negative_slope) -> torch.Tensor:
    """The eager implementation in float32/float64 on the op's arguments
    (after validation, or from the fused modules, as ``conv_bn_act_eager``):
    h = act_in(BN_in(x)) as eager computes it (``torch.batch_norm``, or the
    per-channel fold where the BN's vectors have another dtype; the
    activation in place), then ``conv_bn_act_eager`` on h."""
    if same_dtype(x.dtype, in_mean, in_var, in_weight, in_bias):
        h = torch.batch_norm(x, in_weight, in_bias, in_mean, in_var, False, 0.0, in_eps,
                             torch._C._get_cudnn_enabled())  # the flag F.batch_norm passes
    else:
        scale, shift = fold_bn(None, in_mean, in_var, in_weight, in_bias, in_eps, x.shape[1], x.dtype, x.device)
        h = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
    h = activate_(in_activation, h, in_negative_slope)
    return conv_bn_act_eager(h, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding,
                             dilation, groups, activation, negative_slope)


def _eager_run_preact(p: BNActConvProblem) -> torch.Tensor:
    """``bn_act_conv_eager`` in float32/float64; in 16-bit types the
    prologue in fp32 from the fold (as the kernel), then the conv problem
    on h."""
    x = p.x
    if x.dtype in WIDE_DTYPES:
        return bn_act_conv_eager(x, p.in_mean, p.in_var, p.in_weight, p.in_bias, p.in_eps, p.in_activation,
                                 p.weight, p.bias, p.bn_mean, p.bn_var, p.bn_weight, p.bn_bias, p.eps, p.residual,
                                 p.stride, p.padding, p.dilation, p.groups, p.activation, p.in_negative_slope,
                                 p.negative_slope)
    q = copy.copy(p)
    q.x = p.prologue(x)[1].to(x.dtype)
    return _eager_run(q)


def _triton_run(p: BNActConvProblem) -> torch.Tensor:
    return launch_triton_conv(p, prologue=(p.in_mean, p.in_var, p.in_weight, p.in_bias, p.in_eps,
                                           ACTIVATIONS[p.in_activation].triton_id, p.in_negative_slope))


dispatch.register(OP, "eager", lambda p: [], _eager_run_preact)
dispatch.register(OP, "triton", triton_check, _triton_run)
dispatch.register(OP, "cuda", lambda p: [], None)


_PLANS = PlanCache(OP)


def bn_act_conv_impl(x, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, weight, bias,
                     bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding, dilation, groups,
                     activation, backend, in_negative_slope=DEFAULT_NEGATIVE_SLOPE,
                     negative_slope=DEFAULT_NEGATIVE_SLOPE):
    """The implementation of ``torch.ops.resfuse.bn_act_conv`` (and of the
    direct path): validated and planned once per signature (a cached eager
    plan in float32/float64 runs ``bn_act_conv_eager``, a Triton plan
    ``triton_conv``, on the arguments as they are)."""
    key = (tensor_keys(x, in_mean, in_var, in_weight, in_bias, weight, bias, bn_mean, bn_var, bn_weight, bn_bias,
                       residual), in_eps, in_activation, eps, tuple(stride), tuple(padding), tuple(dilation), groups,
           activation, backend, in_negative_slope, negative_slope, dispatch.environment())
    plan = _PLANS.plans.get(key)
    if plan is None:
        p = make_bn_act_conv_problem(x, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, weight,
                                     bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding,
                                     dilation, groups, activation, in_negative_slope, negative_slope)
        p.launch_memo = {}
        return _PLANS.miss(key, backend, p, _derived, dispatch.decide(OP, backend, x.device, x.dtype, groups))
    decision, run, (out_shape, out_format, stride, padding, dilation, memo) = plan
    dispatch.record(decision)
    if run is _eager_run_preact and x.dtype in WIDE_DTYPES:
        return bn_act_conv_eager(x, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, weight, bias,
                                 bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding, dilation,
                                 groups, activation, in_negative_slope, negative_slope)
    if run is _triton_run:
        return triton_conv(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding,
                           dilation, activation, negative_slope, out_shape, out_format, memo,
                           prologue=(in_mean, in_var, in_weight, in_bias, in_eps, ACTIVATIONS[in_activation].triton_id,
                                     in_negative_slope))
    p = BNActConvProblem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, float(eps), residual,
                         stride, padding, dilation, groups, activation, out_shape, negative_slope,
                         out_format, in_mean, in_var, in_weight, in_bias, float(in_eps), in_activation,
                         in_negative_slope)
    p.launch_memo = memo
    return run(p)


def _derived(p: BNActConvProblem):
    return p.out_shape, p.out_format, p.stride, p.padding, p.dilation, p.launch_memo


@torch.library.custom_op("resfuse::bn_act_conv", mutates_args=())
def _bn_act_conv_op(
    x: torch.Tensor,
    in_mean: torch.Tensor, in_var: torch.Tensor, in_weight: Optional[torch.Tensor],
    in_bias: Optional[torch.Tensor], in_eps: float, in_activation: str,
    weight: torch.Tensor, bias: Optional[torch.Tensor],
    bn_mean: Optional[torch.Tensor], bn_var: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int,
    activation: str, backend: str,
    in_negative_slope: float = DEFAULT_NEGATIVE_SLOPE, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> torch.Tensor:
    return bn_act_conv_impl(x, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, weight, bias,
                            bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding, dilation,
                            groups, activation, backend, in_negative_slope, negative_slope)


@_bn_act_conv_op.register_fake
def _fake(x, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, weight, bias, bn_mean, bn_var,
          bn_weight, bn_bias, eps, residual, stride, padding, dilation, groups, activation, backend,
          in_negative_slope=DEFAULT_NEGATIVE_SLOPE, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    p = make_bn_act_conv_problem(x, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, weight, bias,
                                 bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding, dilation,
                                 groups, activation, in_negative_slope, negative_slope)
    dispatch.validate_backend(backend)
    return torch.empty(p.out_shape, dtype=x.dtype, device=x.device,
                       memory_format=conv_output_memory_format(x, weight))


_IN = ("x", "in_mean", "in_var", "in_weight", "in_bias")
_MAIN = ("weight", "bias", "bn_mean", "bn_var", "bn_weight", "bn_bias")


def _setup_context(ctx, inputs, output):
    (x, in_mean, in_var, in_weight, in_bias, in_eps, in_activation, weight, bias, bn_mean, bn_var,
     bn_weight, bn_bias, eps, residual, stride, padding, dilation, groups, activation, backend,
     in_negative_slope, negative_slope) = inputs
    ctx.save_for_backward(x, in_mean, in_var, in_weight, in_bias, weight, bias, bn_mean, bn_var, bn_weight,
                          bn_bias, residual)
    ctx.conf = (in_eps, in_activation, in_negative_slope, eps, list(stride), list(padding), list(dilation),
                groups, activation, negative_slope)


def _backward(ctx, grad):
    """Explicit derivatives, eager: through the output activation and BN,
    the conv (onto h), the input activation and the input BN."""
    x, in_mean, in_var, in_weight, in_bias, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, residual = \
        ctx.saved_tensors
    in_eps, in_activation, in_slope, eps, stride, padding, dilation, groups, activation, slope = ctx.conf
    needs = ctx.needs_input_grad
    need = dict(zip(_IN, needs[0:5]))
    need.update(zip(_MAIN, needs[7:13]))
    p = BNActConvProblem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, residual, stride, padding,
                         dilation, groups, activation, tuple(grad.shape), slope, torch.contiguous_format,
                         in_mean, in_var, in_weight, in_bias, in_eps, in_activation, in_slope)
    v, h = p.prologue(x)
    h = h.to(x.dtype)
    z, u = pre_activation(p, h, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, residual)
    gu = activation_grad(activation, u, grad.to(u.dtype), slope)
    need_h = any(need[k] for k in _IN)
    main = branch_grads(gu, z, h, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, stride, padding,
                        dilation, groups, dict(need, x=need_h))
    g_in = dict.fromkeys(_IN)
    if need_h:
        gv = activation_grad(in_activation, v, main["x"].to(v.dtype), in_slope)
        bn = bn_param_grads(gv, x.to(v.dtype), in_mean, in_var, in_weight, in_bias, in_eps,
                            {"bn_" + k[3:]: need[k] for k in _IN[1:]})
        g_in.update({k: bn["bn_" + k[3:]] for k in _IN[1:]})
        if need["x"]:
            scale, _ = fold_bn(None, in_mean, in_var, in_weight, in_bias, in_eps, x.shape[1], v.dtype, x.device)
            g_in["x"] = (gv * scale.view(1, -1, 1, 1)).to(x.dtype)
    g_res = gu.to(residual.dtype) if needs[14] else None
    return (*(g_in[k] for k in _IN), None, None, *(main[k] for k in _MAIN), None, g_res,
            None, None, None, None, None, None, None, None)


_bn_act_conv_op.register_autograd(_backward, setup_context=_setup_context)


def bn_act_conv(x, weight, bias=None, *, in_mean, in_var, in_weight=None, in_bias=None, in_eps=1e-5,
                in_activation="relu", in_negative_slope=DEFAULT_NEGATIVE_SLOPE,
                bn_mean=None, bn_var=None, bn_weight=None, bn_bias=None, eps=1e-5, residual=None,
                stride=1, padding=0, dilation=1, groups=1, activation="identity",
                negative_slope=DEFAULT_NEGATIVE_SLOPE, backend="auto"):
    """``act(BN(conv2d(act_in(BN_in(x)), weight, bias)) [+ residual])`` in one
    kernel; the output BN (``bn_*``) and activation are optional. Arguments
    as ``resfuse.conv_bn_act``; ``in_*`` describe the BatchNorm (running
    statistics, per input channel) and activation before the conv."""
    dispatch.validate_backend(backend)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor (K, C/groups, R, S), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    dilation = pair(dilation, "dilation")
    args = (x, in_mean, in_var, in_weight, in_bias, float(in_eps), in_activation, weight, bias,
            bn_mean, bn_var, bn_weight, bn_bias, float(eps), residual, pair(stride, "stride"),
            resolve_padding(padding, weight.shape[2:], dilation), dilation, int(groups), activation, backend,
            check_negative_slope(in_negative_slope), check_negative_slope(negative_slope))
    if direct_call_ok(x, in_mean, in_var, in_weight, in_bias, weight, bias, bn_mean, bn_var, bn_weight,
                      bn_bias, residual):
        return bn_act_conv_impl(*args)
    return torch.ops.resfuse.bn_act_conv(*args)
