"""What ``resfuse.convert`` fuses in torchvision and timm CNNs, counted
from what the converted model still does, not from what ``explain`` says.

    python bench/recognition_sweep.py [--size 96] [--backend eager] [--models a,b,...]

Each model is built with random weights (no downloads) and randomised
BatchNorm statistics, in eval mode, converted, and run on one
1 x 3 x size x size input. Columns:

- ``BN-adjacent convs`` / ``fused``: the plain model's convs with a
  BatchNorm directly before (through at most one activation) or after
  them, seen from the calls one forward makes (``BNAdjacentConvs``), and
  how many of those the converted model runs inside a resfuse op (their
  weights are passed to one: ``FusedConvWeights``).
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
        "efficientnet_b0", "mobilenetv3_large_100", "resnetv2_50", "densenet121"]
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


_CONV = (F.conv2d, torch.conv2d)


class BNAdjacentConvs(TorchFunctionMode):
    """Which convs of a plain model have a BatchNorm directly after them
    (the BN reads the conv's output) or before them (the conv reads a BN's
    output, possibly through one elementwise activation), from the calls
    one forward makes: every tensor is tagged with what produced it; a call
    with one tensor argument and an output of the same shape (an
    activation, an eval dropout) passes its input's tag on. ``adjacent``
    holds the ids of those convs' weights."""

    def __init__(self):
        super().__init__()
        self.tags, self.keep, self.adjacent = {}, [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors or not isinstance(out, torch.Tensor):
            return out
        tag = None
        if func in _CONV:
            src = self.tags.get(id(tensors[0]))
            if src == "bn":
                self.adjacent.add(id(tensors[1]))
            tag = ("conv", id(tensors[1]))
        elif func is F.batch_norm:
            src = self.tags.get(id(tensors[0]))
            if isinstance(src, tuple):
                self.adjacent.add(src[1])
            tag = "bn"
        elif len(tensors) == 1 and out.shape == tensors[0].shape:
            tag = self.tags.get(id(tensors[0]))
            tag = tag if tag == "bn" else None  # only a BN's tag crosses an activation
        if tag is not None:
            self.tags[id(out)] = tag
            self.keep.append(out)  # ids stay unique while the forward runs
        return out


class FusedConvWeights(TorchFunctionMode):
    """Ids of the tensors passed to resfuse's ops in one forward (a fused
    conv's weight is one of them; an op's insides are not seen)."""

    def __init__(self):
        super().__init__()
        self.ids = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if str(getattr(func, "_schema", "")).startswith("resfuse::") or \
                getattr(func, "__module__", "") == "torch._ops.resfuse":
            self.ids.update(id(a) for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def adjacent_fused(plain, fused, x):
    """(BN-adjacent convs of `plain`, how many of them `fused` runs inside
    a resfuse op), matched by parameter name (convert keeps every name)."""
    adj, seen = BNAdjacentConvs(), FusedConvWeights()
    with torch.no_grad():
        with adj:
            plain(x)
        with seen:
            fused(x)
    names = {id(p): n for n, p in plain.named_parameters()}
    fused_params = dict(fused.named_parameters())
    adjacent = [names[i] for i in adj.adjacent if i in names]
    return len(adjacent), sum(id(fused_params[n]) in seen.ids for n in adjacent)


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
    adjacent: int
    adjacent_fused: int
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
    return Row(spec, bn_calls(plain, x), bn_calls(fused, x), len(report.fused), len(report),
               *adjacent_fused(plain, fused, x), _rel(out, ref), tol, f"{left[0][1]}x {left[0][0]}" if left else "")


def table(rows) -> str:
    lines = [f"| model | BN-adjacent convs | fused | BN calls (orig -> converted) | fused/convs (explain) | err | "
             f"tol | ok | most common reason a conv is left |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.adjacent} | {r.adjacent_fused} | {r.bn_before} -> {r.bn_after} | "
                     f"{r.fused}/{r.convs} | {r.err:.1e} | {r.tol:.1e} | {'yes' if r.ok else 'NO'} | {r.left[:110]} |")
    before, after = sum(r.bn_before for r in rows), sum(r.bn_after for r in rows)
    adj, adj_fused = sum(r.adjacent for r in rows), sum(r.adjacent_fused for r in rows)
    lines.append(f"\n{len(rows)} models: {adj_fused}/{adj} BN-adjacent convs run fused "
                 f"({adj_fused / max(adj, 1):.1%}); {before - after}/{before} BatchNorm calls folded into fused "
                 f"convs ({(before - after) / max(before, 1):.1%}); {sum(r.ok for r in rows)}/{len(rows)} within "
                 f"the rule")
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
