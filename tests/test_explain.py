"""resfuse.explain: one record per Conv2d (name, kind, backend, reason),
printed as a table; predicted before a run, observed after one; a specific
reason for every conv that is not fused."""

import copy
import dataclasses

import torch
import torch.nn as nn

import resfuse
from resfuse._backends import cuda_reasons
from resfuse.nn.stem import ConvBNHead
from seed_models import ResNet, randomize_bn, vgg16_bn_features


def _by_name(report):
    return {r.name: r for r in report}


class _ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 0.5


class _OwnForward(nn.Sequential):
    def forward(self, x):
        return self[1](self[0](x)) * 2


class _Block(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


class _Untraceable(_Block):
    def __init__(self):
        super().__init__(3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else x


class _ReadTwice(_Block):
    def __init__(self):
        super().__init__(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def _zoo():
    """One converted model holding every kind of conv explain must explain."""
    hooked = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),           # 0.0 fused
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4)),  # 1.0
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(1)),                           # 2.0
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),         # 3.0
        nn.Sequential(_ScaledConv(4, 4, 1), nn.BatchNorm2d(4)),                                  # 4.0
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)),                                   # 5.0
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU()),   # 6.0 eager
        _Block(),                                                                                 # 7.conv head
        _OwnForward(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),                                      # 8.0 head
        hooked,                                                                                   # 9.0
        nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ELU()),                        # 10.0
        nn.Conv2d(6, 6, 1),                                                                       # 11
        nn.Sequential(nn.Conv2d(6, 3, 1)),                                                        # 12.0
        _Untraceable(),                                                                           # 13.conv
        _ReadTwice(),                                                                             # 14.conv
    )
    conv = resfuse.convert(model)
    conv[9][0].register_forward_hook(lambda *a: None)
    return conv.eval()


_EXPECTED_UNFUSED = {
    "1.0": "padding_mode='reflect'",
    "2.0": "followed by MaxPool2d, not BatchNorm2d",
    "3.0": "without running statistics",
    "4.0": "_ScaledConv overrides Conv2d.forward",
    "5.0": "followed by GroupNorm, not BatchNorm2d",
    "13.conv": "_Untraceable.forward: its forward does not trace with torch.fx",
    "14.conv": "in _ReadTwice.forward its output is not read by one BatchNorm2d child alone",
    "9.0": "Conv2d has forward hooks",
    "11": "followed by Sequential, not BatchNorm2d",
    "12.0": "no BatchNorm2d follows it",
}


def test_report_iterates_as_records_and_prints_a_table():
    report = resfuse.explain(_zoo())
    fields = [f.name for f in dataclasses.fields(report[0])]
    assert fields[:4] == ["name", "kind", "backend", "reason"]
    names = [r.name for r in report]
    assert len(report) == len(names) == 15 and len(set(names)) == 15
    assert names == [n for n, m in _zoo().named_modules() if isinstance(m, nn.Conv2d)]  # model order
    assert [r.name for r in report.fused] == ["0.0", "6.0", "7.conv", "8.0", "10.0"]
    assert report[7].kind == report[8].kind == "conv+bn (head)"
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "fused", "as", "backend", "why"]
    assert set(lines[1]) == {"-"}
    assert all(len(l) <= 100 for l in lines), max(lines, key=len)
    starts = [i for i, l in enumerate(lines) if l.split() and l.split()[0] in {r.name for r in report}]
    assert len(starts) == len(report)
    notes, mark = {}, None
    for l in lines:  # a note wraps onto lines indented by 4
        if l.startswith("["):
            mark = l.split()[0]
            notes[mark] = l.split(") ", 1)[1]
        elif mark and l.startswith("    "):
            notes[mark] += " " + l.strip()
        else:
            mark = None
    end = next(i for i, l in enumerate(lines) if l.startswith("[") or "convs fused" in l)
    for r, i, j in zip(report, starts, starts[1:] + [end]):
        row = " ".join(x.strip() for x in lines[i:j])
        assert row.split()[0] == r.name and r.kind in row and r.backend in row
        why = row.split(r.backend, 1)[1].strip().lstrip("*").strip()
        for mark, clause in notes.items():
            why = why.replace(mark, clause)
        assert why == (r.reason or "-"), (why, r.reason)
    summary = next(l for l in lines if "convs fused" in l)
    assert summary.startswith("5/15 convs fused")
    assert lines[lines.index(summary) + 1].startswith("resfuse._C: ")
    assert repr(report) == text


def test_table_says_a_shared_reason_once_and_fits_100_columns():
    from resfuse.explain import Record, render
    common = "cuda: resfuse._C is not built (no CUDA toolkit found, set CUDA_HOME to the toolkit root)"
    records = [Record(f"layer{i}.conv{j}", "conv+bn+relu", "eager", f"{common}; triton: cpu tensors", True)
               for i in range(4) for j in range(3)]
    records.append(Record("head.conv", "conv+bn", "eager", f"{common}; triton: a reason of its own", True))
    records.append(Record("fc.conv", "conv", "eager", "x" * 150, True))
    text = render(records)
    flat = " ".join(text.split())  # wrapping puts line breaks inside long clauses
    assert flat.count(common) == 1 and flat.count("a reason of its own") == 1
    assert all(len(l) <= 100 for l in text.splitlines()), text
    assert "[1] (13 rows) " + common in flat


def test_unfused_convs_have_specific_reasons():
    report = _by_name(resfuse.explain(_zoo()))
    for name, why in _EXPECTED_UNFUSED.items():
        r = report[name]
        assert r.kind == "conv" and r.backend == "eager", name
        assert why in r.reason, f"{name}: {r.reason!r} lacks {why!r}"
    # an activation it cannot fuse (ELU) ends the group before it: conv+bn fused, ELU runs after
    assert report["10.0"].kind == "conv+bn"


def _auto_choice(device):
    """What 'auto' picks for a groups=1 float32 conv on `device`: the CUDA
    kernels where built, else Triton (CPU tensors: only under the
    interpreter, which the `device` fixture guarantees)."""
    return "cuda" if not cuda_reasons("conv_bn_act", device) else "triton"


def test_predicted_then_observed_backends(seed, device):
    model = _zoo().to(device)
    randomize_bn(model, torch.Generator().manual_seed(seed))
    auto = _auto_choice(device)
    predicted = _by_name(resfuse.explain(model))
    assert all(not predicted[n].observed for n in ("0.0", "6.0", "10.0"))
    assert predicted["0.0"].backend == auto
    assert auto == "cuda" or "cuda:" in predicted["0.0"].reason  # says why not the first choice
    grouped = predicted["6.0"]  # the Triton kernel has groups=1 only
    assert grouped.backend != "triton" and (grouped.backend == "cuda" or "groups=2" in grouped.reason)
    assert "*" in str(resfuse.explain(model)) and "predicted" in str(resfuse.explain(model))

    x = torch.randn(1, 3, 7, 6, device=device)
    observed = _by_name(resfuse.explain(model, x))
    assert all(r.observed for r in observed.values())
    assert observed["0.0"].backend == model[0].last_decisions["0"].backend == auto
    assert (observed["6.0"].backend, observed["6.0"].reason) == (grouped.backend, grouped.reason)
    text = str(resfuse.explain(model, x))
    assert "*" not in text and "predicted" not in text


def test_explicit_backends_and_env_var(monkeypatch):
    model = _zoo()
    for m in model.modules():
        if isinstance(m, (resfuse.nn.FusedSequential, ConvBNHead)):
            m.backend = "eager"
    assert {r.backend for r in resfuse.explain(model).fused} == {"eager"}
    assert all(r.reason == "" for r in resfuse.explain(model).fused)  # asked for, not a fallback

    auto = _zoo()
    monkeypatch.setenv("RESFUSE_BACKEND", "eager")
    assert {r.backend for r in resfuse.explain(auto).fused} == {"eager"}

    monkeypatch.delenv("RESFUSE_BACKEND")
    f64 = resfuse.convert(_zoo().double(), backend="triton")
    rows = _by_name(resfuse.explain(f64))
    assert rows["0.0"].kind == "conv+bn+relu" and rows["0.0"].backend == "triton"
    assert rows["0.0"].reason.startswith("cannot run:") and "float64" in rows["0.0"].reason


def test_train_mode_rows(seed):
    model = resfuse.convert(vgg16_bn_features())
    model.train()
    rows = list(resfuse.explain(model))
    assert len(rows) == 13
    assert all(r.kind == "conv" and r.backend == "eager" and "train mode" in r.reason for r in rows)
    # the example run does not change the model's statistics
    before = copy.deepcopy(model.state_dict())
    rows = list(resfuse.explain(model, torch.randn(2, 3, 32, 32)))
    assert all("train mode" in r.reason for r in rows)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "explain() changed running statistics"
    model.eval()
    model[1].train()  # one BN in train mode: only its group is unfused
    rows = _by_name(resfuse.explain(model))
    assert "train mode" in rows["0"].reason
    assert all(rows[n].kind == "conv+bn+relu" for n in rows if n != "0")


def test_unconverted_model():
    rows = list(resfuse.explain(vgg16_bn_features().eval()))
    assert len(rows) == 13
    assert all(r.kind == "conv" and "not converted (resfuse.convert)" in r.reason for r in rows)
    assert "\n0/13 convs fused" in str(resfuse.explain(vgg16_bn_features()))
    lone = list(resfuse.explain(nn.Conv2d(3, 4, 3)))
    assert len(lone) == 1 and "no BatchNorm" in lone[0].reason


def test_seed_resnet(seed):
    plain = ResNet(blocks_num=(2, 1, 1, 1))
    model = resfuse.convert(randomize_bn(plain, torch.Generator().manual_seed(seed)), backend="eager")
    report = resfuse.explain(model, torch.randn(1, 3, 33, 35))
    rows = _by_name(report)
    convs = [n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(rows) == convs and len(convs) == 14
    assert rows["conv1"].kind == "conv+bn+relu (stem)" and rows["conv1"].observed
    for n in convs:
        r = rows[n]
        assert r.backend == "eager" and r.observed, n
        if n.endswith("downsample.0"):
            assert r.kind.startswith("proj (in conv2)") and "never reaches memory" in r.reason, n
        elif n.endswith("conv1") and n != "conv1":
            assert r.kind == "conv+bn+relu", n
        elif n.endswith("conv2"):
            shortcut = "proj" if n.replace("conv2", "downsample.0") in rows else "add"
            assert r.kind == f"conv+bn+{shortcut}+relu", n
    assert len(report.fused) == len(convs)
    unconverted = _by_name(resfuse.explain(plain))
    assert "not converted" in unconverted["layer2.0.conv1"].reason
    assert "not converted" in unconverted["conv1"].reason


def test_stale_observations_are_not_reported(device):
    """What explain shows as observed is what ran last, under the current
    settings."""
    model = resfuse.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), backend="eager")
    model.to(device)
    with torch.no_grad():
        model(torch.randn(1, 3, 5, 5, device=device))
    assert resfuse.explain(model)[0].observed and resfuse.explain(model)[0].backend == "eager"
    model.backend = "auto"
    r = resfuse.explain(model)[0]
    assert not r.observed and r.backend == _auto_choice(device)
    with torch.no_grad():
        model(torch.randn(1, 3, 5, 5, device=device))
    assert resfuse.explain(model)[0].observed
    model.half()
    assert not resfuse.explain(model)[0].observed
