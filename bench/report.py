"""Result rows -> markdown table, CSV, PNG plot and a compact summary."""

import csv
import math
import os
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence

#: Every column of a result row, in CSV order.
COLUMNS = ("case", "kind", "shape", "count", "dtype", "batch", "gflop", "fused_mb", "unfused_mb", "flop_per_byte",
           "floor_us", "bound", "provider", "status", "time_us", "p20_us", "p80_us", "graph", "img_s",
           "speedup", "pct_floor", "rel_err", "tol", "setup_s", "note")

CPU_NOTE = ("CPU timings are no evidence about the kernels: on a CPU only PyTorch eager and resfuse's "
            "eager (folded) path run, and that is all these numbers time.")


def _fmt(v, digits=3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    rows = [[_fmt(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def timed_table(rows: List[dict]) -> str:
    headers = ("case", "dtype", "N", "GFLOP", "MB fused", "MB eager seq", "floor us", "bound",
               "provider", "median us", "spread %", "img/s", "x eager", "% floor", "err/tol", "status")
    body = []
    for r in rows:
        g = r.get
        errtol = f"{r['rel_err']:.1e}/{r['tol']:.1e}" if g("rel_err") is not None else "-"
        spread = 100 * (r["p80_us"] - r["p20_us"]) / r["time_us"] if g("time_us") else None  # (p80 - p20) / median
        body.append((r["case"], r["dtype"], r["batch"], r["gflop"], r["fused_mb"], r["unfused_mb"], g("floor_us"),
                     g("bound"), r["provider"], g("time_us"), spread, g("img_s"), g("speedup"), g("pct_floor"), errtol,
                     r["status"] + (f" ({r['note']})" if g("note") else "")))
    return markdown_table(headers, body)


def model_table(rows: List[dict]) -> str:
    headers = ("case", "layers", "op", "dtype", "N", "GFLOP", "MB fused", "MB eager seq", "eager/fused bytes",
               "FLOP/byte", "floor us", "bound")
    body = []
    for r in rows:
        ratio = r["unfused_mb"] / r["fused_mb"] if r["fused_mb"] else None
        body.append((r["case"], r["count"], r["shape"], r["dtype"], r["batch"], r["gflop"], r["fused_mb"],
                     r["unfused_mb"], ratio, r["flop_per_byte"], r["floor_us"], r["bound"]))
    return markdown_table(headers, body)


def header_lines(env: Dict[str, str], extra: Sequence[str] = ()) -> List[str]:
    return [f"{k}: {v}" for k, v in env.items()] + list(extra)


class CsvWriter:
    """Writes rows as they complete (a run cut short keeps what it did);
    the header lines go first, each starting with '# '."""

    def __init__(self, path: str, header: Sequence[str]):
        self.path = path
        self._f = open(path, "w", newline="")
        for line in header:
            self._f.write(f"# {line}\n")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS, extrasaction="ignore")
        self._w.writeheader()
        self._f.flush()

    def write(self, row: dict) -> None:
        self._w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def geomean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


#: Kinds whose summary columns appear only when the rows have that kind.
OPTIONAL_KINDS = (("horblock", "horblock"), ("train", "train"))


def summary(rows: List[dict]) -> str:
    """Per provider and dtype: how many cases ran, failed the check, or
    errored; geomean speedup vs eager and median % of floor over layer
    cases, the same over block cases and over gnconv cases (and over
    HorBlock forward and training cases, when there are any); img/s of each
    model case."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["provider"], r["dtype"])].append(r)
    lines = []
    body = []
    extra = [(k, label) for k, label in OPTIONAL_KINDS if any(r["kind"] == k for r in rows)]
    for (prov, dt), rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] == "ok"]
        wrong = sum(r["status"].startswith("WRONG") for r in rs)
        err = sum(r["status"].startswith("error") for r in rs)
        skipped = len(rs) - len(ok) - wrong - err
        layer_ok = [r for r in ok if r["kind"] == "layer"]
        block_ok = [r for r in ok if r["kind"] == "block"]
        gn_ok = [r for r in ok if r["kind"] == "gnconv"]
        pf = sorted(r["pct_floor"] for r in layer_ok if r.get("pct_floor") is not None)
        bpf = sorted(r["pct_floor"] for r in block_ok if r.get("pct_floor") is not None)
        gpf = sorted(r["pct_floor"] for r in gn_ok if r.get("pct_floor") is not None)
        models = ", ".join(f"{r['case'].split('.', 1)[1]}@{r['batch']} {r['img_s']:.0f}"
                           for r in ok if r["kind"] == "model" and r.get("img_s"))
        more = []
        for k, _ in extra:
            k_ok = [r for r in ok if r["kind"] == k]
            kpf = sorted(r["pct_floor"] for r in k_ok if r.get("pct_floor") is not None)
            more += [geomean([r["speedup"] for r in k_ok]), kpf[len(kpf) // 2] if kpf else None]
        body.append((prov, dt, len(ok), wrong, err, skipped,
                     geomean([r["speedup"] for r in layer_ok]), pf[len(pf) // 2] if pf else None,
                     geomean([r["speedup"] for r in block_ok]), bpf[len(bpf) // 2] if bpf else None,
                     geomean([r["speedup"] for r in gn_ok]), gpf[len(gpf) // 2] if gpf else None,
                     *more, models or "-"))
    heads = [h for _, label in extra for h in (f"{label}: geomean x eager", f"{label}: median % floor")]
    lines.append(markdown_table(("provider", "dtype", "ok", "wrong", "error", "skipped", "layers: geomean x eager",
                                 "layers: median % floor", "blocks: geomean x eager", "blocks: median % floor",
                                 "gnconv: geomean x eager", "gnconv: median % floor", *heads, "models img/s"),
                                body))
    return "\n".join(lines)


def plot(rows: List[dict], path: str, title: str) -> Optional[str]:
    """Horizontal bars: speedup over eager per case (dtype, batch) and
    provider. Returns None when written, else why not (matplotlib missing,
    nothing to plot)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"no plot: matplotlib is not importable ({type(e).__name__}); pip install matplotlib"
    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup") and r["provider"] != "eager"]
    if not ok:
        return "no plot: no timed results beside eager's"
    labels = list(dict.fromkeys(f"{r['case']} {r['dtype']} N={r['batch']}" for r in ok))
    provs = list(dict.fromkeys(r["provider"] for r in ok))
    val = {(f"{r['case']} {r['dtype']} N={r['batch']}", r["provider"]): r["speedup"] for r in ok}
    h = 0.8 / max(1, len(provs))
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.22 * len(labels) * max(1, len(provs)) + 1.5)))
    for i, p in enumerate(provs):
        pts = [(j + i * h, val[(lab, p)]) for j, lab in enumerate(labels) if (lab, p) in val]
        # bars grow from 1 (eager): right is faster, left is slower
        ax.barh([y for y, _ in pts], [v - 1.0 for _, v in pts], left=1.0, height=h, label=p)
        for y, v in pts:
            ax.text(v, y, f" {v:.2f}" if v >= 1 else f"{v:.2f} ", va="center", ha="left" if v >= 1 else "right",
                    fontsize=6)
    vals = list(val.values()) + [1.0]
    ax.set_xlim(min(vals) / 1.6, max(vals) * 1.6)
    ax.set_yticks([j + 0.4 - h / 2 for j in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over eager PyTorch (median time ratio; >1 is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def device_tag(device_str: str) -> str:
    tag = "".join(ch if ch.isalnum() else "-" for ch in device_str.lower())
    while "--" in tag:
        tag = tag.replace("--", "-")
    return tag.strip("-")[:40] or "device"


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
