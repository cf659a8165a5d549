"""Build script. Pure-Python install everywhere; the CUDA extension
(resfuse._C) is built only when csrc/ has sources, torch is importable in
the build environment and a CUDA toolkit is found. It prints which, and why.
Set RESFUSE_BUILD_CUDA=0 to skip the extension, =1 to make its absence an
error."""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"resfuse setup: {msg}", file=sys.stderr)


def cuda_extension():
    """([ext_modules], {cmdclass}) for resfuse._C, or ([], {}) with a reason printed."""
    want = os.environ.get("RESFUSE_BUILD_CUDA", "auto")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))

    def skip(reason):
        if want == "1":
            raise SystemExit(f"resfuse setup: RESFUSE_BUILD_CUDA=1 but the extension cannot be built: {reason}")
        _say(f"not building the CUDA extension: {reason}")
        return [], {}

    if want == "0":
        return skip("RESFUSE_BUILD_CUDA=0")
    if not sources:
        return skip("csrc/ has no .cu/.cpp sources yet")
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return skip("torch is not importable in the build environment "
                    "(install with `pip install --no-build-isolation .`)")
    if cpp_extension.CUDA_HOME is None:
        return skip("no CUDA toolkit found (set CUDA_HOME to the toolkit root)")
    _say(f"building resfuse._C from {len(sources)} sources with CUDA_HOME={cpp_extension.CUDA_HOME}")
    ext = cpp_extension.CUDAExtension(
        "resfuse._C", sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    packages=["resfuse", "resfuse.nn", "resfuse.kernels"],
    package_dir={"resfuse.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
