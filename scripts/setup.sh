#!/usr/bin/env bash
# Creates .venv with torch and cosmos-edge with its test extras. Idempotent.
#
# torch 2.13.0 is chosen deliberately: the CUDA build (PyPI's default, ~20 NVIDIA packages) where an NVIDIA driver
# answers `nvidia-smi`, otherwise the CPU build from download.pytorch.org. Where that index cannot be reached, the
# machine's own pip configuration decides (the development machines of this project serve the CPU build locally).
# TORCH_INDEX_URL overrides the choice.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

step() { echo "[setup] $*"; }

if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/pip install --progress-bar off --disable-pip-version-check)
step "upgrading pip"
"${PIP[@]}" --quiet --upgrade pip

torch_source=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    torch_source=(--index-url "$TORCH_INDEX_URL")
    step "torch 2.13.0 from TORCH_INDEX_URL=$TORCH_INDEX_URL"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    step "torch 2.13.0, CUDA build (an NVIDIA driver is present)"
elif curl --silent --fail --max-time 5 --output /dev/null "$CPU_INDEX/torch/"; then
    torch_source=(--index-url "$CPU_INDEX")
    step "torch 2.13.0, CPU build from $CPU_INDEX (no NVIDIA driver found)"
else
    step "torch 2.13.0 from this machine's pip configuration ($CPU_INDEX is unreachable; no NVIDIA driver found)"
fi
"${PIP[@]}" "${torch_source[@]}" "torch==2.13.0"
.venv/bin/python -c 'import torch; cuda = torch.version.cuda or "none (CPU build)"; print(f"[setup] torch {torch.__version__}, CUDA {cuda}")'

step "cosmos-edge with the dev and sim extras (editable)"
"${PIP[@]}" -e ".[dev,sim]"
# Type stubs of TensorRT for scripts/typecheck.sh. --no-deps: its metadata pins a TensorRT wheel that cannot install
# here (TensorRT is not on PyPI as binaries).
step "tensorrt-stubs (type checking only)"
"${PIP[@]}" --quiet --no-deps "tensorrt-stubs==10.13.0.35.1"
step "done: .venv/bin/cosmos-edge"
