"""What every backend of the gnconv family's backward ops shares: the
problem, the gradient layout the fake kernels promise (``_finish``,
``_fake``), the per-op lists of inputs a gradient takes its layout from,
and the 1x1 conv weight / bias / layer-scale gradients from one GEMM.

Imported by ``gnconv_backward`` (the ops, eager and Triton) and by
``gnconv_cuda`` (the cuda composition), which therefore do not import
each other's internals.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .common import output_memory_format


@dataclass
class BackwardProblem:
    """The arguments of one backward op (validated by its forward)."""
    grad: torch.Tensor
    args: dict
    needs: List[bool]
    order: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def device(self):
        return self.grad.device

    @property
    def dtype(self):
        return self.grad.dtype


def _nothing(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for a gradient nobody asked for."""
    return like.new_empty(0)


def _activation_like(t: torch.Tensor, channels: Optional[int] = None, poison: bool = False) -> torch.Tensor:
    """An empty tensor with t's shape (or `channels` channels) in the memory
    format outputs follow; with `poison` and RESFUSE_POISON_OUTPUTS=1 (the
    tests) it starts as NaN, so an element no kernel writes fails."""
    shape = tuple(t.shape) if channels is None else (t.shape[0], channels, *t.shape[2:])
    out = torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=output_memory_format(t))
    if poison and os.environ.get("RESFUSE_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out


def _finish(grads, likes, needs):
    """Needed gradients in a fixed layout (4-D activations in their input's
    memory format, everything else contiguous) and the dtype of their input
    (the fake kernels promise exactly this); placeholders for the rest."""
    out = []
    for g, like, need in zip(grads, likes, needs):
        if not need or like is None:
            out.append(_nothing(likes[0]))
            continue
        if g is None:
            g = torch.zeros_like(like)
        fmt = output_memory_format(like) if like.dim() == 4 and like.shape[-1] * like.shape[-2] > 1 \
            else torch.contiguous_format
        out.append(g.to(like.dtype).reshape(like.shape).contiguous(memory_format=fmt))
    return out


def _fake(likes, needs):
    out = []
    for like, need in zip(likes, needs):
        if not need or like is None:
            out.append(likes[0].new_empty(0))
        elif like.dim() == 4 and like.shape[-1] * like.shape[-2] > 1:
            out.append(_activation_like(like))
        else:
            out.append(torch.empty(like.shape, dtype=like.dtype, device=like.device))
    return out


def _scale_grads(G, rs, weight, bias, layer_scale, needs_w, needs_b, needs_ls):
    """From G = sum_p (dout * ss) in^T and rs = rowsum(dout * ss) (fp32) of a
    1x1 conv whose output is scaled by layer_scale: its weight, bias and
    layer-scale gradients (d ls = rowsum(W * G) + b * rs)."""
    ls = None if layer_scale is None else layer_scale.float()
    w2 = weight.reshape(weight.shape[0], -1).float()
    dw = db = dls = None
    if needs_w:
        dw = G * ls[:, None] if ls is not None else G
    if needs_b and rs is not None:
        db = rs * ls if ls is not None else rs
    if needs_ls:
        dls = (w2 * G).sum(1)
        if bias is not None:
            dls = dls + bias.float() * rs
    return dw, db, dls


def _proj_likes(p):
    a = p.args
    return [a["x"], a["weight"], a["bias"], a["norm_weight"], a["norm_bias"]]


def _chain_likes(p):
    a = p.args
    return ([a["fused"], a["w_dw"], a["b_dw"], a["gates"], a["w_out"], a["b_out"], a["layer_scale"]]
            + list(a["w_pws"]) + list(a["b_pws"]))


def _chain_needs(p):
    """One flag per returned gradient: 7, then one per pws weight, then one
    per pws bias."""
    n = len(p.args["w_pws"])
    if len(p.needs) != 7 + 2 * n:
        raise ValueError(f"needs must have 7 + 2 * len(w_pws) = {7 + 2 * n} flags, got {len(p.needs)}")
    return list(p.needs)


def _gelu_likes(p):
    a = p.args
    return [a["a"], a["weight"], a["bias"], a["layer_scale"]]
