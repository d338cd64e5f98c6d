#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and print its path.
# CPU machines (no NVIDIA GPU) install exactly the versions pinned in requirements/cpu.lock, so a
# new upstream release cannot change what CI runs; refresh the lock with scripts/lock.sh.
# SLOPE_VENV / SLOPE_LOCK pick another venv folder / constraints file.
# Machines with an NVIDIA GPU get the newest CUDA builds that pyproject.toml's ranges allow.
# One venv serves both README commands (train.sh and test.sh): it always has the extras the tests
# exercise (dev, deepspeed, tensorboard, peft), so switching between them never reinstalls anything.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SLOPE_VENV:-.venv}
LOCK=${SLOPE_LOCK:-requirements/cpu.lock}   # scripts/test_oldest.sh sets requirements/oldest.txt
PY=${PYTHON:-python3}
EXTRAS="dev,deepspeed,tensorboard,peft"   # scripts/lock.sh resolves the same
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

stamp_value=$(cat pyproject.toml scripts/setup_venv.sh "$LOCK" | sha256sum | cut -c1-16)
stamp_file="$VENV/.slope-stamp"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp_value" ] \
   && "$VENV/bin/python" -c "import slope, torch, triton" 2>/dev/null; then
  echo "$VENV" ; exit 0
fi

echo "setting up $VENV (the first time takes a few minutes) ..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" >&2
export DS_BUILD_OPS=0   # DeepSpeed without its CUDA ops (ZeRO-1/2 need none of them)
# This machine's pip configuration names local index folders that often lack a package: pip warns
# once per package; keep those lines out of the way.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if has_gpu; then
  quiet "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" >&2
else
  # PIP_CONSTRAINT (not -c) so that the pins hold inside build environments too.
  PIP_CONSTRAINT="$PWD/$LOCK" quiet "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" >&2
fi
echo "$stamp_value" > "$stamp_file"
echo "$VENV ready" >&2
echo "$VENV"
