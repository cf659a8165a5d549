"""csrc/conv_bn_act.cu executed on the CPU (no GPU needed).

(a) The host self-test of the epilogue math (RESFUSE_CONV_BN_ACT_SELFTEST,
    csrc/README.md): activations, BN fold and epilogue combination against
    float64 formulas, NaN/Inf included.
(b) The whole kernel under the CPU emulator in tests/csrc_emu/ (emu.cpp's
    header says what it emulates and what it cannot catch): g++ compiles the
    unchanged .cu with its device primitives swapped for host ones, every
    CUDA thread a std::thread; the emulator runs shapes x {fp16, bf16, TF32,
    3xTF32} against a float64 reference and checks NaN-poisoned outputs,
    guard regions, out-of-range / misaligned reads and the cp.async pipeline.
    Every case must report ``ok``.
(c) A ThreadSanitizer build of the emulator on a few cases: every
    shared-memory access of the kernel checked against the happens-before
    order of the emulated barriers and cp.async groups (a missing
    __syncthreads or cp.async wait is reported even when the numbers come
    out right). Skipped, visibly, where g++ cannot build or run TSan.

Both need g++ and a CUDA toolkit's include dir (cuda_runtime.h's types);
tests/emulation.py finds them and skips, visibly, without them (a failure
under RESFUSE_BUILD_CUDA=1, as in CI).
"""

from emulation import MATH_MODES, ROOT, assert_covers, build_and_run, cases_of, compile_, cp_async_counts, run

KERNEL = ROOT / "csrc" / "conv_bn_act.cu"

# What the emulator's case list has to keep covering (regex on the case names it prints).
REQUIRED_CASES = {
    "C not a multiple of 8 (element-wise loads)": r"\bC=(19|3)\b",
    "odd K": r"\bK=(33|45)\b",
    "stride 2": r"\bs2\b",
    "dilation + padding": r"\bdil\(.*\bpad\(",
    "projection with Cs != C": r"\bproj Cs=",
    "projection + residual": r"\bproj\b.*\+ res\b",
    "several M tiles": r"\bM=(160|338)\b",
    "misaligned pointers": r"\bmisaligned\b",
    "NaN/Inf inputs": r"\bnonfinite\b",
    # every activation id the epilogue has, through the launch arguments (leaky_relu's slope too)
    **{f"activation {a}": rf"\b{a}$" for a in ("relu", "silu", "gelu", "relu6", "identity", "gelu_tanh",
                                                "leaky_relu", "hardsigmoid", "hardswish")},
}

# ThreadSanitizer run: projection (element-wise and cp.async loaders, one and nine reduction tiles),
# misaligned pointers (element-wise loads and stores, two output-channel tiles), cp.async with NaN/Inf inputs.
TSAN_CASES = ["2", "3", "4", "6"]



def test_epilogue_host_selftest(toolchain, tmp_path):
    gxx, inc = toolchain
    exe = tmp_path / "conv_bn_act_selftest"
    compile_([gxx, "-std=c++17", "-x", "c++", "-DRESFUSE_CONV_BN_ACT_SELFTEST", f"-I{inc}", str(KERNEL),
              "-o", str(exe)])
    r = run([str(exe)], timeout=120)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "conv_bn_act epilogue self-test: ok" in r.stdout, r.stdout


def test_kernel_under_cpu_emulator(toolchain, tmp_path):
    stdout, out = build_and_run(toolchain, "emu.cpp", tmp_path)
    cases, by_case = cases_of(stdout, out, MATH_MODES)
    # every case in all four math modes; both cp.async landing policies; both load paths
    assert len(by_case) >= 9, out
    assert {c["landing"] for c in cases} == {"early", "late"}, out
    copies = cp_async_counts(cases)
    assert any(copies) and not all(copies), "both the cp.async and the element-wise loader must run"
    assert_covers(by_case, REQUIRED_CASES)


def test_kernel_under_cpu_emulator_threadsanitizer(toolchain, tmp_path):
    stdout, out = build_and_run(toolchain, "emu.cpp", tmp_path, TSAN_CASES, tsan=True)
    cases_of(stdout, out, MATH_MODES, TSAN_CASES)
