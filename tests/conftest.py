"""Test setup: Triton's interpreter on machines without a GPU, the `gpu`
marker, the `device` fixture every kernel test is parametrized over, and
the `toolchain` fixture of the csrc emulation tests (tests/emulation.py)."""

import os
import sys
import zlib

import torch

if not torch.cuda.is_available():
    # Must happen before Triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# bench/ is not installed: tests that check the benchmarks' byte models import
# it from this checkout.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Kernel outputs start as NaN: an element a kernel does not write fails.
os.environ["RESFUSE_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402

from emulation import toolchain  # noqa: E402, F401  (fixture: g++ and CUDA headers for tests/csrc_emu)

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped, visibly, where none exists)")
    config.addinivalue_line("markers", "slow: whole-model interpreter runs (minutes on CPU)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


def _device_params():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=_device_params())
def device(request):
    """Where the Triton kernels run: CPU tensors through the interpreter
    (no-GPU machines), CUDA tensors on a GPU."""
    if request.param == "cpu" and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1; this machine tests the kernels on cuda")
    return torch.device(request.param)


@pytest.fixture
def seed(request):
    """Per-test seed derived from the test id, set globally and printed, so
    a failure can be replayed."""
    s = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Tests patch backends, kernels and launchers: a plan (and the launch
    prepared with it) made under a patch must not outlive its test."""
    yield
    from resfuse.ops.plans import clear_plans
    clear_plans()
