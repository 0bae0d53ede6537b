"""The controller's image step: the official client's two Pillow bicubic resizes, 480×640 → 256 → 224."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cosmos_edge.robot_bridge.robots.camera_frames import aloha_wire_image, aloha_wire_observation
from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.policy.api import Observation


def test_wire_image_is_the_official_two_step_resize() -> None:
    frame = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    first = Image.fromarray(frame).resize((256, 256), resample=Image.Resampling.BICUBIC)
    expected = np.asarray(first.resize((224, 224), resample=Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(aloha_wire_image("cam_high", frame), expected)


def test_a_frame_that_is_not_uint8_names_the_camera() -> None:
    with pytest.raises(InputError, match=r"cam_high.*uint8"):
        aloha_wire_image("cam_high", np.zeros((480, 640, 3), np.float32))


def test_an_empty_frame_is_refused_not_resized_to_black() -> None:
    with pytest.raises(InputError, match=r"cam_high.*H, W > 0, got \[0, 640, 3\]"):
        aloha_wire_image("cam_high", np.zeros((0, 640, 3), np.uint8))


def test_the_robot_side_sends_wire_sized_frames_as_they_are_and_resizes_the_others() -> None:
    rng = np.random.default_rng(5)
    wire = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    camera = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    sent = aloha_wire_observation(Observation(images={"a": wire, "b": camera}, proprio=np.zeros(14, np.float32)))
    np.testing.assert_array_equal(sent.images["a"], wire)  # not blurred by a 224 -> 256 -> 224 round trip
    np.testing.assert_array_equal(sent.images["b"], aloha_wire_image("b", camera))
