"""Drop-in fused modules."""

from .conv_bn_act import ConvBNAct, FusedSequential

__all__ = ["ConvBNAct", "FusedSequential"]
