"""Test doubles for the bridge tests: a stub ALOHA policy, observations, and servers in a thread or a process.

Processes started with multiprocessing's spawn method import `serve_stub` from here too (as `tests.helpers...`: the
child inherits the parent's sys.path, which holds the repository root when pytest runs as `python -m pytest`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cosmos_edge.cli.serve_cmd import run_server
from cosmos_edge.robot_bridge.binding import ServerConfig
from cosmos_edge.robot_bridge.client import PolicyClient, RequestTimeout
from cosmos_edge.robot_bridge.server import PolicyServer, serving_in_thread
from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.platforms import IMAGE_SIZE, PlatformSpec, platform_spec
from cosmos_edge.runtime.policy.api import ActionQuery, CandidateResults, ChunkResult, Observation, PlanningOutcome

if TYPE_CHECKING:  # the HTTP endpoint needs the optional http extra
    from cosmos_edge.robot_bridge.http_server import HttpConfig

ALOHA = platform_spec("aloha")
INSTRUCTION = "put the cube in the bowl"
JOIN_TIMEOUT_S = 10.0


def observation(level: float = 0.0, *, platform: PlatformSpec = ALOHA) -> Observation:
    """Images filled with `int(level) % 256`, proprio = level + index."""
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    images = {camera: np.full(shape, int(level) % 256, dtype=np.uint8) for camera in platform.cameras}
    return Observation(images=images, proprio=np.arange(platform.proprio_dim, dtype=np.float32) + level)


def expected_actions(query_proprio: np.ndarray, seed: int = 195, offset: float = 0.0) -> np.ndarray:
    """What `StubPolicy` answers: row i of the chunk is proprio + i + seed / 1000 + offset."""
    rows = np.arange(ALOHA.chunk_size, dtype=np.float32)[:, None]
    return (query_proprio[None, :] + rows + np.float32(seed / 1000 + offset)).astype(np.float32)


class Flag(Protocol):
    """A `threading.Event`, or a multiprocessing one for a server in another process."""

    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


# A planning result of depth 2 (one predicted state) cut short by its deadline: candidate 2 was neither scored nor
# sampled. Candidate i's chunk at depth entry k is filled with 10·i + k.
_CUT_SHORT_CHUNKS = (
    np.stack(
        [[np.full((ALOHA.chunk_size, ALOHA.action_dim), 10 * i + k, np.float32) for k in range(2)] for i in range(3)]
    )
    * np.array([1, 1, np.nan], np.float32)[:, None, None, None]
)  # candidate 2's action pass missed the deadline
CUT_SHORT_CANDIDATES = CandidateResults(
    chosen=1,
    actions=_CUT_SHORT_CHUNKS[:, 0],
    values=np.array([0.5, 0.75, np.nan]),
    values_by_depth=np.array([[0.5, 0.25], [0.75, 1.0], [np.nan, np.nan]], np.float32),
    actions_by_depth=_CUT_SHORT_CHUNKS,
    outcome=PlanningOutcome.BEST_SO_FAR,
)


class StubPolicy:
    """Deterministic ALOHA `Policy`: the answer is a function of proprio, seed and `offset` (to tell modes apart).

    `gate`, when given, holds every inference until it is set; `delay_s` makes every inference take that long (for a
    server in another process, which a test cannot gate). `started` is set when an inference begins.
    """

    def __init__(
        self,
        *,
        offset: float = 0.0,
        gate: threading.Event | None = None,
        delay_s: float = 0.0,
        started: Flag | None = None,
        failure: BaseException | None = None,
        actions_shape: tuple[int, int] = (ALOHA.chunk_size, ALOHA.action_dim),
        platform: PlatformSpec = ALOHA,
        instructions: tuple[str, ...] = (INSTRUCTION,),
        candidates: CandidateResults | None = None,
    ) -> None:
        self.offset = offset
        self.candidates = candidates  # attached to every result, as a planning policy's
        self._platform = platform
        self.gate = gate
        self.delay_s = delay_s
        self.failure = failure
        self.actions_shape = actions_shape
        self._instructions = instructions
        self.started: Flag = started or threading.Event()
        self.queries: list[ActionQuery] = []

    @property
    def platform(self) -> PlatformSpec:
        return self._platform

    @property
    def instructions(self) -> tuple[str, ...]:
        return self._instructions

    def infer(self, query: ActionQuery) -> ChunkResult:
        self.queries.append(query)
        self.started.set()
        if self.gate is not None and not self.gate.wait(JOIN_TIMEOUT_S):
            raise TimeoutError("the test never opened the gate")
        time.sleep(self.delay_s)
        if self.failure is not None:
            raise self.failure
        if query.instruction not in self.instructions:
            raise InputError(
                f"instruction: no text embedding for {query.instruction!r}; expected one of {INSTRUCTION!r}"
            )
        actions = expected_actions(query.observation.proprio, query.seed, self.offset)
        if actions.shape != self.actions_shape:
            actions = np.zeros(self.actions_shape, dtype=np.float32)
        return ChunkResult(
            actions=actions,
            value=0.25,
            future_proprio=np.zeros(ALOHA.proprio_dim, dtype=np.float32),
            timings_ms={"dit": 1.5},
            candidates=self.candidates,
        )

    def reset(self) -> None:
        self.queries.clear()


def serving(server: PolicyServer) -> contextlib.AbstractContextManager[str]:
    """Runs `server` in a thread for the duration of a `with` block; yields its bound endpoint."""
    return serving_in_thread(server)


def serve_stub(
    endpoint: str,
    http: HttpConfig | None = None,
    *,
    delay_s: float = 0.0,
    started: Flag | None = None,
    shutdown_timeout_s: float = 5.0,
) -> None:
    """Target of spawned server processes: serves a `StubPolicy` until SIGINT/SIGTERM, as the CLI does."""
    policy = StubPolicy(delay_s=delay_s, started=started)
    config = ServerConfig(endpoint=endpoint, shutdown_timeout_s=shutdown_timeout_s)
    run_server(PolicyServer({"reactive": policy}, config), http)


STARTUP_S = 30.0  # a spawned interpreter importing numpy and zmq on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(client: PolicyClient) -> None:
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            client.ping()
            return
        except RequestTimeout:
            if time.monotonic() > deadline:
                raise


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Polls `condition` until it holds; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
