"""`Robot` adapter for the gym-aloha MuJoCo simulation of ALOHA (the `sim` extra: gym-aloha, imageio).

What gym-aloha offers (gym-aloha 0.1.5): env ids "gym_aloha/AlohaInsertion-v0" and
"gym_aloha/AlohaTransferCube-v0"; with `obs_type="pixels_agent_pos"` an observation is
`{"pixels": {"top": (480, 640, 3) uint8}, "agent_pos": (14,)}`; `step` advances 0.02 s (50 Hz) and
the episode is truncated after `max_episode_steps` (300 by default, 6 s).

Camera mapping: gym-aloha exposes only the overhead `top` camera, which stands in for `cam_high`. The
MJCF scene also defines a `left_wrist` and a `right_wrist` camera on the arms; they are rendered
through the env's MuJoCo physics (`env.unwrapped._env.physics`, a private attribute of gym-aloha) for
`cam_left_wrist` and `cam_right_wrist`, only when an observation is requested. None of these images
look like the real rig's, so a policy trained on real ALOHA data is out of distribution here: the
simulation exercises the runtime, it does not evaluate the policy.

Conventions match the real robot (joints absolute rad, [left 6, left gripper, right 6, right gripper]),
except that the simulated gripper action is the normalised finger *position*, as in the observation.

Rendering needs an OpenGL backend chosen before MuJoCo is imported; on a headless machine set
`MUJOCO_GL=egl` in the CLI or test setup. On a CPU-only machine one `step` takes about 0.2 s (gym-aloha
renders three 480×640 cameras per step), far slower than real time: drive the executor with
`clock=robot.sim_time_ns` and a no-op sleep to run in lockstep with simulated time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from cosmos_edge.runtime.checks import check_integer, check_number
from cosmos_edge.runtime.errors import ConfigError, EngineError, InputError
from cosmos_edge.runtime.policy.api import Observation

SIM_TASKS: dict[str, str] = {
    "insertion": "gym_aloha/AlohaInsertion-v0",
    "transfer_cube": "gym_aloha/AlohaTransferCube-v0",
}
SIM_RATE_HZ = 50  # gym-aloha's control timestep is 0.02 s
SIM_DIMS = 14
IMAGE_HEIGHT, IMAGE_WIDTH = 480, 640  # the real rig's camera size
WRIST_CAMERAS: dict[str, str] = {"cam_left_wrist": "left_wrist", "cam_right_wrist": "right_wrist"}

RenderCamera = Callable[[str], np.ndarray]  # MJCF camera name -> (H, W, 3) uint8


class GymEnvLike(Protocol):
    def step(self, action: np.ndarray) -> tuple[Mapping[str, Any], float, bool, bool, Mapping[str, Any]]: ...

    def close(self) -> None: ...


class AlohaSimRobot:
    """Steps gym-aloha `steps_per_command` times per command (zero-order hold from 25 Hz to 50 Hz).

    Build it with `create`; all calls must come from one thread.
    """

    def __init__(
        self,
        env: GymEnvLike,
        first_observation: Mapping[str, Any],
        render_camera: RenderCamera,
        *,
        steps_per_command: int = 1,
    ) -> None:
        check_integer("aloha_sim.steps_per_command", steps_per_command, 1)
        self._env = env
        self._render = render_camera
        self._steps_per_command = steps_per_command
        self._qpos, self._top = self._unpack(first_observation)
        self._sim_steps = 0
        self.reward = 0.0
        self.success = False  # solved at any step so far: the simulation reports it on the solving step only

    @classmethod
    def create(
        cls,
        task: str = "insertion",
        *,
        seed: int = 0,
        control_rate_hz: float = 25.0,
        max_episode_steps: int = 300,
    ) -> AlohaSimRobot:
        """Make and reset the gym-aloha env for `task` ("insertion" or "transfer_cube")."""
        if task not in SIM_TASKS:
            raise ConfigError(f"aloha_sim.task: unknown {task!r}; expected one of {sorted(SIM_TASKS)}")
        check_number("aloha_sim.control_rate_hz", control_rate_hz, 0, SIM_RATE_HZ, above_low=True)
        steps = SIM_RATE_HZ / control_rate_hz
        if steps < 1 or steps != int(steps):
            raise ConfigError(f"aloha_sim.control_rate_hz: expected {SIM_RATE_HZ} Hz / integer, got {control_rate_hz}")
        check_integer("aloha_sim.seed", seed, 0, 2**32 - 1)  # numpy's seeds
        check_integer("aloha_sim.max_episode_steps", max_episode_steps, 1)
        gym = _import_gym_aloha()
        try:  # the first render makes MuJoCo's OpenGL context: where a renderer the machine lacks fails
            env = gym.make(SIM_TASKS[task], obs_type="pixels_agent_pos", max_episode_steps=max_episode_steps)
        except Exception as error:
            raise EngineError(_start_failure(error)) from error
        try:
            observation, _ = env.reset(seed=seed)
            physics = env.unwrapped._env.physics  # private: the only handle on the wrist cameras
        except Exception as error:
            env.close()
            raise EngineError(_start_failure(error)) from error

        def render_camera(name: str) -> np.ndarray:
            return physics.render(height=IMAGE_HEIGHT, width=IMAGE_WIDTH, camera_id=name)

        return cls(env, observation, render_camera, steps_per_command=int(steps))

    def overhead_frame(self) -> np.ndarray:
        """The latest `top` camera frame (cam_high), as rendered by the last step; renders nothing."""
        return self._top

    def sim_time_ns(self) -> int:
        """Simulated time since reset; use it as the executor clock for lockstep runs."""
        return self._sim_steps * 1_000_000_000 // SIM_RATE_HZ

    def observe(self) -> Observation:
        images = {"cam_high": self._top} | {cam: self._render(name) for cam, name in WRIST_CAMERAS.items()}
        return Observation(images=images, proprio=self._qpos.astype(np.float32))

    def current_qpos(self) -> np.ndarray:
        return self._qpos

    def command(self, qpos_target: np.ndarray) -> None:
        action = np.asarray(qpos_target, dtype=np.float32)
        for _ in range(self._steps_per_command):
            observation, reward, _, _, info = self._env.step(action)
            self._sim_steps += 1
            self.reward = float(reward)
            # Terminated (solved) or truncated (the time limit) episodes still step: the run keeps its length.
            self.success = self.success or bool(info.get("is_success", False))
        self._qpos, self._top = self._unpack(observation)

    def close(self) -> None:
        self._env.close()

    @staticmethod
    def _unpack(observation: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        qpos = np.array(observation["agent_pos"], dtype=np.float64)
        if qpos.shape != (SIM_DIMS,):
            raise InputError(f"aloha_sim: agent_pos expected shape ({SIM_DIMS},), got {qpos.shape}")
        return qpos, observation["pixels"]["top"]


def _start_failure(error: Exception) -> str:
    """Why the simulation could not start, with the settings that choose MuJoCo's OpenGL backend (its first render is
    where a renderer the machine lacks fails)."""
    settings = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in ("MUJOCO_GL", "PYOPENGL_PLATFORM"))
    return (
        f"aloha_sim: the simulation could not start with {settings} ({type(error).__name__}: {str(error)[:200]}); "
        "if MuJoCo cannot render on a machine without a display, set MUJOCO_GL=egl (EGL, as the NVIDIA driver and "
        "Mesa's libEGL provide) or osmesa (Mesa's libOSMesa, slower), and leave PYOPENGL_PLATFORM unset or the same"
    )


def _import_gym_aloha() -> Any:
    """Import gymnasium with the gym-aloha envs registered; optional so the serving path needs no MuJoCo."""
    try:
        import gym_aloha  # noqa: F401  (registers the env ids)
        import gymnasium
    except ImportError as e:
        raise EngineError(f"aloha_sim needs gym-aloha ({e}); pip install 'cosmos-edge[sim]'") from None
    return gymnasium
