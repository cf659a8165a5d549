"""The FLOP/byte model: what each benchmark case must at least cost.

Pure Python (no torch), so it runs anywhere and is tested on hand-computed
cases (tests/test_bench_model.py).

Counting rules
--------------
All sizes are for one forward call on a batch of N images; ``e`` is the
element size of the activations and weights, ``e_vec`` that of the
per-channel vectors (BN statistics and affine, conv bias).

FLOPs of a convolution (multiply and add counted as 2)::

    flops = 2 * N * K * P * Q * (C / groups) * R * S

The epilogue (scale, shift, residual add, activation: a handful of
operations per output element) is not counted: it is O(N*K*P*Q), at most
~1/(C*R*S) of the conv, and never what bounds the time.

Minimal HBM bytes of the fused conv -> BN -> (+ residual) -> act (each
input read once, each output written once, weights once)::

    fused = x + w + bias + bn + residual + y
      x = N*C*H*W*e   w = K*(C/groups)*R*S*e   y = residual = N*K*P*Q*e
      bias = K*e_vec (if the conv has one)   bn = 4*K*e_vec (mean, var, gamma, beta)

Bytes of the unfused eager sequence (one kernel per module, as PyTorch runs
Conv2d -> BatchNorm2d -> add -> ReLU; each kernel reads its operands from
and writes its result to HBM; in-place ops move the same bytes)::

    conv      x + w + bias + y       (z = conv(x))
    batchnorm y + bn + y             (z' = bn(z))
    add       y + residual + y       (only with a residual)
    act       y + y                  (only when act is not identity)

so ``unfused = fused + 2y (BN) + 2y (add, if any) + 2y (act, if any)``:
x + w + bn + 5y for conv-BN-ReLU, x + w + bn + 8y with a residual. This is
a lower bound for the eager sequence too (cuDNN may re-read x).

Floor time, from measured ceilings (``Ceilings``)::

    floor = max(flops / peak_flops[dtype], fused_bytes / bandwidth)

and "% of floor" of a measured time t is ``100 * floor / t``. For a whole
model the floor is the sum of its layers' floors (each layer one kernel at
best), its bytes the sum of its layers' bytes; max-pool, global average
pool and the classifier's Linear layers count their input read and output
write (and the Linear's weights and 2*N*in*out FLOPs).
"""

from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, Optional, Tuple

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def elem_bytes(dtype: str) -> int:
    """Bytes of one element of a dtype given by name ('bfloat16', ...)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}") from None


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


@dataclass(frozen=True)
class ConvSpec:
    """One conv -> BN -> (+ residual) -> act op, without the batch size.

    C, H, W: input channels and spatial size; K: output channels;
    R, S: kernel height and width.
    """
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    bn: bool = True
    residual: bool = False
    act: str = "relu"
    eps: float = 1e-5

    def __post_init__(self):
        if self.C % self.groups or self.K % self.groups:
            raise ValueError(f"C={self.C} and K={self.K} must be divisible by groups={self.groups}")
        if self.P < 1 or self.Q < 1:
            raise ValueError(f"empty output for {self}")

    @property
    def P(self) -> int:
        return conv_out_size(self.H, self.R, self.stride, self.padding, self.dilation)

    @property
    def Q(self) -> int:
        return conv_out_size(self.W, self.S, self.stride, self.padding, self.dilation)

    @property
    def epilogue(self) -> str:
        """'bn', 'bn+relu', 'bn+add+relu', ... (what follows the conv)."""
        parts = (["bn"] if self.bn else []) + (["add"] if self.residual else []) + \
                ([self.act] if self.act != "identity" else [])
        return "+".join(parts) or "none"

    def describe(self) -> str:
        """'64x56x56 -> 64x56x56 3x3/s1 bn+relu'."""
        return (f"{self.C}x{self.H}x{self.W} -> {self.K}x{self.P}x{self.Q} "
                f"{self.R}x{self.S}/s{self.stride}" + (f"/g{self.groups}" if self.groups > 1 else "")
                + f" {self.epilogue}")

    def with_(self, **changes) -> "ConvSpec":
        return replace(self, **changes)


def conv_flops(spec: ConvSpec, batch: int) -> int:
    return 2 * batch * spec.K * spec.P * spec.Q * (spec.C // spec.groups) * spec.R * spec.S


def conv_tensor_bytes(spec: ConvSpec, batch: int, e: int, e_vec: Optional[int] = None) -> Dict[str, int]:
    """Bytes of each tensor the op touches: x, w, bias, bn, residual, y."""
    e_vec = e if e_vec is None else e_vec
    y = batch * spec.K * spec.P * spec.Q * e
    return {
        "x": batch * spec.C * spec.H * spec.W * e,
        "w": spec.K * (spec.C // spec.groups) * spec.R * spec.S * e,
        "bias": spec.K * e_vec if spec.bias else 0,
        "bn": 4 * spec.K * e_vec if spec.bn else 0,
        "residual": y if spec.residual else 0,
        "y": y,
    }


def conv_cost(spec: ConvSpec, batch: int, dtype: str, vec_dtype: Optional[str] = None) -> Cost:
    """FLOPs, fused minimal bytes and unfused eager bytes (module docstring)."""
    t = conv_tensor_bytes(spec, batch, elem_bytes(dtype), elem_bytes(vec_dtype or dtype))
    fused = sum(t.values())
    y = t["y"]
    extra = (2 * y if spec.bn else 0) + (2 * y if spec.residual else 0) + (2 * y if spec.act != "identity" else 0)
    return Cost(conv_flops(spec, batch), fused, fused + extra)


@dataclass(frozen=True)
class PoolSpec:
    """Max pool (kernel, stride, padding) or, with ``kernel=0``, adaptive
    average pool to ``out`` x ``out`` (1: global average pool)."""
    C: int
    H: int
    W: int
    kernel: int = 0
    stride: int = 1
    padding: int = 0
    out: int = 1

    @property
    def P(self) -> int:
        return self.out if self.kernel == 0 else conv_out_size(self.H, self.kernel, self.stride, self.padding)

    @property
    def Q(self) -> int:
        return self.out if self.kernel == 0 else conv_out_size(self.W, self.kernel, self.stride, self.padding)


def pool_cost(spec: PoolSpec, batch: int, dtype: str) -> Cost:
    e = elem_bytes(dtype)
    b = batch * spec.C * (spec.H * spec.W + spec.P * spec.Q) * e
    return Cost(0, b, b)


@dataclass(frozen=True)
class LinearSpec:
    fin: int
    fout: int
    bias: bool = True
    act: str = "identity"  # a following ReLU (VGG's classifier) is one more read+write unfused


def linear_cost(spec: LinearSpec, batch: int, dtype: str) -> Cost:
    e = elem_bytes(dtype)
    y = batch * spec.fout * e
    fused = batch * spec.fin * e + spec.fin * spec.fout * e + (spec.fout * e if spec.bias else 0) + y
    return Cost(2 * batch * spec.fin * spec.fout, fused, fused + (2 * y if spec.act != "identity" else 0))


def layer_cost(spec, batch: int, dtype: str) -> Cost:
    if isinstance(spec, ConvSpec):
        return conv_cost(spec, batch, dtype)
    if isinstance(spec, PoolSpec):
        return pool_cost(spec, batch, dtype)
    if isinstance(spec, LinearSpec):
        return linear_cost(spec, batch, dtype)
    raise TypeError(f"no cost model for {type(spec).__name__}")


# ----------------------------------------------------------------------------
# Ceilings and floors
# ----------------------------------------------------------------------------

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


def model_cost(layers: Iterable[Tuple[str, object]], batch: int, dtype: str) -> Cost:
    """Total cost of a model's layer table (``bench.archs``)."""
    total = ZERO
    for _, spec in layers:
        total = total + layer_cost(spec, batch, dtype)
    return total
