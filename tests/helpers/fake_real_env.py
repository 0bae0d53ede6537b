"""A stand-in for the rig's `RealEnv` (what `cosmos-edge robot --env tests.helpers.fake_real_env:make_env` builds):
it records every command and answers 480x640 camera frames. With `signal_after=N` it sends this process SIGINT on
its N-th step, as an operator's Ctrl-C while the arms move; with `fail_after=N` its N-th step raises, as a camera
that comes loose; `terminate_at_reset` sends SIGTERM while the arms move to the start pose; with `hang_after=N` its
N-th step sends SIGINT and never returns (a driver stuck), and a second SIGINT follows from another thread; with
`nan_after=N` its joint readings are NaN from its N-th step on (a sensor that died); with `glitch_at=N` its N-th
step reads the left waist 1 rad off (an encoder glitch); `nan_at_reset` reads NaN joints and `no_images_at_reset` no
camera frames from the start."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosmos_edge.runtime.platforms import platform_spec

MADE: list[FakeRealEnv] = []  # every env made, for the test to inspect


@dataclass
class FakeTimeStep:
    observation: dict[str, Any]


@dataclass
class FakeRealEnv:
    kwargs: dict[str, object]
    resets: list[bool] = field(default_factory=list)  # the `fake` argument of each reset
    commands: list[np.ndarray] = field(default_factory=list)
    niceness: list[int] = field(default_factory=list)  # of the thread sending each command

    def reset(self, fake: bool = False) -> FakeTimeStep:
        self.resets.append(fake)
        if self.kwargs.get("terminate_at_reset"):
            os.kill(os.getpid(), signal.SIGTERM)
        if self.kwargs.get("nan_at_reset"):
            return self._timestep(np.full(14, np.nan))
        if self.kwargs.get("no_images_at_reset"):
            return FakeTimeStep({"qpos": np.zeros(14), "images": None})
        return self._timestep(np.zeros(14))

    def step(self, action: np.ndarray) -> FakeTimeStep:
        self.commands.append(np.array(action))
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, 0))  # Linux: the calling thread's
        if len(self.commands) == self.kwargs.get("signal_after"):
            os.kill(os.getpid(), signal.SIGINT)
        if len(self.commands) == self.kwargs.get("fail_after"):
            raise OSError("USB camera disconnected")
        if len(self.commands) == self.kwargs.get("hang_after"):
            os.kill(os.getpid(), signal.SIGINT)
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
            while True:  # only an exception raised by a signal handler gets out of here
                time.sleep(0.01)
        nan_after = self.kwargs.get("nan_after")
        if isinstance(nan_after, int) and len(self.commands) >= nan_after:
            return self._timestep(np.full(14, np.nan))
        qpos = np.array(action, dtype=np.float64)  # the arms reach every target
        if len(self.commands) == self.kwargs.get("glitch_at"):
            qpos[0] += 1.0
        return self._timestep(qpos)

    @staticmethod
    def _timestep(qpos: np.ndarray) -> FakeTimeStep:
        frames = {camera: np.full((480, 640, 3), 128, np.uint8) for camera in platform_spec("aloha").cameras}
        return FakeTimeStep({"qpos": qpos, "images": frames})


def make_env(**kwargs: object) -> FakeRealEnv:
    if "fail" in kwargs:
        raise RuntimeError(str(kwargs["fail"]))  # as a rig whose ROS master is not running
    env = FakeRealEnv(kwargs)
    MADE.append(env)
    return env


def make_env_strict(*, init_node: bool = False) -> FakeRealEnv:
    """A rig factory with a fixed signature, as a real one has: an unknown keyword is a TypeError."""
    return make_env(init_node=init_node)
