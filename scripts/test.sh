#!/usr/bin/env bash
# Run the test suite on a fresh or existing machine: creates/reuses .venv, then pytest.
# GPU tests (-m gpu) skip without CUDA; slow tests (a CUTLASS compile) are excluded by default.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh tests/test_layer.py -x
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup_venv.sh) || { echo "venv setup failed" >&2; exit 1; }
# Without an NVIDIA GPU, Triton kernels run in its interpreter.
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  export TRITON_INTERPRET=1
fi
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest -m "not slow" -q "$@"
rc=$?
[ $rc -eq 5 ] && { echo "no tests collected" >&2; exit 1; }
exit $rc
