"""csrc/gnconv_wgrad.cu (pixel_wgrad, layernorm_rows_backward) executed on the CPU (no GPU needed).

The emulator driver tests/csrc_emu/emu_wgrad.cpp compiles the unchanged .cu on the engine of
tests/csrc_emu/ (emu.cpp's header says what it emulates and what it cannot catch) and runs its cases
x {fp16, bf16, TF32, 3xTF32} against a float64 reference: NaN-prefilled outputs and workspace, guard
regions, out-of-range / misaligned reads, cp.async landing early or late. Every case must be ``ok``.
A ThreadSanitizer build runs two cases (the wgrad pipeline with its in-smem prologue pass, and the
LayerNorm backward's smem reductions). Toolchain discovery and skips as in test_csrc_emulation.py.
"""

import re
import time
from pathlib import Path

import pytest

from test_csrc_emulation import _compile, _run, toolchain  # noqa: F401  (toolchain is a fixture)

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "csrc_emu" / "emu_wgrad.cpp"
MODES = {"f16", "bf16", "tf32", "3xtf32"}

# What the driver's case list has to keep covering (regex on the case names it prints).
REQUIRED_CASES = {
    "wgrad with db": r"^wgrad .*\bdb\b",
    "wgrad without db": r"^wgrad .*\bno db\b",
    "channel slices (ld > width)": r"^wgrad slices ld_dy=\d+ ldb=\d+",
    "row_scale over several images": r"^wgrad row_scale HW=\d+ \(\d+ images\)",
    "LayerNorm prologue": r"^wgrad LN prologue",
    "GELU prologue": r"^wgrad GELU prologue",
    "widths not multiples of 8 (element-wise)": r"^wgrad Nout=37 K=21 .*element-wise",
    "vector loads": r"^wgrad .*\bvec\b",
    "several pixel chunks, ragged tail": r"^wgrad chunks=[2-9] ragged",
    "M = 0 writes zeros": r"^wgrad M=0 zeros",
    "NaN input": r"^wgrad NaN",
    "misaligned pointer": r"^wgrad misaligned",
    "LN backward C=16": r"^ln C=16 M=[1-9]",
    "LN backward C=37 with outputs": r"^ln C=37 .*all outputs",
    "LN backward C=37 without outputs": r"^ln C=37 .*dx only",
    "LN backward C=200 with outputs": r"^ln C=200 .*all outputs",
    "LN backward C=200 without outputs": r"^ln C=200 .*dx only",
    "LN backward M = 0 zeros": r"^ln .*M=0 zeros",
}
TSAN_CASES = ["4", "15"]

CASE_LINE = re.compile(r"^case (\d+) (\S+) (early|late) (.+): (ok|FAIL) \((.*)\)$")
SUMMARY = re.compile(r"^emu: (\d+) cases, (\d+) ok, (\d+) failed$")


def _cases(r, out):
    lines = r.stdout.splitlines()
    cases = [m.groups() for m in map(CASE_LINE.match, lines) if m]
    summary = [m.groups() for m in map(SUMMARY.match, lines) if m]
    assert len(summary) == 1, f"no summary line\n{out}"
    n, n_ok, n_failed = map(int, summary[0])
    assert n_failed == 0 and n_ok == n == len(cases) > 0, out
    failed = [c for c in cases if c[4] != "ok"]
    assert not failed, f"cases not ok: {failed}\n{out}"
    return cases


def test_wgrad_kernels_under_cpu_emulator(toolchain, tmp_path):  # noqa: F811
    gxx, inc = toolchain
    exe = tmp_path / "gnconv_wgrad_emu"
    t0 = time.perf_counter()
    _compile([gxx, "-O2", "-std=c++20", "-pthread", "-Wno-unknown-pragmas", f"-I{inc}", str(DRIVER), "-o", str(exe)])
    t1 = time.perf_counter()
    r = _run([str(exe)], timeout=600)
    t2 = time.perf_counter()
    out = r.stdout + (f"\n[stderr]\n{r.stderr}" if r.stderr else "")
    print(f"emulator: compile {t1 - t0:.1f} s, run {t2 - t1:.1f} s\n{out}")
    assert r.returncode == 0, f"emulator exit status {r.returncode}\n{out}"
    assert "validation: ok" in r.stdout.splitlines(), f"launcher validation failed\n{out}"
    cases = _cases(r, out)
    by_case = {}
    for idx, mode, _, name, _, _ in cases:
        by_case.setdefault((int(idx), name), set()).add(mode)
    for key, modes in by_case.items():
        assert modes == MODES, f"case {key} ran in {sorted(modes)}, not in all of {sorted(MODES)}"
    assert {c[2] for c in cases} == {"early", "late"}, out
    wgrad_copies = [int(re.search(r"cp\.async (\d+)", c[5]).group(1)) for c in cases if c[3].startswith("wgrad")]
    assert any(wgrad_copies) and not all(wgrad_copies), "both the cp.async and the element-wise loader must run"
    names = [name for _, name in by_case]
    missing = [what for what, pat in REQUIRED_CASES.items() if not any(re.search(pat, nm) for nm in names)]
    assert not missing, f"the emulator's cases no longer cover: {missing}\n{names}"


def test_wgrad_kernels_under_cpu_emulator_threadsanitizer(toolchain, tmp_path):  # noqa: F811
    gxx, inc = toolchain
    probe = tmp_path / "tsan_probe.cpp"
    probe.write_text("#include <thread>\n"
                     "int main() { int x = 0; std::thread t([&] { x = 1; }); t.join(); return x - 1; }\n")
    flags = ["-O1", "-g", "-fsanitize=thread", "-std=c++20", "-pthread"]
    p = _run([gxx, *flags, str(probe), "-o", str(tmp_path / "tsan_probe")], timeout=120)
    if p.returncode == 0:
        p = _run([str(tmp_path / "tsan_probe")], timeout=60)
    if p.returncode != 0:
        pytest.skip(f"g++ cannot build/run a ThreadSanitizer program here: {(p.stderr or p.stdout)[-500:]}")
    exe = tmp_path / "gnconv_wgrad_emu_tsan"
    _compile([gxx, *flags, "-Wno-unknown-pragmas", f"-I{inc}", str(DRIVER), "-o", str(exe)])
    r = _run([str(exe), *TSAN_CASES], timeout=600)
    out = r.stdout + (f"\n[stderr]\n{r.stderr[-20000:]}" if r.stderr else "")
    print(out)
    assert "WARNING: ThreadSanitizer" not in r.stderr, f"data race in the emulated kernels\n{out}"
    assert r.returncode == 0, f"emulator (TSan) exit status {r.returncode}\n{out}"
    cases = _cases(r, out)
    assert sorted({c[0] for c in cases}) == sorted(TSAN_CASES) and {c[1] for c in cases} == MODES, out
