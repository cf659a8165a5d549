"""Small helpers shared by the test modules."""

import sys

import torch


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def launches(kernel: str = "conv_bn_act") -> int:
    """How many times resfuse's Triton launcher for `kernel` has run (0
    before its module is first imported)."""
    mod = sys.modules.get(f"resfuse.kernels.{kernel}")
    return 0 if mod is None else mod.LAUNCHES


def same_weight_layout(plain: torch.nn.Module, fused: torch.nn.Module) -> torch.nn.Module:
    """Give `plain`'s parameters the strides `convert` gave `fused`'s
    (``channels_last_weights``: the fused convs' weights channels-innermost),
    values unchanged, and return `plain`. Eager convolutions with other
    weight strides may round differently, so a test that train mode runs
    the original modules *bitwise* compares against the same layout; the
    as-constructed model is compared by the numeric rule."""
    fused_params = dict(fused.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            q = fused_params[name]
            if p.dim() == 4 and q.is_contiguous(memory_format=torch.channels_last) and not q.is_contiguous():
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    return plain
