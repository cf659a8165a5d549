"""Layer tables of the benchmark models, in plain Python (no torch).

Each table is a list of ``(name, spec)`` in execution order, the names
being the module names of the torchvision model (and of ``bench.models``,
which builds the same structure without torchvision): ``conv1`` for the
ResNet stem, ``layer2.0.conv2``, ``layer2.0.downsample.0``, ``features.0``.
A ``ConvSpec`` stands for the whole conv -> BN -> (+ residual) -> act run
that starts at that conv.

``resnet_blocks`` lists the same ResNets by residual block (``layer2.0``,
a ``BlockSpec`` each), whose convs are the table's convs under that prefix.

tests/test_bench_model.py checks these tables against the modules that
``bench.models`` builds (and against torchvision where it is importable).
"""

from collections import OrderedDict
from typing import Dict, List, Tuple

from .model import BlockSpec, ConvSpec, LinearSpec, PoolSpec

Layer = Tuple[str, object]

RESNET_BLOCKS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def resnet_layers(depth: int, image: int = 224, num_classes: int = 1000) -> List[Layer]:
    """torchvision's ResNet-`depth` (v1.5: the stride sits on the 3x3 conv)."""
    kind, blocks = RESNET_BLOCKS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    layers: List[Layer] = [("conv1", ConvSpec(3, image, image, 64, 7, 7, stride=2, padding=3))]
    h = layers[0][1].P
    layers.append(("maxpool", PoolSpec(64, h, h, kernel=3, stride=2, padding=1)))
    h = layers[-1][1].P
    cin = 64
    for stage, (n_blocks, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for b in range(n_blocks):
            stride = 2 if (b == 0 and stage > 1) else 1
            pre = f"layer{stage}.{b}"
            cout = width * expansion
            if kind == "bottleneck":
                c1 = ConvSpec(cin, h, h, width, 1, 1)
                c2 = ConvSpec(width, h, h, width, 3, 3, stride=stride, padding=1)
                ho = c2.P
                c3 = ConvSpec(width, ho, ho, cout, 1, 1, residual=True)
                block = [(f"{pre}.conv1", c1), (f"{pre}.conv2", c2), (f"{pre}.conv3", c3)]
            else:
                c1 = ConvSpec(cin, h, h, width, 3, 3, stride=stride, padding=1)
                ho = c1.P
                c2 = ConvSpec(width, ho, ho, cout, 3, 3, padding=1, residual=True)
                block = [(f"{pre}.conv1", c1), (f"{pre}.conv2", c2)]
            if stride != 1 or cin != cout:
                # torchvision runs the shortcut after the main branch's convs
                block.append((f"{pre}.downsample.0",
                              ConvSpec(cin, h, h, cout, 1, 1, stride=stride, act="identity")))
            layers.extend(block)
            cin, h = cout, ho
    layers.append(("avgpool", PoolSpec(cin, h, h)))
    layers.append(("fc", LinearSpec(cin, num_classes)))
    return layers


def vgg16_bn_layers(image: int = 224, num_classes: int = 1000) -> List[Layer]:
    """torchvision's vgg16_bn: 13 conv(bias) -> BN -> ReLU, 5 max pools,
    AdaptiveAvgPool2d(7) and the 3-layer classifier."""
    layers: List[Layer] = []
    cin, h, idx = 3, image, 0
    for v in VGG16_CFG:
        if v == "M":
            pool = PoolSpec(cin, h, h, kernel=2, stride=2)
            layers.append((f"features.{idx}", pool))
            h = pool.P
            idx += 1
        else:
            layers.append((f"features.{idx}", ConvSpec(cin, h, h, v, 3, 3, padding=1, bias=True)))
            cin = v
            idx += 3  # conv, bn, relu
    # AdaptiveAvgPool2d((7, 7)): a copy at 224 input (7x7 -> 7x7), still one kernel
    layers.append(("avgpool", PoolSpec(cin, h, h, out=7)))
    layers.append(("classifier.0", LinearSpec(cin * 7 * 7, 4096, act="relu")))
    layers.append(("classifier.3", LinearSpec(4096, 4096, act="relu")))
    layers.append(("classifier.6", LinearSpec(4096, num_classes)))
    return layers


ARCHS = {
    "resnet18": lambda image=224: resnet_layers(18, image),
    "resnet50": lambda image=224: resnet_layers(50, image),
    "vgg16_bn": vgg16_bn_layers,
}


def conv_layers(layers: List[Layer]) -> List[Tuple[str, ConvSpec]]:
    return [(n, s) for n, s in layers if isinstance(s, ConvSpec)]


def distinct_convs(layers: List[Layer]) -> "OrderedDict[ConvSpec, List[str]]":
    """Each distinct conv op (geometry and epilogue) with the names of the
    layers that are that op, in order of first appearance."""
    out: Dict[ConvSpec, List[str]] = OrderedDict()
    for name, spec in conv_layers(layers):
        out.setdefault(spec, []).append(name)
    return out


def resnet_blocks(depth: int, image: int = 224) -> List[Tuple[str, BlockSpec]]:
    """torchvision's ResNet-`depth` as its residual blocks ('layer1.0', ...)."""
    kind, blocks = RESNET_BLOCKS[depth]
    stem = ConvSpec(3, image, image, 64, 7, 7, stride=2, padding=3)
    h = PoolSpec(64, stem.P, stem.P, kernel=3, stride=2, padding=1).P
    cin = 64
    out: List[Tuple[str, BlockSpec]] = []
    for stage, (n_blocks, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for b in range(n_blocks):
            spec = BlockSpec(kind, cin, h, h, width, stride=2 if (b == 0 and stage > 1) else 1)
            out.append((f"layer{stage}.{b}", spec))
            cin, h = spec.K, spec.P
    return out


RESNET_BLOCK_ARCHS = {"resnet18": 18, "resnet50": 50}


def distinct_blocks(blocks: List[Tuple[str, BlockSpec]]) -> "OrderedDict[BlockSpec, List[str]]":
    """Each distinct block shape with the names of the blocks that have it,
    in order of first appearance."""
    out: Dict[BlockSpec, List[str]] = OrderedDict()
    for name, spec in blocks:
        out.setdefault(spec, []).append(name)
    return out


def friendly_name(arch: str, layer_name: str) -> str:
    """'layer2.0.conv2' -> 'conv3_x.0.conv2' (the ResNet paper's stage
    names); 'conv1' -> 'stem'; other names unchanged."""
    if arch.startswith("resnet"):
        if layer_name == "conv1":
            return "stem"
        if layer_name.startswith("layer"):
            stage, rest = layer_name.split(".", 1)
            return f"conv{int(stage[5:]) + 1}_x.{rest}"
    return layer_name
