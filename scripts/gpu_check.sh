#!/usr/bin/env bash
# One command for the GPU machine: install, GPU tests, benchmarks, results, summary.
#
#   scripts/gpu_check.sh [TOTAL_BUDGET_SECONDS]        (or env SLOPE_GPU_BUDGET_S; default 480)
#
# Steps (each one may fail; the next still runs and the summary says what failed):
#   1. install carried wheels from .whl/ into /tmp/site (no index, no deps) and put them on PYTHONPATH
#   2. pip install --no-deps --no-build-isolation -e .   (fallback: PYTHONPATH=the tree)
#   3. pytest -m gpu                                      (log: pytest_gpu.log)
#   4. benchmarks gemm, layer, e2e, memory, inference, overhead within the remaining budget,
#      each writing performance_experiments/results/<device>/<script>.json
#   5. summarize.py (README tables + plots), summary table
# With $OUT set (the device tool), logs + results.tgz (results/<device>/ and logs) are copied there.
# Env: SLOPE_GPU_TESTS=0 skips the tests; SLOPE_BENCHMARKS="gemm layer" picks benchmarks (add
#      sm90_tune for the cutlass-sm90 tile-configuration sweep; its variants compile during the tests;
#      SLOPE_BENCHMARKS=none runs the tests alone, with the whole budget);
#      SLOPE_GIT_COMMIT names the commit when the tree has no .git; SLOPE_SKIP_INSTALL=1 uses the
#      environment as it is; SLOPE_RESULTS_ROOT=dir writes results (and a README) there instead.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUDGET=${1:-${SLOPE_GPU_BUDGET_S:-480}}
START=$SECONDS
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOGDIR=${SLOPE_LOG_DIR:-/tmp/slope_gpu_check}
mkdir -p "$LOGDIR"
exec 3>&1 4>&2 > >(tee -a "$LOGDIR/gpu_check.log") 2>&1

declare -a SUMMARY=()
left() { echo $(( BUDGET - (SECONDS - START) )); }
record() { SUMMARY+=("$(printf '%-12s %-28s %5ss' "$1" "$2" "$3")"); }

# run_step NAME TIMEOUT_S CMD...: runs CMD under `timeout`, logs to $LOGDIR/NAME.log, records status.
run_step() {
  local name=$1 limit=$2; shift 2
  if (( limit < 15 )); then
    echo "=== $name: skipped (budget left $(left)s)"; record "$name" "skipped (budget)" 0; return
  fi
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$LOGDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT (rc $rc)"; elif (( rc != 0 )); then status="FAILED (rc $rc)"; fi
  echo "=== $name: $status in $((SECONDS - t0))s"
  record "$name" "$status" $((SECONDS - t0))
}

echo "=== slope gpu_check: budget ${BUDGET}s, $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -3

# 1. carried wheels
if compgen -G ".whl/*.whl" > /dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; record wheels ok 0
  else
    record wheels "FAILED" 0
  fi
else
  record wheels "none carried" 0
fi

# 2. the project
t0=$SECONDS
if [[ "${SLOPE_SKIP_INSTALL:-0}" == "1" ]]; then
  record install "skipped (SLOPE_SKIP_INSTALL=1)" 0
elif $PY -m pip install -q --no-deps --no-build-isolation -e . > "$LOGDIR/install.log" 2>&1; then
  record install "ok (pip -e)" $((SECONDS - t0))
else
  tail -5 "$LOGDIR/install.log"
  # every package lives under slope/, so the tree itself is importable.
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  record install "FAILED; PYTHONPATH=tree" $((SECONDS - t0))
fi
$PY -c "import torch, triton, slope; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('slope from', slope.__file__)" \
  || echo "!!! import check failed"
DEVICE=$($PY -c "import sys; sys.path.insert(0, '.'); from performance_experiments.common import device_slug; print(device_slug())" 2>/dev/null || echo unknown-gpu)
RESULTS_ROOT=${SLOPE_RESULTS_ROOT:-performance_experiments/results}
SUMMARY_ARGS=(--results-dir "$RESULTS_ROOT" --device "$DEVICE")
[[ -n "${SLOPE_RESULTS_ROOT:-}" ]] && SUMMARY_ARGS+=(--readme "$RESULTS_ROOT/README.md")
RESULTS=$RESULTS_ROOT/$DEVICE
mkdir -p "$RESULTS"
echo "=== device slug: $DEVICE; results go to $RESULTS"

BENCHES=${SLOPE_BENCHMARKS:-"gemm layer e2e memory inference overhead breakdown"}
# sm90_tune compiles its kernel variants on the CPU cores while the GPU tests run.
TUNE_BUILD_PID=
if [[ " $BENCHES " == *" sm90_tune "* ]]; then
  echo "=== sm90_tune variants: building in the background (log: sm90_tune_build.log)"
  $PY performance_experiments/sm90_tune.py --build-only --jobs 12 > "$LOGDIR/sm90_tune_build.log" 2>&1 &
  TUNE_BUILD_PID=$!
fi

# 3. GPU tests (at most 40% of the budget)
if [[ "${SLOPE_GPU_TESTS:-1}" != "0" ]]; then
  if [[ "$BENCHES" == "none" ]]; then
    limit=$(( $(left) - 40 ))  # a tests-only run (the whole suite needs ~5 min on an H100)
  else
    limit=$(( $(left) * 2 / 5 )); (( limit > 240 )) && limit=240
  fi
  run_step pytest_gpu "$limit" $PY -m pytest -m gpu -v -rfEs -p no:cacheprovider --durations=10 tests
  # A build killed by the time limit leaves torch's build lock behind; later builds would wait on it.
  find "${SLOPE_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/slope/torch_extensions}" \
       "${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}" -name lock -delete 2>/dev/null
else
  record pytest_gpu "skipped (SLOPE_GPU_TESTS=0)" 0
fi

# 4. benchmarks: each gets its share of what is left; --budget-s stops new cases, timeout kills.
if [[ -n "$TUNE_BUILD_PID" ]]; then
  while kill -0 "$TUNE_BUILD_PID" 2>/dev/null && (( $(left) > 120 )); do sleep 2; done
  cat "$LOGDIR/sm90_tune_build.log"
fi
declare -A SHARE=([gemm]=30 [layer]=15 [e2e]=25 [memory]=10 [inference]=12 [overhead]=8 [breakdown]=8 [sm90_tune]=30)
total_share=0; [[ "$BENCHES" == "none" ]] && BENCHES=""
for b in $BENCHES; do total_share=$(( total_share + ${SHARE[$b]:-10} )); done
for b in $BENCHES; do
  rest=$(( $(left) - 25 ))
  share=$(( rest * ${SHARE[$b]:-10} / total_share )); total_share=$(( total_share - ${SHARE[$b]:-10} ))
  soft=$(( share - 20 )); (( soft < 5 )) && soft=5
  run_step "$b" "$share" $PY "performance_experiments/$b.py" --budget-s "$soft" --out-dir "$RESULTS_ROOT"
done

# 5. tables, plots, summary
run_step summarize 60 $PY performance_experiments/summarize.py "${SUMMARY_ARGS[@]}"
echo
echo "=================== gpu_check summary ($DEVICE, $((SECONDS - START))s of ${BUDGET}s)"
printf '%s\n' "${SUMMARY[@]}" | tee "$LOGDIR/summary.txt"
if [[ -f "$LOGDIR/pytest_gpu.log" ]]; then
  echo "--- pytest -m gpu:"; grep -E "passed|failed|error|skipped in|no tests ran" "$LOGDIR/pytest_gpu.log" | tail -3 | tee -a "$LOGDIR/summary.txt"
fi
$PY performance_experiments/summarize.py "${SUMMARY_ARGS[@]}" --brief 2>/dev/null | tee -a "$LOGDIR/summary.txt"

exec 1>&3 2>&4 3>&- 4>&-  # close the tee so that gpu_check.log is complete before it is copied
sleep 1
if [[ -n "${OUT:-}" ]]; then
  cp "$LOGDIR/gpu_check.log" "$LOGDIR/summary.txt" "$OUT/" 2>/dev/null
  [[ -f "$LOGDIR/pytest_gpu.log" ]] && cp "$LOGDIR/pytest_gpu.log" "$OUT/"
  mkdir -p "$RESULTS/logs" && cp "$LOGDIR"/*.log "$RESULTS/logs/" 2>/dev/null
  tar czf "$OUT/results.tgz" "$RESULTS" && echo "=== copied logs and results.tgz to \$OUT"
  rm -rf "$RESULTS/logs"
fi
