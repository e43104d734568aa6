#!/usr/bin/env bash
# Set up l2o in ./.venv on a fresh machine: the CPU build of PyTorch first (pinned, so pip never
# pulls a multi-GB CUDA build), then l2o with its test and ray extras (the test suite runs the Ray
# backend's tests; L2O_EXTRAS=test skips Ray). Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${L2O_TORCH_SPEC:-torch==2.13.0}
EXTRAS=${L2O_EXTRAS:-test,ray}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch is named beside l2o, so the resolver keeps the pinned build whatever the extras need.
.venv/bin/python -m pip install -q "$TORCH_SPEC" -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, l2o; print(f'l2o {l2o.__version__} with torch {torch.__version__} ready in .venv')"
