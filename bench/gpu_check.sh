#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a fresh GPU machine: one table, at most 8 minutes.
#   bash bench/gpu_check.sh            # writes gpu_check.log too; exit 0 = every check passed
# Needs this repository, torch and numpy. numpy (and, for train.py afterwards, hydra-core, wandb,
# tiktoken) are installed from wheels carried along in ./wheels when they are missing; nothing is
# downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" || { echo "error: torch is not installed"; exit 2; }
for mod in numpy hydra wandb tiktoken; do
  if ! python -c "import $mod" 2>/dev/null && [ -d wheels ]; then
    pkg=$mod; [ "$mod" = hydra ] && pkg=hydra-core
    pip install --quiet --no-index --find-links wheels "$pkg" || echo "note: could not install $pkg from ./wheels"
  fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout 480 python bench/gpu_check.py "$@" 2>&1 | tee gpu_check.log
exit "${PIPESTATUS[0]}"
