"""What a fused module checks of its children at every call: may this
Conv2d / BatchNorm run inside a fused kernel now (exact types, no hooks,
zero padding, running statistics), and the BN's live tensors. The
reasons are also what ``explain`` prints. Recognition
(``resfuse.recognize``) uses the same checks before it rewrites anything.
"""

from typing import Optional

import torch
import torch.nn as nn

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_module_globals = torch.nn.modules.module  # where register_module_*_hook keeps the global hooks


def _global_hooks() -> bool:
    g = _module_globals
    return bool(g._global_forward_pre_hooks or g._global_forward_hooks or g._global_backward_pre_hooks
                or g._global_backward_hooks)


def _own_hooks(m: nn.Module) -> bool:
    d = m.__dict__  # (every nn.Module has the four; a look-alike may not)
    return bool(d.get("_forward_pre_hooks") or d.get("_forward_hooks") or d.get("_backward_pre_hooks")
                or d.get("_backward_hooks"))


def any_hooks(modules) -> bool:
    """Whether ``hooks_reason`` is not None for one of `modules` (the
    yes/no a fused module asks at every call: the global hooks checked
    once, no reason's text)."""
    if _global_hooks():
        return True
    for m in modules:
        if _own_hooks(m):
            return True
    return False


def hooks_reason(m: nn.Module, role: str) -> Optional[str]:
    """Why `m` must run as itself: a fused group never calls its members'
    forward, so their hooks would silently not fire (and hook-based
    reparametrizations such as ``torch.nn.utils.weight_norm`` would read a
    stale weight)."""
    if _own_hooks(m):
        kinds = [h.strip("_").replace("_hooks", "") for h in _HOOK_DICTS if m.__dict__.get(h)]
        return f"its {role} has {'/'.join(kinds)} hooks, which run only when the module runs by itself"
    if _global_hooks():
        return "global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"
    return None


def conv_reason(conv: nn.Module) -> Optional[str]:
    """Why this Conv2d cannot be the head of a fused group (None: it can)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return f"{type(conv).__name__} overrides Conv2d.forward; its semantics are unknown"
    why = hooks_reason(conv, "Conv2d")
    if why is not None:
        return why
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' fuses)"
    if isinstance(conv.padding, str) and conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return "padding='same' is asymmetric for this kernel/dilation"
    return None


def is_frozen_batchnorm(m: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d and look-alikes: fixed affine BN
    whose statistics and parameters are all buffers."""
    return (type(m).__name__ == "FrozenBatchNorm2d"
            and all(isinstance(getattr(m, b, None), torch.Tensor)
                    for b in ("weight", "bias", "running_mean", "running_var"))
            and hasattr(m, "eps"))


def bn_reason(bn: Optional[nn.Module], conv: nn.Conv2d) -> Optional[str]:
    """Why `bn` cannot be folded after `conv` (None: it can, in eval mode)."""
    if bn is None:
        return "no BatchNorm2d follows it"
    if is_frozen_batchnorm(bn):
        n = live(bn, "weight").shape[0]
    elif isinstance(bn, nn.BatchNorm2d):
        if type(bn).forward is not nn.BatchNorm2d.forward:
            return f"{type(bn).__name__} overrides BatchNorm2d.forward"
        if not bn.track_running_stats or live(bn, "running_mean") is None:
            return "BatchNorm2d without running statistics normalizes with batch statistics"
        n = bn.num_features
    else:
        return f"followed by {type(bn).__name__}, not BatchNorm2d"
    if n != conv.out_channels:
        return f"BatchNorm has {n} features but the conv has {conv.out_channels} output channels"
    return hooks_reason(bn, type(bn).__name__)


def bn_uses_running_stats(bn: nn.Module) -> bool:
    """True when this BN, as it is now, computes the eval-mode formula."""
    return is_frozen_batchnorm(bn) or not bn.training


def live(m: nn.Module, name: str):
    """``getattr(m, name)`` for a parameter or buffer, read from the
    module's own dicts (a tenth of ``nn.Module.__getattr__``'s time, on
    every fused call); anything else (a parametrization's property, say)
    through getattr."""
    d = m.__dict__
    params = d["_parameters"]
    if name in params:
        return params[name]
    buffers = d["_buffers"]
    if name in buffers:
        return buffers[name]
    return getattr(m, name)


def bn_tensors(bn: nn.Module):
    """(running_mean, running_var, weight, bias, eps) of a foldable BN, live."""
    return live(bn, "running_mean"), live(bn, "running_var"), live(bn, "weight"), live(bn, "bias"), float(bn.eps)
