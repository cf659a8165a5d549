"""``python -m resfuse demo``: convert a ResNet built in code, check every
fused layer and the whole model against eager and float64, and time it on
the device at hand."""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

from . import dispatch
from .convert import convert
from .explain import explain
from .models import randomize_bn, resnet18, resnet50, vgg16_bn_features
from .nn.conv_bn_act import FusedSequential
from .patterns import FusedGroup
from .reference import conv_bn_act_reference, to_float64

MODELS = {"resnet18": resnet18, "resnet50": resnet50, "vgg16_bn": lambda: vgg16_bn_features()}
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _groups(model):
    for prefix, m in model.named_modules():
        if isinstance(m, FusedSequential):
            for step in m.plan().steps:
                if isinstance(step, FusedGroup):
                    yield (f"{prefix}.{step.conv}" if prefix else step.conv), m, step


def layer_table(plain, fused, x, dtype):
    """Per fused layer: feed it the input the plain model's conv sees, and
    compare fused output and eager output against the float64 reference."""
    inputs = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, a, name=name: inputs.__setitem__(name, a[0].detach()))
             for name, mod in plain.named_modules() if isinstance(mod, nn.Conv2d)]
    with torch.no_grad():
        plain(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, seq, step in _groups(fused):
        conv, bn = seq._modules[step.conv], seq._modules[step.bn]
        xi = inputs[name]
        with torch.no_grad():
            y = seq._run_fused(step, xi)
            decision = seq.last_decisions[step.conv]
            args = dict(bn_mean=bn.running_mean, bn_var=bn.running_var, bn_weight=bn.weight, bn_bias=bn.bias)
            ref = conv_bn_act_reference(*to_float64(xi, conv.weight, conv.bias), *to_float64(*args.values()),
                                        bn.eps, None, conv.stride, conv.padding, conv.dilation, conv.groups,
                                        step.activation)
            eager = conv_bn_act_reference(xi, conv.weight, conv.bias, *args.values(), bn.eps, None,
                                          conv.stride, conv.padding, conv.dilation, conv.groups, step.activation)
        err, err_eager = rel_err(y, ref), rel_err(eager, ref)
        tol = max(2 * err_eager, FLOOR[dtype])
        rows.append((name, step.kind, decision.backend, err, err_eager, tol, err <= tol))
    return rows


def _time_pair(fns, device, reps):
    """Median ms of each callable, measured alternately so that load on the
    machine hits all of them alike."""
    times = [[] for _ in fns]
    for fn in fns:
        for _ in range(3):
            fn()
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                ts.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(ts) for ts in times]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resfuse demo", description=__doc__)
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: float16 on cuda, float32 on cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on cuda, 2 on cpu")
    ap.add_argument("--size", type=int, default=None, help="input H=W; default 224 on cuda, 64 on cpu")
    ap.add_argument("--backend", choices=dispatch.BACKENDS, default="auto")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    batch = args.batch or (32 if cuda else 2)
    size = args.size or (224 if cuda else 64)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(args.seed)

    plain = randomize_bn(MODELS[args.model](), seed=args.seed).eval().to(device, dtype)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    plain = plain.to(memory_format=fmt)
    fused = convert(plain, backend=args.backend)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)

    print(f"resfuse demo: {args.model}, batch {batch}, {size}x{size}, {dtype}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, backend {args.backend}"
          f"{', Triton interpreter' if interp else ''}; torch {torch.__version__}")
    print()
    print(explain(fused, x))
    print()

    rows = layer_table(plain, fused, x, dtype)
    print(f"{'layer':<28} {'fused as':<14} {'backend':<8} {'rel err':>9} {'eager err':>9} {'tol':>9}  ok")
    for name, kind, backend, err, err_eager, tol, ok in rows:
        print(f"{name:<28} {kind:<14} {backend:<8} {err:9.2e} {err_eager:9.2e} {tol:9.2e}  {'yes' if ok else 'NO'}")

    ref_model = copy.deepcopy(plain).to(torch.float64)
    with torch.no_grad():
        ref = ref_model(x.double())
        out_fused, out_eager = fused(x), plain(x)
    err, err_eager = rel_err(out_fused, ref), rel_err(out_eager, ref)
    tol = max(2 * err_eager, FLOOR[dtype])
    whole_ok = err <= tol
    print(f"\nwhole model vs float64: resfuse {err:.2e}, eager {err_eager:.2e}, tol {tol:.2e}: "
          f"{'ok' if whole_ok else 'FAIL'}")

    reps = 3 if interp else args.reps
    with torch.no_grad():
        t_eager, t_fused = _time_pair([lambda: plain(x), lambda: fused(x)], device, reps)
    print(f"\ntiming ({device}, median of {reps}): eager {t_eager:.3f} ms, resfuse {t_fused:.3f} ms, "
          f"ratio {t_eager / t_fused:.2f}x")
    if not cuda:
        print("note: CPU timings measure the eager/folded path (or the Triton interpreter); "
              "they are no evidence about the GPU kernels.")
    ok = whole_ok and all(r[-1] for r in rows)
    print("\nRESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
