"""One fused call from modules: Conv2d + BN (+ residual | + projection
shortcut) + activation -> the resfuse op, with autocast handled as eager
autocast handles F.conv2d. Shared by every fused module."""

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from .. import dispatch
from ..activations import negative_slope_of
from ..ops.bn_act_conv import bn_act_conv_eager, bn_act_conv_impl
from ..ops.conv_bn_act import conv_bn_act_eager, conv_bn_act_impl, resolve_padding
from ..ops.conv_bn_proj_act import conv_bn_proj_act_eager, conv_bn_proj_act_impl
from ..ops.plans import needs_grad, plain_call_ok
from .guards import bn_tensors, live


_MODULE_STATE = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set",
                 "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks_with_kwargs")


def adopt(cls, module: nn.Module) -> nn.Module:
    """A `cls` instance sharing `module`'s children, parameters, buffers,
    hooks and attributes (own containers, same entries)."""
    self = cls.__new__(cls)
    nn.Module.__init__(self)
    for k, v in module.__dict__.items():
        if k in _MODULE_STATE and hasattr(v, "copy"):
            v = v.copy()
        self.__dict__[k] = v
    return self


_MOVE_HOOK: Optional[Callable[[nn.Module], None]] = None


def register_move_hook(hook: Callable[[nn.Module], None]) -> None:
    """What a fused module marked by ``convert`` (``channels_last_weights``
    None) runs on itself after ``.to()``/``.cuda()``/...: lay out the kernel
    weights that are now on CUDA (``resfuse.convert`` registers
    ``lay_out_conv_weights``; it imports the fused modules, so they cannot
    import it)."""
    global _MOVE_HOOK
    _MOVE_HOOK = hook


class MovesLayout:
    """``_apply`` (every ``.to()``, ``.cuda()``, ``.half()``...) followed by
    the registered move hook when ``convert`` marked the module
    (``_channels_last_on_cuda``): a model converted on a CPU and moved to a
    GPU gets the kernel layout there, once."""

    def _apply(self, *args, **kwargs):
        out = super()._apply(*args, **kwargs)
        if self.__dict__.get("_channels_last_on_cuda") and _MOVE_HOOK is not None:
            _MOVE_HOOK(self)
        return out


class InPlaceBackendMixin(MovesLayout):
    """``backend`` (validated) kept in the instance ``__dict__``: for modules
    made fused in place by changing the class of a user's module
    (``ConvBNHead``, ``PatchifyConv``), whose ``__init__`` never ran."""

    @property
    def backend(self) -> str:
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, value: str) -> None:
        self.__dict__["_backend"] = dispatch.validate_backend(value)


class FusedModuleMixin(MovesLayout):
    """The ``backend`` attribute every fused module has (validated; not in
    the state_dict) and ``last_decisions`` (what ran last, per conv),
    which a change of backend invalidates."""

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = dispatch.validate_backend(value)
        self.last_decisions = {}  # observed under the old setting

    def _apply(self, *args, **kwargs):
        # .to()/.half()/.cuda(): what ran before may not be what runs now.
        self.last_decisions = {}
        return super()._apply(*args, **kwargs)


def _compute_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype eager autocast would run F.conv2d in (float64 is not
    autocast-eligible and stays as it is); None: no cast."""
    if (torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type)
            and x.dtype != torch.float64):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _cast(t, dtype):
    return t if t is None or dtype is None else t.to(dtype)


def eager_for_sure(ops, backend: str, x: torch.Tensor):
    """``dispatch.eager_for_sure`` for x's device and dtype, outside
    torch.compile (which must trace the ops): the fused HorNet modules'
    question whether to run their original forward."""
    if torch.compiler.is_compiling():
        return None
    return dispatch.eager_for_sure(ops, backend, x.device, x.dtype)


def conv_geometry(conv: nn.Conv2d):
    """(stride, padding, dilation) of `conv` as the ops take them (padding
    'same'/'valid' resolved)."""
    padding = conv.padding
    if isinstance(padding, str):
        padding = resolve_padding(padding, conv.kernel_size, conv.dilation)
    return conv.stride, padding, conv.dilation


_WIDE = (torch.float32, torch.float64)


def fused_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: Optional[nn.Module], activation: str, backend: str,
                  residual: Optional[torch.Tensor] = None,
                  shortcut: Optional[Tuple[torch.Tensor, nn.Conv2d, nn.Module]] = None,
                  act_module: Optional[nn.Module] = None,
                  prologue: Optional[Tuple[nn.Module, str, Optional[nn.Module]]] = None):
    """act(bn(conv(x)) + residual) or act(bn(conv(x)) + bn_d(conv_d(x_s)))
    as one op; with `prologue` = (bn_in, activation_in, act_in module) the
    conv reads act_in(bn_in(x)) (``bn_act_conv``), and `bn` may be None.
    `act_module` is the module that computes `activation` (its parameters,
    a LeakyReLU's slope, are read from it now).

    Where ``ops.plans.plain_call_ok`` holds and ``dispatch.decide`` picks
    the eager backend (from x's device and dtype and the groups) in
    float32/float64, the op's eager implementation runs on the children's
    own tensors: the ops the original modules run, so a bad shape raises
    what they raise and a gradient is eager autograd's own. Otherwise,
    with no gradient to record either (``direct_call_ok``), the op's
    implementation is called directly; else the op through
    ``torch.ops.resfuse``. Returns (y, dispatch decision or None when
    compiling)."""
    slope = negative_slope_of(act_module)
    dtype = _compute_dtype(x)
    weight, bias = live(conv, "weight"), live(conv, "bias")
    if dtype is not None:
        x, residual, weight, bias = _cast(x, dtype), _cast(residual, dtype), _cast(weight, dtype), _cast(bias, dtype)
    mean, var, gamma, beta, eps = bn_tensors(bn) if bn is not None else (None, None, None, None, 1e-5)
    stride, padding, dilation = conv_geometry(conv)
    groups = conv.groups
    if prologue is not None:
        bn_in, act_in, act_in_module = prologue
        mean_i, var_i, gamma_i, beta_i, eps_i = bn_tensors(bn_in)
        slope_i = negative_slope_of(act_in_module)
        tensors = (x, weight, bias, mean, var, gamma, beta, residual, mean_i, var_i, gamma_i, beta_i)
        plain = plain_call_ok(*tensors)
        if plain and x.dtype in _WIDE:
            decision = _eager_decision("bn_act_conv", backend, x, groups)
            if decision is not None:
                return bn_act_conv_eager(x, mean_i, var_i, gamma_i, beta_i, eps_i, act_in, weight, bias, mean, var,
                                         gamma, beta, eps, residual, stride, padding, dilation, groups, activation,
                                         slope_i, slope), decision
        direct = plain and not needs_grad(*tensors)
        args = (x, mean_i, var_i, gamma_i, beta_i, eps_i, act_in, weight, bias, mean, var, gamma, beta, eps,
                residual, stride, padding, dilation, groups, activation, backend, slope_i, slope)
        y = bn_act_conv_impl(*args) if direct else torch.ops.resfuse.bn_act_conv(*args)
    elif shortcut is None:
        tensors = (x, weight, bias, mean, var, gamma, beta, residual)
        plain = plain_call_ok(*tensors)
        if plain and x.dtype in _WIDE:
            decision = _eager_decision("conv_bn_act", backend, x, groups)
            if decision is not None:
                return conv_bn_act_eager(x, weight, bias, mean, var, gamma, beta, eps, residual, stride, padding,
                                         dilation, groups, activation, slope), decision
        direct = plain and not needs_grad(*tensors)
        args = (x, weight, bias, mean, var, gamma, beta, eps, residual, stride, padding, dilation, groups,
                activation, backend, slope)
        y = conv_bn_act_impl(*args) if direct else torch.ops.resfuse.conv_bn_act(*args)
    else:
        xs, conv_d, bn_d = shortcut
        mean_d, var_d, gamma_d, beta_d, eps_d = bn_tensors(bn_d)
        weight_d, bias_d = live(conv_d, "weight"), live(conv_d, "bias")
        if dtype is not None:
            xs, weight_d, bias_d = _cast(xs, dtype), _cast(weight_d, dtype), _cast(bias_d, dtype)
        tensors = (x, weight, bias, mean, var, gamma, beta, xs, weight_d, bias_d, mean_d, var_d, gamma_d, beta_d)
        plain = plain_call_ok(*tensors)
        if plain and x.dtype in _WIDE:
            decision = _eager_decision("conv_bn_proj_act", backend, x, groups)
            if decision is not None:
                return conv_bn_proj_act_eager(x, weight, bias, mean, var, gamma, beta, eps, xs, weight_d, bias_d,
                                              mean_d, var_d, gamma_d, beta_d, eps_d, conv_d.stride, stride, padding,
                                              dilation, groups, activation, slope), decision
        direct = plain and not needs_grad(*tensors)
        args = (x, weight, bias, mean, var, gamma, beta, eps, xs, weight_d, bias_d, mean_d, var_d, gamma_d, beta_d,
                eps_d, conv_d.stride, stride, padding, dilation, groups, activation, backend, slope)
        y = conv_bn_proj_act_impl(*args) if direct else torch.ops.resfuse.conv_bn_proj_act(*args)
    if not direct and torch.compiler.is_compiling():
        return y, None
    return y, dispatch.last_decision()


def _eager_decision(op: str, backend: str, x: torch.Tensor, groups: int):
    """The (recorded) decision when `op` runs on the eager backend for x's
    device and dtype, else None. x must be 4-D then, as BatchNorm2d
    requires (the conv alone would take an unbatched 3-D input)."""
    decision = dispatch.decide(op, backend, x.device, x.dtype, groups)[0]
    if decision.backend != "eager":
        return None
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    dispatch.record(decision)
    return decision
