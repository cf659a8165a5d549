"""``resfuse.explain``: per conv layer, what runs, on which backend, and why."""

from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn

from . import dispatch
from .nn.conv_bn_act import FusedSequential
from .ops import OP, ProblemSignature
from .patterns import FusedGroup, bn_uses_running_stats, is_plain_sequential, plan_sequential


@dataclass(frozen=True)
class Record:
    name: str      # qualified name of the Conv2d
    kind: str      # 'conv+bn+relu', 'conv+bn', ... or 'conv' when not fused
    backend: str   # 'triton' | 'cuda' | 'eager'
    reason: str    # why not fused, or why the backend is not the first choice; '' if neither
    observed: bool = False  # False: a fused conv's backend predicted from its parameters (not run
    #                         since it was converted, or explain's example did not reach it);
    #                         True: seen in the last run, or certain (an unfused conv runs eager)


class Report:
    """Iterates as Records; ``str()`` is a table."""

    def __init__(self, records: List[Record]):
        self.records = records

    def __iter__(self):
        return iter(self.records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def fused(self) -> List[Record]:
        return [r for r in self.records if r.kind != "conv"]

    def __str__(self) -> str:
        rows = [("layer", "fused as", "backend", "why")]
        rows += [(r.name, r.kind, r.backend + ("" if r.observed else "*"), r.reason or "-")
                 for r in self.records]
        w = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
        lines.insert(1, "-" * min(120, sum(w) + 10))
        lines.append(f"{len(self.fused)}/{len(self.records)} convs fused"
                     + ("; * = predicted from parameters (pass an example input to observe)"
                        if any(not r.observed for r in self.records) else ""))
        return "\n".join(lines)

    __repr__ = __str__


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _predict(seq: FusedSequential, conv: nn.Conv2d) -> dispatch.Decision:
    sig = ProblemSignature(conv.weight.device, conv.weight.dtype, conv.groups)
    return dispatch.plan(OP, seq.backend, sig)[0]


def explain(model: nn.Module, *example_args, **example_kwargs) -> Report:
    """Report, for every Conv2d in `model`, whether it runs fused and where.

    With example inputs the model is run once under ``torch.no_grad()`` and
    the report shows the backends that actually ran; without, they are
    predicted from the parameters' device and dtype. The run leaves the
    model's buffers as they were (a train-mode BatchNorm would otherwise
    fold the example into its running statistics).
    """
    if example_args or example_kwargs:
        for m in model.modules():
            if isinstance(m, FusedSequential):
                m.last_decisions.clear()  # report this run only
        with torch.no_grad():
            saved = [(b, b.clone()) for b in model.buffers()]
            try:
                model(*example_args, **example_kwargs)
            finally:
                for b, old in saved:
                    b.copy_(old)
    records = []
    for prefix, parent in model.named_modules():
        if isinstance(parent, FusedSequential):
            plan = parent.plan()
            for step in plan.steps:
                if not isinstance(step, FusedGroup):
                    continue
                conv, bn = parent._modules[step.conv], parent._modules[step.bn]
                name = _join(prefix, step.conv)
                if not bn_uses_running_stats(bn):
                    records.append(Record(name, "conv", "eager",
                                          "train mode: BatchNorm uses batch statistics, runs unfused", True))
                    continue
                decision = parent.last_decisions.get(step.conv)
                observed = decision is not None
                if decision is None:
                    try:
                        decision = _predict(parent, conv)
                    except dispatch.BackendUnavailable as e:
                        records.append(Record(name, step.kind, e.backend, "cannot run: " + "; ".join(e.reasons)))
                        continue
                records.append(Record(name, step.kind, decision.backend,
                                      decision.reason() if decision.fell_back else "", observed))
            unfused = plan.unfused
        elif is_plain_sequential(parent):
            plan = plan_sequential(parent)
            unfused = dict(plan.unfused)
            for step in plan.steps:
                if isinstance(step, FusedGroup):
                    unfused[step.conv] = "fusable, but this Sequential was not converted (resfuse.convert)"
        elif isinstance(parent, nn.Sequential):
            unfused = {n: f"inside {type(parent).__name__}, an nn.Sequential subclass with its own forward: "
                          f"the order its children run in is unknown"
                       for n, c in parent._modules.items() if isinstance(c, nn.Conv2d)}
        else:
            unfused = {n: f"inside {type(parent).__name__}, not an nn.Sequential: only Conv2d -> BN runs "
                          f"inside nn.Sequential fuse so far"
                       for n, c in parent._modules.items() if isinstance(c, nn.Conv2d)}
        for child, why in unfused.items():
            records.append(Record(_join(prefix, child), "conv", "eager", why, True))
    if isinstance(model, nn.Conv2d):
        records.append(Record("", "conv", "eager", "a lone Conv2d has no BatchNorm to fuse", True))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    records.sort(key=lambda r: order.get(r.name, len(order)))
    return Report(records)
