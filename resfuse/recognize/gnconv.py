"""HorNet's gnconv and HorBlock: proof that a module's forward computes
HorNet's (its structure, ``nn.gnconv.match_gnconv`` / ``match_horblock``,
and its traced forward against the references in ``recognize.references``),
and the pass of ``convert`` that replaces them. Registers the proofs that
``GnConv.from_module`` and ``FusedHorBlock.from_module`` ask for."""

from typing import Optional

import torch.nn as nn

from ..nn._provers import register_prover
from ..nn.gnconv import FusedHorBlock, GnConv, match_gnconv, match_horblock
from .dataflow import same_forward_reason
from .references import HorNetBlock, HorNetGnConv


def _forward_reason(m: nn.Module, reference: type) -> Optional[str]:
    """Why `m`'s own forward (for a fused module: the forward of the class it
    was made from) does not compute `reference`'s (HorNet's)."""
    src = m.__dict__.get("_source_cls", type(m)) if isinstance(m, (GnConv, FusedHorBlock)) else type(m)
    if src is None:  # built by resfuse, never had another forward
        return None
    why = same_forward_reason(m, reference, forward_of=src)
    return f"{src.__name__}.forward: {why}" if why else None


def gnconv_convert_reason(m: nn.Module) -> Optional[str]:
    """Why `m` may not be replaced by a GnConv: its structure, or a forward
    that does not compute HorNet's gnconv (None: it may)."""
    spec = match_gnconv(m)
    return spec if isinstance(spec, str) else _forward_reason(m, HorNetGnConv)


def horblock_convert_reason(m: nn.Module) -> Optional[str]:
    """Why `m` may not be replaced by a FusedHorBlock (None: it may)."""
    spec = match_horblock(m)
    if isinstance(spec, str):
        return spec
    why = gnconv_convert_reason(m._modules["gnconv"])
    return f"gnconv: {why}" if why else _forward_reason(m, HorNetBlock)


register_prover("gnconv", gnconv_convert_reason)
register_prover("horblock", horblock_convert_reason)


def convert_gnconv(model: nn.Module, backend: str) -> nn.Module:
    """Replace (in place) every gnconv-structured module of `model` by a
    GnConv and every HorBlock by a FusedHorBlock. Returns the model (a new
    object when `model` itself is one of them)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GnConv):
                child.backend = backend
            elif gnconv_convert_reason(child) is None:
                setattr(parent, name, GnConv.from_module(child, backend))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedHorBlock):
                child.backend = backend
            elif horblock_convert_reason(child) is None:
                setattr(parent, name, FusedHorBlock.from_module(child, backend))
    if isinstance(model, (GnConv, FusedHorBlock)):
        model.backend = backend
    elif horblock_convert_reason(model) is None:
        model = FusedHorBlock.from_module(model, backend)
    elif gnconv_convert_reason(model) is None:
        model = GnConv.from_module(model, backend)
    return model
