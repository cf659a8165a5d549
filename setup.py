"""Build script. Pure-Python install everywhere; the CUDA extension
resfuse._C (csrc/) is built when all of these hold (README, "Install"):

  1. RESFUSE_BUILD_CUDA is not 0 (auto, the default, or 1);
  2. csrc/ has .cu/.cpp sources;
  3. a CUDA toolkit is found: $CUDA_HOME / $CUDA_PATH, else the toolkit
     behind the nvcc on the PATH (a wrapper script is followed), else
     /usr/local/cuda; a toolkit is bin/nvcc plus libcudart;
  4. torch is importable while this script runs (pip's
     --no-build-isolation) and is a CUDA build whose CUDA major version is
     the toolkit's.

Otherwise the install is pure Python. Under RESFUSE_BUILD_CUDA=1 a failed
condition, a failed compile or a register spill is an error; under auto a
failed compile installs without the extension. Either way the decision
(built / not built / failed, why, toolkit, archs, the torch it was built
against) is written into the installed package as resfuse/_build_info.json,
which `resfuse.build_info`, the demo and `resfuse.explain` report: pip hides
this script's output unless the install fails.

The extension is built with ninja for TORCH_CUDA_ARCH_LIST (default
"8.0;9.0": sm_80 and sm_90 code). ptxas runs with -v (the register /
shared-memory report of every kernel goes to the build output) and with
-warn-spills -Werror: a kernel that spills registers to local memory fails
the build. After the build the per-kernel resources are read back from the
binary (cuobjdump -res-usage) into build/resfuse_C_resources.txt, which
.ci/run prints.

Packages are discovered (find_packages), so a new subpackage of resfuse/
or kernels/ (installed as resfuse.kernels) cannot be left out of the wheel;
tests/test_package.py compares a built wheel with the source tree.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

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


BUILD_INFO = "_build_info.json"  # inside the resfuse package; read by resfuse/build_info.py


def nvcc_release(home):
    """The toolkit's CUDA version ("13.0") from `nvcc --version`, or None."""
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _write_build_info(pkg_dir, record):
    os.makedirs(pkg_dir, exist_ok=True)
    with open(os.path.join(pkg_dir, BUILD_INFO), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


def cuda_extension():
    """([ext_modules], {cmdclass}, record): the extension to build, or none,
    and the record of that decision (written into the package by build_py,
    updated by build_ext with the outcome)."""
    want = os.environ.get("RESFUSE_BUILD_CUDA", "auto").strip() or "auto"
    if want not in ("auto", "0", "1"):
        raise SystemExit(f"resfuse setup: RESFUSE_BUILD_CUDA must be 0, 1 or auto, got {want!r}")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    record = {"extension": "not built", "reason": "", "requested": want, "cuda_home": None,
              "cuda_version": None, "archs": None, "torch": None, "torch_cuda": None,
              "python": sys.version.split()[0], "sources": len(sources)}

    def skip(reason):
        if want == "1":
            raise SystemExit(f"resfuse setup: RESFUSE_BUILD_CUDA=1 but the extension cannot be built: {reason}")
        _say(f"not building the CUDA extension: {reason}")
        record["reason"] = reason
        return [], {}, record

    try:
        import torch
        record["torch"], record["torch_cuda"] = torch.__version__, torch.version.cuda
    except ImportError:
        torch = None
    if want == "0":
        return skip("RESFUSE_BUILD_CUDA=0")
    if not sources:
        return skip("csrc/ has no .cu/.cpp sources")
    home = find_cuda_home()
    if home is None:
        return skip("no CUDA toolkit found (set CUDA_HOME to the toolkit root)")
    record["cuda_home"], record["cuda_version"] = home, nvcc_release(home)
    if torch is None:
        return skip("torch was not importable while setup.py ran (a build-isolated install: "
                    "install torch first, then `pip install --no-build-isolation .`)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build (a CUDA build of torch is needed)")
    if record["cuda_version"] and record["cuda_version"].split(".")[0] != torch.version.cuda.split(".")[0]:
        return skip(f"the toolkit at {home} is CUDA {record['cuda_version']}, torch {torch.__version__} "
                    f"was built with CUDA {torch.version.cuda} (the major versions must match)")
    os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    record["archs"] = os.environ["TORCH_CUDA_ARCH_LIST"]
    from torch.utils import cpp_extension
    _say(f"building resfuse._C from {len(sources)} sources with CUDA_HOME={home} (CUDA "
         f"{record['cuda_version']}), TORCH_CUDA_ARCH_LIST={record['archs']}, torch {torch.__version__}")
    record["extension"], record["reason"] = "failed", "the build did not finish"
    ext = cpp_extension.CUDAExtension(
        "resfuse._C", sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v,-warn-spills,-Werror"]})

    class BuildExtension(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
                for e in self.extensions:
                    write_resource_report(self.get_ext_fullpath(e.name))
                record["extension"], record["reason"] = "built", ""
            except (Exception, SystemExit) as e:
                record["extension"] = "failed"
                record["reason"] = f"the build failed ({type(e).__name__}: {str(e).strip()[:400]})"
                if want == "1":
                    raise
                _say(f"{record['reason']}; installing without the CUDA extension (RESFUSE_BUILD_CUDA=1 "
                     f"makes this an error)")
            finally:
                _write_build_info(os.path.join(self.build_lib, "resfuse"), record)
                if self.inplace:
                    _write_build_info(os.path.join(HERE, "resfuse"), record)

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, record


class BuildPy(build_py):
    """Copies the packages, then records the extension decision beside them
    (build_ext, which runs after it, rewrites the record with the outcome)."""

    def run(self):
        super().run()
        _write_build_info(os.path.join(self.build_lib, "resfuse"), build_record)


ext_modules, cmdclass, build_record = cuda_extension()

# kernels/ is installed as resfuse.kernels (and its subpackages under it).
PACKAGES = find_packages(include=["resfuse", "resfuse.*"]) + [
    "resfuse." + p for p in find_packages(include=["kernels", "kernels.*"])]

setup(
    packages=PACKAGES,
    package_dir={"resfuse.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPy, **cmdclass},
)
