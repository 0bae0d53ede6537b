"""Image preprocessing parity with the official torch/torchvision pipeline.

torchvision is not a dependency, so `_official_crop_resize` restates what torchvision's v1 tensor path does for
`F.center_crop` + `F.resize(uint8, antialias=True)` with plain torch (cast to float32, `F.interpolate` bilinear
antialias, `torch.round`, cast back), and `_official_pipeline` restates CP `prepare_images_for_model`.
"""

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.platforms import PLATFORMS, platform_spec
from cosmos_edge.runtime.policy.images import (
    center_crop_and_resize,
    preprocess_observation_images,
    resize_bilinear_antialias,
    to_model_range,
    transform_image,
)

# (flip, jpeg) per platform, from the official eval commands (LIBERO.md, ROBOCASA.md, aloha/deploy.py).
OFFICIAL_FLAGS = {"libero": (True, True), "robocasa": (True, True), "aloha": (False, False)}
RAW_SIZES = {"libero": (256, 256), "robocasa": (224, 224), "aloha": (256, 256)}


def _random_frame(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    # Smooth structure plus noise, so JPEG and the resamplers see realistic and adversarial content.
    y, x = np.mgrid[0:height, 0:width]
    smooth = 127.5 + 100 * np.sin(x[..., None] / 9.0 + np.arange(3)) * np.cos(y[..., None] / 13.0)
    return np.clip(smooth + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def _official_crop_resize(image: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    crop = int(size * 0.9**0.5)
    top = round((size - crop) / 2.0)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[:, top : top + crop, top : top + crop]
    resized = F.interpolate(
        tensor[None].to(torch.float32), size=[size, size], mode="bilinear", align_corners=False, antialias=True
    )
    return torch.round(resized)[0].to(torch.uint8).permute(1, 2, 0).numpy()


def _official_pipeline(frame: np.ndarray, flip: bool, jpeg: bool) -> np.ndarray:
    if flip:
        frame = np.flipud(frame)
    if jpeg:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buffer, format="JPEG", quality=95)
        frame = np.array(Image.open(buffer))
    if frame.shape[:2] != (224, 224):
        frame = np.array(Image.fromarray(frame).resize((224, 224)))
    image = _official_crop_resize(frame)
    return (torch.from_numpy(image).permute(2, 0, 1).to(torch.bfloat16) / 127.5 - 1.0).float().numpy()


@pytest.mark.parametrize(
    ("in_size", "out_size"),
    [((212, 212), (224, 224)), ((224, 224), (212, 212)), ((256, 256), (224, 224)), ((10, 17), (31, 29))],
)
def test_antialias_bilinear_is_bit_identical_to_torch(in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
    planes = np.random.default_rng(0).integers(0, 256, (3, *in_size)).astype(np.float32)
    expected = F.interpolate(
        torch.from_numpy(planes)[None], size=out_size, mode="bilinear", align_corners=False, antialias=True
    )[0].numpy()
    np.testing.assert_array_equal(resize_bilinear_antialias(planes, *out_size), expected)


def test_antialias_bilinear_strong_downsampling_within_three_ulp() -> None:
    # No platform's pipeline resizes this way (their antialiased resize maps a central crop back to its frame's size,
    # bit-identical above); the function stays within 3 ULP of torch's kernel (measured: 3, on 24 % of the pixels).
    planes = np.random.default_rng(1).integers(0, 256, (3, 480, 640)).astype(np.float32)
    expected = F.interpolate(
        torch.from_numpy(planes)[None], size=(256, 256), mode="bilinear", align_corners=False, antialias=True
    )[0].numpy()
    ulp = np.spacing(np.abs(expected))
    assert (np.abs(resize_bilinear_antialias(planes, 256, 256) - expected) <= 3 * ulp).all()


@pytest.mark.parametrize("seed", range(3))
def test_center_crop_and_resize_matches_torchvision_path(seed: int) -> None:
    image = _random_frame(np.random.default_rng(seed), 224, 224)
    np.testing.assert_array_equal(center_crop_and_resize(image), _official_crop_resize(image))


def test_center_crop_keeps_the_central_212_pixels() -> None:
    # A 6-pixel frame (offset (224 - 212) / 2 = 6) is cut away entirely; a 7-pixel one is not.
    six = np.zeros((224, 224, 3), np.uint8)
    six[:6], six[-6:], six[:, :6], six[:, -6:] = 255, 255, 255, 255
    assert center_crop_and_resize(six).max() == 0
    seven = six.copy()
    seven[6], seven[:, 6] = 255, 255
    assert center_crop_and_resize(seven).max() > 0


@pytest.mark.parametrize("name", sorted(PLATFORMS))
def test_pipeline_matches_official_per_platform(name: str) -> None:
    platform = platform_spec(name)
    assert (platform.flip_images, platform.jpeg_compression) == OFFICIAL_FLAGS[name]
    rng = np.random.default_rng(7)
    frames = {camera: _random_frame(rng, *RAW_SIZES[name]) for camera in platform.cameras}
    out = preprocess_observation_images(platform, frames)
    assert list(out) == list(platform.cameras)
    for camera, frame in frames.items():
        assert out[camera].shape == (3, 224, 224) and out[camera].dtype == np.float32
        np.testing.assert_array_equal(out[camera], _official_pipeline(frame, *OFFICIAL_FLAGS[name]))


def test_flip_and_jpeg_switches() -> None:
    frame = _random_frame(np.random.default_rng(3), 256, 256)
    plain = dataclasses.replace(platform_spec("libero"), flip_images=False, jpeg_compression=False)
    flipped = dataclasses.replace(plain, flip_images=True)
    jpeg = dataclasses.replace(plain, jpeg_compression=True)
    np.testing.assert_array_equal(
        transform_image(flipped, "wrist", frame), transform_image(plain, "wrist", frame[::-1])
    )
    assert not np.array_equal(transform_image(jpeg, "wrist", frame), transform_image(plain, "wrist", frame))
    no_crop = dataclasses.replace(plain, center_crop=False)
    np.testing.assert_array_equal(
        transform_image(no_crop, "wrist", frame), np.array(Image.fromarray(frame).resize((224, 224)))
    )


def test_model_range_is_the_official_bf16_arithmetic() -> None:
    levels = np.arange(256, dtype=np.uint8)
    expected = (torch.from_numpy(levels).to(torch.bfloat16) / 127.5 - 1.0).float().numpy()
    image = np.stack([levels, levels[::-1], levels], axis=-1)[None]  # [1, 256, 3]
    out = to_model_range(image)
    assert out.shape == (3, 1, 256) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], expected)
    np.testing.assert_array_equal(out[1, 0], expected[::-1])
    assert out.min() == -1.0 and out.max() == 1.0


def test_missing_and_extra_cameras_are_named() -> None:
    platform = platform_spec("aloha")
    frame = np.zeros((256, 256, 3), np.uint8)
    with pytest.raises(InputError, match=r"missing \['cam_right_wrist'\], unexpected \['cam_top'\]"):
        preprocess_observation_images(platform, {"cam_left_wrist": frame, "cam_high": frame, "cam_top": frame})


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((224, 224, 3), np.float32), "dtype uint8, got float32"),
        (np.zeros((224, 224), np.uint8), r"shape \[H, W, 3\].*got \[224, 224\]"),
        (np.zeros((224, 224, 4), np.uint8), r"got \[224, 224, 4\]"),
        (np.zeros((0, 224, 3), np.uint8), r"got \[0, 224, 3\]"),
        ([[0, 0, 0]], "got list"),
    ],
)
def test_bad_frames_are_rejected_naming_the_camera(frame: object, message: str) -> None:
    frames = {"wrist": np.zeros((224, 224, 3), np.uint8), "primary": frame}
    with pytest.raises(InputError, match=rf"images\['primary'\].*{message}"):
        preprocess_observation_images(platform_spec("libero"), frames)
