"""``resfuse.explain``: per conv layer, what runs, on which backend, and why."""

import dataclasses
import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn

from . import dispatch
from .build_info import describe
from .nn.blocks import FusedResidualBlock
from .nn.conv_bn_act import FusedSequential
from .nn.gnconv import FusedHorBlock, GnConv, match_gnconv, mlp_reason
from .nn.patchify import PatchifyConv
from .nn.stem import ConvBNHead, head_fuses, prologue_fuses
from .ops.conv_bn_act import OP
from .ops.gnconv import OP_CHAIN, OP_PROJ, GnConvSignature, signature_reasons
from .ops.horblock_mlp import OP_GELU_CONV1X1
from .ops.patchify import OP as OP_PATCHIFY, PatchifySignature
from .nn.conv_bn_act import FusedGroup, is_plain_sequential, plan_sequential
from .nn.guards import bn_uses_running_stats
from .recognize.blocks import match_block
from .recognize.gnconv import gnconv_convert_reason
from .recognize.heads import find_heads, shared_modules
from .recognize.patchify import unfused_reasons as patchify_unfused
from .recognize.prologues import find_prologues
from .recognize.stem import stem_parts


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
        return render(self.records)

    __repr__ = __str__


WIDTH = 100  # the table fits a 100-column terminal; a long "why" wraps in its column


_NEXT_BACKEND = re.compile(r"; (?=(?:%s): )" % "|".join(dispatch.AUTO_ORDER))


def _clauses(reason: str) -> List[str]:
    """A reason's clauses: dispatch joins one per backend passed over with
    "; " ("cuda: ...; triton: ...")."""
    return [c for c in _NEXT_BACKEND.split(reason) if c] if reason else []


def _wrap(text: str, width: int) -> List[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=True) or [""]


def render(records: List[Record]) -> str:
    """The table of `records`, with each clause of a reason that two or more
    rows share printed once, as a numbered note under the table (on a
    CPU-only machine every fused row falls back for the same reasons), and
    each row keeping the clauses that are its own."""
    counts = Counter(c for r in records for c in dict.fromkeys(_clauses(r.reason)))
    notes = {}
    for r in records:
        for c in _clauses(r.reason):
            if counts[c] >= 2 and len(c) > 12 and c not in notes:
                notes[c] = f"[{len(notes) + 1}]"
    rows = [("layer", "fused as", "backend", "why")]
    rows += [(r.name, r.kind, r.backend + ("" if r.observed else "*"),
              "; ".join(notes.get(c, c) for c in _clauses(r.reason)) or "-") for r in records]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lead = sum(w) + 6
    why_width = max(30, WIDTH - lead)
    lines = []
    for a, b, c, d in rows:
        wrapped = _wrap(d, why_width)
        lines.append(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {wrapped[0]}".rstrip())
        lines.extend(" " * lead + more for more in wrapped[1:])
    lines.insert(1, "-" * min(WIDTH, lead + why_width))
    for clause, mark in notes.items():
        body = _wrap(f"{mark} ({counts[clause]} rows) {clause}", WIDTH - 4)
        lines.append(body[0])
        lines.extend("    " + more for more in body[1:])
    what = "convs and HorBlock linears" if any("linear" in r.kind for r in records) else "convs"
    fused = sum(r.kind != "conv" for r in records)
    lines.append(f"{fused}/{len(records)} {what} fused"
                 + ("; * = predicted from parameters (pass an example input to observe)"
                    if any(not r.observed for r in records) else ""))
    lines.extend(_wrap(f"resfuse._C: {describe(torch.__version__)}", WIDTH))
    return "\n".join(lines)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _decision_row(name, kind, owner_backend, conv, decision, op=OP) -> Record:
    """A row for a fused conv: the observed decision, or a prediction from
    the parameters' device and dtype (for op `op`)."""
    observed = decision is not None
    if decision is None:
        try:
            decision = dispatch.decide(op, owner_backend, conv.weight.device, conv.weight.dtype, conv.groups)[0]
        except dispatch.BackendUnavailable as e:
            return Record(name, kind, e.backend, "cannot run: " + "; ".join(e.reasons))
    return Record(name, kind, decision.backend, decision.reason() if decision.fell_back else "", observed)


def _act_suffix(activation: str) -> str:
    return "" if activation == "identity" else f"+{activation}"


def head_kind(head: ConvBNHead) -> str:
    """What a ConvBNHead fuses now: 'bn+relu+conv' (prologue), 'conv+bn+relu'
    (epilogue) or both."""
    post = head.fused_bn is not None and head_fuses(head, head.fused_bn)
    return ("bn" + _act_suffix(head.pre_activation) + "+" if prologue_fuses(head) else "") + "conv" + \
        ("+bn" + _act_suffix(head.fused_activation) if post else "")


def _sequential_rows(prefix, seq: FusedSequential):
    plan = seq.plan()
    for step in plan.steps:
        if not isinstance(step, FusedGroup):
            continue
        name = _join(prefix, step.conv)
        if not bn_uses_running_stats(seq._modules[step.bn]):
            yield Record(name, "conv", "eager", "train mode: BatchNorm uses batch statistics, runs unfused", True)
            continue
        yield _decision_row(name, step.kind, seq.backend, seq._modules[step.conv],
                            seq.last_decisions.get(step.conv))
    for child, why in plan.unfused.items():
        if not isinstance(seq._modules[child], ConvBNHead):
            yield Record(_join(prefix, child), "conv", "eager", why, True)


def _block_rows(prefix, block: FusedResidualBlock):
    spec, mods = block.spec, block._modules
    fusable = block._fusable_now()
    last = spec.stages[-1]
    for st in spec.stages:
        name = _join(prefix, st.conv)
        if st is last:
            kind = ("conv+bn+proj" if spec.shortcut == "projection" else "conv+bn+add") + \
                _act_suffix(spec.out_activation)
        else:
            kind = "conv+bn" + _act_suffix(st.activation)
        if not fusable:
            yield Record(name, "conv", "eager", "train mode or hooks: the block runs its original forward", True)
        else:
            yield _decision_row(name, kind, block.backend, mods[st.conv], block.last_decisions.get(st.conv))
    if spec.shortcut == "projection":
        ds = _join(prefix, spec.downsample)
        if fusable:
            yield Record(_join(ds, "0"), "proj (in " + last.conv + ")", block.last_decisions[last.conv].backend
                         if last.conv in block.last_decisions else "-",
                         f"accumulated inside {last.conv}'s kernel; its output never reaches memory",
                         last.conv in block.last_decisions)
        else:
            yield Record(_join(ds, "0"), "conv", "eager", "train mode or hooks: runs in the original forward", True)


def _prologue_reason(parent, child: str, shared: frozenset, plans: dict) -> str:
    """Why conv `child` of `parent`, whose input is a BN's output, does not
    take that BN (-> act) as its prologue ('' if it does not read one).
    `plans` caches each parent's plan for this report (one trace per parent)."""
    if id(parent) not in plans:
        plans[id(parent)] = find_prologues(parent, shared)
    plan = plans[id(parent)]
    if isinstance(plan, str):
        return ""
    if any(p.conv == child for p in plan.prologues):
        return "fusable BN -> act -> conv chain, but not converted (resfuse.convert)"
    why = plan.unfused.get(child)
    return f"BN before it not fused: {why}" if why else ""


def _other_rows(prefix, parent, shared, plans):
    """Conv children of a module that is not a FusedSequential or a fused block."""
    convs = {n: c for n, c in parent._modules.items() if isinstance(c, nn.Conv2d)}
    if not convs:
        return
    if is_plain_sequential(parent):
        plan = plan_sequential(parent)
        unfused = dict(plan.unfused)
        for step in plan.steps:
            if isinstance(step, FusedGroup):
                unfused[step.conv] = "fusable, but this Sequential was not converted (resfuse.convert)"
    else:
        block = match_block(parent)
        stem = stem_parts(parent)
        plan = find_heads(parent, shared)
        if isinstance(plan, str):
            unfused = {n: plan for n in convs}
        else:
            unfused = {n: plan.unfused.get(n, "fusable conv -> BN chain, but not converted (resfuse.convert)")
                       for n in convs}
        if not isinstance(block, str):
            unfused = {n: "fusable residual block, but not converted (resfuse.convert)" for n in convs}
        elif "conv1" in convs and "conv2" in convs and not any(isinstance(c, ConvBNHead) for c in convs.values()):
            unfused = {n: f"residual block not fused ({block})" + ("" if isinstance(plan, str) else f"; {why}")
                       for n, why in unfused.items()}
        if not isinstance(stem, str) and not isinstance(stem[0], ConvBNHead) and "conv1" in unfused:
            unfused["conv1"] = "fusable stem, but not converted (resfuse.convert)"
    unfused.update({n: why for n, why in patchify_unfused(parent).items() if n in unfused})
    for child, why in unfused.items():
        if not isinstance(convs.get(child), (ConvBNHead, PatchifyConv)):
            pre = _prologue_reason(parent, child, shared, plans)
            yield Record(_join(prefix, child), "conv", "eager", f"{why}; {pre}" if pre else why, True)


def _patchify_row(name, conv: PatchifyConv) -> Record:
    """A patchify conv with its LayerNorm(s): what it fuses, and where it ran
    (or would run)."""
    if not conv.fuses_now:
        return Record(name, "conv", "eager", "hooks, or a module changed after conversion: the conv and its "
                      "LayerNorm run as themselves", True)
    decision = conv.__dict__.get("last_decision")
    kind = f"{conv.kind} (patchify)"
    if decision is None:
        post = conv.post_norm
        sig = PatchifySignature(conv.weight.device, conv.weight.dtype, conv.out_channels,
                                None if post is None else float(post.eps))
        try:
            decision = dispatch.plan(OP_PATCHIFY, conv.backend, sig)[0]
        except dispatch.BackendUnavailable as e:
            return Record(name, kind, e.backend, "cannot run: " + "; ".join(e.reasons))
        return Record(name, kind, decision.backend, decision.reason() if decision.fell_back else "")
    return Record(name, kind, decision.backend, decision.reason() if decision.fell_back else "", True)


def _gnconv_row(name, kind, decision) -> Record:
    if isinstance(decision, dispatch.BackendUnavailable):
        return Record(name, kind, decision.backend, "cannot run: " + "; ".join(decision.reasons))
    return Record(name, kind, decision.backend, decision.reason() if decision.fell_back else "")


def _gnconv_rows(prefix, gn: nn.Module, block):
    """One row per conv of a gnconv: proj_in, dwconv (or the gflayer
    filter's convs), pws.i, proj_out, with the kernel each runs in."""
    spec = match_gnconv(gn)
    if isinstance(spec, str):  # has gnconv's children, but something does not fit
        for n in ("proj_in", "dwconv", "proj_out"):
            if isinstance(gn._modules[n], nn.Conv2d):
                yield Record(_join(prefix, n), "conv", "eager", f"gnconv not fused: {spec}", True)
        for i, pw in enumerate(gn._modules["pws"] if isinstance(gn._modules["pws"], nn.ModuleList) else ()):
            if isinstance(pw, nn.Conv2d):
                yield Record(_join(prefix, f"pws.{i}"), "conv", "eager", f"gnconv not fused: {spec}", True)
        return
    names = ["proj_in"] + ([] if spec.gflayer else ["dwconv"]) + [f"pws.{i}" for i in range(spec.order - 1)] \
        + ["proj_out"]
    filter_convs = [] if not spec.gflayer else [
        _join("dwconv", n) for n, m in gn._modules["dwconv"].named_modules() if isinstance(m, nn.Conv2d)]
    if not isinstance(gn, GnConv):
        why = gnconv_convert_reason(gn)
        why = f"gnconv not fused: {why}" if why else \
            "HorNet gnconv: fusable into 2 kernels, but not converted (resfuse.convert)"
        for n in names + filter_convs:
            yield Record(_join(prefix, n), "conv", "eager", why, True)
        return
    why = gn.unfused_reason()
    if why:
        for n in names + filter_convs:
            yield Record(_join(prefix, n), "conv", "eager", f"gnconv runs its original forward: {why}", True)
        return
    block_fused = block is not None and not block.unfused_reason()
    observed = {op: gn.last_decisions.get(key) for op, key in ((OP_PROJ, "proj_in"), (OP_CHAIN, "chain"))}
    predicted = None
    if None in observed.values():
        w = gn._modules["proj_in"].weight
        predicted = signature_reasons(w.device, w.dtype, spec.order, gn.backend)
    decision = {op: d if d is not None else predicted[op] for op, d in observed.items()}
    seen = {op: d is not None for op, d in observed.items()}
    k1, k2 = "[gnconv op 1/2]", "[gnconv op 2/2]"  # one kernel each on triton, o + 1 for op 2 on cuda
    for n in names:
        if n == "proj_in":
            kind, op = ("norm1+" if block_fused else "") + f"conv1x1 {k1}", OP_PROJ
        elif n == "dwconv":
            kind, op = f"dw{spec.ksize}x{spec.ksize}+bias+scale+gate {k2}", OP_CHAIN
        elif n == "proj_out":
            kind, op = "conv1x1" + ("+gamma1+residual" if block_fused else "") + f" {k2}", OP_CHAIN
        else:
            kind, op = f"conv1x1+gate {k2}", OP_CHAIN
        row = _gnconv_row(_join(prefix, n), kind, decision[op])
        yield dataclasses.replace(row, observed=seen[op])
    for n in filter_convs:
        yield Record(_join(prefix, n), "conv", "eager",
                     "inside the gflayer filter (FFT-based), which runs eager between gnconv's two ops", True)


def _mlp_rows(prefix, block):
    """pwconv1 / pwconv2 of a FusedHorBlock: the MLP half's two ops, or
    why it runs as HorNet writes it."""
    names = (_join(prefix, "pwconv1"), _join(prefix, "pwconv2"))
    why = block.unfused_reason() or mlp_reason(block)
    if why:
        for n in names:
            yield Record(n, "linear", "eager", f"HorBlock MLP runs eager: {why}", True)
        return
    kinds = ("norm2+linear [mlp op 1/2]", "gelu+linear+gamma2+drop_path+residual [mlp op 2/2]")
    w = block._modules["pwconv1"].weight
    for n, key, kind in zip(names, ("pwconv1", "pwconv2"), kinds):
        d = block.last_decisions.get(key)
        op = OP_PROJ if key == "pwconv1" else OP_GELU_CONV1X1
        if d is None:
            try:
                d = dispatch.plan(op, block.backend, GnConvSignature(w.device, w.dtype))[0]
            except dispatch.BackendUnavailable as e:
                d = e
        yield dataclasses.replace(_gnconv_row(n, kind, d), observed=key in block.last_decisions)


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
            if isinstance(m, (FusedSequential, FusedResidualBlock)):
                m.last_decisions.clear()  # report this run only
            elif isinstance(m, (ConvBNHead, PatchifyConv)):
                m.__dict__.pop("last_decision", None)
            elif isinstance(m, GnConv):
                m.last_decisions.clear()
            elif isinstance(m, FusedHorBlock):
                m.__dict__["_mlp_decisions"] = {}
        with torch.no_grad():
            saved = [(b, b.clone()) for b in model.buffers()]
            try:
                model(*example_args, **example_kwargs)
            finally:
                for b, old in saved:
                    b.copy_(old)
    records = []
    shared, plans = shared_modules(model), {}
    absorbed = {id(m._modules[m.spec.downsample]) for m in model.modules()
                if isinstance(m, FusedResidualBlock) and m.spec.shortcut == "projection"}
    # gnconvs (converted or not): their rows come from _gnconv_rows, which
    # also covers the pws ModuleList and a gflayer filter's insides.
    gnconvs, handled = {}, set()
    for m in model.modules():
        if isinstance(m, GnConv) or all(n in m._modules for n in ("proj_in", "dwconv", "pws", "proj_out")):
            gnconvs[id(m)] = None
            handled.add(id(m._modules["pws"]))
            spec = match_gnconv(m)
            if not isinstance(spec, str) and spec.gflayer:
                handled.update(id(x) for x in m._modules["dwconv"].modules())
    for m in model.modules():
        if isinstance(m, FusedHorBlock):
            gnconvs[id(m._modules["gnconv"])] = m
    for prefix, parent in model.named_modules():
        if id(parent) in absorbed or id(parent) in handled:
            continue  # rows come from the block or gnconv that computes it
        if id(parent) in gnconvs:
            records.extend(_gnconv_rows(prefix, parent, gnconvs[id(parent)]))
            continue
        if isinstance(parent, ConvBNHead):
            if parent.fuses_now:
                row = _decision_row(prefix, f"{head_kind(parent)} ({parent.label})", parent.backend, parent,
                                    parent.__dict__.get("last_decision"),
                                    "bn_act_conv" if prologue_fuses(parent) else OP)
                if parent.pre_bn is None:
                    owner_name, _, child = prefix.rpartition(".")
                    pre = _prologue_reason(model.get_submodule(owner_name), child, shared, plans) if prefix else ""
                    row = dataclasses.replace(row, reason="; ".join(r for r in (row.reason, pre) if r))
                records.append(row)
            else:
                records.append(Record(prefix, "conv", "eager", "train mode or hooks: BN runs on its own", True))
        elif isinstance(parent, PatchifyConv):
            records.append(_patchify_row(prefix, parent))
        elif isinstance(parent, FusedSequential):
            records.extend(_sequential_rows(prefix, parent))
        elif isinstance(parent, FusedResidualBlock):
            records.extend(_block_rows(prefix, parent))
        elif isinstance(parent, FusedHorBlock):
            records.extend(_mlp_rows(prefix, parent))
        else:
            records.extend(_other_rows(prefix, parent, shared, plans))
    if isinstance(model, nn.Conv2d) and not isinstance(model, ConvBNHead):
        records.append(Record("", "conv", "eager", "a lone Conv2d has no BatchNorm to fuse", True))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    records.sort(key=lambda r: order.get(r.name, len(order)))
    return Report(records)
