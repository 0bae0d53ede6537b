"""cuda-python I/O: the error helper everywhere; pinned/device buffers and CUDA-graph replay on a CUDA machine."""

from __future__ import annotations

import enum
import importlib.util

import numpy as np
import pytest

from cosmos_edge.runtime.engines.graph import GraphSpec, TensorSpec
from cosmos_edge.runtime.engines.tensorrt.cuda_buffers import (
    CUDA_ERROR_REFERENCE,
    CapturedWork,
    DeviceIO,
    IOBuffer,
    check_cuda,
    import_cudart,
)
from cosmos_edge.runtime.errors import EngineError
from tests.helpers.fake_cudart import RecordingCudart


class FakeCudaError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


def cuda_device_count() -> int:
    """CUDA devices cuda-python sees; 0 without cuda-python or a driver (it reports an error then)."""
    if importlib.util.find_spec("cuda.bindings") is None:
        return 0
    error, count = import_cudart().cudaGetDeviceCount()
    return int(count) if int(error) == 0 else 0


needs_gpu = pytest.mark.skipif(cuda_device_count() == 0, reason="needs cuda-python and a CUDA device")


@pytest.mark.parametrize(
    ("result", "value"),
    [
        ((FakeCudaError.cudaSuccess,), None),
        ((FakeCudaError.cudaSuccess, 0x7F00), 0x7F00),
        ((FakeCudaError.cudaSuccess, "graph", "node"), ("graph", "node")),
    ],
)
def test_check_cuda_unwraps_success(result: tuple[object, ...], value: object) -> None:
    assert check_cuda(result, "cudaCall") == value


def test_check_cuda_names_the_call_and_error() -> None:
    with pytest.raises(EngineError) as raised:
        check_cuda((FakeCudaError.cudaErrorMemoryAllocation, None), "cudaMalloc(1024) for 'x'")
    assert str(raised.value) == (
        f"cudaMalloc(1024) for 'x': expected cudaSuccess, got cudaErrorMemoryAllocation (2); see {CUDA_ERROR_REFERENCE}"
    )


def test_closing_after_a_sticky_cuda_error_still_frees_every_buffer_and_the_stream() -> None:
    spec = TensorSpec("x", (2,), "float32")
    buffers = {name: IOBuffer(spec, np.zeros(2, np.float32), 10 * i + 1, 10 * i + 2) for i, name in enumerate("abc")}
    cudart = RecordingCudart(error=700)  # after a sticky CUDA error: every call fails
    io = DeviceIO(cudart, "stream", {"a": buffers["a"]}, {"b": buffers["b"], "c": buffers["c"]})  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="cudaStreamSynchronize"):  # the first failure is the one raised
        io.close()
    freed = sorted(pointer for name, pointer in cudart.calls if name in ("cudaFree", "cudaFreeHost"))
    assert freed == [1, 2, 11, 12, 21, 22] and ("cudaStreamDestroy", "stream") in cudart.calls
    io.close()  # closed once: nothing is freed twice
    assert len(cudart.calls) == 8


def test_check_cuda_without_an_error_name() -> None:
    with pytest.raises(EngineError, match=r"expected cudaSuccess, got cudaError 700 \(700\)"):
        check_cuda((700,), "cudaStreamSynchronize")


def test_check_cuda_with_cuda_python_errors() -> None:
    if importlib.util.find_spec("cuda.bindings") is None:
        pytest.skip("cuda-python is not installed")
    cudart = import_cudart()
    with pytest.raises(EngineError, match="got cudaErrorMemoryAllocation"):
        check_cuda((cudart.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")


@pytest.mark.gpu
@needs_gpu
def test_captured_uploads_and_downloads_replay_with_new_inputs() -> None:
    """A device-to-device copy stands in for the engine: y = x through pinned staging, replayed from a graph."""
    spec = GraphSpec("copy", inputs=(TensorSpec("x", (3, 5, 7)),), outputs=(TensorSpec("y", (3, 5, 7)),))
    cudart = import_cudart()
    io = DeviceIO.allocate(spec)
    x, y = io.inputs["x"], io.outputs["y"]

    def work() -> None:
        io.enqueue_uploads(["x"])
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check_cuda(cudart.cudaMemcpyAsync(y.device_ptr, x.device_ptr, x.host.nbytes, kind, io.stream), "copy")
        io.enqueue_downloads()

    captured = CapturedWork(cudart, io.stream, work)
    rng = np.random.default_rng(0)
    try:
        for _ in range(3):  # eager + capture, then two replays: each must see the new pinned contents
            expected = rng.standard_normal(spec.inputs[0].shape).astype(np.float32)
            np.copyto(x.host, expected)
            y.host.fill(np.nan)
            captured.launch()
            io.synchronize()
            np.testing.assert_array_equal(y.host, expected)
        captured.reset()
        io.upload_now("x", np.full(spec.inputs[0].shape, 2.0))  # float64 casts into the float32 buffer
        y.host.fill(np.nan)
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check_cuda(cudart.cudaMemcpyAsync(y.device_ptr, x.device_ptr, x.host.nbytes, kind, io.stream), "copy")
        io.enqueue_downloads()
        io.synchronize()
        assert np.all(y.host == 2.0)
    finally:
        captured.reset()
        io.close()


class UncapturableRuntime:
    """A cudart whose stream captures are invalidated (error 900, as when captured work is not capturable)."""

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self) -> None:
        self.calls: list[str] = []

    def cudaStreamBeginCapture(self, stream: object, mode: object) -> tuple[int]:
        self.calls.append("begin")
        return (FakeCudaError.cudaSuccess,)

    def cudaStreamEndCapture(self, stream: object) -> tuple[int, None]:
        self.calls.append("end")
        return (900, None)


def test_work_that_cannot_be_captured_runs_without_a_graph_from_then_on(caplog: pytest.LogCaptureFixture) -> None:
    cudart, runs = UncapturableRuntime(), []
    work = CapturedWork(cudart, "stream", lambda: runs.append(len(cudart.calls)))  # type: ignore[arg-type]
    for _ in range(3):
        work.launch()
    # Run eagerly, then the failed capture (its run records nothing real), then plain launches: no second capture.
    assert cudart.calls == ["begin", "end"] and len(runs) == 4
    assert caplog.text.count("CUDA graph capture failed") == 1
