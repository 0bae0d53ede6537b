"""The ALOHA controller's image step before the wire: 480×640 camera frames to the 224×224 images the server takes.

The official client resizes each frame to 256×256 (PIL bicubic, the size of the training videos), then to 224×224
(PIL); the server's preprocessing continues from there.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from cosmos_edge.runtime.platforms import IMAGE_SIZE
from cosmos_edge.runtime.policy.api import Observation, check_camera_frame

ALOHA_FRAME_SIZE = 256  # the client's first resize, which matches the training videos (256×256 MP4)


def aloha_wire_image(camera: str, frame: np.ndarray) -> np.ndarray:
    """uint8 H×W×3 camera frame → 224×224×3 (official `aloha_utils.resize_image_for_preprocessing`, then 224)."""
    image = Image.fromarray(np.ascontiguousarray(check_camera_frame(camera, frame)))
    for size in (ALOHA_FRAME_SIZE, IMAGE_SIZE):
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(image)


def aloha_wire_images(frames: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """Each camera frame as the official client sends it (`aloha_wire_image`; a 224×224 frame is taken as one such
    client resized already, and sent as it is), and the sizes it resized, for a log line ("" when none)."""
    wire = (IMAGE_SIZE, IMAGE_SIZE)
    checked = {camera: check_camera_frame(camera, frame) for camera, frame in frames.items()}
    resized = [camera for camera, frame in checked.items() if frame.shape[:2] != wire]
    images = {
        camera: aloha_wire_image(camera, frame) if camera in resized else frame for camera, frame in checked.items()
    }
    sizes = ", ".join(f"{camera} {checked[camera].shape[0]}x{checked[camera].shape[1]}" for camera in resized)
    return images, sizes


def aloha_wire_observation(observation: Observation) -> Observation:
    """An observation with its camera frames as the official client sends them (`aloha_wire_images`): a chunk
    source's `prepare`, so that the resizes (milliseconds per camera) run on its worker, not on the control loop."""
    return Observation(images=aloha_wire_images(observation.images)[0], proprio=observation.proprio)
