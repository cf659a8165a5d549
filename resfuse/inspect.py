"""``python -m resfuse.inspect``: the machine code a converted model would
run on a GPU, read without one.

It converts a model on the CPU (``backend="triton"``), runs one forward
while ``kernels._common`` *records* every kernel launch instead of running
it (the launchers compute their real arguments, strides, flags and default
config from real tensors of the asked layout and dtype), gives each
recorded launch the specialization Triton's JIT would give it (ints equal
to 1 become constants, ints and pointers divisible by 16 get the
divisibility hint: Triton's own binder, with the target's backend),
compiles each distinct variant for the target arch and reads the cubin
with the wheel's ``cuobjdump``:

- registers, spill bytes (stack frame, local loads/stores), shared memory,
  CTAs per SM and occupancy (from registers, shared memory and warps);
- tensor-core instructions: HGMMA (wgmma) or HMMA (mma.sync), and count;
- in the main loop (the backward branch around the tensor-core
  instructions): async copies (``LDGSTS`` and their width), TMA loads
  (``UTMALDG``), synchronous global loads, the wgmma waits' pending counts
  and the cp.async waits' (``DEPBAR.LE SB0, n``: copy groups still in
  flight when a stage's tiles are consumed);
- ``overlap``: the loop's wgmma waits all leave >= 1 group pending and an
  async copy is issued in the loop after a wgmma is in flight (so the next
  stage's loads run under the MMA). A loop that completes several GEMM
  reductions inside its body (a persistent kernel's tile loop: each
  reduction drains with a wgmma wait 0 before its epilogue, as any GEMM's
  last step does) overlaps when every reduction does: at least two K
  steps, every wait before its drain leaving >= 1 group pending, an async
  copy issued while a group is in flight, no load staged through
  registers while its groups are in flight (``reduction_steps``). A
  one-step reduction is flagged unless Triton's IR shows resident operands
  for it: a wgmma whose two operands are shared-memory copies of values
  not loaded in a loop (computed there, or loaded once before it); the
  machine code's one-step reductions must not outnumber those wgmma ops;
- synchronous loads in the loop, and of them those staged into shared
  memory through registers (``LDG`` -> ``STS``: GEMM operands without
  cp.async, or a layout conversion), apart from loads consumed by
  arithmetic (a depthwise conv's taps, bias vectors). In a loop of one
  reduction any synchronous load is flagged (it is an operand or stalls
  the K loop); in a loop of several, each reduction's own operands must
  come by async copies (the per-reduction rule above) and the loads
  between reductions (a gate's taps, an epilogue's vectors) are counted,
  not flagged;
- global load and store widths over the whole kernel.

Each variant gets ``flags`` for what is known to be slow: spills, HMMA
where HGMMA is possible, synchronous GEMM-operand loads in the main loop,
one-step reductions, async
copies under 16 bytes, every cp.async waited to 0 (no copy in flight), no
load/MMA overlap, 2-byte scalar stores. It also
counts the compiles the first forward triggers (distinct variants) and,
with ``RESFUSE_AUTOTUNE=1``, the compile-and-benchmark runs the autotuner
would add. Analyses are cached on disk (``RESFUSE_INSPECT_CACHE``, default
``~/.cache/resfuse/inspect``) keyed by Triton's version, this file's and
the kernel source's hashes, the specialization and the arch, so a second
run is fast.

    python -m resfuse.inspect --model resnet50 --dtype bf16 --arch sm_90 \\
        [--input-layout nchw|channels_last] [--batch N] [--image 224] [--json]
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ._backends import kernels_module

#: Per-arch limits used for occupancy: (compute capability, SMs of the
#: reference part, shared memory per SM, per block, registers per SM, warps per SM).
#: sm_90: H100 SXM (132 SMs; 228 KB shared per SM, 227 KB per block;
#: NVIDIA's Hopper tuning guide); sm_80: A100 (108 SMs, 164/163 KB).
ARCHS = {
    "sm_90": dict(cc=90, sms=132, smem_sm=228 * 1024, smem_block=227 * 1024, regs_sm=65536, warps_sm=64),
    "sm_80": dict(cc=80, sms=108, smem_sm=164 * 1024, smem_block=163 * 1024, regs_sm=65536, warps_sm=64),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: This file's hash: part of every cache key, so a change to the analysis
#: never reads facts an older analyzer cached.
with open(__file__, "rb") as _f:
    _ANALYZER = hashlib.sha256(_f.read()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------

def record(fn: Callable[[], object], arch: str = "sm_90") -> List:
    """The kernel launches ``fn()`` makes, recorded instead of run
    (``kernels._common.Launch`` objects). Tensors stay on the CPU; what a
    recorded kernel would have written is left as allocated."""
    common = kernels_module("_common")
    launches = []
    common.start_recording(launches.append, ARCHS[arch]["sms"])
    try:
        with torch.no_grad():
            fn()
    finally:
        common.stop_recording()
    return launches


def record_model(model: nn.Module, x: torch.Tensor, arch: str = "sm_90", channels_last_weights: bool = True,
                 repacks: Dict = None) -> List:
    """Convert ``model`` (a copy, eval, backend="triton") and record one
    forward on ``x``; ``repacks`` (a dict) receives the per-call
    channels_last copies the conv launcher made, by operand."""
    import copy

    from .convert import convert
    from .ops import conv_bn_act as conv_op
    fused = convert(copy.deepcopy(model).eval(), backend="triton",
                    channels_last_weights=channels_last_weights).to(x.dtype)
    before = dict(conv_op.REPACKS)
    launches = record(lambda: fused(x), arch)
    if repacks is not None:
        repacks.update({k: v - before.get(k, 0) for k, v in conv_op.REPACKS.items() if v != before.get(k, 0)})
    return launches


# ----------------------------------------------------------------------------
# Specialization and compilation
# ----------------------------------------------------------------------------

@dataclass
class Variant:
    """One compiled kernel variant: what Triton would compile for a launch."""
    name: str
    fn: object
    signature: Dict
    constexprs: Dict
    attrs: Dict
    options: Dict
    config: str

    def key(self, arch: str) -> str:
        import triton
        blob = repr((triton.__version__, _ANALYZER, self.fn.cache_key, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted((k, repr(v)) for k, v in self.attrs.items()),
                     sorted((k, repr(v)) for k, v in self.options.items()), arch))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def problem(self, launch) -> str:
        """The launch's GEMM problem in words (conv kernels: C->K RxS/stride)."""
        named = {**dict(zip(self.fn.arg_names, launch.args)), **launch.kwargs}
        if all(k in named for k in ("C", "K", "R", "S", "STRIDE_H")):
            d = f"{named['C']}->{named['K']} {named['R']}x{named['S']}/{named['STRIDE_H']}"
            return d + (" +proj" if named.get("HAS_PROJ") else "") + (" +res" if named.get("HAS_RES") else "") + \
                (" +pre" if named.get("HAS_PRE") else "")
        dims = [f"{k}={named[k]}" for k in ("C", "K", "D", "N") if isinstance(named.get(k), int)]
        return " ".join(dims)

    def layout(self) -> str:
        """Which channel strides are the constant 1 (channels innermost)."""
        names = self.fn.arg_names
        ones = {names[k[0]] for k, v in self.constexprs.items() if v == 1 and len(k) == 1}
        tags = []
        for tensor, strides in (("x", ("sx_c", "sx_w")), ("w", ("sw_c", "sw_s")), ("y", ("sy_c", "sy_w"))):
            unit = [s for s in strides if s in names and s in ones]
            if unit:
                tags.append(f"{tensor}:{'C' if unit[0].endswith('_c') else 'W'}-inner")
        return " ".join(tags)


def _target(arch: str):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", ARCHS[arch]["cc"], 32)


def specialize(launch, arch: str = "sm_90", **overrides) -> Variant:
    """The variant Triton's JIT compiles for ``launch`` on ``arch``
    (``overrides``: keyword arguments replaced first, e.g. num_stages=1)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.fn
    backend = make_backend(_target(arch))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.kwargs, **overrides}
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    cfg = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_P") if k in kwargs}
    config = "x".join(str(v) for v in cfg.values()) + f" w{options.num_warps} s{options.num_stages}"
    return Variant(launch.name, fn, signature, constexprs, attrs, dict(options.__dict__), config)


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"resfuse.inspect needs the cuobjdump that Triton's wheel ships; not found at {path}")
    return path


def compile_variant(v: Variant, arch: str = "sm_90"):
    """(cubin bytes, ptx text, ttgir text, shared bytes, seconds to compile)."""
    import triton
    from triton.compiler import ASTSource
    t0 = time.perf_counter()
    ck = triton.compile(ASTSource(v.fn, v.signature, v.constexprs, v.attrs), target=_target(arch),
                        options=v.options)
    return ck.asm["cubin"], ck.asm["ptx"], ck.asm.get("ttgir", ""), ck.metadata.shared, time.perf_counter() - t0


# ----------------------------------------------------------------------------
# Reading the machine code
# ----------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _sass_lines(sass: str) -> List[Tuple[int, str]]:
    out = []
    for m in _LINE.finditer(sass):
        out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def _opcode(ins: str) -> str:
    ins = re.sub(r"^@!?U?P[T0-9]+\s+", "", ins)
    return ins.split()[0] if ins else ""


def main_loop(lines: List[Tuple[int, str]]) -> Tuple[int, int]:
    """(first, last) index of the innermost backward-branch loop that holds
    the most tensor-core instructions; (-1, -1) if none does."""
    best, best_n = (-1, -1), 0
    addr_index = {a: i for i, (a, _) in enumerate(lines)}
    for j, (a, ins) in enumerate(lines):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if not m:
            continue
        tgt = int(m.group(1), 16)
        if tgt >= a or tgt not in addr_index:
            continue
        i = addr_index[tgt]
        n = sum(1 for _, s in lines[i:j + 1] if _opcode(s).startswith(("HGMMA", "HMMA")))
        if n > best_n or (n == best_n and n and j - i < best[1] - best[0]):
            best, best_n = (i, j), n
    return best


_REG = re.compile(r"\bR(\d+)\b")
#: Data movement between a global load and the shared-memory store that
#: stages it for the MMA (packing 2-byte values, moves); arithmetic ends
#: the trace (a load feeding FFMA is an FMA operand, not a GEMM operand).
_MOVES = ("MOV", "PRMT", "F2FP", "IMAD.U32", "SHF", "LOP3", "SEL")


def _regs(operand_text: str, width: int = 4) -> set:
    """Registers a load's destination (or a store's source) covers: R24 of
    a 16-byte access is R24..R27."""
    out = set()
    for m in _REG.finditer(operand_text):
        base = int(m.group(1))
        out.update(range(base, base + max(1, width // 4)))
    return out


def staged_loads(loop: List[Tuple[int, str]]) -> int:
    """Synchronous global loads in `loop` whose value reaches a shared-memory
    store (through data movement only): GEMM operands staged by registers
    (LDG -> STS), as opposed to loads consumed by arithmetic (a depthwise
    conv's taps, a bias)."""
    n = 0
    ops = [_opcode(s) for _, s in loop]
    for k, (o, ins) in enumerate(zip(ops, (s for _, s in loop))):
        if not o.startswith("LDG") or o.startswith(("LDGSTS", "LDGDEPBAR")):
            continue
        body = re.sub(r"^@!?U?P[T0-9]+\s+", "", ins).split(None, 1)[1]
        live = _regs(body.split(",")[0], _width(o))
        for o2, ins2 in zip(ops[k + 1:k + 200], (s for _, s in loop[k + 1:k + 200])):
            parts = re.sub(r"^@!?U?P[T0-9]+\s+", "", ins2).split(None, 1)
            if len(parts) < 2:
                continue
            args = parts[1].split(",")
            if o2.startswith("STS"):
                if _regs(",".join(args[1:]), 16) & live:
                    n += 1
                    break
                continue
            srcs = _regs(",".join(args[1:]))
            dst = _regs(args[0])
            if srcs & live and o2.startswith(_MOVES):
                live |= dst
            else:
                live -= dst  # overwritten
            if not live:
                break
    return n


def reductions(loop: List[Tuple[int, str]]) -> List[Tuple[str, bool]]:
    """The GEMM reductions a loop completes inside its body (a persistent
    kernel's tile loop runs several, each drained by a wgmma wait 0 before
    its epilogue): per reduction, its K steps ('1', '2', ... wgmma commit
    groups written out, or 'loop' when they run in an inner loop) and
    whether it pipelines (at least two steps, every wait before its drain
    leaves >= 1 group pending, an async copy issued while a group is in
    flight, no load staged through registers into shared memory between
    its first wgmma and its drain). Whether a one-step reduction's
    operands are resident (so there is no load to overlap) is read from
    Triton's IR (``resident_dots``), by count: the machine code does not
    say which wgmma an IR op became. Empty when the loop drains no wgmma inside (the loop is the K
    loop of one reduction: the classic case)."""
    out, groups, waits, started, async_under, looped, seg_start = [], 0, [], False, False, False, None
    window = []  # from the reduction's first wgmma to its drain
    for a, ins in loop:
        o = _opcode(ins)
        if started or o.startswith("HGMMA"):
            window.append((a, ins))
        if seg_start is None:
            seg_start = a
        br = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if br and started and seg_start <= int(br.group(1), 16) < a:
            looped = True  # an inner K loop of this reduction (its body holds a commit group)
        if o.startswith("HGMMA"):
            started = True
            groups += "gsb0" in ins
        elif o.startswith(("LDGSTS", "UTMALDG")) and started:
            async_under = True
        m = re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", ins)
        if m:
            w = int(m.group(1), 16)
            if w == 0:
                if groups:
                    steps = "loop" if looped else str(groups)
                    # no operand staged synchronously (LDG -> STS) while its groups are in flight
                    ok = (looped or groups >= 2) and all(x >= 1 for x in waits) and async_under \
                        and staged_loads(window) == 0
                    out.append((steps, ok))
                groups, waits, started, async_under, looped, seg_start = 0, [], False, False, False, None
                window = []
            else:
                waits.append(w)
    return out


_DEF = re.compile(r"^(\s*)(%[\w.]+)(?::\d+)? = (.*)$")
#: IR ops that pass a value through (layout, shape, dtype): a loaded value
#: stays "loaded" through them.
_PASS_THROUGH = ("ttg.convert_layout", "tt.trans", "tt.reshape", "tt.bitcast", "tt.fp_to_fp", "arith.extf",
                 "arith.truncf", "tt.broadcast", "tt.expand_dims", "ttg.memdesc_trans")


def resident_dots(ttgir: str) -> int:
    """wgmma ops (``ttng.warp_group_dot``) whose two operands are both
    shared-memory copies (``ttg.local_alloc``) of values that are not
    loaded inside a loop: computed in the loop (a gnconv stage's x_0) or
    loaded once before it (a weight tile held for the whole persistent
    loop). Such a GEMM has no load to overlap; a pipelined one reads
    multi-buffered async-copy slots instead, a synchronously loaded one a
    local_alloc of a ``tt.load`` in the loop."""
    defs = {}
    for line in ttgir.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(2)] = (len(m.group(1)), m.group(3))
    top = min((ind for ind, _ in defs.values()), default=0)  # the function body's indentation

    def loaded_in_loop(name, depth=0):
        d = defs.get(name)
        if d is None or depth > 8:
            return True  # unknown: not resident
        ind, text = d
        if text.startswith("tt.load"):
            return ind > top
        if text.startswith(_PASS_THROUGH):  # a layout change or cast of a value: look at that value
            args = re.findall(r"%[\w.]+", text.split(":")[0])
            return not args or loaded_in_loop(args[0], depth + 1)
        return False  # computed

    n = 0
    for ind, text in defs.values():
        if not text.startswith("ttng.warp_group_dot"):
            continue
        ok = True
        for op in re.findall(r"%[\w.]+", text.split(":")[0])[:2]:
            d = defs.get(op)
            if d is None or not d[1].startswith("ttg.local_alloc %") or \
                    loaded_in_loop(re.findall(r"%[\w.]+", d[1])[0]):
                ok = False
                break
        n += ok
    return n


def _width(op: str) -> int:
    """Bytes of a global load/store opcode (LDG.E.U16 -> 2, LDG.E -> 4, .64 -> 8, .128 -> 16)."""
    for suffix, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return b
    return 4


@dataclass
class Report:
    """What one compiled variant is, read from its cubin (module docstring)."""
    name: str
    config: str
    layout: str
    launches: int = 0
    problems: List[str] = field(default_factory=list)
    regs: int = 0
    spill_bytes: int = 0
    shared: int = 0
    ctas_per_sm: int = 0
    occupancy: float = 0.0
    mma: str = "none"
    mma_count: int = 0
    loop_async_16b: int = 0
    loop_async_narrow: int = 0
    loop_tma: int = 0
    loop_sync_loads: int = 0
    loop_staged_loads: int = 0   # of those, GEMM operands staged through registers (LDG -> STS)
    reduction_steps: List[str] = field(default_factory=list)  # K steps of each reduction drained in the loop
    one_step_reductions: int = 0
    wgmma_waits: List[int] = field(default_factory=list)
    cp_async_waits: List[int] = field(default_factory=list)  # cp.async groups left pending at each wait
    overlap: bool = False
    load_widths: Dict[str, int] = field(default_factory=dict)
    store_widths: Dict[str, int] = field(default_factory=dict)
    compile_s: float = 0.0
    flags: List[str] = field(default_factory=list)


def analyze(cubin: bytes, ptx: str, shared: int, warps: int, arch: str = "sm_90", ttgir: str = "") -> Dict:
    """The machine-code facts of one cubin (the fields of ``Report``)."""
    tool = _cuobjdump()
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(path)
    regs = int((re.search(r"REG:(\d+)", usage) or [0, 0])[1])
    stack = int((re.search(r"STACK:(\d+)", usage) or [0, 0])[1])
    lines = _sass_lines(sass)
    ops = [_opcode(s) for _, s in lines]
    hg = sum(o.startswith("HGMMA") for o in ops)
    hm = sum(o.startswith("HMMA") for o in ops)
    local = sum(o.startswith(("STL", "LDL")) for o in ops)
    i, j = main_loop(lines)
    loop = lines[i:j + 1] if i >= 0 else []
    lops = [_opcode(s) for _, s in loop]
    waits = [int(m.group(1), 16) for _, s in loop
             for m in [re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", s)] if m]
    cp_waits = [int(m.group(1), 16) for _, s in loop
                for m in [re.search(r"\bDEPBAR\.LE\s+SB0,\s*0x([0-9a-f]+)", s)] if m]
    first_mma = next((k for k, o in enumerate(lops) if o.startswith("HGMMA")), None)
    async_after = first_mma is not None and any(o.startswith(("LDGSTS", "UTMALDG")) for o in lops[first_mma:])
    reds = reductions(loop)
    if not (len(reds) >= 2 or (reds and reds[0][0] == "loop")):
        reds = []  # one drain per iteration of a K loop: the classic case (a single-buffered K loop)
    resident = resident_dots(ttgir)
    if reds and 0 < sum(st == "1" for st, _ in reds) <= resident:
        # every one-step reduction is a GEMM on resident operands (the IR's count covers them)
        reds = [("1 (resident)", True) if st == "1" else (st, ok) for st, ok in reds]
    if reds:  # a loop of several reductions: each must pipeline
        overlap = bool(hg) and all(ok for _, ok in reds)
    else:
        overlap = bool(hg and async_after and waits and min(waits) >= 1)
    a = ARCHS[arch]
    threads = 32 * warps
    regs_alloc = -(-max(regs, 1) // 8) * 8
    by_regs = a["regs_sm"] // (regs_alloc * threads)
    by_smem = a["smem_sm"] // shared if shared else 32
    ctas = max(0, min(by_regs, by_smem, a["warps_sm"] // warps, 32))
    loads = Counter(f"{_width(o)}B" for o in ops if o.startswith("LDG") and not o.startswith("LDGSTS")
                    and not o.startswith("LDGDEPBAR"))
    stores = Counter(f"{_width(o)}B" for o in ops if o.startswith("STG"))
    return dict(
        regs=regs, spill_bytes=stack, shared=shared, ctas_per_sm=ctas,
        occupancy=round(ctas * warps / a["warps_sm"], 3),
        mma="HGMMA" if hg else "HMMA" if hm else "none", mma_count=hg or hm,
        loop_async_16b=sum(o.startswith("LDGSTS") and ".128" in o for o in lops),
        loop_async_narrow=sum(o.startswith("LDGSTS") and ".128" not in o for o in lops),
        loop_tma=sum(o.startswith("UTMALDG") for o in lops),
        loop_sync_loads=sum(o.startswith("LDG") and not o.startswith(("LDGSTS", "LDGDEPBAR")) for o in lops),
        loop_staged_loads=staged_loads(loop),
        reduction_steps=[g for g, _ in reds], one_step_reductions=sum(g == "1" for g, _ in reds),
        wgmma_waits=waits, cp_async_waits=cp_waits, overlap=overlap,
        load_widths=dict(sorted(loads.items())), store_widths=dict(sorted(stores.items())),
        _local_ops=local, _ptx_waits=sorted(set(int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)",
                                                                               ptx))))


def flags_of(r: Dict, warps: int) -> List[str]:
    """What is known to be slow in a variant (see the module docstring)."""
    out = []
    if r["spill_bytes"] or r.get("_local_ops"):
        out.append(f"spills ({r['spill_bytes']} B stack)")
    if r["mma"] == "HMMA":
        out.append("mma.sync (HMMA), not wgmma" + (" (fewer than 4 warps)" if warps < 4 else ""))
    if r["mma"] != "none":
        if r["loop_sync_loads"] and not r.get("reduction_steps"):
            out.append(f"{r['loop_sync_loads']} synchronous global loads in the main loop")
        if r.get("one_step_reductions"):
            out.append(f"{r['one_step_reductions']} one-step reductions (nothing in flight under their wgmma)")
        if r["loop_async_16b"] and r.get("cp_async_waits") and max(r["cp_async_waits"]) == 0:
            out.append("every cp.async is waited to 0 before its MMA (no copy in flight)")
        if r["loop_async_narrow"]:
            out.append(f"{r['loop_async_narrow']} async copies under 16 B in the main loop")
        if not (r["loop_async_16b"] or r["loop_tma"]):
            out.append("no 16-byte async copies (cp.async/TMA) in the main loop")
        if r["mma"] == "HGMMA" and not r["overlap"]:
            out.append(f"loads do not overlap the MMA (wgmma waits {r['wgmma_waits']})")
    if r["store_widths"].get("2B"):
        out.append(f"{r['store_widths']['2B']} 2-byte scalar stores")
    return out


def _cache_dir() -> str:
    d = os.environ.get("RESFUSE_INSPECT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "resfuse",
                                                                 "inspect")
    os.makedirs(d, exist_ok=True)
    return d


def inspect_variant(v: Variant, arch: str = "sm_90", cache: bool = True) -> Report:
    """Compile (or read from the cache) and analyze one variant."""
    path = os.path.join(_cache_dir(), v.key(arch) + ".json")
    facts = None
    if cache and os.path.exists(path):
        with open(path) as f:
            facts = json.load(f)
    if facts is None:
        cubin, ptx, ttgir, shared, secs = compile_variant(v, arch)
        facts = analyze(cubin, ptx, shared, v.options["num_warps"], arch, ttgir=ttgir)
        facts["compile_s"] = round(secs, 2)
        if cache:
            with open(path + ".tmp", "w") as f:
                json.dump(facts, f)
            os.replace(path + ".tmp", path)
    fields = {k: v_ for k, v_ in facts.items() if not k.startswith("_")}
    return Report(v.name, v.config, v.layout(), flags=flags_of(facts, v.options["num_warps"]), **fields)


# ----------------------------------------------------------------------------
# A model, end to end
# ----------------------------------------------------------------------------

@dataclass
class ModelReport:
    variants: List[Report]
    launches: int
    first_forward_compiles: int
    autotune_runs: int          # compile + benchmark runs with RESFUSE_AUTOTUNE=1
    kernels: Dict[str, int]     # launches per kernel name
    repacks: Dict[str, int] = field(default_factory=dict)  # per-call channels_last copies, by operand


def inspect_launches(launches: Sequence, arch: str = "sm_90", cache: bool = True) -> ModelReport:
    """Group recorded launches by variant, compile and analyze each."""
    groups: "OrderedDict[str, Tuple[Variant, List[str]]]" = OrderedDict()
    tune_keys = {}
    for ln in launches:
        v = specialize(ln, arch)
        groups.setdefault(v.key(arch), (v, []))[1].append(v.problem(ln))
        if ln.candidates:
            tune_keys[(ln.name, ln.tune_key)] = len(ln.candidates)
    reports = []
    for v, probs in groups.values():
        r = inspect_variant(v, arch, cache)
        r.launches, r.problems = len(probs), sorted(set(probs))
        reports.append(r)
    return ModelReport(reports, len(launches), len(groups), sum(tune_keys.values()),
                       dict(Counter(ln.name for ln in launches)))


def build_model(name: str) -> nn.Module:
    """A model as its library constructs it (random weights; OIHW conv weights)."""
    if name == "hornet_t":
        from .hornet import hornet_t
        return hornet_t()
    import torchvision
    return getattr(torchvision.models, name)(weights=None)


def model_input(name: str, batch: int, image: int, dtype, layout: str) -> torch.Tensor:
    x = torch.randn(batch, 3, image, image).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def format_report(mr: ModelReport, title: str) -> str:
    rows = [f"## {title}", "",
            f"{mr.launches} launches, {len(mr.variants)} variants: a first forward compiles "
            f"{mr.first_forward_compiles} (RESFUSE_AUTOTUNE=1 would compile and time {mr.autotune_runs}); "
            f"launches per kernel: {mr.kernels}; per-call channels_last repacks (extra copy kernels): "
            f"{mr.repacks or 'none'}", "",
            "| kernel | problems | config | layout | n | regs | spill B | smem KB | CTA/SM | occ | mma | loop 16B async | "
            "loop sync LDG (staged) | reductions in loop (K steps: count) | wgmma waits | cp.async waits | overlap | "
            "LDG widths | STG widths | compile s | flags |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in mr.variants:
        rows.append(f"| {r.name} | {', '.join(r.problems)} | {r.config} | {r.layout} | {r.launches} | {r.regs} | "
                    f"{r.spill_bytes} | "
                    f"{r.shared / 1024:.0f} | {r.ctas_per_sm} | {r.occupancy:.2f} | {r.mma} x{r.mma_count} | "
                    f"{r.loop_async_16b + r.loop_tma} | {r.loop_sync_loads} ({r.loop_staged_loads}) | "
                    f"{dict(sorted(Counter(r.reduction_steps).items())) if r.reduction_steps else '-'} | "
                    f"{sorted(set(r.wgmma_waits))} | {sorted(set(r.cp_async_waits))} | "
                    f"{'yes' if r.overlap else 'NO'} | {r.load_widths} | {r.store_widths} | {r.compile_s} | "
                    f"{'; '.join(r.flags) or 'ok'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resfuse.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50",
                   help="a torchvision model name (resnet50, resnet18, vgg16_bn, ...) or hornet_t")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    p.add_argument("--input-layout", default="channels_last", choices=("nchw", "channels_last"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--channels-last-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="convert's channels_last_weights (default on: what convert gives a model on CUDA; "
                        "--no-channels-last-weights keeps the weights as constructed: OIHW weights are then "
                        "repacked at every call)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(a.model)
    x = model_input(a.model, a.batch, a.image, DTYPES[a.dtype], a.input_layout)
    repacks = {}
    launches = record_model(model, x, a.arch, a.channels_last_weights, repacks)
    mr = inspect_launches(launches, a.arch, cache=not a.no_cache)
    mr.repacks = repacks
    title = (f"{a.model}, {a.dtype}, {a.arch}, {a.input_layout} input, batch {a.batch}, {a.image}px, "
             f"{'channels_last (convert on CUDA)' if a.channels_last_weights else 'as constructed'} weights")
    if a.json:
        print(json.dumps(dict(title=title, **asdict(mr)), indent=1))
    else:
        print(format_report(mr, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
