"""The counting rules every part of the byte/FLOP model uses (bench/model/:
``conv`` for the conv -> BN -> act family and residual blocks, ``gnconv``
for HorNet's gnconv and HorBlock). Pure Python (no torch).

- One call, a batch of N images; ``e`` bytes per element (``elem_bytes``).
- FLOPs count multiply-adds as 2 (``mac_flops``): convolutions and GEMMs
  only; epilogues (scale, shift, residual, activation, gates) are not
  counted (a handful of operations per output element, never what bounds
  the time).
- Each kernel reads its operands from HBM and writes its result to HBM; a
  fused kernel reads each input once and writes each output once (re-reads
  served by L1/L2 are not HBM bytes); weights and per-channel vectors count
  once per call. In-place ops move the same bytes.
- Normalisation statistics (mean, rstd) are float32, float64 for float64
  inputs (``stat_bytes``).

Floor time, from measured ceilings (``Ceilings``)::

    floor = max(flops / peak_flops[dtype], fused_bytes / bandwidth)

and "% of floor" of a measured time t is ``100 * floor / t``. A sequence
of kernels (a block, a whole model) has the sum of its kernels' floors
(``layers_floor``).
"""

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def elem_bytes(dtype: str) -> int:
    """Bytes of one element of a dtype given by name ('bfloat16', ...)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}") from None


def stat_bytes(dtype: str) -> int:
    """Bytes of one normalisation statistic (mean, rstd) for activations of
    ``dtype``: float32, float64 for float64."""
    return max(4, elem_bytes(dtype))


def mac_flops(macs: int) -> int:
    """FLOPs of ``macs`` multiply-adds (2 each)."""
    return 2 * macs


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one call. ``unfused_bytes`` equals ``fused_bytes``
    for an op that is one kernel either way (a pool, a Linear)."""
    flops: int
    fused_bytes: int
    unfused_bytes: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.fused_bytes + other.fused_bytes,
                    self.unfused_bytes + other.unfused_bytes)


ZERO = Cost(0, 0, 0)




@dataclass
class Ceilings:
    """Measured limits of the device: copy bandwidth (bytes read + written
    per second) and matmul rate per dtype (FLOP/s). ``source`` says where
    they come from ('cuda: NVIDIA H100 ...', 'cpu', 'given')."""
    bandwidth: float
    matmul: Dict[str, float] = field(default_factory=dict)
    source: str = "given"

    def peak(self, dtype: str) -> Optional[float]:
        return self.matmul.get(dtype)


@dataclass(frozen=True)
class Floor:
    seconds: float
    compute_s: float
    memory_s: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def floor_time(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> Floor:
    """max(flops / peak, bytes / bandwidth), with both terms kept."""
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError("ceilings must be positive")
    c, m = flops / peak_flops, nbytes / bandwidth
    return Floor(max(c, m), c, m)


def layers_floor(costs: Iterable[Cost], peak_flops: float, bandwidth: float) -> Floor:
    """Sum of per-layer floors (a whole model, one kernel per layer at best)."""
    total, comp, mem = 0.0, 0.0, 0.0
    for c in costs:
        f = floor_time(c.flops, c.fused_bytes, peak_flops, bandwidth)
        total, comp, mem = total + f.seconds, comp + f.compute_s, mem + f.memory_s
    return Floor(total, comp, mem)


def fraction_of_floor(floor_s: float, measured_s: float) -> float:
    """Achieved fraction of the floor: 1.0 means running at the floor."""
    if measured_s <= 0:
        raise ValueError("measured time must be positive")
    return floor_s / measured_s


def arithmetic_intensity(cost: Cost) -> float:
    """FLOPs per minimal byte."""
    return cost.flops / cost.fused_bytes if cost.fused_bytes else float("inf")
