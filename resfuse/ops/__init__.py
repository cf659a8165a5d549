"""resfuse's ops, one module per op family. Each holds the op's schema
(``torch.library.custom_op``), fake kernel, problem and validation,
dispatch registration (eager / triton / cuda) and autograd; the kernels are
in ``resfuse.kernels`` (Triton) and ``resfuse._C`` (CUDA C++).

- ``conv_bn_act``: conv -> eval BN -> (+ residual) -> activation
- ``conv_bn_proj_act``: the same with a 1x1 conv + BN projection shortcut
  accumulated in the kernel
- ``bn_act_conv``: BN -> activation -> conv (-> BN -> activation), the
  input BN as the conv's prologue
- ``gnconv``: HorNet's LayerNorm + proj_in and the gnconv chain
  (``gnconv_cuda``: the cuda backend's composition of resfuse._C kernels,
  forward and backward)
- ``horblock_mlp``: GELU + pwconv2 + layer scale + residual of a HorBlock
- ``gnconv_backward``: the fused backward ops of gnconv and the HorBlock
  MLP, and the autograd of their forward ops
- ``patchify``: a patchify conv (kernel = stride) with a channels-first
  LayerNorm before or after it (HorNet / ConvNeXt stems and downsampling)
- ``common``: validation and allocation helpers they share

Importing this package registers every ``torch.ops.resfuse.*`` op.
"""

from . import conv_bn_act, conv_bn_proj_act, bn_act_conv  # noqa: F401  (register the conv ops)
from . import gnconv, horblock_mlp, gnconv_backward  # noqa: F401  (gnconv ops; their autograd last)
from . import patchify  # noqa: F401  (LayerNorm + patchify conv)
