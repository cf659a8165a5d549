"""Memory layouts: conv outputs follow PyTorch's rule (channels_last when
the input or the weight is), on every backend, and
``convert(channels_last_weights=True)`` lays fused weights out once without
changing what a state_dict holds or what the model computes."""

import random

import pytest
import torch
import torch.nn.functional as F

import resfuse
from resfuse.ops import conv_bn_act as conv_op

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


def test_channels_last_weights_convert_keeps_state_and_values():
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
    # load_state_dict copies into the parameter: the layout stays
    fused.load_state_dict(sd_p)
    assert fused.layer1[0].conv1.weight.is_contiguous(memory_format=CL)
    # an edit through .data is seen at the next call (nothing cached)
    with torch.no_grad():
        fused.layer1[0].conv1.weight.data.mul_(-1)
        plain.layer1[0].conv1.weight.data.mul_(-1)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="channels_last_weights"):
        resfuse.convert(plain, channels_last_weights="yes")


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
