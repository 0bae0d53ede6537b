"""Engine backends for bundles, by name; each is imported only when asked for.

A backend is a module with `open_graph(bundle, name, device) -> GraphRunner`. Importing it imports its engine
library, so a library that is not installed becomes one clear EngineError here instead of an ImportError from
deep inside, and serving with one backend never imports the others (nor torch).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, cast

from cosmos_edge.runtime.bundle import Bundle
from cosmos_edge.runtime.errors import ConfigError, EngineError
from cosmos_edge.runtime.graph_runner import GraphRunner


class Backend(Protocol):
    def open_graph(self, bundle: Bundle, name: str, device: str) -> GraphRunner: ...


@dataclass(frozen=True)
class BackendInfo:
    module: str
    library: str
    install: str
    default_device: str


BACKENDS: Mapping[str, BackendInfo] = MappingProxyType(
    {
        "onnxruntime": BackendInfo(
            module="cosmos_edge.runtime.onnxruntime_backend",
            library="onnxruntime",
            install="pip install onnxruntime (CPU), or onnxruntime-gpu for the CUDA and TensorRT providers",
            default_device="cpu",
        ),
        "tensorrt": BackendInfo(
            module="cosmos_edge.runtime.tensorrt_backend",
            library="tensorrt",
            install="install TensorRT >= 10 and cuda-python on a machine with an NVIDIA GPU "
            "(pip install 'cosmos-edge[tensorrt,gpu]'), or use --backend onnxruntime",
            default_device="cuda",
        ),
    }
)


def backend_info(name: str) -> BackendInfo:
    info = BACKENDS.get(name)
    if info is None:
        raise ConfigError(f"backend: expected one of {sorted(BACKENDS)}, got {name!r}")
    return info


def load_backend(name: str) -> Backend:
    """The backend module called `name`; EngineError when its engine library is not installed."""
    info = backend_info(name)
    if not is_installed(info.library):
        raise EngineError(f"backend {name!r} is not installed: cannot import {info.library!r}; {info.install}")
    try:
        module = importlib.import_module(info.module)
    except ImportError as error:
        raise EngineError(f"backend {name!r} is not installed: {error}; {info.install}") from error
    if not callable(getattr(module, "open_graph", None)):
        raise EngineError(f"backend {name!r}: {info.module} provides no open_graph(bundle, name, device)")
    return cast(Backend, module)


def is_installed(library: str) -> bool:
    """True for a package with code; `tensorrt-stubs` (for type checking) leaves a bare `tensorrt` namespace."""
    spec = importlib.util.find_spec(library)
    return spec is not None and spec.origin is not None
