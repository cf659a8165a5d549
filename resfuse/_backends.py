"""Availability of the compiled backends: Triton kernels and the CUDA
extension. Importing this module imports neither."""

import glob
import importlib
import importlib.util
import os
import sys
from functools import lru_cache
from typing import List

import torch

from .build_info import describe, installed_package_dir

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e})"
    return ""


_LOADED_KERNELS = {}  # kernel module name -> whether it was imported in interpreter mode


def kernels_module(name: str):
    """Import ``resfuse.kernels.<name>``. An installed resfuse carries the
    top-level ``kernels/`` folder of the source tree as ``resfuse.kernels``;
    in a source checkout it is loaded from there under the same name."""
    full = f"resfuse.kernels.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if "resfuse.kernels" not in sys.modules:
        pkg_dir = os.path.dirname(os.path.abspath(__file__))
        if not os.path.isfile(os.path.join(pkg_dir, "kernels", "__init__.py")):
            src = os.path.join(os.path.dirname(pkg_dir), "kernels", "__init__.py")
            if not os.path.isfile(src):
                raise ImportError("resfuse.kernels is missing: neither installed nor in a source checkout")
            spec = importlib.util.spec_from_file_location(
                "resfuse.kernels", src, submodule_search_locations=[os.path.dirname(src)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules["resfuse.kernels"] = mod
            spec.loader.exec_module(mod)
    mod = importlib.import_module(full)
    _LOADED_KERNELS[full] = interpreting()  # triton.jit fixed the mode at import
    return mod


def recording_launches() -> bool:
    """Whether resfuse.inspect is recording launches (the launchers then
    run on CPU tensors without the interpreter, and launch nothing)."""
    mod = sys.modules.get("resfuse.kernels._common")
    return mod is not None and mod.recording()


def triton_reasons(device: torch.device, dtype: torch.dtype) -> List[str]:
    """Why Triton cannot run a kernel on tensors of this device and dtype."""
    reasons = []
    err = _triton_import_error()
    if err:
        return [err]
    if any(interp != interpreting() for interp in _LOADED_KERNELS.values()):
        reasons.append("TRITON_INTERPRET changed after the kernels were imported; "
                       "set it before the first resfuse call")
    if dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {dtype} is not supported by the Triton kernels (float16, bfloat16, float32)")
    if device.type == "cuda":
        if interpreting():
            reasons.append("TRITON_INTERPRET=1 is set, and the interpreter runs on CPU tensors only")
        else:
            major, minor = torch.cuda.get_device_capability(device)
            if major < 7:
                reasons.append(f"GPU compute capability {major}.{minor} < 7.0")
            elif dtype == torch.bfloat16 and major < 8:
                reasons.append(f"bfloat16 tl.dot needs compute capability >= 8.0, device has {major}.{minor}")
    elif device.type == "cpu":
        if not interpreting() and not recording_launches():
            reasons.append("cpu tensors: Triton needs CUDA (or TRITON_INTERPRET=1)")
    else:
        reasons.append(f"device type {device.type!r} is not supported by the Triton kernels")
    return reasons


@lru_cache(maxsize=None)
def cuda_extension():
    """(module, "") when resfuse._C is built and importable (importing it
    registers torch.ops.resfuse_cuda.*), else (None, why): the load error,
    or what setup.py recorded at install (resfuse/build_info.py)."""
    try:
        return importlib.import_module("resfuse._C"), ""
    except ImportError as e:
        if "No module named" not in str(e):
            return None, f"the CUDA extension resfuse._C does not load ({e}); install: {describe(torch.__version__)}"
    # Running from a source checkout (its resfuse/ first on sys.path) after
    # `pip install .` built the extension into site-packages: use that one.
    pkg = installed_package_dir()
    here = os.path.dirname(os.path.abspath(__file__))
    if pkg and os.path.realpath(pkg) != os.path.realpath(here):
        for so in sorted(glob.glob(os.path.join(pkg, "_C*.so")) + glob.glob(os.path.join(pkg, "_C*.pyd"))):
            try:
                spec = importlib.util.spec_from_file_location("resfuse._C", so)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
            except ImportError as e:
                return None, f"the CUDA extension {so} does not load ({e}); install: {describe(torch.__version__)}"
            sys.modules["resfuse._C"] = mod
            return mod, ""
    return None, f"resfuse._C is not built ({describe()})"


#: Compute capabilities resfuse._C carries SASS for (TORCH_CUDA_ARCH_LIST
#: "8.0;9.0"); sm_8x and sm_9x devices run them (same major version).
CUDA_MAJORS = (8, 9)


def cuda_reasons(op: str, device: torch.device, dtype: torch.dtype = None) -> List[str]:
    """Why resfuse._C cannot run `op` on tensors of this device and dtype."""
    mod, why = cuda_extension()
    if mod is None:
        return [why]
    if op not in getattr(mod, "OPS", ()):
        return [f"resfuse._C has no {op} kernel"]
    reasons = []
    if dtype is not None and dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {dtype} is not supported by the CUDA kernels (float16, bfloat16, float32)")
    if device.type != "cuda":
        reasons.append(f"tensors are on {device.type} (the CUDA kernels need CUDA tensors)")
    else:
        major, minor = torch.cuda.get_device_capability(device)
        if major not in CUDA_MAJORS:
            reasons.append(f"resfuse._C carries code for sm_80 and sm_90; the device is sm_{major}{minor}")
    return reasons


def conv_allows_tf32() -> bool:
    """Whether fp32 convolutions may use TF32, as cuDNN convolutions do."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision == "tf32":
        return True
    if precision == "ieee":
        return False
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # legacy and new TF32 flags mixed: be exact
        return False
