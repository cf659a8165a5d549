"""Launcher-level tests of kernels/conv_bn_act.py (``conv_bn_act_fwd``):
the flags it hands the kernel (INT64, INPUT_PRECISION, DOT_IN_FP32), 64-bit
offsets, and that it writes exactly its output and nothing else.

Same conventions as tests/test_ops.py: the ``device`` fixture, float64
reference, the GUIDE §3 rule, poisoned outputs, seeds in every message.
"""

import os
import subprocess
import sys

import pytest
import torch

from resfuse.activations import ACTIVATIONS
from resfuse.reference import conv_bn_act_reference, to_float64
from test_ops import Case, _kern, check, make_inputs, references, seed_of

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class KernelSpy:
    """Stands in for the autotuned kernel object: records the keyword
    arguments of every launch and forwards it."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getitem__(self, grid):
        launch = self.real[grid]

        def call(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)
        return call


# The launcher calls the plain kernel in the interpreter and the autotuned
# one on a GPU; the spy stands in for both (one list of calls).
_KERNEL_NAMES = ("_conv_bn_act_fwd_kernel", "_conv_bn_act_fwd_tuned")


@pytest.fixture
def spy(monkeypatch):
    kern = _kern()
    names = [n for n in _KERNEL_NAMES if hasattr(kern, n)]
    assert names, "the launcher's kernel objects were renamed: update _KERNEL_NAMES"
    calls = []
    for n in names:
        s = KernelSpy(getattr(kern, n))
        s.calls = calls
        monkeypatch.setattr(kern, n, s)
    return s


def poisoned_out(case: Case, x: torch.Tensor, memory_format=torch.contiguous_format):
    P, Q = case.out_hw
    out = torch.empty((case.N, case.K, P, Q), dtype=case.dtype, device=x.device, memory_format=memory_format)
    return out.fill_(float("nan"))


def launch(inp, case, out, **kw):
    kw.setdefault("allow_tf32", False)
    kern = _kern()
    before = kern.LAUNCHES
    res = kern.conv_bn_act_fwd(inp.x, inp.weight, inp.bias, inp.bn_mean, inp.bn_var, inp.bn_weight,
                               inp.bn_bias, case.eps, inp.residual, list(case.stride), list(case.padding),
                               list(case.dilation), ACTIVATIONS[case.act].triton_id, 0.01, out, **kw)
    assert res is out, "the launcher must return the buffer it was given"
    assert kern.LAUNCHES == before + 1
    return out


INT64_CASES = [
    Case(2, 5, 7, 7, 9, 3, 3, (2, 1), (1, 2), (1, 2), residual="strided", act="relu"),
    Case(1, 17, 33, 5, 7, 3, 3, (1, 1), (1, 1), (1, 1), residual="cl", act="silu", dtype=torch.float16,
         layout="cl"),
    Case(2, 3, 5, 6, 5, 5, 5, (1, 1), (2, 2), (1, 1), bn="gamma", residual="expand", act="gelu",
         dtype=torch.bfloat16, layout="view", strided_vecs=True),
]


@pytest.mark.parametrize("case", INT64_CASES, ids=lambda c: c.name)
def test_force_int64_same_answer(case, device, spy):
    """The 64-bit offset path (force_int64=True) gives the 32-bit path's
    answer, and both pass the rule."""
    seed = seed_of(case.name)
    inp = make_inputs(case, device, seed)
    ref64, eager = references(inp, case)
    out64 = launch(inp, case, poisoned_out(case, inp.x), force_int64=True)
    out32 = launch(inp, case, poisoned_out(case, inp.x), force_int64=False)
    assert [c["INT64"] for c in spy.calls] == [True, False]
    check(out64, ref64, eager, case.dtype, f"{case.name} INT64", seed)
    check(out32, ref64, eager, case.dtype, f"{case.name} INT32", seed)
    if INTERPRET:  # same arithmetic, same order: bit-identical
        assert torch.equal(out64, out32), f"{case.name}: INT64 and INT32 results differ (seed {seed})"


_BIG_OFFSET_CHILD = r"""
import sys
import torch
import resfuse
from resfuse._backends import kernels_module

device, path, seed = torch.device(sys.argv[1]), sys.argv[2], int(sys.argv[3])
C, H, W, K = 3, 4, 5, 4
stride_c = 2 ** 30 + 64
try:
    base = torch.empty(stride_c * (C - 1) + H * W, dtype=torch.float16, device=device)
except (RuntimeError, MemoryError) as e:  # no room for 4 GiB of address space
    print("SKIP", e)
    sys.exit(0)
x = base.as_strided((1, C, H, W), (C * stride_c, stride_c, W, 1))
gen = torch.Generator().manual_seed(seed)
vals = torch.randn(1, C, H, W, generator=gen).half()
x.copy_(vals)
w = (torch.randn(K, C, 3, 3, generator=gen) / 5).half()
mean = torch.randn(K, generator=gen).half()
var = (torch.rand(K, generator=gen) + 0.5).half()
kern = kernels_module("conv_bn_act")
flags = []

class Spy:
    def __init__(self, real):
        self.real = real

    def __getitem__(self, grid):
        def call(*a, **k):
            flags.append(k["INT64"])
            return self.real[grid](*a, **k)
        return call

for name in ("_conv_bn_act_fwd_kernel", "_conv_bn_act_fwd_tuned"):
    if hasattr(kern, name):
        setattr(kern, name, Spy(getattr(kern, name)))
out = resfuse.conv_bn_act(x, w.to(device), bn_mean=mean.to(device), bn_var=var.to(device), padding=1,
                          activation="relu", backend="triton")
torch.save(dict(out=out.cpu(), x=vals, w=w, mean=mean, var=var, int64=flags,
                backend=resfuse.last_decision().backend), path)
"""


def test_int64_offsets_beyond_2_31(device, tmp_path):
    """A real 64-bit case: x's channel stride is 2**30 + 64 elements, so
    c * stride_c passes 2**31 at c = 2. The launcher must switch to 64-bit
    offsets by itself and every product must be 64-bit (before the fix,
    c * stride_c wrapped in int32: a segfault in the interpreter, a wild
    read on a GPU). The storage is 4 GiB of address space of which only the
    pages holding x's 60 values are touched. It runs in a child process, so
    that a regression fails this test instead of killing the session."""
    seed = seed_of("int64 offsets beyond 2**31")
    path = tmp_path / "out.pt"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", _BIG_OFFSET_CHILD, str(device), str(path), str(seed)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"child died with {'signal ' + str(-proc.returncode) if proc.returncode < 0 else proc.returncode} "
        f"(seed {seed}):\n{proc.stderr[-3000:]}")
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    res = torch.load(path)
    assert res["backend"] == "triton" and res["int64"] == [True], res["int64"]
    kw = dict(padding=(1, 1), activation="relu")
    ref64 = conv_bn_act_reference(*to_float64(res["x"], res["w"]), bn_mean=res["mean"].double(),
                                  bn_var=res["var"].double(), **kw)
    eager = conv_bn_act_reference(res["x"], res["w"], bn_mean=res["mean"], bn_var=res["var"], **kw)
    check(res["out"], ref64, eager, torch.float16, "2**31 offsets", seed)


@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_input_precision_and_dot_flags(dtype, allow_tf32, device, spy):
    """tl.dot runs in TF32 only for fp32 with allow_tf32 on a GPU (the
    interpreter has no TF32); bf16 is widened to fp32 before tl.dot only in
    the interpreter (its bf16 dot is broken, GUIDE §3)."""
    case = Case(1, 3, 5, 5, 5, 3, 3, (1, 1), (1, 1), (1, 1), dtype=dtype, act="identity")
    seed = seed_of(case.name + str(allow_tf32))
    inp = make_inputs(case, device, seed)
    out = launch(inp, case, poisoned_out(case, inp.x), allow_tf32=allow_tf32)
    call = spy.calls[-1]
    tf32 = dtype == torch.float32 and allow_tf32 and not INTERPRET
    assert call["INPUT_PRECISION"] == ("tf32" if tf32 else "ieee")
    assert call["DOT_IN_FP32"] == (INTERPRET and dtype == torch.bfloat16)
    ref64, eager = references(inp, case)
    if tf32:  # TF32 (10-bit mantissa) cannot meet fp32's floor; bound it as TF32
        err = ((out.double() - ref64).norm() / ref64.norm()).item()
        assert err < 5e-3, f"tf32 error {err:.2e} (seed {seed})"
    else:
        check(out, ref64, eager, dtype, case.name, seed)


@pytest.mark.parametrize("x_layout,out_layout", [("nchw", "cl"), ("cl", "nchw"), ("view", "strided")])
def test_writes_exactly_its_output(x_layout, out_layout, device):
    """The launcher writes whatever layout `out` has, every element of it,
    and nothing outside it: `out` is a strided window into a buffer of
    sentinels that must survive the launch. K=33 and M not a multiple of
    the tile, so the masks of the edge tiles are exercised."""
    case = Case(2, 5, 33, 7, 5, 3, 3, (2, 1), (1, 1), (1, 1), residual="contig", act="silu", layout=x_layout)
    seed = seed_of(case.name + out_layout)
    inp = make_inputs(case, device, seed)
    P, Q = case.out_hw
    if out_layout == "strided":
        big = torch.full((case.N + 1, 2 * case.K + 1, P + 2, 2 * Q + 1), 1234.5, device=device)
        out = big[1:, 1::2, 1:P + 1, 1::2].fill_(float("nan"))
    else:
        fmt = torch.channels_last if out_layout == "cl" else torch.contiguous_format
        big = torch.full((case.N * case.K * P * Q + 64,), 1234.5, device=device)
        out = poisoned_out(case, inp.x, fmt)
        out = big[32:32 + out.numel()].as_strided(out.shape, out.stride()).fill_(float("nan"))
    launch(inp, case, out)
    ref64, eager = references(inp, case)
    check(out, ref64, eager, case.dtype, f"{case.name} into {out_layout} out", seed)
    outside = torch.ones_like(big, dtype=torch.bool)
    if out_layout == "strided":
        outside[1:, 1::2, 1:P + 1, 1::2] = False
    else:
        outside[32:32 + out.numel()] = False
    assert (big[outside] == 1234.5).all(), f"the kernel wrote outside its output (seed {seed})"


def test_empty_problem_launches_nothing(device):
    case = Case(1, 3, 4, 5, 5, 3, 3)
    inp = make_inputs(case, device, 0)
    inp.x = inp.x[:0]
    out = torch.empty((0, 4, 3, 3), device=device)
    kern = _kern()
    before = kern.LAUNCHES
    assert kern.conv_bn_act_fwd(inp.x, inp.weight, inp.bias, inp.bn_mean, inp.bn_var, inp.bn_weight,
                                inp.bn_bias, 1e-5, None, [1, 1], [0, 0], [1, 1], 1, 0.01, out,
                                allow_tf32=False) is out
    assert kern.LAUNCHES == before


def test_strided_bn_vectors_regression(device):
    """Bias and BN vectors that are stride-2 views of NaN-filled buffers
    (the kernel reads them at unit stride: before the fix, a stride-2 view
    read the NaN neighbours / the wrong channels)."""
    case = Case(2, 5, 7, 5, 5, 3, 3, (1, 1), (1, 1), (1, 1), residual="contig", act="relu", strided_vecs=True)
    seed = seed_of(case.name)
    inp = make_inputs(case, device, seed)
    assert inp.bn_mean.stride() == (2,)
    out = launch(inp, case, poisoned_out(case, inp.x))
    ref64, eager = references(inp, case)
    check(out, ref64, eager, case.dtype, case.name, seed)


TILE_CASES = [
    Case(2, 33, 40, 9, 11, 3, 3, (1, 1), (1, 1), (1, 1), residual="strided", act="relu"),
    Case(1, 17, 33, 7, 9, 1, 1, (1, 1), (0, 0), (1, 1), bias=False, bn="gamma", residual="contig", act="gelu",
         layout="cl"),
    Case(2, 20, 18, 6, 7, 3, 3, (2, 1), (1, 1), (2, 1), bn="none", residual="expand", act="relu6",
         dtype=torch.float16, layout="view"),
]


@pytest.mark.skipif(not INTERPRET, reason="RESFUSE_INTERPRET_BLOCKS only sets the interpreter's tiles")
@pytest.mark.parametrize("blocks", ["16,16,16", "64,16,32"])
@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: c.name)
def test_tile_boundaries(case, blocks, device, spy, monkeypatch):
    """Small tiles (RESFUSE_INTERPRET_BLOCKS) so that M, K and C all cross
    several tile boundaries with tails, and GROUP_M's swizzle has a partial
    last group (M = 198 -> 13 row tiles of 16 in groups of 4)."""
    monkeypatch.setenv("RESFUSE_INTERPRET_BLOCKS", blocks)
    seed = seed_of(case.name + blocks)
    inp = make_inputs(case, device, seed)
    out = launch(inp, case, poisoned_out(case, inp.x))
    bm, bn, bk = (int(v) for v in blocks.split(","))
    call = spy.calls[-1]
    assert (call["BLOCK_M"], call["BLOCK_N"], call["BLOCK_K"]) == (bm, bn, bk)
    ref64, eager = references(inp, case)
    check(out, ref64, eager, case.dtype, f"{case.name} blocks {blocks}", seed)


# The prologue (bn_act_conv) compiled for sm_90 with the specialization a
# channels_last bf16 launch gets (unit channel strides constant, other
# strides and pointers 16-divisible): what the interpreter cannot show.
_AOT_PROLOGUE = r"""
import json, os, re, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
try:
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
except ImportError as e:
    print(json.dumps({"skip": f"no AOT API: {e}"})); sys.exit(0)
from resfuse._backends import kernels_module
k = kernels_module("conv_bn_act")
CUOBJ = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
fn = k._conv_bn_act_fwd_kernel
F32 = {"mean_ptr", "var_ptr", "gamma_ptr", "beta_ptr", "mean_i_ptr", "var_i_ptr", "gamma_i_ptr", "beta_i_ptr",
       "bias_d_ptr", "mean_d_ptr", "var_d_ptr", "gamma_d_ptr", "beta_d_ptr"}
FLOATS = {"eps", "eps_d", "eps_i", "slope_i", "negative_slope"}
out = []
for pre, cfg in [(True, c) for c in k._prune_configs(k._configs(), dict(M=1 << 20, K=256, C=256), HAS_PRE=True)]:
    consts = dict(R=3, S=3, HAS_BIAS=False, HAS_BN=True, HAS_GAMMA=True, HAS_BETA=True, HAS_RES=False, ACT=1,
                  HAS_PROJ=False, HAS_PROJ_BIAS=False, HAS_PROJ_GAMMA=False, HAS_PROJ_BETA=False,
                  HAS_PRE=pre, PRE_ACT=1, HAS_PRE_GAMMA=True, HAS_PRE_BETA=True,
                  INT64=False, DOT_IN_FP32=False, INPUT_PRECISION="ieee", **cfg.kwargs)
    # channels_last x and weights: unit channel strides are constant (as the JIT specializes 1)
    consts.update(sx_c=1, sw_c=1, sy_c=1)
    sig = {n: ("constexpr" if n in consts else "*fp32" if n in F32 else "*bf16" if n.endswith("_ptr") else
               "fp32" if n in FLOATS else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (n.endswith("_ptr") or n in ("C", "K", "sx_n", "sx_h", "sx_w", "sw_k", "sw_r",
                                                                    "sw_s", "sy_n", "sy_h", "sy_w"))}
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    usage = ""
    sass = ""
    if os.path.exists(CUOBJ):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
            f.write(ck.asm["cubin"]); f.flush()
            r = subprocess.run([CUOBJ, "--dump-resource-usage", f.name], capture_output=True, text=True)
            usage = " ".join(re.findall(r"REG:\d+ STACK:\d+", r.stdout))
            sass = subprocess.run([CUOBJ, "-sass", f.name], capture_output=True, text=True).stdout
    ptx = ck.asm["ptx"]
    out.append(dict(pre=consts["HAS_PRE"], waits=sorted(set(re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx))), cfg=cfg.kwargs, warps=cfg.num_warps, shared=ck.metadata.shared, usage=usage,
                    hgmma="HGMMA" in sass, ldgsts128=sass.count("LDGSTS.E.BYPASS.128") + sass.count("LDGSTS.E.128"),
                    ldg16=sass.count("LDG.E.U16")))
print(json.dumps(out))
"""


def test_prologue_compiles_for_sm90_to_wgmma_with_async_loads():
    """Every autotune config the prune keeps for the conv kernel with the
    BN + ReLU prologue (3x3, BN + ReLU epilogue; a large problem, so only
    the prologue rule prunes) compiles to sm_90 code: wgmma (HGMMA) with 4+
    warps, 16-byte cp.async loads, no 2-byte loads, no spill stack, within 227 KB
    of shared memory. The tiles over 128 x 128 spill with the prologue
    and are pruned for it (checked here too)."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_PROLOGUE, ROOT], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if isinstance(res, dict) and "skip" in res:
        pytest.skip(res["skip"])
    k = _kern()
    big = dict(M=1 << 20, K=256, C=256)
    kept = k._prune_configs(k._configs(), big, HAS_PRE=True)
    assert len(res) == len(kept) >= 8
    assert len(k._prune_configs(k._configs(), big, HAS_PRE=False)) == len(k._configs())
    for row in res:
        print(row)
        # wgmma needs a warpgroup: the 2-warp configs compile to mma.sync, as without a prologue
        assert row["pre"] and row["hgmma"] == (row["warps"] >= 4), row
        assert row["ldgsts128"] > 0 and row["ldg16"] == 0, row
        assert 0 < row["shared"] <= 227 * 1024, row
        assert row["usage"] == "" or row["usage"].endswith("STACK:0"), row
