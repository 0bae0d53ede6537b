"""A stand-in for cuda-python's runtime module, for the CUDA-buffer and TensorRT-runner code on machines without a
GPU: every call answers `(error,)` and is recorded."""

from __future__ import annotations


class RecordingCudart:
    """Every call returns `(error,)` (0: cudaSuccess; 700 a sticky error, say) and is recorded as (name, first
    argument)."""

    def __init__(self, error: int = 0) -> None:
        self.error = error
        self.calls: list[tuple[str, object]] = []

    def __getattr__(self, name: str) -> object:
        def call(*args: object) -> tuple[int]:
            self.calls.append((name, args[0] if args else None))
            return (self.error,)

        return call
