"""The benchmark cases as a pytest-benchmark suite (for people who live in pytest).

    python -m pytest bench/test_bench_cases.py                    # quick cases, default providers
    RESFUSE_BENCH_FULL=1 python -m pytest bench/test_bench_cases.py --benchmark-sort=name
    RESFUSE_BENCH_CASES=resnet50.conv RESFUSE_BENCH_DTYPE=fp16 RESFUSE_BENCH_BATCH=32 \
        RESFUSE_BENCH_PROVIDERS=eager,resfuse-triton python -m pytest bench/test_bench_cases.py

Same registry, providers and correctness check as ``bench/run.py``: each
provider's output is compared with the float64 reference (tests' rule;
for a training case the output and each checked gradient, ``cases.check``)
before it is timed, and a wrong one fails the test. It enumerates the
registry, so every op's cases are here (HorNet's training ones included). pytest-benchmark times
with the wall clock (a ``torch.cuda.synchronize()`` ends every call); CUDA
event timings, CUDA graphs and the floor come from ``bench/run.py``, which
is the reference harness. The model's columns go into each result's
``extra_info`` (``--benchmark-json`` keeps them).

Lives in bench/, so ``pytest tests`` never collects it.
"""

import importlib.util
import itertools
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import cases as registry  # noqa: E402
from bench import providers as prov  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


def _env_list(name):
    v = os.environ.get(name, "")
    return [x.strip() for x in v.split(",") if x.strip()] or None


FULL = os.environ.get("RESFUSE_BENCH_FULL") == "1"
DTYPE = registry.DTYPES[os.environ.get("RESFUSE_BENCH_DTYPE", "bf16" if GPU else "fp32")]
BATCH = int(os.environ.get("RESFUSE_BENCH_BATCH", "32" if GPU else "1"))
PROVIDERS = _env_list("RESFUSE_BENCH_PROVIDERS") or list(
    (prov.DEFAULT_GPU if FULL else prov.QUICK_GPU) if GPU else prov.DEFAULT_CPU)
CASES = registry.select(_env_list("RESFUSE_BENCH_CASES"), quick=not FULL)


def _numerics():
    spec = importlib.util.spec_from_file_location("resfuse_tests_numerics", os.path.join(ROOT, "tests", "numerics.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NUMERICS = _numerics()
_workload = {}  # one workload at a time, shared by its providers (params are case-major)


def _get_workload(case):
    key = (case.name, DTYPE, BATCH)
    if key not in _workload:
        _workload.clear()
        if GPU:
            torch.cuda.empty_cache()
        op = registry.OPS[case.op]
        wl = op.make_workload(case, DEVICE, DTYPE, BATCH, n_sets=2 if GPU else 1, seed=0)
        with torch.no_grad():
            eager_out = op.build("eager", wl)(*wl.arg_sets[0])
        _workload[key] = (wl, registry.tolerances(NUMERICS, eager_out, wl.reference, DTYPE))
    return _workload[key]


PARAMS = [pytest.param(c, p, id=f"{c.name}-{p}") for c in CASES for p in PROVIDERS]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_bench(benchmark, case, provider):
    why = prov.provider_reasons(provider, DEVICE, DTYPE)
    if why:
        pytest.skip(f"{provider}: {'; '.join(why)}")
    wl, tol = _get_workload(case)
    op = registry.OPS[case.op]
    fn = op.build(provider, wl)
    with torch.no_grad():
        out = fn(*wl.arg_sets[0])
    err, tol, worst = registry.check(NUMERICS, out, wl.reference, tol)
    assert err <= tol, (f"{case.name} {provider}: {worst or 'output'} rel err {err:.3e} > tol {tol:.3e}: "
                        "a wrong kernel is not timed")
    cost = case.cost(BATCH, DTYPE)
    benchmark.group = f"{case.name} {registry.DTYPE_NAMES[DTYPE]} N={BATCH}"
    benchmark.extra_info.update(case=case.name, shape=case.describe(), dtype=registry.DTYPE_NAMES[DTYPE],
                                batch=BATCH, provider=provider, device=str(DEVICE), gflop=cost.flops / 1e9,
                                fused_mb=cost.fused_bytes / 1e6, unfused_mb=cost.unfused_bytes / 1e6,
                                rel_err=err, tol=tol, note=op.note(wl, provider))
    sets = itertools.cycle(wl.arg_sets)
    sync = torch.cuda.synchronize if GPU else (lambda: None)

    def call():
        with torch.no_grad():
            fn(*next(sets))
        sync()

    benchmark.pedantic(call, warmup_rounds=2, rounds=10 if case.kind == "model" or not GPU else 50,
                       iterations=1)
