"""The CUDA C++ gnconv / HorBlock kernels (csrc/gnconv*.cu, csrc/bindings_gnconv.cpp) and the
``cuda`` backend that composes them (resfuse/ops/gnconv_cuda.py).

Without a GPU (CI): the ops are registered with their schemas for the CUDA
and CPU dispatch keys, the extension says it serves the gnconv ops, the C++
validation names the bad argument (CPU tensors reach the same entry point,
which validates everything and then refuses non-CUDA tensors), and the
dispatcher says why the cuda candidate cannot run CPU tensors. The kernels
themselves run on the CPU emulator (tests/test_csrc_gnconv_*_emulation.py).

On a GPU (``gpu`` marker): the Triton gnconv's forward matrix
(tests/test_gnconv.py::MATRIX) and its training matrix (gnconv, gflayer,
HorBlock: tests/test_gnconv_train.py) through ``backend="cuda"``, against
float64 with eager's own error as the yardstick (GUIDE §3), counting the
resfuse._C calls so that a silent fallback fails.
"""

from functools import partial

import pytest
import torch

import resfuse
from resfuse.ops import gnconv_cuda as ops_gnconv_cuda
from resfuse._backends import cuda_extension

from numerics import assert_matches
from test_csrc import ext  # noqa: F401  (fixture: resfuse._C, required under RESFUSE_BUILD_CUDA=1)

GNCONV_KERNEL_OPS = ("pixel_gemm", "pixel_wgrad", "layernorm_rows_backward", "dwconv_gate", "dwconv_gate_backward")
SERVED = ("layernorm_conv1x1", "gnconv_chain", "gelu_conv1x1", "layernorm_conv1x1_backward",
          "gnconv_chain_backward", "gelu_conv1x1_backward")


# ----------------------------------------------------------------------------
# Registration and schemas (no GPU needed)
# ----------------------------------------------------------------------------

def test_gnconv_ops_registered_with_schemas(ext):
    assert set(SERVED) <= set(ext.OPS), ext.OPS
    assert set(GNCONV_KERNEL_OPS) <= set(ext.KERNEL_OPS), ext.KERNEL_OPS
    for op in GNCONV_KERNEL_OPS:
        for key in ("CUDA", "CPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resfuse_cuda::{op}", key), (op, key)
    s = {op: str(getattr(torch.ops.resfuse_cuda, op).default._schema) for op in GNCONV_KERNEL_OPS}
    assert s["pixel_gemm"].startswith("resfuse_cuda::pixel_gemm(Tensor a, Tensor weight, Tensor? bias, int prologue")
    assert "Tensor(a!) out, Tensor(b!)? aux_out, Tensor? aux_mul) -> ()" in s["pixel_gemm"]
    assert "bool allow_tf32, Tensor(a!) dw, Tensor(b!)? db) -> ()" in s["pixel_wgrad"]
    assert "Tensor(a!) dx, Tensor(b!)? mean, Tensor(c!)? rstd, Tensor(d!)? dnw, Tensor(e!)? dnb)" in \
        s["layernorm_rows_backward"]
    assert "Tensor? gates, Tensor? pwa, float scale, Tensor(a!) out) -> ()" in s["dwconv_gate"]
    assert "Tensor(a!)? dabc, Tensor(b!)? dw_dw, Tensor(c!)? db_dw) -> ()" in s["dwconv_gate_backward"]


# ----------------------------------------------------------------------------
# C++ validation, exercised with CPU tensors
# ----------------------------------------------------------------------------

def _cl(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _gemm_args():
    return dict(a=_cl(2, 8, 3, 5), weight=torch.randn(6, 8), bias=torch.randn(6), prologue=0, norm_weight=None,
                norm_bias=None, eps=1e-6, mul=None, mul_gelu_grad=False, col_scale=None, row_scale=None,
                residual=None, allow_tf32=False, out=_cl(2, 6, 3, 5), aux_out=None, aux_mul=None)


def _wgrad_args():
    return dict(dy=_cl(2, 6, 3, 5), b=_cl(2, 8, 3, 5), prologue=0, mean=None, rstd=None, norm_weight=None,
                norm_bias=None, row_scale=None, allow_tf32=False, dw=torch.empty(6, 8), db=torch.empty(6))


def _ln_args():
    return dict(x=_cl(2, 8, 3, 5), dy=_cl(2, 8, 3, 5), norm_weight=torch.randn(8), eps=1e-6, dx=_cl(2, 8, 3, 5),
                mean=torch.empty(30), rstd=torch.empty(30), dnw=torch.empty(8), dnb=torch.empty(8))


def _dw_args():
    return dict(abc=_cl(2, 12, 3, 5), w_dw=torch.randn(12, 1, 7, 7), b_dw=torch.randn(12), gates=None,
                pwa=_cl(2, 4, 3, 5), scale=0.5, out=_cl(2, 12, 3, 5))


def _dwb_args():
    return dict(dg=_cl(2, 12, 3, 5), abc=_cl(2, 12, 3, 5), w_dw=torch.randn(12, 1, 7, 7), scale=0.5,
                dabc=_cl(2, 12, 3, 5), dw_dw=torch.empty(12, 1, 7, 7), db_dw=torch.empty(12))


_BUF = _cl(2, 16, 3, 5)
_SAME8, _SAME12, _SAME6 = _cl(2, 8, 3, 5), _cl(2, 12, 3, 5), _cl(2, 6, 3, 5)
_X8 = _cl(1, 8, 3, 5)
CASES = [
    # pixel_gemm
    ("pixel_gemm", {"a": torch.randn(8, 3, 5)}, r"a must be 4-D"),
    ("pixel_gemm", {"a": _cl(2, 8, 3, 5, dtype=torch.float64)}, r"a must be float32, float16 or bfloat16"),
    ("pixel_gemm", {"a": torch.randn(2, 8, 3, 5)}, r"a must be channels_last pixel rows"),
    ("pixel_gemm", {"weight": torch.randn(6, 7)}, r"weight must have shape \(6, 8\)"),
    ("pixel_gemm", {"weight": torch.randn(6, 8, dtype=torch.float16)}, r"weight has dtype"),
    ("pixel_gemm", {"out": _cl(2, 6, 3, 4)}, r"out must have a's N, H, W"),
    ("pixel_gemm", {"bias": torch.randn(5)}, r"bias must have shape \(6\)"),
    ("pixel_gemm", {"prologue": 3}, r"prologue must be 0 \(none\), 1 \(layernorm\) or 2 \(gelu\)"),
    ("pixel_gemm", {"norm_weight": torch.randn(8)}, r"without the layernorm prologue"),
    ("pixel_gemm", {"prologue": 1, "eps": -1.0}, r"eps must be >= 0"),
    ("pixel_gemm", {"prologue": 1, "norm_bias": torch.randn(7)}, r"norm_bias must have shape \(8\)"),
    ("pixel_gemm", {"mul_gelu_grad": True}, r"mul_gelu_grad needs mul"),
    ("pixel_gemm", {"mul": _cl(2, 5, 3, 5)}, r"mul must have 6 channels"),
    ("pixel_gemm", {"residual": _cl(2, 6, 3, 5, dtype=torch.float16)}, r"residual has dtype"),
    ("pixel_gemm", {"row_scale": torch.randn(3)}, r"row_scale must have shape \(2\)"),
    ("pixel_gemm", {"col_scale": torch.randn(8)}, r"col_scale must have shape \(6\)"),
    ("pixel_gemm", {"aux_mul": _cl(2, 6, 3, 5)}, r"aux_mul given without aux_out"),
    ("pixel_gemm", {"a": _BUF[:, 0:8], "out": _BUF[:, 4:10]}, r"out overlaps a|a overlaps out"),
    ("pixel_gemm", {"a": _BUF[:, 0:8], "weight": torch.randn(8, 8), "bias": None, "out": _BUF[:, 0:8]},
     r"a overlaps out: they must not share memory"),
    # channels 0-5 and 4-9 of the same rows: interleaved, overlapping in channels 4 and 5
    ("pixel_gemm", {"out": _BUF[:, 0:6], "mul": _BUF[:, 4:10]}, r"mul overlaps out without being the same view"),
    # image 1's channels 0-5 and image 0's 4-9: the same channels, other pixels: no overlap
    ("pixel_gemm", {"a": _X8, "out": _BUF[1:, 0:6], "mul": _BUF[:-1, 4:10], "row_scale": None},
     r"a must be a CUDA tensor"),
    ("pixel_gemm", {"residual": _SAME6, "out": _SAME6}, r"residual overlaps out"),
    ("pixel_gemm", {"aux_out": _SAME6, "out": _SAME6}, r"aux_out overlaps out"),
    ("pixel_gemm", {}, r"a must be a CUDA tensor"),
    ("pixel_gemm", {"mul": _SAME6, "out": _SAME6, "aux_out": _cl(2, 6, 3, 5)}, r"a must be a CUDA tensor"),
    ("pixel_gemm", {"a": _BUF[:, 0:8], "out": _BUF[:, 8:14], "mul": _BUF[:, 8:14]}, r"a must be a CUDA tensor"),
    ("pixel_gemm", {"prologue": 1, "norm_weight": torch.randn(8), "norm_bias": torch.randn(8)},
     r"a must be a CUDA tensor"),
    # pixel_wgrad
    ("pixel_wgrad", {"dw": torch.empty(6, 7)}, r"dw must have shape \[6, 8\]"),
    ("pixel_wgrad", {"dw": torch.empty(6, 8, dtype=torch.float16)}, r"dw must be float32"),
    ("pixel_wgrad", {"prologue": 1}, r"needs mean and rstd"),
    ("pixel_wgrad", {"mean": torch.empty(30)}, r"without the layernorm prologue"),
    ("pixel_wgrad", {"b": _cl(2, 8, 3, 4)}, r"b must have dy's N, H, W"),
    ("pixel_wgrad", {"b": _cl(2, 8, 3, 5, dtype=torch.float16)}, r"b has dtype"),
    ("pixel_wgrad", {"db": torch.empty(5)}, r"db must have shape \[6\]"),
    ("pixel_wgrad", {"prologue": 1, "mean": torch.empty(29), "rstd": torch.empty(30)}, r"mean must have shape \[30\]"),
    ("pixel_wgrad", {}, r"dy must be a CUDA tensor"),
    # layernorm_rows_backward
    ("layernorm_rows_backward", {"dy": _cl(2, 7, 3, 5)}, r"dy must have 8 channels"),
    ("layernorm_rows_backward", {"mean": torch.empty(31)}, r"mean must have shape \[30\]"),
    ("layernorm_rows_backward", {"eps": -1.0}, r"eps must be >= 0"),
    ("layernorm_rows_backward", {"dnw": torch.empty(8, dtype=torch.float16)}, r"dnw must be float32"),
    ("layernorm_rows_backward", {"dy": _SAME8, "dx": _SAME8}, r"dy overlaps dx"),
    ("layernorm_rows_backward", {}, r"x must be a CUDA tensor"),
    # dwconv_gate
    ("dwconv_gate", {"w_dw": torch.randn(12, 1, 6, 6)}, r"w_dw must be a depthwise weight \(12, 1, k, k\)"),
    ("dwconv_gate", {"gates": _cl(2, 12, 3, 5)}, r"exactly one of w_dw"),
    ("dwconv_gate", {"w_dw": None, "gates": _cl(2, 12, 3, 5)}, r"b_dw given with gates"),
    ("dwconv_gate", {"pwa": _cl(2, 13, 3, 5)}, r"pwa has 13 channels, more than abc's 12"),
    ("dwconv_gate", {"out": _cl(2, 11, 3, 5)}, r"out must have 12 channels"),
    ("dwconv_gate", {"b_dw": torch.randn(11)}, r"b_dw must have shape \(12\)"),
    ("dwconv_gate", {"abc": _SAME12, "out": _SAME12}, r"abc overlaps out"),
    ("dwconv_gate", {}, r"abc must be a CUDA tensor"),
    ("dwconv_gate", {"w_dw": None, "b_dw": None, "gates": _cl(2, 12, 3, 5), "pwa": None}, r"abc must be a CUDA"),
    # dwconv_gate_backward
    ("dwconv_gate_backward", {"dw_dw": torch.empty(12, 1, 5, 5)}, r"dw_dw must have shape \[12, 1, 7, 7\]"),
    ("dwconv_gate_backward", {"abc": _cl(2, 11, 3, 5)}, r"abc must have 12 channels"),
    ("dwconv_gate_backward", {"dg": torch.randn(2, 12, 3, 5)}, r"dg must be channels_last pixel rows"),
    ("dwconv_gate_backward", {"dg": _SAME12, "dabc": _SAME12}, r"dg overlaps dabc"),
    ("dwconv_gate_backward", {}, r"dg must be a CUDA tensor"),
]
_ARGS = {"pixel_gemm": _gemm_args, "pixel_wgrad": _wgrad_args, "layernorm_rows_backward": _ln_args,
         "dwconv_gate": _dw_args, "dwconv_gate_backward": _dwb_args}


@pytest.mark.parametrize("op,change,message", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_cpp_validation_names_the_argument(ext, op, change, message):
    kw = _ARGS[op]()
    kw.update(change)
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.resfuse_cuda, op)(**kw)


def test_dispatch_says_why_cuda_cannot_run_cpu_tensors(ext):
    x = torch.randn(1, 8, 3, 3)
    w = torch.randn(16, 8, 1, 1)
    with pytest.raises(resfuse.BackendUnavailable, match="CUDA tensors"):
        resfuse.layernorm_conv1x1(x, w, backend="cuda")
    with pytest.raises(resfuse.BackendUnavailable, match="CUDA tensors"):
        resfuse.gelu_conv1x1(x, w, backend="cuda")
    resfuse.layernorm_conv1x1(x.double(), w.double(), backend="auto")
    d = resfuse.last_decision()
    assert d.backend == "eager" and any("CUDA tensors" in r for r in d.skipped["cuda"]), d
    assert any("float64" in r for r in d.skipped["cuda"]), d


# ----------------------------------------------------------------------------
# On a GPU: the Triton gnconv's matrices through backend="cuda"
# ----------------------------------------------------------------------------

def _require_built():
    mod, why = cuda_extension()
    if mod is None:
        pytest.fail(f"resfuse._C is not built on this GPU machine: {why}")


def _grew(before):
    return {k: v - before.get(k, 0) for k, v in ops_gnconv_cuda.LAUNCHES.items() if v != before.get(k, 0)}


def _gnconv_matrix():
    from test_gnconv import MATRIX
    return MATRIX


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gnconv_matrix(), ids=lambda c: c.name)
def test_forward_matrix_through_cuda(case):
    from test_gnconv import make_inputs, reference, run_fused, seed_of, _t64
    _require_built()
    s = seed_of(case.name)
    t = make_inputs(case, torch.device("cuda"), s)
    before = dict(ops_gnconv_cuda.LAUNCHES)
    f, y = run_fused(t, case.s, backend="cuda", what=case.name)
    assert resfuse.last_decision().backend == "cuda"
    grew = _grew(before)
    assert grew == {"pixel_gemm": case.order + 1, "dwconv_gate": 1}, grew
    ref, eager = reference(t, case.s), reference(t, case.s, to64=False)
    assert_matches(y, ref, eager, case.dtype, case.name, s)
    fmt = torch.channels_last if case.layout == "cl" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and f.is_contiguous(memory_format=fmt)
    ref_f = resfuse.reference.layernorm_conv1x1_reference(_t64(t["x"]), _t64(t["w_in"]), _t64(t["b_in"]),
                                                          _t64(t["norm_weight"]), _t64(t["norm_bias"]), t["norm_eps"])
    eager_f = resfuse.reference.layernorm_conv1x1_reference(t["x"], t["w_in"], t["b_in"], t["norm_weight"],
                                                            t["norm_bias"], t["norm_eps"])
    assert_matches(f, ref_f, eager_f, case.dtype, case.name + " (projection)", s)


def _train_cases():
    from test_gnconv_train import GNCONV_CASES
    return GNCONV_CASES


@pytest.mark.gpu
@pytest.mark.parametrize("dim,order,N,H,W,dt,layout", _train_cases(),
                         ids=[f"d{c[0]}-o{c[1]}-{c[2]}x{c[3]}x{c[4]}-{c[5]}-{c[6]}" for c in _train_cases()])
def test_gnconv_gradients_through_cuda(dim, order, N, H, W, dt, layout):
    from seed_hornet import gnconv, randomize
    from test_gnconv_train import DT, check_training, seed_of
    _require_built()
    what = f"cuda gnconv d{dim} o{order} {N}x{H}x{W} {dt} {layout}"
    seed = seed_of(what)
    plain = randomize(gnconv(dim, order=order, s=1.0 / 3.0), seed)
    x = torch.randn(N, dim, H, W, generator=torch.Generator().manual_seed(seed))
    before = dict(ops_gnconv_cuda.LAUNCHES)
    fused, _ = check_training(plain, x, torch.device("cuda"), DT[dt], layout, what, seed, backend="cuda")
    assert {k: d.backend for k, d in fused.last_decisions.items()} == {"proj_in": "cuda", "chain": "cuda"}
    grew = _grew(before)
    # forward 1 + order GEMMs; backward: replay (order - 1), data gradients (order) and proj_in's dgrad
    assert grew == {"pixel_gemm": 3 * order + 1, "dwconv_gate": 2, "dwconv_gate_backward": 1,
                    "pixel_wgrad": order + 1}, grew


@pytest.mark.gpu
def test_gflayer_gradients_through_cuda():
    from seed_hornet import GlobalLocalFilter, gnconv, randomize
    from test_gnconv_train import check_training, seed_of
    _require_built()
    seed = seed_of("cuda gflayer")
    plain = randomize(gnconv(16, order=3, s=1.0 / 3.0, gflayer=GlobalLocalFilter, h=5, w=4), seed)
    x = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(seed))
    before = dict(ops_gnconv_cuda.LAUNCHES)
    check_training(plain, x, torch.device("cuda"), torch.float32, "nchw", "cuda gflayer gnconv", seed,
                   backend="cuda")
    grew = _grew(before)
    assert "dwconv_gate_backward" not in grew and grew["dwconv_gate"] == 2, grew


@pytest.mark.gpu
@pytest.mark.parametrize("dim,order,N,H,W,dt,layout", [(16, 2, 2, 5, 7, "f32", "nchw"), (16, 3, 1, 3, 5, "f16", "cl"),
                                                       (32, 5, 1, 3, 3, "f32", "cl"), (16, 3, 2, 5, 5, "bf16", "cl")])
def test_horblock_gradients_through_cuda(dim, order, N, H, W, dt, layout):
    from seed_hornet import HorBlock, gnconv, randomize
    from resfuse.nn.gnconv import FusedHorBlock
    from test_gnconv_train import DT, check_training, seed_of
    _require_built()
    what = f"cuda HorBlock d{dim} o{order} {N}x{H}x{W} {dt} {layout}"
    seed = seed_of(what)
    plain = randomize(HorBlock(dim, gnconv=partial(gnconv, order=order, s=1.0 / 3.0)), seed)
    x = torch.randn(N, dim, H, W, generator=torch.Generator().manual_seed(seed)) + 1.5  # LayerNorm offset
    before = dict(ops_gnconv_cuda.LAUNCHES)
    fused, _ = check_training(plain, x, torch.device("cuda"), DT[dt], layout, what, seed, backend="cuda")
    assert isinstance(fused, FusedHorBlock) and fused.unfused_reason() is None
    assert {k: d.backend for k, d in fused.last_decisions.items()} == dict.fromkeys(
        ("proj_in", "chain", "pwconv1", "pwconv2"), "cuda")
    grew = _grew(before)
    assert grew["layernorm_rows_backward"] == 2 and grew["dwconv_gate_backward"] == 1, grew
    assert grew["pixel_wgrad"] == order + 3, grew


@pytest.mark.gpu
def test_nonfinite_propagates_through_the_chain_as_eager():
    """As test_gnconv's: the LayerNorm spreads a NaN over its pixel, the 7x7
    halo to the neighbours; the cuda kernels must give eager's NaN pattern."""
    from test_gnconv import Case, make_inputs, reference, run_fused
    _require_built()
    case = Case(16, 3, 1, 9, 11, norm=True, res=True)
    t = make_inputs(case, torch.device("cuda"), 7)
    t["x"][0, 3, 2, 2] = float("nan")
    t["x"][0, 5, 6, 9] = float("inf")
    _, y = run_fused(t, case.s, backend="cuda")
    assert resfuse.last_decision().backend == "cuda"
    ref = reference(t, case.s)
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert_matches(y, ref, reference(t, case.s, to64=False), case.dtype, "nonfinite (cuda)")


@pytest.mark.gpu
def test_nonfinite_and_empty_batch_through_cuda():
    _require_built()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(7)
    x = torch.randn(2, 16, 5, 5, device=dev, generator=g)
    x[0, 3, 2, 2] = float("nan")
    x[1, 5, 0, 4] = float("inf")
    w = torch.randn(32, 16, 1, 1, device=dev, generator=g)
    nw, nb = torch.randn(16, device=dev, generator=g), torch.randn(16, device=dev, generator=g)
    got = resfuse.layernorm_conv1x1(x, w, norm_weight=nw, norm_bias=nb, norm_eps=1e-6, backend="cuda")
    want = resfuse.layernorm_conv1x1(x, w, norm_weight=nw, norm_bias=nb, norm_eps=1e-6, backend="eager")
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs from eager"
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    y = resfuse.gelu_conv1x1(x[:0], w, backend="cuda")
    assert y.shape == (0, 32, 5, 5)


# ----------------------------------------------------------------------------
# Byte model of the CUDA design (no GPU needed)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dim,order,H", [(64, 2, 56), (128, 3, 28), (256, 4, 14), (512, 5, 7), (16, 1, 5)])
def test_cuda_byte_model_matches_the_launches_it_makes(dim, order, H):
    """The CUDA forward is the stepwise fusion of the byte model (same bytes),
    and its launch counts are what the cuda backend calls: forward o + 2;
    training 4o + 6 (the GPU tests count the same calls per kernel)."""
    from bench.model.gnconv import gnconv_bytes, gnconv_train_bytes
    fwd = gnconv_train_bytes(dim, order, H, H, 8, "float16", train=False, design="cuda")
    sw = gnconv_bytes(dim, order, H, H, 8, "float16")
    assert fwd.fused_bytes == sw.stepwise_bytes, (fwd.fused_bytes, sw.stepwise_bytes)
    assert fwd.fused_launches == sw.stepwise_launches == order + 2
    train = gnconv_train_bytes(dim, order, H, H, 8, "float16", design="cuda")
    assert train.fused_launches == 4 * order + 6
    triton = gnconv_train_bytes(dim, order, H, H, 8, "float16")
    assert triton.fused_bytes < train.fused_bytes < train.eager_bytes


@pytest.mark.gpu
def test_empty_batch_training_step_through_cuda():
    """N = 0: the weight gradients are empty sums, zeros as in eager (the
    kernels launch nothing; the binding writes the zeros)."""
    from seed_hornet import HorBlock, gnconv, randomize
    _require_built()
    block = randomize(HorBlock(16, gnconv=partial(gnconv, order=3, s=1.0 / 3.0)), 3).cuda()
    fused = resfuse.convert(block, backend="cuda")
    x = torch.randn(0, 16, 5, 5, device="cuda", requires_grad=True)
    fused(x).sum().backward()
    for name, p in fused.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
