"""csrc/gnconv_gemm.cu (pixel_gemm_launch) executed on the CPU (no GPU needed).

The CPU emulator of tests/csrc_emu/ (emu.cpp's header says what it emulates and what it cannot
catch) runs the unchanged kernel through tests/csrc_emu/emu_gemm.cpp: cases x {fp16, bf16, TF32,
3xTF32} against a float64 reference of csrc/gnconv.h's formula (LayerNorm / GELU prologues, gate
in place over a channel slice, row/col scale + residual, aux_out, gelu' gate, odd Nout, several
M tiles, misaligned pointers, NaN/Inf), NaN-prefilled outputs, untouched padding / guard regions,
checked global reads and the cp.async pipeline with early and late landing; plus the launcher's
validation strings. A ThreadSanitizer build on a few cases checks the shared-memory accesses
(pipeline, LayerNorm stats reduction, per-stage prologue transform) against the emulated
barriers. Needs g++ and a CUDA toolkit's include dir; skips visibly otherwise (a failure under
RESFUSE_BUILD_CUDA=1), like tests/test_csrc_emulation.py whose helpers it reuses.
"""

import re
import time
from pathlib import Path

from test_csrc_emulation import CASE_LINE, MODES, SUMMARY, _compile, _run, toolchain  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "csrc_emu" / "emu_gemm.cpp"

# What the driver's case list has to keep covering (regex on the case names it prints).
REQUIRED_CASES = {
    "plain GEMM with bias": r"^plain bias\b",
    "LayerNorm, K % 8 != 0 (element-wise loads)": r"^LN K=19\b.*element-wise",
    "LayerNorm, K=64 (16-byte loads)": r"^LN K=64 vec\b",
    "LayerNorm with norm weight and bias": r"^LN\b.*\bnw nb\b",
    "LayerNorm without affine": r"^LN\b.*\bno affine\b",
    "GELU prologue": r"^GELU prologue\b",
    "gate in place over a slice, A a slice of the same buffer": r"\bgate in place out==mul slice lda>K\b",
    "row_scale + col_scale + residual": r"\brow_scale\b.*\bcol_scale\b.*\bres\b",
    "aux_out with aux_mul": r"\baux_out aux_mul\b",
    "aux_out without aux_mul": r"\baux_out no aux_mul\b",
    "mul_gelu_grad": r"\bmul_gelu_grad\b",
    "odd Nout": r"\bNout=(33|70)\b",
    "several M tiles, M % 128 != 0": r"\bM=(300|257)\b",
    "misaligned pointers": r"\bmisaligned\b",
    "NaN/Inf inputs": r"\bnonfinite\b",
}

# ThreadSanitizer: LayerNorm with element-wise loads (stats reduction + transform), LayerNorm with
# cp.async, the in-place gate with cp.async over a slice.
TSAN_CASES = ["1", "2", "5"]

VALIDATION = re.compile(r"^validation: (ok|FAIL) \((\d+) checks\)$")


def _check_output(r, out, expect_cases=None):
    lines = r.stdout.splitlines()
    cases = [m.groups() for m in map(CASE_LINE.match, lines) if m]
    summary = [m.groups() for m in map(SUMMARY.match, lines) if m]
    assert len(summary) == 1, f"no summary line\n{out}"
    n, n_ok, n_failed = map(int, summary[0])
    assert n_failed == 0 and n_ok == n == len(cases) > 0, out
    failed = [c for c in cases if c[4] != "ok"]
    assert not failed, f"cases not ok: {failed}\n{out}"
    validation = [m.groups() for m in map(VALIDATION.match, lines) if m]
    assert validation and validation[0][0] == "ok" and int(validation[0][1]) >= 15, out
    by_case = {}
    for idx, mode, _, name, _, _ in cases:
        by_case.setdefault((int(idx), name), set()).add(mode)
    for key, modes in by_case.items():
        assert modes == MODES, f"case {key} ran in {sorted(modes)}, not in all of {sorted(MODES)}"
    if expect_cases is not None:
        assert sorted({c[0] for c in cases}) == sorted(expect_cases), out
    return cases, by_case


def test_pixel_gemm_under_cpu_emulator(toolchain, tmp_path):
    gxx, inc = toolchain
    exe = tmp_path / "gemm_emu"
    t0 = time.perf_counter()
    _compile([gxx, "-O2", "-std=c++20", "-pthread", "-Wno-unknown-pragmas", f"-I{inc}", str(DRIVER), "-o", str(exe)])
    t1 = time.perf_counter()
    r = _run([str(exe)], timeout=900)
    t2 = time.perf_counter()
    out = r.stdout + (f"\n[stderr]\n{r.stderr}" if r.stderr else "")
    print(f"emulator: compile {t1 - t0:.1f} s, run {t2 - t1:.1f} s\n{out}")
    assert r.returncode == 0, f"emulator exit status {r.returncode}\n{out}"
    cases, by_case = _check_output(r, out)
    assert len(by_case) >= 14, out
    assert {c[2] for c in cases} == {"early", "late"}, out
    copies = [int(re.search(r"cp\.async (\d+)", c[5]).group(1)) for c in cases]
    assert any(copies) and not all(copies), "both the cp.async and the element-wise loader must run"
    names = [name for _, name in by_case]
    missing = [what for what, pat in REQUIRED_CASES.items() if not any(re.search(pat, nm) for nm in names)]
    assert not missing, f"the emulator's cases no longer cover: {missing}\n{names}"


def test_pixel_gemm_under_cpu_emulator_threadsanitizer(toolchain, tmp_path):
    import pytest

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
    exe = tmp_path / "gemm_emu_tsan"
    _compile([gxx, *flags, "-Wno-unknown-pragmas", f"-I{inc}", str(DRIVER), "-o", str(exe)])
    r = _run([str(exe), *TSAN_CASES], timeout=900)
    out = r.stdout + (f"\n[stderr]\n{r.stderr[-20000:]}" if r.stderr else "")
    print(out)
    assert "WARNING: ThreadSanitizer" not in r.stderr, f"data race in the emulated kernel\n{out}"
    assert r.returncode == 0, f"emulator (TSan) exit status {r.returncode}\n{out}"
    _check_output(r, out, expect_cases=TSAN_CASES)
