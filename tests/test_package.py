"""Packaging and entry points: import needs no GPU/Triton/extension, the
kernels install inside resfuse, setup.py explains itself, the CLI works."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, env=None, cwd=ROOT, timeout=300):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def test_import_without_triton_or_extension():
    # Triton made unimportable: resfuse still imports, converts and runs eager,
    # and the triton backend says why it cannot run.
    r = _run("""
        import sys
        sys.modules["triton"] = None
        import torch, resfuse
        assert "resfuse.kernels.conv_bn_act" not in sys.modules
        seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
        y = resfuse.convert(seq)(torch.randn(1, 3, 8, 8))
        assert resfuse.last_decision().backend == "eager", resfuse.last_decision()
        assert "triton is not importable" in resfuse.last_decision().reason(), resfuse.last_decision()
        try:
            resfuse.conv_bn_act(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), backend="triton")
        except resfuse.BackendUnavailable as e:
            print("OK", e)
    """, env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "triton is not importable" in r.stdout


def test_import_does_not_load_kernels_or_triton():
    r = _run("""
        import sys, resfuse
        assert "triton" not in sys.modules, "import resfuse imported triton"
        assert not any(m.startswith("resfuse.kernels") for m in sys.modules)
        assert not any(m.startswith("resfuse._C") for m in sys.modules)
        print("OK")
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_installed_layout_has_no_top_level_kernels():
    """When resfuse is installed, its kernels are resfuse.kernels and no
    generic top-level `kernels` package was installed beside it."""
    r = _run("""
        import importlib.util, os, sys
        spec = importlib.util.find_spec("resfuse")
        if spec is None:
            print("NOT-INSTALLED"); sys.exit(0)
        pkg = os.path.dirname(spec.origin)
        print("PKG", pkg)
        site = os.path.dirname(pkg)
        assert os.path.isfile(os.path.join(pkg, "kernels", "conv_bn_act.py")), os.listdir(pkg)
        assert not os.path.exists(os.path.join(site, "kernels")), "top-level kernels/ installed"
        print("OK")
    """, cwd="/")
    if "NOT-INSTALLED" in r.stdout:
        pytest.skip("resfuse is not installed (README command 1 installs it); source tree only")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_setup_explains_cuda_decision(tmp_path):
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "RESFUSE_BUILD_CUDA": "auto"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resfuse setup:" in r.stderr
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "RESFUSE_BUILD_CUDA": "0"}, timeout=120)
    assert "RESFUSE_BUILD_CUDA=0" in r.stderr


def test_cli_usage_and_unknown_command():
    r = subprocess.run([sys.executable, "-m", "resfuse"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stdout
    r = subprocess.run([sys.executable, "-m", "resfuse", "bogus"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_demo_eager_cpu():
    r = subprocess.run([sys.executable, "-m", "resfuse", "demo", "--device", "cpu", "--batch", "1",
                        "--size", "32", "--reps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT: PASS" in r.stdout and "whole model vs float64" in r.stdout


def test_demo_triton_interpreter():
    """The demo through the Triton kernels (interpreter): every fused layer
    reports backend triton and passes the error rule."""
    r = subprocess.run([sys.executable, "-m", "resfuse", "demo", "--device", "cpu", "--backend", "triton",
                        "--batch", "1", "--size", "32", "--reps", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout.split("fused unit")[1].split("whole model")[0]
    rows = [l for l in table.splitlines()[1:] if l.strip()]
    assert len(rows) == 9, r.stdout  # stem + 8 BasicBlocks of ResNet-18
    assert all(" triton " in l and l.rstrip().endswith("yes") for l in rows), r.stdout
    assert "20/20 convs fused" in r.stdout
