"""``resfuse.convert``: rewrite a model so its fusable runs execute fused.

Recognition reads structure (module types, see ``patterns``) and proves
semantics from each module's traced forward (``recognize``), so copies of
torchvision code in user projects convert too, and a module whose forward
is not the pattern is left alone. Parameters and
buffers are never moved or renamed: the converted model's state_dict has
the original's keys, shapes and values.
"""

import copy
from typing import Optional

import torch
import torch.nn as nn

from . import dispatch
from .nn._call import FusedModuleMixin, InPlaceBackendMixin, register_move_hook
from .nn.blocks import FusedResidualBlock, fuse_block
from .nn.conv_bn_act import FusedSequential
from .nn.gnconv import FusedHorBlock, GnConv
from .nn.patchify import PatchifyConv
from .nn.stem import ConvBNHead, fuse_head, fuse_prologue
from .nn.conv_bn_act import FusedGroup, is_plain_sequential, plan_sequential
from .recognize.blocks import convert_blocks, match_block
from .recognize.gnconv import convert_gnconv
from .recognize.heads import find_heads, is_batchnorm_act, shared_modules
from .recognize.patchify import convert_patchify
from .recognize.prologues import find_prologues, resolve_chains
from .recognize.stem import convert_stems

_OWNED_ELSEWHERE = (FusedSequential, FusedResidualBlock, GnConv, FusedHorBlock, ConvBNHead)


def convert_chains(model: nn.Module, backend: str, absorbed: set) -> None:
    """Fuse in place every conv -> BN (-> act) chain (a head:
    ``recognize.heads``) and every BN (-> act) -> conv chain (a prologue:
    ``recognize.prologues``) that a module's traced forward computes, in
    modules no other pass owns (fused blocks, gnconvs, absorbed
    projections), each BN given to one conv (``resolve_chains``). In a
    plain Sequential, FusedSequential runs the heads of convs without a
    prologue; a conv with a prologue, or followed by timm's BatchNormAct2d
    (which FusedSequential does not group), gets its head here (the
    Sequential then runs that conv as itself)."""
    shared = shared_modules(model)
    for owner in list(model.modules()):
        if id(owner) in absorbed or isinstance(owner, _OWNED_ELSEWHERE):
            continue
        heads, pros = find_heads(owner, shared), find_prologues(owner, shared)
        heads, pros = resolve_chains([] if isinstance(heads, str) else heads.heads,
                                     [] if isinstance(pros, str) else pros.prologues)
        in_sequential = is_plain_sequential(owner)
        with_prologue = {p.conv for p in pros}
        for h in heads:
            conv, bn = owner._modules[h.conv], owner._modules[h.bn]
            if type(conv) is nn.Conv2d and (not in_sequential or h.conv in with_prologue or is_batchnorm_act(bn)):
                fuse_head(conv, bn, h.activation, backend, label="head", bn_act=is_batchnorm_act(bn))
        for p in pros:
            fuse_prologue(owner._modules[p.conv], owner._modules[p.bn], owner._modules[p.act] if p.act else None,
                          p.activation, backend)


def kernel_convs(model: nn.Module):
    """The Conv2d modules whose weights a fused conv kernel reads: the convs
    of fused residual blocks (projection included), conv heads/prologues
    (``ConvBNHead``), patchify convs with their LayerNorms (``PatchifyConv``)
    and the fused groups of FusedSequentials."""
    seen = set()
    for m in model.modules():
        if isinstance(m, FusedResidualBlock):
            convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        elif isinstance(m, (ConvBNHead, PatchifyConv)):
            convs = [m]
        elif isinstance(m, FusedSequential):
            convs = [m._modules[g.conv] for g in plan_sequential(m).steps if isinstance(g, FusedGroup)]
        else:
            continue
        for c in convs:
            if id(c) not in seen and c.groups == 1:
                seen.add(id(c))
                yield c


def _on_kernel_device(t: torch.Tensor) -> bool:
    """Whether a kernel reads `t` where it is: a CUDA tensor (on a CPU the
    fused modules run eager PyTorch, which picks its own layouts)."""
    return t.is_cuda


@torch.no_grad()
def lay_out_conv_weights(model: nn.Module, cuda_only: bool = False) -> None:
    """Give every kernel conv's weight channels-innermost (OHWI) strides, in
    place and once (with `cuda_only`, those on CUDA only): the Triton conv
    kernel then loads its weight tiles with 16-byte async copies (an OIHW
    weight is repacked at every call). Keys, shapes and values do not
    change; ``load_state_dict`` (``copy_``), optimizers (in-place updates)
    and ``.to()`` keep the strides. By eager's own rule a conv with a
    channels_last weight returns a channels_last output, so an NCHW model
    input is laid out channels_last once, at the first fused conv. A fused
    gnconv's depthwise weight (S, 1, k, k) gets channel-innermost strides
    (1, k*k*S, k*S, S): each tap's weights for a block of channels are then
    one vector load in the chain kernel, not a gather at stride k*k."""
    for conv in kernel_convs(model):
        w = conv.weight
        if w.dim() == 4 and not w.is_contiguous(memory_format=torch.channels_last) and \
                (not cuda_only or _on_kernel_device(w)):
            w.data = w.data.contiguous(memory_format=torch.channels_last)
    for m in model.modules():
        dw = getattr(m, "dwconv", None) if isinstance(m, GnConv) else None
        if isinstance(dw, nn.Conv2d) and dw.weight.dim() == 4 and dw.weight.stride(0) != 1 and \
                (not cuda_only or _on_kernel_device(dw.weight)):
            w = dw.weight
            w.data = w.data.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


register_move_hook(lambda module: lay_out_conv_weights(module, cuda_only=True))


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False,
            channels_last_weights: Optional[bool] = None) -> nn.Module:
    """Return `model` with its conv -> BN (-> act) (-> add) patterns fused:

    - residual blocks (torchvision/timm BasicBlock and Bottleneck, the seed's
      ResidualLayer/ResDown, and anything with their structure) become
      ``resfuse.nn.BasicBlock`` / ``Bottleneck``: 2 or 3 kernels in eval,
      the shortcut inside the last one;
    - a ResNet-style stem (conv1, bn1, relu/act1 of a module with layer1)
      becomes one kernel (``resfuse.nn.stem``), and so does every other
      conv -> BN (-> act) chain a module's traced forward computes
      (googlenet's BasicConv2d, timm's ConvNormAct / BatchNormAct2d, the
      insides of blocks that are not replaced; ``recognize.heads``);
    - every BN (-> act) -> conv chain a module's traced forward computes
      (DenseNet layers and transitions, DPN's BnActConv2d, pre-activation
      blocks; ``recognize.prologues``) runs as ``bn_act_conv``, the BN and
      activation applied as the conv kernel loads its input;
    - every Conv2d -> BatchNorm (-> activation) run inside an
      ``nn.Sequential`` runs as one kernel (``resfuse.nn.FusedSequential``);
    - every HorNet gnconv (recognised by structure: proj_in, dwconv, pws,
      proj_out, scale) becomes ``resfuse.nn.GnConv`` (two kernels), and
      every HorNet Block / yoloair HorBlock ``resfuse.nn.FusedHorBlock``
      (its channels-first LayerNorm norm1 inside the projection kernel, the
      layer scale and residual inside the second);
    - every patchify conv (kernel = stride, no padding) fed by or feeding a
      channels-first LayerNorm (HorNet's / ConvNeXt's stems and
      downsampling layers; ``recognize.patchify``) runs with that
      LayerNorm as one ``patchify_conv`` kernel (``resfuse.nn.patchify``).

    backend: 'auto' | 'triton' | 'cuda' | 'eager', set on every fused module
        (``RESFUSE_BACKEND`` overrides 'auto' at run time).
    inplace: rewrite `model` itself instead of a deep copy.
    channels_last_weights: lay the fused convs' weights out channels-innermost
        (``lay_out_conv_weights``), so the Triton conv kernel reads them
        without a per-call repack and an NCHW input becomes channels_last at
        the first fused conv (the model's feature maps are then channels_last:
        ``.reshape``, not ``.view``). None (the default): where the kernels
        read them, i.e. the weights on CUDA now, and a fused module's weights
        when it is moved to CUDA later (``.to()``/``.cuda()``); weights on a
        CPU keep the model's strides, so the CPU fallback runs the original
        convolutions. True: every weight now (on a CPU too); False: none (the
        Triton path then repacks OIHW weights at every call). With new
        strides, eager convolutions (train mode, fallbacks) may round
        differently from the model as constructed (within the correctness
        rule).

    No parameter or buffer is moved or renamed (with ``channels_last_weights``
    the fused convs' weights keep their values and get other strides).
    Modules that do not match stay as they are; ``resfuse.explain`` says why.
    """
    dispatch.validate_backend(backend)
    if channels_last_weights is not None and not isinstance(channels_last_weights, bool):
        raise TypeError(f"channels_last_weights must be None or a bool, got {type(channels_last_weights).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, FusedResidualBlock) or not isinstance(match_block(model), str):
        model = fuse_block(model, backend) if not isinstance(model, FusedResidualBlock) else model
        model.backend = backend
    model = convert_gnconv(model, backend)
    absorbed = convert_blocks(model, backend)
    if isinstance(model, FusedResidualBlock) and model.spec.shortcut == "projection":
        absorbed.add(id(model._modules[model.spec.downsample]))
    convert_stems(model, backend)
    convert_chains(model, backend, absorbed)
    convert_patchify(model, backend, absorbed)
    for m in list(model.modules()):
        if id(m) in absorbed:
            continue  # a projection shortcut computed inside its block's last kernel
        if isinstance(m, FusedSequential):
            m.backend = backend
        elif is_plain_sequential(m) and any(isinstance(s, FusedGroup) for s in plan_sequential(m).steps):
            FusedSequential.from_sequential(m, backend)
    if channels_last_weights is None:
        for m in model.modules():
            if isinstance(m, (FusedModuleMixin, InPlaceBackendMixin)):
                m.__dict__["_channels_last_on_cuda"] = True  # read by their _apply (nn._call.MovesLayout)
        lay_out_conv_weights(model, cuda_only=True)
    elif channels_last_weights:
        lay_out_conv_weights(model)
    return model
