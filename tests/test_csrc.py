"""The CUDA C++ backend (csrc/, ``resfuse._C``, ops ``torch.ops.resfuse_cuda.*``).

On machines without a GPU (CI): the extension was built (setup.py builds
it when a CUDA toolkit and a CUDA build of torch are present, and CI makes
its absence an error with RESFUSE_BUILD_CUDA=1), its ops are registered
with their schemas for the CUDA dispatch key, its binary carries sm_80 and
sm_90 code whose SASS has tensor-core instructions and no local memory,
and the C++ validation rejects bad arguments with messages naming them
(CPU tensors reach the same entry point, which validates before it refuses
non-CUDA tensors). On a GPU (``gpu`` marker): the kernels against the
float64 reference by the rule of GUIDE §3, over the Triton tests' kind of
matrix, through ``resfuse.conv_bn_act(..., backend="cuda")``.
"""

import os
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

import resfuse
from resfuse._backends import cuda_extension
from resfuse.reference import conv_bn_act_reference, to_float64

from numerics import assert_matches

MUST_BE_BUILT = os.environ.get("RESFUSE_BUILD_CUDA") == "1"


@pytest.fixture(scope="module")
def ext():
    mod, why = cuda_extension()
    if mod is None:
        if MUST_BE_BUILT:
            pytest.fail(f"RESFUSE_BUILD_CUDA=1 but {why}")
        pytest.skip(f"{why} (no CUDA toolkit or CPU-only torch where it was installed)")
    return mod


def _cuobjdump():
    import triton
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return p if os.path.isfile(p) else None


# ----------------------------------------------------------------------------
# Built, registered, tensor cores, no spills (no GPU needed)
# ----------------------------------------------------------------------------

def test_ops_registered_for_cuda_with_schema(ext):
    assert {"conv_bn_act", "conv_bn_proj_act"} <= set(ext.OPS) and {"conv_bn_act", "conv_bn_proj_act"} <= set(
        ext.KERNEL_OPS), (ext.OPS, ext.KERNEL_OPS)
    schema = str(torch.ops.resfuse_cuda.conv_bn_act.default._schema)
    assert schema.startswith("resfuse_cuda::conv_bn_act(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_mean")
    assert "Tensor(a!) out) -> ()" in schema
    assert "Tensor xs, Tensor weight_d" in str(torch.ops.resfuse_cuda.conv_bn_proj_act.default._schema)
    for op in ext.KERNEL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resfuse_cuda::{op}", "CUDA"), op


def test_binary_has_sm80_sm90_tensor_core_code_without_spills(ext):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump in Triton's wheel")
    so = ext.__file__
    sass = subprocess.run([tool, "-sass", so], capture_output=True, text=True, check=True).stdout
    blocks = re.split(r"\n\s*code for (sm_\d+)", sass)
    by_arch = {}
    for arch, body in zip(blocks[1::2], blocks[2::2]):
        by_arch.setdefault(arch, []).append(body)
    assert {"sm_80", "sm_90"} <= set(by_arch), f"archs in the binary: {sorted(by_arch)}"
    for arch in ("sm_80", "sm_90"):
        code = "\n".join(by_arch[arch])
        funcs = re.findall(r"Function : (\S+)", code)
        assert any("resfuse" in f or "conv_bn" in f for f in funcs), (arch, funcs[:5])
        assert re.search(r"\bHMMA\.", code), f"{arch}: no tensor-core (HMMA) instruction in the SASS"
    res = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, check=True).stdout
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    assert usage, res[:2000]
    for func, reg, stack, shared, local in usage:
        assert int(local) == 0 and int(stack) == 0, f"{func}: STACK {stack} LOCAL {local} (spills)"


# ----------------------------------------------------------------------------
# Validation in C++ (CPU tensors reach the entry point, then are refused)
# ----------------------------------------------------------------------------

def _args(**change):
    g = torch.Generator().manual_seed(0)
    a = dict(x=torch.randn(2, 5, 7, 9, generator=g), weight=torch.randn(6, 5, 3, 3, generator=g),
             bias=torch.randn(6, generator=g), bn_mean=torch.randn(6, generator=g),
             bn_var=torch.rand(6, generator=g) + 0.5, bn_weight=torch.randn(6, generator=g),
             bn_bias=torch.randn(6, generator=g), eps=1e-5, residual=None, stride=[1, 1], padding=[1, 1],
             dilation=[1, 1], groups=1, activation=1, negative_slope=0.01, allow_tf32=True,
             out=torch.empty(2, 6, 7, 9))
    a.update(change)
    return a


def _call(a):
    return torch.ops.resfuse_cuda.conv_bn_act(
        a["x"], a["weight"], a["bias"], a["bn_mean"], a["bn_var"], a["bn_weight"], a["bn_bias"], a["eps"],
        a["residual"], a["stride"], a["padding"], a["dilation"], a["groups"], a["activation"], a["negative_slope"],
        a["allow_tf32"], a["out"])


BAD = [
    (dict(x=torch.randn(5, 7, 9)), r"x must be 4-D"),
    (dict(x=torch.randn(2, 5, 7, 9, dtype=torch.float64)), r"x must be float32, float16 or bfloat16"),
    (dict(weight=torch.randn(6, 5, 3, 3).half()), r"weight has dtype Half but x has Float"),
    (dict(weight=torch.randn(6, 4, 3, 3)), r"weight must have 5 input channels"),
    (dict(groups=5), r"groups must be 1"),
    (dict(stride=[0, 1]), r"stride must be >= 1"),
    (dict(stride=[1, 1, 1]), r"stride must have 2 elements"),
    (dict(padding=[-1, 0]), r"padding must be >= 0"),
    (dict(dilation=[1, 0]), r"dilation must be >= 1"),
    (dict(x=torch.randn(2, 5, 2, 9), padding=[0, 1]), r"smaller than the \(dilated\) kernel"),
    (dict(bias=torch.randn(7)), r"bias must have shape \(6\)"),
    (dict(bn_var=None), r"bn_mean and bn_var must be given together"),
    (dict(bn_weight=torch.randn(6, 1)), r"bn_weight must have shape \(6\)"),
    (dict(bn_mean=torch.arange(6)), r"bn_mean must be a floating-point tensor"),
    (dict(eps=-1.0), r"eps must be >= 0"),
    (dict(activation=9), r"activation must be 0..8"),
    (dict(negative_slope=float("nan")), r"negative_slope must be finite"),
    (dict(out=torch.empty(2, 6, 7, 8)), r"out must have shape \(2, 6, 7, 9\)"),
    (dict(out=torch.empty(2, 6, 7, 9).half()), r"out has dtype Half"),
    (dict(residual=torch.randn(2, 6, 7, 8)), r"residual must have the output's shape"),
    (dict(), r"x must be a CUDA tensor"),  # everything valid, but on the CPU
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_cpp_validation_names_the_argument(ext, change, message):
    with pytest.raises(RuntimeError, match=message):
        _call(_args(**change))


def test_cpp_validation_of_the_projection_form(ext):
    a = _args()
    xs = torch.randn(2, 4, 13, 17)
    wd = torch.randn(6, 4, 1, 1)
    vec = torch.rand(6) + 0.5

    def call(xs=xs, wd=wd, stride_d=(2, 2), bn_var_d=vec):
        torch.ops.resfuse_cuda.conv_bn_proj_act(
            a["x"], a["weight"], a["bias"], a["bn_mean"], a["bn_var"], None, None, 1e-5,
            xs, wd, None, vec, bn_var_d, None, None, 1e-5, list(stride_d), [1, 1], [1, 1], [1, 1], 1, 1, 0.01,
            True, a["out"])
    with pytest.raises(RuntimeError, match=r"weight_d must have shape \(6, 4, 1, 1\)"):
        call(wd=torch.randn(6, 3, 1, 1))
    with pytest.raises(RuntimeError, match=r"does not give the main branch's 7x9 output"):
        call(stride_d=(1, 1))
    with pytest.raises(RuntimeError, match=r"bn_var_d must have shape \(6\)"):
        call(bn_var_d=torch.rand(5))
    with pytest.raises(RuntimeError, match=r"x must be a CUDA tensor"):
        call()


def test_dispatch_says_why_cuda_cannot_run_cpu_tensors(ext):
    x = torch.randn(1, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(resfuse.BackendUnavailable, match="the CUDA kernels need CUDA tensors"):
        resfuse.conv_bn_act(x, w, padding=1, backend="cuda")
    resfuse.conv_bn_act(x, w, padding=1, backend="auto")
    assert "cuda" in resfuse.last_decision().skipped


# ----------------------------------------------------------------------------
# The kernels on a GPU
# ----------------------------------------------------------------------------

# (N, C, H, W, K, R, S, stride, padding, dilation, residual, activation)
GPU_CASES = [
    (1, 3, 9, 11, 8, 3, 3, 1, 1, 1, False, "relu"),
    (2, 19, 13, 10, 33, 3, 3, 2, 1, 1, True, "relu"),
    (1, 35, 7, 7, 17, 1, 1, 2, 0, 1, False, "identity"),
    (2, 64, 15, 15, 70, 3, 3, 1, 2, 2, True, "silu"),
    (1, 3, 33, 31, 16, 7, 7, 2, 3, 1, False, "relu6"),
    (3, 72, 5, 6, 130, 5, 5, 1, 2, 1, True, "gelu"),
    (1, 256, 14, 14, 64, 1, 1, 1, 0, 1, True, "relu"),
]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference_pair(x, w, b, m, v, g, beta, res, stride, pad, dil, act):
    ref = conv_bn_act_reference(*to_float64(x, w, b, m, v, g, beta), 1e-5, *to_float64(res),
                                stride=(stride, stride), padding=(pad, pad), dilation=(dil, dil), activation=act)
    eager = conv_bn_act_reference(x, w, b, m.to(x.dtype), v.to(x.dtype), g.to(x.dtype), beta.to(x.dtype), 1e-5,
                                  res, stride=(stride, stride), padding=(pad, pad), dilation=(dil, dil),
                                  activation=act)
    return ref, eager


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"case{i}" for i in range(len(GPU_CASES))])
def test_cuda_kernel_matches_reference(ext, case, layout, dtype, seed):
    N, C, H, W, K, R, S, stride, pad, dil, has_res, act = case
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g).to(dev, dtype)
    w = (torch.randn(K, C, R, S, generator=g) / (C * R * S) ** 0.5).to(dev, dtype)
    b = torch.randn(K, generator=g).to(dev, dtype)
    m, v = torch.randn(K, generator=g).to(dev), (torch.rand(K, generator=g) + 0.5).to(dev)
    gm, beta = torch.randn(K, generator=g).to(dev), torch.randn(K, generator=g).to(dev)
    P = (H + 2 * pad - dil * (R - 1) - 1) // stride + 1
    Q = (W + 2 * pad - dil * (S - 1) - 1) // stride + 1
    res = torch.randn(N, K, P, Q, generator=g).to(dev, dtype) if has_res else None
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    out = resfuse.conv_bn_act(x, w, b, bn_mean=m.to(dtype), bn_var=v.to(dtype), bn_weight=gm.to(dtype),
                              bn_bias=beta.to(dtype), eps=1e-5, residual=res, stride=stride, padding=pad,
                              dilation=dil, activation=act, backend="cuda")
    assert resfuse.last_decision().backend == "cuda"
    ref, eager = _reference_pair(x, w, b, m.to(dtype), v.to(dtype), gm.to(dtype), beta.to(dtype), res, stride,
                                 pad, dil, act)
    assert_matches(out, ref, eager, dtype, f"cuda {case} {layout}", seed)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["f32", "f16", "bf16"])
def test_cuda_projection_form_matches_reference(ext, dtype, seed):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(seed)
    N, C, H, W, K, Cs = 2, 24, 7, 9, 40, 20
    x = torch.randn(N, C, H, W, generator=g).to(dev, dtype)
    w = (torch.randn(K, C, 3, 3, generator=g) / (C * 9) ** 0.5).to(dev, dtype)
    xs = torch.randn(N, Cs, 13, 17, generator=g).to(dev, dtype)
    wd = (torch.randn(K, Cs, 1, 1, generator=g) / Cs ** 0.5).to(dev, dtype)
    vec = [torch.randn(K, generator=g).to(dev, dtype) for _ in range(6)]
    var, var_d = (torch.rand(K, generator=g) + 0.5).to(dev, dtype), (torch.rand(K, generator=g) + 0.5).to(dev, dtype)
    kw = dict(bn_mean=vec[0], bn_var=var, bn_weight=vec[1], bn_bias=vec[2], xs=xs, weight_d=wd, bn_mean_d=vec[3],
              bn_var_d=var_d, bn_weight_d=vec[4], bn_bias_d=vec[5], stride_d=2, padding=1)
    out = resfuse.conv_bn_proj_act(x, w, backend="cuda", **kw)
    assert resfuse.last_decision().backend == "cuda"
    ref = F.relu(F.batch_norm(F.conv2d(x.double(), w.double(), padding=1), vec[0].double(), var.double(),
                              vec[1].double(), vec[2].double(), eps=1e-5)
                 + F.batch_norm(F.conv2d(xs.double(), wd.double(), stride=2), vec[3].double(), var_d.double(),
                                vec[4].double(), vec[5].double(), eps=1e-5))
    eager = resfuse.conv_bn_proj_act(x, w, backend="eager", **kw)
    assert_matches(out, ref, eager, dtype, "cuda projection", seed)


@pytest.mark.gpu
def test_cuda_nan_propagates_and_empty_batch(ext):
    dev = torch.device("cuda")
    x = torch.randn(1, 8, 5, 5, device=dev)
    x[0, 3, 2, 2] = float("nan")
    w = torch.randn(16, 8, 3, 3, device=dev)
    out = resfuse.conv_bn_act(x, w, padding=1, activation="relu", backend="cuda")
    ref = F.relu(F.conv2d(x, w, padding=1))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    empty = resfuse.conv_bn_act(torch.randn(0, 8, 5, 5, device=dev), w, padding=1, backend="cuda")
    assert empty.shape == (0, 16, 5, 5)
