#!/usr/bin/env bash
# One run on a lent GPU machine, as it finds the working tree (not installed; its Python and torch, not this
# project's environment): the `gpu` tests, then benchmarks/gpu_check.py's sections within a deadline, each written to
# OUT/gpu_check.json as it finishes. Exits non-zero when the tests or the script failed (a section that failed
# included).
#
#   bash benchmarks/device_check.sh OUT [SECTIONS]   # DEADLINE_S (default 480) bounds gpu_check
#   GPU_CHECK_ARGS=--smoke bash benchmarks/device_check.sh /tmp/out   # on the CPU, tiny sizes: the script runs
#
# SECTIONS defaults to the on-device exactness of the transforms and the sampler (a second), the official path
# against the default one, `serve` with its defaults, and planning. Measured on an H200 (runs 10 and 11 of
# benchmarks/results/gpu_check_h200.json): the gpu tests 22 s, query_exact 59 s, the models 19 s, query_fast_graphs
# 93 s (its compilation), served_query 204 s, planning_timing 127 s with Inductor's cache warm (more when cold); the
# default list therefore runs past 8 minutes, and planning_timing is skipped when the deadline leaves too little:
# give it a run of its own (SECTIONS=environment,planning_timing) on the same machine while it is warm.
# `served_query` needs pyzmq and msgpack: put their wheels for the device's Python in .device/wheels/ (ignored; carry
# `.device`).
set -uo pipefail
out=$(realpath -m "${1:?usage: bash benchmarks/device_check.sh OUT [SECTIONS]}")
sections=${2:-environment,preprocess_exact,sampler_exact,query_official,query_fast_graphs,served_query,planning_timing}
cd "$(dirname "$0")/.."
mkdir -p "$out"
# The `cosmos_edge` namespace maps the top-level folders (pyproject.toml); without an install, links make it.
namespace=$(mktemp -d)
mkdir -p "$namespace/cosmos_edge"
for folder in cli runtime export kernels robot_bridge; do ln -s "$PWD/$folder" "$namespace/cosmos_edge/$folder"; done
path=$namespace:$PWD
if compgen -G ".device/wheels/*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --no-deps --target "$namespace/site" .device/wheels/*.whl
    path=$path:$namespace/site
fi
export PYTHONPATH=$path PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/card.txt"
# Every file with `gpu` tests that imports without an engine library (ONNX Runtime's and TensorRT's need theirs).
python -m pytest -q -m gpu -p no:cacheprovider tests/runtime/test_torch_backend.py tests/kernels/test_image_transforms.py \
    tests/runtime/test_cuda_buffers.py 2>&1 | tee "$out/pytest.txt" | tail -5
tests=$?
python benchmarks/gpu_check.py --out "$out/gpu_check.json" --deadline-s "${DEADLINE_S:-480}" --only "$sections" \
    ${GPU_CHECK_ARGS:-}
check=$?
exit $((tests || check))
