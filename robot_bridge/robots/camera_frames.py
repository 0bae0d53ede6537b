"""The ALOHA controller's image step before the wire: 480×640 camera frames to the 224×224 images the server takes.

The official client resizes each frame to 256×256 (PIL bicubic, the size of the training videos), then to 224×224
(PIL); the server's preprocessing continues from there.
"""

from __future__ import annotations

import numpy as np

from cosmos_edge.robot_bridge.controller.executor import Robot
from cosmos_edge.runtime.platforms import IMAGE_SIZE
from cosmos_edge.runtime.policy.api import Observation
from cosmos_edge.runtime.policy.images import resize_bicubic, resize_raw_aloha_frame


def aloha_wire_image(camera: str, frame: np.ndarray) -> np.ndarray:
    return resize_bicubic(resize_raw_aloha_frame(camera, frame), IMAGE_SIZE)


class AlohaWireCameras:
    """A `Robot` whose observations carry wire-ready 224×224 images; commands pass through."""

    def __init__(self, robot: Robot) -> None:
        self._robot = robot

    def observe(self) -> Observation:
        observation = self._robot.observe()
        images = {camera: aloha_wire_image(camera, frame) for camera, frame in observation.images.items()}
        return Observation(images=images, proprio=observation.proprio)

    def current_qpos(self) -> np.ndarray:
        return self._robot.current_qpos()

    def command(self, qpos_target: np.ndarray) -> None:
        self._robot.command(qpos_target)
