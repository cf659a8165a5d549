"""convert replaces a module only when its traced forward computes the
fused pattern (resfuse/recognize/dataflow.py): blocks with standard
children but another forward, more inputs, hooks, or an intermediate used
twice are left alone with the reason, and the converted model computes
exactly what the original computes."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

import resfuse
from resfuse.recognize.blocks import match_block
from resfuse.nn.blocks import FusedResidualBlock
from resfuse.nn.stem import ConvBNHead
from resfuse.recognize.stem import stem_parts
from resfuse.recognize.dataflow import chain_reason, trace
from resfuse import models
from seed_models import ResidualLayer, downsample, randomize_bn
from testutil import same_weight_layout


class Planted(BasicBlock):
    """torchvision BasicBlock's children, a different forward: no final ReLU, a scaled branch."""

    def forward(self, x):
        return 0.5 * self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x


class NoFinalAct(BasicBlock):
    def forward(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x


class BranchReused(BasicBlock):
    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + x) + 0 * h


class InputReused(BasicBlock):
    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x) * x


class ExtraInputs(BasicBlock):
    """timm DLA's signature: forward(x, shortcut=None, children=None)."""

    def forward(self, x, shortcut=None, children=None):
        shortcut = x if shortcut is None else shortcut
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class DataDependent(BasicBlock):
    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if out.sum() > 0:
            out = out + x
        return self.relu(out)


class SameComputationSubclass(BasicBlock):
    """Overrides forward with the same data flow, written differently: proven, so fused."""

    def forward(self, inp):
        branch = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(inp)))))
        shortcut = inp if self.downsample is None else self.downsample(inp)
        return self.relu(shortcut + branch)


def _net(block):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), block)
    return randomize_bn(net.eval(), torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cls, why", [
    (Planted, "forward returns an addition"),
    (NoFinalAct, "forward returns an addition"),
    (BranchReused, "forward returns an addition"),
    (InputReused, "forward returns"),
    (ExtraInputs, "takes 3 inputs (x, shortcut, children)"),
    (DataDependent, "does not trace with torch.fx"),
])
def test_block_with_standard_children_and_another_forward_is_left_alone(cls, why):
    plain = _net(cls(8, 8))
    fused = resfuse.convert(plain, backend="eager")
    assert type(fused[3]) is cls, "a block whose forward is not the pattern was replaced"
    x, h = torch.randn(2, 3, 9, 7), torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        for inp, a, b in ((h, plain[3], fused[3]), (x, plain, fused)):
            ref, out = a(inp), b(inp)
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    reason = match_block(plain[3])
    assert isinstance(reason, str) and why in reason and cls.__name__ in reason, reason
    rows = {r.name: r for r in resfuse.explain(fused)}
    assert rows["0"].kind == "conv+bn+relu"  # the Sequential run around it still fuses
    if cls is DataDependent:  # no traced forward: nothing inside is touched
        assert type(fused[3].conv1) is nn.Conv2d and type(fused[3].bn1) is nn.BatchNorm2d
        assert rows["3.conv1"].kind == "conv" and why in rows["3.conv1"].reason, rows["3.conv1"]
    else:  # the block stays, its proven conv -> BN (-> ReLU) chains fuse in place
        assert rows["3.conv1"].kind == "conv+bn+relu (head)" and rows["3.conv2"].kind == "conv+bn (head)", rows


def test_the_issue_planted_block_no_longer_changes_the_output():
    """The reported case: converted, it differed by a relative error of 0.75."""
    plain = _net(Planted(8, 8))
    with torch.no_grad():
        x = torch.randn(1, 3, 12, 12)
        ref = plain(x)
        out = resfuse.convert(plain, backend="eager")(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6


def test_a_subclass_with_the_same_data_flow_is_proven_and_fused():
    plain = _net(SameComputationSubclass(8, 8))
    fused = resfuse.convert(plain, backend="eager")
    assert isinstance(fused[3], FusedResidualBlock) and fused[3]._source_cls is SameComputationSubclass
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        ref, out = plain(x), fused(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("where", ["block pre-hook", "block hook", "conv2 hook", "downsample hook"])
def test_hooked_block_is_left_alone(where):
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    block = Bottleneck(8, 4, stride=2, downsample=ds)
    calls = []
    target = {"block pre-hook": block, "block hook": block, "conv2 hook": block.conv2,
              "downsample hook": ds[0]}[where]
    if where == "block pre-hook":
        target.register_forward_pre_hook(lambda m, a: calls.append(1))
    else:
        target.register_forward_hook(lambda m, a, o: calls.append(1))
    plain = _net(block)
    assert "hooks" in match_block(block)
    fused = resfuse.convert(plain, backend="eager", inplace=True)
    assert type(fused[3]) is Bottleneck
    with torch.no_grad():
        fused(torch.randn(1, 3, 8, 8))
    assert calls == [1]


def test_timm_dla34_converts_runs_and_matches():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    plain = randomize_bn(timm.create_model("dla34", pretrained=False).eval(), torch.Generator().manual_seed(2))
    fused = resfuse.convert(plain, backend="eager")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, out = plain(x), fused(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    blocks = [m for m in plain.modules() if type(m).__name__ == "DlaBasic"]
    assert blocks and all("takes 3 inputs" in match_block(b) for b in blocks)
    assert not any(isinstance(m, FusedResidualBlock) for m in fused.modules())


@pytest.mark.parametrize("block", [BasicBlock(8, 8), Bottleneck(32, 8), models.Bottleneck(32, 8),
                                   ResidualLayer(8, 16, 2, downsample(8, 16, 2))],
                         ids=["tv-basic", "tv-bottleneck", "resfuse-models-bottleneck", "seed-ResidualLayer"])
def test_known_blocks_are_proven(block):
    assert not isinstance(match_block(block), str), match_block(block)


def test_tracing_restores_training_flags():
    block = BasicBlock(8, 8).train()
    block.bn1.eval()
    trace(block)
    assert block.training and block.conv1.training and not block.bn1.training and block.bn2.training


class _StemReused(torchvision.models.ResNet):
    def forward(self, x):
        y = self.conv1(x)
        return self.layer1(self.maxpool(self.relu(self.bn1(y)) + y))


class _ActReused(torchvision.models.ResNet):
    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return self.layer1(self.maxpool(self.relu(y) + y))


def _resnet(cls):
    torch.manual_seed(0)
    m = cls(BasicBlock, [1, 1, 1, 1], width_per_group=64).eval()
    return randomize_bn(m, torch.Generator().manual_seed(3))


def test_stem_is_fused_only_as_its_forward_allows():
    x = torch.randn(1, 3, 32, 32)
    # conv1's output read twice: the stem is not fused at all
    plain = _resnet(_StemReused)
    assert "conv1's output is read by more than self.bn1" in stem_parts(plain)
    fused = resfuse.convert(plain, backend="eager")
    assert type(fused.conv1) is nn.Conv2d and type(fused.bn1) is nn.BatchNorm2d
    with torch.no_grad():
        ref, out = plain(x), fused(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    # bn1's output read twice: conv + BN fuse, the ReLU stays outside
    plain = _resnet(_ActReused)
    assert stem_parts(plain)[2] is None
    fused = resfuse.convert(plain, backend="eager")
    assert type(fused.conv1) is ConvBNHead and fused.conv1.fused_activation == "identity"
    with torch.no_grad():
        ref, out = plain(x), fused(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    # torchvision's own forward: conv -> bn -> relu in one head
    fused = resfuse.convert(_resnet(torchvision.models.ResNet), backend="eager")
    assert type(fused.conv1) is ConvBNHead and fused.conv1.fused_activation == "relu"


def test_chain_reason():
    graph = trace(copy.deepcopy(_resnet(torchvision.models.ResNet)))
    assert chain_reason(graph, ("conv1", "bn1", "relu")) is None
    assert "calls self.layer9 0 times" in chain_reason(graph, ("conv1", "layer9"))
    assert "does not call self.layer1 on self.bn1" in chain_reason(graph, ("bn1", "layer1"))


class _TrainOnlyReuse(BasicBlock):
    """The BasicBlock forward in eval; in train mode it reads bn1's output twice."""

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        if self.training:
            h = h + 0.1 * h
        out = self.bn2(self.conv2(self.relu(h)))
        return self.relu(out + x)


def test_a_forward_that_differs_in_train_mode_is_not_proven():
    """Fused modules run fused whenever their BNs use running statistics,
    which holds for frozen BNs in a model in train mode; so the eval graph
    alone is no proof."""
    block = _TrainOnlyReuse(8, 8)
    assert "something else in train mode" in trace(block)
    assert "something else in train mode" in match_block(block)
    plain = _net(_TrainOnlyReuse(8, 8))
    fused = resfuse.convert(plain, backend="eager")
    assert type(fused[3]) is _TrainOnlyReuse and type(fused[3].conv1) is nn.Conv2d
    fused.train()
    for m in fused.modules():  # frozen BN fine-tuning: BNs on running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    plain.load_state_dict(fused.state_dict())
    plain.train()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-5


# ---------------------------------------------------------------------------
# conv -> BN (-> act) wherever a forward computes it (recognize/heads.py)
# ---------------------------------------------------------------------------

def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _heads(model):
    return {n: m.fused_activation for n, m in model.named_modules() if isinstance(m, ConvBNHead)}


def test_googlenet_basic_conv2d_fuses_conv_bn_and_functional_relu():
    from torchvision.models.googlenet import BasicConv2d
    plain = randomize_bn(nn.Sequential(BasicConv2d(3, 8, kernel_size=3, padding=1),
                                       BasicConv2d(8, 5, kernel_size=1)).eval(), torch.Generator().manual_seed(4))
    fused = resfuse.convert(plain, backend="eager")
    assert _heads(fused) == {"0.conv": "relu", "1.conv": "relu"}  # F.relu(bn(conv(x))) in BasicConv2d.forward
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 11, 9)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6
    rows = {r.name: r.kind for r in resfuse.explain(fused)}
    assert rows == {"0.conv": "conv+bn+relu (head)", "1.conv": "conv+bn+relu (head)"}


@pytest.mark.parametrize("act, fused_act", [("silu", "silu"), ("relu", "relu"), ("leaky_relu", "leaky_relu"),
                                             ("hard_swish", "hardswish"), ("hard_sigmoid", "hardsigmoid"),
                                             ("gelu_tanh", "gelu_tanh"), ("elu", "identity"),
                                             ("tanh", "identity")])
def test_timm_conv_norm_act_fuses_batchnorm_act(act, fused_act):
    """timm's ConvNormAct: conv -> BatchNormAct2d (BN, drop, act inside). The
    BN's own act is fused whatever it is when the kernels have it; otherwise
    the BN module applies it to the head's output."""
    timm = pytest.importorskip("timm")
    from timm.layers import ConvNormAct
    plain = randomize_bn(nn.Sequential(ConvNormAct(3, 6, 3, act_layer=act), ConvNormAct(6, 4, 1, act_layer=act)),
                         torch.Generator().manual_seed(5)).eval()
    keys = {k: v.clone() for k, v in plain.state_dict().items()}
    fused = resfuse.convert(plain, backend="eager")
    assert _heads(fused) == {"0.conv": fused_act, "1.conv": fused_act}
    sd = fused.state_dict()
    assert list(sd) == list(keys) and all(torch.equal(sd[k], v) for k, v in keys.items())
    x = torch.randn(2, 3, 10, 7)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6
    # train mode is the original's: batch statistics, the same running-stat updates
    plain.train(), fused.train()
    same_weight_layout(plain, fused)  # bitwise: the same weight strides
    ref, out = plain(x), fused(x)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fused.state_dict().values()))
    # checkpoints and copies keep the folded classes
    buf = io.BytesIO()
    torch.save(fused.eval(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x)) and torch.equal(copy.deepcopy(fused)(x), fused(x))


def test_batchnorm_act_with_a_drop_layer_keeps_its_act_outside():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=nn.Dropout)

        def forward(self, x):
            return self.bn(self.conv(x))

    plain = randomize_bn(Unit().eval(), torch.Generator().manual_seed(6))
    fused = resfuse.convert(plain, backend="eager")
    assert _heads(fused) == {"conv": "identity"}
    x = torch.randn(1, 3, 7, 7)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6


class _ChainCases(nn.Module):
    """Four conv -> BN chains with different readers of their outputs."""

    def __init__(self):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i}", nn.Conv2d(4, 4, 1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(4))
        self.act = nn.ReLU()
        self.silu = nn.SiLU()

    def forward(self, x):
        a = self.act(self.bn0(self.conv0(x)))           # ReLU child: fused
        b = self.bn1(self.conv1(x))
        b = torch.relu(b) + b                          # BN output read twice: conv + BN only
        c = self.silu(self.bn2(self.conv2(x)))          # non-idempotent act after a plain BN: stays outside
        y = self.conv3(x)
        d = self.bn3(y) + y                            # conv output read twice: not fused
        return a + b + c + d


def test_chain_readers_decide_what_fuses():
    plain = randomize_bn(_ChainCases().eval(), torch.Generator().manual_seed(7))
    fused = resfuse.convert(plain, backend="eager")
    assert _heads(fused) == {"conv0": "relu", "conv1": "identity", "conv2": "identity"}
    reasons = {r.name: r.reason for r in resfuse.explain(fused) if r.kind == "conv"}
    assert reasons == {"conv3": "in _ChainCases.forward its output is not read by one BatchNorm2d child alone"}
    x = torch.randn(2, 4, 6, 5)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6


def test_conv_bn_head_through_the_triton_kernel(device):
    timm = pytest.importorskip("timm")
    from timm.layers import ConvNormAct
    plain = randomize_bn(ConvNormAct(3, 6, 3, stride=2, act_layer="silu"), torch.Generator().manual_seed(8))
    plain = plain.eval().to(device)
    fused = resfuse.convert(plain, backend="triton")
    x = torch.randn(1, 3, 9, 11, device=device)
    with torch.no_grad():
        out = fused(x)
    assert fused.conv.last_decision.backend == "triton"
    from numerics import assert_matches
    from seed_models import float64_reference
    with torch.no_grad():
        assert_matches(out, float64_reference(plain, x), plain(x), torch.float32, "ConvNormAct head", 8)
