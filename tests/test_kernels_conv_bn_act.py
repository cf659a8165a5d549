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
gen = torch.Generator().manual_seed(seed)
vals = torch.randn(1, C, H, W, generator=gen).half()
x = vals.to(device)
res_vals = torch.randn(1, K, H, W, generator=gen).half()
base = base.new_empty(stride_c * (K - 1) + H * W)
r = base.as_strided((1, K, H, W), (K * stride_c, stride_c, W, 1))
r.copy_(res_vals)
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
                          residual=r, activation="relu", backend="triton")
torch.save(dict(out=out.cpu(), x=vals, r=res_vals, w=w, mean=mean, var=var, int64=flags,
                backend=resfuse.last_decision().backend), path)
"""


def test_int64_offsets_beyond_2_31(device, tmp_path):
    """A real 64-bit case: the residual's channel stride is 2**30 + 64
    elements, so k * stride_k passes 2**31 at k = 2 (x itself reaches the
    kernel repacked channels_last, so its strides cannot be the big ones).
    The launcher must switch to 64-bit offsets by itself and every product
    must be 64-bit (in int32 they wrap: a segfault in the interpreter, a
    wild read on a GPU). The storage is 6 GiB of address space of which
    only the pages holding the residual's 80 values are touched. It runs in a child process, so
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
                                  bn_var=res["var"].double(), residual=res["r"].double(), **kw)
    eager = conv_bn_act_reference(res["x"], res["w"], bn_mean=res["mean"], bn_var=res["var"], residual=res["r"], **kw)
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


