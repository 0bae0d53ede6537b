"""CUDA graphs for the torch backend's fixed-shape calls: the batch-1 DiT call and the conditioning encode.

A compiled 2B DiT call is hundreds of kernels launched one by one from Python (Inductor's wrapper), the camera encode
dozens more after the image transforms; the GPU idles wherever the host is slower to launch than the kernel runs. On
an H200 a compiled 1-step query ran 24.3 ms of kernels in 30.7 ms (benchmarks/results/gpu_check_h200.json,
`query_profile` and `query_fast_compiled`). A graph replays every kernel of a call from one launch: the same kernels,
so the same bits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeAlias

import torch

from cosmos_edge.runtime.errors import ConfigError

_LOG = logging.getLogger(__name__)

Capture = Callable[..., torch.Tensor]
GraphPool: TypeAlias = Any  # torch's memory-pool handle, whose type is private

# A process captures one graph at a time: torch's capture machinery is process-wide (it synchronises the device and
# empties the allocator's cache as a capture begins), and networks on several devices may capture from several threads.
_CAPTURING = threading.Lock()
# Set when a capture failed for another reason than memory: torch may leave its allocator counting that capture as
# underway (its end raised before the allocator was told), so no network of the process captures again.
_CAPTURES_OFF = threading.Event()


def empty_cache() -> None:
    """`torch.cuda.empty_cache()`, never while another thread captures (it asserts that no capture is underway)."""
    with _CAPTURING:
        torch.cuda.empty_cache()


def graph_pool(device: torch.device) -> GraphPool:
    """A memory pool for the CUDA graphs of one network on `device`."""
    if device.type != "cuda":
        raise ConfigError(f"cuda_graphs: CUDA graphs need a CUDA device, got {device}")
    with torch.cuda.device(device):
        return torch.cuda.graph_pool_handle()


class CaptureFailed(RuntimeError):
    """Capturing a call as a CUDA graph failed (its plain call had run)."""


class CapturedCall:
    """`function` of fixed-shape CUDA tensors, captured once as a CUDA graph and replayed.

    The graph reads and writes fixed addresses: each call copies its inputs into the capture's own, and hands back a
    copy of the output, so the next replay cannot overwrite what a caller holds. It reads every other tensor
    `function` reads at the address it had during the capture, so those must outlive the capture: `function` is kept
    (with what it closes over), and so is `holds` (tensors that only a cache keeps). `function` must launch the same
    work whatever the inputs' values (no host reads of device values, no data-dependent shapes).
    """

    def __init__(
        self, function: Capture, inputs: Sequence[torch.Tensor], pool: GraphPool, holds: Sequence[torch.Tensor] = ()
    ) -> None:
        self._function = function
        self._holds = tuple(holds)
        self._inputs = tuple(tensor.clone() for tensor in inputs)
        device = self._inputs[0].device
        # Warm-up and capture on a stream of the inputs' device: torch's default capture stream belongs to whichever
        # device was current when it was first made.
        caller = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(caller)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            # Outside the capture, and outside its lock: compilation (minutes for a 2B DiT), autotuning, cuBLAS and
            # cuDNN set-up hold no other network's capture back. Its errors are the function's own: they propagate.
            function(*self._inputs)
        with _CAPTURING:
            try:
                # thread_local: CUDA calls of other threads (a planning worker's last call) are not refused meanwhile.
                with torch.cuda.graph(self._graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                    self._output = function(*self._inputs)
            except RuntimeError as error:
                raise CaptureFailed(str(error)) from error
            finally:
                # A capture whose end raised leaves `side` current (torch restores the stream after ending it): the
                # caller's calls go on on its own stream, after the side stream's work, failed or not.
                torch.cuda.set_stream(caller)
                caller.wait_stream(side)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for captured, given in zip(self._inputs, inputs, strict=True):
            captured.copy_(given)
        self._graph.replay()
        return self._output.clone()


class CapturedCalls:
    """Captured calls by key (the shapes, or the timesteps, that fix what a call launches), up to `limit` keys, the
    first met; calls of later keys run plainly. (Keeping the most recently used instead would capture on every call
    of a query cycling through more keys than the limit, each capture evicting a key the query needs next.) They
    take their memory from `pool` (`torch.cuda.graph_pool_handle()`), which the captures of one network share: its
    calls never overlap (one stream, one caller at a time), so a capture's scratch memory can be every capture's. A
    capture that fails is logged: for want of memory, that key runs plainly; otherwise (a kernel that cannot be
    captured on this torch or driver) no more keys are captured, and the captures made so far are kept: slower, not
    wrong. An error of the call itself propagates."""

    def __init__(self, limit: int, pool: GraphPool) -> None:
        self._limit = limit
        self._pool = pool
        self._calls: dict[Hashable, CapturedCall | None] = {}  # None: this key runs plainly
        self._plain = False  # no more captures

    def captures(self, key: Hashable) -> bool:
        """Whether `key`'s calls replay a capture."""
        return self._calls.get(key) is not None

    def replay(self, key: Hashable, inputs: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The replay of `key`'s capture on `inputs`, or None when `key` has none (yet, or runs plainly)."""
        call = self._calls.get(key)
        return None if call is None else call(*inputs)

    def __call__(
        self, key: Hashable, function: Capture, inputs: Sequence[torch.Tensor], holds: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:
        """`function(*inputs)` replayed from the capture of `key`, captured from `function` on a first call (`holds`:
        as `CapturedCall`'s)."""
        if key in self._calls:
            call = self._calls[key]
            return function(*inputs) if call is None else call(*inputs)
        if self._plain or _CAPTURES_OFF.is_set() or len(self._calls) >= self._limit:
            return function(*inputs)
        try:
            call = self._calls[key] = CapturedCall(function, inputs, self._pool, holds)
        except CaptureFailed as failure:
            if isinstance(failure.__cause__, torch.OutOfMemoryError):
                _LOG.warning("CUDA graph capture ran out of memory: this call runs without a graph (%s)", failure)
                self._calls[key] = None
            else:
                _LOG.warning(
                    "CUDA graph capture failed: no call of this process is captured from now on (those made are kept; "
                    "--no-cuda-graphs avoids captures from the start): %s",
                    failure,
                )
                self._plain = True
                _CAPTURES_OFF.set()
            return function(*inputs)
        return call(*inputs)
