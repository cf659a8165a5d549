"""bench/: the FLOP/byte model on hand-computed cases, the layer tables
against the models they describe, the case registry, and the CPU path of
bench/run.py and bench/device_check.sh --dry-run."""

import contextlib
import csv
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is not installed; it is imported from the checkout
    sys.path.insert(0, ROOT)

from bench import archs, cases, report, timing  # noqa: E402
from bench import model as m  # noqa: E402
from bench.models import build, make_model, torchvision_builder  # noqa: E402
import numerics  # noqa: E402
from numerics import rel_err, tolerance  # noqa: E402


# ----------------------------------------------------------------------------
# The model, by hand
# ----------------------------------------------------------------------------

def test_conv3x3_64_56_batch1_fp32_by_hand():
    spec = m.ConvSpec(64, 56, 56, 64, 3, 3, padding=1)  # conv -> BN -> ReLU
    assert (spec.P, spec.Q) == (56, 56)
    assert m.conv_flops(spec, 1) == 2 * 1 * 64 * 56 * 56 * 64 * 9 == 231_211_008
    x = 64 * 56 * 56 * 4            # 802,816
    w = 64 * 64 * 9 * 4             # 147,456
    bn = 4 * 64 * 4                 # mean, var, gamma, beta: 1,024
    y = 64 * 56 * 56 * 4            # 802,816
    c = m.conv_cost(spec, 1, "float32")
    assert c.fused_bytes == x + w + bn + y == 1_754_112
    # conv (x + w + y) + BN (y + bn + y) + ReLU (y + y)
    assert c.unfused_bytes == (x + w + y) + (y + bn + y) + (y + y) == 4_965_376


def test_residual_and_batch_and_dtype_by_hand():
    spec = m.ConvSpec(64, 56, 56, 64, 3, 3, padding=1, residual=True)
    c = m.conv_cost(spec, 8, "bfloat16")
    x = y = 8 * 64 * 56 * 56 * 2
    w, bn = 64 * 64 * 9 * 2, 4 * 64 * 2
    assert c.fused_bytes == x + w + bn + y + y  # the residual is read once
    # conv, BN, add (y + res + y), ReLU
    assert c.unfused_bytes == (x + w + y) + (y + bn + y) + (y + y + y) + (y + y)
    assert c.flops == 8 * 231_211_008


def test_strided_downsample_no_act_by_hand():
    # ResNet-50 conv3_x downsample: 1x1 stride 2, 256 -> 512, 56 -> 28, conv -> BN only
    spec = m.ConvSpec(256, 56, 56, 512, 1, 1, stride=2, act="identity")
    assert (spec.P, spec.Q) == (28, 28)
    c = m.conv_cost(spec, 2, "float16")
    x, w, bn, y = 2 * 256 * 56 * 56 * 2, 512 * 256 * 2, 4 * 512 * 2, 2 * 512 * 28 * 28 * 2
    assert c.flops == 2 * 2 * 512 * 28 * 28 * 256
    assert c.fused_bytes == x + w + bn + y
    assert c.unfused_bytes == x + w + bn + y + 2 * y  # + BN's read and write


def test_odd_stride2_bias_groups_by_hand():
    spec = m.ConvSpec(6, 7, 9, 4, 3, 3, stride=2, padding=1, groups=2, bias=True, bn=False)
    assert (spec.P, spec.Q) == (4, 5)  # (7 + 2 - 3) // 2 + 1, (9 + 2 - 3) // 2 + 1
    assert m.conv_flops(spec, 3) == 2 * 3 * 4 * 4 * 5 * 3 * 9
    c = m.conv_cost(spec, 3, "float32")
    x, w, b, y = 3 * 6 * 7 * 9 * 4, 4 * 3 * 9 * 4, 4 * 4, 3 * 4 * 4 * 5 * 4
    assert c.fused_bytes == x + w + b + y
    assert c.unfused_bytes == x + w + b + y + 2 * y  # no BN kernel; the ReLU's read + write
    assert spec.epilogue == "relu"


def test_linear_and_pool_by_hand():
    c = m.linear_cost(m.LinearSpec(2048, 1000), 4, "float32")
    assert c.flops == 2 * 4 * 2048 * 1000
    assert c.fused_bytes == c.unfused_bytes == (4 * 2048 + 2048 * 1000 + 1000 + 4 * 1000) * 4
    c = m.linear_cost(m.LinearSpec(10, 20, act="relu"), 1, "float16")
    assert c.unfused_bytes - c.fused_bytes == 2 * 20 * 2
    p = m.PoolSpec(64, 112, 112, kernel=3, stride=2, padding=1)
    assert (p.P, p.Q) == (56, 56)
    assert m.pool_cost(p, 2, "bfloat16") == m.Cost(0, 2 * 64 * (112 * 112 + 56 * 56) * 2,
                                                   2 * 64 * (112 * 112 + 56 * 56) * 2)
    g = m.PoolSpec(2048, 7, 7)  # global average pool
    assert (g.P, g.Q) == (1, 1)


def test_floor_and_fraction():
    f = m.floor_time(2e12, 1e9, peak_flops=1e15, bandwidth=1e12)
    assert f.compute_s == pytest.approx(2e-3) and f.memory_s == pytest.approx(1e-3)
    assert f.seconds == pytest.approx(2e-3) and f.bound == "compute"
    g = m.floor_time(1e9, 3e9, peak_flops=1e15, bandwidth=1e12)
    assert g.seconds == pytest.approx(3e-3) and g.bound == "memory"
    assert m.fraction_of_floor(2e-3, 4e-3) == pytest.approx(0.5)
    total = m.layers_floor([m.Cost(2e12, 1e9, 1e9), m.Cost(1e9, 3e9, 5e9)], 1e15, 1e12)
    assert total.seconds == pytest.approx(5e-3)  # the sum of per-layer floors, not max of sums
    with pytest.raises(ValueError):
        m.floor_time(1, 1, 0, 1)
    with pytest.raises(ValueError):
        m.fraction_of_floor(1.0, 0.0)


def test_case_floor_uses_ceilings_of_its_dtype():
    case = cases.REGISTRY["resnet50.conv2_x.0.conv2"]
    ceil = m.Ceilings(bandwidth=3e12, matmul={"bfloat16": 800e12, "float32": 400e12})
    c = case.cost(32, torch.bfloat16)
    f = case.floor(32, torch.bfloat16, ceil)
    assert f.seconds == pytest.approx(max(c.flops / 800e12, c.fused_bytes / 3e12))
    assert case.floor(32, torch.float16, ceil) is None  # no measured rate: no floor, not a guess


def test_model_totals_match_published_counts():
    # ResNet-50 at 224: 4.09 GMACs, ResNet-18: 1.81 GMACs, VGG16: 15.47 GMACs (convs + FCs)
    r50 = m.model_cost(archs.ARCHS["resnet50"](), 1, "float32")
    r18 = m.model_cost(archs.ARCHS["resnet18"](), 1, "float32")
    vgg = m.model_cost(archs.ARCHS["vgg16_bn"](), 1, "float32")
    assert r50.flops / 2e9 == pytest.approx(4.09, rel=0.01)
    assert r18.flops / 2e9 == pytest.approx(1.81, rel=0.01)
    assert vgg.flops / 2e9 == pytest.approx(15.47, rel=0.01)
    assert r50.unfused_bytes > r50.fused_bytes
    assert m.model_cost(archs.ARCHS["resnet50"](), 4, "float32").flops == 4 * r50.flops


def test_resnet50_conv2_x_first_block_by_hand():
    # ResNet-50 layer1.0 (conv2_x.0): Bottleneck 64x56x56 -> 256x56x56, stride 1, projection
    # shortcut 1x1 64 -> 256 + BN. Batch 1, float32 (4 bytes). Counted in elements, then x 4.
    spec = m.BlockSpec("bottleneck", 64, 56, 56, 64)
    assert spec.projection and spec.shortcut == "projection" and (spec.K, spec.P, spec.Q) == (256, 56, 56)
    x = 64 * 56 * 56                 # 200,704  block input
    h1 = h2 = 64 * 56 * 56           # 200,704  after conv1 (1x1) and conv2 (3x3)
    y = d = 256 * 56 * 56            # 802,816  block output, downsample output
    xs = 64 * 56 * 56                # 200,704  what the 1x1 stride-1 projection touches: all of x
    w1, w2, w3, wd = 64 * 64, 64 * 64 * 9, 256 * 64, 256 * 64  # 4,096  36,864  16,384  16,384
    bn1 = bn2 = 4 * 64               # 256
    bn3 = bnd = 4 * 256              # 1,024
    # fused: 3 kernels
    k1 = x + w1 + bn1 + h1                       # 405,760
    k2 = h1 + w2 + bn2 + h2                      # 438,528
    k3 = h2 + w3 + bn3 + xs + wd + bnd + y       # 1,239,040 (the projection inside: d never written)
    assert (k1, k2, k3) == (405_760, 438_528, 1_239_040)
    fused, eager = m.block_traffic(spec, 1, "float32")
    assert [b for _, b in fused] == [4 * k1, 4 * k2, 4 * k3]
    # eager: 12 kernels
    seq = [("conv1", x + w1 + h1),               # 405,504
           ("bn1", h1 + bn1 + h1),               # 401,664
           ("relu1", h1 + h1),                   # 401,408
           ("conv2", h1 + w2 + h2),              # 438,272
           ("bn2", h2 + bn2 + h2),               # 401,664
           ("relu2", h2 + h2),                   # 401,408
           ("conv3", h2 + w3 + y),               # 1,019,904
           ("bn3", y + bn3 + y),                 # 1,606,656
           ("downsample.0", xs + wd + d),        # 1,019,904
           ("downsample.1", d + bnd + d),        # 1,606,656
           ("add", y + d + y),                   # 2,408,448
           ("relu", y + y)]                      # 1,605,632
    assert eager == [(n, 4 * v) for n, v in seq]
    assert sum(v for _, v in seq) == 11_717_120
    c = m.block_cost(spec, 1, "float32")
    assert c.fused_bytes == 4 * (k1 + k2 + k3) == 8_333_312
    assert c.unfused_bytes == 4 * 11_717_120 == 46_868_480  # 5.6x the fused block's bytes
    # FLOPs: conv1 + conv2 + conv3 + downsample
    assert c.flops == (2 * 64 * 56 * 56 * 64 + 2 * 64 * 56 * 56 * 64 * 9 + 2 * 256 * 56 * 56 * 64
                       + 2 * 256 * 56 * 56 * 64) == 25_690_112 + 231_211_008 + 102_760_448 + 102_760_448
    # batch 8, bfloat16: activations scale with N, weights and BN vectors do not
    params = w1 + w2 + w3 + wd + bn1 + bn2 + bn3 + bnd  # 40,448
    c8 = m.block_cost(spec, 8, "bfloat16")
    assert c8.fused_bytes == 2 * (8 * (k1 + k2 + k3 - params) + params)
    assert c8.unfused_bytes == 2 * (8 * (11_717_120 - params) + params) and c8.flops == 8 * c.flops


def test_strided_projection_basic_block_by_hand():
    # ResNet-18 layer2.0 (conv3_x.0): BasicBlock 64x56x56 -> 128x28x28, stride 2, projection
    # 1x1/s2 64 -> 128. Batch 2, bfloat16 (2 bytes). Elements, then x 2.
    spec = m.BlockSpec("basic", 64, 56, 56, 128, stride=2)
    assert spec.projection and (spec.K, spec.P, spec.Q) == (128, 28, 28)
    x = 2 * 64 * 56 * 56             # 401,408
    h1 = y = d = 2 * 128 * 28 * 28   # 200,704
    xs = 2 * 64 * 28 * 28            # 100,352: every 2nd row and column of x, a quarter of it
    w1, w2, wd = 128 * 64 * 9, 128 * 128 * 9, 128 * 64  # 73,728  147,456  8,192
    bn = 4 * 128                     # 512, each of bn1, bn2, bnd
    k1 = x + w1 + bn + h1                        # 676,352
    k2 = h1 + w2 + bn + xs + wd + bn + y         # 658,432
    eager = [x + w1 + h1, 2 * h1 + bn, 2 * h1,   # conv1, bn1, relu1
             h1 + w2 + y, 2 * y + bn,            # conv2, bn2
             xs + wd + d, 2 * d + bn,            # downsample conv (strided: touches xs), its BN
             y + d + y, 2 * y]                   # add, relu
    fused_k, eager_k = m.block_traffic(spec, 2, "bfloat16")
    assert [b for _, b in fused_k] == [2 * k1, 2 * k2] == [1_352_704, 1_316_864]
    assert [b for _, b in eager_k] == [2 * v for v in eager]
    assert [n for n, _ in eager_k] == ["conv1", "bn1", "relu1", "conv2", "bn2", "downsample.0", "downsample.1",
                                       "add", "relu"]
    c = m.block_cost(spec, 2, "bfloat16")
    assert c.fused_bytes == 2_669_568 and c.unfused_bytes == 2 * sum(eager) == 8_289_280
    assert c.flops == 2 * 2 * 128 * 28 * 28 * (64 * 9 + 128 * 9 + 64) == 719_323_136
    # identity BasicBlock: the last kernel reads x as the residual; add reads x
    ident = m.BlockSpec("basic", 64, 56, 56, 64)
    assert not ident.projection and ident.describe() == "basic 64x56x56 -> 64x56x56 /s1 identity"
    a = 64 * 56 * 56
    wb = 64 * 64 * 9
    f, e = m.block_traffic(ident, 1, "float16")
    assert [b for _, b in f] == [2 * (a + wb + 256 + a), 2 * (a + wb + 256 + a + a)]
    assert sum(b for _, b in e) == 2 * ((a + wb + a) + (2 * a + 256) + 2 * a + (a + wb + a) + (2 * a + 256)
                                        + 3 * a + 2 * a)
    with pytest.raises(ValueError, match="identity shortcut"):
        m.BlockSpec("basic", 64, 56, 56, 64, stride=2, projection=False)
    with pytest.raises(ValueError, match="kind"):
        m.BlockSpec("wide", 64, 56, 56, 64)


def test_block_floor_is_the_sum_of_its_kernels():
    spec = m.BlockSpec("bottleneck", 256, 56, 56, 128, stride=2)
    ks = m.block_kernel_costs(spec, 32, "bfloat16")
    assert len(ks) == 3 and sum(k.fused_bytes for k in ks) == m.block_cost(spec, 32, "bfloat16").fused_bytes
    assert sum(k.flops for k in ks) == m.block_flops(spec, 32)
    ds = spec.downsample_conv()
    assert ks[2].flops == m.conv_flops(spec.main_convs()[2][1], 32) + m.conv_flops(ds, 32)  # the last kernel's
    f = m.block_floor(spec, 32, "bfloat16", 800e12, 3e12)
    assert f.seconds == pytest.approx(sum(max(k.flops / 800e12, k.fused_bytes / 3e12) for k in ks))
    case = cases.REGISTRY["block.resnet50.conv3_x.0"]
    assert case.spec == spec
    ceil = m.Ceilings(bandwidth=3e12, matmul={"bfloat16": 800e12})
    assert case.floor(32, torch.bfloat16, ceil).seconds == pytest.approx(f.seconds)
    assert case.floor(32, torch.float16, ceil) is None


@pytest.mark.parametrize("arch,depth", [("resnet18", 18), ("resnet50", 50)])
def test_blocks_agree_with_the_layer_table(arch, depth):
    layers = dict(archs.conv_layers(archs.ARCHS[arch]()))
    blocks = archs.resnet_blocks(depth)
    for dt, e in (("float32", 4), ("bfloat16", 2)):
        for name, spec in blocks:
            convs = [(f"{name}.{n}", c) for n, c in spec.convs()]
            assert convs == [(n, c) for n, c in layers.items() if n.startswith(name + ".")], name
            costs = [m.conv_cost(c, 4, dt) for _, c in convs]
            bc = m.block_cost(spec, 4, dt)
            assert bc.flops == sum(c.flops for c in costs)
            # the fused kernels before the last are the layer model's fused conv-BN-ReLU
            fused, _ = m.block_traffic(spec, 4, dt)
            assert [b for _, b in fused[:-1]] == [c.fused_bytes for c in costs[:len(fused) - 1]]
            if not spec.projection:  # identity: the last kernel is the layer model's conv-BN-add-ReLU
                assert fused[-1][1] == costs[-1].fused_bytes
            # the eager sequence is the layers' eager bytes, but a strided 1x1 projection reads
            # only the x it touches (the layer model counts its whole input)
            skipped = 4 * spec.C * (spec.H * spec.W - spec.P * spec.Q) * e if spec.projection else 0
            assert bc.unfused_bytes == sum(c.unfused_bytes for c in costs) - skipped
            assert bc.unfused_bytes > bc.fused_bytes
    # stem + maxpool + blocks + avgpool + fc = the whole model's FLOPs
    other = [s for n, s in archs.ARCHS[arch]() if not n.startswith("layer")]
    total = sum(m.layer_cost(s, 1, "float32").flops for s in other) + sum(m.block_flops(s, 1) for _, s in blocks)
    assert total == m.model_cost(archs.ARCHS[arch](), 1, "float32").flops


# ----------------------------------------------------------------------------
# Layer tables and registry
# ----------------------------------------------------------------------------

def test_resnet50_distinct_convs():
    layers = archs.ARCHS["resnet50"]()
    convs = archs.conv_layers(layers)
    assert len(convs) == 53  # 1 stem + 16 blocks x 3 + 4 downsample
    distinct = archs.distinct_convs(layers)
    assert len(distinct) == 24  # stem + 5 (conv2_x) + 6 x 3 (conv3_x..conv5_x)
    assert sum(len(v) for v in distinct.values()) == 53
    by_name = dict(convs)
    assert by_name["conv1"] == m.ConvSpec(3, 224, 224, 64, 7, 7, stride=2, padding=3)
    assert by_name["layer2.0.conv2"] == m.ConvSpec(128, 56, 56, 128, 3, 3, stride=2, padding=1)
    assert by_name["layer4.2.conv3"] == m.ConvSpec(512, 7, 7, 2048, 1, 1, residual=True)
    downs = [n for n in by_name if "downsample" in n]
    assert downs == [f"layer{i}.0.downsample.0" for i in (1, 2, 3, 4)]
    assert [by_name[n].stride for n in downs] == [1, 2, 2, 2]
    names = [c.name for c in cases.select(["resnet50."], kinds=["layer"])]
    assert len(names) == 24
    for stage in ("stem", "conv2_x", "conv3_x", "conv4_x", "conv5_x"):
        assert any(stage in n for n in names), stage


def test_resnet18_distinct_convs():
    distinct = archs.distinct_convs(archs.ARCHS["resnet18"]())
    assert len(distinct) == 15
    assert sum(len(v) for v in distinct.values()) == 20
    assert sum(s.residual for s in distinct) == 4


def test_vgg16_bn_13_layers():
    convs = archs.conv_layers(archs.ARCHS["vgg16_bn"]())
    expect = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56),
              (256, 256, 56), (256, 512, 28), (512, 512, 28), (512, 512, 28), (512, 512, 14), (512, 512, 14),
              (512, 512, 14)]
    assert [(s.C, s.K, s.H) for _, s in convs] == expect
    assert all(s.R == s.S == 3 and s.padding == 1 and s.bias and s.act == "relu" for _, s in convs)
    assert [n for n, _ in convs][:3] == ["features.0", "features.3", "features.7"]
    vgg_cases = cases.select(["vgg16_bn."], kinds=["layer"])
    assert sum(c.count for c in vgg_cases) == 13


def test_registry():
    assert len(cases.select(kinds=["model"])) == 3
    assert {c.spec for c in cases.select(kinds=["model"])} == {"resnet18", "resnet50", "vgg16_bn"}
    quick = cases.select(quick=True)
    assert quick and all(c.quick for c in quick) and len(quick) < len(cases.REGISTRY)
    for c in cases.REGISTRY.values():
        assert c.op in cases.OPS and c.batches == (1, 32, 256)
        cost = c.cost(1, torch.float32)
        assert cost.flops > 0 and cost.unfused_bytes >= cost.fused_bytes > 0
    with pytest.raises(ValueError, match="twice"):
        cases.register(cases.REGISTRY["model.resnet18"])
    with pytest.raises(ValueError, match="unknown op"):
        cases.register(cases.Case("x", "no_such_op", "g", None))


def _hooked_convs(model, image):
    seen = []
    hooks = [mod.register_forward_hook(lambda mod_, inp, out, name=name: seen.append((name, mod_, inp[0].shape)))
             for name, mod in model.named_modules() if isinstance(mod, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, image, image))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg16_bn"])
def test_tables_describe_the_built_models(arch):
    image = 64  # the tables take the image size; small keeps this fast
    table = archs.conv_layers(archs.ARCHS[arch](image))
    seen = _hooked_convs(build(arch), image)
    assert [n for n, _, _ in seen] == [n for n, _ in table]
    for (name, conv, shape), (_, spec) in zip(seen, table):
        assert (conv.in_channels, conv.out_channels) == (spec.C, spec.K), name
        assert conv.kernel_size == (spec.R, spec.S) and conv.stride == (spec.stride,) * 2, name
        assert conv.padding == (spec.padding,) * 2 and (conv.bias is not None) == spec.bias, name
        assert tuple(shape[2:]) == (spec.H, spec.W), name
    # FLOPs: the table's total equals the built model's convs and Linears
    model = build(arch)
    conv_flops = sum(m.conv_flops(s, 1) for _, s in table)
    lin = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    lin_flops = sum(2 * mod.in_features * mod.out_features for mod in lin)
    assert m.model_cost(archs.ARCHS[arch](image), 1, "float32").flops == conv_flops + lin_flops


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg16_bn"])
def test_builders_match_torchvision(arch):
    tv = torchvision_builder(arch)
    if tv is None:
        pytest.skip("torchvision is not importable here (the GPU box has none; the builders stand in)")
    ours = {k: tuple(v.shape) for k, v in build(arch).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in tv().state_dict().items()}
    assert ours == theirs


def test_calibrated_model_is_finite_and_not_identity_bn():
    model = make_model("resnet18", image=64, calib_batch=2)
    bn = model.layer1[0].bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not model.training
    out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out).all() and 1e-3 < out.std().item() < 1e3


def test_workload_reference_and_providers_on_cpu():
    case = cases.REGISTRY["resnet18.conv5_x.0.downsample.0"]
    op = cases.OPS[case.op]
    wl = op.make_workload(case, torch.device("cpu"), torch.float32, 2, n_sets=2, seed=0)
    assert len(wl.arg_sets) == 2 and wl.reference.dtype == torch.float64
    assert wl.reference.shape == (2, 512, 7, 7)
    assert wl.arg_sets[0][0].is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(wl.arg_sets[0][0], wl.arg_sets[1][0])  # rotated sets differ
    for provider in ("eager", "resfuse-eager"):
        out = op.build(provider, wl)(*wl.arg_sets[0])
        assert rel_err(out, wl.reference) < 1e-5, provider


def test_block_cases_registered():
    blocks = cases.select(kinds=["block"])
    r18 = [c for c in blocks if c.group == "resnet18"]
    r50 = [c for c in blocks if c.group == "resnet50"]
    assert len(r18) == 7 and len(r50) == 8 and len(blocks) == 15  # conv2_x: 1 (r18) / 2 (r50), then 2 per stage
    assert sum(c.count for c in r18) == 8 and sum(c.count for c in r50) == 16
    assert all(c.op == "resnet_block" and c.kind == "block" and c.name.startswith("block.") for c in blocks)
    assert [c.name for c in r50][:3] == ["block.resnet50.conv2_x.0", "block.resnet50.conv2_x.1",
                                         "block.resnet50.conv3_x.0"]
    assert cases.REGISTRY["block.resnet50.conv2_x.1"].layers == ("layer1.1", "layer1.2")
    assert {c.spec.shortcut for c in r18} == {c.spec.shortcut for c in r50} == {"identity", "projection"}
    assert {c.spec.stride for c in blocks} == {1, 2}
    assert all(c.spec.kind == "basic" for c in r18) and all(c.spec.kind == "bottleneck" for c in r50)
    assert [c.name for c in cases.select(quick=True, kinds=["block"])] == [
        "block.resnet18.conv3_x.0", "block.resnet50.conv2_x.0", "block.resnet50.conv3_x.1"]
    assert cases.REGISTRY["block.resnet50.conv2_x.0"].describe() == "bottleneck 64x56x56 -> 256x56x56 /s1 projection"


@pytest.mark.parametrize("spec", [m.BlockSpec("bottleneck", 256, 56, 56, 128, stride=2),
                                  m.BlockSpec("basic", 128, 28, 28, 128)], ids=["bottleneck-s2", "basic-identity"])
def test_built_block_matches_spec_and_torchvision(spec):
    from bench.models import build_block
    block = build_block(spec).eval()
    convs = {n: mod for n, mod in block.named_modules() if isinstance(mod, nn.Conv2d)}
    assert list(convs) == [n for n, _ in spec.convs()]
    for name, c in spec.convs():
        mod = convs[name]
        assert (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding) == (
            c.C, c.K, (c.R, c.S), (c.stride,) * 2, (c.padding,) * 2), name
    with torch.no_grad():
        assert block(torch.randn(1, spec.C, spec.H, spec.W)).shape == (1, spec.K, spec.P, spec.Q)
    try:
        import torchvision.models.resnet as tvr
    except Exception:
        return  # the GPU box has no torchvision
    cls = tvr.BasicBlock if spec.kind == "basic" else tvr.Bottleneck
    ds = nn.Sequential(nn.Conv2d(spec.C, spec.K, 1, spec.stride, bias=False), nn.BatchNorm2d(spec.K)) \
        if spec.projection else None
    theirs = {k: tuple(v.shape) for k, v in cls(spec.C, spec.planes, spec.stride, ds).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == theirs


def test_block_workload_and_providers(device):
    # a small strided projection Bottleneck (2 argument sets, each its own block copy); on a CPU
    # machine resfuse-triton runs through the Triton interpreter in fp32, on the GPU box on the GPU
    # in bf16; checked by the harness's rule
    spec = m.BlockSpec("bottleneck", 16, 9, 9, 8, stride=2)
    case = cases.Case("block.test", "resnet_block", "test", spec)
    op = cases.OPS["resnet_block"]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    wl = op.make_workload(case, device, dtype, 2, n_sets=2, seed=0)
    assert wl.reference.dtype == torch.float64 and wl.reference.shape == (2, 32, 5, 5)
    (x0, b0), (x1, b1) = wl.arg_sets
    assert x0.is_contiguous(memory_format=torch.channels_last) and not torch.equal(x0, x1)
    assert b0 is not b1 and b0.conv2.weight.data_ptr() != b1.conv2.weight.data_ptr()  # weights rotate too
    assert not b0.training and b0.downsample is not None
    assert not torch.allclose(b0.bn1.running_var, torch.ones_like(b0.bn1.running_var))  # calibrated BN
    with torch.no_grad():
        tol = tolerance(op.build("eager", wl)(x0, b0), wl.reference, dtype)
    for provider in ("eager", "resfuse-eager", "resfuse-triton"):
        fn = op.build(provider, wl)
        with torch.no_grad():
            for x, b in wl.arg_sets:
                out = fn(x, b)
            assert rel_err(fn(x0, b0), wl.reference) <= tol, provider
        if provider.startswith("resfuse-"):
            assert op.note(wl, provider) == "3 kernels: conv_bn_act, conv_bn_act, conv_bn_proj_act", provider
    assert out.shape == (2, 32, 5, 5)


def test_block_provider_that_would_not_fuse_is_an_error():
    spec = m.BlockSpec("basic", 8, 6, 6, 8)
    case = cases.Case("block.test", "resnet_block", "test", spec)
    op = cases.OPS["resnet_block"]
    wl = op.make_workload(case, torch.device("cpu"), torch.float32, 1, n_sets=1, seed=0)
    wl.arg_sets[0][1].train()  # train mode: the fused block runs the original forward
    with pytest.raises(RuntimeError, match="did not run"):
        op.build("resfuse-eager", wl)


# ----------------------------------------------------------------------------
# gnconv (HorNet-T)
# ----------------------------------------------------------------------------

def test_gnconv_cases_registered_with_hornet_t_shapes():
    gn = cases.select(kinds=["gnconv"])
    assert [c.name for c in gn] == [f"gnconv.hornet_t.stage{i}" for i in (1, 2, 3, 4)]
    # HorNet-T (7x7) at 224: dims 64/128/256/512 at 56/28/14/7, orders 2..5, s = 1/3, depths 2/3/18/2
    assert [(c.spec.dim, c.spec.order, c.spec.H, c.spec.W) for c in gn] == [
        (64, 2, 56, 56), (128, 3, 28, 28), (256, 4, 14, 14), (512, 5, 7, 7)]
    assert all(c.spec.s == pytest.approx(1 / 3) and c.spec.ksize == 7 for c in gn)
    assert [c.count for c in gn] == [2, 3, 18, 2]
    assert cases.REGISTRY["gnconv.hornet_t.stage3"].layers[0] == "stages.2.0.gnconv"
    assert all(c.op == "gnconv" and c.kind == "gnconv" and c.group == "hornet_t" and c.batches == cases.BATCHES
               for c in gn)
    assert cases.REGISTRY["gnconv.hornet_t.stage4"].spec.dims == [32, 64, 128, 256, 512]
    assert cases.REGISTRY["gnconv.hornet_t.stage2"].describe() == \
        "gnconv 128x28x28 order 3 dims 32/64/128 dw7x7 s=1/3"
    quick = cases.select(quick=True, kinds=["gnconv"])
    assert [c.name for c in quick] == ["gnconv.hornet_t.stage3"]
    assert "compile" not in quick[0].quick_providers and "resfuse-triton" in quick[0].quick_providers
    # the plain module has HorNet's structure: resfuse recognises it as a gnconv of that shape
    from bench.models import make_gnconv
    from resfuse.nn.gnconv import match_gnconv
    for c in gn:
        spec = match_gnconv(make_gnconv(c.spec.dim, c.spec.order, c.spec.s))
        assert (spec.dim, spec.order, spec.ksize) == (c.spec.dim, c.spec.order, 7)


def test_gnconv_model_columns_are_the_traffic_model():
    from bench.model.gnconv import gnconv_bytes
    for c in cases.select(kinds=["gnconv"]):
        for batch, dtype, name in ((1, torch.float32, "float32"), (32, torch.bfloat16, "bfloat16"),
                                   (256, torch.float16, "float16")):
            t = gnconv_bytes(c.spec.dim, c.spec.order, c.spec.H, c.spec.W, batch, name)
            cost = c.cost(batch, dtype)
            # MB fused = resfuse's fused design (2 kernels), MB eager seq = HorNet's eager op sequence
            assert (cost.flops, cost.fused_bytes, cost.unfused_bytes) == (t.flops, t.fused_bytes, t.eager_bytes)
            assert cost.unfused_bytes > cost.fused_bytes > t.minimal_bytes
            ks = cases.gnconv_kernel_costs(c.spec, batch, dtype)  # proj_in, the chain, the parameters
            assert len(ks) == 3 and sum(k.flops for k in ks) == t.flops
            assert sum(k.fused_bytes for k in ks) == t.fused_bytes
            D, P, e = c.spec.dim, batch * c.spec.H * c.spec.W, m.elem_bytes(name)
            assert ks[0].flops == 2 * P * 2 * D * D  # proj_in
            assert ks[0].fused_bytes == (P * D + P * 2 * D) * e  # x read, f written
            assert ks[2] == m.Cost(0, t.weight_bytes, t.weight_bytes)
    # by hand: stage 1 at batch 1 in fp32 (dims 32/64, S = 96)
    c = cases.REGISTRY["gnconv.hornet_t.stage1"].cost(1, torch.float32)
    P = 56 * 56
    w = (2 * 64 * 64 + 128) + (96 * 49 + 96) + (32 * 64 + 64) + (64 * 64 + 64)
    assert c.flops == 2 * P * (2 * 64 * 64 + 96 * 49 + 32 * 64 + 64 * 64)
    assert c.fused_bytes == 4 * (P * (64 + 128 + 128 + 64) + w)
    # proj_in, dwconv, * s, pwa * dw0, pws.0, gate, proj_out
    assert c.unfused_bytes == 4 * (P * (192 + 192 + 192 + 96 + 96 + 192 + 128) + w)
    ceil = m.Ceilings(bandwidth=3e12, matmul={"bfloat16": 800e12})
    case = cases.REGISTRY["gnconv.hornet_t.stage3"]
    ks = cases.gnconv_kernel_costs(case.spec, 32, torch.bfloat16)
    assert case.floor(32, torch.bfloat16, ceil).seconds == pytest.approx(
        sum(max(k.flops / 800e12, k.fused_bytes / 3e12) for k in ks))
    assert case.floor(32, torch.float16, ceil) is None


def test_gnconv_workload_and_providers(device):
    # a tiny order-3 gnconv (2 argument sets, each its own module copy); on a CPU machine
    # resfuse-triton runs through the Triton interpreter in fp32, on the GPU box in bf16
    spec = cases.GnConvCaseSpec(16, 3, 6, 5)
    case = cases.Case("gnconv.test", "gnconv", "test", spec)
    op = cases.OPS["gnconv"]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    wl = op.make_workload(case, device, dtype, 2, n_sets=2, seed=0)
    assert wl.reference.dtype == torch.float64 and wl.reference.shape == (2, 16, 6, 5)
    assert 0.1 < wl.reference.std().item() < 10  # O(1): the check compares real numbers
    (x0, m0), (x1, m1) = wl.arg_sets
    assert x0.is_contiguous(memory_format=torch.channels_last) and not torch.equal(x0, x1)
    assert m0 is not m1 and m0.dwconv.weight.data_ptr() != m1.dwconv.weight.data_ptr()  # weights rotate too
    assert not m0.training
    with torch.no_grad():
        tol = tolerance(op.build("eager", wl)(x0, m0), wl.reference, dtype)
    for provider in ("eager", "resfuse-eager", "resfuse-triton"):
        fn = op.build(provider, wl)
        with torch.no_grad():
            for x, mod in wl.arg_sets:
                out = fn(x, mod)
            assert rel_err(fn(x0, m0), wl.reference) <= tol, provider
        if provider.startswith("resfuse-"):
            assert op.note(wl, provider) == "2 kernels: layernorm_conv1x1, gnconv_chain", provider
            assert wl.state["ran"][provider] == [f"layernorm_conv1x1:{provider[8:]}", f"gnconv_chain:{provider[8:]}"]
    assert out.shape == (2, 16, 6, 5)


def test_gnconv_provider_that_would_not_fuse_is_an_error(monkeypatch):
    from resfuse.nn.gnconv import GnConv
    case = cases.Case("gnconv.test", "gnconv", "test", cases.GnConvCaseSpec(8, 2, 4, 4))
    op = cases.OPS["gnconv"]
    wl = op.make_workload(case, torch.device("cpu"), torch.float32, 1, n_sets=1, seed=0)
    # a GnConv that runs its original forward (as it does when a member has hooks) is not a resfuse row
    monkeypatch.setattr(GnConv, "unfused_reason", lambda self: "forced for the test")
    with pytest.raises(RuntimeError, match="did not run"):
        op.build("resfuse-eager", wl)


# ----------------------------------------------------------------------------
# gnconv and HorBlock training, and the HorBlock forward: the step model
# ----------------------------------------------------------------------------

def test_gnconv_train_bytes_by_hand():
    from bench.model.gnconv import gnconv_train_bytes
    # dim 8, order 2, 3x3 depthwise, 2x2 image, batch 1, float32: D = 8, dims 4/8, d0 = 4, S = 12,
    # P = 4 pixels, e = 4 bytes. Per pixel, in elements:
    # eager forward:  proj_in 8 + 16, dwconv 12 + 12, * s 12 + 12, pwa * g0 3*4,
    #                 pws0 4 + 8, * g1 3*8, proj_out 8 + 8                              = 136
    # eager backward: proj_out dgrad 8 + 8, wgrad 8 + 8, bias 8                        =  40
    #                 dz0 = dx1 * g1 24, dg1 = dx1 * z0 24, pws0 dgrad 8 + 4, wgrad 8 + 4, bias 8 = 80
    #                 dpwa 12, dg0 12, cat(dg) 24, * s 24, dwconv dgrad 24, wgrad 24, bias 12 = 132
    #                 cat(dpwa, dabc) 16 + 16, proj_in dgrad 16 + 8, wgrad 16 + 8, bias 16 = 96
    #                                                                         total 136 + 348 = 484
    # fused forward:  K1 x 8 + f 16, K2 f 16 + y 8                                       =  48
    # fused backward: chain_bwd f 16 + dout 8 + d_pwa 4 + d_dw 12 + x_i 12 + dz_i 8      =  60
    #                 dwconv_bwd 12 + 12 + 12 = 36, wgrad pws0 8 + 4 = 12, wgrad proj_out 8 + 8 = 16,
    #                 dgrad proj_in 16 + 8 = 24, wgrad proj_in 16 + 8 = 24               = 172
    # parameters: proj_in 2*8*8 + 16, dwconv 12*9 + 12, pws0 4*8 + 8, proj_out 8*8 + 8 = 376, 3x in training
    t = gnconv_train_bytes(8, 2, 2, 2, 1, "float32", ksize=3)
    params = 3 * 376 * 4
    assert t.param_bytes == params == 4512
    assert t.eager_bytes == 484 * 4 * 4 + params == 12256
    assert t.fused_bytes == (48 + 172) * 4 * 4 + params == 8032
    assert (t.eager_launches, t.fused_launches) == (7 + 19, 2 + 6)  # 2o + 3 + 5o + 9; 2 + o + 4
    # FLOPs: forward 2 (proj_in 2*64 + dwconv 12*9 + pws0 4*8 + proj_out 64) = 664 per pixel, x3 for training;
    # the fused backward recomputes the dwconv and pws0: 2 (108 + 32) per pixel
    assert t.flops == 3 * 664 * 4 == 7968 and t.recompute_flops == 280 * 4
    ks = t.fused_kernel_costs()
    assert sum(b for _, _, b in ks) == t.fused_bytes and sum(f for _, f, _ in ks) == t.flops + t.recompute_flops
    assert [s.launches for s in t.fused_steps] == [1] * 8 and t.fused_kernels == 8


def test_horblock_bytes_by_hand():
    from bench.model.gnconv import horblock_bytes
    # the same gnconv (dim 8 = C, order 2, 3x3, 2x2, batch 1, float32) in a HorBlock. Per pixel:
    # eager forward:  norm1 14*8 + 9 = 121, gnconv 136, gamma1 * y 16, x + . 24             = 297
    #                 norm2 8 + 8 (+ 2 stats), pwconv1 8 + 32, GELU 64, pwconv2 32 + 8,
    #                 gamma2 * . 16, x + . 24                                                = 200 + 2 stats
    # eager backward: MLP: d(gamma2 z) 16 + 24 + 8, pwconv2 dgrad 40, wgrad 40, bias 8, GELU' 96,
    #                 pwconv1 dgrad 40, wgrad 40, bias 32, LN bwd 24 + 16 (+ 4 stats), dout + dx 24
    #                                                                                        = 408 + 4 stats
    #                 gnconv half: d(gamma1 y) 16 + 24 + 8, gnconv 348, norm1 40*8 + 16, dout + dx 24 = 756
    # fused forward:  K1 24, K2 f 16 + x 8 + out 8 = 32, M1 8 + 32, M2 32 + 8 + 8           = 144
    # fused backward: dgrad2 8 + 32 + 32, wgrad2 8 + 32, dgrad1 32 + 8 + 8, wgrad1 32 + 8, add 24 = 224
    #                 gnconv 172 + x read by the LN backward 8, add 24                       = 204
    #                 each LN backward (norm2's, norm1's): the dgrad writes 2 stats, the wgrad reads them = 8 stats
    # parameters: gnconv 376, norm1 16, gamma1 8, norm2 16, pwconv1 8*32 + 32, pwconv2 32*8 + 8, gamma2 8 = 976
    params = 976 * 4
    fwd = horblock_bytes(8, 2, 2, 2, 1, "float32", ksize=3, train=False)
    assert fwd.param_bytes == params
    assert fwd.eager_bytes == ((297 + 200) * 4 + 2 * 4) * 4 + params == 11888
    assert fwd.fused_bytes == 144 * 4 * 4 + params == 6208
    assert (fwd.eager_launches, fwd.fused_launches, fwd.recompute_flops) == (25, 4, 0)  # 2o + 21 -> 4
    assert fwd.flops == (664 + 2 * 8 * 32 * 2) * 4  # gnconv + pwconv1 + pwconv2
    tr = horblock_bytes(8, 2, 2, 2, 1, "float32", ksize=3, train=True)
    assert tr.param_bytes == 3 * params
    assert tr.eager_bytes == ((297 + 200 + 408 + 756) * 4 + 6 * 4) * 4 + 3 * params == 38384
    assert tr.fused_bytes == ((144 + 224 + 204) * 4 + 8 * 4) * 4 + 3 * params == 20992
    assert (tr.eager_launches, tr.fused_launches) == (85, 16)  # 7o + 71 -> o + 14
    assert tr.fused_kernels == 14  # less autograd's two residual adds
    assert tr.flops == 3 * fwd.flops and tr.recompute_flops == 280 * 4
    # fp16: the LayerNorm statistics stay float32
    h = horblock_bytes(8, 2, 2, 2, 1, "float16", ksize=3, train=True)
    assert h.eager_bytes == ((297 + 200 + 408 + 756) * 2 + 6 * 4) * 4 + 3 * 976 * 2


def test_horblock_forward_is_the_gnconv_forward_model_plus_the_mlp():
    from bench.model.gnconv import gnconv_bytes, horblock_bytes
    for dim, order, hw in ((64, 2, 56), (256, 4, 14)):
        g = gnconv_bytes(dim, order, hw, hw, 32, "bfloat16", norm=True, residual=True)
        h = horblock_bytes(dim, order, hw, hw, 32, "bfloat16", train=False)
        P, C, e = 32 * hw * hw, dim, 2
        mlp_params = 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C) + C
        assert h.eager_bytes - g.eager_bytes == P * (25 * C * e + 2 * 4) + mlp_params * e
        fold = 3 * 4 * C * C * e + 6 * 4 * C * 4  # pwconv1's LN fold (16-bit): W re-read, W' written + read; u, s, v
        assert h.fused_bytes - g.fused_bytes == P * 11 * C * e + mlp_params * e + fold
        assert h.eager_launches == g.eager_launches + 6 and h.fused_launches == g.fused_launches + 3
        assert h.flops == g.flops + 2 * P * 8 * C * C


def test_train_tables_hornet_t_pinned():
    from bench.model.gnconv import hornet_t_horblock_table, hornet_t_table, hornet_t_train_table
    # batch 32, fp16 (python -m bench.model.gnconv prints them)
    gn = hornet_t_train_table()
    assert [(t.eager_bytes, t.fused_bytes, t.eager_launches, t.fused_launches) for *_, t in gn] == [
        (777_242_240, 353_355_392, 26, 8), (441_975_808, 191_497_216, 33, 9),
        (235_609_856, 100_736_768, 40, 10), (126_397_696, 56_552_704, 47, 11)]
    fwd = hornet_t_horblock_table(train=False)
    assert [(t.eager_bytes, t.fused_bytes, t.eager_launches, t.fused_launches) for *_, t in fwd] == [
        (786_263_296, 231_473_408, 25, 6), (408_890_112, 116_621_056, 27, 6),
        (209_676_288, 61_782_784, 29, 6), (111_239_744, 44_643_072, 31, 6)]
    # each fp16 stage's two LayerNorm folds (norm1 -> proj_in 2D x D, norm2 -> pwconv1 4D x D):
    # W re-read, W' written + read 3 * 6 D^2 * 2 B, u, s, v 6 * 6D * 4 B, one launch each
    assert [t.fused_bytes - f for (*_, t), f in zip(fwd, (231_316_736, 116_012_800, 59_386_624, 35_132_160))] == [
        36 * d * d + 144 * d for d, *_ in fwd]
    tr = hornet_t_horblock_table(train=True)
    assert [(t.eager_bytes, t.fused_bytes, t.eager_launches, t.fused_launches) for *_, t in tr] == [
        (2_634_557_184, 922_106_624, 85, 18), (1_369_471_232, 476_294_400, 92, 19),
        (701_658_624, 247_791_872, 99, 20), (370_341_440, 149_378_304, 106, 21)]
    # the training FLOPs are 3x the forward's; the fused backward recomputes 4-14% on top
    for (*_, f), (*_, t) in zip(hornet_t_table(), gn):
        assert t.flops == 3 * f.flops and 0.04 < t.recompute_flops / t.flops < 0.15
    for (*_, f), (*_, t) in zip(fwd, tr):
        assert t.flops == 3 * f.flops
    assert [t.recompute_flops for *_, t in tr] == [t.recompute_flops for *_, t in gn]
    for *_, t in gn + fwd + tr:
        assert 2.1 < t.saving < 3.6
        assert sum(b for _, _, b in t.fused_kernel_costs()) == t.fused_bytes


class _KernelTrace:
    """Every aten op one forward + backward dispatches (CPU), as the CUDA
    kernels the byte model takes it for: convolution_backward = dgrad +
    wgrad + bias sum (3 kernels: dy read three times, x once, dx written);
    native_layer_norm_backward = dX + dgamma/dbeta (2 kernels, each reading
    dy, x, mean, rstd); every other non-view op 1 kernel reading its inputs
    and writing its outputs. Bytes count each operand's distinct elements
    (a broadcast operand once)."""

    VIEWS = {"split_with_sizes", "split", "view", "permute", "expand", "unsqueeze", "squeeze", "slice", "t",
             "_unsafe_view", "alias", "detach", "as_strided", "transpose", "_reshape_alias", "reshape"}

    @staticmethod
    def _nbytes(t):
        n = t.element_size()
        for size, stride in zip(t.shape, t.stride()):
            n *= size if stride != 0 else 1
        return n

    @classmethod
    def run(cls, module, x, g=None):
        """g None: the forward alone (no grad)."""
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        ops = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                if name not in cls.VIEWS:
                    ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
                    outs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
                    ops.append((name, [cls._nbytes(a) for a in ins], [cls._nbytes(a) for a in outs]))
                return out

        if g is None:
            with torch.no_grad(), Mode():
                module(x)
        else:
            x = x.clone().requires_grad_()
            with Mode():
                module(x).backward(g)
        kernels = nbytes = 0
        for name, ins, outs in ops:
            if name == "convolution_backward":  # (dy, x, W) -> (dx, dW, db)
                kernels += 3
                nbytes += 3 * ins[0] + ins[1] + ins[2] + sum(outs)
            elif name == "native_layer_norm_backward":  # (dy, x, mean, rstd, w, b) -> (dx, dw, db)
                kernels += 2
                nbytes += 2 * sum(ins[:4]) + ins[4] + sum(outs)
            else:
                kernels += 1
                nbytes += sum(ins) + sum(outs)
        return kernels, nbytes


@pytest.mark.parametrize("what,order", [("gnconv", 3), ("gnconv", 5), ("horblock", 2), ("horblock", 4)])
def test_eager_steps_are_what_pytorch_dispatches(what, order):
    # The eager step lists against a trace of the aten ops PyTorch runs for HorNet's code (fp32,
    # channels_last, x requiring grad): the kernel count, and the bytes per pixel (the difference
    # between batch 2 and batch 1, so that parameters and their gradients cancel).
    from bench.models import make_gnconv, make_horblock
    from bench.model.gnconv import gnconv_train_bytes, horblock_bytes
    dim, hw = 32, 5
    torch.manual_seed(0)
    mod = (make_gnconv(dim, order, 1 / 3) if what == "gnconv" else make_horblock(dim, order, 1 / 3)).train()
    traced = []
    for batch in (1, 2):
        x = torch.randn(batch, dim, hw, hw).contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        mod.zero_grad(set_to_none=True)
        traced.append(_KernelTrace.run(mod, x, g))
    (k1, b1), (k2, b2) = traced
    model = (gnconv_train_bytes(dim, order, hw, hw, 1, "float32") if what == "gnconv" else
             horblock_bytes(dim, order, hw, hw, 1, "float32", train=True))
    assert k1 == k2 == model.eager_launches
    per_pixel = sum(model.step_bytes(s) for s in model.eager_steps) // (hw * hw)
    assert (b2 - b1) // (hw * hw) == per_pixel and (b2 - b1) % (hw * hw) == 0


# ----------------------------------------------------------------------------
# HorNet's stem and downsampling layers (patchify_conv): the step model
# ----------------------------------------------------------------------------

def test_patchify_bytes_by_hand():
    from bench.model.patchify import patchify_bytes
    # downsampling: LN_pre over C = 4, conv 2x2 stride 2 to K = 8, 4x4 image, batch 1: M = 2*2 = 4 output
    # pixels. Per output pixel, in elements:
    # eager: LN_pre on each of the 4 input pixels 4 * (14*4 + 9) = 260, conv x 2*2*4 = 16 + y 8 = 24  = 284
    # fused: x 16 + y 8                                                                                =  24
    # parameters: W 8*4*2*2 = 128, b 8, LN 2*4 = 8                                                     = 144
    # 16-bit fold (per call): W re-read, W' written + read as 8*2*2 = 32 rows of 4: 3*32*4 = 384 elements,
    #                         u, s, v 6*32 = 192 fp32
    h = patchify_bytes(4, 8, 2, 4, 4, 1, "float16", pre_norm=True)
    assert h.param_bytes == 144 * 2 == 288
    assert h.eager_bytes == 4 * 284 * 2 + 288 == 2560
    assert h.fused_bytes == 4 * 24 * 2 + 288 + 384 * 2 + 192 * 4 == 2016
    assert (h.eager_launches, h.fused_launches) == (11, 2)  # 10 LayerNorm kernels + conv; fold + patchify
    assert h.flops == 2 * 8 * 16 * 4 == 1024
    f = patchify_bytes(4, 8, 2, 4, 4, 1, "float32", pre_norm=True)  # no fold in fp32
    assert (f.eager_bytes, f.fused_bytes, f.fused_launches) == (4 * 284 * 4 + 576, 4 * 24 * 4 + 576, 1)
    # stem: conv 4x4 stride 4, C = 3 -> K = 8, then LN_post over 8; 8x8 image, batch 2: M = 2*2*2 = 8
    # eager: conv 48 + 8 = 56, LN_post 14*8 + 9 = 121 = 177; fused 56; parameters 8*48 + 8 + 2*8 = 408
    for dtype, e in (("float32", 4), ("float16", 2)):  # LN_post: no fold in any dtype
        t = patchify_bytes(3, 8, 4, 8, 8, 2, dtype, post_norm=True)
        assert (t.eager_bytes, t.fused_bytes) == (8 * 177 * e + 408 * e, 8 * 56 * e + 408 * e)
        assert (t.eager_launches, t.fused_launches) == (11, 1)
    assert patchify_bytes(3, 8, 4, 8, 8, 2, "float32", post_norm=True).eager_bytes == 7296
    with pytest.raises(ValueError, match="multiple"):
        patchify_bytes(3, 8, 4, 10, 8, 1)


def test_patchify_table_hornet_t_pinned():
    from bench.model.patchify import hornet_t_patchify_table
    # batch 32, fp16 (python -m bench.model.patchify, and the end of python -m bench.model.gnconv)
    rows = hornet_t_patchify_table()
    assert [(l.name, l.C, l.K, l.P, l.H, l.pre_norm, l.post_norm) for l, _ in rows] == [
        ("stem", 3, 64, 4, 224, False, True), ("downsample1", 64, 128, 2, 56, True, False),
        ("downsample2", 128, 256, 2, 28, True, False), ("downsample3", 256, 512, 2, 14, True, False)]
    assert [(t.eager_bytes, t.fused_bytes, t.eager_launches, t.fused_launches) for _, t in rows] == [
        (204_122_496, 22_485_376, 11, 1), (200_970_752, 19_542_528, 11, 2),
        (100_263_936, 10_707_968, 11, 2), (50_938_112, 9_062_400, 11, 2)]
    # the downsampling layers' fp16 fold (K*4 rows of C = 2K rows of K/2): 3 * 2K^2 elements * 2 B + 6 * 4K * 4 B
    fp32 = hornet_t_patchify_table(dtype="float32")
    for (l, h), (_, f) in zip(rows[1:], fp32[1:]):
        assert 2 * (h.fused_bytes - 12 * l.K * l.K - 96 * l.K) == f.fused_bytes
    assert rows[0][1].fused_bytes * 2 == fp32[0][1].fused_bytes
    for _, t in rows:
        assert 5 < t.saving < 11 and sum(b for _, _, b in t.fused_kernel_costs()) == t.fused_bytes


def test_patchify_layers_are_hornet_ts():
    # the table's layers against the trunk resfuse.hornet builds (its downsample_layers)
    from resfuse.hornet import HorLayerNorm, hornet_t
    from bench.model.patchify import hornet_t_patchify_layers
    trunk = hornet_t(depths=(0, 0, 0, 0))
    for l, seq in zip(hornet_t_patchify_layers(), trunk.downsample_layers, strict=True):
        conv, = [c for c in seq if isinstance(c, nn.Conv2d)]
        norm, = [c for c in seq if isinstance(c, HorLayerNorm)]
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
            l.C, l.K, (l.P, l.P), (l.P, l.P), (0, 0))
        assert norm.data_format == "channels_first" and list(seq).index(norm) == (0 if l.pre_norm else 1)
        assert norm.normalized_shape == ((l.C if l.pre_norm else l.K),) and l.pre_norm != l.post_norm


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_patchify_eager_steps_are_what_pytorch_dispatches(layer):
    # HorNet-T's stem / downsampling layer (resfuse.hornet) forward against a trace of the aten ops
    # (fp32, channels_last): the kernel count, and the bytes per output pixel (batch 2 less batch 1).
    from resfuse.hornet import hornet_t
    from bench.model.patchify import hornet_t_patchify_layers, patchify_bytes
    torch.manual_seed(0)
    mod = hornet_t(depths=(0, 0, 0, 0)).downsample_layers[layer].eval()
    l = hornet_t_patchify_layers()[layer]
    hw, out = 2 * l.P, 2 * 2
    traced = [_KernelTrace.run(mod, torch.randn(b, l.C, hw, hw).contiguous(memory_format=torch.channels_last))
              for b in (1, 2)]
    (k1, b1), (k2, b2) = traced
    model = patchify_bytes(l.C, l.K, l.P, hw, hw, 1, "float32", pre_norm=l.pre_norm, post_norm=l.post_norm)
    assert k1 == k2 == model.eager_launches == 11
    per_pixel = sum(model.step_bytes(s) for s in model.eager_steps) // out
    assert (b2 - b1) // out == per_pixel and (b2 - b1) % out == 0
    assert b1 == sum(model.step_bytes(s) for s in model.eager_steps) + model.param_bytes


def test_hornet_training_and_horblock_cases_registered():
    for op, kind in (("gnconv_train", "train"), ("horblock", "horblock"), ("horblock_train", "train")):
        cs = [c for c in cases.select() if c.op == op]
        assert [c.name for c in cs] == [f"{op}.hornet_t.stage{i}" for i in (1, 2, 3, 4)]
        assert [(c.spec.dim, c.spec.order, c.spec.H) for c in cs] == [(64, 2, 56), (128, 3, 28), (256, 4, 14),
                                                                      (512, 5, 7)]
        assert all(c.kind == kind and c.spec.s == pytest.approx(1 / 3) for c in cs)
        assert [c.count for c in cs] == [2, 3, 18, 2]
    assert cases.REGISTRY["gnconv_train.hornet_t.stage3"].layers[0] == "stages.2.0.gnconv"
    assert cases.REGISTRY["horblock.hornet_t.stage3"].layers[0] == "stages.2.0"
    assert cases.REGISTRY["horblock_train.hornet_t.stage2"].describe() == (
        "HorBlock 128x28x28 (gnconv order 3 dims 32/64/128 dw7x7 s=1/3; MLP 128-512-128), forward + backward")
    assert cases.REGISTRY["gnconv_train.hornet_t.stage2"].describe() == \
        "gnconv 128x28x28 order 3 dims 32/64/128 dw7x7 s=1/3, forward + backward"
    # --quick: stage 3's training cases, at the first batch only, without torch.compile (as the gnconv case)
    quick = [c for c in cases.select(quick=True) if c.group == "hornet_t"]
    assert [c.name for c in quick] == ["gnconv.hornet_t.stage3", "gnconv_train.hornet_t.stage3",
                                       "horblock_train.hornet_t.stage3"]
    assert all(c.quick_providers == cases.QUICK_GNCONV_PROVIDERS for c in quick)
    assert {"train", "horblock", "gnconv", "model"} <= set(cases.FIRST_BATCH_ONLY_KINDS)
    # select() orders by kind, so the run order does not depend on which module was imported first
    kinds = [c.kind for c in cases.select()]
    assert kinds == sorted(kinds, key=cases.KIND_ORDER.index)


def test_hornet_training_model_columns_are_the_traffic_model():
    from bench.model.gnconv import gnconv_train_bytes, horblock_bytes
    ceil = m.Ceilings(bandwidth=3e12, matmul={"bfloat16": 800e12})
    for c in cases.select(kinds=["train", "horblock"]):
        s = c.spec
        for batch, dtype, name in ((1, torch.float32, "float32"), (32, torch.bfloat16, "bfloat16")):
            t = (gnconv_train_bytes(s.dim, s.order, s.H, s.W, batch, name) if c.op == "gnconv_train" else
                 horblock_bytes(s.dim, s.order, s.H, s.W, batch, name, train=c.op == "horblock_train"))
            cost = c.cost(batch, dtype)
            assert (cost.flops, cost.fused_bytes, cost.unfused_bytes) == (t.flops, t.fused_bytes, t.eager_bytes)
            assert cost.unfused_bytes > cost.fused_bytes
        # the floor: the fused kernels' floors summed, each with its own FLOPs (recomputation included)
        t = cases.OPS[c.op].traffic(c, 32, torch.bfloat16)
        assert c.floor(32, torch.bfloat16, ceil).seconds == pytest.approx(
            sum(max(f / 800e12, b / 3e12) for _, f, b in t.fused_kernel_costs()))
        assert c.floor(32, torch.float16, ceil) is None


def test_bench_horblock_is_hornets(seed):
    # bench.models.HorBlock has HorNet's (the seed's) structure, names and forward, and its
    # backward gives the same gradients; resfuse.convert recognises it
    from functools import partial

    import seed_hornet as sh
    from bench.models import make_horblock
    import resfuse
    ours = make_horblock(32, 3, 1 / 3, seed=seed).train()
    theirs = sh.HorBlock(32, gnconv=partial(sh.gnconv, order=3, s=1 / 3)).train()
    theirs.load_state_dict(ours.state_dict())
    assert ours.gamma1.abs().min() >= 0.5 and ours.gamma2.abs().min() >= 0.5  # O(1) layer scales, not 1e-6
    x = torch.randn(2, 32, 6, 5).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 32, 6, 5)
    grads = []
    for mod in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(g)
        grads.append((y.detach(), xi.grad, mod.pwconv1.weight.grad, mod.gnconv.proj_in.weight.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert type(resfuse.convert(ours, backend="eager")).__name__ == "FusedHorBlock"


@pytest.mark.parametrize("provider", ["eager", "resfuse-eager", "resfuse-triton"])
@pytest.mark.parametrize("op_name", ["gnconv_train", "horblock", "horblock_train"])
def test_hornet_workload_and_providers(device, op_name, provider):
    # tiny shapes (order 3, 2 argument sets, each its own module copy), checked by the harness's rule;
    # on a CPU machine resfuse-triton runs through the Triton interpreter in fp32, on the GPU box in bf16
    spec = cases.GnConvCaseSpec(16, 3, 6, 5)
    case = cases.Case(f"{op_name}.test", op_name, "test", spec)
    op = cases.OPS[op_name]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    wl = op.make_workload(case, device, dtype, 2, n_sets=2, seed=0)
    train = op_name.endswith("_train")
    (x0, m0, *_), (x1, m1, *_) = wl.arg_sets
    assert x0.is_contiguous(memory_format=torch.channels_last) and not torch.equal(x0, x1)
    assert m0 is not m1 and m0.training == train and x0.requires_grad == train
    ref = wl.reference
    if train:
        assert set(ref) == {"y", "dx"} | {f"{n}.grad" for n in op.grads}
        assert all(t.dtype == torch.float64 and torch.isfinite(t).all() and t.abs().max() > 0 for t in ref.values())
        assert ref["dx"].shape == x0.shape and 0.1 < ref["y"].std().item() < 10
    else:
        assert ref.dtype == torch.float64 and ref.shape == x0.shape and 0.1 < ref.std().item() < 10
    with torch.no_grad():  # as bench/run.py calls them: a training step turns grad on itself
        tol = cases.tolerances(numerics, op.build("eager", wl)(*wl.arg_sets[0]), ref, dtype)
        fn = op.build(provider, wl)
        for args in wl.arg_sets:
            out = fn(*args)
        err, t, worst = cases.check(numerics, fn(*wl.arg_sets[0]), ref, tol)
    assert err <= t, (worst, err, t)
    note = op.note(wl, provider)
    if provider == "eager":
        assert note == ""
    else:
        assert note.startswith("fused fwd: layernorm_conv1x1, gnconv_chain"), note
        assert ("Triton launches" in note) == (provider == "resfuse-triton"), note
        assert ("bwd: " in note) == train, note
    if train:  # the step's gradients are the module's own, and a wrong one is caught and named
        assert out["dx"] is x1.grad
        bad = dict(out, dx=out["dx"] * 1.01)
        err, t, worst = cases.check(numerics, bad, cases.OPS[op_name].reference(m1, wl.arg_sets[1]), tol)
        assert err > t and worst == "dx"


def test_hornet_provider_that_would_not_fuse_is_an_error(monkeypatch):
    from resfuse.nn.gnconv import GnConv
    op = cases.OPS["horblock_train"]
    case = cases.Case("horblock_train.test", "horblock_train", "test", cases.GnConvCaseSpec(8, 2, 4, 4))
    wl = op.make_workload(case, torch.device("cpu"), torch.float32, 1, n_sets=1, seed=0)
    monkeypatch.setattr(GnConv, "unfused_reason", lambda self: "forced for the test")
    with pytest.raises(RuntimeError, match="did not run"):
        op.build("resfuse-eager", wl)


# ----------------------------------------------------------------------------
# Harness pieces
# ----------------------------------------------------------------------------

def test_rotation_count():
    assert timing.rotation_count(1 << 20, 50 << 20, 256) == 100  # 2 x L2 / set
    assert timing.rotation_count(200 << 20, 50 << 20, 256) == 1
    assert timing.rotation_count(1 << 10, 50 << 20, 256) == 256  # capped
    assert timing.rotation_count(1 << 20, 50 << 20, 8) == 8
    assert timing.rotation_count(3 << 30, 50 << 20, 256) == 1  # over the memory budget: still one


def test_time_cpu_and_quantiles():
    t = timing.time_cpu([lambda: sum(range(1000))], warmup_s=0.0, rep_s=0.01, min_reps=5)
    assert t.reps >= 5 and 0 < t.p20_s <= t.median_s <= t.p80_s
    assert timing._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert timing._quantile([1.0, 2.0], 0.25) == 1.25


class _FakeCuda:
    """Stand-ins for the torch.cuda calls the GPU timer makes, so its
    bookkeeping (warm-up, repetitions, graph sweeps) runs on a CPU machine."""

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    class Stream:
        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            time.sleep(1e-5)

    @staticmethod
    def graph(g):
        return contextlib.nullcontext()

    @staticmethod
    def stream(s):
        return contextlib.nullcontext()


def test_time_cuda_bookkeeping_with_a_fake_device(monkeypatch):
    fake = _FakeCuda()
    for name in ("Event", "Stream", "CUDAGraph", "graph", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: fake.Stream())
    calls = [0, 0, 0]
    fns = [lambda i=i: calls.__setitem__(i, calls[i] + 1) for i in range(3)]
    t = timing.time_cuda(fns, graph=False, warmup_ms=1, rep_ms=2, min_reps=10)
    assert t.reps >= 10 and not t.graph and t.median_s >= 0
    assert min(calls) >= 4 and max(calls) - min(calls) <= 2  # sweep, warm-up and timed calls rotate
    calls[:] = [0, 0, 0]
    t = timing.time_cuda(fns, graph=True, warmup_ms=1, rep_ms=2, min_reps=5)
    assert t.graph and t.reps >= 5 and t.median_s > 0
    assert max(calls) - min(calls) <= 1  # warm-up round-robin; the captured sweeps call every set alike


def test_report_pieces():
    assert report.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert report.geomean([]) is None
    assert report.device_tag("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    t = report.markdown_table(("a", "b"), [(1.23456, None), (12345.6, "x")])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | - |", "| 12,346 | x |"]


# ----------------------------------------------------------------------------
# The CPU paths of the scripts
# ----------------------------------------------------------------------------

def _run(cmd, timeout):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_run_model_only_prints_every_case():
    r = _run([sys.executable, "bench/run.py", "--model-only", "--dtype", "bf16", "--batch", "32"], 120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| case | layers | op | dtype | N | GFLOP | MB fused | MB eager seq |" in r.stdout
    body = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(body) == len(cases.REGISTRY)


def test_run_quick_cpu_times_and_writes_results(tmp_path):
    from bench.model.gnconv import horblock_bytes
    r = _run([sys.executable, "bench/run.py", "--quick", "--case",
              "resnet50.conv2_x.0.conv2,block.resnet50.conv2_x.0,model.resnet18,gnconv.hornet_t.stage3,"
              "gnconv_train.hornet_t.stage3,horblock_train.hornet_t.stage3",
              "--cpu-threads", "1", "--out-dir", str(tmp_path), "--summary-file", str(tmp_path / "s.md")], 240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "CPU timings are no evidence about the kernels" in out
    assert "| case | dtype | N | GFLOP | MB fused | MB eager seq | floor us | bound | provider | median us |" in out
    csvs = list(tmp_path.glob("*-cpu-quick.csv"))
    assert len(csvs) == 1 and list(tmp_path.glob("*-cpu-quick.md"))
    lines = csvs[0].read_text().splitlines()
    head = [ln for ln in lines if ln.startswith("# ")]
    assert any(ln.startswith("# command: python bench/run.py --quick") for ln in head)
    assert any(ln.startswith("# versions: torch") for ln in head)
    rows = list(csv.DictReader(ln for ln in lines if not ln.startswith("#")))
    assert {(r_["case"], r_["provider"]) for r_ in rows} == {
        (c, p) for c in ("resnet50.conv2_x.0.conv2", "block.resnet50.conv2_x.0", "model.resnet18",
                         "gnconv.hornet_t.stage3", "gnconv_train.hornet_t.stage3", "horblock_train.hornet_t.stage3")
        for p in ("eager", "resfuse-eager")}
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["rel_err"]) <= float(row["tol"])
        assert float(row["time_us"]) > 0 and float(row["gflop"]) > 0 and math.isfinite(float(row["floor_us"]))
    conv = next(r_ for r_ in rows if r_["case"] == "resnet50.conv2_x.0.conv2")
    assert float(conv["gflop"]) == pytest.approx(0.231211008)
    assert float(conv["fused_mb"]) == pytest.approx(1.754112)
    block = {r_["provider"]: r_ for r_ in rows if r_["case"] == "block.resnet50.conv2_x.0"}
    assert block["eager"]["kind"] == "block" and float(block["eager"]["gflop"]) == pytest.approx(0.462422016)
    assert float(block["eager"]["fused_mb"]) == pytest.approx(8.333312)  # the hand-computed block above
    assert float(block["eager"]["unfused_mb"]) == pytest.approx(46.86848)
    assert block["resfuse-eager"]["note"] == "3 kernels: conv_bn_act, conv_bn_act, conv_bn_proj_act"
    gn = {r_["provider"]: r_ for r_ in rows if r_["case"] == "gnconv.hornet_t.stage3"}
    assert gn["eager"]["kind"] == "gnconv" and float(gn["eager"]["gflop"]) == pytest.approx(0.103149312)
    assert gn["resfuse-eager"]["note"] == "2 kernels: layernorm_conv1x1, gnconv_chain"
    tr = {(r_["case"].split(".")[0], r_["provider"]): r_ for r_ in rows if r_["kind"] == "train"}
    assert float(tr[("gnconv_train", "eager")]["gflop"]) == pytest.approx(3 * 0.103149312)  # forward + backward
    assert float(tr[("horblock_train", "eager")]["fused_mb"]) == pytest.approx(
        horblock_bytes(256, 4, 14, 14, 1, "float32", train=True).fused_bytes / 1e6)
    assert tr[("gnconv_train", "resfuse-eager")]["note"].endswith("bwd: eager autograd")
    summary = (tmp_path / "s.md").read_text()
    assert "provider" in summary and "blocks: geomean x eager" in summary and "gnconv: geomean x eager" in summary
    assert "train: geomean x eager" in summary and "horblock: geomean" not in summary


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_device_check_dry_run():
    r = _run(["bash", "bench/device_check.sh", "--dry-run"], 180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "dry run: all checks passed" in r.stdout
    for stage in ("env", "build", "gpu_tests", "sanitizer", "bench"):
        assert f"\n{stage} " in r.stdout


def test_wrong_or_failing_provider_is_reported_not_timed(monkeypatch, tmp_path, capsys):
    from bench import run
    op = cases.OPS["conv_bn_act"]
    real_build = op.build

    def build(provider, wl):
        fn = real_build(provider, wl)
        if provider != "resfuse-eager":
            return fn
        if wl.case.name.endswith("downsample.0"):
            return lambda *a: fn(*a) * 1.01  # fast and 1% off: not a result
        def broken(*a):
            raise RuntimeError("kernel exploded")
        return broken

    monkeypatch.setattr(op, "build", build)
    rc = run.main(["--case", "resnet18.conv5_x.0.downsample.0,resnet18.conv5_x.1.conv1", "--device", "cpu",
                   "--provider", "eager,resfuse-eager", "--out-dir", str(tmp_path), "--no-plot"])
    assert rc == 0
    lines = next(tmp_path.glob("*.csv")).read_text().splitlines()
    rows = {(r["case"], r["provider"]): r for r in csv.DictReader(ln for ln in lines if not ln.startswith("#"))}
    wrong = rows[("resnet18.conv5_x.0.downsample.0", "resfuse-eager")]
    assert wrong["status"] == "WRONG" and wrong["time_us"] == "" and float(wrong["rel_err"]) > float(wrong["tol"])
    err = rows[("resnet18.conv5_x.1.conv1", "resfuse-eager")]
    assert err["status"] == "error" and "kernel exploded" in err["note"] and err["time_us"] == ""
    assert all(rows[(c, "eager")]["status"] == "ok" for c, _ in rows)
    out = capsys.readouterr().out
    assert "| resfuse-eager | fp32 | 0 | 1 | 1 | 0 |" in out  # the summary counts them
