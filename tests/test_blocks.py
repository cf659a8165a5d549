"""Fused ResNet blocks and whole-ResNet conversion: torchvision, timm and
the seed's structures, eval against the float64 reference (eager path and
Triton kernels), launch counts per block, train-mode equality, state_dict,
and the rest of nn.Module life."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse import models as rf_models
from resfuse.models import randomize_bn
from resfuse.recognize.blocks import match_block
from resfuse.nn.blocks import BasicBlock, Bottleneck, FusedResidualBlock, fuse_block
from resfuse.nn.stem import ConvBNHead
from testutil import launches as _launches, same_weight_layout
from numerics import assert_matches



def _tv():
    """torchvision, or a visible skip (the GPU box has none; the tests that
    need no torchvision use resfuse.models, which has its layout)."""
    return pytest.importorskip("torchvision")


def _prep(model, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return randomize_bn(model, seed).eval().to(device, dtype)


def _check_model(plain, x, backend="eager", seed=0, what=""):
    """Convert, run, compare with float64 and eager by the rule; return the converted model."""
    fused = resfuse.convert(plain, backend=backend)
    with torch.no_grad():
        out = fused(x)
        eager = plain(x)
        ref = copy.deepcopy(plain).to(torch.float64)(x.to(torch.float64))
    assert_matches(out, ref, eager, x.dtype, what or type(plain).__name__, seed)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() and out.dim() == 4:
        assert out.is_contiguous(memory_format=torch.channels_last)
    return fused


def _unfused_reasons(model):
    rep = resfuse.explain(model)
    return {r.name: r.reason for r in rep if r.kind == "conv"}


TV_MODELS = {
    "resnet18": lambda tv: tv.models.resnet18(),
    "resnet34": lambda tv: tv.models.resnet34(),
    "resnet50": lambda tv: tv.models.resnet50(),
    "resnet101": lambda tv: tv.models.resnet101(),
    "resnet152": lambda tv: tv.models.resnet152(),
    "resnext50_32x4d": lambda tv: tv.models.resnext50_32x4d(),
    "wide_resnet50_2": lambda tv: tv.models.wide_resnet50_2(),
    "resnet50_dilated": lambda tv: tv.models.resnet50(replace_stride_with_dilation=[False, True, True]),
}


@pytest.mark.parametrize("name", sorted(TV_MODELS))
def test_torchvision_resnets_eager_path(name):
    plain = _prep(TV_MODELS[name](_tv()), seed=1)
    x = torch.randn(1, 3, 40, 40)
    fused = _check_model(plain, x, "eager", what=name)
    unfused = _unfused_reasons(fused)
    # Every conv is fused; ResNeXt's grouped convs too (they run on eager
    # inside the fused op when the backend is triton, with the reason).
    assert unfused == {}, unfused
    blocks = [m for m in fused.modules() if isinstance(m, FusedResidualBlock)]
    assert len(blocks) == sum(len(getattr(plain, f"layer{i}")) for i in range(1, 5))
    assert isinstance(fused.conv1, ConvBNHead)
    assert list(fused.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "resnet26t", "seresnet18", "resnet18d"])
def test_timm_resnets(name):
    timm = pytest.importorskip("timm")
    plain = _prep(timm.create_model(name, pretrained=False), seed=2)
    x = torch.randn(1, 3, 48, 48)
    fused = _check_model(plain, x, "eager", what=name)
    unfused = _unfused_reasons(fused)
    if name.startswith("se"):
        # squeeze-excitation sits between bn and the add: the block is not
        # replaced, its conv -> BN (-> act) chains fuse in place; the SE's
        # BN-less 1x1 convs stay, reason stated
        assert not any(isinstance(m, FusedResidualBlock) for m in fused.modules())
        heads = [m for n, m in fused.named_modules() if n.split(".")[-1] in ("conv1", "conv2")]
        assert len(heads) == 17 and all(isinstance(m, ConvBNHead) for m in heads)  # 8 blocks + the stem
        assert unfused and all(".se." in n and "not read by one BatchNorm2d" in r for n, r in unfused.items()), \
            unfused
    else:
        assert unfused == {}, unfused
    assert list(fused.state_dict()) == list(plain.state_dict())


class ResDown(nn.Module):
    """The seed's ResDown: bottleneck with the stride on the first 1x1 and a
    projection shortcut (expansion 4), rewritten for the test."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride=stride, bias=False),
                                        nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.relu(out)


@pytest.mark.parametrize("include_top", [True, False])
def test_seed_resnet_structures(include_top):
    from seed_models import ResNet as SeedResNet, ResidualLayer
    plain = _prep(SeedResNet(ResidualLayer, [2, 2, 2, 2], include_top=include_top), seed=3)
    x = torch.randn(2, 3, 33, 35)
    fused = _check_model(plain, x, "eager", what="seed ResNet")
    assert _unfused_reasons(fused) == {}
    assert all(isinstance(getattr(fused, f"layer{i}")[j], BasicBlock) for i in range(1, 5) for j in range(2))
    down = _prep(ResDown(24, 8, stride=2), seed=4)
    fd = fuse_block(copy.deepcopy(down))
    assert isinstance(fd, Bottleneck) and fd.spec.shortcut == "projection"
    xd = torch.randn(2, 24, 9, 11)
    with torch.no_grad():
        ref = copy.deepcopy(down).double()(xd.double())
        assert_matches(fd(xd), ref, down(xd), torch.float32, "ResDown")


def _small_bottleneck_resnet():
    return rf_models.resnet50(width=8, num_classes=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_path_resnet18_and_bottleneck(device, dtype, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for name, build in (("resnet18", lambda: rf_models.resnet18(num_classes=10)),
                        ("bottleneck-w8", _small_bottleneck_resnet)):
        plain = _prep(build(), seed=5, dtype=dtype, device=device).to(memory_format=fmt)
        x = torch.randn(1, 3, 32, 32, device=device, dtype=dtype).contiguous(memory_format=fmt)
        before = _launches()
        fused = _check_model(plain, x, "triton", seed=5, what=f"{name} {dtype} {layout}")
        n_blocks = [m for m in fused.modules() if isinstance(m, FusedResidualBlock)]
        expected = 1 + sum(len(b.spec.stages) for b in n_blocks)  # stem + one per conv stage
        assert _launches() - before == expected, (name, _launches() - before, expected)


@pytest.mark.parametrize("kind", ["basic", "basic-proj", "bottleneck", "bottleneck-proj"])
def test_launches_per_block(device, kind, monkeypatch):
    """BasicBlock = 2 kernels, Bottleneck = 3, with the shortcut (identity or
    projection) inside the last one: nothing else runs."""
    proj = kind.endswith("proj")
    if kind.startswith("basic"):
        ds = nn.Sequential(nn.Conv2d(6, 10, 1, 2, bias=False), nn.BatchNorm2d(10)) if proj else None
        block = rf_models.BasicBlock(6, 10 if proj else 6, 2 if proj else 1, ds)
        cin, n = 6, 2
    else:
        ds = nn.Sequential(nn.Conv2d(12, 20, 1, 2, bias=False), nn.BatchNorm2d(20)) if proj else None
        block = rf_models.Bottleneck(12 if proj else 20, 5, 2 if proj else 1, ds)
        cin, n = (12 if proj else 20), 3
    block = _prep(block, seed=6, device=device)
    fused = fuse_block(copy.deepcopy(block), backend="triton")
    x = torch.randn(2, cin, 9, 7, device=device)
    # Any eager conv, BN, add or ReLU while the fused block runs means part
    # of it ran unfused: count them (hooks would themselves unfuse the block).
    eager_calls = []
    import torch.nn.functional as F
    for mod, fn in ((F, "conv2d"), (F, "batch_norm"), (torch, "relu"), (torch, "add"), (F, "relu")):
        orig = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _o=orig, _n=fn, **k: eager_calls.append(_n) or _o(*a, **k))
    before = _launches()
    with torch.no_grad():
        out = fused(x)
    launched, unfused_ops = _launches() - before, list(eager_calls)
    monkeypatch.undo()
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double())
        assert_matches(out, ref, block(x), torch.float32, kind)
    assert launched == n, (launched, n)
    assert unfused_ops == [], f"ran outside the fused kernels: {unfused_ops}"
    assert all(d.backend == "triton" for d in fused.last_decisions.values())


def test_state_dict_round_trip_torchvision_keys():
    torchvision = _tv()
    plain = _prep(torchvision.models.resnet50(num_classes=10), seed=7)
    fused = resfuse.convert(plain, backend="eager")  # keys and values, not kernels: no interpreter run
    sd_plain, sd_fused = plain.state_dict(), fused.state_dict()
    assert list(sd_plain) == list(sd_fused)
    for k in sd_plain:
        assert torch.equal(sd_plain[k], sd_fused[k]), k
    # new values into the fused model, and its checkpoint back into a plain one
    other = _prep(torchvision.models.resnet50(num_classes=10), seed=8)
    fused.load_state_dict(other.state_dict())
    back = torchvision.models.resnet50(num_classes=10)
    back.load_state_dict(fused.state_dict())
    back.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = copy.deepcopy(other).double()(x.double())
        assert_matches(fused(x), ref, other(x), torch.float32, "after load_state_dict")
        assert_matches(back(x), ref, other(x), torch.float32, "loaded back into torchvision")


def test_train_mode_matches_original_and_running_stats():
    torch.manual_seed(9)
    plain = randomize_bn(rf_models.resnet18(num_classes=5), 9)
    fused = resfuse.convert(plain)
    same_weight_layout(plain, fused)  # bitwise: the same weight strides
    plain.train(), fused.train()
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.01, momentum=0.9)
    for step in range(3):
        x = torch.randn(4, 3, 32, 32)
        yp, yf = plain(x), fused(x)
        assert torch.equal(yp, yf), step
        assert torch.isfinite(yp).all(), step
        torch.nn.functional.cross_entropy(yp, torch.arange(4) % 5).backward()
        torch.nn.functional.cross_entropy(yf, torch.arange(4) % 5).backward()
        for (n, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
            assert torch.equal(a.grad, b.grad), n
        opt_p.step(), opt_f.step(), opt_p.zero_grad(), opt_f.zero_grad()
    for (n, a), (_, b) in zip(plain.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), n
    # then eval: fused path uses the updated running statistics
    plain.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = copy.deepcopy(plain).double()(x.double())
        assert_matches(fused(x), ref, plain(x), torch.float32, "eval after training")


def test_eval_gradients_match_eager():
    """Frozen-BN fine-tuning: eval mode, gradients through the fused ops."""
    torch.manual_seed(10)
    plain = randomize_bn(rf_models.resnet18(num_classes=5), 10).eval().double()
    fused = resfuse.convert(plain, backend="eager")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plain(x).sum().backward()
    fused(x).sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-11), n


def test_module_life_deepcopy_pickle_to_compile_autocast():
    plain = _prep(rf_models.resnet18(num_classes=10), seed=11)
    fused = resfuse.convert(plain, backend="eager")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(copy.deepcopy(fused)(x), y)
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), y)
        assert torch.equal(pickle.loads(pickle.dumps(fused))(x), y)
        # .to(dtype / memory_format)
        f64 = copy.deepcopy(fused).to(torch.float64)
        ref = copy.deepcopy(plain).double()(x.double())
        assert_matches(f64(x.double()), ref, copy.deepcopy(plain).double()(x.double()), torch.float64, "f64")
        cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
        assert_matches(cl(x.to(memory_format=torch.channels_last)), ref, plain(x), torch.float32, "cl")
        # train()/eval() switching
        fused.train()
        fused.eval()
        assert torch.equal(fused(x), y)
        # autocast (CPU bf16): the fused ops compute in bf16 as eager autocast does
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ya, ye = fused(x), plain(x)
        assert_matches(ya, ref, ye, torch.bfloat16, "autocast")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_matches(compiled(x), ref, plain(x), torch.float32, "compiled")


def test_unmatched_blocks_stay_and_explain_says_why():
    class Odd(nn.Module):  # a conv1/conv2 block with an extra, unknown submodule
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.relu = nn.ReLU()
            self.gate = nn.Sigmoid()

        def forward(self, x):
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) * self.gate(x))

    m = nn.Sequential(Odd()).eval()
    f = resfuse.convert(m)
    assert type(f[0]) is Odd and "gate" in match_block(m[0])
    # not a residual block, but its traced forward has two conv -> BN -> ReLU chains: fused in place
    rows = {r.name: r.kind for r in resfuse.explain(f)}
    assert rows == {"0.conv1": "conv+bn+relu (head)", "0.conv2": "conv+bn (head)"}, rows  # relu(bn2 * gate)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        ref, out = m(x), f(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6


def test_block_constructors_and_from_module_errors():
    b = BasicBlock(8, 8)
    assert isinstance(b, FusedResidualBlock) and b.spec.shortcut == "identity"
    assert list(b.state_dict()) == list(rf_models.BasicBlock(8, 8).state_dict())
    bt = Bottleneck(16, 4)
    assert list(bt.state_dict()) == list(rf_models.Bottleneck(16, 4).state_dict())
    with pytest.raises(ValueError, match="conv stages"):
        BasicBlock.from_module(rf_models.Bottleneck(16, 4))
    with pytest.raises(ValueError, match="not a fusable residual block"):
        fuse_block(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="backend"):
        b.backend = "fast"
