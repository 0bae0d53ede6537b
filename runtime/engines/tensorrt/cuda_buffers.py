"""Host-device I/O for compiled engines through cuda-python: buffers allocated once, one stream, one CUDA graph.

cuda-python rather than torch because the serving path never imports torch (issue 4); it is imported lazily so
that this module, and the backends built on it, import on machines without CUDA. Every cuda-python call returns an
`(error, *values)` tuple; `check_cuda` turns a failed one into an `EngineError` that names the call and the error.

Inputs travel host -> pinned staging -> device and outputs back the same way, so the copies, like the engine
launch between them, have fixed addresses and can be recorded once in a CUDA graph (pageable memory cannot be).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cosmos_edge.runtime.engines.graph import GraphSpec, TensorSpec
from cosmos_edge.runtime.errors import EngineError

_LOG = logging.getLogger(__name__)

CUDA_ERROR_REFERENCE = "https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html"
CUDA_PYTHON_MISSING = (
    "cuda-python 12.6.1 or newer is not installed (its cuda.bindings.runtime): the tensorrt backend moves tensors "
    "with it (pip install 'cuda-python>=12.6.1' on a CUDA machine) or use --backend onnxruntime"
)


def import_cudart() -> ModuleType:
    """cuda-python's runtime API module (`cuda.bindings.runtime`, cuda-python >= 12.6.1)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError as error:
        raise EngineError(CUDA_PYTHON_MISSING) from error


def check_cuda(result: tuple[Any, ...], call: str) -> Any:
    """Unwraps a cuda-python `(error, *values)` tuple: no value -> None, one -> it, several -> the tuple.

    Raises EngineError naming `call` and the error (e.g. cudaErrorMemoryAllocation) unless it is success (0).
    """
    error, *values = result
    if int(error) != 0:
        name = getattr(error, "name", None) or f"cudaError {int(error)}"
        raise EngineError(f"{call}: expected cudaSuccess, got {name} ({int(error)}); see {CUDA_ERROR_REFERENCE}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class IOBuffer:
    """One graph tensor: `host` is a numpy view over pinned memory at `host_ptr`; `device_ptr` has the same bytes."""

    spec: TensorSpec
    host: np.ndarray
    host_ptr: int
    device_ptr: int


def _allocate(cudart: ModuleType, spec: TensorSpec, allocated: list[tuple[str, int]]) -> IOBuffer:
    dtype = np.dtype(spec.dtype)
    nbytes = int(np.prod(spec.shape, dtype=np.int64)) * dtype.itemsize
    host_ptr = check_cuda(cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes}) for {spec.name!r}")
    allocated.append(("host", host_ptr))
    device_ptr = check_cuda(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {spec.name!r}")
    allocated.append(("device", device_ptr))
    # NOTE: the array only views the pinned bytes; DeviceIO.close frees them, after which it must not be read.
    host = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(host_ptr)).view(dtype).reshape(spec.shape)
    return IOBuffer(spec, host, host_ptr, device_ptr)


def _free(cudart: ModuleType, allocated: Iterable[tuple[str, int]]) -> None:
    """Frees every allocation, even after one fails (a sticky CUDA error); raises the first failure at the end."""
    failure: EngineError | None = None
    for kind, ptr in allocated:
        try:
            if kind == "host":
                check_cuda(cudart.cudaFreeHost(ptr), "cudaFreeHost")
            else:
                check_cuda(cudart.cudaFree(ptr), "cudaFree")
        except EngineError as error:
            failure = failure or error
    if failure is not None:
        raise failure


class DeviceIO:
    """Pinned staging and device buffers for every input and output of one graph, and the stream they move on.

    Created by `allocate`, released by `close`; nothing is allocated per call.
    """

    def __init__(
        self,
        cudart: ModuleType,
        stream: Any,
        inputs: Mapping[str, IOBuffer],
        outputs: Mapping[str, IOBuffer],
    ) -> None:
        self._cudart = cudart
        self.stream = stream
        self.inputs = dict(inputs)
        self.outputs = dict(outputs)
        self._closed = False

    @classmethod
    def allocate(cls, spec: GraphSpec) -> DeviceIO:
        """Allocates one pinned and one device buffer per tensor of `spec`, and a non-blocking stream."""
        cudart = import_cudart()
        allocated: list[tuple[str, int]] = []
        try:
            inputs = {tensor.name: _allocate(cudart, tensor, allocated) for tensor in spec.inputs}
            outputs = {tensor.name: _allocate(cudart, tensor, allocated) for tensor in spec.outputs}
            # Non-blocking: the legacy default stream would serialise with other work and cannot be captured.
            stream = check_cuda(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        except EngineError:
            _free(cudart, allocated)
            raise
        return cls(cudart, stream, inputs, outputs)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def enqueue_uploads(self, names: Iterable[str]) -> None:
        for name in names:
            buffer = self.inputs[name]
            self._copy_async(buffer.device_ptr, buffer.host_ptr, buffer.host.nbytes, "HostToDevice", name)

    def enqueue_downloads(self) -> None:
        for name, buffer in self.outputs.items():
            self._copy_async(buffer.host_ptr, buffer.device_ptr, buffer.host.nbytes, "DeviceToHost", name)

    def upload_now(self, name: str, array: np.ndarray) -> None:
        """Copies `array` into input `name`'s device buffer and waits: for inputs that stay constant across calls."""
        np.copyto(self.inputs[name].host, array, casting="same_kind")
        self.enqueue_uploads([name])
        self.synchronize()

    def synchronize(self) -> None:
        check_cuda(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Frees every buffer and the stream; the host views in `inputs`/`outputs` are invalid afterwards."""
        if self._closed:
            return
        self._closed = True
        buffers = (*self.inputs.values(), *self.outputs.values())
        allocated = [pair for b in buffers for pair in (("host", b.host_ptr), ("device", b.device_ptr))]
        steps: tuple[Callable[[], object], ...] = (
            self.synchronize,  # the work in flight may still read the buffers
            lambda: _free(self._cudart, allocated),
            lambda: check_cuda(self._cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy"),
        )
        failures = []
        for step in steps:  # each runs even after one fails (a sticky CUDA error): nothing is leaked
            try:
                step()
            except EngineError as error:
                failures.append(error)
        if failures:
            raise failures[0]

    def _copy_async(self, dst: int, src: int, nbytes: int, direction: str, name: str) -> None:
        kind = getattr(self._cudart.cudaMemcpyKind, f"cudaMemcpy{direction}")
        check_cuda(
            self._cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), f"cudaMemcpyAsync {direction} {name!r}"
        )


class CapturedWork:
    """Runs `work` (which enqueues on `stream`) as a CUDA graph.

    The first `launch` runs it eagerly, because TensorRT finishes lazy set-up on its first enqueue and that cannot be
    captured, then records it into a graph without running it again; later launches replay the graph. The graph
    bakes in every address `work` uses: call `reset` whenever one changes, and it is captured again. Work that
    cannot be captured (the capture fails) is logged once and launched plainly from then on: its first run's results
    stand.
    """

    def __init__(self, cudart: ModuleType, stream: Any, work: Callable[[], None]) -> None:
        self._cudart = cudart
        self._stream = stream
        self._work = work
        self._graph: Any = None
        self._graph_exec: Any = None
        self._plain = False

    def launch(self) -> None:
        if self._graph_exec is not None:
            check_cuda(self._cudart.cudaGraphLaunch(self._graph_exec, self._stream), "cudaGraphLaunch")
            return
        self._work()
        if self._plain:
            return
        try:
            self._capture()
        except EngineError as error:
            _LOG.warning("CUDA graph capture failed (%s); launching this work without a graph from now on", error)
            self._plain = True
            self.reset()

    def reset(self) -> None:
        if self._graph_exec is not None:
            check_cuda(self._cudart.cudaGraphExecDestroy(self._graph_exec), "cudaGraphExecDestroy")
            self._graph_exec = None
        if self._graph is not None:
            check_cuda(self._cudart.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None

    def _capture(self) -> None:
        cudart = self._cudart
        self.reset()
        # Thread-local: another thread of this process (a second runner, onnxruntime) may allocate meanwhile.
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check_cuda(cudart.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        try:
            self._work()
        except BaseException:
            cudart.cudaStreamEndCapture(self._stream)  # leaves the stream usable; the work's error is the one raised
            raise
        self._graph = check_cuda(cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        self._graph_exec = check_cuda(cudart.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
        _LOG.debug("captured a CUDA graph on stream %#x", int(self._stream))
