"""The torch image transforms give the bits of the numpy/Pillow reference on every size the platforms see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosmos_edge.kernels import image_transforms as kernels
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy import images as reference

# Camera sizes of the platforms (LIBERO/RoboCasa renders, ALOHA's 480×640 and its 256 wire size), the model size,
# odd and upsampling sizes, and both orders of Pillow's two passes (vertical first for 300×200 and 600×220).
SIZES = [(224, 224), (256, 256), (480, 640), (128, 128), (240, 320), (300, 200), (97, 131), (600, 220), (224, 100)]
SIZES += [(1080, 1920), (7, 3000), (1, 1)]  # many taps per output pixel; a clamped border; a single pixel


def frames(height: int, width: int) -> list[np.ndarray]:
    """Noise, a smooth gradient and saturated blocks (rounding ties and the 8-bit clip)."""
    rng = np.random.default_rng(height * 1000 + width)
    rows, cols = np.mgrid[0:height, 0:width]
    gradient = (np.stack([cols, rows, cols + rows], -1) * 255 // (height + width)).astype(np.uint8)
    blocks = (rng.integers(0, 2, (height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    blocks = blocks.repeat(8, 0).repeat(8, 1)[:height, :width]
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8), gradient, np.ascontiguousarray(blocks)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_bicubic_resize_is_pillows(height: int, width: int) -> None:
    for frame in frames(height, width):
        got = kernels.bicubic_resize(torch.from_numpy(frame)[None], 224)[0].numpy()
        np.testing.assert_array_equal(got, reference.resize_bicubic(frame, 224))


@pytest.mark.parametrize("platform", ["libero", "robocasa", "aloha"])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_whole_transform_is_bit_identical(platform: str, height: int, width: int) -> None:
    spec = platform_spec(platform)
    batch = frames(height, width)  # one size: transformed as one batch
    got = kernels.transform_frames(spec, batch, torch.device("cpu")).numpy()
    for frame, planes in zip(batch, got, strict=True):
        expected = reference.to_model_range(reference.transform_image(spec, spec.cameras[0], frame))
        np.testing.assert_array_equal(planes, expected)


def test_frames_of_different_sizes_keep_their_order() -> None:
    spec = platform_spec("aloha")
    mixed = [frames(480, 640)[0], frames(256, 256)[1], frames(480, 640)[2], frames(224, 100)[0]]
    got = kernels.transform_frames(spec, mixed, torch.device("cpu")).numpy()
    for frame, planes in zip(mixed, got, strict=True):
        expected = reference.to_model_range(reference.transform_image(spec, spec.cameras[0], frame))
        np.testing.assert_array_equal(planes, expected)


@pytest.mark.parametrize("platform", ["libero", "aloha"])  # with and without the centre crop
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_device_tables_are_every_table_the_transforms_read(platform: str, height: int, width: int) -> None:
    spec = platform_spec(platform)
    batch = np.stack(frames(height, width)[:1])
    kernels._device_table.cache_clear()
    kernels._model_range_table.cache_clear()
    held = kernels.device_tables(spec, batch.shape, torch.device("cpu"))
    listed = kernels._device_table.cache_info().currsize
    kernels.transform_batches(spec, [torch.from_numpy(batch)], [(0, 0)])
    assert kernels._device_table.cache_info().currsize == listed  # the transforms read no table it did not list
    assert kernels._model_range_table.cache_info().currsize == 1
    again = kernels.device_tables(spec, batch.shape, torch.device("cpu"))
    assert len(again) == len(held) and all(a is b for a, b in zip(again, held, strict=True))  # the tables read


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("platform", ["libero", "aloha"])  # with and without the centre crop
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_the_same_bits_on_cuda(platform: str, height: int, width: int) -> None:
    spec = platform_spec(platform)
    batch = frames(height, width)
    got = kernels.transform_frames(spec, batch, torch.device("cuda")).cpu().numpy()
    for frame, planes in zip(batch, got, strict=True):
        expected = reference.to_model_range(reference.transform_image(spec, spec.cameras[0], frame))
        np.testing.assert_array_equal(planes, expected)
