"""The official image transforms as torch ops on any device, bit-identical to `runtime/policy/images.py`.

That module is the reference (numpy and Pillow, serving torch-free bundles); this one runs the same arithmetic on the
tensors of the torch backend, so on a GPU the camera frames go up once as uint8 and come back as the VAE's input:

* Pillow's 8-bit bicubic resize is integer arithmetic: 22-bit fixed-point taps (Pillow's `precompute_coeffs` and
  `normalize_coeffs_8bpc`), an accumulator starting at half a unit, a shift and a clip to 8 bits; one axis after the
  other, clipped to 8 bits in between. Done here as float64 matrix products of integers, which hold every sum
  exactly.
* The antialiased bilinear resize after the centre crop uses the reference's taps (`images.antialias_taps`) and its
  order of operations: a float32 product, then per tap a float64 add and one rounding to float32. A float32 product
  is exact in float64, so the result does not depend on whether the device fuses the multiply-add.
* The model range is the reference's 256-entry table, indexed by the pixel.

The JPEG round trip of LIBERO and RoboCasa stays Pillow's, on the host (`batch_frames` runs it there). Tables are
built once per size and device, so a warmed-up call copies only the frames to the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from cosmos_edge.runtime.platforms import IMAGE_SIZE, PlatformSpec
from cosmos_edge.runtime.policy import images as reference

PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit images
_BICUBIC_A = -0.5  # Pillow's bicubic filter parameter
_BICUBIC_SUPPORT = 2.0


def _bicubic(x: float) -> float:
    x = abs(x)
    if x < 1.0:
        return ((_BICUBIC_A + 2.0) * x - (_BICUBIC_A + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * _BICUBIC_A
    return 0.0


@lru_cache(maxsize=32)
def pillow_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices [out, k] and integer taps [out, k] of Pillow's bicubic resize of one axis (whole-image box).

    Taps past a row's support are 0 (their index is clamped into the image, so they read a real pixel).
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    size = math.ceil(support) * 2 + 1
    inverse_scale = 1.0 / filter_scale  # Pillow multiplies by the reciprocal (rounding differs from dividing)
    indices = np.zeros((out_size, size), np.int64)
    taps = np.zeros((out_size, size), np.int64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - first
        weights = [_bicubic((x + first - center + 0.5) * inverse_scale) for x in range(count)]
        total = sum(weights)  # Pillow sums in order, in double
        if total != 0.0:
            weights = [w / total for w in weights]
        # C's (int) truncates toward zero: Pillow rounds half away from zero this way.
        taps[out, :count] = [int(w * (1 << PRECISION_BITS) + (0.5 if w >= 0 else -0.5)) for w in weights]
        indices[out] = np.minimum(first + np.arange(size), in_size - 1)
    return indices, taps


# Per (kind, sizes, device): a few per frame size, about 1 MB at most each. Not cleared when a model closes, and
# evicted past 64: a CUDA graph captured from these tables holds its own references (`device_tables`).
@lru_cache(maxsize=64)
def _device_table(kind: str, in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    if kind == "bicubic":  # the taps as a dense [in, out] matrix: a row's taps on a clamped index add up
        indices, taps = pillow_bicubic_taps(in_size, out_size)
        matrix = np.zeros((in_size, out_size), np.float64)
        np.add.at(matrix, (indices, np.arange(out_size)[:, None]), taps)
        return (torch.from_numpy(matrix).to(device),)
    first, weights = reference.antialias_taps(in_size, out_size)
    indices = np.minimum(first[:, None] + np.arange(weights.shape[1]), in_size - 1)
    return torch.from_numpy(indices).to(device), torch.from_numpy(weights.astype(np.float64)).to(device)


@lru_cache(maxsize=8)
def _model_range_table(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(reference.MODEL_RANGE_TABLE)).to(device)


def _bicubic_last_axis(planes: torch.Tensor, out_size: int) -> torch.Tensor:
    """One Pillow pass over the last axis of float64 planes holding 8-bit values; float64 out, clipped to 8 bits as
    Pillow clips between its passes. One float64 matrix product with the integer taps: every product and partial sum
    is an integer below 2**53 (8-bit values times 22-bit taps, a few dozen taps), so it is exact in any order, and
    the shift is an exact division by 2**22 and a floor (an arithmetic shift floors too). No [..., out, taps] gather
    is made (hundreds of MB at 480x640, which a CUDA graph would keep reserved)."""
    (matrix,) = _device_table("bicubic", planes.shape[-1], out_size, planes.device)
    total = planes @ matrix + float(1 << (PRECISION_BITS - 1))
    return torch.clamp(torch.floor(total / float(1 << PRECISION_BITS)), 0, 255)


def bicubic_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] → uint8 [N, size, size, 3], as Pillow's `Image.resize((size, size), BICUBIC)`."""
    planes = frames.permute(0, 3, 1, 2).to(torch.float64)  # [N, 3, H, W]; 8-bit values between the passes
    height, width = planes.shape[-2:]
    # Pillow (< 13, as the official lock's 12.0.0) skips an axis already at its size and resizes horizontally first,
    # whatever the shape (Pillow 13 goes vertically first for frames narrower than the target yet taller).
    if width != size:
        planes = _bicubic_last_axis(planes, size)
    if height != size:
        planes = _bicubic_last_axis(planes.transpose(-1, -2), size).transpose(-1, -2)
    return planes.to(torch.uint8).permute(0, 2, 3, 1)


def _antialias_last_axis(values: torch.Tensor, out_size: int) -> torch.Tensor:
    """The reference's accumulation over float32 `values`: every tap's product at once in float64, where a float32
    product is exact (so the first tap rounded to float32 is the float32 product), then per tap one float64 add
    rounded to float32."""
    indices, weights = _device_table("antialias", values.shape[-1], out_size, values.device)
    products = values.double()[..., indices] * weights  # [..., out, taps]
    out = products[..., 0].float()
    for tap in range(1, indices.shape[1]):
        out = (out.double() + products[..., tap]).float()
    return out


def center_crop_and_resize(frames: torch.Tensor, area_fraction: float = reference.CROP_AREA_FRACTION) -> torch.Tensor:
    """uint8 [N, S, S, 3] → uint8 [N, S, S, 3]: `images.center_crop_and_resize` (crop, antialiased bilinear back)."""
    _, height, width, _ = frames.shape
    top, left, side = reference.crop_box(height, width, area_fraction)
    planes = frames[:, top : top + side, left : left + side].permute(0, 3, 1, 2).float()
    widened = _antialias_last_axis(planes, width)
    resized = _antialias_last_axis(widened.transpose(-1, -2), height).transpose(-1, -2)
    return torch.round(resized).to(torch.uint8).permute(0, 2, 3, 1)


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float32 [N, 3, H, W], the exact bfloat16 values of the official VAE input."""
    return _model_range_table(frames.device)[frames.permute(0, 3, 1, 2).long()]


@dataclass(frozen=True)
class FrameBatches:
    """Camera frames made ready on the host (flip and JPEG round trip where the platform has them) and stacked by
    size: what goes up to the device. `order`: each frame's (batch, row), in the order the frames were given."""

    batches: tuple[np.ndarray, ...]
    order: tuple[tuple[int, int], ...]

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(batch.shape for batch in self.batches)


def batch_frames(platform: PlatformSpec, frames: Sequence[np.ndarray]) -> FrameBatches:
    """Checked raw uint8 [H, W, 3] camera frames → `FrameBatches`."""
    prepared = [reference.flip_and_compress(platform, frame) for frame in frames]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, frame in enumerate(prepared):
        groups.setdefault(frame.shape, []).append(index)
    position = {index: (batch, row) for batch, group in enumerate(groups.values()) for row, index in enumerate(group)}
    batches = tuple(np.stack([prepared[index] for index in group]) for group in groups.values())
    return FrameBatches(batches, tuple(position[index] for index in range(len(prepared))))


def transform_batches(
    platform: PlatformSpec, batches: Sequence[torch.Tensor], order: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """The device half of `transform_frames`: uint8 batches of `FrameBatches` on the device → float32
    [N, 3, 224, 224] in `order`. Launches the same kernels whatever the pixels (a CUDA graph can hold it)."""
    planes = [_transform_batch(platform, batch) for batch in batches]
    if len(planes) == 1:  # one size: its frames are batched in the given order
        return planes[0]
    return torch.stack([planes[batch][row] for batch, row in order])


def device_tables(platform: PlatformSpec, shape: Sequence[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Every table `transform_batches` reads on `device` for a uint8 batch of `shape` [N, H, W, 3]. A CUDA graph of the
    transforms reads them at fixed addresses, so it must hold them: the cache may drop them while the graph lives."""
    _, height, width, _ = shape
    keys = [("bicubic", side, IMAGE_SIZE) for side in sorted({height, width}) if side != IMAGE_SIZE]
    if platform.center_crop:
        keys.append(("antialias", reference.crop_box(IMAGE_SIZE, IMAGE_SIZE)[2], IMAGE_SIZE))
    return (*(table for key in keys for table in _device_table(*key, device)), _model_range_table(device))


def transform_frames(platform: PlatformSpec, frames: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Checked raw uint8 [H, W, 3] camera frames → float32 [N, 3, 224, 224] on `device`, each as
    `images.to_model_range(images.transform_image(...))`. Frames of one size go up in one copy and are transformed
    as one batch (the launches of one camera, not of three)."""
    prepared = batch_frames(platform, frames)
    uploaded = [torch.from_numpy(batch).to(device) for batch in prepared.batches]
    return transform_batches(platform, uploaded, prepared.order)


def _transform_batch(platform: PlatformSpec, batch: torch.Tensor) -> torch.Tensor:
    resized = bicubic_resize(batch, IMAGE_SIZE)
    return to_model_range(center_crop_and_resize(resized) if platform.center_crop else resized)
