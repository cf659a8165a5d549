"""A few tiny fused calls for ``compute-sanitizer --tool memcheck``.

    compute-sanitizer --tool memcheck --error-exitcode 99 python bench/sanitizer_case.py
    compute-sanitizer --tool racecheck --error-exitcode 99 python bench/sanitizer_case.py --backends cuda

Awkward shapes (odd sizes, stride 2, channels not a multiple of any
block, N=1, a residual, NCHW and channels_last) through every resfuse
backend that can run on CUDA here; each output is compared with the
float64 reference so the run also fails on a wrong result. Then a HorBlock
(gnconv orders 2 and 5, odd H/W, NCHW and channels_last) forward and
backward on each backend, output and input gradient against float64
autograd: every gnconv kernel (forward, data and weight gradients, the
depthwise backward, the LayerNorm backward) runs under the tool (on cuda
by default; ``--horblock cuda,triton`` adds the Triton kernels). The Triton
autotuner benchmarks every config on the first call of each shape, so every
tile config is launched under memcheck too. ``--check`` validates the
script without a GPU: CPU tensors through the eager path, and through the
Triton interpreter as well when TRITON_INTERPRET=1.
"""

import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# (N, C, H, W, K, R, S, stride, padding, residual, channels_last)
SHAPES = [
    (1, 5, 9, 11, 7, 3, 3, 1, 1, True, True),
    (2, 19, 13, 10, 33, 3, 3, 2, 1, False, False),
    (1, 35, 7, 7, 17, 1, 1, 2, 0, False, True),
]
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def load_numerics():
    spec = importlib.util.spec_from_file_location("resfuse_tests_numerics", os.path.join(ROOT, "tests", "numerics.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_args(shape, device, dtype, gen):
    N, C, H, W, K, R, S, stride, padding, has_res, cl = shape
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(N, C, H, W, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    w = (torch.randn(K, C, R, S, generator=gen) * (C * R * S) ** -0.5).to(device, dtype)
    vec = [torch.randn(K, generator=gen) * 0.1, torch.rand(K, generator=gen) + 0.5,
           torch.rand(K, generator=gen) + 0.5, torch.randn(K, generator=gen) * 0.1]
    mean, var, gamma, beta = (v.to(device, dtype) for v in vec)
    P, Q = (H + 2 * padding - R) // stride + 1, (W + 2 * padding - S) // stride + 1
    res = torch.randn(N, K, P, Q, generator=gen).to(device, dtype).contiguous(memory_format=fmt) if has_res else None
    return dict(x=x, weight=w, bn_mean=mean, bn_var=var, bn_weight=gamma, bn_bias=beta, residual=res,
                stride=stride, padding=padding)


# (dim, order, N, H, W, channels_last)
HORBLOCK_SHAPES = [(16, 2, 1, 5, 7, False), (32, 5, 2, 3, 5, True)]


def horblock_cases(device, backends, numerics):
    """(calls, failures): HorBlock forward + backward per backend and dtype."""
    import copy

    import resfuse
    from bench.models import make_horblock
    failures, ran = [], 0
    for dim, order, N, H, W, cl in HORBLOCK_SHAPES:
        plain = make_horblock(dim, order, s=1.0 / 3.0, seed=dim + order).train()
        gen = torch.Generator().manual_seed(dim * order)
        x0 = torch.randn(N, dim, H, W, generator=gen) + 1.0
        g0 = torch.randn(N, dim, H, W, generator=gen)

        def run(module, dtype):
            m = copy.deepcopy(module).to(device=device, dtype=dtype)
            x = x0.to(device, dtype)
            if cl:
                m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            y = m(x)
            y.backward(g0.to(device, dtype))
            return y.detach(), x.grad
        y64, dx64 = run(plain, torch.float64)
        for dtype in DTYPES:
            ye, dxe = run(plain, dtype)
            for backend in backends:
                try:
                    fused = resfuse.convert(copy.deepcopy(plain), backend=backend)
                    y, dx = run(fused, dtype)
                except resfuse.BackendUnavailable as e:
                    print(f"skip {backend}: {'; '.join(e.reasons)}")
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ran += 1
                bad = []
                for what, got, ref, eager in (("y", y, y64, ye), ("dx", dx, dx64, dxe)):
                    err, tol = numerics.rel_err(got, ref), numerics.tolerance(eager, ref, dtype)
                    if not err <= tol:
                        bad.append(f"{what} {err:.2e} > {tol:.2e}")
                status = "ok" if not bad else "WRONG " + ", ".join(bad)
                print(f"{backend:6s} {str(dtype):15s} HorBlock d{dim} o{order} {N}x{H}x{W}: fwd+bwd {status}")
                if bad:
                    failures.append((backend, dtype, "horblock", dim, order))
    return ran, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="run on CPU through the eager path only (no GPU needed)")
    ap.add_argument("--backends", default="triton,cuda",
                    help="GPU backends to run (comma-separated; racecheck runs the CUDA kernels only)")
    ap.add_argument("--horblock", default="cuda",
                    help="backends of the HorBlock forward+backward case (default cuda: the Triton ones autotune "
                         "every config under the tool, minutes; name triton to include them)")
    args = ap.parse_args(argv)
    import resfuse
    from resfuse.reference import conv_bn_act_reference, to_float64
    numerics = load_numerics()
    device = torch.device("cpu" if args.check else "cuda")
    if args.check:  # the Triton kernels too when the interpreter is on
        backends = ["eager"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    else:
        backends = [b for b in args.backends.split(",") if b]
    gen = torch.Generator().manual_seed(0)
    failures, ran = [], 0
    for shape in SHAPES:
        for dtype in DTYPES:
            a = make_args(shape, device, dtype, gen)
            t = to_float64(a["x"], a["weight"], a["bn_mean"], a["bn_var"], a["bn_weight"], a["bn_bias"], a["residual"])
            ref = conv_bn_act_reference(t[0], t[1], None, *t[2:6], 1e-5, t[6], (a["stride"],) * 2,
                                        (a["padding"],) * 2, (1, 1), 1, "relu")
            eager = resfuse.conv_bn_act(**a, activation="relu", backend="eager")
            tol = numerics.tolerance(eager, ref, dtype)
            for backend in backends:
                try:
                    out = resfuse.conv_bn_act(**a, activation="relu", backend=backend)
                except resfuse.BackendUnavailable as e:
                    print(f"skip {backend}: {'; '.join(e.reasons)}")
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize()
                err = numerics.rel_err(out, ref)
                ran += 1
                status = "ok" if err <= tol else "WRONG"
                print(f"{backend:6s} {str(dtype):15s} {shape}: rel err {err:.2e} (tol {tol:.2e}) {status}")
                if status != "ok":
                    failures.append((backend, dtype, shape))
    hb = [b for b in backends if b in args.horblock.split(",") or b == "eager"]
    r, f = horblock_cases(device, hb, numerics)
    ran, failures = ran + r, failures + f
    print(f"{ran} fused calls, {len(failures)} wrong")
    if ran == 0:
        print("no backend could run: nothing was checked")
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
