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

from . import dispatch
from .convert import convert
from .explain import explain
from .models import randomize_bn, resnet18, resnet50, vgg16_bn_features
from .nn.blocks import FusedResidualBlock
from .nn.conv_bn_act import FusedSequential
from .nn.stem import ConvBNHead
from .nn.conv_bn_act import FusedGroup
from .activations import negative_slope_of
from .explain import head_kind
from .reference import bn_act_conv_reference, conv_bn_act_reference, to_float64

MODELS = {"resnet18": resnet18, "resnet50": resnet50, "vgg16_bn": lambda: vgg16_bn_features()}
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _units(plain, fused):
    """(name, kind, input module name, fused fn, float64 reference fn, eager
    fn, decisions fn) for every fused unit: stem heads, residual blocks,
    Sequential groups."""
    plain_mods = dict(plain.named_modules())
    for name, m in fused.named_modules():
        if isinstance(m, ConvBNHead):
            # a prologue head reads what its input BN reads in the plain model
            src = next(n for n, b in fused.named_modules() if b is m.pre_bn) if m.pre_bn is not None else name
            yield (name, f"{head_kind(m)} ({m.label})", src, m, lambda x, m=m: _head_reference(m, x, True),
                   lambda x, m=m: _head_reference(m, x, False), lambda m=m: [m.__dict__.get("last_decision")])
        elif isinstance(m, FusedResidualBlock):
            original = plain_mods[name]
            kind = f"{m.spec.kind} block, {m.spec.shortcut} shortcut"
            yield (name, kind, name, m, lambda x, o=original: copy.deepcopy(o).double()(x.double()), original,
                   lambda m=m: list(m.last_decisions.values()))
        elif isinstance(m, FusedSequential):
            for step in m.plan().steps:
                if not isinstance(step, FusedGroup):
                    continue
                conv, bn = m._modules[step.conv], m._modules[step.bn]
                full = f"{name}.{step.conv}" if name else step.conv

                def run(x, m=m, step=step):
                    return m._run_fused(step, x)

                def ref(x, conv=conv, bn=bn, step=step):
                    return conv_bn_act_reference(*to_float64(x, conv.weight, conv.bias, bn.running_mean,
                                                             bn.running_var, bn.weight, bn.bias), bn.eps, None,
                                                 conv.stride, conv.padding, conv.dilation, conv.groups,
                                                 step.activation)

                def eager(x, conv=conv, bn=bn, step=step):
                    return conv_bn_act_reference(x, conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                 bn.weight, bn.bias, bn.eps, None, conv.stride, conv.padding,
                                                 conv.dilation, conv.groups, step.activation)
                yield full, step.kind, full, run, ref, eager, lambda m=m, c=step.conv: [m.last_decisions.get(c)]


def _head_reference(m: ConvBNHead, x, f64: bool):
    """What a ConvBNHead computes, as separate eager ops (in float64 with f64)."""
    cast = to_float64 if f64 else (lambda *ts: ts)
    pre, bn = m.pre_bn, m.fused_bn
    conv = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                activation=m.fused_activation if bn is not None else "identity",
                negative_slope=negative_slope_of(getattr(bn, "act", None)))
    if bn is not None:
        conv.update(zip(("bn_mean", "bn_var", "bn_weight", "bn_bias"),
                        cast(bn.running_mean, bn.running_var, bn.weight, bn.bias)), eps=bn.eps)
    w, b = cast(m.weight, m.bias)
    if pre is None:
        return conv_bn_act_reference(*cast(x), w, b, **conv)
    return bn_act_conv_reference(*cast(x, pre.running_mean, pre.running_var, pre.weight, pre.bias), pre.eps,
                                 m.pre_activation, w, b, in_negative_slope=negative_slope_of(m.__dict__["_pre_act"]),
                                 **conv)


def layer_table(plain, fused, x, dtype):
    """Per fused unit: feed it the input the plain model's module sees, and
    compare the fused output and eager's against the float64 reference."""
    units = list(_units(plain, fused))
    wanted = {u[2] for u in units}
    inputs = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, a, name=name: inputs.__setitem__(name, a[0].detach()))
             for name, mod in plain.named_modules() if name in wanted]
    with torch.no_grad():
        plain(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, kind, src, run, ref_fn, eager_fn, decisions in units:
        xi = inputs[src]
        with torch.no_grad():
            y, ref, eager = run(xi), ref_fn(xi), eager_fn(xi)
        backends = sorted({d.backend for d in decisions() if d is not None}) or ["-"]
        err, err_eager = rel_err(y, ref), rel_err(eager, ref)
        tol = max(2 * err_eager, FLOOR[dtype])
        rows.append((name, kind, "+".join(backends), err, err_eager, tol, err <= tol))
    return rows


def _time_pair(fns, device, reps, warmup=3):
    """Median ms of each callable, measured alternately so that load on the
    machine hits all of them alike."""
    times = [[] for _ in fns]
    for fn in fns:
        for _ in range(warmup):
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
          f"{', Triton interpreter' if interp else ''}\n  torch {torch.__version__}")
    print()
    print(explain(fused, x))
    print()

    rows = layer_table(plain, fused, x, dtype)
    wn = max([len("fused unit")] + [len(r[0]) for r in rows])
    wk = max([len("what")] + [len(r[1]) for r in rows])
    wb = max([len("backend")] + [len(r[2]) for r in rows])
    print(f"{'fused unit':<{wn}} {'what':<{wk}} {'backend':<{wb}} {'rel err':>9} {'eager err':>9} {'tol':>9}  ok")
    for name, kind, backend, err, err_eager, tol, ok in rows:
        print(f"{name:<{wn}} {kind:<{wk}} {backend:<{wb}} {err:9.2e} {err_eager:9.2e} {tol:9.2e}  "
              f"{'yes' if ok else 'NO'}")

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
        # the interpreter is seconds per pass and has nothing to warm up
        t_eager, t_fused = _time_pair([lambda: plain(x), lambda: fused(x)], device, reps,
                                      warmup=0 if interp else 3)
    print(f"\ntiming ({device}, median of {reps}): eager {t_eager:.3f} ms, resfuse {t_fused:.3f} ms, "
          f"ratio {t_eager / t_fused:.2f}x")
    if not cuda:
        print("note: CPU timings measure the eager/folded path (or the Triton interpreter);\n"
              "      they are no evidence about the GPU kernels.")
    ok = whole_ok and all(r[-1] for r in rows)
    print("\nRESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
