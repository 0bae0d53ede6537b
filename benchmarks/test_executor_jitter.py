"""Executor tick jitter at 50 Hz while CPU-heavy fake inference runs in a worker thread and in another process.

Run: `.venv/bin/python -m pytest benchmarks/test_executor_jitter.py --benchmark-enable --benchmark-json=jitter.json`;
each case's percentiles land in its `extra_info`. Target: p99 tick-start jitter < 2 ms with no missed tick; a case
that misses it warns instead of failing, since the numbers depend on the machine and on what else runs on it.

Loads: `idle` (inference only sleeps), `matmul_thread` (the worker thread burns numpy matmuls, all BLAS threads),
`matmul_thread_and_process` (plus a separate interpreter burning matmuls). Timing: `sleep` (plain `time.sleep`),
`spin` (`precise_sleep`, the executor default), `spin_nice` (plus nice -10 on the control thread).
"""

import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from benchmarks import run_context
from cosmos_edge.robot_bridge.controller.chunk_source import ActParams, ThreadedChunkSource
from cosmos_edge.robot_bridge.controller.executor import ChunkExecutor, ExecutorConfig
from cosmos_edge.robot_bridge.controller.safety import SafetyConfig, SafetyFilter
from cosmos_edge.robot_bridge.controller.ticks import TickSummary, precise_sleep
from cosmos_edge.runtime.policy.api import Observation

RATE_HZ = 50.0
DURATION_S = 3.0
INFERENCE_S = 0.15  # CPU time each fake inference burns
TARGET_P99_MS = 2.0
START = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2)
# A separate interpreter burning numpy matmuls, like an inference process sharing the controller's cores.
BURN_PROCESS = "import numpy as n\na = n.random.rand(384, 384)\nwhile True:\n    a = (a @ a) / 384.0\n"


class Robot:
    def __init__(self) -> None:
        self.qpos = START.copy()
        self.images = {"cam_high": np.zeros((224, 224, 3), np.uint8)}

    def observe(self) -> Observation:
        return Observation(images=self.images, proprio=self.qpos.astype(np.float32))

    def current_qpos(self) -> np.ndarray:
        return self.qpos

    def command(self, qpos_target: np.ndarray) -> None:
        self.qpos = qpos_target


@dataclass(frozen=True)
class Reply:
    obs_id: int
    actions: np.ndarray
    value: float = 0.5
    timings_ms: dict[str, float] = field(default_factory=dict)


class MatmulClient:
    """Burns `INFERENCE_S` of numpy matmuls per request (BLAS releases the GIL, the loop around it does not)."""

    def __init__(self) -> None:
        self._a = np.random.default_rng(0).random((256, 256))

    def act(self, observation: Observation, instruction: str, *, obs_id: int, **_: Any) -> Reply:
        end = time.perf_counter() + INFERENCE_S
        a = self._a
        while time.perf_counter() < end:
            a = (a @ self._a) / 256.0
        return Reply(obs_id, np.tile(observation.proprio, (25, 1)))


class IdleClient:
    def act(self, observation: Observation, instruction: str, *, obs_id: int, **_: Any) -> Reply:
        time.sleep(INFERENCE_S)
        return Reply(obs_id, np.tile(observation.proprio, (25, 1)))


def run_once(client: MatmulClient | IdleClient, timing: str) -> tuple[np.ndarray, TickSummary]:
    # Threshold 20 of 25 actions: inference runs back to back for the whole measurement.
    nice = -10 if timing == "spin_nice" else None
    config = ExecutorConfig(control_rate_hz=RATE_HZ, prefetch_threshold=20, nice=nice)
    sleep = time.sleep if timing == "sleep" else precise_sleep
    with ThreadedChunkSource(client, ActParams("bench")) as source:
        executor = ChunkExecutor(Robot(), source, SafetyFilter(SafetyConfig()), config, sleep=sleep)
        summary = executor.run(duration_s=DURATION_S)
    return executor.records(), summary


def can_lower_nice() -> bool:
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, before - 1)
        os.setpriority(os.PRIO_PROCESS, 0, before)
        return True
    except (AttributeError, OSError):
        return False


@pytest.mark.parametrize("timing", ["sleep", "spin", "spin_nice"])
@pytest.mark.parametrize("load", ["idle", "matmul_thread", "matmul_thread_and_process"])
def test_executor_jitter_50hz(benchmark: Any, load: str, timing: str) -> None:
    if timing == "spin_nice" and not can_lower_nice():
        pytest.skip("lowering the niceness needs CAP_SYS_NICE")
    burner = subprocess.Popen([sys.executable, "-c", BURN_PROCESS]) if load.endswith("process") else None
    try:
        time.sleep(0.3 if burner else 0.0)  # let the burner reach steady state
        client = IdleClient() if load == "idle" else MatmulClient()
        records, summary = benchmark.pedantic(run_once, args=(client, timing), rounds=1, iterations=1)
    finally:
        if burner is not None:
            burner.terminate()
            burner.wait(5)

    command_ms = (records["command_ns"] - records["deadline_ns"]) / 1e6
    benchmark.extra_info.update(
        load=load,
        timing=timing,
        rate_hz=RATE_HZ,
        duration_s=DURATION_S,
        ticks=summary.ticks,
        missed_ticks=summary.missed_ticks,
        jitter_p50_ms=round(summary.jitter_p50_ms, 3),
        jitter_p99_ms=round(summary.jitter_p99_ms, 3),
        jitter_max_ms=round(summary.jitter_max_ms, 3),
        command_p99_ms=round(float(np.percentile(command_ms, 99)), 3),
        machine=run_context.machine(),
        python=platform.python_version(),
    )
    if summary.missed_ticks or summary.jitter_p99_ms >= TARGET_P99_MS:
        warnings.warn(f"jitter target missed: {benchmark.extra_info}", stacklevel=1)
