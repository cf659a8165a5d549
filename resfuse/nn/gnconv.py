"""HorNet's gnconv as a drop-in fused module, the HorBlock around it, and
the ``convert`` pass for both.

``GnConv(dim, order=5, gflayer=None, h=14, w=8, s=1.0)`` has HorNet's
constructor and parameter names (``proj_in``, ``dwconv``, ``pws.i``,
``proj_out``; ``order``, ``dims``, ``scale`` attributes), so HorNet
checkpoints load as they are. Its forward is two kernels
(``resfuse.ops.gnconv``): the projection, then everything else (with a
LayerNorm in front in fp16/bf16, a third small launch folds it into the
projection's weights first). With a
gflayer (HorNet's GlobalLocalFilter, FFT-based) in place of the depthwise
conv, the filter runs eagerly between the two kernels. When a member has
hooks (which a fused kernel would not fire) it runs the original forward.
Gradients: every op has a backward op of its own with Triton kernels
(``resfuse.ops.gnconv_backward``), so training runs fused too.

``FusedHorBlock`` wraps a HorNet ``Block``/yoloair ``HorBlock`` (children
norm1, gnconv, norm2, pwconv1, act, pwconv2, drop_path; parameters gamma1,
gamma2) in four kernels, forward and backward: ``norm1`` (channels-first
LayerNorm) inside the projection kernel, ``x + drop_path(gamma1 *
gnconv(.))`` in the chain kernel's epilogue; ``norm2`` (LayerNorm over
channels) inside ``pwconv1``'s GEMM, which writes the pre-activation;
GELU on ``pwconv2``'s input tiles and ``x + drop_path(gamma2 * .)`` in its
epilogue. Drop path keeps its semantics: in training the block calls its
own ``drop_path`` module on a (N, 1, 1, 1) tensor of ones for each branch,
in the order the original forward does, so the per-sample multipliers and
the RNG stream are the original's (seeded runs agree), and the kernels
multiply by them. A drop-path module without a ``drop_prob`` attribute
(unknown semantics), hooks on a member, or autocast with an active drop
path run the original forward; an MLP that is not LayerNorm -> Linear ->
exact GELU -> Linear runs its half as HorNet writes it.

Both keep the original module's children, parameters, buffers and hooks
(``from_module`` shares them), so state_dict keys are the original's.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from .. import dispatch
from ..ops.gnconv import OP_CHAIN, OP_PROJ, gnconv_chain_impl, layernorm_conv1x1_impl, signature_reasons
from ..ops.horblock_mlp import OP_GELU_CONV1X1, gelu_conv1x1_impl
from ..ops.plans import call
from .guards import conv_reason, hooks_reason
from ..reference import gnconv_dims
from ._call import FusedModuleMixin, _cast, _compute_dtype, adopt, eager_for_sure
from ._provers import prove

# ----------------------------------------------------------------------------
# Recognition by structure
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class GnConvSpec:
    dim: int
    order: int
    ksize: Optional[int]   # the depthwise kernel size; None: a gflayer filter replaces it

    @property
    def dims(self):
        return gnconv_dims(self.dim, self.order)

    @property
    def gflayer(self) -> bool:
        return self.ksize is None


def _conv1x1_reason(conv, name, cin, cout) -> Optional[str]:
    if not isinstance(conv, nn.Conv2d):
        return f"{name} is {type(conv).__name__}, not an nn.Conv2d"
    why = conv_reason(conv)
    if why:
        return f"{name}: {why}"
    if (conv.in_channels, conv.out_channels) != (cin, cout) or tuple(conv.kernel_size) != (1, 1) \
            or conv.groups != 1 or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) \
            or conv.padding not in ((0, 0), "valid"):
        return (f"{name} is not a plain 1x1 conv {cin} -> {cout} (got {conv.in_channels} -> {conv.out_channels}, "
                f"kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}, padding {conv.padding}, "
                f"groups {conv.groups})")
    return None


def _dwconv_reason(conv, S) -> Optional[str]:
    why = conv_reason(conv)
    if why:
        return f"dwconv: {why}"
    k = conv.kernel_size[0]
    if (conv.in_channels, conv.out_channels, conv.groups) != (S, S, S) or tuple(conv.kernel_size) != (k, k) \
            or k % 2 == 0 or tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) \
            or tuple(conv.padding) != (k // 2, k // 2):
        return (f"dwconv is not a depthwise kxk conv over {S} channels with k odd, stride 1 and padding k//2 "
                f"(got {conv.in_channels} -> {conv.out_channels}, groups {conv.groups}, kernel "
                f"{tuple(conv.kernel_size)}, stride {tuple(conv.stride)}, padding {conv.padding})")
    return None


def match_gnconv(m: nn.Module) -> Union[GnConvSpec, str]:
    """HorNet's gnconv recognised by structure (any class): children
    proj_in (1x1, dim -> 2 dim), dwconv (depthwise kxk over sum(dims), or a
    gflayer module), pws (ModuleList of order-1 1x1 convs dims[i] ->
    dims[i+1]), proj_out (1x1, dim -> dim) and a numeric ``scale``.
    Returns the spec, or why it is not one."""
    ch = m._modules
    if not all(n in ch for n in ("proj_in", "dwconv", "pws", "proj_out")):
        return "not a gnconv (children proj_in, dwconv, pws, proj_out)"
    proj_in, dwconv, pws, proj_out = ch["proj_in"], ch["dwconv"], ch["pws"], ch["proj_out"]
    if not isinstance(proj_out, nn.Conv2d):
        return f"proj_out is {type(proj_out).__name__}, not an nn.Conv2d"
    if not isinstance(pws, nn.ModuleList):
        return f"pws is {type(pws).__name__}, not an nn.ModuleList"
    dim, order = proj_out.out_channels, len(pws) + 1
    try:
        dims = gnconv_dims(dim, order)
    except ValueError as e:
        return str(e)
    if getattr(m, "order", order) != order:
        return f"order attribute {m.order} but {len(pws)} pws convs"
    scale = getattr(m, "scale", None)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return f"no numeric `scale` attribute (got {type(scale).__name__})"
    why = (_conv1x1_reason(proj_in, "proj_in", dim, 2 * dim) or _conv1x1_reason(proj_out, "proj_out", dim, dim))
    if why:
        return why
    for i, pw in enumerate(pws):
        why = _conv1x1_reason(pw, f"pws.{i}", dims[i], dims[i + 1])
        if why:
            return why
    if isinstance(dwconv, nn.Conv2d):
        why = _dwconv_reason(dwconv, sum(dims))
        if why:
            return why
        return GnConvSpec(dim, order, dwconv.kernel_size[0])
    return GnConvSpec(dim, order, None)


def is_channels_first_layernorm(m) -> bool:
    """HorNet's LayerNorm(data_format='channels_first') and look-alikes."""
    return (getattr(m, "data_format", None) == "channels_first" and isinstance(getattr(m, "eps", None), float)
            and isinstance(getattr(m, "weight", None), torch.Tensor) and getattr(m, "weight").dim() == 1)


def match_horblock(m: nn.Module) -> Union[GnConvSpec, str]:
    """HorNet's Block / yoloair's HorBlock by structure: norm1 (channels-first
    LayerNorm) -> gnconv -> ``x + gamma1 * .``, then the Linear MLP half
    (norm2, pwconv1, act, pwconv2, gamma2) and drop_path."""
    ch = m._modules
    if not all(n in ch for n in ("norm1", "gnconv", "norm2", "pwconv1", "act", "pwconv2", "drop_path")):
        return "not a HorBlock (children norm1, gnconv, norm2, pwconv1, act, pwconv2, drop_path)"
    if not (hasattr(m, "gamma1") and hasattr(m, "gamma2")):
        return "no gamma1/gamma2 (layer scale) attributes"
    spec = match_gnconv(ch["gnconv"])
    if isinstance(spec, str):
        return f"gnconv: {spec}"
    n1 = ch["norm1"]
    if not is_channels_first_layernorm(n1):
        return f"norm1 is {type(n1).__name__}, not a channels-first LayerNorm"
    if n1.weight.shape[0] != spec.dim or (n1.bias is not None and n1.bias.shape != n1.weight.shape):
        return f"norm1 has {n1.weight.shape[0]} channels, gnconv {spec.dim}"
    g1 = m.gamma1
    if g1 is not None and (not isinstance(g1, torch.Tensor) or tuple(g1.shape) != (spec.dim,)):
        return f"gamma1 must be None or a ({spec.dim},) tensor"
    if not isinstance(ch["pwconv1"], nn.Linear) or not isinstance(ch["pwconv2"], nn.Linear):
        return "pwconv1/pwconv2 are not nn.Linear"
    return spec


# ----------------------------------------------------------------------------
# GnConv
# ----------------------------------------------------------------------------

class GnConv(FusedModuleMixin, nn.Module):
    """HorNet's gnconv, fused. Attributes: ``backend`` ('auto' | 'triton' |
    'cuda' | 'eager'), ``last_decisions`` ({'proj_in', 'chain'} -> the
    dispatch decision of the last eager-mode call)."""

    def __init__(self, dim: int, order: int = 5, gflayer=None, h: int = 14, w: int = 8, s: float = 1.0,
                 backend: str = "auto"):
        super().__init__()
        self.order = order
        self.dims = gnconv_dims(dim, order)
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        S = sum(self.dims)
        if gflayer is None:
            self.dwconv = nn.Conv2d(S, S, kernel_size=7, padding=3, bias=True, groups=S)
        else:
            self.dwconv = gflayer(S, h=h, w=w)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList([nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)])
        self.scale = s
        self._source_cls = None
        self._init_fused(backend)

    def _init_fused(self, backend: str) -> None:
        self.backend = backend  # also resets last_decisions

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "GnConv":
        """A GnConv sharing `module`'s children, parameters and hooks (any
        module with HorNet's gnconv structure). Raises ValueError if not."""
        why = prove("gnconv", module)
        if why:
            raise ValueError(f"GnConv.from_module: {type(module).__name__} is not a gnconv: {why}")
        spec = match_gnconv(module)
        self = adopt(cls, module)
        self.__dict__.setdefault("order", spec.order)
        self.__dict__.setdefault("dims", spec.dims)
        if not isinstance(module, GnConv):
            self._source_cls = type(module)
        self._init_fused(backend)
        return self

    @property
    def spec(self) -> Union[GnConvSpec, str]:
        return match_gnconv(self)

    def unfused_reason(self) -> Optional[str]:
        """Why this call runs the original forward ('' or None: it fuses)."""
        spec = match_gnconv(self)
        if isinstance(spec, str):
            return spec
        mods = self._modules
        for name in ("proj_in", "proj_out") + (() if spec.gflayer else ("dwconv",)):
            why = hooks_reason(mods[name], name)
            if why:
                return why
        for i, pw in enumerate(mods["pws"]):
            why = hooks_reason(pw, f"pws.{i}")
            if why:
                return why
        return None

    def forward(self, x, mask=None, dummy=False):
        # Both ops would run eager: that is the original forward, which an
        # unfusable gnconv runs too (so no need to ask unfused_reason first).
        eager = eager_for_sure(_GNCONV_OPS, self._backend, x)
        if eager is not None:
            self.last_decisions.update(proj_in=eager[OP_PROJ], chain=eager[OP_CHAIN])
            return self._original_forward(x, mask, dummy)
        if self.unfused_reason():
            return self._original_forward(x, mask, dummy)
        return self.fused_forward(x)

    def _original_forward(self, x, mask=None, dummy=False):
        if self._source_cls is not None:
            extra = (mask, dummy) if mask is not None or dummy else ()  # look-alikes may take x only
            return self._source_cls.forward(self, x, *extra)
        # HorNet's gnconv.forward, module by module (hooks fire).
        pwa, abc = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        dw_list = torch.split(self.dwconv(abc) * self.scale, self.dims, dim=1)
        x = pwa * dw_list[0]
        for i in range(self.order - 1):
            x = self.pws[i](x) * dw_list[i + 1]
        return self.proj_out(x)

    def fused_forward(self, x, norm: Optional[nn.Module] = None, residual=None, layer_scale=None,
                      sample_scale=None):
        """``residual + sample_scale[n] * layer_scale * gnconv(norm(x))`` in two
        kernels (each optional part absent when None). `norm`: a
        channels-first LayerNorm module, applied inside the projection
        kernel; `sample_scale`: drop path's per-sample multiplier (N,)."""
        dt = _compute_dtype(x)
        x = _cast(x, dt)
        mods = self._modules
        proj_in, proj_out, dwconv = mods["proj_in"], mods["proj_out"], mods["dwconv"]
        nw = nb = eps = None
        if norm is not None:
            nw, nb, eps = _cast(norm.weight, dt), _cast(norm.bias, dt), float(norm.eps)
        f = call(layernorm_conv1x1_impl, torch.ops.resfuse.layernorm_conv1x1, x, _cast(proj_in.weight, dt),
                 _cast(proj_in.bias, dt), nw, nb, eps, self._backend)
        record = not torch.compiler.is_compiling()
        if record:
            self.last_decisions["proj_in"] = dispatch.last_decision()
        if isinstance(dwconv, nn.Conv2d):
            w_dw, b_dw, gates = _cast(dwconv.weight, dt), _cast(dwconv.bias, dt), None
        else:
            # The gflayer filter (FFT-based) runs eagerly on abc, between the kernels.
            w_dw = b_dw = None
            gates = dwconv(f[:, self.dims[0]:]).to(f.dtype)
        pws = list(mods["pws"])
        y = call(
            gnconv_chain_impl, torch.ops.resfuse.gnconv_chain, f, w_dw, b_dw, gates, [_cast(p.weight, dt) for p in pws], [_cast(p.bias, dt) for p in pws],
            _cast(proj_out.weight, dt), _cast(proj_out.bias, dt), float(self.scale),
            None if residual is None else residual.to(f.dtype),
            None if layer_scale is None else layer_scale.to(f.dtype),
            None if sample_scale is None else sample_scale.to(f.dtype), self._backend)
        if record:
            self.last_decisions["chain"] = dispatch.last_decision()
        return y

    def extra_repr(self) -> str:
        return f"order={self.order}, dims={self.dims}, scale={self.scale:.4g}, backend={self._backend!r}"


_GNCONV_OPS = (OP_PROJ, OP_CHAIN)
_HORBLOCK_OPS = (OP_PROJ, OP_CHAIN, OP_GELU_CONV1X1)


# ----------------------------------------------------------------------------
# HorBlock
# ----------------------------------------------------------------------------

def _drop_path_reason(dp) -> Optional[str]:
    """Why drop path's semantics cannot be reproduced per sample (None: they can)."""
    if dp is None or isinstance(dp, nn.Identity):
        return None
    p = getattr(dp, "drop_prob", None)
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        return (f"drop_path is {type(dp).__name__} without a numeric drop_prob: its per-sample semantics "
                f"are unknown")
    return None


def _drop_path_active(dp) -> bool:
    return dp is not None and not isinstance(dp, nn.Identity) and dp.training and float(dp.drop_prob) != 0.0


def _sample_scales(dp, x) -> tuple:
    """(gnconv branch, MLP branch) per-sample multipliers, drawn by the
    block's own drop_path module in the original forward's order; (None,
    None) when it is inactive."""
    if not _drop_path_active(dp):
        return None, None
    ones = torch.ones((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    return dp(ones).reshape(-1), dp(ones).reshape(-1)


def mlp_reason(block: nn.Module) -> Optional[str]:
    """Why a HorBlock's MLP half (norm2 -> pwconv1 -> act -> pwconv2 ->
    gamma2) cannot run as two fused kernels (None: it can)."""
    mods = block._modules
    n2, l1, act, l2 = mods["norm2"], mods["pwconv1"], mods["act"], mods["pwconv2"]
    dim = mods["gnconv"]._modules["proj_out"].out_channels
    if isinstance(n2, nn.LayerNorm):
        if tuple(n2.normalized_shape) != (dim,):
            return f"norm2 normalizes {tuple(n2.normalized_shape)}, not the {dim} channels"
    elif getattr(n2, "data_format", None) != "channels_last" or not isinstance(getattr(n2, "eps", None), float) \
            or not isinstance(getattr(n2, "weight", None), torch.Tensor) or tuple(n2.weight.shape) != (dim,):
        return f"norm2 is {type(n2).__name__}, not a LayerNorm over the {dim} channels"
    if not (type(act) is nn.GELU and act.approximate == "none"):
        return f"act is {type(act).__name__}{'' if type(act) is not nn.GELU else '(approximate=tanh)'}, not exact nn.GELU"
    if l1.in_features != dim or l2.out_features != dim or l2.in_features != l1.out_features:
        return f"pwconv1/pwconv2 are not Linear({dim}, h) / Linear(h, {dim})"
    g2 = block.gamma2
    if g2 is not None and (not isinstance(g2, torch.Tensor) or tuple(g2.shape) != (dim,)):
        return f"gamma2 must be None or a ({dim},) tensor"
    for name in ("norm2", "pwconv1", "act", "pwconv2"):
        why = hooks_reason(mods[name], name)
        if why:
            return why
    return None


class FusedHorBlock(nn.Module):
    """A HorNet Block in four kernels (module docstring). Build with
    ``FusedHorBlock.from_module(block)``; ``backend`` is its gnconv's and
    its MLP's. ``last_decisions``: {'proj_in', 'chain', 'pwconv1',
    'pwconv2'} -> the dispatch decision of the last eager-mode call."""

    @classmethod
    def from_module(cls, block: nn.Module, backend: str = "auto") -> "FusedHorBlock":
        why = prove("horblock", block)
        if why:
            raise ValueError(f"FusedHorBlock.from_module: {type(block).__name__} is not a HorBlock: {why}")
        self = adopt(cls, block)
        self.__dict__["_source_cls"] = block._source_cls if isinstance(block, FusedHorBlock) else type(block)
        self.__dict__["_mlp_decisions"] = {}
        gn = self._modules["gnconv"]
        if not isinstance(gn, GnConv):
            self._modules["gnconv"] = GnConv.from_module(gn, backend)
        self.backend = backend
        return self

    @property
    def backend(self) -> str:
        return self._modules["gnconv"].backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._modules["gnconv"].backend = value
        self.__dict__["_mlp_decisions"] = {}

    @property
    def last_decisions(self) -> dict:
        return {**self._modules["gnconv"].last_decisions, **self.__dict__.get("_mlp_decisions", {})}

    def _apply(self, *args, **kwargs):
        self.__dict__["_mlp_decisions"] = {}
        return super()._apply(*args, **kwargs)

    def unfused_reason(self) -> Optional[str]:
        mods = self._modules
        spec = match_horblock(self)
        if isinstance(spec, str):
            return spec
        gn = mods["gnconv"]
        if not isinstance(gn, GnConv):
            return "its gnconv is not a resfuse GnConv"
        why = (hooks_reason(mods["norm1"], "norm1") or hooks_reason(gn, "gnconv") or gn.unfused_reason()
               or hooks_reason(mods["drop_path"], "drop_path") or _drop_path_reason(mods["drop_path"]))
        if why:
            return why
        return None

    def forward(self, x):
        # Every part would run eager: that is the original forward (its
        # gnconv records its own decisions), which an unfusable block runs too.
        eager = eager_for_sure(_HORBLOCK_OPS, self.backend, x)
        if eager is not None:
            self.__dict__["_mlp_decisions"] = {"pwconv1": eager[OP_PROJ], "pwconv2": eager[OP_GELU_CONV1X1]}
            return self._source_cls.forward(self, x)
        if self.unfused_reason():
            return self._source_cls.forward(self, x)
        mods = self._modules
        dt = _compute_dtype(x)
        autocast = dt is not None and dt != x.dtype
        dp = mods["drop_path"]
        if autocast and _drop_path_active(dp):
            return self._source_cls.forward(self, x)
        m1, m2 = _sample_scales(dp, x)
        if autocast:
            # Under autocast eager keeps the residual stream in x's dtype
            # (gamma1 * y promotes back): add it outside the kernel likewise.
            y = mods["gnconv"].fused_forward(x, norm=mods["norm1"])
            x = x + (self.gamma1[:, None, None] * y if self.gamma1 is not None else y)
        else:
            x = mods["gnconv"].fused_forward(x, norm=mods["norm1"], residual=x, layer_scale=self.gamma1,
                                             sample_scale=m1)
        if autocast or mlp_reason(self):
            return self._eager_mlp(x, m2)
        return self._fused_mlp(x, m2)

    def _eager_mlp(self, x, m2):
        """The MLP half as HorNet's Block.forward writes it (drop path by the
        multiplier already drawn, so the RNG stream stays the original's)."""
        mods = self._modules
        y = x.permute(0, 2, 3, 1)
        y = mods["pwconv2"](mods["act"](mods["pwconv1"](mods["norm2"](y))))
        if self.gamma2 is not None:
            y = self.gamma2 * y
        y = y.permute(0, 3, 1, 2)
        if m2 is not None:
            y = y * m2[:, None, None, None].to(y.dtype)
        return x + y

    def _fused_mlp(self, x, m2):
        mods = self._modules
        n2, l1, l2 = mods["norm2"], mods["pwconv1"], mods["pwconv2"]
        backend = self.backend
        # Without autograd the GELU goes into pwconv1's epilogue, so pwconv2's
        # main loop is a plain pipelined GEMM (a GELU prologue in registers
        # makes every sm_90 wgmma wait for the previous one); with autograd
        # it stays pwconv2's prologue: the backward needs the pre-activation.
        # The cuda backend has no GELU epilogue (it would add a kernel): it
        # keeps the prologue too.
        infer = not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, n2.weight, n2.bias, l1.weight, l1.bias, l2.weight,
                                                        l2.bias, self.gamma2)))
        if infer:
            proj = signature_reasons(x.device, x.dtype, 1, backend)[OP_PROJ]
            infer = not (isinstance(proj, dispatch.Decision) and proj.backend == "cuda")
        a = call(layernorm_conv1x1_impl, torch.ops.resfuse.layernorm_conv1x1, x, l1.weight[:, :, None, None],
                 l1.bias, n2.weight, n2.bias, float(n2.eps), backend, infer)
        record = not torch.compiler.is_compiling()
        if record:
            self.__dict__["_mlp_decisions"]["pwconv1"] = dispatch.last_decision()
        out = call(gelu_conv1x1_impl, torch.ops.resfuse.gelu_conv1x1, a, l2.weight[:, :, None, None], l2.bias,
                   self.gamma2, m2, x, backend, not infer)
        if record:
            self.__dict__["_mlp_decisions"]["pwconv2"] = dispatch.last_decision()
        return out

    def extra_repr(self) -> str:
        mlp = mlp_reason(self)
        return (f"fused: norm1+proj_in, chain+gamma1+residual, "
                f"{'norm2+pwconv1, gelu+pwconv2+gamma2+residual' if not mlp else 'MLP eager: ' + mlp}; "
                f"backend={self.backend!r}")
