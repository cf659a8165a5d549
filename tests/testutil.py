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
