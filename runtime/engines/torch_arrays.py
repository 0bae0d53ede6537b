"""`ArrayOps` over torch tensors on one device: a sampling pass of the torch backend runs where its DiT does.

Every operation is the elementwise IEEE operation numpy performs (no fused multiply-add: each is its own kernel), so a
pass gives numpy's bits on any device
(tests/runtime/test_sampler_arrays.py holds the CPU to that; benchmarks/gpu_check.py checks a GPU).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

_NOISE_CACHE = 64  # as the host noise cache: a planning query draws from about a dozen seeds


class TorchArrays:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cached: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
        self._caching = threading.Lock()  # the reactive and the planning queries share a device

    def put(self, array: np.ndarray) -> torch.Tensor:
        host = np.ascontiguousarray(array)
        if not host.flags.writeable:  # a shared read-only array (the noise of a seed): torch needs its own
            host = host.copy()
        return torch.from_numpy(host).to(self.device)

    def put_cached(self, key: tuple[object, ...], make: Callable[[], np.ndarray]) -> torch.Tensor:
        with self._caching:
            tensor = self._cached.get(key)
            if tensor is None:
                tensor = self._cached[key] = self.put(make())
                if len(self._cached) > _NOISE_CACHE:
                    self._cached.popitem(last=False)
            else:
                self._cached.move_to_end(key)
            return tensor

    def clear(self) -> None:
        """Drops the cached device arrays (the noise of each seed)."""
        with self._caching:
            self._cached.clear()

    def fetch(self, array: torch.Tensor) -> np.ndarray:
        return array.cpu().numpy()

    def vector32(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(np.asarray(values, dtype=np.float32), device=self.device)

    def float32(self, array: torch.Tensor) -> torch.Tensor:
        return array.to(torch.float32)

    def float64(self, array: torch.Tensor) -> torch.Tensor:
        return array.to(torch.float64)

    def where(self, condition: torch.Tensor, if_true: torch.Tensor | float, if_false: torch.Tensor) -> torch.Tensor:
        return torch.where(condition, if_true, if_false)

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays))

    def empty_like(self, array: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(array)

    def synchronize(self) -> None:
        # The calling thread's stream, where its network calls run; not the whole device, which CUDA refuses while
        # another thread captures a graph on it (and which would wait for the other threads' work too).
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
