import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.platforms import PLATFORMS, platform_spec
from cosmos_edge.runtime.policy.latents import (
    SLOT_ELEMENTS,
    read_value,
    read_vector,
    write_proprio,
    write_vector,
)

platforms = st.sampled_from(sorted(PLATFORMS))
seeds = st.integers(0, 2**32 - 1)
batches = st.integers(1, 3)


def _latents(name: str, batch: int, seed: int) -> np.ndarray:
    frames = platform_spec(name).num_latent_frames
    return np.random.default_rng(seed).standard_normal((batch, 16, frames, 28, 28)).astype(np.float32)


def _official_tiling(latents: np.ndarray, slot: int, vectors: np.ndarray) -> np.ndarray:
    """`replace_latent_with_action_chunk` restated in torch: flatten, `repeat`, truncate, reshape C-major."""
    x0 = torch.from_numpy(latents.copy())
    flat = torch.from_numpy(vectors).reshape(x0.shape[0], -1)
    repeats = (SLOT_ELEMENTS + flat.shape[1] - 1) // flat.shape[1]
    x0[:, :, slot] = flat.repeat(1, repeats)[:, :SLOT_ELEMENTS].reshape(x0.shape[0], 16, 28, 28)
    return x0.numpy()


@settings(max_examples=30, deadline=None)
@given(name=platforms, batch=batches, seed=seeds)
def test_actions_round_trip_and_layout(name: str, batch: int, seed: int) -> None:
    platform = platform_spec(name)
    latents = _latents(name, batch, seed)
    actions = np.random.default_rng(seed).uniform(-1, 1, (batch, platform.chunk_size, platform.action_dim))
    actions = actions.astype(np.float32)
    expected_latents = _official_tiling(latents, platform.action_slot, actions)
    write_vector(latents, platform.action_slot, actions)
    np.testing.assert_array_equal(latents, expected_latents)
    out = read_vector(latents, platform.action_slot, (platform.chunk_size, platform.action_dim))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, actions)


@settings(max_examples=30, deadline=None)
@given(name=platforms, batch=batches, seed=seeds)
def test_proprio_is_rounded_to_bf16_then_round_trips(name: str, batch: int, seed: int) -> None:
    platform = platform_spec(name)
    latents = _latents(name, batch, seed)
    proprio = np.random.default_rng(seed).uniform(-1, 1, (batch, platform.proprio_dim))  # float64, like official
    write_proprio(latents, platform.proprio_slot, proprio)
    official = torch.from_numpy(proprio).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(latents[:, 0, platform.proprio_slot, 0, : platform.proprio_dim], official)
    np.testing.assert_array_equal(read_vector(latents, platform.proprio_slot, (platform.proprio_dim,)), official)


@settings(max_examples=30, deadline=None)
@given(
    name=platforms,
    values=st.lists(st.floats(-1.5, 1.5, width=32), min_size=1, max_size=3),
    seed=seeds,
)
def test_value_round_trip(name: str, values: list[float], seed: int) -> None:
    slot = platform_spec(name).value_slot
    latents = _latents(name, len(values), seed)
    latents[:, :, slot] = np.float32(values)[:, None, None, None]  # the official value injection
    expected = np.clip((np.float32(values).astype(np.float64) + 1) / 2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(read_value(latents, slot), expected)


def test_aloha_reads_17_copies_and_ignores_the_tail() -> None:
    platform = platform_spec("aloha")
    slot = platform.action_slot
    latents = _latents("aloha", 1, 0)
    actions = np.random.default_rng(0).uniform(-1, 1, (1, 50, 14)).astype(np.float32)
    write_vector(latents, slot, actions)
    flat = latents[:, :, slot].reshape(1, SLOT_ELEMENTS)  # a copy: the slot is strided inside the latents
    assert SLOT_ELEMENTS // 700 == 17 and SLOT_ELEMENTS - 17 * 700 == 644
    flat[:, 17 * 700 :] = 100.0
    latents[:, :, slot] = flat.reshape(1, 16, 28, 28)
    np.testing.assert_array_equal(read_vector(latents, slot, (50, 14)), actions)
    flat[:, 700:1400] += 1.7  # one copy shifted: the mean moves by 1.7 / 17
    latents[:, :, slot] = flat.reshape(1, 16, 28, 28)
    np.testing.assert_allclose(read_vector(latents, slot, (50, 14)), actions + 0.1, atol=1e-6)


def test_value_reads_the_mean_of_the_whole_slot() -> None:
    latents = np.zeros((2, 16, 9, 28, 28), np.float32)
    latents[0, :, 8] = np.linspace(-1, 1, SLOT_ELEMENTS, dtype=np.float32).reshape(16, 28, 28) + 0.5
    latents[1, :, 8] = -3.0
    np.testing.assert_allclose(read_value(latents, 8), [0.75, 0.0], atol=1e-6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: write_vector(x, 9, np.zeros((1, 3))), r"slot: expected an index in \[0, 9\), got 9"),
        (lambda x: write_vector(x, -1, np.zeros((1, 3))), r"slot: expected an index in \[0, 9\), got -1"),
        (lambda x: write_vector(x, 4, np.zeros((2, 3))), r"vectors: expected \[B=1, \.\.\.\].*got \[2, 3\]"),
        (lambda x: write_vector(x, 4, np.zeros(3)), r"vectors: expected \[B=1.*got \[3\]"),
        (lambda x: write_vector(x, 4, np.zeros((1, SLOT_ELEMENTS + 1))), r"1 to 12544 values"),
        (lambda x: read_vector(x, 4, (0, 7)), r"shape: expected 1 to 12544 values, got \(0, 7\)"),
        (lambda x: read_value(x[:, :8], 4), r"latents: expected a numpy array \[B, 16, T, 28, 28\], got \[1, 8"),
        (lambda x: read_value(x.tolist(), 4), r"latents: expected a numpy array .* got list"),
    ],
)
def test_errors(call: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        call(np.zeros((1, 16, 9, 28, 28), np.float32))
