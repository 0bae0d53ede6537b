"""The `tensorrt` backend: a GraphRunner over a TensorRT engine built from (or shipped beside) an ONNX graph.

Device buffers, pinned staging and one stream are allocated once per runner from the GraphSpec, and bound with
`set_tensor_address` once. A call copies its inputs into pinned memory and launches one CUDA graph that holds the
uploads, `execute_async_v3` and the downloads; it is captured after one eager run. Inputs that stay fixed for a task
(the instruction's cross-attention K/V) can be uploaded once with `set_constant_input` and left out of later calls.

`open_graph` is the entry point of `registry`: it loads a graph's prebuilt engine (a bundle ships them under
`engines/`), or builds one from its ONNX file into its cache directory (a bundle's `cache/tensorrt/`).

This module imports without TensorRT or cuda-python; creating a runner without them raises EngineError saying what to
install (`build.TENSORRT_MISSING`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from cosmos_edge.runtime.engines.graph import GraphFile, GraphSpec, check_feed, check_feeds
from cosmos_edge.runtime.engines.registry import cuda_index
from cosmos_edge.runtime.engines.tensorrt.build import (
    build_engine,
    check_engine_matches,
    current_target,
    deserialize_engine,
)
from cosmos_edge.runtime.engines.tensorrt.cache import (
    DEFAULT_BUILD_OPTIONS,
    REBUILD_BUNDLE_HINT,
    EngineCache,
    EngineRecord,
    EngineTarget,
    OnnxSource,
    cache_rebuild_hint,
    check_engine_source,
    engine_cache_key,
    read_engine,
)
from cosmos_edge.runtime.engines.tensorrt.cuda_buffers import CapturedWork, DeviceIO, check_cuda, import_cudart
from cosmos_edge.runtime.errors import EngineError
from cosmos_edge.runtime.files import exclusive_lock, writable_folder

if TYPE_CHECKING:
    import tensorrt as trt

_LOG = logging.getLogger(__name__)

ENGINE_CACHE_DIR = "tensorrt"  # under a graph's cache directory: engines built on first use


class TensorRTRunner:
    """Runs one graph through a TensorRT engine; meets `GraphRunner`.

    Create with `from_onnx` (build or reuse a cached engine) or `from_engine` (an engine file with its record, as a
    bundle ships them); release with `close()` or a `with` block. `run` returns new arrays owned by the caller; it
    makes the runner's CUDA device current on the calling thread itself.
    """

    def __init__(
        self,
        spec: GraphSpec,
        record: EngineRecord,
        runtime: trt.Runtime,
        engine: trt.ICudaEngine,
        context: trt.IExecutionContext,
        io: DeviceIO,
        device: int,
    ) -> None:
        self._spec = spec
        self._device = device
        self.record = record
        # Held for the engine's and context's lifetime; released in reverse order by close().
        self._runtime: trt.Runtime | None = runtime
        self._engine: trt.ICudaEngine | None = engine
        self._context: trt.IExecutionContext | None = context
        self._io = io
        self._constants: frozenset[str] = frozenset()
        self._streamed = tuple(spec.input_names)
        self._captured = CapturedWork(import_cudart(), io.stream, self._enqueue)

    @classmethod
    def from_onnx(
        cls,
        spec: GraphSpec,
        onnx: OnnxSource,
        cache_dir: Path,
        device: int = 0,
    ) -> TensorRTRunner:
        """Loads the engine cached for (ONNX digest, TensorRT version, GPU, options) in `cache_dir`, building it on
        a miss (minutes for the 2B DiT; progress is logged)."""
        target = current_target(device)
        cache = EngineCache(cache_dir)
        key = engine_cache_key(onnx.sha256(), target, DEFAULT_BUILD_OPTIONS)
        engine_path = cache.engine_path(spec.name, key)
        found = cache.lookup(spec.name, key, target)  # a cache that only serves may be read-only: no lock to find
        if found is None:
            found = _build_once(cache, spec, onnx, key, target, device)
        else:
            _LOG.info("using the cached TensorRT engine %s", engine_path)
        record, data = found
        return cls._activate(spec, record, data, device, cache_rebuild_hint(engine_path))

    @classmethod
    def from_engine(
        cls,
        spec: GraphSpec,
        engine_path: Path,
        device: int = 0,
        onnx_sha256: str | None = None,
    ) -> TensorRTRunner:
        """Loads a prebuilt engine (a bundle's), refusing one built for another TensorRT version or GPU, or (given
        `onnx_sha256`, the digest of the graph's files) from other ONNX files."""
        record, data = read_engine(engine_path, current_target(device), REBUILD_BUNDLE_HINT)
        check_engine_source(record, spec.name, onnx_sha256, engine_path)
        return cls._activate(spec, record, data, device, REBUILD_BUNDLE_HINT)

    @classmethod
    def _activate(
        cls, spec: GraphSpec, record: EngineRecord, data: bytes, device: int, rebuild_hint: str
    ) -> TensorRTRunner:
        check_cuda(import_cudart().cudaSetDevice(device), f"cudaSetDevice({device})")
        runtime, engine = deserialize_engine(data, spec.name, rebuild_hint)
        check_engine_matches(spec, engine, f"engine {record.file}")
        context = engine.create_execution_context()
        if context is None:  # the stubs say never; TensorRT returns None when it cannot allocate activations
            raise EngineError(f"engine {record.file}: TensorRT could not create an execution context (device memory?)")
        io = DeviceIO.allocate(spec)
        try:
            for name, buffer in (*io.inputs.items(), *io.outputs.items()):
                if name in io.inputs and not context.set_input_shape(name, buffer.spec.shape):
                    raise EngineError(f"engine {record.file}: set_input_shape({name!r}, {buffer.spec.shape}) failed")
                if not context.set_tensor_address(name, buffer.device_ptr):
                    raise EngineError(f"engine {record.file}: set_tensor_address({name!r}) failed")
        except BaseException:  # EngineError, or whatever TensorRT's bindings raise: the buffers are freed either way
            io.close()
            raise
        return cls(spec, record, runtime, engine, context, io, device)

    @property
    def spec(self) -> GraphSpec:
        return self._spec

    def set_constant_input(self, name: str, array: np.ndarray) -> None:
        """Uploads `name` now and keeps it for every later call, which then leaves it out of its inputs."""
        self._check_open()
        check_feed(self._spec, name, array)
        self._make_device_current()
        self._io.upload_now(name, array)
        if name not in self._constants:
            self._constants |= {name}
            self._streamed = tuple(n for n in self._spec.input_names if n not in self._constants)
            self._captured.reset()  # the captured uploads still include `name`

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        self._make_device_current()
        for name in check_feeds(self._spec, inputs, self._constants):
            np.copyto(self._io.inputs[name].host, inputs[name], casting="same_kind")
        self._captured.launch()
        self._io.synchronize()
        return {name: buffer.host.copy() for name, buffer in self._io.outputs.items()}

    def close(self) -> None:
        if self._context is None:
            return
        try:
            # Its GPU's objects are destroyed with its GPU current: the thread closing every runner has the device
            # of whichever runner was used last.
            self._make_device_current()
            self._captured.reset()
        finally:  # the buffers and the engine are released whatever failed before
            try:
                self._io.close()
            finally:
                self._context = None
                self._engine = None
                self._runtime = None

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _enqueue(self) -> None:
        context = self._context
        assert context is not None, "run() checks that the runner is open"
        self._io.enqueue_uploads(self._streamed)
        if not context.execute_async_v3(self._io.stream_handle):
            raise EngineError(f"graph {self._spec.name!r}: execute_async_v3 failed (see the TensorRT log)")
        self._io.enqueue_downloads()

    def _make_device_current(self) -> None:
        """The current CUDA device is per thread: a planning worker runs on its own thread, not the loading one."""
        check_cuda(import_cudart().cudaSetDevice(self._device), f"cudaSetDevice({self._device})")

    def _check_open(self) -> None:
        if self._context is None:
            raise EngineError(f"TensorRTRunner for graph {self._spec.name!r} is closed: create a new runner")


def _build_once(
    cache: EngineCache, spec: GraphSpec, onnx: OnnxSource, key: str, target: EngineTarget, device: int
) -> tuple[EngineRecord, bytes]:
    """The engine of a cache miss, built once across processes (minutes for the 2B DiT): a process that finds
    another building it waits, then uses that engine."""
    engine_path = cache.engine_path(spec.name, key)
    writable_folder(engine_path.parent, "the TensorRT engine cache")

    def waiting() -> None:
        _LOG.info("TensorRT engine %s: another process is building it; waiting to use it", engine_path)

    with exclusive_lock(engine_path.with_suffix(".lock"), on_wait=waiting):
        found = cache.lookup(spec.name, key, target)
        return found if found is not None else build_engine(spec, onnx, engine_path, device=device)


def check_target(device: str, precision: str) -> None:
    """The backend's check of a target (see `registry`): a CUDA device; TensorRT runs every bundle precision."""
    cuda_index(device)


def open_graph(graph: GraphFile, device: str) -> TensorRTRunner:
    """The backend entry point (see `registry`): the graph's prebuilt engine if it has one, else an engine built from
    its ONNX file (or reused) in `cache_dir/tensorrt/`, on `device` ("cuda" or "cuda:N")."""
    index = cuda_index(device)
    if graph.engine is not None:
        return TensorRTRunner.from_engine(graph.spec, graph.engine, index, onnx_sha256=graph.onnx_sha256)
    if graph.cache_dir is None:
        raise EngineError(
            f"graph {graph.spec.name!r}: has neither a prebuilt engine nor a cache directory to build one"
        )
    source = OnnxSource(graph.onnx, graph.external_data, known_sha256=graph.onnx_sha256)
    return TensorRTRunner.from_onnx(graph.spec, source, graph.cache_dir / ENGINE_CACHE_DIR, device=index)
