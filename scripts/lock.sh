#!/usr/bin/env bash
# Refresh requirements/cpu.lock: resolve, in a throw-away venv, the newest releases that
# pyproject.toml's ranges allow on a CPU machine, and freeze them. One line:
#   bash scripts/test_oldest.sh && bash scripts/lock.sh && bash scripts/test.sh
# (the oldest supported versions still pass; refresh; the suite passes on the new pins; commit).
# torch and triton are set here: the CPU build of torch (a plain `torch` resolves a multi-GB CUDA
# build) and the triton that this torch's CUDA build pins.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_CPU=${TORCH_CPU:-torch==2.13.0+cpu}
TRITON=${TRITON:-triton==3.7.1}
PY=${PYTHON:-python3}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
DS_BUILD_OPS=0 "$tmp/venv/bin/python" -m pip install -q "$TORCH_CPU" "$TRITON" -e ".[dev,deepspeed,tensorboard,peft]" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
{
  echo "# CPU machines' pinned environment (scripts/setup_venv.sh installs exactly this)."
  echo "# Made by scripts/lock.sh on $(date -u +%F) with $("$tmp/venv/bin/python" -V); refresh with:"
  echo "#   bash scripts/test_oldest.sh && bash scripts/lock.sh && bash scripts/test.sh"
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -E '^(pip|slope)[= @]'
} > requirements/cpu.lock
echo "wrote requirements/cpu.lock ($(grep -c '==' requirements/cpu.lock) pins)"
