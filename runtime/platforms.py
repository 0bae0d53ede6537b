"""Platform specs: the latent slot layout, cameras, dims and image settings of each released checkpoint family.

Facts from the official experiment configs and eval scripts (LIBERO, RoboCasa, ALOHA).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cosmos_edge.runtime.errors import ConfigError

LATENT_CHANNELS = 16
LATENT_SIZE = 28  # 224 px / 8 (Wan2.1 spatial compression)
IMAGE_SIZE = 224
TEMPORAL_COMPRESSION = 4  # each slot after the first is 4 identical pixel frames


class SlotKind(str, Enum):
    BLANK = "blank"
    PROPRIO = "proprio"
    CAMERA = "camera"
    ACTION = "action"
    FUTURE_PROPRIO = "future_proprio"
    FUTURE_CAMERA = "future_camera"
    VALUE = "value"


@dataclass(frozen=True)
class Slot:
    kind: SlotKind
    camera: str | None = None


def _layout(cameras: tuple[str, ...]) -> tuple[Slot, ...]:
    return (
        Slot(SlotKind.BLANK),
        Slot(SlotKind.PROPRIO),
        *(Slot(SlotKind.CAMERA, name) for name in cameras),
        Slot(SlotKind.ACTION),
        Slot(SlotKind.FUTURE_PROPRIO),
        *(Slot(SlotKind.FUTURE_CAMERA, name) for name in cameras),
        Slot(SlotKind.VALUE),
    )


@dataclass(frozen=True)
class PlatformSpec:
    """Everything platform-specific that the runtime, exporter and bridge need.

    `cameras` are in slot order. `num_conditional_frames` counts the clean frames of a policy pass
    (blank, current proprio, current images).
    """

    name: str
    cameras: tuple[str, ...]
    chunk_size: int
    action_dim: int
    proprio_dim: int
    default_action_steps: int
    executed_steps: int
    control_rate_hz: float
    flip_images: bool
    jpeg_compression: bool
    center_crop: bool = True

    @property
    def slots(self) -> tuple[Slot, ...]:
        return _layout(self.cameras)

    @property
    def num_latent_frames(self) -> int:
        return len(self.slots)

    @property
    def num_pixel_frames(self) -> int:
        return 1 + TEMPORAL_COMPRESSION * (self.num_latent_frames - 1)

    @property
    def num_conditional_frames(self) -> int:
        return 2 + len(self.cameras)

    def slot_index(self, kind: SlotKind, camera: str | None = None) -> int:
        return self.slots.index(Slot(kind, camera))

    @property
    def proprio_slot(self) -> int:
        return self.slot_index(SlotKind.PROPRIO)

    @property
    def action_slot(self) -> int:
        return self.slot_index(SlotKind.ACTION)

    @property
    def future_proprio_slot(self) -> int:
        return self.slot_index(SlotKind.FUTURE_PROPRIO)

    @property
    def value_slot(self) -> int:
        return self.slot_index(SlotKind.VALUE)

    @property
    def camera_slots(self) -> dict[str, int]:
        return {name: self.slot_index(SlotKind.CAMERA, name) for name in self.cameras}

    @property
    def future_camera_slots(self) -> dict[str, int]:
        return {name: self.slot_index(SlotKind.FUTURE_CAMERA, name) for name in self.cameras}


PLATFORMS: dict[str, PlatformSpec] = {
    "libero": PlatformSpec(
        name="libero",
        cameras=("wrist", "primary"),
        chunk_size=16,
        action_dim=7,
        proprio_dim=9,
        default_action_steps=5,
        executed_steps=16,
        control_rate_hz=20.0,
        flip_images=True,
        jpeg_compression=True,
    ),
    "robocasa": PlatformSpec(
        name="robocasa",
        cameras=("wrist", "primary", "secondary"),
        chunk_size=32,
        action_dim=7,
        proprio_dim=9,
        default_action_steps=5,
        executed_steps=16,
        control_rate_hz=20.0,
        flip_images=True,
        jpeg_compression=True,
    ),
    "aloha": PlatformSpec(
        name="aloha",
        cameras=("cam_left_wrist", "cam_right_wrist", "cam_high"),
        chunk_size=50,
        action_dim=14,
        proprio_dim=14,
        default_action_steps=10,
        executed_steps=50,
        control_rate_hz=25.0,
        flip_images=False,
        jpeg_compression=False,
    ),
}


def platform_spec(name: str) -> PlatformSpec:
    try:
        return PLATFORMS[name]
    except KeyError:
        raise ConfigError(f"platform: unknown {name!r}; expected one of {sorted(PLATFORMS)}") from None
