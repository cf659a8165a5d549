"""Whole torchvision / timm models through the Triton kernels (the
interpreter on CPU) at 32x32, converted with ``backend="auto"`` (grouped
convs, which the Triton kernel does not implement, run eager): the output
by GUIDE §3's rule against float64, and every fused conv with groups=1 ran
in the Triton kernel. googlenet runs in the default run; densenet121 and
dpn68 (a minute each) are marked slow; the recognition of
the same models on the eager backend is in the default run
(tests/test_recognition_sweep.py). Command and times:
bench/results/2026-12-02-slow-tests.md."""

import copy
import os
import sys

import pytest
import torch

import resfuse
from resfuse._backends import kernels_module

from numerics import assert_matches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import recognition_sweep as sweep  # noqa: E402


@pytest.mark.parametrize("spec", [
    pytest.param("tv:densenet121", marks=pytest.mark.slow),   # ~55 s on this machine
    pytest.param("timm:dpn68", marks=pytest.mark.slow),       # ~55 s
    "tv:googlenet",                                           # ~25 s: in the default run
])
def test_model_through_the_triton_kernels(spec, device):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    plain = sweep.randomize_bn(sweep.build(spec).eval(), 0).to(device)
    fused = resfuse.convert(plain, backend="auto")
    x = torch.randn(1, 3, 32, 32, device=device)
    kern = kernels_module("conv_bn_act")
    seen = sweep.FusedConvWeights()
    with torch.no_grad():
        eager = plain(x)
        before = kern.LAUNCHES
        with seen:
            out = fused(x)
        ref = copy.deepcopy(plain).double()(x.double())
    dense = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1
             and id(m.weight) in seen.ids]
    assert dense and kern.LAUNCHES - before == len(dense), (kern.LAUNCHES - before, len(dense))
    assert_matches(out, ref, eager, torch.float32, spec)
