"""The reference policy end to end at `tiny`: outputs, determinism, the step rule, prefix encoding, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cosmos_edge.kernels.image_transforms import batch_frames
from cosmos_edge.runtime.engines.torch_networks import TorchAutoencoder
from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.models.dtypes import TORCH_DTYPES
from cosmos_edge.runtime.models.vae_checkpoint import load_wan_vae
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy import steps
from cosmos_edge.runtime.policy.api import ActionQuery, Observation, StageTimer
from cosmos_edge.runtime.policy.images import preprocess_observation_images
from cosmos_edge.runtime.policy.latents import build_pixel_video
from cosmos_edge.runtime.policy.reactive import ReactivePolicy
from tests.helpers.observations import random_observation
from tests.helpers.policies import reference_policy

PLATFORMS = ("libero", "robocasa", "aloha")


@pytest.fixture(scope="module")
def policies(tiny_assets: dict[str, CheckpointFiles]) -> dict[str, ReactivePolicy]:
    return {name: reference_policy(files) for name, files in tiny_assets.items()}


def query(policy: ReactivePolicy, **overrides: object) -> ActionQuery:
    base = ActionQuery(random_observation(policy.platform), policy.instructions[0], seed=195, steps=3)
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize("name", PLATFORMS)
def test_full_query_outputs(policies: dict[str, ReactivePolicy], name: str) -> None:
    policy = policies[name]
    spec = platform_spec(name)
    result = policy.infer(query(policy, return_future_images=True))
    assert result.actions.shape == (spec.chunk_size, spec.action_dim)
    assert result.actions.dtype == np.float32 and np.isfinite(result.actions).all()
    assert 0.0 <= result.value <= 1.0
    assert result.future_proprio.shape == (spec.proprio_dim,)
    assert result.future_images is not None
    assert set(result.future_images) == set(spec.cameras)
    assert all(image.shape == (224, 224, 3) and image.dtype == np.uint8 for image in result.future_images.values())
    assert {"preprocess", "vae_encode", "dit", "readout", "vae_decode"} <= set(result.timings_ms)


def test_same_seed_same_chunk_other_seed_other_chunk(policies: dict[str, ReactivePolicy]) -> None:
    policy = policies["aloha"]
    first = policy.infer(query(policy))
    again = policy.infer(query(policy))
    other = policy.infer(query(policy, seed=196))
    np.testing.assert_array_equal(first.actions, again.actions)
    assert first.value == again.value
    assert np.abs(first.actions - other.actions).max() > 1e-4


def test_one_and_two_steps_are_the_same_single_call(policies: dict[str, ReactivePolicy]) -> None:
    policy = policies["libero"]
    one = policy.infer(query(policy, steps=1))
    two = policy.infer(query(policy, steps=2))
    three = policy.infer(query(policy, steps=3))
    np.testing.assert_array_equal(one.actions, two.actions)
    assert np.abs(one.actions - three.actions).max() > 1e-4


@pytest.mark.parametrize("name", ["libero", "aloha"])
def test_prefix_encode_gives_the_conditioning_latents_of_the_full_encode(
    tiny_assets: dict[str, CheckpointFiles], name: str
) -> None:
    spec = platform_spec(name)
    images = preprocess_observation_images(spec, random_observation(spec).images)
    vae = TorchAutoencoder(load_wan_vae(tiny_assets[name].tokenizer), torch.device("cpu"), spec)
    full = vae.encode(build_pixel_video(spec, images))
    prefix_video = build_pixel_video(spec, images, spec.num_conditional_frames)
    assert prefix_video.shape[2] == {"libero": 13, "aloha": 17}[name]  # 1 + 4 x (conditioning slots - 1)
    prefix = vae.encode(prefix_video)
    # Same computation on a shorter clip: only float summation order may differ.
    np.testing.assert_allclose(prefix, full[:, :, : spec.num_conditional_frames], rtol=0, atol=1e-5)


def test_prefix_policy_matches_the_reference_policy(tiny_assets: dict[str, CheckpointFiles]) -> None:
    files = tiny_assets["aloha"]
    reference = reference_policy(files)
    prefix = reference_policy(files, encode_full_sequence=False)
    expected, got = reference.infer(query(reference)), prefix.infer(query(prefix))
    np.testing.assert_allclose(got.actions, expected.actions, rtol=0, atol=1e-5)
    assert got.value == pytest.approx(expected.value, abs=1e-6)


def bad_observations(name: str) -> list[tuple[str, Observation]]:
    spec = platform_spec(name)
    good = random_observation(spec)
    first = spec.cameras[0]
    images = dict(good.images)
    return [
        ("missing", Observation({k: v for k, v in images.items() if k != first}, good.proprio)),
        ("unexpected", Observation({**images, "cam_extra": images[first]}, good.proprio)),
        (first, Observation({**images, first: images[first].astype(np.float32)}, good.proprio)),
        (first, Observation({**images, first: images[first][..., :2]}, good.proprio)),
        ("proprio", Observation(images, np.full(spec.proprio_dim, np.nan, np.float32))),
        (r"proprio: expected shape \(14,\), got \(13,\)", Observation(images, good.proprio[:-1])),
        (r"proprio: expected shape \(14,\), got \(2, 14\)", Observation(images, np.stack([good.proprio] * 2))),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_observation_names_the_field(policies: dict[str, ReactivePolicy], case: int) -> None:
    policy = policies["aloha"]
    field, observation = bad_observations("aloha")[case]
    with pytest.raises(InputError, match=field):
        policy.infer(query(policy, observation=observation))


def test_unknown_instruction_names_the_closest(policies: dict[str, ReactivePolicy]) -> None:
    policy = policies["aloha"]
    with pytest.raises(InputError, match="fold the t-shirt"):
        policy.infer(query(policy, instruction="fold the t shirt"))


def test_proprio_outside_the_trained_range_is_served_and_said_once_per_dimension(
    policies: dict[str, ReactivePolicy], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(steps, "_proprio_warned", set())
    policy = policies["aloha"]
    stats = policy.model.stats
    observation = random_observation(policy.platform)
    span = stats.proprio_max[3] - stats.proprio_min[3]
    outside = (stats.proprio_max[3] + 5 * span, stats.proprio_min[3] - 9 * span, stats.proprio_min[3] + span / 2)
    with caplog.at_level("WARNING", logger=steps.__name__):
        for value in outside:  # two values outside (the second not said again) and one inside
            proprio = observation.proprio.copy()
            proprio[3] = value
            result = policy.infer(query(policy, observation=Observation(observation.images, proprio)))
            assert np.isfinite(result.actions).all()
    assert [record.getMessage().split(" = ")[0] for record in caplog.records] == ["proprio[3]"]
    assert "outside [" in caplog.records[0].getMessage() and "units" in caplog.records[0].getMessage()


def test_stats_with_wrong_dims_are_refused(tiny_assets: dict[str, CheckpointFiles]) -> None:
    files = dataclasses.replace(tiny_assets["aloha"], stats=tiny_assets["libero"].stats)
    with pytest.raises(ConfigError, match="aloha"):
        reference_policy(files)


def test_numpy_memory_stays_flat_across_queries(policies: dict[str, ReactivePolicy]) -> None:
    """No per-query growth of Python and numpy allocations (what tracemalloc sees: the query pipeline's latents,
    masks and caches; torch's own allocator is not covered). The seed stays fixed, as a robot's does: the noise of
    each new seed is kept in a cache bounded at 64 seeds."""
    import gc
    import tracemalloc

    policy = policies["libero"]
    policy.infer(query(policy))  # warm-up: text binding, RoPE tables
    tracemalloc.start()
    try:
        levels = []
        for frame_seed in range(4):
            policy.infer(query(policy, observation=random_observation(policy.platform, seed=frame_seed)))
            gc.collect()
            levels.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert max(levels) - min(levels) < 256 * 1024, levels


@pytest.mark.parametrize(("precision", "tolerance"), [("bf16", 0.0), ("fp32", 1e-5)])
@pytest.mark.parametrize("name", PLATFORMS)
def test_the_torch_conditioning_encoder_matches_the_reference_one(
    tiny_assets: dict[str, CheckpointFiles], name: str, precision: str, tolerance: float
) -> None:
    """Image transforms as torch ops and the black frames encoded once, against numpy/Pillow and one whole encode."""
    spec = platform_spec(name)
    vae = load_wan_vae(tiny_assets[name].tokenizer, TORCH_DTYPES[precision])
    autoencoder = TorchAutoencoder(vae, torch.device("cpu"), spec)
    images = random_observation(spec, seed=4).images
    fast = autoencoder.encode_conditioning(images, StageTimer())
    # The reference: numpy/Pillow transforms, the prefix's pixel video, one encode of all its frames.
    prefix_video = build_pixel_video(spec, preprocess_observation_images(spec, images), spec.num_conditional_frames)
    reference = autoencoder.encode(prefix_video)
    assert fast.shape == (1, 16, spec.num_conditional_frames, 28, 28)
    np.testing.assert_allclose(fast, reference, rtol=0, atol=tolerance)
    # The device branch (CUDA's default: frames uploaded as uint8, transformed by torch ops), run here on the CPU.
    prepared = batch_frames(spec, [images[camera] for camera in spec.cameras])
    with torch.inference_mode():
        uploaded = [torch.from_numpy(batch) for batch in prepared.batches]
        on_device = autoencoder._encode_frames(prepared.order, *uploaded).cpu().numpy()
    np.testing.assert_allclose(on_device, reference, rtol=0, atol=tolerance)
