"""Build script. Pure-Python install everywhere; the CUDA extension
(resfuse._C, csrc/) is built only when csrc/ has sources, torch is
importable in the build environment and a CUDA toolkit is found. It prints
which, and why. Set RESFUSE_BUILD_CUDA=0 to skip the extension, =1 to make
its absence an error.

The extension is built with ninja for TORCH_CUDA_ARCH_LIST (default
"8.0;9.0": sm_80 and sm_90 code). ptxas runs with -v (the register /
shared-memory report of every kernel goes to the build output) and with
-warn-spills -Werror: a kernel that spills registers to local memory fails
the build. After the build the per-kernel resources are read back from the
binary (cuobjdump -res-usage) into build/resfuse_C_resources.txt, which
.ci/run prints.

CUDA_HOME: torch guesses the toolkit root from the nvcc on the PATH; when
that nvcc is a wrapper script (as on resfuse's CI machines), the guess has
no lib64/libcudart and linking fails. Unless CUDA_HOME is set, this script
follows the wrapper to the real toolkit.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"
RESOURCES = os.path.join("build", "resfuse_C_resources.txt")


def _say(msg):
    print(f"resfuse setup: {msg}", file=sys.stderr)


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and bool(
        glob.glob(os.path.join(root, "lib64", "libcudart.so*")) or glob.glob(os.path.join(root, "lib", "libcudart.so*")))


def find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, else the toolkit behind
    the nvcc on the PATH (following a wrapper script's exec line), else
    /usr/local/cuda. None when there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for path in re.findall(rb"(/[^\s\"']*/bin/nvcc)\b", head):
                    candidates.append(os.path.dirname(os.path.dirname(path.decode())))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if _is_toolkit(root):
            return root
    return None


def _cuobjdump():
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(p):
            return p
    except Exception:
        pass
    root = os.environ.get("CUDA_HOME")
    for p in ([os.path.join(root, "bin", "cuobjdump")] if root else []) + [shutil.which("cuobjdump")]:
        if p and os.path.isfile(p):
            return p
    return None


def write_resource_report(ext_path):
    """Per-kernel registers / stack / shared / local memory of the built
    extension (what ptxas -v reports), into RESOURCES; fails on a kernel
    with local memory or stack (a spill ptxas did not already refuse)."""
    tool = _cuobjdump()
    if tool is None:
        _say("no cuobjdump found (Triton's wheel or the toolkit): resource report skipped")
        return
    r = subprocess.run([tool, "-res-usage", ext_path], capture_output=True, text=True)
    os.makedirs(os.path.dirname(RESOURCES), exist_ok=True)
    with open(RESOURCES, "w") as f:
        f.write(r.stdout + r.stderr)
    _say(f"kernel resources (cuobjdump -res-usage) written to {RESOURCES}")
    bad = []
    arch, func = None, None
    for line in r.stdout.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S+):", line)
        if m:
            func = m.group(1)
        m = re.search(r"STACK:(\d+).*LOCAL:(\d+)", line)
        if m and func and "resfuse" in func and (int(m.group(1)) or int(m.group(2))):
            bad.append(f"{func} ({arch}): STACK {m.group(1)} LOCAL {m.group(2)}")
    if bad:
        raise SystemExit("resfuse setup: kernels use local memory (register spills):\n  " + "\n  ".join(bad))


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
    home = find_cuda_home()
    if home is None:
        return skip("no CUDA toolkit found (set CUDA_HOME to the toolkit root)")
    os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return skip("torch is not importable in the build environment "
                    "(install with `pip install --no-build-isolation .`)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build (a CUDA build of torch is needed)")
    _say(f"building resfuse._C from {len(sources)} sources with CUDA_HOME={home}, "
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, torch {torch.__version__}")
    ext = cpp_extension.CUDAExtension(
        "resfuse._C", sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v,-warn-spills,-Werror"]})

    class BuildExtension(cpp_extension.BuildExtension):
        def run(self):
            super().run()
            for e in self.extensions:
                write_resource_report(self.get_ext_fullpath(e.name))

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    packages=["resfuse", "resfuse.nn", "resfuse.kernels"],
    package_dir={"resfuse.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
