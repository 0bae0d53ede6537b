"""Chunk boundaries under each blending scheme, on scripted chunks with a simulated clock (deterministic).

    .venv/bin/python -m benchmarks.blending benchmarks/results/cpu_blending.json

Two chunk streams on the 14-joint ALOHA layout at 25 Hz, 50-action chunks, prefetch at 25, 10 ticks of latency:
`offset` (every chunk is the same smooth trajectory shifted by ±0.2 rad on every arm joint, alternating, as a policy
that re-plans from a new observation) and `noisy` (the trajectory plus N(0, 0.02 rad) per action). Reported per
scheme: the largest per-tick change of the commanded pose at a boundary (median and max), the same for a hard switch,
the largest per-tick change anywhere else (the trajectory's own motion), and the ticks the default safety filter
(0.15 rad per tick) limited.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import run_context
from cosmos_edge.robot_bridge.controller.blending import BlendConfig, BlendScheme, summarize_boundaries
from cosmos_edge.robot_bridge.controller.chunk_source import Chunk, ChunkRequest, Outcome
from cosmos_edge.robot_bridge.controller.executor import ChunkExecutor, ExecutorConfig
from cosmos_edge.robot_bridge.controller.safety import SafetyConfig, SafetyFilter
from cosmos_edge.runtime.policy.api import Observation

RATE_HZ, CHUNK, LATENCY_TICKS, TICKS = 25.0, 50, 10, 1000
PERIOD_NS = round(1e9 / RATE_HZ)
HOME = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2)
ARM = np.array([True] * 6 + [False] + [True] * 6 + [False])


class SimClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += round(seconds * 1e9)


class Follower:
    """A robot that reaches each commanded pose by the next tick."""

    def __init__(self) -> None:
        self.qpos = HOME.copy()
        self.commands: list[np.ndarray] = []

    def observe(self) -> Observation:
        return Observation(images={}, proprio=self.qpos.astype(np.float32))

    def current_qpos(self) -> np.ndarray:
        return self.qpos.copy()

    def command(self, qpos_target: np.ndarray) -> None:
        self.commands.append(qpos_target.copy())
        self.qpos = qpos_target.copy()


class ScriptedSource:
    """Answers each request `LATENCY_TICKS` later with the scripted chunk for its first tick."""

    def __init__(self, clock: SimClock, stream: str) -> None:
        self._clock, self._stream = clock, stream
        self._pending: tuple[int, Chunk] | None = None
        self._count = 0
        self._rng = np.random.default_rng(0)

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def submit(self, request: ChunkRequest) -> None:
        ticks = request.first_tick + np.arange(CHUNK)
        trajectory = HOME + 0.15 * np.sin(ticks / 20.0)[:, None] * ARM  # up to 7.5 mrad per tick, inside the limits
        if self._stream == "offset":
            trajectory = trajectory + (0.2 if self._count % 2 else -0.2) * ARM
        else:
            trajectory = trajectory + self._rng.normal(0.0, 0.02, trajectory.shape) * ARM
        self._count += 1
        due = request.capture_ns + LATENCY_TICKS * PERIOD_NS
        chunk = Chunk(request.obs_id, request.first_tick, trajectory.astype(np.float32), 0.5, {}, request.capture_ns)
        self._pending = (due, chunk)

    def poll(self) -> Outcome | None:
        if self._pending is None or self._clock() < self._pending[0]:
            return None
        outcome, self._pending = self._pending[1], None
        return outcome


def measure(stream: str, blend: BlendConfig) -> dict[str, float]:
    clock, robot = SimClock(), Follower()
    safety = SafetyFilter(SafetyConfig())
    config = ExecutorConfig(control_rate_hz=RATE_HZ, prefetch_threshold=25, blend=blend)
    executor = ChunkExecutor(robot, ScriptedSource(clock, stream), safety, config, clock=clock, sleep=clock.sleep)
    executor.run(TICKS)
    records, commands = executor.records(), np.array(robot.commands)
    arms = np.setdiff1d(np.arange(commands.shape[1]), safety.config.gripper_indices)  # the joints, in rad
    steps = np.abs(np.diff(commands[:, arms], axis=0)).max(axis=1)
    switches = np.flatnonzero(records["adopted"])  # the first one included: it starts from the rest pose
    near = np.zeros(len(steps), bool)
    for tick in switches:
        near[max(tick - 1, 0) : tick + blend.window_ticks] = True  # the switch and the window after it
    summary = summarize_boundaries(executor.boundaries())
    return {
        "boundaries": summary.boundaries,
        "hard_switch_jump_p50_rad": summary.raw_jump_p50,
        "hard_switch_jump_max_rad": summary.raw_jump_max,
        "commanded_jump_p50_rad": summary.commanded_jump_p50,
        "commanded_jump_max_rad": summary.commanded_jump_max,
        "gripper_hard_switch_jump_max": summary.gripper_raw_jump_max,
        "gripper_commanded_jump_max": summary.gripper_commanded_jump_max,
        "step_max_elsewhere_rad": float(steps[~near].max()),
        "safety_limited_ticks": summary.safety_ticks,
        "starved_ticks": executor.counters.starved_ticks,
    }


SCHEMES = {
    "hard switch": BlendConfig(BlendScheme.NONE),
    "crossfade 4": BlendConfig(BlendScheme.CROSSFADE, window_ticks=4),
    "crossfade 8 (default)": BlendConfig(),
    "crossfade 16": BlendConfig(BlendScheme.CROSSFADE, window_ticks=16),
    "ensemble m=0.5": BlendConfig(BlendScheme.ENSEMBLE, ensemble_decay=0.5),
    "ensemble m=0": BlendConfig(BlendScheme.ENSEMBLE, ensemble_decay=0.0),
}


def main(out: Path) -> None:
    logging.disable(logging.WARNING)  # the safety filter logs every intervention of the hard switch
    results = {
        stream: {name: measure(stream, blend) for name, blend in SCHEMES.items()} for stream in ("offset", "noisy")
    }
    report: dict[str, Any] = {
        "machine": "any (simulated clock, deterministic)",
        "command": f"python -m benchmarks.blending {out}",
        "commit": run_context.commit(),
    }
    report |= {"settings": {"rate_hz": RATE_HZ, "chunk": CHUNK, "latency_ticks": LATENCY_TICKS, "ticks": TICKS}}
    report["results"] = results
    out.write_text(json.dumps(report, indent=2))
    for stream, rows in results.items():
        print(f"{stream}: scheme | commanded jump p50 / max | hard switch max | elsewhere max | safety ticks (rad)")
        for name, row in rows.items():
            print(
                f"  {name:22s} {row['commanded_jump_p50_rad']:.3f} / {row['commanded_jump_max_rad']:.3f} | "
                f"{row['hard_switch_jump_max_rad']:.3f} | {row['step_max_elsewhere_rad']:.3f} | "
                f"{row['safety_limited_ticks']}"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
