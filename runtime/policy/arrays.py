"""Where a sampling pass keeps its arrays: numpy on the host, or the memory of the network's device.

The sampler is written once over `ArrayOps`, the few array operations it needs. `HOST_ARRAYS` runs it on numpy (ONNX
Runtime and TensorRT networks take host arrays); the torch backend supplies device tensors
(`engines/torch_arrays.py`), so a pass uploads its conditioning once, keeps its noise cached on the device, and calls
the DiT without a host round trip per denoising step. The operations are elementwise IEEE float32/float64 arithmetic
and selection, which give the same bits on either side (tests/runtime/test_sampler_arrays.py); the network's bf16
timesteps are made on the host whatever the place (`sampler._network_timesteps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias

import numpy as np

Array: TypeAlias = Any
"""A numpy array, or a device array of the `ArrayOps` that made it."""


class ArrayOps(Protocol):
    """Arrays of one place (host or device)."""

    def put(self, array: np.ndarray) -> Array:
        """A host array in this place (the host itself: no copy)."""
        ...

    def put_cached(self, key: tuple[object, ...], make: Callable[[], np.ndarray]) -> Array:
        """`put(make())`, kept for later calls with the same key (the initial noise of a seed)."""
        ...

    def fetch(self, array: Array) -> np.ndarray: ...

    def vector32(self, values: Sequence[float]) -> Array:
        """Python floats as a float32 vector (each rounded to nearest)."""
        ...

    def float32(self, array: Array) -> Array: ...

    def float64(self, array: Array) -> Array: ...

    def where(self, condition: Array, if_true: Array | float, if_false: Array) -> Array: ...

    def concat(self, arrays: Sequence[Array]) -> Array: ...

    def empty_like(self, array: Array) -> Array: ...

    def synchronize(self) -> None:
        """Waits for the work queued on this place (for timing; nothing to wait for on the host)."""
        ...


class HostArrays:
    """`ArrayOps` over numpy."""

    def put(self, array: np.ndarray) -> np.ndarray:
        return array

    def put_cached(self, key: tuple[object, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        return make()  # host arrays are cached where they are made

    def fetch(self, array: np.ndarray) -> np.ndarray:
        return array

    def vector32(self, values: Sequence[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.float32)

    def float32(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array, dtype=np.float32)

    def float64(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array, dtype=np.float64)

    def where(self, condition: np.ndarray, if_true: np.ndarray | float, if_false: np.ndarray) -> np.ndarray:
        return np.where(condition, if_true, if_false)

    def concat(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)

    def empty_like(self, array: np.ndarray) -> np.ndarray:
        return np.empty_like(array)

    def synchronize(self) -> None:
        pass


HOST_ARRAYS = HostArrays()
