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


def _tracked_package_files():
    """{path inside the installed package: source path} for every file of
    the checkout that the wheel must carry: resfuse/ as it is, kernels/ as
    resfuse/kernels/ (git's list where there is one, else the tree)."""
    try:
        names = subprocess.run(["git", "ls-files", "resfuse", "kernels"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        names = [os.path.relpath(os.path.join(d, f), ROOT) for top in ("resfuse", "kernels")
                 for d, _, fs in os.walk(os.path.join(ROOT, top)) for f in fs if not f.endswith(".pyc")]
    out = {}
    for n in names:
        if n.endswith((".pyc", ".so")) or "__pycache__" in n or n.endswith(BUILD_INFO):
            continue
        out["resfuse/" + n if n.startswith("kernels/") else n] = os.path.join(ROOT, n)
    return out


BUILD_INFO = "_build_info.json"


def test_installed_package_is_the_checkout_and_works(tmp_path):
    """README command 1 installed resfuse: imported from a folder outside the
    checkout it is the installed copy, byte for byte the checkout's sources
    (so the tests, which import the checkout, test what was installed),
    with the install's record of the CUDA extension; it converts and runs a
    model. Under RESFUSE_BUILD_CUDA=1 (CI) the extension must have been built,
    against the torch that is installed now."""
    r = _run("""
        import hashlib, importlib.metadata, json, os, sys
        import torch, resfuse
        from resfuse.build_info import build_info
        dist = importlib.metadata.distribution("resfuse")
        direct = dist.read_text("direct_url.json")
        editable = bool(direct and json.loads(direct).get("dir_info", {}).get("editable"))
        seq = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.BatchNorm2d(5),
                                  torch.nn.ReLU(), torch.nn.Conv2d(5, 4, 1), torch.nn.BatchNorm2d(4)).eval()
        for bn in (seq[1], seq[4]):
            bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2)
        x = torch.randn(2, 3, 9, 7)
        fused = resfuse.convert(seq, inplace=False)
        with torch.no_grad():
            ref, out = seq(x), fused(x)
        err = ((out - ref).norm() / ref.norm()).item()
        pkg = os.path.dirname(resfuse.__file__)
        files = {}
        for d, _, fs in os.walk(pkg):
            for f in fs:
                p = os.path.join(d, f)
                files[os.path.relpath(p, os.path.dirname(pkg))] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        print(json.dumps({"file": resfuse.__file__, "editable": editable, "err": err, "files": files,
                          "fused": len(resfuse.explain(fused).fused),
                          "info": build_info(), "torch": torch.__version__}))
    """, cwd=str(tmp_path))
    assert r.returncode == 0, ("resfuse is not importable from outside the checkout: is it installed? "
                               "(README command 1)\n" + r.stderr)
    import hashlib
    import json
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["err"] < 1e-5 and got["fused"] == 2, (got["err"], got["fused"])
    if not got["editable"]:
        assert not os.path.realpath(got["file"]).startswith(os.path.realpath(ROOT) + os.sep), \
            f"resfuse imported from {got['file']}, inside the checkout, not the installed copy"
        want = _tracked_package_files()
        missing = sorted(set(want) - set(got["files"]))
        assert not missing, f"installed resfuse lacks files of the checkout: {missing}"
        stale = sorted(k for k, src in want.items()
                       if hashlib.sha256(open(src, "rb").read()).hexdigest() != got["files"][k])
        assert not stale, f"installed resfuse differs from the checkout (reinstall): {stale}"
        assert f"resfuse/{BUILD_INFO}" in got["files"], "the install did not record its CUDA extension decision"
        site = os.path.dirname(os.path.dirname(got["file"]))
        assert not os.path.exists(os.path.join(site, "kernels")), "a top-level kernels/ was installed"
    info = got["info"]
    assert info["extension"] in ("built", "not built", "failed"), info
    if os.environ.get("RESFUSE_BUILD_CUDA") == "1":
        assert info["extension"] == "built", info
    if info["extension"] == "built":
        assert info["torch"] == got["torch"], f"resfuse._C was built against torch {info['torch']}, " \
                                              f"torch {got['torch']} is installed"
        assert info["archs"] and info["cuda_version"], info
    else:
        assert info["reason"], info


def _wheel(tmp_path, env, plant=False):
    """Build a wheel of a copy of the checkout's tracked files (pip, no
    build isolation, as README command 1 does); returns (names in the wheel,
    the build record inside it)."""
    import json
    import shutil
    import zipfile
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for n in files:
        if os.path.isfile(os.path.join(ROOT, n)):
            (src / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, n), src / n)
    if plant:  # a subpackage nobody told setup.py about, in each tree
        for d in ("resfuse/_planted_sub", "kernels/_planted_sub"):
            (src / d).mkdir()
            (src / d / "__init__.py").write_text("")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp_path / "dist").glob("resfuse-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        info = json.loads(z.read(f"resfuse/{BUILD_INFO}"))
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    return names, info, meta


def test_wheel_carries_every_package_and_records_the_decision(tmp_path):
    """Package discovery: every file of resfuse/ and kernels/ (as
    resfuse/kernels/) is in the wheel, so is a subpackage added without
    touching setup.py, and nothing else is installed at top level; the
    wheel records why it has no extension."""
    names, info, meta = _wheel(tmp_path, {"RESFUSE_BUILD_CUDA": "0"}, plant=True)
    missing = sorted(set(_tracked_package_files()) - names)
    assert not missing, f"the wheel lacks: {missing}"
    assert {"resfuse/_planted_sub/__init__.py", "resfuse/kernels/_planted_sub/__init__.py"} <= names
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"resfuse"}, tops
    assert info["extension"] == "not built" and info["reason"] == "RESFUSE_BUILD_CUDA=0", info
    assert "Requires-Dist: torch<2.15,>=2.11" in meta or "Requires-Dist: torch>=2.11,<2.15" in meta, meta


def test_a_failed_extension_build_is_recorded_not_hidden(tmp_path):
    """Default mode: a compile that fails (here: an arch list torch rejects)
    installs without the extension and says so in the record; where no
    toolkit or no CUDA torch is present, the record says that instead."""
    import torch
    names, info, _ = _wheel(tmp_path, {"RESFUSE_BUILD_CUDA": "auto", "TORCH_CUDA_ARCH_LIST": "not-an-arch"})
    assert not any(n.startswith("resfuse/_C") for n in names)
    if info["extension"] == "not built":  # no toolkit, or a CPU-only torch: nothing was compiled
        assert ("no CUDA toolkit" in info["reason"] or "CPU-only" in info["reason"]), info
        assert info["cuda_home"] is None or torch.version.cuda is None, info
    else:
        assert info["extension"] == "failed" and "not-an-arch" in info["reason"], info
        assert info["torch"] == torch.__version__ and info["archs"] == "not-an-arch", info


def test_readme_commands_are_what_ci_runs_and_agree_with_pyproject():
    """.ci/run reads the README's two commands (no copy to drift); the torch
    range is the same in the README's prose, command 1 and pyproject."""
    import re
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    cmd1 = block[block.index(next(l for l in block if l.startswith("# 1."))) + 1]
    cmd2 = block[block.index(next(l for l in block if l.startswith("# 2."))) + 1]
    assert cmd2 == "python -m pytest tests"
    assert "readme_command 1" in ci and "readme_command 2" in ci
    assert "pip install" not in ci and "python -m pytest" not in ci, \
        ".ci/run must take its commands from the README, not carry its own"
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    (dep,) = re.findall(r'dependencies = \["torch([^"]*)"\]', pyproject)
    assert f'"torch{dep}"' in cmd1, (dep, cmd1)
    a, b, c, d = map(int, re.fullmatch(r">=(\d+)\.(\d+),<(\d+)\.(\d+)", dep).groups())
    assert f"torch {a}.{b}–{c}.{d - 1} (`torch{dep}`)" in readme, dep
    assert "--no-build-isolation" in cmd1 and cmd1.endswith("python -m resfuse demo")


def test_setup_explains_cuda_decision(tmp_path):
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "RESFUSE_BUILD_CUDA": "auto"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resfuse setup:" in r.stderr
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "RESFUSE_BUILD_CUDA": "0"}, timeout=120)
    assert "RESFUSE_BUILD_CUDA=0" in r.stderr
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "RESFUSE_BUILD_CUDA": "yes"}, timeout=120)
    assert r.returncode != 0 and "RESFUSE_BUILD_CUDA must be 0, 1 or auto, got 'yes'" in r.stderr


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
    # The newcomer's view: the explain table fits 100 columns and says the
    # fallback reason every row shares once, not 20 times.
    table = r.stdout.split("\n\n")[1]
    assert all(len(l) <= 100 for l in table.splitlines()), table
    assert table.count("Triton needs CUDA") == 1 and "(17 rows)" in table, table
    assert "resfuse._C: " in table, table


@pytest.mark.slow
def test_demo_triton_interpreter():
    """The demo through the Triton kernels (interpreter): every fused layer
    reports backend triton and passes the error rule. A whole ResNet-18 in
    the interpreter, about 2 minutes on 2 cores: `python -m pytest -m slow tests`."""
    r = subprocess.run([sys.executable, "-m", "resfuse", "demo", "--device", "cpu", "--backend", "triton",
                        "--batch", "1", "--size", "32", "--reps", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout.split("fused unit")[1].split("whole model")[0]
    rows = [l for l in table.splitlines()[1:] if l.strip()]
    assert len(rows) == 9, r.stdout  # stem + 8 BasicBlocks of ResNet-18
    assert all(" triton " in l and l.rstrip().endswith("yes") for l in rows), r.stdout
    assert "20/20 convs fused" in r.stdout
