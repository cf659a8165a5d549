#!/usr/bin/env bash
# One command for a GPU box (no network; its preinstalled torch, Triton, nvcc,
# ninja, pybind11, pytest, pytest-benchmark):
#
#   bash bench/device_check.sh             # run every stage
#   bash bench/device_check.sh --dry-run   # print the stages, check what a CPU machine can
#
# Stages, each under its own `timeout` so a failing stage never eats the rest:
#   env        GPU, driver, clocks, versions
#   build      the CUDA extension, when csrc/ has sources (RESFUSE_BUILD_CUDA=1 setup.py build_ext --inplace)
#   gpu_tests  python -m pytest -m gpu tests
#   sanitizer  compute-sanitizer memcheck (triton + cuda) and racecheck (cuda) on bench/sanitizer_case.py
#   bench      python bench/run.py --quick
#   inspect    python -m resfuse.inspect --model resnet50 (the machine-code report, with this box's Triton)
# then a summary table, printed last.
#
# Budget: RESFUSE_CHECK_BUDGET_S (default 470 s, inside 8 minutes). A stage's
# timeout is its cap, shortened so that every later stage keeps its minimum.
# Logs (one file, device_check.log, with a banner per stage), summary.md and the
# benchmark's .md/.csv/.png go to $OUT when it is set, else to
# bench/results/<stamp>-device_check/ (copy what is worth keeping from $OUT
# into bench/results/). At most 5 files, as the GPU tool fetches 8 at most.
set -u

cd "$(dirname "$0")/.." || exit 2
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run|-n) DRY=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (use --dry-run)" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
TOTAL=${RESFUSE_CHECK_BUDGET_S:-470}
STAMP=$(date -u +%Y%m%d-%H%M%S)
if [ -n "${OUT:-}" ]; then LOGDIR=$OUT; else LOGDIR=bench/results/$STAMP-device_check; fi
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT

# ---------------------------------------------------------------- stages ----
STAGES=(env build gpu_tests sanitizer bench inspect)
declare -A CAP=([env]=30 [build]=200 [gpu_tests]=150 [sanitizer]=120 [bench]=300 [inspect]=60)
declare -A MIN=([env]=10 [build]=60 [gpu_tests]=45 [sanitizer]=45 [bench]=90 [inspect]=20)
declare -A STATUS SECS NOTE

cu_files() { ls csrc/*.cu csrc/*.cpp 2>/dev/null; }

find_sanitizer() {
    local c
    for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
             /usr/local/cuda/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
        [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
    done
    return 1
}

# The nvcc on a PATH may be a wrapper script whose parent is not the toolkit
# root (GUIDE §3): find a root with lib64/libcudart.so.
cuda_home() {
    [ -n "${CUDA_HOME:-}" ] && { echo "$CUDA_HOME"; return; }
    local n r
    n=$(command -v nvcc 2>/dev/null) || return
    for r in "$(dirname "$(dirname "$(readlink -f "$n")")")" \
             "$(grep -o '/[^ "]*/bin/nvcc' "$n" 2>/dev/null | head -1 | xargs -r dirname | xargs -r dirname)" \
             /usr/local/cuda; do
        [ -n "$r" ] && { [ -e "$r/lib64/libcudart.so" ] || ls "$r"/lib64/libcudart.so* >/dev/null 2>&1; } \
            && { echo "$r"; return; }
    done
}

stage_cmd() {
    case "$1" in
    env)
        echo "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>&1 || echo 'nvidia-smi: not available';" \
             "$PY - <<'EOF'
import sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuDNN', torch.backends.cudnn.version())
try:
    import triton; print('triton', triton.__version__)
except Exception as e: print('triton: not importable', e)
print('cuda available:', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0); print(p.name, f'sm_{p.major}{p.minor}', p.multi_processor_count, 'SMs', round(p.total_memory/2**30), 'GiB')
for m in ('matplotlib', 'pytest_benchmark', 'torchvision'):
    try: __import__(m); print(m, 'importable')
    except Exception: print(m, 'not importable')
EOF
(nvcc --version | tail -2) 2>&1 || echo 'nvcc: not found'; echo \"compute-sanitizer: \$(find_sanitizer || echo 'not found')\"; echo \"CUDA_HOME: \$(cuda_home)\"" ;;
    build)
        if [ -f setup.py ]; then
            echo "CUDA_HOME=\"\$(cuda_home)\" TORCH_CUDA_ARCH_LIST=\"\${TORCH_CUDA_ARCH_LIST:-\$(arch_list)}\" MAX_JOBS=\${MAX_JOBS:-\$(nproc)} RESFUSE_BUILD_CUDA=1 $PY setup.py build_ext --inplace"
        else
            echo "CUDA_HOME=\"\$(cuda_home)\" TORCH_CUDA_ARCH_LIST=\"\${TORCH_CUDA_ARCH_LIST:-\$(arch_list)}\" MAX_JOBS=\${MAX_JOBS:-\$(nproc)} $PY -m pip install --no-build-isolation --no-deps --no-index -e ."
        fi ;;
    gpu_tests) echo "$PY -m pytest -m gpu tests -q -rfEs -p no:cacheprovider" ;;
    sanitizer) echo "PYTORCH_NO_CUDA_MEMORY_CACHING=1 \"\$(find_sanitizer)\" --tool memcheck --error-exitcode 99 --print-limit 20 $PY bench/sanitizer_case.py && PYTORCH_NO_CUDA_MEMORY_CACHING=1 \"\$(find_sanitizer)\" --tool racecheck --error-exitcode 99 --print-limit 20 $PY bench/sanitizer_case.py --backends cuda" ;;
    bench) echo "$PY bench/run.py --quick --out-dir \"$LOGDIR\" --summary-file \"$TMPD/bench_summary.md\" --budget-s \$BENCH_BUDGET" ;;
    inspect) echo "$PY -m resfuse.inspect --model resnet50 --dtype bf16 --arch sm_90 --batch 64" ;;
    esac
}

arch_list() {
    "$PY" -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo 9.0
}

# Why a stage would not run here ("" = it runs).
stage_skip() {
    case "$1" in
    build)
        [ -n "$(cu_files)" ] || { echo "csrc/ has no .cu/.cpp sources"; return; }
        [ -f setup.py ] || [ -f pyproject.toml ] || echo "csrc/ has sources but there is no setup.py or pyproject.toml" ;;
    sanitizer)
        find_sanitizer >/dev/null || echo "compute-sanitizer not found" ;;
    esac
}

# The timeout of stage $1 when $2 seconds of the budget are left: its cap,
# shortened so that every later stage that will run keeps its minimum
# (ASSUME_ALL=1: as if every stage ran).
stage_timeout() {
    local s=$1 left=$2 reserve=0 later=0 x t
    for x in "${STAGES[@]}"; do
        [ "$x" = "$s" ] && { later=1; continue; }
        if [ $later = 1 ] && { [ "${ASSUME_ALL:-0}" = 1 ] || [ -z "$(stage_skip "$x")" ]; }; then
            reserve=$((reserve + MIN[$x]))
        fi
    done
    t=$((left - reserve))
    [ $t -gt "${CAP[$s]}" ] && t=${CAP[$s]}
    echo $t
}

# --------------------------------------------------------------- dry run ----
if [ "$DRY" = 1 ]; then
    echo "device_check --dry-run: budget ${TOTAL}s; logs would go to $LOGDIR"
    echo
    printf '%-10s %6s %6s  %s\n' stage cap min command
    for s in "${STAGES[@]}"; do
        why=$(stage_skip "$s")
        printf '%-10s %5ss %5ss  %s\n' "$s" "${CAP[$s]}" "${MIN[$s]}" \
            "$( [ -n "$why" ] && echo "[would skip here: $why] ")$(stage_cmd "$s" | head -1 | cut -c1-100)"
    done
    echo
    left=$TOTAL; worst=""; budget_ok=1
    for s in "${STAGES[@]}"; do
        t=$(ASSUME_ALL=1 stage_timeout "$s" $left)
        [ "$t" -ge "${MIN[$s]}" ] || budget_ok=0
        worst="$worst${worst:+ + }$s ${t}"; left=$((left - t))
    done
    echo "worst case, every stage running to its timeout: $worst = $((TOTAL - left))s of ${TOTAL}s"
    echo
    fails=0
    check() {  # check NAME CMD...
        local name=$1; shift
        local t0=$SECONDS out rc
        out=$("$@" 2>&1); rc=$?
        if [ $rc -eq 0 ]; then printf '  ok    %-56s %3ss\n' "$name" $((SECONDS - t0))
        else printf '  FAIL  %-56s rc=%s\n' "$name" "$rc"; echo "$out" | tail -15 | sed 's/^/        /'; fails=$((fails + 1)); fi
    }
    info() { printf '  info  %s\n' "$*"; }
    echo "checks that need no GPU:"
    check "timeout(1) is available" command -v timeout
    check "bash syntax of this script" bash -n "$0"
    check "python imports torch and resfuse" "$PY" -c "import torch, resfuse"
    for s in "${STAGES[@]}"; do stage_cmd "$s" >/dev/null || { echo "  FAIL  stage_cmd $s"; fails=$((fails + 1)); }; done
    check "worst case fits the budget, every stage >= its minimum" test "$budget_ok" = 1
    check "bench registry + model (run.py --model-only)" "$PY" bench/run.py --model-only --quick
    check "sanitizer case on CPU (--check)" "$PY" bench/sanitizer_case.py --check
    collect() { "$PY" -m pytest --collect-only -q -m gpu tests -p no:cacheprovider >"$TMPD/collect" 2>&1; rc=$?
                [ $rc -eq 0 ] || [ $rc -eq 5 ] || { cat "$TMPD/collect"; return $rc; }; }
    check "pytest collects -m gpu tests" collect
    info "gpu tests selected: $(grep -Eo '[0-9]+/[0-9]+ tests collected|[0-9]+ tests? collected|no tests ran' "$TMPD/collect" | head -1)"
    if [ -n "$(cu_files)" ]; then
        if [ -f setup.py ] || [ -f pyproject.toml ]; then info "build: would compile $(cu_files | tr '\n' ' ')"
        else echo "  FAIL  build: csrc/ has sources but no setup.py/pyproject.toml"; fails=$((fails + 1)); fi
    else info "build: csrc/ has no .cu/.cpp sources, the stage will skip"; fi
    info "nvcc: $(command -v nvcc || echo 'not found') (CUDA_HOME would be: $(cuda_home || true))"
    info "compute-sanitizer: $(find_sanitizer || echo 'not found here (the GPU box has it)')"
    info "nvidia-smi: $(command -v nvidia-smi || echo 'not found here')"
    echo
    [ $fails -eq 0 ] && echo "dry run: all checks passed" || echo "dry run: $fails check(s) FAILED"
    exit $(( fails > 0 ))
fi

# ------------------------------------------------------------------- run ----
mkdir -p "$LOGDIR" || exit 2
LOG=$LOGDIR/device_check.log
: >"$LOG"
START=$SECONDS
DEADLINE=$((START + TOTAL))
export -f find_sanitizer cuda_home arch_list
export PY

run_stage() {
    local s=$1 t why rc t0 cmd
    t=$(stage_timeout "$s" $((DEADLINE - SECONDS)))
    why=$(stage_skip "$s")
    if [ -n "$why" ]; then STATUS[$s]=skipped; SECS[$s]=0; NOTE[$s]=$why; return; fi
    if [ $t -lt 10 ]; then STATUS[$s]=skipped; SECS[$s]=0; NOTE[$s]="no time left in the ${TOTAL}s budget"; return; fi
    export BENCH_BUDGET=$(( t > 150 ? t - 90 : t * 2 / 5 ))
    cmd=$(stage_cmd "$s")
    {
        echo
        echo "===== stage $s (timeout ${t}s) $(date -u +%H:%M:%S) ====="
        echo "\$ $cmd"
    } | tee -a "$LOG"
    t0=$SECONDS
    set -o pipefail
    timeout -k 10 "$t" bash -c "$cmd" 2>&1 | tee -a "$LOG" "$TMPD/$s.log"
    rc=$?
    set +o pipefail
    SECS[$s]=$((SECONDS - t0))
    case $rc in
        0) STATUS[$s]=ok ;;
        124|137) STATUS[$s]=TIMEOUT; NOTE[$s]="killed after ${t}s" ;;
        *) STATUS[$s]=FAIL; NOTE[$s]="exit $rc" ;;
    esac
    if [ "$s" = gpu_tests ] && [ $rc -eq 5 ]; then STATUS[$s]=ok; NOTE[$s]="no test is marked gpu"; fi
    if [ "$s" = gpu_tests ] && [ $rc -ne 5 ]; then
        local line
        line=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$TMPD/$s.log" | tail -1 | tr -d '=' | sed 's/^ *//')
        NOTE[$s]="$line${NOTE[$s]:+; ${NOTE[$s]}}"
        if [ $rc -eq 0 ] && ! echo "$line" | grep -q passed; then  # only skips: no GPU was seen
            STATUS[$s]=FAIL; NOTE[$s]="no gpu test ran: $line"
        fi
    fi
    if [ "$s" = sanitizer ]; then
        NOTE[$s]="$(grep -E 'ERROR SUMMARY|fused calls' "$TMPD/$s.log" | tail -2 | tr '\n' ' ' | sed 's/========= //')${NOTE[$s]:+; ${NOTE[$s]}}"
    fi
    if [ "$s" = bench ] && [ $rc -ne 0 ]; then
        NOTE[$s]="${NOTE[$s]}; partial results: $(ls "$LOGDIR"/*.csv 2>/dev/null | tail -1)"
    fi
}

for s in "${STAGES[@]}"; do run_stage "$s"; done

{
    echo "# device_check $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo
    echo "command: bash bench/device_check.sh; budget ${TOTAL}s, used $((SECONDS - START))s; logs: $LOGDIR"
    dev=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
    echo "device: ${dev:-unknown (nvidia-smi not available)}"
    echo
    echo "| stage | status | seconds | note |"
    echo "|---|---|---|---|"
    for s in "${STAGES[@]}"; do echo "| $s | ${STATUS[$s]} | ${SECS[$s]} | ${NOTE[$s]:-} |"; done
    echo
    if [ -s "$TMPD/bench_summary.md" ]; then
        echo "benchmark (--quick) summary:"
        echo
        cat "$TMPD/bench_summary.md"
    elif [ "${STATUS[bench]}" != skipped ]; then
        echo "benchmark: no summary (see device_check.log)"
    fi
} >"$TMPD/summary.md"
cp "$TMPD/summary.md" "$LOGDIR/summary.md"
echo
echo "=================================== summary ==================================="
cat "$TMPD/summary.md"
bad=0
for s in "${STAGES[@]}"; do case "${STATUS[$s]}" in FAIL|TIMEOUT) bad=1 ;; esac; done
exit $bad
