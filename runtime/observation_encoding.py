"""From a preprocessed observation to the official latent sequence: pixel video, proprio injection, readouts.

Torch-free: used by every backend. Official source: `cosmos_utils.get_action` (pixel sequence) and
`policy_text2world_model.replace_latent_with_proprio` (injection).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cosmos_edge.runtime import latent_codec
from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.normalization import DatasetStats
from cosmos_edge.runtime.numerics import round_to_bf16
from cosmos_edge.runtime.platforms import IMAGE_SIZE, TEMPORAL_COMPRESSION, PlatformSpec, SlotKind

BLACK = np.float32(-1.0)  # a black uint8 frame in the model range (x / 127.5 - 1, exact in bf16)


def build_pixel_video(
    platform: PlatformSpec, images: Mapping[str, np.ndarray], num_latent_frames: int | None = None
) -> np.ndarray:
    """The official input clip "1 3 (1+4k) 224 224" for the first `num_latent_frames` slots (default: all).

    Frame 0 is black; every later slot is 4 copies of one frame: the camera image for current and future camera
    slots (future slots start as the current image), black for proprio, action, future proprio and value.
    `images` are the model-range "3 224 224" arrays of `images.preprocess_observation_images`.
    """
    frames = platform.num_latent_frames if num_latent_frames is None else num_latent_frames
    if not 1 <= frames <= platform.num_latent_frames:
        raise InputError(f"num_latent_frames: expected 1 to {platform.num_latent_frames}, got {frames}")
    video = np.full((1, 3, 1 + TEMPORAL_COMPRESSION * (frames - 1), IMAGE_SIZE, IMAGE_SIZE), BLACK, np.float32)
    for index, slot in enumerate(platform.slots[1:frames], start=1):
        if slot.kind in (SlotKind.CAMERA, SlotKind.FUTURE_CAMERA):
            first = 1 + TEMPORAL_COMPRESSION * (index - 1)
            video[0, :, first : first + TEMPORAL_COMPRESSION] = images[str(slot.camera)][:, None]
    return video


def inject_proprio(
    platform: PlatformSpec, placeholder_latent: np.ndarray, normalized_proprio: np.ndarray
) -> np.ndarray:
    """The clean conditioning latent: bf16-valued VAE latents (the official `gt_frames` dtype) with the
    normalised, bf16-rounded proprio tiled over the proprio slot."""
    clean = round_to_bf16(placeholder_latent)
    latent_codec.write_proprio(clean, platform.proprio_slot, normalized_proprio.reshape(1, -1))
    return clean


def pad_latent_frames(platform: PlatformSpec, latent: np.ndarray) -> np.ndarray:
    """Extends a prefix latent "b c t h w" to all slots with zeros.

    Slots past the conditioning prefix are generated, so their clean values never reach the network.
    """
    batch, channels, frames, height, width = latent.shape
    if frames == platform.num_latent_frames:
        return latent
    padded = np.zeros((batch, channels, platform.num_latent_frames, height, width), np.float32)
    padded[:, :, :frames] = latent
    return padded


def read_actions(platform: PlatformSpec, stats: DatasetStats, latent: np.ndarray) -> np.ndarray:
    """Un-normalised action chunks "b chunk action_dim" float32 from the action slot."""
    shape = (platform.chunk_size, platform.action_dim)
    normalized = latent_codec.read_vector(latent, platform.action_slot, shape)
    return stats.unnormalize_actions(normalized).astype(np.float32)


def read_future_proprio(platform: PlatformSpec, stats: DatasetStats, latent: np.ndarray) -> np.ndarray:
    """Un-normalised predicted proprio "b proprio_dim" float32 from the future-proprio slot."""
    normalized = latent_codec.read_vector(latent, platform.future_proprio_slot, (platform.proprio_dim,))
    return stats.unnormalize_proprio(normalized).astype(np.float32)


def future_image_frames(platform: PlatformSpec, video: np.ndarray) -> dict[str, np.ndarray]:
    """Picks each future camera's frame from a decoded clip "1 3 f h w" → uint8 "h w 3" per camera.

    The official code reads pixel frame (k - 1)·4 + 1 for latent slot k and maps ((x + 1)·127.5).clamp(0, 255).
    """
    result = {}
    for camera, slot in platform.future_camera_slots.items():
        frame = video[0, :, (slot - 1) * TEMPORAL_COMPRESSION + 1]
        pixels = np.clip((frame.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0).astype(np.uint8)
        result[camera] = np.ascontiguousarray(pixels.transpose(1, 2, 0))
    return result
