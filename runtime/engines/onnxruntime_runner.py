"""GraphRunner on ONNX Runtime: the CPU provider, or with onnxruntime-gpu the CUDA and TensorRT providers.

Targets are named by a device string: "cpu", "cuda[:N]" (CUDA provider) or "tensorrt[:N]" (ONNX Runtime's TensorRT
provider, CUDA as fallback for what TensorRT does not take). On a GPU, inputs and outputs live in device buffers
allocated once and bound once through IO binding, so a call copies each input up and each output down once and
ONNX Runtime allocates nothing per call. The TensorRT provider keeps its engines and timing cache in
the graph's cache directory (a bundle's `cache/onnxruntime_tensorrt/onnxruntime-VERSION/`), since building them
takes minutes.

The CPU provider has no bfloat16 kernels (MatMul, Conv, ... in ONNX Runtime 1.32), so a bf16 bundle is refused on
"cpu" with a message saying what to use instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from cosmos_edge.runtime.engines.graph import GraphFile, GraphSpec, check_feed, check_feeds, check_signature
from cosmos_edge.runtime.errors import ConfigError, EngineError
from cosmos_edge.runtime.files import writable_folder

_LOG = logging.getLogger(__name__)
_READ_ONLY_CACHES_SAID: set[Path] = set()

# ONNX Runtime raises its own exception classes (Fail, InvalidGraph, NotImplemented, ...), all plain Exception
# subclasses of its pybind module; they are turned into EngineError at this boundary.
_ORT_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    *(cls for cls in vars(ort_state).values() if isinstance(cls, type) and issubclass(cls, Exception)),
)
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# ONNX Runtime log severity 0 (verbose) .. 4 (fatal). Its warnings here are about optimisations it skips (e.g. fp16
# constant folding on the CPU), which say nothing about the results; errors still surface as exceptions.
_ERRORS_ONLY = 3
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


@dataclass(frozen=True)
class OrtTarget:
    """Where a graph runs: `provider` in ("cpu", "cuda", "tensorrt") and the GPU index."""

    provider: str
    device_id: int = 0

    @property
    def device(self) -> str:
        """The device string that names this target."""
        return self.provider if self.provider == "cpu" else f"{self.provider}:{self.device_id}"

    @classmethod
    def parse(cls, device: str) -> OrtTarget:
        match = re.fullmatch(r"(cpu|cuda|tensorrt)(?::([0-9]+))?", device)
        if match is None or (match[1] == "cpu" and match[2] is not None):
            raise ConfigError(f"device: expected 'cpu', 'cuda[:N]' or 'tensorrt[:N]' for onnxruntime, got {device!r}")
        return cls(match[1], int(match[2] or 0))

    def providers(self, cache_dir: Path | None) -> list[tuple[str, dict[str, Any]]]:
        cpu: tuple[str, dict[str, Any]] = (_PROVIDERS["cpu"], {})
        if self.provider == "cpu":
            return [cpu]
        cuda: tuple[str, dict[str, Any]] = (_PROVIDERS["cuda"], {"device_id": self.device_id})
        if self.provider == "cuda":
            return [cuda, cpu]
        trt_options: dict[str, Any] = {"device_id": self.device_id}
        if cache_dir is not None:
            trt_options |= {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache_dir),
            }
        return [(_PROVIDERS["tensorrt"], trt_options), cuda, cpu]


class OnnxRuntimeRunner:
    """Runs one ONNX graph of shape contract `spec`; `run` returns new host arrays owned by the caller."""

    def __init__(
        self,
        path: Path,
        spec: GraphSpec,
        target: OrtTarget = OrtTarget("cpu"),
        cache_dir: Path | None = None,
    ) -> None:
        self._spec = spec
        self._path = path
        self._session: ort.InferenceSession | None = _create_session(path, target, cache_dir)
        _check_io(self._session, spec, path)
        self._device_io = None
        if target.provider != "cpu":
            with self._naming_failures("allocating its device buffers"):  # out of device memory, most likely
                self._device_io = _BoundBuffers(self._session, spec, target.device_id)
        self._constants: dict[str, np.ndarray] = {}

    @property
    def spec(self) -> GraphSpec:
        return self._spec

    def set_constant_input(self, name: str, array: np.ndarray) -> None:
        """Keeps `name` for every later call; on a GPU it is uploaded into its bound buffer once, here."""
        if self._session is None:
            raise EngineError(f"graph {self._spec.name}: set_constant_input() after close()")
        check_feed(self._spec, name, array)
        constant = _float32({name: array})
        self._constants.update(constant)
        if self._device_io is not None:
            with self._naming_failures(f"uploading {name}"):
                self._device_io.upload(constant)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise EngineError(f"graph {self._spec.name}: run() after close()")
        check_feeds(self._spec, inputs, frozenset(self._constants))
        arrays = _float32({**inputs, **self._constants})
        with self._naming_failures("running"):
            if self._device_io is not None:
                return self._device_io.run(self._session, {name: arrays[name] for name in inputs})
            outputs = self._session.run(self._spec.output_names, arrays)
        return dict(zip(self._spec.output_names, outputs, strict=True))

    @contextlib.contextmanager
    def _naming_failures(self, doing: str) -> Iterator[None]:
        """onnxruntime's errors as one `EngineError` naming the graph, its file and what was being done."""
        try:
            yield
        except _ORT_ERRORS as error:
            raise EngineError(f"graph {self._spec.name} ({self._path}): onnxruntime failed {doing}: {error}") from error

    def close(self) -> None:
        self._device_io = None
        self._session = None


class _BoundBuffers:
    """Device buffers for every input and output of one session, allocated and bound once (IO binding)."""

    def __init__(self, session: ort.InferenceSession, spec: GraphSpec, device_id: int) -> None:
        def allocate(shape: tuple[int, ...]) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, "cuda", device_id)

        self._inputs = {tensor.name: allocate(tensor.shape) for tensor in spec.inputs}
        self._outputs = {tensor.name: allocate(tensor.shape) for tensor in spec.outputs}
        self._binding = session.io_binding()
        for name, value in self._inputs.items():
            self._binding.bind_ortvalue_input(name, value)
        for name, value in self._outputs.items():
            self._binding.bind_ortvalue_output(name, value)

    def upload(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            self._inputs[name].update_inplace(array)  # host -> the bound device buffer, same address every call

    def run(self, session: ort.InferenceSession, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`arrays`: the inputs that change per call; constant inputs are already in their buffers."""
        self.upload(arrays)
        session.run_with_iobinding(self._binding)
        return {name: value.numpy() for name, value in self._outputs.items()}


def _float32(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in arrays.items()}


def _require_provider(target: OrtTarget) -> None:
    """The execution provider of `target` is in this install: a usage error otherwise (the device asked for)."""
    available = ort.get_available_providers()
    wanted = _PROVIDERS[target.provider]
    if wanted not in available:
        raise ConfigError(
            f"device: {target.device!r} needs onnxruntime's {wanted}, which this install lacks (it has {available}); "
            f"install onnxruntime-gpu for 'cuda' and 'tensorrt', or run on device 'cpu'"
        )


def _create_session(path: Path, target: OrtTarget, cache_dir: Path | None) -> ort.InferenceSession:
    _require_provider(target)
    wanted = _PROVIDERS[target.provider]
    if cache_dir is not None and target.provider == "tensorrt":
        _check_engine_cache(cache_dir)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = _ERRORS_ONLY
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=target.providers(cache_dir))
    except _ORT_ERRORS as error:
        raise EngineError(f"{path}: onnxruntime cannot load the graph: {error}") from error
    # A provider whose libraries fail to load (cuDNN, libnvinfer) is listed as available, and the session falls back
    # to the next one with no more than a log line.
    if session.get_providers()[0] != wanted:
        raise EngineError(
            f"{path}: onnxruntime could not start {wanted} for the {target.provider} target (its session runs on "
            f"{session.get_providers()}); check its CUDA/cuDNN/TensorRT libraries"
        )
    return session


def _check_engine_cache(cache_dir: Path) -> None:
    """A cache ONNX Runtime can write its TensorRT engines to, or one that already holds some and only serves (a
    read-only deployment): said in the log, as engines it lacks are then built at every start and an engine it cannot
    write may fail the session (named with the graph)."""
    try:
        serves_only = cache_dir.is_dir() and any(cache_dir.iterdir()) and not os.access(cache_dir, os.W_OK | os.X_OK)
    except OSError as error:
        raise EngineError(f"{cache_dir}: cannot read the folder of ONNX Runtime's TensorRT engines ({error})") from None
    if not serves_only:
        writable_folder(cache_dir, "ONNX Runtime's TensorRT engines")
    elif cache_dir not in _READ_ONLY_CACHES_SAID:  # once, not once per graph
        _READ_ONLY_CACHES_SAID.add(cache_dir)
        _LOG.warning("%s: read-only; ONNX Runtime's TensorRT engines are used from it, none is added", cache_dir)


def _check_io(session: ort.InferenceSession, spec: GraphSpec, path: Path) -> None:
    for inputs, values in ((True, session.get_inputs()), (False, session.get_outputs())):
        found = {value.name: (tuple(value.shape), _ORT_TYPES.get(value.type, value.type)) for value in values}
        check_signature(spec, found, inputs, str(path))


def check_target(device: str, precision: str) -> None:
    """The backend's check of a target (see `registry`): the device string, its provider installed, and no bf16 graph
    on the CPU."""
    target = OrtTarget.parse(device)
    _require_provider(target)
    if target.provider == "cpu" and precision == "bf16":
        raise ConfigError(  # the device asked for (or the default one) does not suit the bundle: a usage error
            "device: 'cpu' cannot run a bf16 bundle (exported for CUDA): onnxruntime's CPU provider has no bfloat16 "
            "kernels; run it on 'cuda' (onnxruntime, or --backend tensorrt), or export the bundle --for cpu"
        )


def open_graph(graph: GraphFile, device: str) -> OnnxRuntimeRunner:
    """The backend entry point (see `registry`): `graph` on `device`."""
    check_target(device, graph.precision)
    target = OrtTarget.parse(device)
    cache_dir = None
    if target.provider == "tensorrt" and graph.cache_dir is not None:
        # Per onnxruntime version: a TensorRT engine is not portable across the TensorRT versions it links.
        cache_dir = graph.cache_dir / "onnxruntime_tensorrt" / f"onnxruntime-{ort.__version__}"
    runner = OnnxRuntimeRunner(graph.onnx, graph.spec, target, cache_dir=cache_dir)
    _LOG.info("onnxruntime: loaded %s on %s", graph.spec.name, device)
    return runner
