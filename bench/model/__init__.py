"""The benchmark's one byte/FLOP model (pure Python, no torch).

- ``rules``: the counting rules every part shares (bytes per element and
  per statistic, a multiply-add is 2 FLOPs, HBM traffic per kernel,
  ``Cost``, ceilings and floors);
- ``conv``: conv -> BN -> (+ residual) -> act, pools, Linear layers,
  residual blocks, whole models' layer tables;
- ``gnconv``: HorNet's gnconv and HorBlock, eager and fused, forward and
  training, step by step (``python -m bench.model.gnconv`` prints its
  tables);
- ``patchify``: HorNet's stem and downsampling layers (a patchify conv
  with a channels-first LayerNorm before or after), eager and fused
  (``python -m bench.model.patchify`` prints HorNet-T's table).

The names below are the model's public API, each defined once in the file
that says so; ``bench.model.X`` is the short way to reach them. ``gnconv``
and ``patchify`` are imported by name (``bench.model.gnconv``): they use
resfuse (torch), which ``import bench.model`` does not load.
"""

from .conv import (BLOCK_KINDS, BlockSpec, ConvSpec, LinearSpec, PoolSpec, block_cost, block_flops, block_floor,
                   block_kernel_costs, block_traffic, conv_cost, conv_flops, conv_tensor_bytes, layer_cost,
                   linear_cost, model_cost, pool_cost)
from .rules import (DTYPE_BYTES, ZERO, Ceilings, Cost, Floor, arithmetic_intensity, conv_out_size, elem_bytes,
                    floor_time, fraction_of_floor, layers_floor, mac_flops, stat_bytes)

__all__ = ["BLOCK_KINDS", "BlockSpec", "ConvSpec", "LinearSpec", "PoolSpec", "block_cost", "block_flops",
           "block_floor", "block_kernel_costs", "block_traffic", "conv_cost", "conv_flops", "conv_tensor_bytes",
           "layer_cost", "linear_cost", "model_cost", "pool_cost", "DTYPE_BYTES", "ZERO", "Ceilings", "Cost", "Floor",
           "arithmetic_intensity", "conv_out_size", "elem_bytes", "floor_time", "fraction_of_floor", "layers_floor",
           "mac_flops", "stat_bytes"]
