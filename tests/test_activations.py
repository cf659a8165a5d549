"""resfuse.activations: the table every kernel's activation ids come from,
which modules compute which row, the gradients, and LeakyReLU's slope read
live from its module (never frozen at convert time).

The kernels' epilogues are tested per activation in test_ops.py
(``test_activations_through_kernel``: the Triton interpreter) and
test_csrc_emulation.py (the CUDA kernel's epilogue self-test and the
emulator's cases)."""

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse.activations import (ACTIVATIONS, activation_grad, activation_of_module, check_negative_slope,
                                 negative_slope_of)
from numerics import assert_matches
from seed_models import float64_reference, randomize_bn
from testutil import generator

timm_acts = pytest.importorskip("timm.layers.activations")

MODULES = [
    (nn.ReLU(), "relu"), (nn.ReLU6(), "relu6"), (nn.Hardtanh(0.0, 6.0), "relu6"), (nn.SiLU(), "silu"),
    (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.LeakyReLU(0.2), "leaky_relu"),
    (nn.LeakyReLU(), "leaky_relu"), (nn.Hardswish(), "hardswish"), (nn.Hardsigmoid(), "hardsigmoid"),
    (nn.Identity(), "identity"), (timm_acts.GELU(), "gelu"), (timm_acts.GELUTanh(), "gelu_tanh"),
    (timm_acts.Swish(), "silu"), (timm_acts.HardSwish(), "hardswish"), (timm_acts.HardSigmoid(), "hardsigmoid"),
]


def _spread(n=4001):
    """Values across every branch of every activation (kinks at -3, 0, 3, 6
    included), plus the non-finite ones."""
    u = torch.linspace(-9, 9, n, dtype=torch.float64)
    return torch.cat([u, torch.tensor([-3.0, 0.0, 3.0, 6.0, -0.0, float("inf"), -float("inf"), float("nan")],
                                      dtype=torch.float64)])


@pytest.mark.parametrize("module,name", MODULES, ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_module_computes_its_row(module, name):
    """A module maps to a row only if the row computes what it computes
    (timm's own classes write the formula differently: float64 rounding)."""
    assert activation_of_module(module) == name
    u = _spread()
    torch.testing.assert_close(ACTIVATIONS[name].eager(u, negative_slope_of(module)), module(u.clone()),
                               rtol=1e-15, atol=1e-15, equal_nan=True)


def test_unknown_or_changed_modules_are_not_rows():
    class MyReLU(nn.ReLU):  # a subclass may override forward
        pass

    for m in (MyReLU(), nn.Hardtanh(-1.0, 1.0), nn.LeakyReLU(float("inf")), nn.PReLU(), nn.Tanh(), nn.ELU()):
        assert activation_of_module(m) is None, m


def test_idempotent_flag_is_true_only_where_act_of_act_is_act():
    u = _spread()
    for a in ACTIVATIONS.values():
        once = a.eager(u, 0.3)
        twice = a.eager(once, 0.3)
        assert torch.equal(torch.nan_to_num(once, 7.0), torch.nan_to_num(twice, 7.0)) == a.idempotent, a.name


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_grad_matches_autograd(name):
    """The op's explicit derivative against autograd of the eager form, off
    the kinks. (ATen's hardsigmoid backward multiplies by 1/6 rounded to
    float32, even in float64: hence rtol 1e-7, not 1e-12.)"""
    u = torch.linspace(-8, 8, 3001, dtype=torch.float64)
    u = u[((u.abs() - 3).abs() > 1e-3) & (u.abs() > 1e-3) & ((u - 6).abs() > 1e-3)].requires_grad_()
    g = torch.randn(u.shape, dtype=torch.float64, generator=generator(3))
    (want,) = torch.autograd.grad(ACTIVATIONS[name].eager(u, -0.37), u, g)
    tol = 1e-7 if name == "hardsigmoid" else 1e-12
    torch.testing.assert_close(activation_grad(name, u.detach(), g, -0.37), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.1", None, True])
def test_bad_negative_slope_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="negative_slope"):
        check_negative_slope(bad)
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1)
    with pytest.raises((ValueError, TypeError), match="negative_slope"):
        resfuse.conv_bn_act(x, w, activation="leaky_relu", negative_slope=bad, backend="eager")


def test_readme_positional_call_needs_no_slope():
    """The op's positional form ends at `backend`; the slope is an optional trailing argument."""
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    m, v = torch.randn(3), torch.rand(3) + 0.5
    y = torch.ops.resfuse.conv_bn_act(x, w, None, m, v, None, None, 1e-5, None, [1, 1], [1, 1], [1, 1], 1,
                                      "leaky_relu", "eager")
    ref = torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(x, w, padding=1), m, v, eps=1e-5))  # default slope 0.01
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.2), nn.Hardswish(), nn.Hardsigmoid(), nn.GELU(approximate="tanh")],
                         ids=lambda m: type(m).__name__)
def test_converted_sequential_fuses_each_new_activation(act):
    g = generator(11)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act,
                          nn.Conv2d(8, 5, 1), nn.BatchNorm2d(5))
    randomize_bn(model, g)
    x = torch.randn(2, 3, 9, 7, generator=g)
    conv = resfuse.convert(model, backend="eager")
    with torch.no_grad():
        out, eager = conv(x), model(x)
    assert set(conv.plan().steps[0]._asdict().values()) >= {"0", "1", "2"}, "conv, bn and act must be one group"
    assert_matches(out, float64_reference(model, x), eager, torch.float32, type(act).__name__)


def test_leaky_slope_is_read_from_the_live_module():
    """Changing the slope after conversion changes the fused result (no slope frozen at convert time)."""
    g = generator(12)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.1)), g)
    conv = resfuse.convert(model, backend="eager")
    x = torch.randn(1, 3, 8, 8, generator=g)
    for slope in (0.1, 0.5, -0.2):
        conv[2].negative_slope = slope
        model[2].negative_slope = slope
        with torch.no_grad():
            assert_matches(conv(x), float64_reference(model, x), model(x), torch.float32, f"slope {slope}")
