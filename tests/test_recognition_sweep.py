"""convert over 30 torchvision and timm CNNs (random weights, eager
backend: recognition does not depend on it), counted from the BatchNorm
calls the converted model still makes (bench/recognition_sweep.py; the
table of record is in bench/results/2026-12-02-recognition-sweep.md)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is not installed; it is imported from the checkout
    sys.path.insert(0, ROOT)

from bench import recognition_sweep as sweep  # noqa: E402

# BatchNorm calls a converted model may still make: the ones no conv is
# fused with today. Pre-activation BN -> act -> conv (densenet, dpn) needs
# the prologue kernel; repvgg's identity branch is a BN with no conv.
LEFT_AT_MOST = {"tv:densenet121": 62, "timm:dpn68": 71, "timm:repvgg_a2": 17}


@pytest.fixture(scope="module")
def rows():
    pytest.importorskip("timm")
    return {m: sweep.sweep_one(m, size=64) for m in sweep.DEFAULT}


def test_sweep_covers_at_least_20_models_and_every_one_matches(rows):
    assert len(rows) >= 20
    bad = {m: (r.err, r.tol) for m, r in rows.items() if not r.ok}
    assert not bad, bad


def test_batchnorm_calls_left_after_conversion(rows):
    over = {m: r.bn_after for m, r in rows.items() if r.bn_after > LEFT_AT_MOST.get(m, 0)}
    assert not over, f"converted models call BatchNorm more often than recorded: {over}\n" + \
        sweep.table(rows.values())
    before = sum(r.bn_before for r in rows.values())
    after = sum(r.bn_after for r in rows.values())
    assert (before - after) / before >= 0.90, sweep.table(rows.values())
