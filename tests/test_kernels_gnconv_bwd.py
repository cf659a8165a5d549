"""The Triton kernels of gnconv's backward (kernels/gnconv_bwd.py):
``gnconv_chain_bwd`` (dpwa, da, the stage outputs x_i and the pws-output
grads dz_i) and ``dwconv_bwd`` (the depthwise conv's data, weight and bias
gradients), and the forward chain kernel's per-sample scale.

Every output is compared with float64 torch autograd of gnconv's chain
(the steps of resfuse.reference.gnconv_chain_reference, intermediates
kept) by the rule of GUIDE §3 (tests/numerics.py): tolerance = max(2x the
error of the same autograd run in the tested dtype, floor). Outputs and the
kernels' scratch start as NaN (conftest sets RESFUSE_POISON_OUTPUTS=1).
"""

import os
import subprocess
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from resfuse._backends import kernels_module
from resfuse.reference import gnconv_chain_reference, gnconv_dims

from numerics import assert_matches, poison

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kb():
    return kernels_module("gnconv_bwd")


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class Case:
    dim: int
    order: int
    N: int
    H: int
    W: int
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"   # nchw | cl (channels_last) | view (inputs and outputs: strided views of NaN buffers)
    s: float = 1.0 / 3.0
    ks: int = 7
    gates: bool = False    # a gflayer's output instead of the depthwise conv
    ls: bool = False       # layer scale (gamma1)
    ss: bool = False       # per-sample scale (drop path)
    bias: bool = True

    @property
    def name(self):
        parts = [f"d{self.dim}", f"o{self.order}", f"x{self.N}x{self.H}x{self.W}", DTYPE_NAMES[self.dtype],
                 self.layout, f"k{self.ks}"]
        parts += [n for n, on in (("gates", self.gates), ("ls", self.ls), ("ss", self.ss),
                                  ("nobias", not self.bias)) if on]
        return "-".join(parts)

    @property
    def dims(self):
        return gnconv_dims(self.dim, self.order)


def _nan_view(shape, dtype, device):
    """A channel- and column-strided view of a NaN buffer: a wrong stride
    reads or writes outside it."""
    n, c, h, w = shape
    big = torch.full((n, c + 3, h + 1, 2 * w), float("nan"), dtype=dtype, device=device)
    return big[:, 2:c + 2, 1:, ::2]


def _alloc(shape, case, device):
    """A NaN-filled output in the case's layout."""
    if case.layout == "view":
        return _nan_view(shape, case.dtype, device)
    t = torch.empty(shape, dtype=case.dtype, device=device)
    if case.layout == "cl":
        t = t.contiguous(memory_format=torch.channels_last)
    return poison(t)


def _place(t, case):
    """An input in the case's layout."""
    if case.layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if case.layout == "view":
        v = _nan_view(t.shape, t.dtype, t.device)
        v.copy_(t)
        return v
    return t


def make_inputs(case: Case, device, seed: int) -> dict:
    """Fresh random inputs with O(1) values at every stage."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def signed(n):
        return (torch.rand(n, generator=g) + 0.5) * torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0)

    D, N, H, W, dims = case.dim, case.N, case.H, case.W, case.dims
    S = sum(dims)
    b = (lambda n: randn(n, scale=0.5)) if case.bias else (lambda n: None)
    t = dict(
        f=randn(N, 2 * D, H, W),
        w_dw=None if case.gates else randn(S, 1, case.ks, case.ks, scale=1.0 / case.ks),
        b_dw=None if case.gates else b(S),
        gates=randn(N, S, H, W) if case.gates else None,
        w_pws=[randn(dims[i + 1], dims[i], 1, 1, scale=dims[i] ** -0.5) for i in range(case.order - 1)],
        b_pws=[b(dims[i + 1]) for i in range(case.order - 1)],
        w_out=randn(D, D, 1, 1, scale=D ** -0.5), b_out=b(D),
        layer_scale=signed(D) if case.ls else None,
        sample_scale=signed(N) if case.ss else None,
        dout=randn(N, D, H, W),
    )
    out = {}
    for k, v in t.items():
        if isinstance(v, list):
            out[k] = [None if z is None else z.to(device=device, dtype=case.dtype) for z in v]
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device=device, dtype=case.dtype)
            if k in ("f", "gates", "dout"):
                out[k] = _place(out[k], case)
        else:
            out[k] = v
    return out


def autograd_grads(t, case, to64=True):
    """gnconv's chain as gnconv_chain_reference writes it (+ the per-sample
    scale), run by torch autograd in float64 (the reference) or in the
    inputs' dtype (eager's own result); every quantity the kernels write."""
    def c(v):
        if v is None:
            return None
        v = v.detach()
        return v.double() if to64 else v.clone()

    dims, d0 = case.dims, case.dims[0]
    S = sum(dims)
    f = c(t["f"]).requires_grad_(True)
    pwa, abc = torch.split(f, (d0, S), dim=1)
    leaves = []
    if case.gates:
        a = c(t["gates"]).requires_grad_(True)
    else:
        w_dw = c(t["w_dw"]).requires_grad_(True)
        b_dw = c(t["b_dw"])
        leaves = [w_dw] + ([b_dw.requires_grad_(True)] if b_dw is not None else [])
        a = F.conv2d(abc, w_dw, b_dw, padding=case.ks // 2, groups=S)
    g = torch.split(a * case.s, dims, dim=1)
    zs, xs = [pwa], [pwa * g[0]]
    for i in range(case.order - 1):
        z = F.conv2d(xs[-1], c(t["w_pws"][i]), c(t["b_pws"][i]))
        zs.append(z)
        xs.append(z * g[i + 1])
    y = F.conv2d(xs[-1], c(t["w_out"]), c(t["b_out"]))
    if t["layer_scale"] is not None:
        y = c(t["layer_scale"])[:, None, None] * y
    if t["sample_scale"] is not None:
        y = y * c(t["sample_scale"])[:, None, None, None]
    grads = torch.autograd.grad(y, [f, a] + zs[1:] + leaves, grad_outputs=c(t["dout"]))
    d_f, d_a, dzs, dl = grads[0], grads[1], grads[2:2 + case.order - 1], grads[1 + case.order:]
    r = dict(y=y.detach(), d_pwa=d_f[:, :d0], d_abc=d_f[:, d0:], d_a=d_a, x_save=torch.cat(xs, 1).detach(),
             dz_save=torch.cat(dzs, 1) if dzs else None)
    if not case.gates:
        r["d_w"] = dl[0]
        r["d_b"] = dl[1] if len(dl) > 1 else None
    return r


def run_kernels(t, case, device, force_int64=False):
    """gnconv_chain_bwd into NaN outputs, then (without gates) dwconv_bwd
    into the rest of d_f; proves each launched once and that the chain
    kernel left d_f[:, d0:] alone."""
    kb = _kb()
    D, N, H, W, dims = case.dim, case.N, case.H, case.W, case.dims
    d0, S = dims[0], sum(dims)
    d_f = _alloc((N, 2 * D, H, W), case, device)
    d_a = _alloc((N, S, H, W), case, device)
    x_save = _alloc((N, S, H, W), case, device)
    dz_save = _alloc((N, S - d0, H, W), case, device) if case.order > 1 else None
    before = dict(kb.LAUNCHES_BY_KERNEL)
    kb.gnconv_chain_bwd(t["f"], t["w_dw"], t["b_dw"], t["gates"], t["w_pws"], t["b_pws"], t["w_out"], case.s,
                        t["dout"], t["layer_scale"], t["sample_scale"], d_f, d_a, x_save, dz_save,
                        allow_tf32=False, force_int64=force_int64)
    assert kb.LAUNCHES_BY_KERNEL["gnconv_chain_bwd"] == before["gnconv_chain_bwd"] + 1
    assert torch.isnan(d_f[:, d0:]).all(), f"{case.name}: the chain kernel wrote d_f's abc channels"
    out = dict(d_pwa=d_f[:, :d0], d_a=d_a, x_save=x_save, dz_save=dz_save)
    if not case.gates:
        d_w, d_b = kb.dwconv_bwd(d_a, t["f"][:, d0:], t["w_dw"], d_f[:, d0:], force_int64=force_int64)
        assert kb.LAUNCHES_BY_KERNEL["dwconv_bwd"] == before["dwconv_bwd"] + 1
        assert d_w.dtype == torch.float32 and d_w.shape == t["w_dw"].shape
        out.update(d_abc=d_f[:, d0:], d_w=d_w, d_b=d_b)
        if t["b_dw"] is None:
            out["d_b"] = None  # computed, but the reference has no bias to differentiate
    return out


def check_all(case, out, t, seed):
    ref, eager = autograd_grads(t, case), autograd_grads(t, case, to64=False)
    report = {}
    for k, v in out.items():
        if v is None or ref.get(k) is None:
            continue
        report[k] = assert_matches(v, ref[k], eager[k], case.dtype, f"{case.name} {k}", seed)
    print(case.name + ": " + ", ".join(f"{k} {e:.1e}/{tol:.1e}" for k, (e, tol) in report.items()))
    return report


# ----------------------------------------------------------------------------
# Numerics: orders 1..5 (d0 = 1 included), dims 8..32, odd H/W, a 3x3 image
# under a 7x7 (halo larger than the image), N 1..2, k 3/7, gates, layer and
# sample scale, NCHW / channels_last / strided views, fp32 / fp16 / bf16
# ----------------------------------------------------------------------------

MATRIX = [
    Case(8, 1, 1, 5, 7),                                                   # order 1: no dz_save
    Case(16, 2, 2, 5, 7, layout="cl", ls=True, ss=True),
    Case(32, 3, 1, 3, 3, torch.float16),                                   # 7x7 over a 3x3 image
    Case(16, 5, 1, 5, 7, layout="view", ls=True),                          # dims [1, 2, 4, 8, 16]
    Case(32, 4, 2, 3, 5, torch.float16, layout="cl", ks=3, ls=True, ss=True),
    Case(24, 3, 2, 5, 7, layout="view", gates=True, ss=True),             # dims [6, 12, 24], gflayer path
    Case(32, 5, 1, 3, 7, torch.float16, gates=True, ls=True),              # dims [2, 4, 8, 16, 32]
    Case(8, 2, 2, 7, 5, ks=3, s=-0.5, bias=False),
    # bf16: in the interpreter the kernels round to nearest with integer ops
    # (RNE_BF16: its own cast truncates) and run the GEMMs in fp32 (DOT_IN_FP32).
    Case(16, 3, 1, 5, 5, torch.bfloat16, ls=True),
]


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.name)
def test_backward_matches_autograd(case, device):
    s = seed_of(case.name)
    t = make_inputs(case, device, s)
    out = run_kernels(t, case, device)
    check_all(case, out, t, s)
    fmt = torch.channels_last if case.layout == "cl" else torch.contiguous_format
    if case.layout != "view":
        assert out["d_a"].is_contiguous(memory_format=fmt)  # the caller's buffers, written in place


def test_autograd_graph_is_the_reference(device):
    """The float64 graph the tests differentiate is gnconv_chain_reference."""
    for case in (Case(16, 3, 2, 5, 7, ls=True), Case(8, 2, 1, 3, 5, gates=True, bias=False)):
        t = make_inputs(case, device, seed_of(case.name))
        y = autograd_grads(t, case)["y"]
        d = lambda v: None if v is None else (v.double() if torch.is_tensor(v) else [None if z is None else
                                                                                     z.double() for z in v])
        ref = gnconv_chain_reference(d(t["f"]), d(t["w_dw"]), d(t["b_dw"]), d(t["gates"]), d(t["w_pws"]),
                                     d(t["b_pws"]), d(t["w_out"]), d(t["b_out"]), case.s, None,
                                     d(t["layer_scale"]))
        torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_int64_offsets(device):
    """The 64-bit addressing path of both kernels computes the same result."""
    case = Case(16, 3, 2, 3, 5, layout="cl", ls=True, ss=True, ks=3)
    s = seed_of(case.name + "int64")
    t = make_inputs(case, device, s)
    check_all(case, run_kernels(t, case, device, force_int64=True), t, s)


def test_nonfinite_propagates_as_eager(device):
    """A NaN in f and an Inf in dout spread through every gradient exactly
    where eager autograd spreads them (the 7x7 halo carries the NaN to the
    neighbours' gates; the GEMMs carry both across channels)."""
    case = Case(16, 3, 1, 7, 9, ks=3, ls=True)
    s = seed_of(case.name + "nonfinite")
    t = make_inputs(case, device, s)
    t["f"][0, 20, 1, 1] = float("nan")   # abc channel: the gates around (1, 1)
    t["dout"][0, 5, 5, 7] = float("inf")
    ref = autograd_grads(t, case)
    assert torch.isnan(ref["d_a"]).any() and not torch.isnan(ref["d_a"]).all()
    check_all(case, run_kernels(t, case, device), t, s)


# ----------------------------------------------------------------------------
# dwconv_bwd alone: random d_a, channel counts off the block, layouts, flags
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("C,N,H,W,ks,dtype,layout,need", [
    (21, 2, 5, 7, 7, torch.float32, "view", (True, True)),
    (40, 1, 3, 3, 7, torch.float16, "cl", (True, False)),
    (9, 2, 7, 5, 5, torch.float32, "nchw", (False, True)),
    (17, 1, 1, 4, 3, torch.float16, "nchw", (False, False)),
])
def test_dwconv_bwd_matches_autograd(C, N, H, W, ks, dtype, layout, need, device):
    name = f"dw-{C}-{N}x{H}x{W}-k{ks}-{DTYPE_NAMES[dtype]}-{layout}-{need}"
    seed = seed_of(name)
    g = torch.Generator().manual_seed(seed)
    case = Case(8, 1, N, H, W, dtype, layout)
    x = _place(torch.randn(N, C, H, W, generator=g).to(device, dtype), case)
    d_a = _place(torch.randn(N, C, H, W, generator=g).to(device, dtype), case)
    w = (torch.randn(C, 1, ks, ks, generator=g) / ks).to(device, dtype)
    d_x = _alloc((N, C, H, W), case, device)
    d_w, d_b = _kb().dwconv_bwd(d_a, x, w, d_x, need_weight_grad=need[0], need_bias_grad=need[1])
    assert (d_w is None) != need[0] and (d_b is None) != need[1]

    def grads(to64):
        c = (lambda v: v.detach().double()) if to64 else (lambda v: v.detach().clone())
        xx, ww = c(x).requires_grad_(True), c(w).requires_grad_(True)
        bb = torch.zeros(C, dtype=xx.dtype, device=device, requires_grad=True)
        y = F.conv2d(xx, ww, bb, padding=ks // 2, groups=C)
        return torch.autograd.grad(y, [xx, ww, bb], grad_outputs=c(d_a))

    ref, eager = grads(True), grads(False)
    report = [assert_matches(d_x, ref[0], eager[0], dtype, name + " d_x", seed)]
    if need[0]:
        report.append(assert_matches(d_w, ref[1], eager[1], dtype, name + " d_w", seed))
    if need[1]:
        report.append(assert_matches(d_b, ref[2], eager[2], dtype, name + " d_b", seed))
    print(name, ", ".join(f"{e:.1e}/{tol:.1e}" for e, tol in report))


# ----------------------------------------------------------------------------
# The forward chain kernel's per-sample scale
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_sample_scale(dtype, device):
    """out = residual + ss[n] * ls[c] * y through gnconv_chain_fwd."""
    case = Case(16, 3, 2, 5, 7, dtype, layout="cl", ls=True, ss=True)
    s = seed_of(case.name + "fwd")
    t = make_inputs(case, device, s)
    res = torch.randn(case.N, case.dim, case.H, case.W, generator=torch.Generator().manual_seed(s)).to(device, dtype)
    out = poison(torch.empty_like(res))
    kern = kernels_module("gnconv")
    before = kern.LAUNCHES_BY_KERNEL["gnconv_chain"]
    kern.gnconv_chain_fwd(t["f"], t["w_dw"], t["b_dw"], None, t["w_pws"], t["b_pws"], t["w_out"], t["b_out"],
                          case.s, res, t["layer_scale"], out, allow_tf32=False, sample_scale=t["sample_scale"])
    assert kern.LAUNCHES_BY_KERNEL["gnconv_chain"] == before + 1

    def eager(to64):
        c = (lambda v: None if v is None else v.double()) if to64 else (lambda v: v)
        y = gnconv_chain_reference(c(t["f"]), c(t["w_dw"]), c(t["b_dw"]), None, [c(w) for w in t["w_pws"]],
                                   [c(b) for b in t["b_pws"]], c(t["w_out"]), c(t["b_out"]), case.s, None,
                                   c(t["layer_scale"]))
        return c(res) + y * c(t["sample_scale"])[:, None, None, None]

    err, tol = assert_matches(out, eager(True), eager(False), dtype, case.name, s)
    print(f"{case.name}: fwd with sample scale {err:.1e}/{tol:.1e}")


# ----------------------------------------------------------------------------
# Launcher validation
# ----------------------------------------------------------------------------

def test_bad_input_clear_error():
    case = Case(16, 3, 1, 3, 5)
    t = make_inputs(case, "cpu", 1)
    kb = _kb()
    S, d0 = sum(case.dims), case.dims[0]
    bufs = lambda: (torch.empty(1, 32, 3, 5), torch.empty(1, S, 3, 5), torch.empty(1, S, 3, 5),
                    torch.empty(1, S - d0, 3, 5))
    args = (t["f"], t["w_dw"], t["b_dw"], None, t["w_pws"], t["b_pws"], t["w_out"], case.s, t["dout"], None, None)
    d_f, d_a, xs, dz = bufs()
    with pytest.raises(ValueError, match="dz_save is required"):
        kb.gnconv_chain_bwd(*args, d_f, d_a, xs, None, allow_tf32=False)
    with pytest.raises(ValueError, match="d_a has shape"):
        kb.gnconv_chain_bwd(*args, d_f, d_a[:, 1:], xs, dz, allow_tf32=False)
    with pytest.raises(ValueError, match="exactly one of w_dw and gates"):
        kb.gnconv_chain_bwd(t["f"], None, None, None, *args[4:], d_f, d_a, xs, dz, allow_tf32=False)
    with pytest.raises(TypeError, match="x_save has dtype"):
        kb.gnconv_chain_bwd(*args, d_f, d_a, xs.double(), dz, allow_tf32=False)
    with pytest.raises(ValueError, match="k odd"):
        kb.dwconv_bwd(d_a, d_a, torch.randn(S, 1, 4, 4), d_a.clone())


def test_autotune_pruning_keeps_configs():
    """The GPU-only pruners (checked here directly): small feature maps
    keep small pixel tiles, narrow channel counts narrow channel tiles."""
    kb = _kb()
    small = kb._chain_prune(kb._chain_bwd_configs(), {"M": 40}, D0=32, ORDER=5, KS=7)
    assert small and all(c.kwargs["BLOCK_M"] <= 32 for c in small)
    big = kb._chain_prune(kb._chain_bwd_configs(), {"M": 10 ** 7}, D0=1, ORDER=2, KS=7)
    assert len(big) == len(kb._chain_bwd_configs())
    narrow = kb._dwconv_bwd_prune(kb._dwconv_bwd_configs(), {"M": 10 ** 6, "C": 12}, KS=7)
    assert narrow and all(c.kwargs["BLOCK_C"] <= 16 for c in narrow)


# ----------------------------------------------------------------------------
# The kernels lower for sm_90 (no GPU needed)
# ----------------------------------------------------------------------------

_AOT = r"""
import os, sys, json
sys.path.insert(0, sys.argv[1])
import triton
try:
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
except ImportError as e:
    print(json.dumps({"skip": f"no AOT API: {e}"})); sys.exit(0)
from resfuse._backends import kernels_module
kb = kernels_module("gnconv_bwd")
out = []

def compile_(fn, consts, warps, stages, scalar_f32):
    sig = {n: ("constexpr" if n in consts else "*fp32" if n in ("pw_ptr", "pb_ptr") else
               "*fp16" if n.endswith("_ptr") else "fp32" if n == scalar_f32 else "i32") for n in fn.arg_names}
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "num_stages": stages})
    return ck.metadata.shared

for cfg in kb._chain_bwd_configs():
    consts = dict(D0=32, ORDER=5, KS=7, GATES_GIVEN=False, HAS_B_DW=True, PWS_BIAS=15, HAS_LS=True, HAS_SS=True,
                  INT64=False, DOT_IN_FP32=False, INPUT_PRECISION="ieee", RNE_BF16=False, **cfg.kwargs)
    out.append(("chain_bwd", cfg.kwargs, compile_(kb._gnconv_chain_bwd_kernel, consts, cfg.num_warps,
                                                  cfg.num_stages, "scale")))
for cfg in kb._dwconv_bwd_configs():
    consts = dict(KS=7, KKP=64, NEED_DW=True, NEED_DB=True, INT64=False, RNE_BF16=False, **cfg.kwargs)
    out.append(("dwconv_bwd", cfg.kwargs, compile_(kb._dwconv_bwd_kernel, consts, cfg.num_warps,
                                                   cfg.num_stages, None)))
print(json.dumps({"compiled": out}))
"""


def test_kernels_compile_for_sm90():
    """Every GPU autotune config of both backward kernels (chain: order 5,
    D = 512, every feature on; dwconv: 7x7 with both weight grads) compiles
    to sm_90 code within shared memory."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT, ROOT], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert len(res["compiled"]) == len(_kb()._chain_bwd_configs()) + len(_kb()._dwconv_bwd_configs())
    for name, cfg, shared in res["compiled"]:
        assert 0 < shared <= 227 * 1024, (name, cfg, shared)
