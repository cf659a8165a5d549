"""resfuse: fused GPU kernels for convolutional networks.

    import resfuse
    fast = resfuse.convert(model)        # fuses conv -> BN -> (ReLU) runs, HorNet's gnconv
    print(resfuse.explain(fast))         # what runs where, and why

Importing resfuse needs neither a GPU, Triton nor the CUDA extension; the
kernels are imported on first use.
"""

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers torch.ops.resfuse.*)
from . import nn  # noqa: F401
from . import recognize  # noqa: F401  (registers the proofs nn's from_module constructors ask for)
from .convert import convert
from .dispatch import BACKENDS, BackendUnavailable, last_decision
from .explain import explain
from .ops.bn_act_conv import bn_act_conv
from .ops.conv_bn_act import conv_bn_act
from .ops.conv_bn_proj_act import conv_bn_proj_act
from .ops.gnconv import gnconv, gnconv_chain, layernorm_conv1x1
from .ops.horblock_mlp import gelu_conv1x1
from .ops.patchify import patchify_conv
from .reference import bn_act_conv_reference, conv_bn_act_reference, gnconv_reference

__all__ = ["convert", "explain", "conv_bn_act", "conv_bn_proj_act", "bn_act_conv", "conv_bn_act_reference",
           "bn_act_conv_reference", "gnconv",
           "gnconv_chain", "layernorm_conv1x1", "gelu_conv1x1", "patchify_conv", "gnconv_reference", "nn", "ops",
           "BACKENDS", "BackendUnavailable", "last_decision", "__version__"]
