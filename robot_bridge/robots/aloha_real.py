"""`Robot` adapter for the real ALOHA environment (`RealEnv`), without importing ROS or Interbotix.

The rig's own code builds the env (tonyzhaozh/aloha `aloha_scripts/real_env.py` `make_real_env`, or
Interbotix/aloha `aloha/real_env.py` for ALOHA 2) and passes it here. Only this part of it is used:

* `reset(fake=False)` moves the follower arms to the start pose and cycles the grippers (`fake=True`
  only reads the state) and returns a `dm_env.TimeStep`;
* `step(action)` sends a (14,) target, the arms non-blocking via `set_joint_positions`, the grippers as
  `JointSingleCommand`, and returns a `TimeStep` with a fresh observation;
* `TimeStep.observation["qpos"]` (14,) and `TimeStep.observation["images"][camera]` (480, 640, 3) uint8.

Conventions (RealEnv docstrings): joints are absolute rad, layout [left 6 joints, left gripper, right 6
joints, right gripper]. The gripper in `qpos` is the finger *position* normalised to [0, 1], while the
gripper in an action is the gripper *joint* normalised to [0, 1]; both are 0 closed, 1 open.

Timing: `command` blocks for as long as `step` does, which includes reading all cameras. Some
ACT-derived copies of `RealEnv.step` also sleep `DT` before reading the observation; at 50 Hz that
leaves no slack in the period, so check the rig's copy (ALOHA 2's `step` does not sleep).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy.api import Observation, check_camera_frame

ALOHA_CAMERAS: tuple[str, ...] = platform_spec("aloha").cameras
ALOHA_DIMS = 14


class TimeStepLike(Protocol):
    @property
    def observation(self) -> Mapping[str, Any]: ...


class RealEnvLike(Protocol):
    def reset(self, fake: bool = False) -> TimeStepLike: ...

    def step(self, action: np.ndarray) -> TimeStepLike: ...


class AlohaRealRobot:
    """Keeps the observation returned by the last `step`, so `observe` and `current_qpos` cost no I/O.

    Build it with `connect`; all calls must come from one thread (the executor's control thread).
    """

    def __init__(
        self, env: RealEnvLike, first_observation: Mapping[str, Any], cameras: Sequence[str] = ALOHA_CAMERAS
    ) -> None:
        self._env = env
        self._cameras = tuple(cameras)
        self._qpos, self._images = self._unpack(first_observation)

    @classmethod
    def connect(
        cls, env: RealEnvLike, *, cameras: Sequence[str] = ALOHA_CAMERAS, move_to_start: bool = True
    ) -> AlohaRealRobot:
        """Reset the env (moving the arms to the start pose unless `move_to_start` is False) and wrap it."""
        timestep = env.reset(fake=not move_to_start)
        return cls(env, timestep.observation, cameras)

    def observe(self) -> Observation:
        return Observation(images=self._images, proprio=self._qpos.astype(np.float32))

    def current_qpos(self) -> np.ndarray:
        return self._qpos

    def command(self, qpos_target: np.ndarray) -> None:
        timestep = self._env.step(np.asarray(qpos_target, dtype=np.float64))
        self._qpos, self._images = self._unpack(timestep.observation)

    def _unpack(self, observation: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        qpos = np.array(observation["qpos"], dtype=np.float64)
        if qpos.shape != (ALOHA_DIMS,):
            raise InputError(f"aloha_real: qpos expected shape ({ALOHA_DIMS},), got {qpos.shape}")
        images = observation["images"]
        if not isinstance(images, Mapping):
            got = type(images).__name__
            raise InputError(f"aloha_real: observation['images'] expected camera name -> frame, got {got}")
        missing = [cam for cam in self._cameras if cam not in images]
        if missing:
            raise InputError(f"aloha_real: cameras {missing} missing from the observation; it has {sorted(images)}")
        # No copy: the env hands out a new array per frame, and copying 3 × 921 kB per tick costs time. Checked here, on
        # the control thread: a camera gone bad ends the run as the rig's failure (the resize runs on the worker).
        return qpos, {cam: check_camera_frame(cam, images[cam]) for cam in self._cameras}
