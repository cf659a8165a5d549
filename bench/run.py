"""Benchmark resfuse against eager PyTorch and torch.compile, beside the
FLOP/byte model's floor.

    python bench/run.py --quick                      # small subset (CPU or GPU)
    python bench/run.py                              # every case, dtype, batch
    python bench/run.py --case resnet50.conv --dtype bf16 --batch 32 --provider eager,resfuse-triton
    python bench/run.py --kind block --dtype bf16    # every ResNet-18/50 residual block shape
    python bench/run.py --kind gnconv --dtype bf16   # HorNet-T's gnconv at its four stage shapes
    python bench/run.py --kind train --dtype bf16    # gnconv and HorBlock forward + backward (training)
    python bench/run.py --model-only                 # the model's columns for every case, no timing

Prints a markdown table and writes ``<stamp>-<device>-<tag>.{md,csv,png}``
to ``bench/results/`` (GPU runs; CPU runs go to ``bench/results/_scratch/``,
which git ignores: they are no evidence about the kernels), or to
``--out-dir``. The CSV is written row by row, so a run cut short keeps what
it measured. Every result starts with the date, command, device, clocks,
versions and the measured ceilings.

For each (case, dtype, batch) every provider's output is first compared
with the float64 reference by the tests' rule (tests/numerics.py); one that
fails is reported WRONG and not timed. A training case's call is a whole
step (forward + backward): its output, x's gradient and the main
parameters' gradients are each checked, and the row's err/tol is the worst
of them (``cases.check``). Timing method: ``bench/timing.py``. Cost
model: ``bench/model/`` (``rules``, ``conv``, and ``gnconv`` for HorNet's
ops, ``bench/cases_hornet.py``).
"""

import argparse
import datetime
import gc
import importlib.util
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import cases as case_registry  # noqa: E402
from bench import providers as prov  # noqa: E402
from bench import report, timing  # noqa: E402
from bench.model import arithmetic_intensity  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")


def load_numerics():
    """tests/numerics.py: the one definition of "correct" (GUIDE §3)."""
    path = os.path.join(ROOT, "tests", "numerics.py")
    spec = importlib.util.spec_from_file_location("resfuse_tests_numerics", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _csv_list(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small subset (cases marked quick, fewer dtypes/batches)")
    p.add_argument("--case", action="append", help="substring of case names (repeatable, comma-separated)")
    p.add_argument("--kind", choices=case_registry.KIND_ORDER, action="append",
                   help="only cases of this kind (repeatable): " + ", ".join(case_registry.KIND_ORDER))
    p.add_argument("--dtype", help="comma-separated: fp32,fp16,bf16")
    p.add_argument("--batch", help="comma-separated batch sizes (default 1,32,256; --quick: 32,1 on GPU)")
    p.add_argument("--provider", help="comma-separated, from: " + ", ".join(prov.PROVIDERS))
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--model-only", action="store_true",
                   help="print the FLOP/byte model for the selected cases; time nothing, measure no ceilings")
    p.add_argument("--graphs", choices=("auto", "always", "never"), default="auto",
                   help="CUDA graphs: auto = at batch 1 only")
    p.add_argument("--budget-s", type=float, help="stop starting new work after this many seconds "
                                                  "(default: 240 with --quick on a GPU, 100 on a CPU, else none)")
    p.add_argument("--provider-budget-s", type=float, default=600.0,
                   help="skip a provider once its set-up (compile, autotune) has taken this long in total")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (default: on, eager's best algorithm)")
    p.add_argument("--out-dir", help="where results go (default bench/results/, CPU: bench/results/_scratch/)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-files", action="store_true", help="print only, write nothing")
    p.add_argument("--summary-file", help="also write the compact summary table here")
    p.add_argument("--cpu-threads", type=int, help="torch.set_num_threads on a CPU run (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.case:
        args.case = [c for group in args.case for c in _csv_list(group)]
    return args


class Plan:
    """What this run does, resolved from the arguments and the device."""

    def __init__(self, args):
        self.args = args
        if args.device:
            self.device = torch.device(args.device)
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        gpu = self.device.type == "cuda"
        self.gpu = gpu
        names = _csv_list(args.dtype) or (["bf16"] if (args.quick and gpu) else
                                          ["fp32", "fp16", "bf16"] if gpu else ["fp32"])
        bad = [d for d in names if d not in case_registry.DTYPES]
        if bad:
            raise SystemExit(f"unknown dtype(s) {bad}; choose from {list(case_registry.DTYPES)}")
        self.dtypes = [case_registry.DTYPES[d] for d in names]
        if args.batch:
            self.batches = [int(b) for b in _csv_list(args.batch)]
        elif args.quick:
            self.batches = [32, 1] if gpu else [1]
        elif gpu or args.model_only:
            self.batches = list(case_registry.BATCHES)
        else:
            self.batches = [1]  # CPU: a 2-core box would take hours at 256
        default = (prov.QUICK_GPU if args.quick else prov.DEFAULT_GPU) if gpu else \
                  (prov.QUICK_CPU if args.quick else prov.DEFAULT_CPU)
        self.providers = _csv_list(args.provider) or list(default)
        bad = [x for x in self.providers if x not in prov.PROVIDERS]
        if bad:
            raise SystemExit(f"unknown provider(s) {bad}; choose from {list(prov.PROVIDERS)}")
        self.cases = case_registry.select(args.case, quick=args.quick, kinds=args.kind)
        if not self.cases:
            raise SystemExit("no case matches the filters; see --model-only for the list")
        if args.budget_s is not None:
            self.budget_s = args.budget_s
        elif args.quick:
            self.budget_s = 240.0 if gpu else 100.0
        else:
            self.budget_s = float("inf")
        self.tag = "quick" if args.quick else ("full" if not (args.case or args.dtype or args.batch or args.provider
                                                              or args.kind) else "custom")

    def work(self):
        """(batch, dtype, case) in run order: batch-major, so a budget cut
        drops the later batch sizes first."""
        for batch in self.batches:
            for dtype in self.dtypes:
                for case in self.cases:
                    if self.args.quick and case.kind in case_registry.FIRST_BATCH_ONLY_KINDS \
                            and batch != self.batches[0]:
                        continue  # --quick: models and HorNet's cases at the first batch size only
                    if batch in case.batches or self.args.batch:
                        yield batch, dtype, case


def base_row(case, dtype, batch, ceilings):
    c = case.cost(batch, dtype)
    fl = case.floor(batch, dtype, ceilings) if ceilings else None
    return {
        "case": case.name, "kind": case.kind, "shape": case.describe(), "count": case.count,
        "dtype": case_registry.DTYPE_NAMES[dtype], "batch": batch,
        "gflop": c.flops / 1e9, "fused_mb": c.fused_bytes / 1e6, "unfused_mb": c.unfused_bytes / 1e6,
        "flop_per_byte": arithmetic_intensity(c),
        "floor_us": fl.seconds * 1e6 if fl else None, "bound": fl.bound if fl else None,
    }


def _is_fatal_cuda_error(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, RuntimeError) and any(s in msg for s in (
        "illegal memory access", "unspecified launch failure", "device-side assert", "CUDA error: an illegal"))


class Runner:
    def __init__(self, plan: Plan, numerics, ceilings, out):
        self.plan, self.numerics, self.ceilings, self.out = plan, numerics, ceilings, out
        self.t0 = time.perf_counter()
        self.setup_spent = {p: 0.0 for p in plan.providers}
        self.rows = []
        self.unavailable = {}

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.plan.budget_s

    def emit(self, row):
        self.rows.append(row)
        if self.out is not None:
            self.out.write(row)

    def run_workload(self, batch, dtype, case):
        plan = self.plan
        base = base_row(case, dtype, batch, self.ceilings)
        providers = plan.providers
        if plan.args.quick and case.quick_providers is not None:
            providers = [p for p in providers if p in case.quick_providers]
        avail = prov.available(providers, plan.device, dtype)
        for p, why in avail.items():
            if why:
                self.unavailable.setdefault((p, base["dtype"]), "; ".join(why))
        # the baseline first: every later row gets its speedup as soon as it is measured
        runnable = sorted((p for p in providers if not avail[p]), key=lambda p: p != prov.BASELINE)
        if not runnable:
            return
        if self.over_budget():
            for p in runnable:
                self.emit(dict(base, provider=p, status="skipped", note="run budget spent"))
            return
        op = case_registry.OPS[case.op]
        n_sets = 1
        if plan.gpu:
            n_sets = timing.rotation_count(op.set_bytes(case, batch, dtype), timing.l2_bytes(plan.device),
                                           op.max_sets())
        try:
            wl = op.make_workload(case, plan.device, dtype, batch, n_sets, plan.args.seed)
            eager_out = op.build("eager", wl)(*wl.arg_sets[0])
        except Exception as e:  # noqa: BLE001  (OOM for the largest cases, say)
            if _is_fatal_cuda_error(e):
                raise
            for p in runnable:
                self.emit(dict(base, provider=p, status="error", note=f"workload: {type(e).__name__}: {e}"[:160]))
            return
        tol = case_registry.tolerances(self.numerics, eager_out, wl.reference, dtype)
        del eager_out
        graph = plan.gpu and (plan.args.graphs == "always" or (plan.args.graphs == "auto" and batch == 1))
        base_us = None
        for p in runnable:
            row = dict(base, provider=p, graph=graph if plan.gpu else None)
            if self.over_budget():
                self.emit(dict(row, status="skipped", note="run budget spent"))
                continue
            if self.setup_spent[p] > plan.args.provider_budget_s:
                self.emit(dict(row, status="skipped", note=f"{p} set-up budget spent"))
                continue
            row = self.run_provider(op, wl, p, row, tol, graph)
            if p == prov.BASELINE:
                base_us = row.get("time_us")
            if base_us and row.get("time_us"):
                row["speedup"] = base_us / row["time_us"]
            self.emit(row)
        del wl
        gc.collect()
        if plan.gpu:
            torch.cuda.empty_cache()

    def run_provider(self, op, wl, p, row, tol, graph):
        t = time.perf_counter()
        try:
            fn = op.build(p, wl)
            out = fn(*wl.arg_sets[0])  # compiles / autotunes
            if self.plan.gpu:
                torch.cuda.synchronize()
            err, tol, worst = case_registry.check(self.numerics, out, wl.reference, tol)
            del out
        except Exception as e:  # noqa: BLE001
            if _is_fatal_cuda_error(e):
                raise
            self.setup_spent[p] += time.perf_counter() - t
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return dict(row, status="error", note=f"{type(e).__name__}: {msg}"[:160],
                        setup_s=time.perf_counter() - t)
        setup = time.perf_counter() - t
        self.setup_spent[p] += setup
        row.update(rel_err=err, tol=tol, setup_s=setup)
        if not err <= tol:
            what = f"{worst} differs" if worst else "output differs"
            row.update(status="WRONG", note=f"{what} from the float64 reference beyond tolerance; not timed")
            return row
        sets = wl.arg_sets
        fns = [lambda a=a: fn(*a) for a in sets]
        try:
            with torch.no_grad():
                tm = timing.time_calls(self.plan.device, fns, graph=graph)
        except Exception as e:  # noqa: BLE001
            if _is_fatal_cuda_error(e):
                raise
            if graph:  # not capturable: time without a graph, and say so
                try:
                    with torch.no_grad():
                        tm = timing.time_calls(self.plan.device, fns, graph=False)
                    row["note"] = f"no CUDA graph ({type(e).__name__})"
                    graph = False
                except Exception as e2:  # noqa: BLE001
                    return dict(row, status="error", note=f"timing: {type(e2).__name__}: {e2}"[:160])
            else:
                return dict(row, status="error", note=f"timing: {type(e).__name__}: {e}"[:160])
        row.update(status="ok", time_us=tm.median_s * 1e6, p20_us=tm.p20_s * 1e6, p80_us=tm.p80_s * 1e6,
                   graph=graph if self.plan.gpu else None, img_s=wl.batch / tm.median_s)
        if row.get("floor_us"):
            row["pct_floor"] = 100.0 * row["floor_us"] / row["time_us"]
        if p == "resfuse-triton" and not self.plan.gpu:
            row["note"] = "Triton interpreter: checked, but its timing means nothing"
        extra = op.note(wl, p)  # models: 'n/m convs fused'; blocks: which fused ops ran
        if extra:
            row["note"] = "; ".join(x for x in (row.get("note"), extra) if x)
        return row


def ceilings_lines(ceil, gpu):
    if ceil is None:
        return ["ceilings: not measured (--model-only): floor columns omitted"]
    rates = ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" if v >= 1e12 else f"{k} {v / 1e9:.1f} GFLOP/s"
                      for k, v in ceil.matmul.items())
    label = "" if gpu else " (CPU ceilings: the floor and % floor describe this CPU, not a GPU)"
    return [f"ceilings: copy {ceil.bandwidth / 1e9:.0f} GB/s (read + write), matmul {rates}; "
            f"{ceil.source}{label}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = Plan(args)
    argv_full = ["bench/run.py"] + (list(argv) if argv is not None else sys.argv[1:])
    if args.cpu_threads and not plan.gpu:
        torch.set_num_threads(args.cpu_threads)
    env = timing.environment(plan.device, ["python"] + argv_full)
    if plan.gpu:
        if not args.no_cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        env["cudnn.benchmark"] = str(torch.backends.cudnn.benchmark)
    extra = []
    if not plan.gpu:
        extra.append("NOTE: " + report.CPU_NOTE)
    ceil = None
    if not args.model_only:
        ceil = timing.measure_ceilings(plan.device, plan.dtypes)
    extra += ceilings_lines(ceil, plan.gpu)
    header = report.header_lines(env, extra)
    print("\n".join(header), flush=True)

    if args.model_only:
        rows = [base_row(case, dt, b, None) for b, dt, case in plan.work()]
        print()
        print(report.model_table(rows))
        return 0

    stem = None
    out = None
    if not args.no_files:
        out_dir = args.out_dir or (RESULTS if plan.gpu else os.path.join(RESULTS, "_scratch"))
        report.ensure_dir(out_dir)
        dev = timing.gpu_name(plan.device) if plan.gpu else "cpu"
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        stem = os.path.join(out_dir, f"{stamp}-{report.device_tag(dev)}-{plan.tag}")
        out = report.CsvWriter(stem + ".csv", header)

    numerics = load_numerics()
    runner = Runner(plan, numerics, ceil, out)
    work = list(plan.work())
    print(f"\n{len(work)} workloads x {len(plan.providers)} providers "
          f"({', '.join(plan.providers)}); budget {plan.budget_s:g} s", flush=True)
    fatal = None
    with torch.no_grad():
        for i, (batch, dtype, case) in enumerate(work):
            t = time.perf_counter()
            try:
                runner.run_workload(batch, dtype, case)
            except Exception as e:  # noqa: BLE001  (a dead CUDA context: nothing after it can be trusted)
                fatal = f"{case.name} {case_registry.DTYPE_NAMES[dtype]} N={batch}: {type(e).__name__}: {e}"
                traceback.print_exc()
                break
            done = [r for r in runner.rows if r["case"] == case.name and r["batch"] == batch
                    and r["dtype"] == case_registry.DTYPE_NAMES[dtype]]
            states = ", ".join(f"{r['provider']} {r['status']}" for r in done)
            print(f"[{i + 1}/{len(work)}] {case.name} {case_registry.DTYPE_NAMES[dtype]} N={batch}: "
                  f"{states} ({time.perf_counter() - t:.1f} s)", flush=True)
            if stem:
                write_markdown(stem + ".md", header, runner, plan, fatal=None, final=False)
    if out is not None:
        out.close()

    table = report.timed_table(runner.rows)
    summ = report.summary(runner.rows)
    print()
    print("\n".join(header))
    print()
    print(table)
    print()
    print(unavailable_text(runner))
    if fatal:
        print(f"\nSTOPPED: {fatal}")
    print("\nSummary\n\n" + summ)
    if not plan.gpu:
        print("\n" + report.CPU_NOTE)
    if stem:
        write_markdown(stem + ".md", header, runner, plan, fatal=fatal, final=True)
        why = None if args.no_plot else report.plot(runner.rows, stem + ".png",
                                                    f"{env.get('device', '')[:60]} | {plan.tag} | {env['date']}")
        print(f"\nwrote {os.path.relpath(stem)}.md, .csv" + ("" if args.no_plot or why else ", .png")
              + (f" ({why})" if why else ""))
    if args.summary_file:
        with open(args.summary_file, "w") as f:
            f.write(summ + "\n" + (f"\nSTOPPED: {fatal}\n" if fatal else ""))
    return 1 if fatal else 0


def unavailable_text(runner) -> str:
    if not runner.unavailable:
        return "All selected providers could run."
    lines = ["Providers not run:"]
    lines += [f"- {p} ({dt}): {why}" for (p, dt), why in sorted(runner.unavailable.items())]
    return "\n".join(lines)


def write_markdown(path, header, runner, plan, fatal, final):
    with open(path, "w") as f:
        f.write("# resfuse benchmark\n\n```\n" + "\n".join(header) + "\n```\n\n")
        f.write(report.timed_table(runner.rows) + "\n\n")
        f.write(unavailable_text(runner) + "\n")
        if fatal:
            f.write(f"\nSTOPPED: {fatal}\n")
        if not final:
            f.write("\n(run in progress or cut short)\n")
        f.write("\n## Summary\n\n" + report.summary(runner.rows) + "\n")
        if not plan.gpu:
            f.write("\n" + report.CPU_NOTE + "\n")


if __name__ == "__main__":
    sys.exit(main())
