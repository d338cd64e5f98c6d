#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and print its path.
# CPU machines get the CPU build of torch (a bare `pip install -e .` would pull a multi-GB CUDA
# build); machines with an NVIDIA GPU get the default CUDA build.
# Usage: bash scripts/setup_venv.sh [extra,...]   (extras beyond `dev`, e.g. `deepspeed`)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SLOPE_VENV:-.venv}
EXTRAS="dev${1:+,$1}"
PY=${PYTHON:-python3}

stamp_value=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)-$EXTRAS
stamp_file="$VENV/.slope-stamp"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp_value" ] \
   && "$VENV/bin/python" -c "import slope, torch, triton" 2>/dev/null; then
  echo "$VENV" ; exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install -q --upgrade pip >&2 || true
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" >&2
else
  "$VENV/bin/python" -m pip install -q "torch==2.13.0+cpu" "triton==3.7.1" -e ".[$EXTRAS]" >&2
fi
echo "$stamp_value" > "$stamp_file"
echo "$VENV"
