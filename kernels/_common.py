"""Launcher utilities shared by the Triton kernel modules (no kernels here):
interpreter detection, int64-offset decisions, dot precision, SM count,
scratch allocation, the launch counters tests read, and ``launch``: every
launcher's one way to run a kernel, which picks a tuned kernel's config
(``TunedKernel``) and hands the launch to a recorder instead when
``resfuse.inspect`` records a model.

First-call cost: a ``TunedKernel`` launches with its deterministic default
config (``default_config``: the first config of its pruned space, in the
space's order of preference), so a model's first forward compiles once per
specialization class and benchmarks nothing, and batch sizes compile the
same variants (the prunes depend on M only below 128 rows).
``RESFUSE_AUTOTUNE=1`` opts into Triton's autotuner over the same pruned
space (each distinct key compiles and times every candidate)."""

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
    if t is None:
        return 0
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t.numel()  # dense: the offsets are 0 .. numel - 1
    if t.numel() == 0:
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
    """Streaming multiprocessors of `device` (1 in the interpreter; the
    recorded target's while ``resfuse.inspect`` records)."""
    if _RECORDER is not None:
        return _RECORDER.num_sms
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


# ----------------------------------------------------------------------------
# Launching: default configs, opt-in autotuning, recording
# ----------------------------------------------------------------------------

AUTOTUNE_ENV = "RESFUSE_AUTOTUNE"


def autotuning() -> bool:
    """Whether tuned kernels benchmark their pruned space (RESFUSE_AUTOTUNE=1)."""
    return os.environ.get(AUTOTUNE_ENV) == "1"


class TunedKernel:
    """A ``@triton.jit`` kernel with its config space.

    ``configs``: ``triton.Config``s in order of preference (the largest
    efficient tile first); ``prune(configs, named_args)`` drops those that
    do not fit a problem; ``key``: the arguments the opt-in autotuner keys
    its choice on."""

    def __init__(self, fn, configs: Sequence, key: Sequence[str], prune: Optional[Callable] = None):
        import triton
        self.fn, self.configs, self.key = fn, list(configs), list(key)
        self._prune = prune
        self._key_items = [(k, fn.arg_names.index(k)) for k in self.key]
        self._chosen = {}  # (key values, SM count) -> default config: the prune runs once per key
        by = {"early_config_prune": lambda cfgs, named, **kw: self.candidates({**named, **kw}, cfgs)}
        self.autotuner = triton.autotune(configs=self.configs, key=self.key, prune_configs_by=by)(fn)

    @property
    def name(self) -> str:
        return self.fn.__name__

    def named_args(self, args: Sequence, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        return {**dict(zip(self.fn.arg_names, args)), **kwargs}

    def candidates(self, named: Dict[str, Any], configs: Optional[Sequence] = None) -> List:
        configs = self.configs if configs is None else list(configs)
        kept = self._prune(configs, named) if self._prune is not None else configs
        return list(kept) or configs[-1:]

    def tune_key(self, args: Sequence, kwargs: Dict[str, Any]) -> Tuple:
        """The values of ``key`` for a launch (what the autotuner, and the
        default-config cache, key on)."""
        n = len(args)
        return tuple([args[i] if i < n else kwargs.get(k) for k, i in self._key_items])

    def default_config(self, args: Sequence, kwargs: Dict[str, Any], tune_key: Optional[Tuple] = None):
        """The first candidate, chosen once per key (the prunes read only
        key arguments and the SM count, as triton.autotune assumes). No
        wave rule (it would give batch 64 and 96 different tiles, so
        different compiles): a small problem may leave SMs idle, which
        RESFUSE_AUTOTUNE=1 trades for tuning time."""
        k = (self.tune_key(args, kwargs) if tune_key is None else tune_key, num_sms())
        cfg = self._chosen.get(k)
        if cfg is None:
            cfg = self._chosen[k] = self.candidates(self.named_args(args, kwargs))[0]
        return cfg


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel's name (the
    launch counter's), the ``@triton.jit`` function, its positional and
    keyword arguments (config included: ``config``), and for a tuned kernel
    (``tuned``) the configs the opt-in autotuner would try (``candidates``,
    computed when first read: recording stays as cheap as launching)."""
    name: str
    fn: Any
    args: Tuple
    kwargs: Dict[str, Any]
    config: Any = None
    tuned: Optional["TunedKernel"] = None
    tune_key: Tuple = ()   # the autotuner's key values (what RESFUSE_AUTOTUNE=1 tunes once per)

    @property
    def candidates(self) -> Tuple:
        if self.tuned is None:
            return ()
        return tuple(self.tuned.candidates(self.tuned.named_args(self.args, self.kwargs)))


class _Recorder:
    def __init__(self, sink: Callable[[Launch], None], num_sms: int):
        self.sink, self.num_sms = sink, num_sms


_RECORDER: Optional[_Recorder] = None


def start_recording(sink: Callable[[Launch], None], num_sms: int) -> None:
    """Hand every launch to ``sink`` instead of running it (resfuse.inspect);
    ``num_sms``: the SM count of the target being inspected."""
    global _RECORDER
    if _RECORDER is not None:
        raise RuntimeError("resfuse: a launch recording is already active")
    _RECORDER = _Recorder(sink, num_sms)


def stop_recording() -> None:
    global _RECORDER
    _RECORDER = None


def recording() -> bool:
    return _RECORDER is not None


@dataclass
class PreparedLaunch:
    """A launch with everything but its tensor arguments fixed: the
    ``@triton.jit`` function, the grid, the scalar arguments that follow
    the tensors, the keyword arguments with the config merged in. Made by
    ``prepare`` on a launcher's first call for a signature and run by
    ``launch_prepared`` on the later ones (the Python of choosing a config,
    computing strides and flags then runs once per signature)."""
    name: str
    fn: Any
    grid: Tuple[int, ...]
    scalars: Tuple
    kwargs: Dict[str, Any]
    config: Any = None
    tuned: Optional["TunedKernel"] = None
    tune_key: Tuple = ()


def prepare(name: str, kernel, grid, tensors: Tuple, scalars: Tuple, kwargs: Dict[str, Any]) -> PreparedLaunch:
    """``kernel[grid](*tensors, *scalars, **kwargs)`` made ready: for a
    ``TunedKernel`` its default config is chosen now (not with
    RESFUSE_AUTOTUNE=1: the autotuner chooses at launch, so use
    ``launch``); `grid` may be a function of the meta-parameters (the
    keyword arguments, the config's included), evaluated now."""
    config, tuned, fn, key = None, None, kernel, ()
    if isinstance(kernel, TunedKernel):
        args = tensors + scalars
        fn, key, tuned = kernel.fn, kernel.tune_key(args, kwargs), kernel
        config = kernel.default_config(args, kwargs, key)
        kwargs = {**kwargs, **config.all_kwargs()}
    if callable(grid):
        grid = tuple(grid(kwargs))
    return PreparedLaunch(name, fn, grid, tuple(scalars), kwargs, config, tuned, key)


def launch_prepared(p: PreparedLaunch, tensors: Tuple) -> None:
    """Run (or record) a prepared launch on this call's tensors, counted
    under its name; what ``launch`` does, without re-deriving anything."""
    args = tensors + p.scalars
    if _RECORDER is not None:
        _RECORDER.sink(Launch(p.name, p.fn, args, dict(p.kwargs), p.config, p.tuned, p.tune_key))
    else:
        p.fn[p.grid](*args, **p.kwargs)
    count_launch(p.name)


def launch(name: str, kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for a ``@triton.jit`` function or
    a ``TunedKernel`` (its default config, or the autotuner with
    RESFUSE_AUTOTUNE=1), counted under ``name``; recorded, not run, while
    ``resfuse.inspect`` records. (``prepare`` + ``launch_prepared`` in one
    call, for launchers that do not keep the prepared launch.)"""
    if _RECORDER is None and isinstance(kernel, TunedKernel) and autotuning():
        kernel.autotuner[grid](*args, **kwargs)
        count_launch(name)
        return
    launch_prepared(prepare(name, kernel, grid, args, (), kwargs), args)
