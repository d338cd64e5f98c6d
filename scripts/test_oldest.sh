#!/usr/bin/env bash
# The suite on the oldest supported versions (requirements/oldest.txt: torch 2.11, triton 3.6,
# transformers 5.17) in its own venv, .venv-oldest. Not part of every CI run (its venv downloads
# ~3 GB); run it before refreshing the lock:
#   bash scripts/test_oldest.sh && bash scripts/lock.sh && bash scripts/test.sh
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
SLOPE_VENV=.venv-oldest SLOPE_LOCK=requirements/oldest.txt exec bash scripts/test.sh "$@"
