"""Launcher utilities shared by the Triton kernel modules (no kernels here):
interpreter detection, int64-offset decisions, dot precision, SM count,
scratch allocation and the launch counters tests read."""

import os
from collections import defaultdict

import torch

#: Launches per kernel name, for every launcher in kernels/ (tests read it to
#: prove the Triton path ran).
LAUNCHES_BY_KERNEL = defaultdict(int)


def count_launch(name: str) -> None:
    LAUNCHES_BY_KERNEL[name] += 1


def declare_kernels(*names: str) -> None:
    """Start each kernel's counter at 0 (so that a copy of the dict taken
    before any launch has the key)."""
    for n in names:
        LAUNCHES_BY_KERNEL.setdefault(n, 0)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def span(t):
    """Largest element offset reachable in t, plus one."""
    if t is None or t.numel() == 0:
        return 0
    return 1 + sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride()))


def needs_int64(*tensors, extra=0):
    return max([span(t) for t in tensors] + [extra]) >= 2**31


def dot_precision(dtype, allow_tf32):
    if dtype == torch.float32 and allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"  # ignored by tl.dot for 16-bit operands



_SMS = {}


def num_sms(device=None) -> int:
    """Streaming multiprocessors of `device` (1 in the interpreter)."""
    if interpreting() or not torch.cuda.is_available():
        return 1
    idx = torch.cuda.current_device() if device is None or device.index is None else device.index
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def alloc_scratch(n_elems, dtype, device):
    """A kernel-private workspace; NaN-filled under RESFUSE_POISON_OUTPUTS=1
    so that a read of an element no stage wrote fails the tests."""
    s = torch.empty(n_elems, dtype=dtype, device=device)
    if os.environ.get("RESFUSE_POISON_OUTPUTS") == "1":
        s.fill_(float("nan"))
    return s


def interpreter_blocks(default):
    """Tile sizes in the interpreter: RESFUSE_INTERPRET_BLOCKS="M,N,K"
    overrides the launcher's small default (tests cross tile edges)."""
    env = os.environ.get("RESFUSE_INTERPRET_BLOCKS")
    if env:
        return tuple(int(v) for v in env.split(","))
    return default
