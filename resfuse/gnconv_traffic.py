"""Byte and FLOP model of HorNet's gnconv: eager vs fused (pure Python, no
torch, so ``bench/`` can import it anywhere).

Same counting rules as ``bench/model.py``: one forward of a batch of N
images, ``e`` bytes per element; each kernel reads its operands from HBM
and writes its result to HBM; a fused kernel reads each input once and
writes each output once (re-reads served by L1/L2 are not HBM bytes);
weights and per-channel vectors count once. FLOPs count the convolutions
(multiply-add = 2); elementwise gates and scales are not counted.

Per pixel, with dims = [d0, 2 d0, ..., D] (order o), S = sum(dims) = 2D - d0,
k x k depthwise, in elements:

eager (HorNet's code, one kernel per op, 2o + 3 launches)::

    proj_in             D  + 2D
    dwconv(abc)         S  + S
    * scale             S  + S
    pwa * dw_0          2 d0 + d0
    per stage i < o-1   pws: dims[i] + dims[i+1];  gate: 2 dims[i+1] + dims[i+1]
    proj_out            D  + D
    norm1 (HorBlock)    14D + 9 over 10 kernels (mean, sub, pow, mean, sub, +eps,
                        sqrt, div, *weight, +bias, as HorNet's LayerNorm runs)
    residual            gamma1 * y: 2D;  x + .: 3D   (2 kernels)

fused (resfuse: kernels/gnconv.py, 2 launches)::

    kernel 1  LN? + proj_in       x: D read, f: 2D written
    kernel 2  dw + gates + chain  f: 2D read (pwa d0 + abc S), y: D written,
              + proj_out (+res)   residual: D read

stepwise (the per-op fusion: dw + bias + scale + first gate in one kernel
that reads f once and writes x_0 and the other gates, then one GEMM per
gated 1x1 with its gate in the epilogue; o + 2 launches)::

    kernel 1  D + 2D;   dw kernel  2D + S;   gated 1x1 i  dims[i] + 2 dims[i+1];
    proj_out  D + D (+ D residual)

minimal (one kernel for everything, which the depthwise halo rules out
without recomputing the projection): x read, y written (+ residual).
"""

from dataclasses import dataclass
from typing import List, Tuple

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

#: HorNet-T (hornet_tiny_7x7) stages at a 224x224 input: (dim, order, H=W).
#: Every stage uses s = 1/3.
HORNET_T_STAGES: Tuple[Tuple[int, int, int], ...] = ((64, 2, 56), (128, 3, 28), (256, 4, 14), (512, 5, 7))


def gnconv_dims(dim: int, order: int) -> List[int]:
    if order < 1 or dim < 1 or dim % (1 << (order - 1)):
        raise ValueError(f"dim={dim} must be a positive multiple of 2^(order-1), order={order} >= 1")
    return [dim >> (order - 1 - i) for i in range(order)]


@dataclass(frozen=True)
class GnConvTraffic:
    """FLOPs, HBM bytes and launches of one gnconv forward."""
    flops: int
    weight_bytes: int
    eager_bytes: int
    fused_bytes: int
    stepwise_bytes: int
    minimal_bytes: int
    eager_launches: int
    fused_launches: int
    stepwise_launches: int

    @property
    def saving(self) -> float:
        """eager bytes / fused bytes."""
        return self.eager_bytes / self.fused_bytes


def gnconv_bytes(dim: int, order: int, H: int, W: int, batch: int, dtype: str = "float16", *,
                 ksize: int = 7, norm: bool = False, residual: bool = False) -> GnConvTraffic:
    """The model of the module docstring. ``norm``: HorBlock's norm1 feeds
    proj_in (eager: HorNet's 10-kernel LayerNorm; fused: kernel 1's
    prologue). ``residual``: ``x + gamma1 * y`` follows (eager: 2 kernels;
    fused: kernel 2's epilogue)."""
    try:
        e = DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}") from None
    dims = gnconv_dims(dim, order)
    D, d0, S, k2 = dim, dims[0], sum(dims), ksize * ksize
    P = batch * H * W
    pairs = list(zip(dims[:-1], dims[1:]))

    weights = (2 * D * D + 2 * D) + (S * k2 + S) + sum(a * b + b for a, b in pairs) + (D * D + D)
    weights += (2 * D if norm else 0) + (D if residual else 0)
    flops = 2 * P * (2 * D * D + S * k2 + sum(a * b for a, b in pairs) + D * D)

    eager_px = (D + 2 * D) + 2 * S + 2 * S + 3 * d0 + sum(a + b + 3 * b for a, b in pairs) + 2 * D
    eager_w = weights - (2 * D if norm else 0) - (D if residual else 0)
    eager_vec = 0
    if norm:
        eager_px += 14 * D + 9
        eager_vec += 2 * D
    if residual:
        eager_px += 5 * D
        eager_vec += D
    res = D if residual else 0
    fused_px = 3 * D + 2 * D + D + res
    stepwise_px = 3 * D + (2 * D + S) + sum(a + 2 * b for a, b in pairs) + 2 * D + res
    minimal_px = 2 * D + res

    def total(px):
        return px * P * e + weights * e

    return GnConvTraffic(
        flops=flops, weight_bytes=weights * e,
        eager_bytes=eager_px * P * e + (eager_w + eager_vec) * e,
        fused_bytes=total(fused_px), stepwise_bytes=total(stepwise_px), minimal_bytes=total(minimal_px),
        eager_launches=2 * order + 3 + (10 if norm else 0) + (2 if residual else 0),
        fused_launches=2, stepwise_launches=order + 2,
    )


def hornet_t_table(batch: int = 32, dtype: str = "float16", **kw) -> List[Tuple[int, int, int, GnConvTraffic]]:
    """(dim, order, H, traffic) for each HorNet-T stage."""
    return [(d, o, h, gnconv_bytes(d, o, h, h, batch, dtype, **kw)) for d, o, h in HORNET_T_STAGES]


if __name__ == "__main__":  # python -m resfuse.gnconv_traffic
    for kw in ({}, {"norm": True, "residual": True}):
        print(f"HorNet-T gnconv, batch 32, fp16{' + norm1 + residual' if kw else ''}:")
        print(f"  {'stage':<22}{'eager MB':>10}{'fused MB':>10}{'stepwise':>10}{'minimal':>10}"
              f"{'x less':>8}{'launches':>10}{'GFLOP':>8}")
        for d, o, h, t in hornet_t_table(**kw):
            print(f"  D={d:<4} o={o} {h}x{h:<8}{t.eager_bytes / 1e6:>10.1f}{t.fused_bytes / 1e6:>10.1f}"
                  f"{t.stepwise_bytes / 1e6:>10.1f}{t.minimal_bytes / 1e6:>10.1f}{t.saving:>8.2f}"
                  f"{t.eager_launches:>6} -> {t.fused_launches}{t.flops / 1e9:>8.1f}")
