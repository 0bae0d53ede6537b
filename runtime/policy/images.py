"""The official test-time image preprocessing, reproduced with numpy and Pillow only (no torch, no torchvision).

Official order (CP `experiments/robot/cosmos_utils.py` `prepare_images_for_model` + `apply_image_transforms`, and
the eval scripts that feed it):

1. vertical flip of the raw frame (LIBERO/RoboCasa; `np.flipud` in e.g. `libero_utils.get_libero_image`);
2. JPEG round trip at quality 95 through Pillow (`apply_jpeg_compression_np`);
3. Pillow resize to 224×224 with its default filter for RGB, bicubic (`resize_images`);
4. 90 %-area centre crop (side `int(224 * 0.9**0.5)` = 212, torchvision `center_crop` offsets) and resize back to
   224 with torchvision `F.resize(uint8 tensor, antialias=True)`. torchvision's v1 tensor path casts the uint8
   tensor to float32, runs `F.interpolate(mode="bilinear", align_corners=False, antialias=True)` on the CPU,
   then `torch.round` (half to even) and casts back to uint8 (`_functional_tensor.resize`, `_cast_squeeze_out`);
5. uint8 → model range: `video.to(bfloat16) / 127.5 - 1.0` (imaginaire `_normalize_video_databatch_inplace`),
   i.e. every pixel level maps to one bfloat16 number.

Stages: a raw frame is uint8 [H, W, 3]; `transform_image` gives the uint8 [224, 224, 3] image the official model
saw; `to_model_range` gives float32 [3, 224, 224], channel-first because the VAE takes [B, C, T, H, W].
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from PIL import Image

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.platforms import IMAGE_SIZE, PlatformSpec
from cosmos_edge.runtime.policy.api import check_camera_frame
from cosmos_edge.runtime.policy.numerics import round_to_bf16

JPEG_QUALITY = 95
CROP_AREA_FRACTION = 0.9

# `x.to(bfloat16) / 127.5 - 1.0` rounds to bf16 twice; a 256-entry table holds the exact official values.
# NOTE: these differ from float32 x/127.5 - 1 by up to 0.0039 (one bf16 step near ±1); that is on purpose.
MODEL_RANGE_TABLE = round_to_bf16(round_to_bf16(np.arange(256, dtype=np.float32) / np.float32(127.5)) - 1.0)


def preprocess_observation_images(platform: PlatformSpec, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps each camera's raw uint8 [H, W, 3] frame to float32 [3, 224, 224] in [-1, 1], in `platform.cameras` order.

    Raises InputError naming missing or unexpected cameras, or a camera whose frame is not uint8 H×W×3.
    """
    checked = check_cameras(platform, images)
    return {name: to_model_range(transform_image(platform, name, frame)) for name, frame in checked.items()}


def check_cameras(platform: PlatformSpec, images: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The platform's camera frames in slot order, each a uint8 [H, W, 3] array; InputError names what is wrong."""
    missing = [name for name in platform.cameras if name not in images]
    extra = sorted(name for name in images if name not in platform.cameras)
    if missing or extra:
        raise InputError(
            f"images: {platform.name} expects cameras {list(platform.cameras)}; missing {missing}, unexpected {extra}",
            field="images",
        )
    return {name: check_camera_frame(name, images[name]) for name in platform.cameras}


def transform_image(platform: PlatformSpec, camera: str, frame: np.ndarray) -> np.ndarray:
    """Raw uint8 [H, W, 3] → the uint8 [224, 224, 3] image the official pipeline gives the model."""
    image = resize_bicubic(flip_and_compress(platform, check_camera_frame(camera, frame)), IMAGE_SIZE)
    if platform.center_crop:
        image = center_crop_and_resize(image)
    return image


def flip_and_compress(platform: PlatformSpec, image: np.ndarray) -> np.ndarray:
    """The first steps of `transform_image`: the vertical flip and the JPEG round trip, where the platform has them
    (on the host whatever the backend: the JPEG codec is Pillow's)."""
    if platform.flip_images:
        image = image[::-1]
    return jpeg_round_trip(image) if platform.jpeg_compression else image


def jpeg_round_trip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Encodes and decodes with Pillow's JPEG codec at `quality`, as the official data and eval pipelines do."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def resize_bicubic(image: np.ndarray, size: int) -> np.ndarray:
    """Pillow bicubic resize to size×size (Pillow returns an unchanged copy when the size already matches)."""
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized)


def center_crop_and_resize(image: np.ndarray, area_fraction: float = CROP_AREA_FRACTION) -> np.ndarray:
    """Crops the centred square of `area_fraction` of the area and resizes it back, like the official test-time aug.

    uint8 [S, S, 3] → uint8 [S, S, 3]. The crop side and offsets use the official expressions
    (`int(S * 0.9**0.5)`, torchvision's `int(round((S - side) / 2))`, Python's round-half-to-even).
    """
    height, width = image.shape[:2]
    top, left, side = crop_box(height, width, area_fraction)
    crop = image[top : top + side, left : left + side]
    planes = np.moveaxis(crop, -1, 0).astype(np.float32)  # [3, side, side]
    resized = resize_bilinear_antialias(planes, height, width)
    # Bilinear weights are non-negative and sum to 1, so the rounded values stay within [0, 255].
    return np.moveaxis(np.round(resized), 0, -1).astype(np.uint8)


def crop_box(height: int, width: int, area_fraction: float = CROP_AREA_FRACTION) -> tuple[int, int, int]:
    """(top, left, side) of the centred square crop of `center_crop_and_resize`, by the official expressions."""
    side = int(height * area_fraction**0.5)
    return round((height - side) / 2.0), round((width - side) / 2.0), side


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] → float32 [3, H, W] holding the exact bfloat16 values the official VAE input has."""
    return MODEL_RANGE_TABLE[np.moveaxis(image, -1, 0)]


def resize_bilinear_antialias(planes: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """float32 [..., H, W] → float32 [..., out_height, out_width], like torch's CPU
    `F.interpolate(mode="bilinear", align_corners=False, antialias=True)`.

    Separable, width first then height, as torch does. Bit-identical to torch 2.x on x86 for upsampling and for
    downsampling by up to ~1.5× (at most three taps); with more taps torch's compiled accumulation order differs
    and results agree to about one float32 ulp.
    """
    widened = _resample_last_axis(planes.astype(np.float32, copy=False), out_width)
    return np.swapaxes(_resample_last_axis(np.swapaxes(widened, -1, -2), out_height), -1, -2)


def _resample_last_axis(values: np.ndarray, out_size: int) -> np.ndarray:
    first, weights = antialias_taps(values.shape[-1], out_size)
    # torch accumulates `out = x0*w0; out += x_j*w_j` in float32 and its compiler fuses each += into an FMA.
    # A float32 product is exact in float64, so a float64 add followed by one rounding to float32 is that FMA.
    out = values[..., first] * weights[:, 0]
    for tap in range(1, weights.shape[1]):
        index = np.minimum(first + tap, values.shape[-1] - 1)  # taps past a row's support weigh exactly 0
        out = (out.astype(np.float64) + values[..., index].astype(np.float64) * weights[:, tap]).astype(np.float32)
    return out


@lru_cache(maxsize=16)
def antialias_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First input index [out] and normalised float32 weights [out, taps] (zero past each row's support).

    Mirrors torch's `_compute_weights_aa` for the triangle filter, including where it rounds to float32.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1.0 else f32(1.0)
    inv_scale = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
    max_taps = math.ceil(float(support)) * 2 + 1
    first = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, max_taps), dtype=np.float32)
    for i in range(out_size):
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(f32(center - support)) + 0.5), 0)
        hi = min(int(float(f32(center + support)) + 0.5), in_size)
        taps = []
        for j in range(min(hi - lo, max_taps)):
            distance = abs(f32((float(f32(f32(lo + j) - center)) + 0.5) * float(inv_scale)))
            taps.append(f32(1.0) - distance if distance < 1.0 else f32(0.0))
        total = f32(0.0)
        for tap in taps:
            total = f32(total + tap)
        first[i] = lo
        weights[i, : len(taps)] = [f32(tap / total) for tap in taps] if total != 0.0 else taps
    first.setflags(write=False)
    weights.setflags(write=False)
    return first, weights
