"""Inference off the control thread: the policy-client interface, request/outcome messages and a worker.

The executor only sees `ChunkSource` (submit one request, poll for its outcome, never block), so tests
can substitute a deterministic source, and a transport other than the ZeroMQ client fits behind it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import numpy as np

from cosmos_edge.runtime.policy.api import Observation

_LOG = logging.getLogger(__name__)

Clock = Callable[[], int]  # monotonic nanoseconds
Prepare = Callable[[Observation], Observation]  # a captured observation -> what the client sends


class ChunkReply(Protocol):
    @property
    def obs_id(self) -> int: ...

    @property
    def actions(self) -> np.ndarray: ...

    @property
    def value(self) -> float: ...

    @property
    def timings_ms(self) -> Mapping[str, float]: ...


class ActClient(Protocol):
    """What the chunk source needs of a client (`robot_bridge.client.PolicyClient` meets it).

    Raises TimeoutError (or a subclass) on timeout, another Exception on a remote error.
    """

    def act(
        self,
        observation: Observation,
        instruction: str,
        *,
        obs_id: int,
        capture_time_ns: int,
        mode: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
    ) -> ChunkReply: ...


@dataclass(frozen=True)
class ActParams:
    """What every request asks the policy for; None leaves the choice to the server."""

    instruction: str
    mode: str | None = None
    seed: int | None = None
    steps: int | None = None


@dataclass(frozen=True)
class ChunkRequest:
    obs_id: int  # the tick that captured `observation`
    first_tick: int  # the tick action 0 of the answer is meant for
    capture_ns: int  # executor (monotonic) clock, for local latency
    capture_wall_ns: int  # wall clock (time.time_ns), what the wire protocol carries
    observation: Observation


@dataclass(frozen=True)
class Chunk:
    """An answered request. `actions` is (chunk, dims) float32."""

    obs_id: int
    first_tick: int
    actions: np.ndarray
    value: float
    timings_ms: Mapping[str, float]
    capture_ns: int  # the executor's clock, for the round trip it measures


@dataclass(frozen=True)
class RequestFailed:
    obs_id: int
    error: Exception


Outcome = Chunk | RequestFailed


class ChunkSource(Protocol):
    """Runs one inference request at a time away from the control thread."""

    @property
    def busy(self) -> bool:
        """True from `submit` until its outcome has been taken by `poll` (a finished outcome not yet taken still
        counts: a second request then would answer the same situation twice)."""
        ...

    def submit(self, request: ChunkRequest) -> None: ...

    def poll(self) -> Outcome | None:
        """The newest finished outcome not yet polled; never blocks."""
        ...


def request_chunk(client: ActClient, params: ActParams, request: ChunkRequest) -> Outcome:
    """Call the policy for `request` and turn the reply, or the failure, into an `Outcome`. Never raises: a remote or
    transport error, or a reply that cannot be read, must not kill the worker (the loop holds and retries)."""
    try:
        reply = client.act(
            request.observation,
            params.instruction,
            obs_id=request.obs_id,
            capture_time_ns=request.capture_wall_ns,
            mode=params.mode,
            seed=params.seed,
            steps=params.steps,
        )
        if reply.obs_id != request.obs_id:
            raise ValueError(f"reply obs_id: expected {request.obs_id}, got {reply.obs_id}")
        return Chunk(
            obs_id=request.obs_id,
            first_tick=request.first_tick,
            actions=np.asarray(reply.actions, dtype=np.float32),
            value=float(reply.value),
            timings_ms=dict(reply.timings_ms),
            capture_ns=request.capture_ns,
        )
    except Exception as error:
        return RequestFailed(obs_id=request.obs_id, error=error)


class ThreadedChunkSource:
    """`ChunkSource` backed by one worker thread, one request at a time: the next is taken once the outcome of the
    last has been polled. `prepare` turns a captured observation into what the client sends (ALOHA's camera frames
    resized to the wire's, `camera_frames.aloha_wire_observation`), on the worker.

    Use as a context manager, or call `start()` and `close()`.
    """

    def __init__(self, client: ActClient, params: ActParams, prepare: Prepare | None = None) -> None:
        self._client = client
        self._params = params
        self._prepare = prepare
        self._cond = threading.Condition()
        self._pending: ChunkRequest | None = None
        self._outcome: Outcome | None = None
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="chunk-source", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop_requests(self) -> None:
        """Takes no further request: a request submitted but not yet taken is never sent (the one in flight, if any,
        runs on until it ends or its client is closed). Without waiting; `close` then waits for the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker; waits up to `timeout_s` for a request in flight (bounded by the client timeout)."""
        self.stop_requests()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _LOG.warning("chunk source: worker still in a request after %.1f s; leaving it (daemon)", timeout_s)

    def __enter__(self) -> ThreadedChunkSource:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy

    def submit(self, request: ChunkRequest) -> None:
        """Hands `request` to the worker. On a source whose requests were stopped (from any thread), the request's
        outcome is a `RequestFailed` saying so: the control loop holds and keeps running."""
        with self._cond:
            if self._busy:
                raise RuntimeError("chunk source: submit while a request is in flight (check `busy` first)")
            self._busy = True
            if self._closed:
                self._outcome = _stopped(request)
                return
            self._pending = request
            self._cond.notify()

    def poll(self) -> Outcome | None:
        with self._cond:
            outcome, self._outcome = self._outcome, None
            if outcome is not None:
                self._busy = False
            return outcome

    def _prepared(self, request: ChunkRequest) -> ChunkRequest | RequestFailed:
        """`request` with its observation through `prepare`, or its failure as the request's outcome."""
        if self._prepare is None:
            return request
        try:
            return dataclasses.replace(request, observation=self._prepare(request.observation))
        except Exception as error:
            return RequestFailed(obs_id=request.obs_id, error=error)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._closed:
                    if self._pending is not None:  # submitted, never sent: it fails, so the source is free again
                        self._outcome, self._pending = _stopped(self._pending), None
                    return
                request, self._pending = self._pending, None
            assert request is not None
            prepared = self._prepared(request)
            if isinstance(prepared, ChunkRequest):
                with self._cond:
                    if self._closed:  # closed while it was prepared: nothing more is sent
                        self._outcome = _stopped(request)
                        return
                outcome: Outcome = request_chunk(self._client, self._params, prepared)
            else:
                outcome = prepared
            with self._cond:
                self._outcome = outcome  # `submit` refuses until the previous one is polled: none is overwritten


def _stopped(request: ChunkRequest) -> RequestFailed:
    """The outcome of a request that was never sent, requests having been stopped."""
    return RequestFailed(request.obs_id, RuntimeError("chunk source: requests were stopped"))
