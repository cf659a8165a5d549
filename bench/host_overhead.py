"""Host-path time per call on the CPU: eager PyTorch vs resfuse, in one run.

    python bench/host_overhead.py [--repeats 9] [--calls 200] [--out FILE.md]

What it times (``torch.set_num_threads(1)``; tiny tensors, so the time is
Python and dispatch, not arithmetic; every row interleaves its A and B
variants repeat by repeat and reports the median of the repeats with the
spread (min-max) in microseconds per call):

- the op: a conv -> BN -> ReLU (x 1x8x4x4, W 8x8x3x3) as eager functional
  calls, ``resfuse.conv_bn_act(backend="eager")``, ``torch.ops.resfuse``
  directly, an ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)`` and the same
  after ``resfuse.convert(backend="eager")``;
- the GPU-launch proxy: the converted Sequential with ``backend="triton"``
  while ``kernels._common`` records launches instead of running them (the
  Python from the module's forward to the launcher's final kernel call,
  that call stubbed), against eager's CPU host time for the same op;
- whole models (eval, no_grad) at a small input: torchvision ResNet-18 and
  ResNet-50, VGG16-bn, HorNet-T (resfuse/hornet.py), eager vs converted
  (``backend="eager"``: the CPU fallback path, a product path too).

A CPU timing says nothing about GPU kernels (GUIDE §4): these numbers are
the host cost a GPU call pays before its launch.
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
    ref = res["eager F.relu(F.batch_norm(F.conv2d(...)))"][0]
    rows = [_row(k, s, ref) for k, s in res.items()]
    return rows, ref, fused, x


def launch_proxy_rows(fused_eager, x, eager_us, repeats, calls):
    """The converted module on backend='triton' with the final kernel call
    stubbed (kernels._common's recorder takes the launch)."""
    from resfuse._backends import kernels_module
    try:
        common = kernels_module("_common")
        kernels_module("conv_bn_act")
    except Exception as e:  # no Triton here
        return [f"| GPU-launch proxy | n/a | | ({type(e).__name__}: {e}) |"]
    fused = copy.deepcopy(fused_eager)
    fused.backend = "triton"
    sink = []

    def proxy():
        fused(x)
        n = len(sink)
        sink.clear()
        if n != 1:  # the Triton path must have reached its launch (not fallen back)
            raise RuntimeError(f"expected one recorded launch per call, got {n}")

    common.start_recording(sink.append, 132)
    try:
        with torch.no_grad():
            res = interleaved({"proxy": proxy}, repeats, calls)
    finally:
        common.stop_recording()
    return [_row("converted Sequential, backend='triton', up to the launch (stubbed)", res["proxy"], eager_us)]


def model_rows(repeats, batch, size):
    import torchvision
    from resfuse.hornet import hornet_t
    torch.manual_seed(0)
    models = {"resnet18": torchvision.models.resnet18(), "resnet50": torchvision.models.resnet50(),
              "vgg16_bn": torchvision.models.vgg16_bn(), "hornet_t": hornet_t()}
    rows = []
    for name, m in models.items():
        m.eval()
        c = resfuse.convert(m, backend="eager")
        x = torch.randn(batch, 3, size, size)
        calls = 3 if size >= 224 else 10
        with torch.no_grad():
            res = interleaved({"eager": lambda: m(x), "resfuse": lambda: c(x)}, repeats, calls)
        rows.append(f"| {name} {batch}x3x{size}x{size} | {res['eager'][0] / 1e3:.2f} | {res['resfuse'][0] / 1e3:.2f} | "
                    f"{res['eager'][0] / res['resfuse'][0]:.2f}x |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--models", action="store_true", help="also whole models (minutes)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = [f"# Host path per call, {datetime.date.today()} (CPU, 1 thread)", "",
             f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, torch "
             f"{torch.__version__}; `python bench/host_overhead.py {' '.join(argv or sys.argv[1:])}`; median of "
             f"{a.repeats} interleaved repeats of {a.calls} calls, spread min-max.", "",
             "| call | µs per call | spread | vs eager |", "|---|---|---|---|"]
    rows, eager_us, fused, x = op_rows(a.repeats, a.calls)
    lines += rows + launch_proxy_rows(fused, x, eager_us, a.repeats, a.calls)
    if a.models:
        lines += ["", f"Whole models, eval, no_grad, backend='eager' (ms per forward; speed = eager / resfuse):", "",
                  "| model, input | eager ms | resfuse ms | speed |", "|---|---|---|---|"]
        lines += model_rows(max(5, a.repeats // 2), a.batch, a.size)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
