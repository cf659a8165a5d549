"""The fused modules' eager path (issue 17): where the eager backend runs,
a converted module runs the ops the original modules run, straight from
its children's own tensors, with eager autograd's gradients and eager's
errors; a HorNet module whose ops could only run eager runs its original
forward. Cheap shapes: these are CPU tests of what runs, not of speed."""

import copy

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse import dispatch
from resfuse.models import randomize_bn
from numerics import assert_matches


def _block_model():
    import torchvision
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        torchvision.models.resnet.BasicBlock(8, 8),
        torchvision.models.resnet.Bottleneck(8, 4, 2, downsample=down),
        nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 5, 3, padding=1)))
    return randomize_bn(m).eval()


def _conv_plans():
    """How many plans the conv ops made (the eager path makes none: it
    never reaches an op, directly or through torch.ops.resfuse)."""
    from resfuse.ops import bn_act_conv, conv_bn_act, conv_bn_proj_act
    return sum(len(m._PLANS.plans) for m in (conv_bn_act, conv_bn_proj_act, bn_act_conv))


@pytest.mark.parametrize("grad", [False, True])
def test_eager_backend_runs_the_original_ops_with_eager_autograd(grad):
    plain = _block_model()
    fused = resfuse.convert(plain, backend="eager")
    resfuse.ops.plans.clear_plans()
    x = torch.randn(2, 3, 9, 11, requires_grad=grad)
    ref = copy.deepcopy(plain).double()
    with torch.set_grad_enabled(grad):
        y, want = fused(x), plain(x)
        y64 = ref(x.detach().double().requires_grad_(grad))
    assert _conv_plans() == 0, "the eager path went through an op"
    assert_matches(y, y64, want, torch.float32, "eager path forward")
    assert dispatch.last_decision().backend == "eager"
    assert all(d.backend == "eager" for d in fused[4].last_decisions.values())
    if grad:
        g = torch.randn_like(y)
        (y * g).sum().backward()
        gx, x.grad = x.grad, None
        (want * g).sum().backward()
        torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
        fp = dict(fused.named_parameters())  # convert copied the model: same names, own tensors
        for name, q in plain.named_parameters():
            torch.testing.assert_close(fp[name].grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_default_device_context_keeps_the_eager_path():
    """``with torch.device(...)`` / ``torch.set_default_device`` push a
    TorchFunctionMode that only places factory calls: the eager path still
    runs (no op reached); any other function mode sends calls to the op."""
    from torch.overrides import TorchFunctionMode
    plain = _block_model()
    fused = resfuse.convert(plain, backend="eager")
    x = torch.randn(1, 3, 7, 6)
    resfuse.ops.plans.clear_plans()
    with torch.no_grad(), torch.device("cpu"):
        y = fused(x)
    assert _conv_plans() == 0
    with torch.no_grad():
        torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), torch.device("cpu"), Watch():
        fused(x)
    assert _conv_plans() > 0


def test_eager_path_sees_live_parameters_and_raises_eagers_errors():
    plain = _block_model()
    fused = resfuse.convert(plain, backend="eager")
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        fused(x)
        for m in (plain, fused):  # an edit through .data (no version bump) is seen at the next call
            m[1].running_var.data.mul_(3.0)
            m[0].weight.data.neg_()
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="4D input"):
            fused(x[0])  # a Conv2d alone would take it unbatched; BatchNorm2d refuses, and so does the fused path
        fused[0].weight.data = fused[0].weight.data[:, :2]  # now wrong for x: the conv's own error
        with pytest.raises(RuntimeError):
            fused(x)


def _no_interpreter(monkeypatch):
    """This process as a CPU without the Triton interpreter (the suite runs with it)."""
    from resfuse import _backends
    monkeypatch.setattr(_backends, "interpreting", lambda: False)


def test_eager_for_sure_is_the_cpu_fallback_of_auto_only(monkeypatch):
    """``dispatch.eager_for_sure`` answers for 'auto' where no kernel
    backend can run on the device and dtype; an explicit backend (eager
    included: the ops' eager implementations) decides per problem."""
    cpu, f32 = torch.device("cpu"), torch.float32
    from resfuse._backends import interpreting
    if interpreting():
        assert dispatch.eager_for_sure(("gnconv_chain",), "auto", cpu, f32) is None  # Triton can run here
    _no_interpreter(monkeypatch)
    d = dispatch.eager_for_sure(("gnconv_chain", "layernorm_conv1x1"), "auto", cpu, f32)
    assert d is not None and d["gnconv_chain"].backend == "eager" and d["gnconv_chain"].skipped["triton"]
    assert d["layernorm_conv1x1"].requested == "auto"
    for backend in ("triton", "eager"):
        assert dispatch.eager_for_sure(("gnconv_chain",), backend, cpu, f32) is None
    monkeypatch.setenv("RESFUSE_BACKEND", "triton")  # replaces 'auto'
    assert dispatch.eager_for_sure(("gnconv_chain",), "auto", cpu, f32) is None


@pytest.mark.parametrize("fallback", [True, False])
def test_hornet_modules_run_their_original_forward_on_the_cpu_fallback(fallback, monkeypatch):
    """On the CPU fallback (auto, no kernel backend) a converted HorBlock
    and patchify stem compute exactly what the originals compute (bitwise:
    the same ops); with a kernel backend (the interpreter here) the fused
    kernels run instead."""
    from functools import partial
    from resfuse.hornet import HorBlock, HorLayerNorm, PlainGnConv
    from resfuse._backends import interpreting
    if not fallback and not interpreting():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) on CPU")
    if fallback:
        _no_interpreter(monkeypatch)
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Conv2d(3, 16, 4, 4), HorLayerNorm(16, data_format="channels_first"),
                          HorBlock(16, gnconv=partial(PlainGnConv, order=2, s=1 / 3))).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # bitwise needs the original strides too (channels_last weights round differently)
    fused = resfuse.convert(plain, channels_last_weights=not fallback)
    x = torch.randn(2, 3, 12, 8)
    with torch.no_grad():
        y, want = fused(x), plain(x)
    decisions = {**fused[2].last_decisions, "stem": fused[0].last_decision}
    assert set(decisions) == {"proj_in", "chain", "pwconv1", "pwconv2", "stem"}
    assert all(d.backend == ("eager" if fallback else "triton") for d in decisions.values()), decisions
    if fallback:
        assert torch.equal(y, want)
    else:
        assert not torch.equal(y, want)  # the kernels' rounding: they ran
        assert_matches(y, copy.deepcopy(plain).double()(x.double()), want, torch.float32, "fused HorNet")
