"""The precision names of the CLI, the bundle manifest and every backend, and the default rules `act` and `serve`
share for the torch backend (precision, compilation)."""

from __future__ import annotations

from collections.abc import Sequence

from cosmos_edge.runtime.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
# ONNX opset 17 has no bfloat16 convolution (ONNX Runtime refuses such a graph on every provider): a bf16 bundle's VAE
# graphs compute in float32, more exactly than the bf16 VAE.
_VAE_PRECISION = {"bf16": "fp32"}
# What `torch.compile` compiles of the DiT: the whole network as one graph, or each transformer block, all of them
# sharing one compiled graph (they run the same code on same-shaped weights): on 2 CPU cores a 2B DiT compiles in
# 11 s against 64 s, at the same call time (benchmarks/results/cpu_compile_time.json); on an H200, in a process that
# had compiled the DiT before, 3 s against 75 s, the call 17.6 against 17.0 ms (gpu_check_h200.json,
# `dit_compile_scopes`).
COMPILE_SCOPES = ("model", "blocks")


def check_compile_scope(scope: str) -> None:
    if scope not in COMPILE_SCOPES:
        raise ConfigError(f"compile_scope: expected one of {COMPILE_SCOPES}, got {scope!r}")


def default_precision(devices: Sequence[str]) -> str:
    """bf16 on CUDA (what the official models run in), fp32 elsewhere (CPUs have no fast bf16; fp32 is the
    reference). `act` and `serve` both apply it when `--precision` is not given."""
    return "bf16" if any(device.startswith("cuda") for device in devices) else "fp32"


def compile_mode(requested: bool | None, devices: Sequence[str]) -> str | None:
    """The `torch.compile` mode of the DiT and the VAE encode: `--compile`/`--no-compile` when given; by default on
    CUDA (a minute or two once; on an H200 the DiT call 40 -> 17 ms, the camera encode 18 -> 10 ms with its convs
    folded), not on the CPU, where the compilation outweighs a session's calls."""
    compiles = any(device.startswith("cuda") for device in devices) if requested is None else requested
    return "default" if compiles else None


def cuda_graphs(requested: bool | None, devices: Sequence[str]) -> bool:
    """Whether the torch backend replays its fixed-shape calls from CUDA graphs: `--cuda-graphs`/`--no-cuda-graphs`
    when given; by default when every device is a CUDA one (on an H200 a compiled 1-step query ran 24.3 ms of
    kernels in 30.7 ms: the rest is mostly the GPU waiting for kernels Python has yet to launch). Refused off CUDA."""
    on_cuda = bool(devices) and all(device.startswith("cuda") for device in devices)
    if requested:
        check_cuda_graph_devices(devices)
    return on_cuda if requested is None else requested


def check_cuda_graph_devices(devices: Sequence[str]) -> None:
    """CUDA graphs replay on CUDA devices only."""
    if not devices or not all(device.startswith("cuda") for device in devices):
        raise ConfigError(f"cuda_graphs: CUDA graphs need CUDA devices; got {list(devices)}")


def vae_graph_precision(bundle_precision: str) -> str:
    """The precision inside a bundle's VAE graphs (its DiT graphs have the bundle's)."""
    return _VAE_PRECISION.get(bundle_precision, bundle_precision)
