"""resfuse.convert: which runs are fused, what stays as it is, state_dict
compatibility, numerics of whole converted models (eager and Triton), no
stale BN fold after any mutation, torch.compile, copies, autocast.

The models are torchvision's vgg16_bn features and the seed's structures
(tests/seed_models.py). Eval numerics follow tests/numerics.py: float64
reference, relative norm error within max(2 x eager's error, floor).
"""

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse.nn.stem import ConvBNHead
from resfuse.nn import FusedSequential
from testutil import generator as _gen, launches as _launches
from numerics import assert_matches, rel_err
from seed_models import (BackboneVGG, ResNet, downsample, float64_reference, randomize_bn,
                         vgg16_bn_features)


def _fused_groups(model):
    """(qualified conv name, group) of every fused group in `model`."""
    out = []
    for prefix, m in model.named_modules():
        if isinstance(m, FusedSequential):
            out += [(f"{prefix}.{g.conv}" if prefix else g.conv, g) for g in m.plan().steps
                    if not isinstance(g, str)]
    return out


def _decisions(model):
    return {f"{p}.{c}" if p else c: d for p, m in model.named_modules() if isinstance(m, FusedSequential)
            for c, d in m.last_decisions.items()}


def _small_net():
    """Three fused groups, odd sizes, a stride-2 conv after a pool, conv
    bias on one, identity and relu6 epilogues."""
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=True), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(12, 20, 3, stride=2, padding=1), nn.BatchNorm2d(20), nn.ReLU6(),
        nn.Conv2d(20, 7, 1), nn.BatchNorm2d(7),
    )


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------
# what is fused, what stays as it is
# ----------------------------------------------------------------------------

def test_vgg16_bn_features_all_13_groups_fused():
    plain = vgg16_bn_features()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    conv = resfuse.convert(plain)
    assert conv is not plain and type(conv) is FusedSequential and conv.backend == "auto"
    groups = _fused_groups(conv)
    assert [n for n, _ in groups] == ["0", "3", "7", "10", "14", "17", "20", "24", "27", "30", "34", "37", "40"]
    assert all(g.kind == "conv+bn+relu" for _, g in groups)
    # inplace=False left the original untouched: class, children, values.
    assert type(plain) is nn.Sequential and not hasattr(plain, "_backend")
    assert all(a is not b for a, b in zip(plain, conv))
    assert all(type(a) is type(b) for a, b in zip(plain, conv))
    assert list(plain.state_dict()) == list(before)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in before.items())
    _assert_same_state(plain, conv)


def test_inplace_rewrites_the_model_itself():
    model = BackboneVGG()
    bodies = [model.body1, model.body2, model.body3, model.body4]
    children = [list(b) for b in bodies]
    out = resfuse.convert(model, backend="eager", inplace=True)
    assert out is model
    for body, kids in zip(bodies, children):
        assert type(body) is FusedSequential and body.backend == "eager"
        assert list(body) == kids and all(a is b for a, b in zip(body, kids))


def test_backbone_vgg_split_fused_and_matches(seed):
    """The seed's Backbone_VGG: body1..body4 each fused; its four outputs
    match the plain model (eager path, NCHW)."""
    plain = BackboneVGG()
    x = torch.randn(2, 3, 40, 36)
    randomize_bn(plain, _gen(seed), calibrate_with=torch.randn(4, 3, 40, 36))
    conv = resfuse.convert(plain, backend="eager")
    counts = [len(_fused_groups(getattr(conv, f"body{i}"))) for i in range(1, 5)]
    assert counts == [4, 3, 3, 3]
    _assert_same_state(plain, conv)
    with torch.no_grad():
        outs, eagers = conv(x), plain(x)
    refs = float64_reference(plain, x)
    assert len(outs) == 4
    for i, (o, r, e) in enumerate(zip(outs, refs, eagers)):
        assert_matches(o, r, e, torch.float32, f"body{i + 1}", seed)
    assert {d.backend for d in _decisions(conv).values()} == {"eager"}


def test_seed_downsample_shortcut_fused(seed):
    plain = randomize_bn(downsample(6, 10, stride=2), _gen(seed))
    conv = resfuse.convert(plain, backend="eager")
    assert type(conv) is FusedSequential
    [(name, group)] = _fused_groups(conv)
    assert (name, group.kind) == ("0", "conv+bn")
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        out, eager = conv(x), plain(x)
    assert out.shape == (2, 10, 5, 4)
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "downsample", seed)


def test_seed_resnet_fuses_blocks_stem_and_shortcuts(seed):
    from resfuse.nn import BasicBlock, ConvBNHead
    plain = ResNet(include_top=True)
    randomize_bn(plain, _gen(seed), calibrate_with=torch.randn(4, 3, 35, 33))
    conv = resfuse.convert(plain, backend="eager")
    # every ResidualLayer (bias-carrying convs) is a fused BasicBlock, the
    # stem a fused head; the projection shortcuts live inside their blocks
    assert all(isinstance(getattr(conv, f"layer{i}")[0], BasicBlock) for i in range(1, 5))
    assert [getattr(conv, f"layer{i}")[0].spec.shortcut for i in range(1, 5)] == \
        ["identity", "projection", "projection", "projection"]
    assert isinstance(conv.conv1, ConvBNHead)
    assert [n for n, _ in _fused_groups(conv)] == []  # no stand-alone Sequential groups left
    _assert_same_state(plain, conv)
    x = torch.randn(2, 3, 35, 33)
    with torch.no_grad():
        out, eager = conv(x), plain(x)
    assert out.shape == (2, 10)
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "seed ResNet", seed)
    headless = resfuse.convert(ResNet(include_top=False).eval())
    with torch.no_grad():
        assert headless(x).shape == (2, 32, 2, 2)


class _ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 0.5


@pytest.mark.parametrize("case", ["conv_maxpool", "reflect", "bn_no_running_stats", "conv_subclass",
                                  "conv_groupnorm", "bn_first_batch_stats"])
def test_unmatched_modules_stay_as_they_are(seed, case):
    if case == "conv_maxpool":
        plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4))
    elif case == "reflect":
        plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU())
    elif case == "bn_no_running_stats":
        plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    elif case == "conv_subclass":
        plain = nn.Sequential(_ScaledConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    elif case == "conv_groupnorm":
        plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU())
    elif case == "bn_first_batch_stats":  # BN -> conv fuses as a prologue only with running statistics
        plain = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.Conv2d(3, 4, 3), nn.ReLU())
    randomize_bn(plain, _gen(seed))
    conv = resfuse.convert(plain)
    assert type(conv) is type(plain) and not isinstance(conv, FusedSequential)
    assert [type(m) for m in conv.modules()] == [type(m) for m in plain.modules()]
    x = torch.randn(2, 3, 9, 8)
    with torch.no_grad():
        assert torch.equal(conv(x), plain(x))


def test_sequential_subclass_with_its_own_forward_fuses_what_its_forward_proves(seed):
    """Not run as a Sequential (its forward adds 1 between BN and ReLU), so
    no FusedSequential; its traced forward has conv -> BN read by `+ 1`:
    conv + BN fuse in place, the ReLU stays."""
    class OwnForward(nn.Sequential):
        def forward(self, x):
            return self[2](self[1](self[0](x)) + 1)
    plain = randomize_bn(OwnForward(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), _gen(seed))
    conv = resfuse.convert(plain)
    assert type(conv) is OwnForward and isinstance(conv[0], ConvBNHead) and conv[0].fused_activation == "identity"
    x = torch.randn(2, 3, 9, 8)
    with torch.no_grad():
        ref, out = plain(x), conv(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6


def test_partial_match_fuses_only_the_fusable_group(seed):
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU())
    randomize_bn(plain, _gen(seed))
    conv = resfuse.convert(plain, backend="eager")
    # conv 0 (reflect padding) stays; BN 1 -> ReLU 2 is then conv 3's prologue, BN 4 (-> ReLU) its epilogue
    rows = {r.name: r for r in resfuse.explain(conv)}
    assert {n: r.kind for n, r in rows.items()} == {"0": "conv", "3": "bn+relu+conv+bn+relu (head)"}
    assert "padding_mode='reflect'" in rows["0"].reason
    x = torch.randn(1, 3, 8, 9)
    with torch.no_grad():
        out, eager = conv(x), plain(x)
    assert conv[3].last_decision.op == "bn_act_conv"
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "partial", seed)


def test_sequential_subclass_keeps_its_type_and_pickles(seed):
    """torchvision's Conv2dNormActivation is an nn.Sequential subclass:
    after conversion it is still one (isinstance, its attributes)."""
    ops = pytest.importorskip("torchvision.ops")
    plain = nn.Sequential(ops.Conv2dNormActivation(3, 8, 3), ops.Conv2dNormActivation(8, 4, 3, stride=2))
    randomize_bn(plain, _gen(seed))
    conv = resfuse.convert(plain, backend="eager")
    assert type(conv) is nn.Sequential  # nothing to fuse at this level
    for m in conv:
        assert isinstance(m, ops.Conv2dNormActivation) and isinstance(m, FusedSequential)
        assert m.out_channels in (8, 4)
    x = torch.randn(2, 3, 11, 10)
    with torch.no_grad():
        out, eager = conv(x), plain(x)
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "Conv2dNormActivation", seed)
    for clone in (pickle.loads(pickle.dumps(conv)), copy.deepcopy(conv)):
        assert all(type(a) is type(b) for a, b in zip(clone.modules(), conv.modules()))
        assert clone[0].backend == "eager"
        with torch.no_grad():
            assert torch.equal(clone(x), out)


def test_convert_validates_its_arguments():
    with pytest.raises(ValueError, match="backend"):
        resfuse.convert(_small_net(), backend="gpu")
    with pytest.raises(TypeError, match="nn.Module"):
        resfuse.convert(lambda x: x)
    conv = resfuse.convert(_small_net(), backend="eager")
    again = resfuse.convert(conv, backend="triton")
    assert conv.backend == "eager" and again.backend == "triton"
    with pytest.raises(ValueError, match="backend"):
        again.backend = "fast"


def test_resfuse_backend_env_var_applies_to_converted_models(monkeypatch):
    conv = resfuse.convert(_small_net().eval())
    monkeypatch.setenv("RESFUSE_BACKEND", "eager")
    with torch.no_grad():
        conv(torch.randn(1, 3, 10, 10))
    assert [d.backend for d in _decisions(conv).values()] == ["eager"] * 3
    monkeypatch.setenv("RESFUSE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RESFUSE_BACKEND"):
        conv(torch.randn(1, 3, 10, 10))


def test_forward_hooks_on_converted_convs_still_fire(seed):
    """Grad-CAM and feature extractors hook conv layers; fusing would skip
    the hook silently, so hooked groups run unfused."""
    plain = randomize_bn(_small_net(), _gen(seed))
    conv = resfuse.convert(plain, backend="eager")
    feats = {}
    conv[4].register_forward_hook(lambda m, i, o: feats.setdefault("conv", o))
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        out = conv(x)
        expect = plain[4](plain[3](plain[2](plain[1](plain[0](x)))))
    assert rel_err(feats["conv"], expect) < 1e-5, f"seed {seed}"
    assert set(_decisions(conv)) == {"0", "7"}
    with torch.no_grad():
        eager = plain(x)
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "hooked", seed)


# ----------------------------------------------------------------------------
# state_dict compatibility
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [vgg16_bn_features, BackboneVGG, ResNet], ids=["vgg16_bn", "backbone_vgg",
                                                                             "seed_resnet"])
def test_checkpoints_load_both_ways(seed, make):
    plain = make()
    conv = resfuse.convert(plain, backend="eager")
    _assert_same_state(plain, conv)
    other = randomize_bn(make(), _gen(seed))  # different weights and statistics
    conv.load_state_dict(other.state_dict(), strict=True)
    _assert_same_state(other, conv)
    back = make()
    back.load_state_dict(conv.state_dict(), strict=True)
    _assert_same_state(back, conv)
    x = torch.randn(1, 3, 32, 32)
    back.eval()
    with torch.no_grad():
        outs, eagers = conv.eval()(x), back(x)
    refs = float64_reference(back, x)
    if not isinstance(outs, list):
        outs, eagers, refs = [outs], [eagers], [refs]
    for o, r, e in zip(outs, refs, eagers):
        assert_matches(o, r, e, torch.float32, "after loading a checkpoint", seed)


# ----------------------------------------------------------------------------
# eval numerics of whole models
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_vgg16_bn_eager_matches_float64(seed, channels_last):
    plain = vgg16_bn_features()
    randomize_bn(plain, _gen(seed), calibrate_with=torch.randn(4, 3, 32, 32))
    conv = resfuse.convert(plain, backend="eager")
    x = torch.randn(2, 3, 48, 40)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out, eager = conv(x), plain(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert len(_decisions(conv)) == 13 and {d.backend for d in _decisions(conv).values()} == {"eager"}
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "vgg16_bn eager", seed)


@pytest.mark.slow
def test_vgg16_bn_triton_matches_float64(seed, device):
    """The whole of vgg16_bn.features through the Triton kernel (the
    interpreter on CPU: about a minute). Proves the kernel ran 13 times."""
    plain = vgg16_bn_features()
    randomize_bn(plain, _gen(seed), calibrate_with=torch.randn(4, 3, 32, 32))
    plain = plain.to(device)  # eager's own error on this device (TF32 on a GPU) sets the tolerance
    conv = resfuse.convert(plain, backend="triton")
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.no_grad():
        eager = plain(x)
        before = _launches()
        out = conv(x)
    assert _launches() == before + 13
    decisions = _decisions(conv)
    assert len(decisions) == 13 and {d.backend for d in decisions.values()} == {"triton"}
    assert out.device.type == device.type and out.is_contiguous()
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "vgg16_bn triton", seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_net_triton_matches_float64(seed, device, dtype):
    plain = randomize_bn(_small_net(), _gen(seed), calibrate_with=torch.randn(4, 3, 21, 19))
    plain = plain.to(device=device, dtype=dtype)
    conv = resfuse.convert(plain, backend="triton")
    x = torch.randn(2, 3, 21, 19, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    before = _launches()
    with torch.no_grad():
        out, eager = conv(x), plain(x)
    assert _launches() == before + 3
    assert {d.backend for d in _decisions(conv).values()} == {"triton"}
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_matches(out, float64_reference(plain, x), eager, dtype, f"small net triton {dtype}", seed)


def test_small_net_fp16_eager_matches_float64(seed):
    plain = randomize_bn(_small_net(), _gen(seed), calibrate_with=torch.randn(4, 3, 21, 19)).half()
    conv = resfuse.convert(plain, backend="eager")
    x = torch.randn(2, 3, 21, 19).half()
    with torch.no_grad():
        out, eager = conv(x), plain(x)
    assert out.dtype == torch.float16
    assert_matches(out, float64_reference(plain, x), eager, torch.float16, "small net fp16 eager", seed)


def test_model_to_channels_last(seed):
    plain = randomize_bn(_small_net(), _gen(seed))
    conv = resfuse.convert(plain, backend="eager").to(memory_format=torch.channels_last)
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 13, 11).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out, eager = conv(x), plain(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "channels_last model", seed)


def test_autocast_bf16_cpu_matches_eager_autocast(seed):
    plain = randomize_bn(_small_net(), _gen(seed), calibrate_with=torch.randn(4, 3, 21, 19))
    conv = resfuse.convert(plain, backend="eager")
    x = torch.randn(2, 3, 21, 19)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, eager = conv(x), plain(x)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert_matches(out, float64_reference(plain, x), eager, torch.bfloat16, "autocast bf16", seed)


# ----------------------------------------------------------------------------
# no stale BN fold: every mutation is seen by the next call
# ----------------------------------------------------------------------------

_MUTATIONS = ["sgd_step", "load_state_dict", "to_float64", "half_round_trip", "no_grad_mul", "data_mul",
              "running_var_fill", "running_var_copy", "running_mean_data", "bn_eps", "bn_affine_data"]


def _mutate(kind, model, seed):
    """Change `model`'s parameters/buffers/eps the way users do. Returns the
    model (a dtype change returns the same object, converted)."""
    g = _gen(seed + 1)
    dev = next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if kind == "sgd_step":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.train()
        model(torch.randn(4, 3, 15, 13, generator=g).to(dev)).square().mean().backward()
        opt.step()
        model.eval()
    elif kind == "load_state_dict":
        model.load_state_dict(randomize_bn(_small_net(), g).state_dict())
    elif kind == "to_float64":
        model.to(torch.float64)
    elif kind == "half_round_trip":
        model.half().float()
    elif kind == "no_grad_mul":
        with torch.no_grad():
            for c in convs:
                c.weight.mul_(2)
            bns[0].weight.mul_(-1.5)
    elif kind == "data_mul":  # bypasses the version counter
        for c in convs:
            c.weight.data.mul_(2)
        bns[1].bias.data.add_(1)
    elif kind == "running_var_fill":
        bns[0].running_var.fill_(3.0)
    elif kind == "running_var_copy":
        for b in bns:
            b.running_var.copy_((torch.rand(b.num_features, generator=g) * 4 + 0.1).to(dev))
    elif kind == "running_mean_data":
        for b in bns:
            b.running_mean.data.add_(0.7)
    elif kind == "bn_eps":
        for b in bns:
            b.eps = 0.5
    elif kind == "bn_affine_data":
        bns[2].weight.data = (torch.rand(bns[2].num_features, generator=g) + 0.5).to(dev)  # rebinds .data
    return model


def _check_fresh(conv, plain_template, x, dtype, seed, backend, what):
    """conv must compute what a *fresh* plain model with its current state
    computes (float64 reference by the rule of tests/numerics.py)."""
    ref_model = copy.deepcopy(plain_template).to(torch.float32)
    ref_model.load_state_dict(conv.state_dict())
    for a, b in zip(ref_model.modules(), conv.modules()):
        if isinstance(a, nn.BatchNorm2d):
            a.eps = b.eps
    ref_model = ref_model.to(device=x.device, dtype=dtype).eval()
    xd = x.to(dtype)
    with torch.no_grad():
        out, eager = conv(xd), ref_model(xd)
    assert {d.backend for d in _decisions(conv).values()} == {backend}
    assert_matches(out, float64_reference(ref_model, xd), eager, dtype, what, seed)
    return out


def _staleness_case(kind, seed, backend, device):
    plain = randomize_bn(_small_net(), _gen(seed), calibrate_with=torch.randn(4, 3, 15, 13))
    conv = resfuse.convert(plain, backend=backend).to(device)
    x = torch.randn(2, 3, 15, 13, device=device)
    before = _check_fresh(conv, plain, x, torch.float32, seed, backend, "before").double()
    _mutate(kind, conv, seed)
    dtype = conv[0].weight.dtype
    after = _check_fresh(conv, plain, x, dtype, seed, backend, f"after {kind}")
    # The mutation changed the function (else this test could not catch a
    # stale fold); a dtype change is caught by the float64 tolerance.
    if kind != "to_float64":
        assert rel_err(after, before) > 1e-4, f"{kind} did not change the output (seed {seed})"


@pytest.mark.parametrize("kind", _MUTATIONS)
def test_no_stale_fold_eager(seed, kind):
    _staleness_case(kind, seed, "eager", torch.device("cpu"))


@pytest.mark.parametrize("kind", [k for k in _MUTATIONS if k != "to_float64"])
def test_no_stale_fold_triton(seed, device, kind):
    _staleness_case(kind, seed, "triton", device)


def test_no_stale_fold_under_torch_compile(seed):
    plain = randomize_bn(_small_net(), _gen(seed))
    conv = resfuse.convert(plain, backend="eager")
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 15, 13)
    with torch.no_grad():
        before = compiled(x)
    for kind in ("data_mul", "running_var_copy", "bn_eps", "load_state_dict"):
        _mutate(kind, conv, seed)
        ref_model = copy.deepcopy(plain)
        ref_model.load_state_dict(conv.state_dict())
        for a, b in zip(ref_model.modules(), conv.modules()):
            if isinstance(a, nn.BatchNorm2d):
                a.eps = b.eps
        with torch.no_grad():
            out, eager = compiled(x), ref_model(x)
        assert_matches(out, float64_reference(ref_model, x), eager, torch.float32, f"compiled, {kind}", seed)
        assert rel_err(out, before) > 1e-4, f"{kind} did not change the output (seed {seed})"
        before = out


# ----------------------------------------------------------------------------
# torch.compile, copies
# ----------------------------------------------------------------------------

def test_torch_compile_fullgraph_eager_backend(seed):
    plain = ResNet(include_top=True)
    randomize_bn(plain, _gen(seed), calibrate_with=torch.randn(4, 3, 35, 33))
    conv = resfuse.convert(plain, backend="eager")
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 35, 33)
    with torch.no_grad():
        out, eager = compiled(x), plain(x)
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "compiled seed ResNet", seed)
    explanation = torch._dynamo.explain(conv)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_torch_compile_fullgraph_triton_backend(seed, device):
    plain = randomize_bn(_small_net(), _gen(seed)).to(device)
    conv = resfuse.convert(plain, backend="triton")
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 15, 13, device=device)
    before = _launches()
    with torch.no_grad():
        out, eager = compiled(x), plain(x)
    assert _launches() == before + 3
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "compiled triton", seed)


def test_torch_compile_sees_a_replaced_child(seed):
    """The fusion plan is traced, not cached: replacing a child after a
    run must change what the compiled model computes."""
    plain = randomize_bn(_small_net(), _gen(seed))
    conv = resfuse.convert(plain, backend="eager")
    x = torch.randn(1, 3, 15, 13)
    with torch.no_grad():
        conv(x)
    conv[6], plain[6] = nn.Identity(), nn.Identity()
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out, eager = compiled(x), plain(x)
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "replaced child", seed)


def test_deepcopy_pickle_and_torch_save_round_trip(seed):
    plain = randomize_bn(BackboneVGG(), _gen(seed))
    conv = resfuse.convert(plain, backend="eager")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = conv(x)
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    clones = [copy.deepcopy(conv), pickle.loads(pickle.dumps(conv)), torch.load(buf, weights_only=False)]
    for clone in clones:
        assert all(type(a) is type(b) for a, b in zip(clone.modules(), conv.modules()))
        assert clone.body3.backend == "eager"
        _assert_same_state(conv, clone)
        with torch.no_grad():
            got = clone(x)
        assert all(torch.equal(a, b) for a, b in zip(got, out))


@pytest.mark.parametrize("style", ["parametrizations", "legacy_hook"])
def test_weight_norm_convs_read_a_fresh_weight(seed, style):
    """Weight norm computes conv.weight from weight_g/weight_v: through a
    parametrization (fused: the weight is read at each call) or through a
    forward pre-hook (left unfused, else the hook would not run)."""
    base = randomize_bn(_small_net(), _gen(seed))
    plain, conv = copy.deepcopy(base), copy.deepcopy(base)
    for m in (plain, conv):
        if style == "parametrizations":
            nn.utils.parametrizations.weight_norm(m[0])
        else:
            with warnings.catch_warnings():  # deprecated in favour of the parametrization
                warnings.simplefilter("ignore")
                nn.utils.weight_norm(m[0])
    # (a legacy weight_norm module cannot be deep-copied: convert in place)
    conv = resfuse.convert(conv, backend="eager", inplace=True)
    x = torch.randn(2, 3, 15, 13)
    with torch.no_grad():
        before = conv(x)
        state = conv.state_dict()
        g_key = next(k for k in state if k.startswith("0.") and ("weight_g" in k or "original0" in k))
        state[g_key] = state[g_key] * 3
        conv.load_state_dict(state)
        plain.load_state_dict(state)
        out, eager = conv(x), plain(x)
        ref = plain.double()(x.double())
    assert rel_err(out, before) > 1e-3, f"output unchanged after loading a new weight_g: stale weight (seed {seed})"
    assert_matches(out, ref, eager, torch.float32, f"weight_norm {style}", seed)
    assert ("0" in _decisions(conv)) == (style == "parametrizations")


def test_torch_compile_inductor(seed):
    """The default torch.compile backend (inductor, C++ on CPU)."""
    plain = randomize_bn(_small_net(), _gen(seed))
    conv = resfuse.convert(plain, backend="eager")
    compiled = torch.compile(conv, fullgraph=True)
    x = torch.randn(2, 3, 15, 13)
    with torch.no_grad():
        out, eager = compiled(x), plain(x)
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "inductor", seed)


def test_local_vgg16_bn_build_is_torchvisions():
    """seed_models builds vgg16_bn features itself where torchvision is
    missing (the GPU box); it must be the same network."""
    pytest.importorskip("torchvision")
    from seed_models import _vgg16_bn_features_local

    ours, theirs = _vgg16_bn_features_local(), vgg16_bn_features()  # torchvision's here
    assert repr(ours) == repr(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
