"""Shared harness of the CPU-emulator tests of csrc/ (tests/test_csrc_*emulation.py): finding
g++ and a CUDA toolkit's include dir, building a driver of tests/csrc_emu/ (plain or under
ThreadSanitizer), running it, and reading its output.

A driver prints one line per case and mode, ``case <i> <mode> [early|late] <name>: ok|FAIL
(<info>)``, then ``emu: <n> cases, <k> ok, <f> failed``, and exits 0 iff nothing failed. Without
g++ or the toolkit headers the tests skip, visibly, except under RESFUSE_BUILD_CUDA=1 (CI), where
that is a failure.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU_DIR = ROOT / "tests" / "csrc_emu"
MUST_BUILD = os.environ.get("RESFUSE_BUILD_CUDA") == "1"
MATH_MODES = {"f16", "bf16", "tf32", "3xtf32"}

CASE_LINE = re.compile(r"^case (?P<idx>\d+) (?P<mode>\S+) (?:(?P<landing>early|late) )?(?P<name>.+): "
                       r"(?P<status>ok|FAIL) \((?P<info>.*)\)$")
SUMMARY = re.compile(r"^emu: (\d+) cases, (\d+) ok, (\d+) failed$")


def _unavailable(why):
    if MUST_BUILD:
        pytest.fail(f"RESFUSE_BUILD_CUDA=1 but {why}")
    pytest.skip(why)


def _toolkit_roots():
    yield os.environ.get("CUDA_HOME")
    yield os.environ.get("CUDA_PATH")
    yield "/usr/local/cuda"
    try:  # last resort, imported only when needed (torch is slow to import)
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        CUDA_HOME = None
    yield CUDA_HOME


def _cuda_include_dir():
    """(the first toolkit include dir holding cuda_runtime.h or None, the roots tried)."""
    tried = []
    for root in filter(None, _toolkit_roots()):
        tried.append(root)
        inc = Path(root) / "include"
        if (inc / "cuda_runtime.h").is_file():
            return str(inc), tried
    return None, tried


@pytest.fixture(scope="module")
def toolchain():
    """(g++, the CUDA include dir) or a skip (a failure under RESFUSE_BUILD_CUDA=1)."""
    gxx = shutil.which("g++")
    if gxx is None:
        _unavailable("no g++ on the PATH (the csrc emulation tests compile host C++)")
    inc, tried = _cuda_include_dir()
    if inc is None:
        _unavailable("no cuda_runtime.h in a CUDA toolkit ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda, torch's "
                     f"CUDA_HOME; tried {tried})")
    return gxx, inc


def run(cmd, timeout):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMU_")}  # no debugging knobs
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def compile_(cmd):
    r = run(cmd, timeout=600)
    assert r.returncode == 0, f"compile failed: {' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr[-8000:]}"


_TSAN_FLAGS = ["-O1", "-g", "-fsanitize=thread", "-std=c++20", "-pthread"]


def _require_tsan(gxx, tmp_path):
    """Skip (even under RESFUSE_BUILD_CUDA=1: TSan is an extra beyond the plain run) when g++
    cannot build and run a ThreadSanitizer program here."""
    probe = tmp_path / "tsan_probe.cpp"
    probe.write_text("#include <thread>\n"
                     "int main() { int x = 0; std::thread t([&] { x = 1; }); t.join(); return x - 1; }\n")
    p = run([gxx, *_TSAN_FLAGS, str(probe), "-o", str(tmp_path / "tsan_probe")], timeout=120)
    if p.returncode == 0:
        p = run([str(tmp_path / "tsan_probe")], timeout=60)
    if p.returncode != 0:
        pytest.skip(f"g++ cannot build/run a ThreadSanitizer program here: {(p.stderr or p.stdout)[-500:]}")


def build_and_run(toolchain, driver, tmp_path, case_args=(), tsan=False, timeout=900):
    """Compile tests/csrc_emu/<driver> (with ThreadSanitizer when `tsan`), run it on `case_args`
    (case indices; none: all), require exit status 0 (and no TSan report); returns its stdout
    and the text to show on a failure."""
    gxx, inc = toolchain
    if tsan:
        _require_tsan(gxx, tmp_path)
    flags = _TSAN_FLAGS if tsan else ["-O2", "-std=c++20", "-pthread"]
    exe = tmp_path / (Path(driver).stem + ("_tsan" if tsan else ""))
    t0 = time.perf_counter()
    compile_([gxx, *flags, "-Wno-unknown-pragmas", f"-I{inc}", str(EMU_DIR / driver), "-o", str(exe)])
    t1 = time.perf_counter()
    r = run([str(exe), *case_args], timeout=timeout)
    t2 = time.perf_counter()
    out = r.stdout + (f"\n[stderr]\n{r.stderr[-20000:]}" if r.stderr else "")
    print(f"{driver}: compile {t1 - t0:.1f} s, run {t2 - t1:.1f} s\n{out}")
    if tsan:
        assert "WARNING: ThreadSanitizer" not in r.stderr, f"data race in the emulated kernel\n{out}"
    assert r.returncode == 0, f"emulator exit status {r.returncode}\n{out}"
    return r.stdout, out


def cases_of(stdout, out, modes, case_args=()):
    """The case lines (dicts of CASE_LINE's groups) after checking that each is ok, that the summary
    agrees, that every case ran in every one of `modes`, and (case_args) that exactly the named
    cases ran. Also returns {(index, name): set of modes}."""
    lines = stdout.splitlines()
    cases = [m.groupdict() for m in map(CASE_LINE.match, lines) if m]
    summary = [m.groups() for m in map(SUMMARY.match, lines) if m]
    assert len(summary) == 1, f"no summary line\n{out}"
    n, n_ok, n_failed = map(int, summary[0])
    assert n_failed == 0 and n_ok == n == len(cases) > 0, out
    failed = [c for c in cases if c["status"] != "ok"]
    assert not failed, f"cases not ok: {failed}\n{out}"
    by_case = {}
    for c in cases:
        by_case.setdefault((int(c["idx"]), c["name"]), set()).add(c["mode"])
    for key, got in by_case.items():
        assert got == set(modes), f"case {key} ran in {sorted(got)}, not in all of {sorted(modes)}"
    if case_args:
        assert sorted({c["idx"] for c in cases}) == sorted(case_args), out
    return cases, by_case


def assert_covers(by_case, required):
    """Every `required` description has a case whose name matches its regex."""
    names = [name for _, name in by_case]
    missing = [what for what, pat in required.items() if not any(re.search(pat, nm) for nm in names)]
    assert not missing, f"the emulator's cases no longer cover: {missing}\n{names}"


def cp_async_counts(cases):
    return [int(re.search(r"cp\.async (\d+)", c["info"]).group(1)) for c in cases]
