"""Memory layouts: conv outputs follow PyTorch's rule (channels_last when
the input or the weight is), on every backend, and ``convert`` (its
``channels_last_weights``) lays fused weights out once, where the kernels
read them (CUDA; on a later move to CUDA), without changing what a
state_dict holds or what the model computes."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

import resfuse
from resfuse.ops import conv_bn_act as conv_op
from numerics import assert_matches

CL = torch.channels_last


def _layout(t):
    return "cl" if t.is_contiguous(memory_format=CL) and not t.is_contiguous() else \
        "both" if t.is_contiguous(memory_format=CL) else "nchw" if t.is_contiguous() else "other"


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_output_layout_follows_eager(backend, device):
    rng = random.Random(17)
    cases = 60 if backend == "eager" else 12
    for i in range(cases):
        N, C, K = rng.choice([1, 2]), rng.choice([1, 3, 8]), rng.choice([1, 4, 6])
        H, W, R = rng.choice([1, 3, 5]), rng.choice([1, 4]), rng.choice([1, 3])
        x = torch.randn(N, C, H, W, device=device)
        w = torch.randn(K, C, R, R, device=device)
        if rng.random() < 0.5:
            x = x.contiguous(memory_format=CL)
        if rng.random() < 0.5:
            w = w.contiguous(memory_format=CL)
        pad = R // 2
        ref = F.conv2d(x, w, padding=pad)
        y = resfuse.conv_bn_act(x, w, padding=pad, activation="identity", backend=backend)
        assert y.stride() == ref.stride() or _layout(y) == _layout(ref), \
            (i, tuple(x.shape), x.stride(), w.stride(), y.stride(), ref.stride())
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_default_layout_is_channels_last_where_the_kernels_read_the_weights(monkeypatch):
    """convert's default keeps a CPU model's strides (its eager fallback
    runs the original convs) and lays a fused module's kernel weights out
    channels_last when it moves to the kernels' device, .to()/.cuda(): here
    a stand-in predicate (float64 = "on the kernels' device") and .double()."""
    import importlib
    from resfuse.models import randomize_bn, resnet18
    from resfuse.hornet import hornet_t
    convert_mod = importlib.import_module("resfuse.convert")  # the module (resfuse.convert is the function)
    torch.manual_seed(0)
    plain = randomize_bn(resnet18()).eval()
    fused = resfuse.convert(plain, backend="eager")
    assert all(a.stride() == b.stride() for a, b in zip(plain.parameters(), fused.parameters()))
    monkeypatch.setattr(convert_mod, "_on_kernel_device", lambda t: t.dtype == torch.float64)
    fused.double()
    kernel = {id(c.weight) for c in convert_mod.kernel_convs(fused)}
    assert len(kernel) == 20  # stem, 16 block convs, 3 projections
    for name, p in fused.named_parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=CL) == (id(p) in kernel), name
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain.double()(x), rtol=1e-9, atol=1e-9)
    kept = resfuse.convert(plain, backend="eager", channels_last_weights=False).double()
    assert all(a.stride() == b.stride() for a, b in zip(plain.parameters(), kept.parameters()))
    hn = resfuse.convert(hornet_t(depths=(1, 1, 1, 1)), backend="eager").double()  # gnconv depthwise too
    dw = hn.stages[0][0].gnconv.dwconv.weight
    assert dw.stride(0) == 1 and hn.downsample_layers[0][0].weight.is_contiguous(memory_format=CL)


def test_convert_lays_weights_out_channels_last_when_asked_keeping_state_and_values():
    from resfuse.models import randomize_bn, resnet18
    torch.manual_seed(0)
    plain = randomize_bn(resnet18()).eval()
    fused = resfuse.convert(plain, backend="eager", channels_last_weights=True)
    sd_p, sd_f = plain.state_dict(), fused.state_dict()
    assert list(sd_p) == list(sd_f)
    assert all(torch.equal(sd_p[k], sd_f[k]) and sd_p[k].shape == sd_f[k].shape for k in sd_p)
    w = fused.layer1[0].conv1.weight
    assert w.is_contiguous(memory_format=CL) and not w.is_contiguous()
    assert not plain.layer1[0].conv1.weight.is_contiguous(memory_format=CL)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)
    # train mode runs the original modules, on the re-laid-out weights: the
    # as-constructed model's numbers within fp32 rounding (bitwise against
    # the same layout: tests/test_blocks.py), running statistics too
    fused.train(), plain.train()
    xt = torch.randn(8, 3, 32, 32)
    ref = copy.deepcopy(plain).double()(xt.double())
    assert_matches(fused(xt), ref, plain(xt), torch.float32, "train mode, channels_last weights")
    for k in sd_p:
        torch.testing.assert_close(fused.state_dict()[k], plain.state_dict()[k], rtol=1e-4, atol=1e-5)
    fused.eval(), plain.eval()
    # load_state_dict copies into the parameter: the layout stays
    fused.load_state_dict(plain.state_dict())
    assert fused.layer1[0].conv1.weight.is_contiguous(memory_format=CL)
    # an edit through .data is seen at the next call (nothing cached)
    with torch.no_grad():
        fused.layer1[0].conv1.weight.data.mul_(-1)
        plain.layer1[0].conv1.weight.data.mul_(-1)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)
    # opting out keeps the user's strides
    kept = resfuse.convert(plain, backend="eager", channels_last_weights=False)
    assert all(a.stride() == b.stride() for a, b in zip(plain.parameters(), kept.parameters()))
    with pytest.raises(TypeError, match="channels_last_weights"):
        resfuse.convert(plain, channels_last_weights="yes")


def test_convert_lays_gnconv_depthwise_weights_channel_innermost(device):
    """A fused gnconv's dwconv weight (S, 1, k, k) gets strides (1, ...)
    at convert: state_dict, values and outputs unchanged, load_state_dict
    keeps the layout, a .data edit is seen, and training (the chain and
    depthwise backward kernels on the strided weight) matches the original."""
    from functools import partial
    from resfuse.hornet import HorBlock, PlainGnConv
    torch.manual_seed(3)
    plain = torch.nn.Sequential(HorBlock(16, gnconv=partial(PlainGnConv, order=3, s=1 / 3))).eval().to(device)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = resfuse.convert(plain, backend="triton", channels_last_weights=True)
    w = fused[0].gnconv.dwconv.weight
    assert w.stride(0) == 1 and plain[0].gnconv.dwconv.weight.stride(0) != 1
    sd_p, sd_f = plain.state_dict(), fused.state_dict()
    assert list(sd_p) == list(sd_f) and all(torch.equal(sd_p[k], sd_f[k]) for k in sd_p)
    x = torch.randn(2, 16, 5, 6, device=device)
    with torch.no_grad():
        ref = copy.deepcopy(plain).double()(x.double())
        assert_matches(fused(x), ref, plain(x), torch.float32, "eval, strided dw weight")
        fused[0].gnconv.dwconv.weight.data.mul_(-1)
        plain[0].gnconv.dwconv.weight.data.mul_(-1)
        assert_matches(fused(x), copy.deepcopy(plain).double()(x.double()), plain(x), torch.float32, ".data edit")
    fused.load_state_dict(plain.state_dict())
    assert fused[0].gnconv.dwconv.weight.stride(0) == 1
    fused.train(), plain.train()
    xf, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused(xf).square().sum().backward()
    plain(xp).square().sum().backward()
    gf, gp = fused[0].gnconv.dwconv.weight.grad, plain[0].gnconv.dwconv.weight.grad
    torch.testing.assert_close(gf, gp, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-3, atol=1e-4)


def test_nchw_input_is_laid_out_once_at_the_first_fused_conv():
    """Eager's rule with channels_last weights makes the first fused conv's
    output channels_last, so the rest of the model repacks nothing: one x
    repack per forward (the stem's NCHW input), no weight repacks."""
    from resfuse.models import randomize_bn, resnet18
    torch.manual_seed(1)
    plain = randomize_bn(resnet18()).eval()
    x = torch.randn(1, 3, 32, 32)
    fused = resfuse.convert(plain, backend="triton", channels_last_weights=True)  # as on a GPU
    before = dict(conv_op.REPACKS)
    with torch.no_grad():
        y = fused(x)
    repacks = {k: conv_op.REPACKS[k] - before.get(k, 0) for k in conv_op.REPACKS}
    assert repacks.get("x", 0) == 1 and repacks.get("weight", 0) == 0, repacks
    with torch.no_grad():
        torch.testing.assert_close(y, plain(x), rtol=1e-4, atol=1e-4)


def test_repacks_are_counted(device):
    x = torch.randn(1, 8, 5, 5, device=device)
    w = torch.randn(4, 8, 3, 3, device=device)
    before = dict(conv_op.REPACKS)
    resfuse.conv_bn_act(x, w, padding=1, activation="relu", backend="triton")
    after = dict(conv_op.REPACKS)
    assert after["x"] == before.get("x", 0) + 1 and after["weight"] == before.get("weight", 0) + 1
    resfuse.conv_bn_act(x.contiguous(memory_format=CL), w.contiguous(memory_format=CL), padding=1,
                        activation="relu", backend="triton")
    assert conv_op.REPACKS["x"] == after["x"] and conv_op.REPACKS["weight"] == after["weight"]
