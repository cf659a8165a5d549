"""The op ``torch.ops.resfuse.conv_bn_proj_act``: the last conv of a ResNet
block with a projection shortcut, in one kernel.

    y = act( BN(conv(x, W, b)) + BN_d(conv1x1(xs, W_d, b_d, stride_d)) )

The shortcut (1x1 strided conv + BN) is computed inside the same kernel as
a second accumulation over the strided block input, so its output is never
written to memory. Both BN folds are computed from the live BN tensors at
every call.
"""

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch

from .. import dispatch
from .._backends import conv_allows_tf32
from ..activations import DEFAULT_NEGATIVE_SLOPE, activation_grad, check_negative_slope
from .plans import PlanCache, direct_call_ok, tensor_keys
from .common import alloc_output, check_tensor, conv_output_memory_format, pair
from .conv_bn_act import (ACTIVATIONS, WIDE_DTYPES, ConvBNActProblem, activate_, branch_grads, conv_bn,
                          cuda_check_of, launch_triton_conv, make_problem, pre_activation, triton_check,
                          triton_conv)

OP = "conv_bn_proj_act"


@dataclass
class ConvBNProjProblem(ConvBNActProblem):
    xs: Optional[torch.Tensor] = None
    weight_d: Optional[torch.Tensor] = None
    bias_d: Optional[torch.Tensor] = None
    bn_mean_d: Optional[torch.Tensor] = None
    bn_var_d: Optional[torch.Tensor] = None
    bn_weight_d: Optional[torch.Tensor] = None
    bn_bias_d: Optional[torch.Tensor] = None
    eps_d: float = 1e-5
    stride_d: Optional[List[int]] = None

    def shortcut_problem(self) -> ConvBNActProblem:
        return ConvBNActProblem(self.xs, self.weight_d, self.bias_d, self.bn_mean_d, self.bn_var_d,
                                self.bn_weight_d, self.bn_bias_d, self.eps_d, None, self.stride_d, [0, 0],
                                [1, 1], 1, "identity", self.out_shape)


def make_proj_problem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps,
                      xs, weight_d, bias_d, bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, eps_d, stride_d,
                      stride, padding, dilation, groups, activation,
                      negative_slope=DEFAULT_NEGATIVE_SLOPE) -> ConvBNProjProblem:
    main = make_problem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, None,
                        stride, padding, dilation, groups, activation, negative_slope)
    if bn_mean is None:
        raise ValueError("conv_bn_proj_act needs the main BN (bn_mean/bn_var)")
    if not isinstance(xs, torch.Tensor) or xs.dim() != 4:
        raise ValueError(f"xs (the shortcut input) must be a 4-D tensor, got "
                         f"{tuple(xs.shape) if isinstance(xs, torch.Tensor) else type(xs).__name__}")
    check_tensor(xs, "xs", dims=4, device=x.device, dtype=x.dtype)
    K = weight.shape[0]
    check_tensor(weight_d, "weight_d", dims=4, device=x.device, dtype=x.dtype)
    if tuple(weight_d.shape) != (K, xs.shape[1], 1, 1):
        raise ValueError(f"weight_d must have shape {(K, xs.shape[1], 1, 1)} (a 1x1 conv from xs's "
                         f"{xs.shape[1]} channels to {K}), got {tuple(weight_d.shape)}")
    if bias_d is not None:
        check_tensor(bias_d, "bias_d", dims=1, device=x.device, dtype=x.dtype, shape=(K,))
    if bn_mean_d is None or bn_var_d is None:
        raise ValueError("bn_mean_d and bn_var_d (the shortcut's BN) are required")
    for t, name in ((bn_mean_d, "bn_mean_d"), (bn_var_d, "bn_var_d"), (bn_weight_d, "bn_weight_d"),
                    (bn_bias_d, "bn_bias_d")):
        if t is not None:
            check_tensor(t, name, dims=1, device=x.device, shape=(K,))
    stride_d = pair(stride_d, "stride_d")
    if min(stride_d) < 1:
        raise ValueError(f"stride_d must be >= 1, got {stride_d}")
    N, _, P, Q = main.out_shape
    ps, qs = (xs.shape[2] - 1) // stride_d[0] + 1, (xs.shape[3] - 1) // stride_d[1] + 1
    if xs.shape[0] != N or (ps, qs) != (P, Q):
        raise ValueError(f"xs of shape {tuple(xs.shape)} with stride_d {stride_d} gives a shortcut of "
                         f"{(xs.shape[0], K, ps, qs)}, but the main branch gives {main.out_shape}")
    fields = {f.name: getattr(main, f.name) for f in dataclasses.fields(main)}
    return ConvBNProjProblem(**fields, xs=xs, weight_d=weight_d, bias_d=bias_d, bn_mean_d=bn_mean_d,
                             bn_var_d=bn_var_d, bn_weight_d=bn_weight_d, bn_bias_d=bn_bias_d,
                             eps_d=float(eps_d), stride_d=stride_d)


def _pre_activations(p: ConvBNProjProblem):
    z, u = pre_activation(p, p.x, p.weight, p.bias, p.bn_mean, p.bn_var, p.bn_weight, p.bn_bias, None)
    sp = p.shortcut_problem()
    zd, ud = pre_activation(sp, p.xs, p.weight_d, p.bias_d, p.bn_mean_d, p.bn_var_d, p.bn_weight_d,
                            p.bn_bias_d, None)
    return z, zd, u + ud


def conv_bn_proj_act_eager(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, xs, weight_d, bias_d,
                           bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, eps_d, stride_d, stride, padding, dilation,
                           groups, activation, negative_slope) -> torch.Tensor:
    """The eager implementation in float32/float64 on the op's arguments:
    both branches with ``conv_bn``, the sum and the activation in place (as
    ``conv_bn_act_eager``: after validation, or from the fused modules)."""
    y = conv_bn(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, stride, padding, dilation, groups)
    y.add_(conv_bn(xs, weight_d, bias_d, bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, eps_d, stride_d, (0, 0),
                   (1, 1), 1))
    return activate_(activation, y, negative_slope)


def _eager_run(p: ConvBNProjProblem) -> torch.Tensor:
    """``conv_bn_proj_act_eager`` in float32/float64, else in fp32 from the
    pre-activations."""
    if p.x.dtype in WIDE_DTYPES:
        return conv_bn_proj_act_eager(p.x, p.weight, p.bias, p.bn_mean, p.bn_var, p.bn_weight, p.bn_bias, p.eps,
                                      p.xs, p.weight_d, p.bias_d, p.bn_mean_d, p.bn_var_d, p.bn_weight_d,
                                      p.bn_bias_d, p.eps_d, p.stride_d, p.stride, p.padding, p.dilation, p.groups,
                                      p.activation, p.negative_slope)
    _, _, u = _pre_activations(p)
    return p.act(u).to(p.x.dtype).contiguous(memory_format=p.out_format)


def _triton_run(p: ConvBNProjProblem) -> torch.Tensor:
    return launch_triton_conv(p, projection=(p.xs, p.weight_d, p.bias_d, p.bn_mean_d, p.bn_var_d,
                                             p.bn_weight_d, p.bn_bias_d, p.eps_d, p.stride_d))


def _cuda_run(p: ConvBNProjProblem) -> torch.Tensor:
    out = alloc_output(p, p.out_format)
    with torch.cuda.device(p.device):
        torch.ops.resfuse_cuda.conv_bn_proj_act(
            p.x, p.weight, p.bias, p.bn_mean, p.bn_var, p.bn_weight, p.bn_bias, p.eps,
            p.xs, p.weight_d, p.bias_d, p.bn_mean_d, p.bn_var_d, p.bn_weight_d, p.bn_bias_d, p.eps_d, p.stride_d,
            p.stride, p.padding, p.dilation, p.groups, ACTIVATIONS[p.activation].triton_id, p.negative_slope,
            conv_allows_tf32(), out)
    return out


dispatch.register(OP, "eager", lambda p: [], _eager_run)
dispatch.register(OP, "triton", triton_check, _triton_run)
dispatch.register(OP, "cuda", cuda_check_of(OP), _cuda_run)


_PLANS = PlanCache(OP)


def conv_bn_proj_act_impl(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, xs, weight_d, bias_d,
                          bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, eps_d, stride_d,
                          stride, padding, dilation, groups, activation, backend,
                          negative_slope=DEFAULT_NEGATIVE_SLOPE):
    """The implementation of ``torch.ops.resfuse.conv_bn_proj_act`` (and of
    the direct path): validated and planned once per signature (a cached
    eager plan in float32/float64 runs ``conv_bn_proj_act_eager``, a Triton
    plan ``triton_conv``, on the arguments as they are)."""
    key = (tensor_keys(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, xs, weight_d, bias_d, bn_mean_d,
                       bn_var_d, bn_weight_d, bn_bias_d), eps, eps_d, tuple(stride_d), tuple(stride), tuple(padding),
           tuple(dilation), groups, activation, backend, negative_slope, dispatch.environment())
    plan = _PLANS.plans.get(key)
    if plan is None:
        p = make_proj_problem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, xs, weight_d, bias_d,
                              bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, eps_d, stride_d,
                              stride, padding, dilation, groups, activation, negative_slope)
        p.launch_memo = {}
        return _PLANS.miss(key, backend, p, _derived, dispatch.decide(OP, backend, x.device, x.dtype, groups))
    decision, run, (out_shape, out_format, stride, padding, dilation, stride_d, memo) = plan
    dispatch.record(decision)
    if run is _eager_run and x.dtype in WIDE_DTYPES:
        return conv_bn_proj_act_eager(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, xs, weight_d,
                                      bias_d, bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, eps_d, stride_d, stride,
                                      padding, dilation, groups, activation, negative_slope)
    if run is _triton_run:
        return triton_conv(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, None, stride, padding,
                           dilation, activation, negative_slope, out_shape, out_format, memo,
                           projection=(xs, weight_d, bias_d, bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, eps_d,
                                       stride_d))
    p = ConvBNProjProblem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, float(eps), None,
                          stride, padding, dilation, groups, activation, out_shape, negative_slope,
                          out_format, xs, weight_d, bias_d, bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d,
                          float(eps_d), stride_d)
    p.launch_memo = memo
    return run(p)


def _derived(p: ConvBNProjProblem):
    return p.out_shape, p.out_format, p.stride, p.padding, p.dilation, p.stride_d, p.launch_memo


@torch.library.custom_op("resfuse::conv_bn_proj_act", mutates_args=())
def _conv_bn_proj_act_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    bn_mean: torch.Tensor, bn_var: torch.Tensor, bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor], eps: float,
    xs: torch.Tensor, weight_d: torch.Tensor, bias_d: Optional[torch.Tensor],
    bn_mean_d: torch.Tensor, bn_var_d: torch.Tensor, bn_weight_d: Optional[torch.Tensor],
    bn_bias_d: Optional[torch.Tensor], eps_d: float, stride_d: List[int],
    stride: List[int], padding: List[int], dilation: List[int], groups: int,
    activation: str, backend: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> torch.Tensor:
    return conv_bn_proj_act_impl(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, xs, weight_d,
                                 bias_d, bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, eps_d, stride_d,
                                 stride, padding, dilation, groups, activation, backend, negative_slope)


@_conv_bn_proj_act_op.register_fake
def _fake(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, xs, weight_d, bias_d, bn_mean_d,
          bn_var_d, bn_weight_d, bn_bias_d, eps_d, stride_d, stride, padding, dilation, groups, activation,
          backend, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    p = make_proj_problem(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, xs, weight_d, bias_d,
                          bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, eps_d, stride_d,
                          stride, padding, dilation, groups, activation, negative_slope)
    dispatch.validate_backend(backend)
    return torch.empty(p.out_shape, dtype=x.dtype, device=x.device,
                       memory_format=conv_output_memory_format(x, weight))


_MAIN = ("x", "weight", "bias", "bn_mean", "bn_var", "bn_weight", "bn_bias")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0:7], *inputs[8:15])
    ctx.conf = (inputs[7], inputs[15], list(inputs[16]), list(inputs[17]), list(inputs[18]),
                list(inputs[19]), inputs[20], inputs[21], inputs[23])


def _backward(ctx, grad):
    t = ctx.saved_tensors
    eps, eps_d, stride_d, stride, padding, dilation, groups, activation, negative_slope = ctx.conf
    p = ConvBNProjProblem(*t[0:7], eps, None, stride, padding, dilation, groups, activation, tuple(grad.shape),
                          negative_slope, torch.contiguous_format, *t[7:14], eps_d, stride_d)
    z, zd, u = _pre_activations(p)
    gu = activation_grad(activation, u, grad.to(u.dtype), negative_slope)
    needs = ctx.needs_input_grad
    main = branch_grads(gu, z, *t[0:7], eps, stride, padding, dilation, groups,
                        dict(zip(_MAIN, needs[0:7])))
    short = branch_grads(gu, zd, *t[7:14], eps_d, stride_d, [0, 0], [1, 1], 1,
                         dict(zip(_MAIN, needs[8:15])))
    return (*(main[k] for k in _MAIN), None, *(short[k] for k in _MAIN), None, None,
            None, None, None, None, None, None, None)


_conv_bn_proj_act_op.register_autograd(_backward, setup_context=_setup_context)


def conv_bn_proj_act(x, weight, bias=None, *, bn_mean, bn_var, bn_weight=None, bn_bias=None, eps=1e-5,
                     xs, weight_d, bias_d=None, bn_mean_d, bn_var_d, bn_weight_d=None, bn_bias_d=None,
                     eps_d=1e-5, stride_d=1, stride=1, padding=0, dilation=1, groups=1,
                     activation="relu", negative_slope=DEFAULT_NEGATIVE_SLOPE, backend="auto"):
    """``act(BN(conv(x, W, b)) + BN_d(conv1x1(xs, W_d, b_d, stride_d)))`` in one kernel."""
    dispatch.validate_backend(backend)
    args = (x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, float(eps),
            xs, weight_d, bias_d, bn_mean_d, bn_var_d, bn_weight_d, bn_bias_d, float(eps_d), pair(stride_d, "stride_d"),
            pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"), int(groups),
            activation, backend, check_negative_slope(negative_slope))
    if direct_call_ok(x, weight, bias, bn_mean, bn_var, bn_weight, bn_bias, xs, weight_d, bias_d, bn_mean_d,
                      bn_var_d, bn_weight_d, bn_bias_d):
        return conv_bn_proj_act_impl(*args)
    return torch.ops.resfuse.conv_bn_proj_act(*args)
