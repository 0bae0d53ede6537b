"""Every read and write of a latent slot: the official "latent injection" codec, the pixel video, the readouts.

A slot is one latent frame, [16, 28, 28] = 12544 values. Official code: CP `models/policy_text2world_model.py`
`replace_latent_with_action_chunk` / `replace_latent_with_proprio` (write), CP `experiments/robot/cosmos_utils.py`
`extract_action_chunk_from_latent_sequence` / `extract_value_from_latent_sequence` and `get_action` (read).

* Write: flatten the vector row-major (an action chunk [K, d] becomes a0[0..d-1], a1[...], ...), repeat it end to
  end, truncate to 12544 values and reshape C-major to [16, 28, 28]. The slot is fully overwritten.
* Read: flatten the slot, keep the floor(12544 / n) full copies, average them; the partial tail is ignored
  (ALOHA 50×14 = 700 → 17 copies, 644 values ignored).
* Value: a scalar broadcast over the slot; read as the slot mean, mapped from [-1, 1] to [0, 1] and clipped.
* Proprio is a bfloat16 tensor in the official batch (`torch.from_numpy(proprio).to(torch.bfloat16)`), so it is
  rounded to bfloat16 before it is written.

The codec functions take latents [B, 16, T, 28, 28] (float32) and a slot index; writes happen in place.

Around them, from a preprocessed observation to the official latent sequence and back: the pixel video
(`cosmos_utils.get_action`), proprio injection (`policy_text2world_model.replace_latent_with_proprio`), chunk,
future-proprio and future-image readouts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.platforms import (
    IMAGE_SIZE,
    LATENT_CHANNELS,
    LATENT_SIZE,
    TEMPORAL_COMPRESSION,
    PlatformSpec,
    SlotKind,
)
from cosmos_edge.runtime.policy.conditioning import future_to_current_slots
from cosmos_edge.runtime.policy.normalization import DatasetStats
from cosmos_edge.runtime.policy.numerics import round_to_bf16

SLOT_SHAPE = (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
SLOT_ELEMENTS = LATENT_CHANNELS * LATENT_SIZE * LATENT_SIZE  # 12544


def write_vector(latents: np.ndarray, slot: int, vectors: np.ndarray) -> None:
    """Tiles each batch item's vector [B, *shape] (flattened row-major) over `latents[:, :, slot]`."""
    _check_latents(latents, slot)
    batch = latents.shape[0]
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim < 2 or vectors.shape[0] != batch or not 0 < math.prod(vectors.shape[1:]) <= SLOT_ELEMENTS:
        raise InputError(
            f"vectors: expected [B={batch}, ...] with 1 to {SLOT_ELEMENTS} values per item, got {list(vectors.shape)}"
        )
    flat = vectors.reshape(batch, -1)
    copies = -(-SLOT_ELEMENTS // flat.shape[1])  # ceiling division
    latents[:, :, slot] = np.tile(flat, (1, copies))[:, :SLOT_ELEMENTS].reshape(batch, *SLOT_SHAPE)


def write_proprio(latents: np.ndarray, slot: int, proprio: np.ndarray) -> None:
    """Writes normalised proprio [B, proprio_dim] after rounding it to bfloat16, as the official batch does."""
    write_vector(latents, slot, round_to_bf16(np.asarray(proprio, dtype=np.float32)))


def read_vector(latents: np.ndarray, slot: int, shape: tuple[int, ...]) -> np.ndarray:
    """Averages the full copies of a vector of `shape` tiled in the slot → float32 [B, *shape].

    Used for action chunks (shape (chunk, action_dim)) and future proprio (shape (proprio_dim,)).
    """
    _check_latents(latents, slot)
    size = math.prod(shape)
    if not 0 < size <= SLOT_ELEMENTS:
        raise InputError(f"shape: expected 1 to {SLOT_ELEMENTS} values, got {shape} ({size} values)")
    batch = latents.shape[0]
    copies = SLOT_ELEMENTS // size
    flat = latents[:, :, slot].reshape(batch, SLOT_ELEMENTS)[:, : copies * size]
    # float64 accumulation keeps the mean independent of summation order (torch and numpy sum differently).
    mean = flat.reshape(batch, copies, size).mean(axis=1, dtype=np.float64)
    return mean.astype(np.float32).reshape(batch, *shape)


def read_value(latents: np.ndarray, slot: int) -> np.ndarray:
    """Slot mean per batch item, mapped [-1, 1] → [0, 1] and clipped → float32 [B] (official `get_action`)."""
    _check_latents(latents, slot)
    mean = latents[:, :, slot].reshape(latents.shape[0], SLOT_ELEMENTS).mean(axis=1, dtype=np.float64)
    return np.clip((mean + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


def value_is_finite(latents: np.ndarray, slot: int) -> np.ndarray:
    """Whether every value of the value slot is finite, per batch item → bool [B]."""
    _check_latents(latents, slot)
    return np.isfinite(latents[:, :, slot]).reshape(latents.shape[0], -1).all(axis=1)


def copy_slots(target: np.ndarray, source: np.ndarray, slots: Sequence[int]) -> None:
    """Overwrites `slots` of the sequences "b c t h w" `target` with those of `source` (its batch broadcast), in
    place."""
    target[:, :, list(slots)] = source[:, :, list(slots)]


def promote_future_state(latent: np.ndarray, spec: PlatformSpec) -> np.ndarray:
    """Copy of a "b c t h w" latent sequence whose current-state slots hold its predicted future state.

    The step between two levels of a planning search (`search_depth` > 1).

    The official planner then re-injects the observed current proprio into the proprio slot (it stays in the data
    batch), so the copied future-proprio latent only survives if the caller skips that injection.
    """
    if latent.ndim != 5 or latent.shape[2] != spec.num_latent_frames:
        raise InputError(
            f"latent: expected [B, C, {spec.num_latent_frames}, H, W] for {spec.name}, got shape {latent.shape}"
        )
    promoted = latent.copy()
    for future_slot, current_slot in future_to_current_slots(spec):
        promoted[:, :, current_slot] = latent[:, :, future_slot]
    return promoted


def _check_latents(latents: np.ndarray, slot: int) -> None:
    if not isinstance(latents, np.ndarray) or latents.ndim != 5 or latents.shape[1:2] + latents.shape[3:] != SLOT_SHAPE:
        got = list(latents.shape) if isinstance(latents, np.ndarray) else type(latents).__name__
        expected = f"[B, {LATENT_CHANNELS}, T, {LATENT_SIZE}, {LATENT_SIZE}]"
        raise InputError(f"latents: expected a numpy array {expected}, got {got}")
    if not 0 <= slot < latents.shape[2]:
        raise InputError(f"slot: expected an index in [0, {latents.shape[2]}), got {slot}")


BLACK = np.float32(-1.0)  # a black uint8 frame in the model range (x / 127.5 - 1, exact in bf16)


def pixel_frame_cameras(platform: PlatformSpec, num_latent_frames: int | None = None) -> list[str | None]:
    """The camera each frame of the official input clip shows (None: black), for the first `num_latent_frames` slots
    (default: all). Frame 0 is black; every later slot is 4 frames: its camera's image for current and future camera
    slots (future slots start as the current image), black for proprio, action, future proprio and value."""
    frames = platform.num_latent_frames if num_latent_frames is None else num_latent_frames
    if not 1 <= frames <= platform.num_latent_frames:
        raise InputError(f"num_latent_frames: expected 1 to {platform.num_latent_frames}, got {frames}")
    cameras: list[str | None] = [None]
    for slot in platform.slots[1:frames]:
        shown = str(slot.camera) if slot.kind in (SlotKind.CAMERA, SlotKind.FUTURE_CAMERA) else None
        cameras += [shown] * TEMPORAL_COMPRESSION
    return cameras


def black_prefix_frames(platform: PlatformSpec) -> int:
    """How many pixel frames open every clip black (the blank slot's and the proprio slot's): the same in every query,
    so a causal encoder encodes them once and each query only the camera frames after them."""
    cameras = pixel_frame_cameras(platform, platform.num_conditional_frames)
    black = next((index for index, camera in enumerate(cameras) if camera is not None), len(cameras))
    if black == len(cameras) or any(camera is None for camera in cameras[black:]):
        raise ConfigError(f"platform {platform.name}: expected black frames, then camera frames, in its prefix")
    return black


def prefix_camera_frames(platform: PlatformSpec) -> list[str]:
    """The camera of each conditioning-prefix frame after the black ones, in clip order: what a query encodes when
    the black frames are encoded once."""
    cameras = pixel_frame_cameras(platform, platform.num_conditional_frames)[black_prefix_frames(platform) :]
    return [str(camera) for camera in cameras]


def build_pixel_video(
    platform: PlatformSpec, images: Mapping[str, np.ndarray], num_latent_frames: int | None = None
) -> np.ndarray:
    """The official input clip "1 3 (1+4k) 224 224" for the first `num_latent_frames` slots (default: all), laid out
    by `pixel_frame_cameras`. `images` are the model-range "3 224 224" arrays of
    `images.preprocess_observation_images`."""
    cameras = pixel_frame_cameras(platform, num_latent_frames)
    video = np.full((1, 3, len(cameras), IMAGE_SIZE, IMAGE_SIZE), BLACK, np.float32)
    for frame, camera in enumerate(cameras):
        if camera is not None:
            video[0, :, frame] = images[camera]
    return video


def inject_proprio(
    platform: PlatformSpec, placeholder_latent: np.ndarray, normalized_proprio: np.ndarray
) -> np.ndarray:
    """The clean conditioning latent: bf16-valued VAE latents (the official `gt_frames` dtype) with the
    normalised, bf16-rounded proprio tiled over the proprio slot."""
    clean = round_to_bf16(placeholder_latent)
    write_proprio(clean, platform.proprio_slot, normalized_proprio.reshape(1, -1))
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
    normalized = read_vector(latent, platform.action_slot, shape)
    return stats.unnormalize_actions(normalized).astype(np.float32)


def read_future_proprio(platform: PlatformSpec, stats: DatasetStats, latent: np.ndarray) -> np.ndarray:
    """Un-normalised predicted proprio "b proprio_dim" float32 from the future-proprio slot."""
    normalized = read_vector(latent, platform.future_proprio_slot, (platform.proprio_dim,))
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
