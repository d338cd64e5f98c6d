#!/usr/bin/env bash
# Run the default job on a fresh or existing machine: creates/reuses .venv (CPU torch without an
# NVIDIA GPU), then `slope train`: SLoPe 2:4 pretraining of a small Llama on the embedded corpus
# (Python standard-library source), ~2 minutes on a 2-core CPU. Outputs: runs/default/
# (metrics.jsonl, loss.png, checkpoint/). Extra arguments go to `slope train`, e.g.
#   bash scripts/train.sh --dense --out runs/dense
#   bash scripts/train.sh --out runs/default --resume
set -euo pipefail
# Runs in the caller's folder (relative paths are the caller's); the venv lives in the repository.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$(cd "$ROOT" && bash scripts/setup_venv.sh)
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
exec "$VENV/bin/slope" train "$@"
