#!/usr/bin/env bash
# Set up l2o in ./.venv on a fresh machine: the CPU build of PyTorch first (pinned, so pip never
# pulls a multi-GB CUDA build), then l2o and its test extras. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${L2O_TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q "$TORCH_SPEC" -e '.[test]'
.venv/bin/python -c "import torch, l2o; print(f'l2o {l2o.__version__} with torch {torch.__version__} ready in .venv')"
