import os
import subprocess
import sys
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from cosmos_edge.robot_bridge.controller.chunk_source import ActParams, ThreadedChunkSource
from cosmos_edge.robot_bridge.controller.executor import ChunkExecutor, ExecutorConfig
from cosmos_edge.robot_bridge.controller.safety import SafetyConfig, SafetyFilter
from cosmos_edge.robot_bridge.robots.aloha_sim import AlohaSimRobot
from cosmos_edge.runtime.errors import ConfigError, EngineError
from cosmos_edge.runtime.platforms import platform_spec

START = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2)
CAMERAS = set(platform_spec("aloha").cameras)


def sim_obs(qpos: np.ndarray, shade: int = 0) -> dict[str, Any]:
    return {"pixels": {"top": np.full((480, 640, 3), shade, np.uint8)}, "agent_pos": qpos.copy()}


class FakeGymEnv:
    def __init__(self, steps_to_truncate: int = 100, solved_at: int = 0) -> None:
        self.actions: list[np.ndarray] = []
        self.steps_to_truncate = steps_to_truncate
        self.solved_at = solved_at  # the step that solves the task (gym-aloha says so on that step only)
        self.closed = False

    def step(self, action: np.ndarray) -> tuple[Mapping[str, Any], float, bool, bool, Mapping[str, Any]]:
        self.actions.append(action)
        n = len(self.actions)
        info = {"is_success": n == self.solved_at}
        return (
            sim_obs(action.astype(np.float64), shade=n),
            float(n),
            n == self.solved_at,
            n >= self.steps_to_truncate,
            info,
        )

    def close(self) -> None:
        self.closed = True


def test_adapter_maps_cameras_and_holds_commands_per_sim_step() -> None:
    env = FakeGymEnv(steps_to_truncate=4, solved_at=3)
    rendered: list[str] = []

    def render(name: str) -> np.ndarray:
        rendered.append(name)
        return np.zeros((480, 640, 3), np.uint8)

    robot = AlohaSimRobot(env, sim_obs(START), render, steps_per_command=2)
    obs = robot.observe()
    assert set(obs.images) == CAMERAS
    assert rendered == ["left_wrist", "right_wrist"]
    assert obs.proprio.dtype == np.float32 and obs.proprio.shape == (14,)

    target = START + 0.01
    robot.command(target)
    assert len(env.actions) == 2 and all(a.dtype == np.float32 for a in env.actions)
    np.testing.assert_allclose(robot.current_qpos(), target, atol=1e-6)
    assert robot.observe().images["cam_high"][0, 0, 0] == 2  # the top image of the last sim step
    assert robot.sim_time_ns() == 40_000_000
    assert (robot.reward, robot.success) == (2.0, False)
    robot.command(target)  # solved on its first step, stepped on after
    assert (robot.reward, robot.success) == (4.0, True)
    robot.close()
    assert env.closed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "stack"}, "aloha_sim.task"),
        ({"control_rate_hz": 30.0}, "control_rate_hz"),
        ({"control_rate_hz": 0.0}, "aloha_sim.control_rate_hz"),
        ({"control_rate_hz": float("nan")}, "aloha_sim.control_rate_hz"),
        ({"control_rate_hz": "25"}, "aloha_sim.control_rate_hz"),
        ({"control_rate_hz": True}, "aloha_sim.control_rate_hz"),
    ],
)
def test_create_rejects_bad_arguments_before_importing(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AlohaSimRobot.create(**kwargs)


def test_missing_gym_aloha_names_the_sim_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gym_aloha", None)
    with pytest.raises(EngineError, match=r"cosmos-edge\[sim\]"):
        AlohaSimRobot.create()


class HoldClient:
    """Answers every request with a chunk that holds the observed pose."""

    def act(self, observation: Any, instruction: str, *, obs_id: int, capture_time_ns: int, **_: Any) -> Any:
        actions = np.tile(observation.proprio, (10, 1))
        return SimpleNamespace(obs_id=obs_id, actions=actions, value=0.0, timings_ms={})


def test_gym_aloha_smoke_lockstep() -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the first mujoco import
    pytest.importorskip("gym_aloha", reason="gym-aloha not installed (pip install 'cosmos-edge[sim]')")

    robot = AlohaSimRobot.create("insertion", seed=0, control_rate_hz=50.0)
    try:
        obs = robot.observe()
        assert set(obs.images) == CAMERAS
        for image in obs.images.values():
            assert image.shape == (480, 640, 3) and image.dtype == np.uint8
        assert image.std() > 0  # a wrist camera rendered something
        np.testing.assert_allclose(obs.proprio[:6], START[:6], atol=0.05)

        config = ExecutorConfig(control_rate_hz=50.0, prefetch_threshold=5)
        with ThreadedChunkSource(HoldClient(), ActParams("insert the peg")) as source:
            executor = ChunkExecutor(
                robot, source, SafetyFilter(SafetyConfig()), config, clock=robot.sim_time_ns, sleep=lambda _: None
            )
            summary = executor.run(5)
        assert summary.ticks == 5 and summary.missed_ticks == 0 and summary.jitter_max_ms == 0.0
        assert robot.sim_time_ns() == 5 * 20_000_000
        np.testing.assert_allclose(robot.current_qpos()[:6], START[:6], atol=0.05)
    finally:
        robot.close()


def test_a_renderer_the_machine_lacks_is_one_error_naming_the_settings() -> None:
    # MUJOCO_GL is read when MuJoCo's renderer is first imported: a process of its own.
    pytest.importorskip("gym_aloha")
    code = (
        "from cosmos_edge.robot_bridge.robots.aloha_sim import AlohaSimRobot\n"
        "from cosmos_edge.runtime.errors import EngineError\n"
        "try:\n    AlohaSimRobot.create('insertion')\n"
        "except EngineError as error:\n    print(error)\n"
    )
    env = {**os.environ, "MUJOCO_GL": "bogus"}
    printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert printed.startswith("aloha_sim: the simulation could not start with MUJOCO_GL=bogus"), printed
    assert "set MUJOCO_GL=egl" in printed
