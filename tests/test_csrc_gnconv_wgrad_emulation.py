"""csrc/gnconv_wgrad.cu (pixel_wgrad, layernorm_rows_backward) executed on the CPU (no GPU needed).

The emulator driver tests/csrc_emu/emu_wgrad.cpp compiles the unchanged .cu on the engine of
tests/csrc_emu/ (emu.cpp's header says what it emulates and what it cannot catch) and runs its cases
x {fp16, bf16, TF32, 3xTF32} against a float64 reference: NaN-prefilled outputs and workspace, guard
regions, out-of-range / misaligned reads, cp.async landing early or late. Every case must be ``ok``.
A ThreadSanitizer build runs two cases (the wgrad pipeline with its in-smem prologue pass, and the
LayerNorm backward's smem reductions). Toolchain discovery and skips as in test_csrc_emulation.py.
"""

from emulation import MATH_MODES, assert_covers, build_and_run, cases_of, cp_async_counts

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



def test_wgrad_kernels_under_cpu_emulator(toolchain, tmp_path):
    stdout, out = build_and_run(toolchain, "emu_wgrad.cpp", tmp_path, timeout=600)
    assert "validation: ok" in stdout.splitlines(), f"launcher validation failed\n{out}"
    cases, by_case = cases_of(stdout, out, MATH_MODES)
    assert {c["landing"] for c in cases} == {"early", "late"}, out
    wgrad_copies = cp_async_counts([c for c in cases if c["name"].startswith("wgrad")])
    assert any(wgrad_copies) and not all(wgrad_copies), "both the cp.async and the element-wise loader must run"
    assert_covers(by_case, REQUIRED_CASES)


def test_wgrad_kernels_under_cpu_emulator_threadsanitizer(toolchain, tmp_path):
    stdout, out = build_and_run(toolchain, "emu_wgrad.cpp", tmp_path, TSAN_CASES, tsan=True, timeout=600)
    cases_of(stdout, out, MATH_MODES, TSAN_CASES)
