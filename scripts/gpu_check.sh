#!/usr/bin/env bash
# The GPU machine's entry point: prepare the environment, then run the one-run evidence driver.
#
#   scripts/gpu_check.sh [gpu_evidence.py options]   # every headline ratio in <= 450 s (default budget)
#   scripts/gpu_check.sh --tests [pytest options]    # the whole GPU test suite (pytest -m gpu), on its own
#   scripts/gpu_check.sh --run CMD [ARGS...]         # any command in the same environment (e.g. sm90_tune.py)
#
# Environment: wheels carried in .whl/ (e.g. nvidia-cutlass, for a fallback build of the cutlass-sm90
# library) are installed into /tmp/site with pip --no-index --no-deps; the tree itself is put on
# PYTHONPATH (every package lives under slope/ and performance_experiments/), nothing is installed.
# The prebuilt cutlass-sm90 library is build/sm90/ (carry it with the call; the driver checks it and
# rebuilds in the background when it does not match). With $OUT set (the device tool) the driver
# copies results.tgz, its log and the table there after every step; --tests and --run copy their log.
# SLOPE_GIT_COMMIT names the commit in the records (the device's copy of .git may be stale).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "!!! installing the carried wheels failed"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

case "${1:-}" in
  --tests)
    shift
    log=${OUT:-/tmp}/pytest_gpu.log
    set -o pipefail
    timeout --signal=INT --kill-after=20 "${SLOPE_GPU_TESTS_TIMEOUT_S:-560}" \
      "$PY" -m pytest -m gpu -v -rfEs -p no:cacheprovider --durations=15 tests "$@" 2>&1 | tee "$log"
    ;;
  --run)
    shift
    set -o pipefail
    "$@" 2>&1 | tee "${OUT:-/tmp}/run.log"
    ;;
  *)
    exec "$PY" performance_experiments/gpu_evidence.py "$@"
    ;;
esac
