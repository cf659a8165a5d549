"""csrc/gnconv_dw.cu (dwconv_gate, dwconv_gate_backward) executed on the CPU (no GPU needed).

The emulator driver tests/csrc_emu/emu_dw.cpp compiles the unchanged .cu on the engine of
tests/csrc_emu/ (emu.cpp's header says what it emulates and what it cannot catch) and runs its cases
x {fp16, bf16, fp32}, forward and backward, against a float64 reference: NaN-prefilled outputs and
workspace, guard regions and ld gaps, out-of-range / misaligned reads, staggered warps (a missing
__syncthreads fails), plus the launchers' validation. Every case must be ``ok``. A ThreadSanitizer
build runs two cases (k = 7 vector path with several tiles per weight-gradient CTA, the generic-k
element-wise path). Toolchain discovery and skips: tests/emulation.py.
"""

import re

from emulation import assert_covers, build_and_run, cases_of

DTYPES = {"f16", "bf16", "f32"}

# What the driver's case list has to keep covering (regex on the case names it prints).
REQUIRED_CASES = {
    "k=7 channel slice, dim 16 order 3": r"^k7 slice d0=4 S=28\b.*n_pwa=d0",
    "k=7 channel slice, S multiple of 8 (vector loads)": r"^k7 slice d0=8 S=56 vec",
    "image smaller than the kernel": r"^k7 3x3 image N=3",
    "several tiles and ld > S": r"^k7 H=11 W=33 .*ld\+8 several tiles",
    "S not a multiple of 8 (element-wise)": r"\bS=13 elementwise",
    "k=3, n_pwa = 0": r"^k3 n_pwa=0",
    "k=1": r"^k1\b",
    "generic k with a smaller tile": r"^k11 tile 4x8",
    "large k (direct forward)": r"^k13 large",
    "k=31 (direct forward and weight gradient)": r"^k31 large",
    "gates given": r"^gates given S=24",
    "gates given, misaligned": r"^gates given .*misaligned",
    "pointers misaligned by one element": r"^k7 misaligned by one element",
    "NaN/Inf inputs": r"\bnonfinite\b",
    "backward with some outputs null": r"db null|db only|dabc only",
}
TSAN_CASES = ["1", "4"]



def test_dwconv_gate_under_cpu_emulator(toolchain, tmp_path):
    stdout, out = build_and_run(toolchain, "emu_dw.cpp", tmp_path, timeout=600)
    cases, by_case = cases_of(stdout, out, DTYPES)
    assert "validation: ok" in stdout, out
    assert len(by_case) >= 15, out
    assert_covers(by_case, REQUIRED_CASES)
    tps = [int(re.search(r"wgrad tiles/CTA (\d+)", c["info"]).group(1)) for c in cases]
    assert max(tps) > 1 and 1 in tps, "weight-gradient CTAs must run both one and several tiles"


def test_dwconv_gate_under_cpu_emulator_threadsanitizer(toolchain, tmp_path):
    stdout, out = build_and_run(toolchain, "emu_dw.cpp", tmp_path, TSAN_CASES, tsan=True, timeout=600)
    cases_of(stdout, out, DTYPES, TSAN_CASES)
