#!/usr/bin/env bash
# Inference on a trained checkpoint: creates/reuses .venv (as scripts/train.sh does), then
#   1. `slope eval --compare`: validation loss / perplexity, tokens/s and parameter memory of the
#      unmerged, merged (sparse + LoRA in one GEMM, training state dropped) and dense forms, and a
#      check that they agree to fp tolerance (non-zero exit if not);
#   2. `slope generate` in merged mode (greedy);
#   3. `slope generate --compare`: prefill and decode tokens/s of the dense, unmerged and merged forms
#      (the same static-KV-cache decode loop; CUDA_GRAPHS=1 decodes under CUDA graphs, CUDA only).
# Usage: bash scripts/inference.sh [CHECKPOINT_DIR] [PROMPT]
#   CHECKPOINT_DIR: a checkpoint (default runs/default/checkpoint, from scripts/train.sh) or its run directory.
#   Environment: MODE (generate's --mode, default merged), MAX_NEW_TOKENS (default 64), DEVICE (default auto),
#   BATCH (prompt copies decoded at once by step 3, default 1), CUDA_GRAPHS (set: --cuda-graphs).
set -euo pipefail
# Runs in the caller's folder (relative paths are the caller's); the venv lives in the repository.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CHECKPOINT=${1:-runs/default/checkpoint}
PROMPT=${2:-"def main(argv):"}
if [ ! -e "$CHECKPOINT" ]; then
  echo "inference.sh: no checkpoint at $CHECKPOINT; train one first (bash scripts/train.sh) or pass its directory" >&2
  exit 1
fi
VENV=$(cd "$ROOT" && bash scripts/setup_venv.sh)
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
DEVICE=${DEVICE:-auto}
echo "== slope eval --compare ($CHECKPOINT)"
"$VENV/bin/slope" eval --checkpoint "$CHECKPOINT" --compare --device "$DEVICE"
echo "== slope generate --mode ${MODE:-merged}"
"$VENV/bin/slope" generate --checkpoint "$CHECKPOINT" --prompt "$PROMPT" --mode "${MODE:-merged}" \
  --temperature 0 --max-new-tokens "${MAX_NEW_TOKENS:-64}" --device "$DEVICE"
echo "== slope generate --compare (tokens/s of dense, unmerged, merged)"
"$VENV/bin/slope" generate --checkpoint "$CHECKPOINT" --prompt "$PROMPT" --compare --batch "${BATCH:-1}" \
  --max-new-tokens "${MAX_NEW_TOKENS:-64}" --device "$DEVICE" ${CUDA_GRAPHS:+--cuda-graphs}
