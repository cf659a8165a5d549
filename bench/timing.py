"""Timers, device ceilings and the environment header of a result.

GPU method (GUIDE §4):

- CUDA events around each call (or each CUDA-graph replay), after a
  warm-up that also triggers compilation and autotuning; the median of many
  repetitions is reported, with the 20th and 80th percentiles.
- Inputs are rotated: the caller hands over several argument sets whose
  total size exceeds twice the L2, and consecutive calls use different
  sets, so no call finds its operands in L2 (weights included, as in a
  real network where each layer's weights are read once per forward).
- CUDA graphs (``graph=True``, used at batch 1): one graph holds a sweep
  over all argument sets, repeated until it lasts ~1 ms; the time per call is
  the replay time over the calls in the graph. This removes the CPU launch
  cost that would otherwise be all one measures at batch 1.
- Synchronization: the device is synchronized before warm-up, before the
  timed loop and after it; events are read only after that.
- Without graphs (batch > 1) a call's time includes any host overhead
  that leaves the GPU idle between the events, as a user's eager loop sees.

The CPU timer uses ``time.perf_counter`` around each call; CPU timings say
nothing about the GPU kernels.
"""

import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .model import Ceilings


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    reps: int
    graph: bool

    @property
    def spread(self) -> float:
        """(p80 - p20) / median."""
        return (self.p80_s - self.p20_s) / self.median_s if self.median_s > 0 else 0.0


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summarize(times: List[float], graph: bool) -> Timing:
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times), graph)


def rotation_count(set_bytes: int, l2_bytes: int, max_sets: int, mem_budget: int = 2 << 30) -> int:
    """Argument sets needed so that a sweep moves more than 2x the L2
    (capped by `max_sets` and by `mem_budget` bytes in total)."""
    if set_bytes <= 0:
        return 1
    want = -(-2 * l2_bytes // set_bytes)
    return int(max(1, min(want, max_sets, mem_budget // set_bytes)))


def time_cuda(fns: Sequence[Callable[[], object]], *, graph: bool = False, warmup_ms: float = 25.0,
              rep_ms: float = 100.0, min_reps: int = 10, max_reps: int = 2000) -> Timing:
    """Median time of one call; call i uses ``fns[i % len(fns)]``."""
    n = len(fns)
    for f in fns:  # one sweep: first-call work (compilation, autotuning, cuDNN search) is not timed
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    calls = 0
    while calls < 2 or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        fns[calls % n]()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    est_s = (time.perf_counter() - t0) / calls
    if graph:
        return _time_graph(fns, est_s, rep_ms, min_reps)
    reps = int(min(max_reps, max(min_reps, rep_ms * 1e-3 / max(est_s, 1e-7))))
    reps = max(reps, min(n, max_reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for i in range(reps):
        starts[i].record()
        fns[i % n]()
        ends[i].record()
    torch.cuda.synchronize()
    return _summarize([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)], graph=False)


def _time_graph(fns, est_s, rep_ms, min_reps) -> Timing:
    n = len(fns)
    sweeps = max(1, int(1e-3 / max(est_s * n, 1e-7)))  # a replay lasts ~1 ms or one sweep
    per_graph = sweeps * n
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns[: min(n, 3)]:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(sweeps):
            for f in fns:
                f()
    for _ in range(2):
        g.replay()
    torch.cuda.synchronize()
    replay_s = max(est_s * per_graph, 1e-6)
    reps = int(min(500, max(min_reps, rep_ms * 1e-3 / replay_s)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        g.replay()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e-3 / per_graph for s, e in zip(starts, ends)]
    del g
    return _summarize(times, graph=True)


def time_cpu(fns: Sequence[Callable[[], object]], *, warmup_s: float = 0.05, rep_s: float = 0.3,
             min_reps: int = 3, max_reps: int = 200) -> Timing:
    n = len(fns)
    for f in fns:
        f()
    t0 = time.perf_counter()
    calls = 0
    while calls < 1 or (time.perf_counter() - t0 < warmup_s and calls < max_reps):
        fns[calls % n]()
        calls += 1
    est = (time.perf_counter() - t0) / calls
    reps = int(min(max_reps, max(min_reps, rep_s / max(est, 1e-7))))
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fns[i % n]()
        times.append(time.perf_counter() - t)
    return _summarize(times, graph=False)


def time_calls(device: torch.device, fns, *, graph: bool = False, budget_scale: float = 1.0) -> Timing:
    if device.type == "cuda":
        return time_cuda(fns, graph=graph, warmup_ms=25 * budget_scale, rep_ms=100 * budget_scale)
    return time_cpu(fns, warmup_s=0.05 * budget_scale, rep_s=0.3 * budget_scale)


# ----------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------

def _set_fp32_matmul_tf32(enabled: bool) -> str:
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return prev


def _copy_rate(device, nbytes, timer) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src))


def _matmul_rate(device, dtype, n, timer) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timer(lambda: torch.matmul(a, b, out=c))


def measure_ceilings(device: torch.device, dtypes: Sequence[torch.dtype]) -> Ceilings:
    """Copy bandwidth (bytes read + written per second, large device-to-device
    copy) and matmul FLOP/s per dtype (always bfloat16; float32 with TF32
    exactly when convolutions may use it, since the floor is for convs)."""
    from .cases import dtype_name
    dts = list(dict.fromkeys([torch.bfloat16, *dtypes]))
    if device.type == "cuda":
        nbytes, mm = 1 << 30, 8192
        timer = lambda f: time_cuda([f], warmup_ms=10, rep_ms=60, min_reps=5).median_s  # noqa: E731
    else:
        nbytes, mm = 256 << 20, 1024
        timer = lambda f: time_cpu([f], warmup_s=0.02, rep_s=0.3, min_reps=3).median_s  # noqa: E731
    bw = _copy_rate(device, nbytes, timer)
    rates: Dict[str, float] = {}
    from resfuse._backends import conv_allows_tf32
    tf32 = device.type == "cuda" and conv_allows_tf32()
    for dt in dts:
        n = mm if (device.type == "cuda" or dt == torch.float32) else mm // 2
        prev = _set_fp32_matmul_tf32(tf32)
        try:
            rates[dtype_name(dt)] = _matmul_rate(device, dt, n, timer)
        finally:
            torch.set_float32_matmul_precision(prev)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    label = gpu_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return Ceilings(bw, rates, f"measured on {label}" + (", fp32 matmul with TF32" if tf32 else ""))


# ----------------------------------------------------------------------------
# Environment header
# ----------------------------------------------------------------------------

def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _run(cmd: List[str], timeout: float = 10.0) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def nvidia_smi_clocks() -> Optional[str]:
    """Clocks, power and temperature as nvidia-smi reads them (read-only)."""
    q = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu,driver_version"
    out = _run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"])
    if not out:
        return None
    vals = [v.strip() for v in out.splitlines()[0].split(",")]
    names = ["sm", "sm max", "mem", "mem max", "power", "power limit", "temp C", "driver"]
    return ", ".join(f"{n} {v}" for n, v in zip(names, vals))


def git_revision() -> str:
    rev = _run(["git", "rev-parse", "--short", "HEAD"])
    if rev is None:
        return "unknown (no git checkout)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return rev + (" (+ uncommitted changes)" if dirty else "")


def environment(device: torch.device, argv: Sequence[str]) -> "Dict[str, str]":
    """Ordered key -> value lines written at the top of every result."""
    env: Dict[str, str] = {}
    env["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    env["command"] = " ".join(shlex.quote(a) for a in argv)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        l2 = getattr(p, "L2_cache_size", 0)
        env["device"] = (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                         f"{p.total_memory / 2**30:.0f} GiB" + (f", L2 {l2 / 2**20:.0f} MiB" if l2 else "") + ")")
        env["clocks"] = nvidia_smi_clocks() or "not readable (no nvidia-smi)"
    else:
        env["device"] = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                        f"{torch.get_num_threads()} torch threads"
    try:
        import triton
        tv = triton.__version__
    except Exception as e:  # noqa: BLE001
        tv = f"not importable ({type(e).__name__})"
    env["versions"] = (f"torch {torch.__version__}, triton {tv}, CUDA {torch.version.cuda}, "
                       f"cuDNN {torch.backends.cudnn.version()}, python {sys.version.split()[0]}")
    if device.type == "cuda":
        from resfuse._backends import conv_allows_tf32
        env["fp32 convs"] = "TF32 allowed (cuDNN and resfuse alike)" if conv_allows_tf32() else "IEEE fp32"
    env["resfuse"] = git_revision()
    return env


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 32 << 20
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20))
