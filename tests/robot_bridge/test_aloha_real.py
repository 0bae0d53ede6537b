from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from cosmos_edge.robot_bridge.robots.aloha_real import ALOHA_CAMERAS, AlohaRealRobot
from cosmos_edge.runtime.errors import InputError

START = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2)
ALL_CAMERAS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")


@dataclass(frozen=True)
class TimeStep:
    observation: Mapping[str, Any]


def real_obs(qpos: np.ndarray, cameras: tuple[str, ...] = ALL_CAMERAS) -> dict[str, Any]:
    return {
        "qpos": qpos.copy(),
        "qvel": np.zeros(14),
        "images": {cam: np.zeros((480, 640, 3), np.uint8) for cam in cameras},
    }


class FakeRealEnv:
    """The part of ALOHA's RealEnv the adapter uses; the arm tracks each target perfectly."""

    def __init__(self, cameras: tuple[str, ...] = ALL_CAMERAS) -> None:
        self.cameras = cameras
        self.resets: list[bool] = []
        self.actions: list[np.ndarray] = []

    def reset(self, fake: bool = False) -> TimeStep:
        self.resets.append(fake)
        return TimeStep(real_obs(START, self.cameras))

    def step(self, action: np.ndarray) -> TimeStep:
        self.actions.append(action)
        return TimeStep(real_obs(action, self.cameras))


@pytest.mark.parametrize("move_to_start", [True, False])
def test_connect_resets_the_env(move_to_start: bool) -> None:
    env = FakeRealEnv()
    AlohaRealRobot.connect(env, move_to_start=move_to_start)
    assert env.resets == [not move_to_start]


def test_observe_and_command_follow_the_last_step() -> None:
    env = FakeRealEnv()
    robot = AlohaRealRobot.connect(env)
    obs = robot.observe()
    assert tuple(obs.images) == ALOHA_CAMERAS  # cam_low is not used by Cosmos Policy
    assert obs.proprio.dtype == np.float32
    np.testing.assert_array_equal(robot.current_qpos(), START)

    target = START + 0.02
    robot.command(target)
    assert len(env.actions) == 1 and env.actions[0].dtype == np.float64
    np.testing.assert_array_equal(robot.current_qpos(), target)
    np.testing.assert_allclose(robot.observe().proprio, target, rtol=1e-6)


def test_missing_camera_and_bad_qpos_are_reported() -> None:
    with pytest.raises(InputError, match=r"cameras \['cam_left_wrist'\] missing"):
        AlohaRealRobot.connect(FakeRealEnv(cameras=("cam_high", "cam_right_wrist")))
    env = FakeRealEnv()
    robot = AlohaRealRobot.connect(env)
    env.step = lambda action: TimeStep(real_obs(np.zeros(16)))  # type: ignore[method-assign]
    with pytest.raises(InputError, match=r"qpos expected shape \(14,\)"):
        robot.command(START)


def test_a_camera_frame_gone_bad_is_reported_on_the_control_thread() -> None:
    env = FakeRealEnv()
    robot = AlohaRealRobot.connect(env)

    def grey_wrist(action: np.ndarray) -> TimeStep:
        observation = real_obs(action)
        observation["images"]["cam_left_wrist"] = np.zeros((480, 640), np.uint8)  # a camera that lost its colour
        return TimeStep(observation)

    env.step = grey_wrist  # type: ignore[method-assign]
    with pytest.raises(InputError, match=r"images\['cam_left_wrist'\]: expected shape \[H, W, 3\]"):
        robot.command(START)
