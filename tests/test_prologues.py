"""convert fuses BatchNorm -> activation -> conv (pre-activation) wherever a
module's traced forward computes it (resfuse/recognize/prologues.py), into
``bn_act_conv``'s prologue: DenseNet's layers and transitions, DPN's
BnActConv2d, pre-activation ResNets, a user's own. What is not provably
that chain (a reused intermediate, a functional activation, hooks, a module
registered twice) is left alone with the reason; the converted model
computes what the original computes, in eval and in train mode, with the
original state_dict."""

import copy
import io
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resfuse
from resfuse.nn.stem import ConvBNHead
from seed_models import randomize_bn
from testutil import same_weight_layout

from numerics import assert_matches


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _kinds(model):
    return {r.name: r.kind for r in resfuse.explain(model)}


def _reasons(model):
    return {r.name: r.reason for r in resfuse.explain(model) if r.kind == "conv"}


class PreAct(nn.Module):
    """BN -> act -> 3x3 conv (padded) -> BN -> ReLU, as in a pre-activation net."""

    def __init__(self, act=None, c=5, k=7):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.act = act if act is not None else nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c, k, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(k)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.norm2(self.conv(self.act(self.norm(x)))))


def _prep(m, seed=0):
    m = randomize_bn(m.eval(), torch.Generator().manual_seed(seed))
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.bias.data.add_(1.0)  # a padded position would then differ visibly from act(shift)
    return m


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("act, name", [(nn.ReLU(inplace=True), "relu"), (nn.LeakyReLU(0.2), "leaky_relu"),
                                       (nn.SiLU(), "silu"), (nn.Hardswish(), "hardswish")])
def test_pre_activation_fuses_and_matches_in_eval_and_train(act, name):
    plain = _prep(PreAct(act))
    fused = resfuse.convert(plain, backend="eager")
    assert _kinds(fused) == {"conv": f"bn+{name}+conv+bn+relu (head)"}
    assert _same_state(plain, fused)
    x = torch.randn(2, 5, 7, 6)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6
    # the BN and activation modules are skipped while the conv applies them
    calls = []
    hook = fused.norm.register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6   # a hook: unfused, still right
    assert calls and _kinds(fused)["conv"] == "conv+bn+relu (head)"
    hook.remove()
    # train mode is the original's, running statistics included
    plain.train(), fused.train()
    same_weight_layout(plain, fused)  # bitwise: the same weight strides
    assert torch.equal(fused(x), plain(x)) and _same_state(plain, fused)
    # checkpoints, copies and a fresh process
    fused.eval(), plain.eval()
    buf = io.BytesIO()
    torch.save(fused, buf)
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(copy.deepcopy(fused)(x), y)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)


def test_live_parameters_are_read_at_every_call():
    plain = _prep(PreAct(nn.LeakyReLU(0.1)))
    fused = resfuse.convert(plain, backend="eager", inplace=True)
    x = torch.randn(1, 5, 6, 6)
    with torch.no_grad():
        before = fused(x).clone()
        fused.act.negative_slope = 0.5           # the slope, read from the module now
        fused.norm.running_mean.data.add_(0.7)   # an edit through .data (no version bump)
        fused.norm.weight.data.mul_(-1.0)
        after = fused(x)
        fused.act.__class__ = nn.LeakyReLU       # the same math, unfused, as reference
        fused.norm.__class__ = nn.BatchNorm2d
        fused.conv.__class__ = nn.Conv2d
        fused.norm2.__class__ = nn.BatchNorm2d
        ref = fused(x)
    assert _rel(after, ref) < 1e-6 and _rel(before, ref) > 1e-2


class _Cases(nn.Module):
    """Convs whose input is some BN's output, each with a reason it must not fuse."""

    def __init__(self):
        super().__init__()
        c = 4
        for i in range(6):
            self.add_module(f"bn{i}", nn.BatchNorm2d(c))
            self.add_module(f"conv{i}", nn.Conv2d(c, c, 3, padding=1))
        self.act1, self.act2, self.act4 = nn.ReLU(), nn.ReLU(), nn.ELU()

    def forward(self, x):
        # (each conv's output is scaled, so that no conv -> BN head takes the next BN)
        h = self.bn0(x)
        y = self.conv0(h) * 1.5 + h                                  # BN output read twice
        y = self.conv1(self.act1(self.bn1(y))) * 1.5 + self.act1(y)  # the activation module called twice
        t = self.act2(self.bn2(y))
        y = self.conv2(t) * t                                        # activation output read twice
        y = self.conv3(F.relu(self.bn3(y))) * 1.5                    # functional: cannot be switched off in place
        y = self.conv4(self.act4(self.bn4(y))) * 1.5                 # an activation the kernels do not have
        return self.conv5(self.bn5(y))                               # BN -> conv: fuses (identity activation)


def test_what_is_not_provably_the_chain_stays_with_a_reason():
    plain = _prep(_Cases())
    fused = resfuse.convert(plain, backend="eager")
    kinds = _kinds(fused)
    assert kinds["conv5"] == "bn+conv (preact)"
    reasons = _reasons(fused)
    assert "self.bn0's output is read by more than the conv" in reasons["conv0"]
    assert "self.act1 is called more than once" in reasons["conv1"]
    assert "self.act2 is called more than once or its output is read by more than the conv" in reasons["conv2"]
    assert "ELU, is not one the kernels fuse" in reasons["conv4"]
    assert "BN before it" not in reasons["conv3"]  # F.relu: its input is not a BN's output
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6


def test_a_module_registered_twice_is_not_folded():
    """One ReLU object in two parents: switching it off for one conv's
    prologue would switch it off for the other parent too."""
    shared_act = nn.ReLU()
    a = PreAct(shared_act)
    b = nn.Sequential(nn.Conv2d(7, 7, 1), shared_act)   # uses the same ReLU after a conv without BN
    plain = _prep(nn.Sequential(a, b))
    fused = resfuse.convert(plain, backend="eager")
    rows = {r.name: r for r in resfuse.explain(fused)}
    assert rows["0.conv"].kind == "conv+bn+relu (head)"  # its epilogue fuses; the shared ReLU stays
    assert "BN before it not fused: self.act is registered in more than one module" in rows["0.conv"].reason
    x = torch.randn(1, 5, 6, 6)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6


def test_plain_sequential_gives_each_bn_to_one_conv():
    plain = _prep(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                                nn.ReLU6(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)))
    fused = resfuse.convert(plain, backend="eager")
    kinds = _kinds(fused)
    # BN 3 could end conv 2 or start conv 5: conv 2 has a prologue already, so conv 5 takes it
    assert kinds == {"2": "bn+relu+conv (preact)", "5": "bn+relu6+conv+bn (head)"}
    assert _same_state(plain, fused)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6


def _tiny_densenet():
    from torchvision.models.densenet import DenseNet
    return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)


def test_torchvision_densenet_layers_and_transitions():
    plain = _prep(_tiny_densenet())
    fused = resfuse.convert(plain, backend="eager")
    kinds = _kinds(fused)
    # norm2 -> relu2 goes to conv2 (conv1 has norm1 -> relu1): every conv fused, relu2 switched off
    assert kinds["features.denseblock1.denselayer1.conv1"] == "bn+relu+conv (preact)"
    assert kinds["features.denseblock1.denselayer1.conv2"] == "bn+relu+conv (preact)"
    assert kinds["features.transition1.conv"] == "bn+relu+conv (preact)"
    assert _same_state(plain, fused)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6
    plain.train(), fused.train()
    same_weight_layout(plain, fused)  # bitwise: the same weight strides
    assert torch.equal(fused(x), plain(x)) and _same_state(plain, fused)


def test_timm_dpn_bn_act_conv():
    pytest.importorskip("timm")
    from timm.models.dpn import BnActConv2d
    plain = _prep(nn.Sequential(BnActConv2d(6, 8, 3, 1), BnActConv2d(8, 5, 1, 2)))
    fused = resfuse.convert(plain, backend="eager")
    assert _kinds(fused) == {"0.conv": "bn+relu+conv (preact)", "1.conv": "bn+relu+conv (preact)"}
    assert _same_state(plain, fused)
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6


def test_saved_converted_model_loads_in_a_fresh_process(tmp_path):
    """The folded classes are made on demand; unpickling makes them."""
    pytest.importorskip("timm")
    from timm.models.dpn import BnActConv2d
    plain = _prep(nn.Sequential(nn.BatchNorm2d(5), nn.SiLU(), nn.Conv2d(5, 7, 3, padding=1), BnActConv2d(7, 4, 1, 1)))
    fused = resfuse.convert(plain, backend="eager")
    x = torch.randn(1, 5, 6, 6)
    with torch.no_grad():
        want = fused(x)
    torch.save({"model": fused, "x": x, "y": want}, tmp_path / "m.pt")
    # the same thread count as here: CPU convolutions may round by it
    code = ("import torch, resfuse; torch.set_num_threads(%d); d = torch.load(%r, weights_only=False)\n"
            "m = d['model']\n"
            "with torch.no_grad(): assert torch.equal(m(d['x']), d['y'])\n"
            "print(type(m[1]).__name__, type(m[3].bn).__name__)") % (torch.get_num_threads(), str(tmp_path / "m.pt"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["FoldedSiLU", "FoldedBatchNormAct2d"]


def test_densenet_layer_through_the_triton_kernel(device):
    from torchvision.models.densenet import _DenseLayer
    plain = _prep(_DenseLayer(6, growth_rate=4, bn_size=2, drop_rate=0.0)).to(device)
    fused = resfuse.convert(plain, backend="triton")
    x = torch.randn(1, 6, 7, 9, device=device)
    with torch.no_grad():
        out = fused(x)
        ref = copy.deepcopy(plain).double()(x.double())
        assert_matches(out, ref, plain(x), torch.float32, "_DenseLayer")
    assert isinstance(fused.conv1, ConvBNHead) and fused.conv1.last_decision.backend == "triton"
    assert fused.conv1.last_decision.op == "bn_act_conv"


def test_conv_then_batchnorm_act_in_a_plain_sequential():
    """timm's DenseNet stem: Sequential(conv, BatchNormAct2d, pool). The
    Sequential planner groups only plain BNs; the head pass fuses this one."""
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d
    plain = _prep(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), BatchNormAct2d(6, act_layer=nn.SiLU),
                                nn.MaxPool2d(2)))
    fused = resfuse.convert(plain, backend="eager")
    assert _kinds(fused) == {"0": "conv+bn+silu (head)"} and _same_state(plain, fused)
    x = torch.randn(2, 3, 8, 7)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_bn_act_conv_module_is_a_drop_in_for_the_sequential(activation):
    kw = dict(stride=2, padding=1, bias=True)
    fused = resfuse.nn.BNActConv(5, 7, 3, activation=activation, negative_slope=0.2, backend="eager", **kw)
    act = {"relu": [nn.ReLU()], "leaky_relu": [nn.LeakyReLU(0.2)], "identity": []}[activation]
    plain = nn.Sequential(nn.BatchNorm2d(5), *act, nn.Conv2d(5, 7, 3, **kw))
    _prep(plain)
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    fused.eval()
    x = torch.randn(2, 5, 9, 8)
    with torch.no_grad():
        assert _rel(fused(x), plain(x)) < 1e-6
    assert fused.conv.last_decision.op == "bn_act_conv"
    assert _kinds(fused)[str(len(fused) - 1)] == f"bn{'' if activation == 'identity' else '+' + activation}+conv (preact)"
    plain.train(), fused.train()
    same_weight_layout(plain, fused)  # bitwise: the same weight strides
    assert torch.equal(fused(x), plain(x)) and _same_state(plain, fused)
    with pytest.raises(ValueError, match="activation must be one of"):
        resfuse.nn.BNActConv(5, 7, 3, activation="elu")
    with pytest.raises(ValueError, match="BNActConv: cannot fuse: .*padding='same' is asymmetric"):
        resfuse.nn.BNActConv(5, 7, 2, padding="same")
