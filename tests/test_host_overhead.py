"""bench/host_overhead.py runs and measures what it says: every row has a
time, and the GPU-launch proxy reached the Triton launcher (one recorded
launch per call, not an eager fallback)."""

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_overhead_table(capsys):
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import host_overhead
    host_overhead.main(["--repeats", "1", "--calls", "2"])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| call")]
    assert len(rows) == 6, out
    for ln in rows:
        assert re.match(r"\| [^|]+ \| \d+\.\d \| \d+\.\d-\d+\.\d \| \d+\.\d\dx \|", ln), ln
    assert "up to the launch (stubbed)" in rows[-1]
