"""What ``resfuse.convert`` fuses in torchvision and timm CNNs, counted
from what the converted model still does, not from what ``explain`` says.

    python bench/recognition_sweep.py [--size 96] [--backend eager] [--models a,b,...]

Each model is built with random weights (no downloads) and randomised
BatchNorm statistics, in eval mode, converted, and run on one
1 x 3 x size x size input. Columns:

- ``BN calls``: ``torch.nn.functional.batch_norm`` calls in one forward
  (a TorchFunctionMode counts them), original -> converted. A BatchNorm
  folded into a fused conv is not called; one left unfused is. This is
  the independent observation; ``fused/convs`` is explain's count.
- ``err`` / ``tol``: the converted model against a float64 copy, and the
  rule of GUIDE section 3 (max(2 x eager's own error, 1e-5)).
- ``left``: explain's most common reason for the convs it did not fuse.

Recognition does not depend on the backend; ``eager`` keeps it fast on a
CPU. The CPU timings this prints nothing about: no timing is taken.
"""

import argparse
import copy
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the checkout's resfuse, as bench/run.py does
    sys.path.insert(0, ROOT)

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "mobilenet_v2",
               "mobilenet_v3_large", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x1_0", "mnasnet1_0",
               "googlenet", "densenet121", "efficientnet_b0"]
TIMM = ["resnet50d", "resnet26t", "seresnet50", "resnext26ts", "regnety_002", "cspresnet50", "repvgg_a2",
        "vovnet39a", "darknet53", "cspdarknet53", "rexnet_100", "dla34", "dpn68", "hrnet_w18_small",
        "efficientnet_b0", "mobilenetv3_large_100"]
DEFAULT = [f"tv:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]


class CountBatchNorm(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def build(spec: str) -> torch.nn.Module:
    """``tv:<name>`` (torchvision) or ``timm:<name>``, random weights."""
    lib, name = spec.split(":", 1)
    if lib == "tv":
        import torchvision
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, **kw)
    import timm
    return timm.create_model(name, pretrained=False)


def randomize_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def bn_calls(model, x) -> int:
    mode = CountBatchNorm()
    with mode, torch.no_grad():
        model(x)
    return mode.calls


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@dataclass
class Row:
    model: str
    bn_before: int
    bn_after: int
    fused: int
    convs: int
    err: float
    tol: float
    left: str

    @property
    def ok(self) -> bool:
        return self.err <= self.tol


def sweep_one(spec: str, size: int = 96, backend: str = "eager", seed: int = 0) -> Row:
    import resfuse
    torch.manual_seed(seed)
    plain = randomize_bn(build(spec).eval(), seed)
    fused = resfuse.convert(plain, backend=backend)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = copy.deepcopy(plain).double()(x.double())
        eager, out = plain(x), fused(x)
    tol = max(2 * _rel(eager, ref), 1e-5)
    report = resfuse.explain(fused)
    left = Counter(r.reason for r in report if r.kind == "conv").most_common(1)
    return Row(spec, bn_calls(plain, x), bn_calls(fused, x), len(report.fused), len(report), _rel(out, ref), tol,
               f"{left[0][1]}x {left[0][0]}" if left else "")


def table(rows) -> str:
    lines = [f"| model | BN calls (orig -> converted) | BN folded | fused/convs (explain) | err | tol | ok | "
             f"most common reason a conv is left |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = 1 - r.bn_after / r.bn_before if r.bn_before else 1.0
        lines.append(f"| {r.model} | {r.bn_before} -> {r.bn_after} | {share:.0%} | {r.fused}/{r.convs} | "
                     f"{r.err:.1e} | {r.tol:.1e} | {'yes' if r.ok else 'NO'} | {r.left[:110]} |")
    before, after = sum(r.bn_before for r in rows), sum(r.bn_after for r in rows)
    lines.append(f"\n{len(rows)} models: {before - after}/{before} BatchNorm calls folded into fused convs "
                 f"({(before - after) / max(before, 1):.1%}); {sum(r.ok for r in rows)}/{len(rows)} within the rule")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--models", default=",".join(DEFAULT), help="tv:<name> / timm:<name>, comma-separated")
    args = ap.parse_args(argv)
    rows = [sweep_one(m, args.size, args.backend) for m in args.models.split(",") if m]
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
