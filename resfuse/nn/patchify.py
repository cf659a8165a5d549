"""A patchify conv (kernel = stride, no padding) and the channels-first
LayerNorm before or after it, as one kernel (``patchify_conv``), without
moving any parameter: HorNet's and ConvNeXt's stems (conv -> LayerNorm)
and downsampling layers (LayerNorm -> conv).

The Conv2d becomes a ``PatchifyConv`` (a Conv2d subclass: same parameters
and keys) that applies the LayerNorm(s) it was given; each LayerNorm's
class becomes a subclass of its own whose forward is the identity while
the conv applies it. Both ask ``patchify_fuses``, so a LayerNorm is
applied exactly once. With hooks on the conv or a LayerNorm, or a module
changed after conversion so that it no longer fits, every module runs as
itself. The LayerNorm has no train/eval difference, so the fusion holds in
both (the op's gradients are the eager reference's).

Only valid where the owner's forward feeds LN -> conv (or conv -> LN)
directly, and only for a LayerNorm whose forward is proven to compute a
channels-first LayerNorm: both are recognition's to prove
(``resfuse.recognize.patchify``); this module only provides the classes.
As with ``nn.stem``'s folded BatchNorm, a folded LayerNorm is the identity
wherever it is called while its conv fuses: replacing the conv in its
owner, or calling the LayerNorm on its own, needs a fresh ``convert`` of
the original model.
"""

from typing import Optional

import torch
import torch.nn as nn

from .. import dispatch
from ..ops.patchify import OP, patchify_conv_impl
from ..ops.plans import call
from ._call import InPlaceBackendMixin, _cast, _compute_dtype, eager_for_sure
from .guards import hooks_reason


def patchify_reason(conv: nn.Module) -> Optional[str]:
    """Why `conv` is not a patchify conv the kernel computes (None: it is)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    if k[0] != k[1] or s != k:
        return f"kernel {k} / stride {s}: not a square patchify conv (kernel = stride)"
    pad = conv.padding
    if not (pad == "valid" or (not isinstance(pad, str) and all(p == 0 for p in pad))):
        return f"padding {pad}: a patchify conv has none"
    if tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        return f"dilation {tuple(conv.dilation)} / groups {conv.groups}: not a plain patchify conv"
    if conv.weight.dim() != 4:
        return "weight is not 4-D"
    return None


def layernorm_params(ln: nn.Module, channels: int):
    """(weight, bias, eps) of a channels-first LayerNorm over `channels`, or
    the reason (str) its parameters do not fit. HorNet's / ConvNeXt's
    LayerNorm (``data_format='channels_first'``) or an ``nn.LayerNorm``
    over the last dimension applied to permuted input (torchvision's and
    timm's LayerNorm2d); which of them the forward computes is recognition's
    proof."""
    if isinstance(ln, nn.LayerNorm):
        if tuple(ln.normalized_shape) != (channels,):
            return f"{type(ln).__name__} normalizes {tuple(ln.normalized_shape)}, not the {channels} channels"
    elif getattr(ln, "data_format", None) != "channels_first":
        return f"{type(ln).__name__} is not a channels-first LayerNorm"
    eps = getattr(ln, "eps", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        return f"{type(ln).__name__}.eps is {eps!r}, not a non-negative float"
    w, b = getattr(ln, "weight", None), getattr(ln, "bias", None)
    for name, t in (("weight", w), ("bias", b)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (channels,)):
            return f"{type(ln).__name__}.{name} is not None or a ({channels},) tensor"
    return w, b, float(eps)


def _eager_post_norm_dtype(ln: nn.Module, dt: torch.dtype) -> torch.dtype:
    """Under autocast, the dtype eager's LayerNorm returns for a `dt` conv
    output: F.layer_norm autocasts to float32; HorNet's written-out form
    promotes with its (float32) weight and bias."""
    if isinstance(ln, nn.LayerNorm):
        return torch.float32
    for t in (ln.weight, ln.bias):
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def patchify_fuses(conv: nn.Module) -> bool:
    """Whether `conv` applies its LayerNorm(s) now: no hooks on it or on
    them (a hook must see its module really run), and each still fits."""
    d = conv.__dict__
    pre, post = d.get("_pre_norm"), d.get("_post_norm")
    if hooks_reason(conv, "conv") or patchify_reason(conv):
        return False
    for ln, channels in ((pre, conv.in_channels), (post, conv.out_channels)):
        if ln is not None and (hooks_reason(ln, "norm") or isinstance(layernorm_params(ln, channels), str)):
            return False
    return True


class PatchifyConv(InPlaceBackendMixin, nn.Conv2d):
    """A Conv2d (kernel = stride) that also applies the channels-first
    LayerNorm before it (``pre_norm``) and/or after it (``post_norm``)."""

    def forward(self, x):
        if not patchify_fuses(self):
            return nn.Conv2d.forward(self, x)
        d = self.__dict__
        eager = eager_for_sure((OP,), d["_backend"], x)
        if eager is not None:  # the op would run eager: run the original LayerNorm(s) and conv instead
            d["last_decision"] = eager[OP]
            return self._original_forward(x)
        dt = _compute_dtype(x)  # autocast: eager's conv dtype; else every tensor as it is
        x = _cast(x, dt)
        pre = post = (None, None, None)
        if d.get("_pre_norm") is not None:
            pre = layernorm_params(d["_pre_norm"], self.in_channels)
        if d.get("_post_norm") is not None:
            post = layernorm_params(d["_post_norm"], self.out_channels)
        y = call(
            patchify_conv_impl, torch.ops.resfuse.patchify_conv, x, _cast(self.weight, dt), _cast(self.bias, dt), _cast(pre[0], dt), _cast(pre[1], dt), pre[2],
            _cast(post[0], dt), _cast(post[1], dt), post[2], d["_backend"])
        if not torch.compiler.is_compiling():
            d["last_decision"] = dispatch.last_decision()
        if dt is not None and post[2] is not None:
            y = y.to(_eager_post_norm_dtype(d["_post_norm"], dt))
        return y

    def _original_forward(self, x):
        """What the LayerNorm(s) and the conv compute as they were, each by
        its own class's forward (a folded LayerNorm is the identity while
        this conv applies it; none has hooks here, ``patchify_fuses``)."""
        d = self.__dict__
        pre, post = d.get("_pre_norm"), d.get("_post_norm")
        if pre is not None:
            x = type(pre).__mro__[1].forward(pre, x)
        x = nn.Conv2d.forward(self, x)
        return x if post is None else type(post).__mro__[1].forward(post, x)

    @property
    def pre_norm(self) -> Optional[nn.Module]:
        return self.__dict__.get("_pre_norm")

    @property
    def post_norm(self) -> Optional[nn.Module]:
        return self.__dict__.get("_post_norm")

    @property
    def fuses_now(self) -> bool:
        return patchify_fuses(self)

    @property
    def kind(self) -> str:
        """What explain calls it: 'ln+conv2x2/2', 'conv4x4/4+ln', ..."""
        p = self.kernel_size[0]
        return ("ln+" if self.pre_norm is not None else "") + f"conv{p}x{p}/{p}" + \
            ("+ln" if self.post_norm is not None else "")


_FOLDED_NORM = {}


def _new_folded_norm(base: type) -> nn.Module:
    """Unpickling: an empty instance of the folded class of `base` (made on
    demand, so a fresh process has it only after this makes it)."""
    cls = folded_norm_class(base)
    return cls.__new__(cls)


def folded_norm_class(cls: type) -> type:
    """A subclass of LayerNorm class `cls` that is the identity while its
    PatchifyConv applies it (else `cls`'s forward)."""
    if cls not in _FOLDED_NORM:
        def forward(self, x):
            if patchify_fuses(self.__dict__["_patchify_conv"]):
                return x
            return cls.forward(self, x)

        def __reduce_ex__(self, protocol):
            return _new_folded_norm, (cls,), self.__getstate__()
        name = "Folded" + cls.__name__
        _FOLDED_NORM[cls] = type(name, (cls,), {"forward": forward, "__reduce_ex__": __reduce_ex__,
                                                "__module__": __name__, "__qualname__": name,
                                                "__doc__": folded_norm_class.__doc__})
    return _FOLDED_NORM[cls]


def fuse_patchify(conv: nn.Conv2d, pre_norm: Optional[nn.Module] = None, post_norm: Optional[nn.Module] = None,
                  backend: str = "auto") -> PatchifyConv:
    """Make `conv` (in place; an nn.Conv2d or a PatchifyConv without that
    side's norm) apply `pre_norm` and/or `post_norm`, and those LayerNorms
    the identity while it does. Raises ValueError with the reason when they
    do not fit."""
    why = patchify_reason(conv)
    if why is None and type(conv) not in (nn.Conv2d, PatchifyConv):
        why = f"{type(conv).__name__} is not an exact nn.Conv2d"
    for ln, channels, side in ((pre_norm, conv.in_channels, "pre"), (post_norm, conv.out_channels, "post")):
        if ln is None:
            continue
        p = layernorm_params(ln, channels)
        if why is None and isinstance(p, str):
            why = p
        if why is None and isinstance(conv, PatchifyConv) and conv.__dict__.get(f"_{side}_norm") is not None:
            why = f"the conv already applies a {side}-norm"
        if why is None and "_patchify_conv" in ln.__dict__:
            why = f"{type(ln).__name__} is already applied by another patchify conv"
    if why is not None:
        raise ValueError(f"fuse_patchify: cannot fuse: {why}")
    if type(conv) is nn.Conv2d:
        conv.__class__ = PatchifyConv
        conv.__dict__.update(_pre_norm=None, _post_norm=None)
    conv.backend = backend
    for ln, side in ((pre_norm, "pre"), (post_norm, "post")):
        if ln is not None:
            conv.__dict__[f"_{side}_norm"] = ln  # not registered: the LayerNorm stays where it is in the tree
            ln.__class__ = folded_norm_class(type(ln))
            ln.__dict__["_patchify_conv"] = conv
    return conv
