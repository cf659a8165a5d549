"""Drop-in fused modules."""

from .blocks import BasicBlock, Bottleneck, FusedResidualBlock, fuse_block
from .conv_bn_act import BNActConv, ConvBNAct, FusedSequential
from .gnconv import FusedHorBlock, GnConv
from .stem import ConvBNHead, FoldedBatchNorm2d

__all__ = ["ConvBNAct", "BNActConv", "FusedSequential", "BasicBlock", "Bottleneck", "FusedResidualBlock", "fuse_block",
           "ConvBNHead", "FoldedBatchNorm2d", "GnConv", "FusedHorBlock"]
