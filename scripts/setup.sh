#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and cosmos-edge with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[dev,sim]"
# Type stubs of TensorRT for scripts/typecheck.sh. --no-deps: its metadata pins a TensorRT wheel that cannot install
# here (TensorRT is not on PyPI as binaries).
.venv/bin/pip install --quiet --no-deps "tensorrt-stubs==10.13.0.35.1"
