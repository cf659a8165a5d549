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
RESFUSE_BUILD_CUDA=1): tests/emulation.py.
"""

import re

from emulation import MATH_MODES, assert_covers, build_and_run, cases_of, cp_async_counts

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


def _validation_ok(stdout, out):
    validation = [m.groups() for m in map(VALIDATION.match, stdout.splitlines()) if m]
    assert validation and validation[0][0] == "ok" and int(validation[0][1]) >= 15, out


def test_pixel_gemm_under_cpu_emulator(toolchain, tmp_path):
    stdout, out = build_and_run(toolchain, "emu_gemm.cpp", tmp_path)
    cases, by_case = cases_of(stdout, out, MATH_MODES)
    _validation_ok(stdout, out)
    assert len(by_case) >= 14, out
    assert {c["landing"] for c in cases} == {"early", "late"}, out
    copies = cp_async_counts(cases)
    assert any(copies) and not all(copies), "both the cp.async and the element-wise loader must run"
    assert_covers(by_case, REQUIRED_CASES)


def test_pixel_gemm_under_cpu_emulator_threadsanitizer(toolchain, tmp_path):
    stdout, out = build_and_run(toolchain, "emu_gemm.cpp", tmp_path, TSAN_CASES, tsan=True)
    cases_of(stdout, out, MATH_MODES, TSAN_CASES)
    _validation_ok(stdout, out)
