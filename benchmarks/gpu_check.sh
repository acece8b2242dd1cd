#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine without network (e.g. the H200 machine: torch 2.11,
# transformers 5.17, accelerate and peft installed; no DeepSpeed, datasets or mistral-common, which travel as
# wheels, see benchmarks/gpu_wheels.sh and benchmarks/RESULTS.md):
#
#   1. install  the carried wheels (WHEELS, default .whl/) into a fresh --target folder put on PYTHONPATH
#   2. probe    versions, GPU, attention backends; every package crlft's GPU path imports must import
#   3. tests    python -m pytest -m gpu tests/e2e/test_gpu.py (each attention backend against an fp32 reference,
#               fused vs naive loss, a 20-step ZeRO-2 crlft.train of a 2-layer Mistral-7B-width model)
#   4. bench    benchmarks/bench_gpu.py (tokens/s, MFU, peak memory per backend, checkpointing off and on)
#   5. summary  OUT/summary.md, the one file to read (also printed)
#
#   benchmarks/gpu_check.sh [--smoke] [--out DIR] [--wheels DIR] [--budget SECONDS]
#
# Each phase runs under `timeout` so the whole stays inside --budget (default 480 s); a phase that fails or runs
# out of time is recorded and the next one still runs. OUT (default: $OUT where that is set, else
# gpu_check_out/) ends up with at most 8 files: summary.md, env.json, phases.tsv, install.log, gpu_tests.log,
# gpu_tests.xml, bench_gpu.log, bench_gpu.json. Exit status 0 when every phase passed.
#
# --smoke runs the same flow on the CPU in seconds (tests/test_benchmarks_smoke.py): the gpu tests skip,
# bench_gpu.py runs its --smoke shapes. PYTHON picks the interpreter (default python3); BENCH_ARGS replaces the
# benchmark's arguments (default: 8 Mistral-7B layers, 6 timed steps after 2 warm-up steps, both checkpointing modes).
set -uo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
smoke=0
out="${OUT:-}"
wheels="${WHEELS:-$here/.whl}"
budget=480
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --smoke) smoke=1; shift ;;
        --out) out="${2:?--out needs a folder}"; shift 2 ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
        --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
out="${out:-$here/gpu_check_out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out"/{summary.md,env.json,phases.tsv,install.log,gpu_tests.log,gpu_tests.xml,bench_gpu.log,bench_gpu.json}
cd "$here"
mode=gpu
[[ $smoke == 1 ]] && mode=smoke
start=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

remaining() { echo $(( budget - ($(date +%s) - start) )); }

# phase NAME LIMIT LOG COMMAND...: runs COMMAND under `timeout LIMIT`, output to OUT/LOG (and the terminal),
# and appends "NAME <tab> exit status <tab> seconds <tab> limit" to phases.tsv.
phase() {
    local name="$1" limit="$2" log="$3" t0 rc
    shift 3
    t0=$(date +%s)
    echo "== $name (at most ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$out/$log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$log" >>"$out/phases.tsv"
    echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s"
    return "$rc"
}
skip_phase() {  # skip_phase NAME NOTE
    printf '%s\tskipped\t0\t-\t%s\n' "$1" "$2" >>"$out/phases.tsv"
    echo "== $1: skipped ($2)"
}

# 1. install
site="$(mktemp -d "${TMPDIR:-/tmp}/crlft_gpu_site.XXXXXX")"
shopt -s nullglob
wheel_files=("$wheels"/*.whl)
shopt -u nullglob
if [[ ${#wheel_files[@]} -gt 0 ]]; then
    phase install 120 install.log "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "${wheel_files[@]}"
    ls "$site" >>"$out/install.log"
else
    echo "no wheels in $wheels: using the packages this Python already has" >"$out/install.log"
    skip_phase install "no wheels in $wheels"
fi
export PYTHONPATH="$here:$site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$site/bin:$PATH"

# 2. probe
phase probe 120 install.log "$PYTHON" benchmarks/gpu_check_report.py probe "$out/env.json"

# 3. the tests marked gpu
if [[ $smoke == 1 ]]; then tests_limit=120; else tests_limit=270; fi
phase tests "$tests_limit" gpu_tests.log "$PYTHON" -m pytest -m gpu tests/e2e/test_gpu.py -rA -p no:cacheprovider \
    --junitxml="$out/gpu_tests.xml" -o junit_logging=system-out

# 4. the benchmark, with what is left of the budget (30 s kept for the summary)
if [[ $smoke == 1 ]]; then
    read -r -a bench_args <<<"${BENCH_ARGS:---smoke --steps 1 --warmup 1 --peak-tflops 1 --checkpointing on}"
else
    read -r -a bench_args <<<"${BENCH_ARGS:---layers 8 --steps 6 --warmup 2 --checkpointing both}"
fi
bench_limit=$(( $(remaining) - 30 ))
if [[ $bench_limit -ge 30 ]]; then
    # Configurations not started 45 s before the limit are reported as skipped instead of being cut off.
    phase bench "$bench_limit" bench_gpu.log "$PYTHON" benchmarks/bench_gpu.py --json "$out/bench_gpu.json" \
        --time-budget $(( bench_limit - 45 > 10 ? bench_limit - 45 : 10 )) "${bench_args[@]}"
else
    skip_phase bench "only $(( bench_limit + 30 ))s of the ${budget}s budget left"
fi

# 5. summary
rm -rf "$site"
"$PYTHON" benchmarks/gpu_check_report.py write "$out" --mode "$mode" --budget "$budget"
status=$?
echo "gpu_check.sh ($mode): $(( $(date +%s) - start ))s; summary in $out/summary.md"
exit "$status"
