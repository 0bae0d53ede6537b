#!/usr/bin/env bash
# One run on a lent GPU machine, as it finds the working tree (not installed; its Python and torch, not this
# project's environment): the `gpu` tests, then benchmarks/gpu_check.py's sections within a deadline, each written to
# OUT/gpu_check.json as it finishes. Exits non-zero when the tests or the script failed (a section that failed
# included).
#
#   bash benchmarks/device_check.sh OUT [SECTIONS]   # DEADLINE_S (default 400) bounds gpu_check's sections: the tests,
#                                                    # imports and a last section's overrun come on top (8 minutes in all)
#   GPU_CHECK_ARGS=--smoke bash benchmarks/device_check.sh /tmp/out   # on the CPU, tiny sizes: the script runs
#
# SECTIONS defaults to the exactness checks on the device (the transforms and the sampler, a second; the fast path
# against the fp32 CPU reference) and the official path against the default one. `serve` with its defaults and
# planning take a second run of their own: SECTIONS=environment,served_query,planning_timing. Measured on an H200
# (benchmarks/results/gpu_check_h200.json): the gpu tests 22 s, query_exact 59 to 84 s, the models 17 to 23 s,
# query_fast_graphs 87 to 93 s (its compilation), served_query 204 to 251 s, planning_timing 125 to 159 s with
# Inductor's cache warm: each list within 8 minutes. A section is skipped when the deadline leaves it less than it
# needs (gpu_check.py's SECTIONS).
# `served_query` needs pyzmq and msgpack: put their wheels for the device's Python in .device/wheels/ (ignored; carry
# `.device`).
set -uo pipefail
out=$(realpath -m "${1:?usage: bash benchmarks/device_check.sh OUT [SECTIONS]}")
sections=${2:-environment,preprocess_exact,sampler_exact,query_exact,query_official,query_fast_graphs}
cd "$(dirname "$0")/.."
mkdir -p "$out"
# The `cosmos_edge` namespace maps the top-level folders (pyproject.toml); without an install, links make it.
namespace=$(mktemp -d)
mkdir -p "$namespace/cosmos_edge"
for folder in cli runtime export kernels robot_bridge; do ln -s "$PWD/$folder" "$namespace/cosmos_edge/$folder"; done
path=$namespace:$PWD
if compgen -G ".device/wheels/*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --no-deps --target "$namespace/site" .device/wheels/*.whl \
        || echo "device_check: the wheels in .device/wheels do not install on this Python: served_query will fail" >&2
    path=$path:$namespace/site
fi
export PYTHONPATH=$path PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/card.txt"
# Every file with `gpu` tests that imports without an engine library (ONNX Runtime's and TensorRT's need theirs).
python -m pytest -q -m gpu -p no:cacheprovider tests/runtime/test_torch_backend.py tests/kernels/test_image_transforms.py \
    tests/runtime/test_cuda_buffers.py 2>&1 | tee "$out/pytest.txt" | tail -5
tests=$?
python benchmarks/gpu_check.py --out "$out/gpu_check.json" --deadline-s "${DEADLINE_S:-400}" --only "$sections" \
    ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu_check.log"
check=$?
exit $((tests || check))
