"""The byte/FLOP model of the conv -> BN -> (+ residual) -> act family,
pools, Linear layers and residual blocks: what each benchmark case must at
least cost. The rules every part of the model shares (FLOPs, HBM traffic,
floors) are ``bench/model/rules.py``'s; this file applies them.
Hand-computed cases: tests/test_bench_model.py.

Counting rules
--------------
``e`` is the element size of the activations and weights, ``e_vec`` that
of the per-channel vectors (BN statistics and affine, conv bias).

FLOPs of a convolution (``mac_flops``: a multiply-add is 2)::

    flops = 2 * N * K * P * Q * (C / groups) * R * S

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

For a whole model the floor is the sum of its layers' floors (each layer
one kernel at best, ``rules.layers_floor``), its bytes the sum of its
layers' bytes; max-pool, global average pool and the classifier's Linear
layers count their input read and output write (and the Linear's weights
and 2*N*in*out FLOPs).

Residual blocks (``BlockSpec``, ``block_cost``)
-----------------------------------------------
A ResNet BasicBlock (conv1 3x3 -> bn1 -> relu, conv2 3x3 -> bn2, + shortcut,
relu) or Bottleneck (1x1, 3x3, 1x1; torchvision v1.5: the stride sits on the
3x3), input ``x`` of C x H x W, output ``y`` of K x P x Q, intermediate
activations ``h1`` (and ``h2``). The shortcut is the identity (C == K,
stride 1: the residual is ``x`` itself) or a projection ``downsample`` =
1x1 conv (stride s) -> BN, whose output ``d`` is K x P x Q. The 1x1
stride-s conv touches only every s-th row and column of ``x``:
``xs = N*C*P*Q`` elements, not N*C*H*W (with channels innermost, each
touched pixel is a contiguous run of C elements, so whole sectors are
skipped); ``wd = K*C``, ``bnd = 4*K``.

FLOPs: the sum of the block's convolutions (the projection's included),
each counted as above.

Fused block (what resfuse's fused ``BasicBlock`` / ``Bottleneck`` run in
eval: one kernel per conv of the main branch; each kernel reads its input,
weights and BN vectors once and writes its output once; the last kernel
also reads the shortcut)::

    BasicBlock   k1: x  + w1 + bn1 + h1
                 k2: h1 + w2 + bn2 + shortcut + y
    Bottleneck   k1: x  + w1 + bn1 + h1
                 k2: h1 + w2 + bn2 + h2
                 k3: h2 + w3 + bn3 + shortcut + y
    shortcut     identity:   x                  (read again: the residual)
                 projection: xs + wd + bnd      (the 1x1 conv + BN runs inside
                                                 the last kernel as a second
                                                 accumulation; d is never written)

So ``x`` is read twice (by the first and the last kernel) and each
intermediate activation is written once and read once. This is the floor
of the fused design, not of the block: a single kernel for the whole block
would not move h1/h2 at all.

Eager sequence (PyTorch eager, one kernel per module, as
``torchvision.models.resnet`` runs the block; in-place ReLU / ``+=`` move
the same bytes)::

    each conv       its input + its weight + its output   (z = conv(a))
    each BN         z + bn vectors + z                    (read, write)
    each ReLU       z + z                                 (bn1/bn2's, and the final one)
    downsample      xs + wd + d   then BN: d + bnd + d    (projection only)
    add             y + shortcut + y                      (shortcut = x or d)
    final ReLU      y + y

The eager projection conv also counts ``xs`` (the touched part of x), so
for a strided projection block the eager sum is ``N*C*(H*W - P*Q)*e``
below the sum of the per-layer ``conv_cost(...).unfused_bytes`` of the
same convs, which counts a conv's whole input tensor; otherwise the two
agree (tests/test_bench_model.py checks both).

Floor of a block: the sum of its fused kernels' floors
(``block_kernel_costs``; the projection's FLOPs and bytes belong to the
last kernel), as a whole model's floor is the sum of its layers'.
"""

from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Tuple

from .rules import ZERO, Cost, Floor, conv_out_size, elem_bytes, layers_floor, mac_flops

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
    return mac_flops(batch * spec.K * spec.P * spec.Q * (spec.C // spec.groups) * spec.R * spec.S)


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
    return Cost(mac_flops(batch * spec.fin * spec.fout), fused, fused + (2 * y if spec.act != "identity" else 0))


def layer_cost(spec, batch: int, dtype: str) -> Cost:
    if isinstance(spec, ConvSpec):
        return conv_cost(spec, batch, dtype)
    if isinstance(spec, PoolSpec):
        return pool_cost(spec, batch, dtype)
    if isinstance(spec, LinearSpec):
        return linear_cost(spec, batch, dtype)
    raise TypeError(f"no cost model for {type(spec).__name__}")


def model_cost(layers: Iterable[Tuple[str, object]], batch: int, dtype: str) -> Cost:
    """Total cost of a model's layer table (``bench.archs``)."""
    total = ZERO
    for _, spec in layers:
        total = total + layer_cost(spec, batch, dtype)
    return total


# ----------------------------------------------------------------------------
# Residual blocks
# ----------------------------------------------------------------------------

BLOCK_KINDS = {"basic": 1, "bottleneck": 4}  # kind -> expansion (K = planes * expansion)


@dataclass(frozen=True)
class BlockSpec:
    """One ResNet block, without the batch size (torchvision's layout).

    kind: 'basic' (two 3x3 convs) or 'bottleneck' (1x1, 3x3 with the
    stride, 1x1 expanding 4x); C, H, W: the block input; planes: the width
    of the inner convs; projection: whether the shortcut is a 1x1 conv + BN
    (None: torchvision's rule, stride != 1 or C != K).
    """
    kind: str
    C: int
    H: int
    W: int
    planes: int
    stride: int = 1
    projection: Optional[bool] = None
    eps: float = 1e-5

    def __post_init__(self):
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f"kind must be one of {sorted(BLOCK_KINDS)}, got {self.kind!r}")
        if self.projection is None:
            object.__setattr__(self, "projection", self.stride != 1 or self.C != self.K)
        if not self.projection and (self.stride != 1 or self.C != self.K):
            raise ValueError(f"an identity shortcut needs stride 1 and C == K, got stride {self.stride}, "
                             f"C={self.C}, K={self.K}")

    @property
    def K(self) -> int:
        return self.planes * BLOCK_KINDS[self.kind]

    @property
    def P(self) -> int:
        return conv_out_size(self.H, 3, self.stride, 1)

    @property
    def Q(self) -> int:
        return conv_out_size(self.W, 3, self.stride, 1)

    @property
    def shortcut(self) -> str:
        return "projection" if self.projection else "identity"

    def main_convs(self) -> List[Tuple[str, ConvSpec]]:
        """(module name, ConvSpec) of the main branch, in order; the last
        one carries the residual add and the block's final ReLU."""
        C, H, W, w, s, e = self.C, self.H, self.W, self.planes, self.stride, self.eps
        if self.kind == "basic":
            c1 = ConvSpec(C, H, W, w, 3, 3, stride=s, padding=1, eps=e)
            return [("conv1", c1), ("conv2", ConvSpec(w, c1.P, c1.Q, self.K, 3, 3, padding=1, residual=True, eps=e))]
        c1 = ConvSpec(C, H, W, w, 1, 1, eps=e)
        c2 = ConvSpec(w, H, W, w, 3, 3, stride=s, padding=1, eps=e)
        c3 = ConvSpec(w, c2.P, c2.Q, self.K, 1, 1, residual=True, eps=e)
        return [("conv1", c1), ("conv2", c2), ("conv3", c3)]

    def downsample_conv(self) -> Optional[ConvSpec]:
        """The projection's 1x1 conv -> BN (no activation), or None."""
        if not self.projection:
            return None
        return ConvSpec(self.C, self.H, self.W, self.K, 1, 1, stride=self.stride, act="identity", eps=self.eps)

    def convs(self) -> List[Tuple[str, ConvSpec]]:
        """Every conv of the block with its module name, in torchvision's
        execution order (the downsample runs after the main branch's convs)."""
        ds = self.downsample_conv()
        return self.main_convs() + ([("downsample.0", ds)] if ds is not None else [])

    def describe(self) -> str:
        """'bottleneck 64x56x56 -> 256x56x56 /s1 projection'."""
        return (f"{self.kind} {self.C}x{self.H}x{self.W} -> {self.K}x{self.P}x{self.Q} /s{self.stride} "
                f"{self.shortcut}")


def block_flops(spec: BlockSpec, batch: int) -> int:
    return sum(conv_flops(c, batch) for _, c in spec.convs())


def block_traffic(spec: BlockSpec, batch: int, dtype: str, vec_dtype: Optional[str] = None
                  ) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
    """(fused kernels, eager kernels): each a list of (kernel, bytes) in
    execution order, by the counting rules of the module docstring."""
    e, ev = elem_bytes(dtype), elem_bytes(vec_dtype or dtype)
    N = batch
    main = spec.main_convs()
    ds = spec.downsample_conv()

    def act(c: ConvSpec, h: int, w: int) -> int:  # an activation of c's output channels at h x w
        return N * c.K * h * w * e

    x = N * spec.C * spec.H * spec.W * e
    xs = N * spec.C * spec.P * spec.Q * e            # what the strided 1x1 projection touches
    y = N * spec.K * spec.P * spec.Q * e
    fused: List[Tuple[str, int]] = []
    eager: List[Tuple[str, int]] = []
    inp = x
    for i, (name, c) in enumerate(main):
        w = c.K * c.C * c.R * c.S * e
        bn = 4 * c.K * ev
        out = act(c, c.P, c.Q)
        last = i == len(main) - 1
        if not last:
            fused.append((f"{name}+bn+relu", inp + w + bn + out))
            eager += [(name, inp + w + out), (f"bn{i + 1}", 2 * out + bn), (f"relu{i + 1}", 2 * out)]
        else:
            if ds is None:
                short_fused, label = x, "+x"
            else:
                short_fused, label = xs + ds.K * ds.C * e + 4 * ds.K * ev, "+proj"
            fused.append((f"{name}+bn{label}+relu", inp + w + bn + short_fused + out))
            eager += [(name, inp + w + out), (f"bn{i + 1}", 2 * out + bn)]
        inp = out
    if ds is not None:
        d = y
        eager += [("downsample.0", xs + ds.K * ds.C * e + d), ("downsample.1", 2 * d + 4 * ds.K * ev)]
        eager.append(("add", y + d + y))
    else:
        eager.append(("add", y + x + y))
    eager.append(("relu", 2 * y))
    return fused, eager


def block_kernel_costs(spec: BlockSpec, batch: int, dtype: str, vec_dtype: Optional[str] = None) -> List[Cost]:
    """One Cost per fused kernel (FLOPs and bytes; ``unfused_bytes`` is the
    same kernel's bytes, the eager split being per module, not per kernel).
    The projection's FLOPs belong to the last kernel."""
    fused, _ = block_traffic(spec, batch, dtype, vec_dtype)
    flops = [conv_flops(c, batch) for _, c in spec.main_convs()]
    ds = spec.downsample_conv()
    if ds is not None:
        flops[-1] += conv_flops(ds, batch)
    return [Cost(f, b, b) for f, (_, b) in zip(flops, fused)]


def block_cost(spec: BlockSpec, batch: int, dtype: str, vec_dtype: Optional[str] = None) -> Cost:
    """FLOPs, fused-block bytes and eager-sequence bytes of one block (module docstring)."""
    fused, eager = block_traffic(spec, batch, dtype, vec_dtype)
    return Cost(block_flops(spec, batch), sum(b for _, b in fused), sum(b for _, b in eager))


def block_floor(spec: BlockSpec, batch: int, dtype: str, peak_flops: float, bandwidth: float) -> Floor:
    """Sum of the fused kernels' floors."""
    return layers_floor(block_kernel_costs(spec, batch, dtype), peak_flops, bandwidth)
