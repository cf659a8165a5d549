"""Host-path time per call on the CPU: eager PyTorch vs resfuse, in one run.

    python bench/host_overhead.py [--repeats 9] [--calls 200] [--models] [--out FILE.md]

What it times (``torch.set_num_threads(1)``; tiny tensors, so the time is
Python and dispatch, not arithmetic; every table interleaves its variants
repeat by repeat and reports the median of the repeats with the spread
(min-max) in microseconds per call):

- the op: a conv -> BN -> ReLU (x 1x8x4x4, W 8x8x3x3) as eager functional
  calls, ``resfuse.conv_bn_act(backend="eager")``, ``torch.ops.resfuse``
  directly (the custom-op wrapper torch.compile and dispatch modes see),
  an ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)`` and the same after
  ``resfuse.convert(backend="eager")``, under no_grad and with grad
  enabled (eval without no_grad: the parameters require grad);
- modules, each against the module it replaces (``backend="eager"``, no
  grad): a BasicBlock with identity and a Bottleneck with a projection
  shortcut (tiny widths), a pre-activation BN -> ReLU -> Conv, HorNet's
  patchify stem and a HorBlock (gnconv + MLP);
- the GPU-launch proxy: each converted module on ``backend="triton"`` while
  ``kernels._common`` records launches instead of running them (the Python
  from the module's forward to each launcher's final kernel call, that
  call stubbed; checked to reach the expected number of launches), against
  the eager module's CPU host time (eager's CUDA host time cannot be timed
  here; its CPU time is the stand-in);
- with ``--models``: whole models (eval, no_grad, ``backend="auto"``: the
  CPU fallback, a product path too; run it without TRITON_INTERPRET), torchvision ResNet-18/50, VGG16-bn and
  HorNet-T (resfuse/hornet.py), at the demo's size (batch 2, 64x64) and at
  batch 1 and 8, 224x224; and the layout the CPU fallback keeps (an eager
  ResNet-18 on NCHW vs channels_last feature maps: why ``convert`` keeps
  the model's layout on a CPU).

A CPU timing says nothing about GPU kernels (GUIDE §4): these numbers are
the host cost a GPU call pays before its launch, and the CPU fallback's
speed.
"""

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import resfuse  # noqa: E402


def _per_call_us(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def interleaved(fns, repeats, calls):
    """{name: (median, min, max)} µs per call, the variants run in turn
    within each repeat (so drift hits all alike)."""
    for fn in fns.values():
        for _ in range(max(3, calls // 10)):
            fn()  # warm-up
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(_per_call_us(fn, calls))
    return {k: (statistics.median(v), min(v), max(v)) for k, v in samples.items()}


def _row(name, stats, ref=None):
    med, lo, hi = stats
    ratio = f"{med / ref:.2f}x" if ref else "1.00x"
    return f"| {name} | {med:.1f} | {lo:.1f}-{hi:.1f} | {ratio} |"


def op_rows(repeats, calls):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4)
    seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    seq[1].running_mean.uniform_(-1, 1)
    seq[1].running_var.uniform_(0.5, 2)
    conv, bn = seq[0], seq[1]
    fused = resfuse.convert(seq, backend="eager")
    w, m, v, g, b = conv.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias

    def eager_fn():
        return F.relu(F.batch_norm(F.conv2d(x, w, None, 1, 1), m, v, g, b, False, 0.0, 1e-5))

    fns = {
        "eager F.relu(F.batch_norm(F.conv2d(...)))": eager_fn,
        "resfuse.conv_bn_act(backend='eager')": lambda: resfuse.conv_bn_act(
            x, w, bn_mean=m, bn_var=v, bn_weight=g, bn_bias=b, padding=1, activation="relu", backend="eager"),
        "torch.ops.resfuse.conv_bn_act (direct)": lambda: torch.ops.resfuse.conv_bn_act(
            x, w, None, m, v, g, b, 1e-5, None, [1, 1], [1, 1], [1, 1], 1, "relu", "eager", 0.01),
        "nn.Sequential(Conv2d, BatchNorm2d, ReLU)": lambda: seq(x),
        "the Sequential after convert(backend='eager')": lambda: fused(x),
    }
    with torch.no_grad():
        res = interleaved(fns, repeats, calls)
    # eval without no_grad (parameters require grad): autograd records a graph on both sides
    res.update(interleaved({"nn.Sequential, grad enabled": lambda: seq(x),
                            "the converted Sequential, grad enabled": lambda: fused(x)}, repeats, calls))
    ref = res["eager F.relu(F.batch_norm(F.conv2d(...)))"][0]
    rows = [_row(k, s, ref) for k, s in res.items()]
    return rows, ref, fused, x


def _module_cases():
    """(name, eager module, converted module, input, launches per call on the Triton path)."""
    import torchvision
    from resfuse.hornet import HorBlock, HorLayerNorm
    from resfuse.models import randomize_bn
    torch.manual_seed(0)
    basic = torchvision.models.resnet.BasicBlock(8, 8)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    bottle = torchvision.models.resnet.Bottleneck(8, 4, 2, downsample=down)
    preact = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False))
    stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), HorLayerNorm(16, data_format="channels_first"))
    cases = [("BasicBlock 8ch, identity", basic, torch.randn(1, 8, 4, 4), 2),
             ("Bottleneck 8->16ch, projection", bottle, torch.randn(1, 8, 4, 4), 3),
             ("BN -> ReLU -> Conv (pre-activation)", preact, torch.randn(1, 8, 4, 4), 1),
             ("HorNet stem (patchify conv + LN)", stem, torch.randn(1, 3, 8, 8), 1),
             ("HorBlock 16ch (gnconv + MLP)", HorBlock(16), torch.randn(1, 16, 4, 4), 4)]
    out = []
    for name, m, x, launches in cases:
        m = randomize_bn(m).eval()
        out.append((name, m, resfuse.convert(m, backend="eager"), x, launches))
    return out


def module_rows(repeats, calls):
    """Each converted module vs the module it replaces (backend='eager')."""
    rows = []
    with torch.no_grad():
        for name, plain, fused, x, _ in _module_cases():
            res = interleaved({"eager": lambda: plain(x), "resfuse": lambda: fused(x)}, repeats, calls)
            rows.append(_pair_row(name, res["eager"], res["resfuse"]))
    return rows


def _pair_row(name, eager, fused):
    return (f"| {name} | {eager[0]:.1f} | {fused[0]:.1f} | {fused[1]:.1f}-{fused[2]:.1f} | "
            f"{fused[0] / eager[0]:.2f}x |")


def launch_proxy_rows(fused_eager, x, repeats, calls):
    """The converted modules on backend='triton' with each final kernel
    call stubbed (kernels._common's recorder takes the launches), against
    the eager module's CPU host time, measured in the same interleaved run."""
    from resfuse._backends import kernels_module
    try:
        common = kernels_module("_common")
        kernels_module("conv_bn_act")
    except Exception as e:  # no Triton here
        return [f"| GPU-launch proxy | n/a | | | ({type(e).__name__}: {e}) |"]
    seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    seq.load_state_dict(fused_eager.state_dict())
    cases = [("conv -> BN -> ReLU (Sequential)", seq, fused_eager, x, 1)] + _module_cases()
    sink = []
    rows = []
    common.start_recording(sink.append, 132)
    try:
        with torch.no_grad():
            for name, plain, fused, xin, launches in cases:
                fused = resfuse.convert(plain, backend="triton", channels_last_weights=True)

                def proxy(fused=fused, xin=xin, launches=launches):
                    fused(xin)
                    n = len(sink)
                    sink.clear()
                    if n != launches:  # the Triton path must have reached its launches (not fallen back)
                        raise RuntimeError(f"{name}: expected {launches} recorded launches per call, got {n}")

                res = interleaved({"eager": lambda plain=plain, xin=xin: plain(xin), "proxy": proxy}, repeats, calls)
                rows.append(_pair_row(name, res["eager"], res["proxy"]))
    finally:
        common.stop_recording()
    return rows


def model_rows(repeats, shapes):
    import torchvision
    from resfuse.hornet import hornet_t
    torch.manual_seed(0)
    models = {"resnet18": torchvision.models.resnet18(), "resnet50": torchvision.models.resnet50(),
              "vgg16_bn": torchvision.models.vgg16_bn(), "hornet_t": hornet_t()}
    rows = []
    for name, m in models.items():
        m.eval()
        c = resfuse.convert(m)  # backend 'auto': the CPU fallback as a user gets it
        for batch, size in shapes:
            x = torch.randn(batch, 3, size, size)
            calls = 1 if size >= 224 else 5
            with torch.no_grad():
                res = interleaved({"eager": lambda: m(x), "resfuse": lambda: c(x)}, repeats, calls)
            rows.append(f"| {name} {batch}x3x{size}x{size} | {res['eager'][0] / 1e3:.2f} | "
                        f"{res['resfuse'][0] / 1e3:.2f} | {res['resfuse'][1] / 1e3:.2f}-{res['resfuse'][2] / 1e3:.2f} | "
                        f"{res['eager'][0] / res['resfuse'][0]:.2f}x |")
    return rows


def layout_rows(repeats):
    """What channels_last weights (convert's layout for the kernels, on a
    CPU only with channels_last_weights=True) cost or save on the CPU
    fallback: an eager ResNet-18 on NCHW vs channels_last feature maps, and
    each model at the demo's size converted with them and with the default
    (speed = eager / resfuse)."""
    import torchvision
    from resfuse.hornet import hornet_t
    torch.manual_seed(0)
    m = torchvision.models.resnet18().eval()
    mc = copy.deepcopy(m).to(memory_format=torch.channels_last)
    eager_rows, convert_rows = [], []
    for batch, size in ((2, 64), (8, 224)):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            res = interleaved({"nchw": lambda: m(x), "cl": lambda: mc(x)}, repeats, 1 if size >= 224 else 5)
        eager_rows.append(f"| resnet18 {batch}x3x{size}x{size} | {res['nchw'][0] / 1e3:.2f} | "
                          f"{res['cl'][0] / 1e3:.2f} |")
    models = {"resnet18": m, "resnet50": torchvision.models.resnet50().eval(),
              "vgg16_bn": torchvision.models.vgg16_bn().eval(), "hornet_t": hornet_t().eval()}
    x = torch.randn(2, 3, 64, 64)
    for name, plain in models.items():
        cl = resfuse.convert(plain, channels_last_weights=True)
        kept = resfuse.convert(plain)  # the default on a CPU: the model's own strides
        with torch.no_grad():
            res = interleaved({"eager": lambda: plain(x), "cl": lambda: cl(x), "kept": lambda: kept(x)}, repeats, 5)
        e = res["eager"][0]
        convert_rows.append(f"| {name} 2x3x64x64 | {e / res['cl'][0]:.2f}x | {e / res['kept'][0]:.2f}x |")
    return eager_rows, convert_rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--models", action="store_true", help="also whole models (minutes)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.models and os.environ.get("TRITON_INTERPRET") == "1":
        p.error("--models times the CPU fallback of backend 'auto': run it without TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    lines = [f"# Host path per call, {datetime.date.today()} (CPU, 1 thread)", "",
             "CPU host-path measurements (Python and dispatch before a launch, and the CPU eager fallback), "
             "not GPU kernel speed.", "",
             f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, torch "
             f"{torch.__version__}; `python bench/host_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"median of {a.repeats} interleaved repeats of {a.calls} calls, spread min-max.", "",
             "| call | µs per call | spread | vs eager |", "|---|---|---|---|"]
    rows, eager_us, fused, x = op_rows(a.repeats, a.calls)
    lines += rows
    lines += ["", "Modules (backend='eager', no grad), each against the module it replaces; ratio = resfuse / eager:", "",
              "| module | eager µs | resfuse µs | spread | ratio |", "|---|---|---|---|---|"]
    lines += module_rows(a.repeats, a.calls)
    lines += ["", "GPU-launch proxy: converted module on backend='triton' up to its kernel calls (stubbed), "
              "vs the eager module's CPU host time; ratio = proxy / eager:", "",
              "| module | eager µs | proxy µs | spread | ratio |", "|---|---|---|---|---|"]
    lines += launch_proxy_rows(fused, x, a.repeats, a.calls)
    if a.models:
        reps = max(5, a.repeats // 2)
        lines += ["", "Whole models, eval, no_grad, backend='auto', the CPU fallback (ms per forward; speed = eager / resfuse):", "",
                  "| model, input | eager ms | resfuse ms | spread | speed |", "|---|---|---|---|---|"]
        lines += model_rows(reps, ((2, 64), (1, 224), (8, 224)))
        eager_rows, convert_rows = layout_rows(reps)
        lines += ["", "Eager ResNet-18 by feature-map layout (ms per forward):", "",
                  "| model, input | NCHW ms | channels_last ms |", "|---|---|---|"] + eager_rows
        lines += ["", "Converted at the demo's size, speed vs eager with channels_last_weights=True and with "
                  "convert's default on a CPU (the model's own strides):", "",
                  "| model, input | channels_last weights | model's own layout |", "|---|---|---|"] + convert_rows
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
