"""Engine backends by name; each is imported only when asked for.

A graph backend (onnxruntime, tensorrt) is a module with `open_graph(graph: GraphFile, device) -> GraphRunner`; the
torch backend opens networks from checkpoint files. Importing a backend imports its engine library, so a library
that is not installed becomes one clear EngineError here instead of an ImportError from deep inside, and serving
with one backend never imports the others (nor torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, cast

from cosmos_edge.runtime.engines.graph import GraphFile, GraphRunner
from cosmos_edge.runtime.errors import ConfigError, EngineError
from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy.api import ConditioningEncoder, DenoisingNetwork, VideoAutoencoder


class GraphBackend(Protocol):
    def check_target(self, device: str, precision: str) -> None:
        """Raises ConfigError when `device` cannot run graphs of a bundle of `precision`: said before any graph is
        hashed and loaded (gigabytes for a 2B bundle)."""
        ...

    def open_graph(self, graph: GraphFile, device: str) -> GraphRunner: ...


class EncodingAutoencoder(VideoAutoencoder, ConditioningEncoder, Protocol):
    """A VAE that also encodes the conditioning prefix from raw frames (the torch backend's)."""

    def close(self) -> None:
        """Releases the network and what it keeps (captured graphs, cached latents); later calls fail."""
        ...


class TextWidthNetwork(DenoisingNetwork, Protocol):
    """A denoising network that says how wide the instruction embeddings it takes are (the torch backend's)."""

    @property
    def text_dim(self) -> int: ...

    def close(self) -> None:
        """Releases the network and what it keeps (bindings, adaLN vectors, captured graphs); later calls fail."""
        ...


class TorchBackend(Protocol):
    def default_device(self) -> str: ...

    def check_device(self, device: str, name: str = "device") -> object: ...

    def open_autoencoder(
        self,
        tokenizer: Path,
        precision: str,
        device: str,
        platform: PlatformSpec,
        compile_mode: str | None = None,
        cuda_graphs: bool = False,
    ) -> EncodingAutoencoder: ...

    def open_dit(
        self,
        checkpoint: Path,
        precision: str,
        device: str,
        compile_mode: str | None = None,
        compile_scope: str = "model",
        cuda_graphs: bool = False,
    ) -> TextWidthNetwork: ...


if TYPE_CHECKING:  # mypy holds each backend module to its protocol (they are loaded by name, so nothing else does)
    from cosmos_edge.runtime.engines import onnxruntime_runner, torch_networks
    from cosmos_edge.runtime.engines.tensorrt import runner as tensorrt_runner

    _TORCH: TorchBackend = torch_networks
    _ONNXRUNTIME: GraphBackend = onnxruntime_runner
    _TENSORRT: GraphBackend = tensorrt_runner


def cuda_index(device: str) -> int:
    """ "cuda" -> 0, "cuda:N" -> N: the device of a CUDA-only backend or command; ConfigError for anything else."""
    match = re.fullmatch(r"cuda(?::([0-9]+))?", device)
    if match is None:
        raise ConfigError(f"device: expected 'cuda' or 'cuda:N', got {device!r}")
    return int(match[1] or 0)


@dataclass(frozen=True)
class BackendInfo:
    module: str
    library: str
    install: str
    default_device: str


TORCH = BackendInfo(
    module="cosmos_edge.runtime.engines.torch_networks",
    library="torch",
    install="pip install 'cosmos-edge[torch]'",
    default_device="cpu",
)

GRAPH_BACKENDS: Mapping[str, BackendInfo] = MappingProxyType(
    {
        "onnxruntime": BackendInfo(
            module="cosmos_edge.runtime.engines.onnxruntime_runner",
            library="onnxruntime",
            install="pip install onnxruntime (CPU), or onnxruntime-gpu for the CUDA and TensorRT providers",
            default_device="cpu",
        ),
        "tensorrt": BackendInfo(
            module="cosmos_edge.runtime.engines.tensorrt.runner",
            library="tensorrt",
            install="install TensorRT >= 10 and cuda-python on a machine with an NVIDIA GPU "
            "(pip install 'cosmos-edge[tensorrt,gpu]'), or use --backend onnxruntime",
            default_device="cuda",
        ),
    }
)


def backend_info(name: str) -> BackendInfo:
    info = GRAPH_BACKENDS.get(name)
    if info is None:
        raise ConfigError(f"backend: expected one of {sorted(GRAPH_BACKENDS)}, got {name!r}")
    return info


def load_graph_backend(name: str) -> GraphBackend:
    """The graph backend called `name`; EngineError when its engine library is not installed."""
    return cast(GraphBackend, _import(name, backend_info(name), "open_graph"))


def load_torch_backend() -> TorchBackend:
    return cast(TorchBackend, _import("torch", TORCH, "open_dit"))


def _import(name: str, info: BackendInfo, entry_point: str) -> object:
    if not is_installed(info.library):
        raise EngineError(f"backend {name!r} is not installed: cannot import {info.library!r}; {info.install}")
    try:
        module = importlib.import_module(info.module)
    except ImportError as error:
        raise EngineError(f"backend {name!r} is not installed: {error}; {info.install}") from error
    if not callable(getattr(module, entry_point, None)):
        raise EngineError(f"backend {name!r}: {info.module} provides no {entry_point}()")
    return module


def is_installed(library: str) -> bool:
    """True for a package with code; `tensorrt-stubs` (for type checking) leaves a bare `tensorrt` namespace."""
    spec = importlib.util.find_spec(library)
    return spec is not None and spec.origin is not None
