#!/usr/bin/env bash
# mypy over every cosmos_edge package and the benchmarks, with the TensorRT backend checked against tensorrt-stubs (TensorRT itself
# cannot be installed on CI machines).
# - The editable install's import hook is invisible to mypy, so a `cosmos_edge` view of the folders goes on MYPYPATH.
# - tensorrt-stubs (10.13.0.35.1, the latest) ships without py.typed, so mypy would treat TensorRT as Any; and the
#   stubs hold syntax errors (parameters named `in`; `add_scale_nd` has a required parameter after defaulted ones).
#   A fixed copy goes on MYPYPATH and errors inside the stubs themselves are ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -f "$site/tensorrt_bindings/tensorrt.pyi" ]; then
    echo "typecheck: tensorrt-stubs is not installed; run scripts/setup.sh" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/stubs/cosmos_edge"
cp -r "$site/tensorrt" "$site/tensorrt_bindings" "$work/stubs/"
sed -i -E 's/([(,] ?)in: /\1in_: /g; s/(power: Weights = None, channel_axis: int)\)/\1 = ...)/' \
    "$work/stubs/tensorrt_bindings/tensorrt.pyi"
for package in runtime export kernels robot_bridge cli; do
    ln -s "$PWD/$package" "$work/stubs/cosmos_edge/$package"
done
cat >"$work/mypy.ini" <<INI
[mypy]
python_version = 3.11
ignore_missing_imports = True
follow_imports = silent
mypy_path = $work/stubs

[mypy-tensorrt.*,tensorrt_bindings.*]
ignore_errors = True
INI
.venv/bin/mypy --config-file "$work/mypy.ini" \
    -p cosmos_edge.runtime -p cosmos_edge.export -p cosmos_edge.kernels -p cosmos_edge.robot_bridge -p cosmos_edge.cli
# The benchmarks too (scripts and pytest-benchmark suites; several run only on a GPU, so nothing else checks them).
MYPYPATH=$PWD .venv/bin/mypy --config-file "$work/mypy.ini" --explicit-package-bases benchmarks/*.py
