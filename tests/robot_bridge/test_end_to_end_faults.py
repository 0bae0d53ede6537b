"""Executor → client → server process, across a server crash: the robot holds position while the server is gone,
and chunks flow again once it is back. Real clock, 50 Hz, loopback TCP."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np

from cosmos_edge.robot_bridge.client import PolicyClient
from cosmos_edge.robot_bridge.controller.chunk_source import ActParams, ThreadedChunkSource
from cosmos_edge.robot_bridge.controller.executor import ChunkExecutor, ExecutorConfig
from cosmos_edge.robot_bridge.controller.safety import SafetyConfig, SafetyFilter
from cosmos_edge.robot_bridge.controller.ticks import NO_CHUNK
from cosmos_edge.runtime.policy.api import Observation
from tests.helpers.bridge_doubles import (
    INSTRUCTION,
    STARTUP_S,
    free_port,
    observation,
    serve_stub,
    wait_for,
    wait_until_serving,
)

START = np.array([0.0, -0.5, 0.5, 0.0, 0.3, 0.0, 0.5] * 2)


class RecordingRobot:
    """Tracks commands perfectly; observations carry wire-sized images and the current joint positions."""

    def __init__(self) -> None:
        self.qpos = START.copy()
        self.commands: list[np.ndarray] = []

    def observe(self) -> Observation:
        return Observation(observation().images, self.qpos.astype(np.float32))

    def current_qpos(self) -> np.ndarray:
        return self.qpos.copy()

    def command(self, qpos_target: np.ndarray) -> None:
        self.commands.append(qpos_target.copy())
        self.qpos = qpos_target.copy()


def test_executor_holds_while_the_server_is_down_and_recovers() -> None:
    spawn = multiprocessing.get_context("spawn")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = spawn.Process(target=serve_stub, args=(endpoint,), daemon=True)
    second = spawn.Process(target=serve_stub, args=(endpoint,), daemon=True)
    first.start()
    robot = RecordingRobot()
    done = threading.Event()
    try:
        with PolicyClient(endpoint, timeout_s=0.3) as client:
            wait_until_serving(client)
            with ThreadedChunkSource(client, ActParams(INSTRUCTION)) as source:
                config = ExecutorConfig(control_rate_hz=50.0, prefetch_threshold=40, retry_delay_s=0.05)
                executor = ChunkExecutor(robot, source, SafetyFilter(SafetyConfig()), config)

                def control_loop() -> None:
                    while not done.is_set():
                        executor.run(num_ticks=10)

                loop = threading.Thread(target=control_loop, name="control", daemon=True)
                loop.start()
                wait_for(lambda: executor.counters.chunks_adopted >= 2, 10.0, "chunks from the first server")

                first.kill()
                first.join(STARTUP_S)
                failures_at_kill = executor.counters.request_failures
                wait_for(lambda: executor.counters.request_failures > failures_at_kill, 5.0, "failed requests")
                wait_for(lambda: executor.records()[-1]["action_index"] == NO_CHUNK, 5.0, "the hold")
                adopted_while_down = executor.counters.chunks_adopted

                second.start()
                wait_for(lambda: executor.counters.chunks_adopted > adopted_while_down, STARTUP_S, "recovery")
                done.set()
                loop.join(5.0)
    finally:
        done.set()
        for process in (first, second):
            if process.is_alive():
                process.kill()
                process.join()
    records = executor.records()
    holding = np.flatnonzero(records["action_index"] == NO_CHUNK)
    assert holding.size > 0
    commands = np.array(robot.commands)
    # Holding re-sends the last command: the arm does not move while the server is gone.
    for tick in holding[holding > 0]:
        np.testing.assert_array_equal(commands[tick], commands[tick - 1])
