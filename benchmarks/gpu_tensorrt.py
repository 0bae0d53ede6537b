"""One DiT call (batch 1, bf16) through a TensorRT engine against torch eager on the same GPU, in one run.

Run on a CUDA machine: `python benchmarks/gpu_tensorrt.py --out benchmarks/results/gpu_tensorrt_<date>.json`.
It first records the machine (GPU, driver, python, torch, cuda-python, onnxruntime providers, whether TensorRT
imports and whether libnvinfer is on the library path). Without TensorRT it stops there and still writes the file,
so a machine that cannot run engines is documented too. With it, for each preset (`tiny`, `small`): export the ONNX
graph, build (or reuse) the engine, then time from host arrays to host arrays, synchronised, after warm-up:
torch eager (bf16 weights on the GPU) and the TensorRT runner (CUDA-graph replay), p50/p90 over the repeats.
"""

from __future__ import annotations

import argparse
import ctypes.util
import importlib.metadata
import json
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_edge.runtime.engines.tensorrt.build import tensorrt_version

PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "cuda-python", "cuda-bindings", "tensorrt")


def machine() -> dict[str, Any]:
    query = ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"]
    try:
        smi = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
    except FileNotFoundError:
        smi = "no nvidia-smi: no NVIDIA driver"
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    return {
        "gpu": smi,
        "python": platform.python_version(),
        "packages": versions,
        "onnxruntime_providers": providers,
        "tensorrt_importable": tensorrt_version(),
        "libnvinfer_on_library_path": ctypes.util.find_library("nvinfer"),
    }


def percentiles(run: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()  # both callables return host arrays, so they have synchronised
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90))}


def bench_preset(preset: str, root: Path, repeats: int) -> dict[str, Any]:
    import torch

    from cosmos_edge.export.onnx_export import DiTGraph, export_dit
    from cosmos_edge.runtime.engines.graph import dit_graph
    from cosmos_edge.runtime.engines.tensorrt.cache import OnnxSource
    from cosmos_edge.runtime.engines.tensorrt.runner import TensorRTRunner
    from cosmos_edge.runtime.models.dit import CosmosDiT
    from cosmos_edge.runtime.models.dit_config import dit_config
    from cosmos_edge.runtime.platforms import platform_spec

    config = dit_config(preset)
    torch.manual_seed(0)
    dit = CosmosDiT(config).to(torch.bfloat16).eval()
    spec = dit_graph(platform_spec("aloha"), batch=1, text_kv=config.text_kv_shape(512))
    exported = export_dit(dit, spec, root / f"{preset}_{spec.name}.onnx")
    rng = np.random.default_rng(0)
    inputs = {tensor.name: rng.standard_normal(tensor.shape).astype(np.float32) for tensor in spec.inputs}
    inputs["timesteps"] = np.full(spec.inputs[1].shape, 0.5, np.float32)

    graph = DiTGraph(dit.cuda(), spec)
    # The instruction's K/V stay on the device across calls, as both backends serve them.
    text_kv = {name: inputs.pop(name) for name in ("text_k", "text_v")}
    resident = [torch.from_numpy(text_kv[name]).cuda() for name in ("text_k", "text_v")]

    @torch.inference_mode()
    def torch_eager() -> np.ndarray:
        tensors = [torch.from_numpy(inputs[name]).cuda() for name in spec.input_names[:3]]
        return graph(*tensors, *resident).cpu().numpy()

    start = time.perf_counter()
    weights = () if exported.external_data is None else (exported.external_data,)
    runner = TensorRTRunner.from_onnx(spec, OnnxSource(exported.path, weights), root / "engines")
    build_s = time.perf_counter() - start
    with runner:
        for name, array in text_kv.items():
            runner.set_constant_input(name, array)
        expected, got = torch_eager(), runner.run(inputs)["velocity"]
        result: dict[str, Any] = {
            "preset": preset,
            "graph": spec.name,
            "precision": "bf16",
            "engine": runner.record.manifest_entry(),
            "engine_build_or_load_s": round(build_s, 1),
            "relative_max_error_vs_torch": float(np.abs(got - expected).max() / np.abs(expected).max()),
            "torch_eager": percentiles(torch_eager, 10, repeats),
            "tensorrt": percentiles(lambda: runner.run(inputs), 10, repeats),
        }
    result["speedup_p50"] = result["torch_eager"]["p50_ms"] / result["tensorrt"]["p50_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "results": []}
    if report["machine"]["tensorrt_importable"] is None:
        report["note"] = "TensorRT does not import on this machine: no engine was built or timed"
    else:
        with tempfile.TemporaryDirectory() as scratch:
            for preset in args.presets.split(","):
                report["results"].append(bench_preset(preset, Path(scratch), args.repeats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
