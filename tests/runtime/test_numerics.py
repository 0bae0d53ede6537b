import numpy as np
import pytest
import torch

from cosmos_edge.runtime.policy.numerics import bf16_bits_to_float32, float32_to_bf16_bits, round_to_bf16


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 80.0, 1e30])
def test_round_to_bf16_matches_torch(scale: float) -> None:
    values = (np.random.default_rng(0).standard_normal(10_000) * scale).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_to_bf16(values), expected)


def test_bits_round_trip() -> None:
    values = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    bits = float32_to_bf16_bits(values)
    assert bits.dtype == np.uint16
    expected_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, expected_bits)
    np.testing.assert_array_equal(bf16_bits_to_float32(bits), round_to_bf16(values))


def test_round_to_bf16_keeps_scalar_shape() -> None:
    rounded = round_to_bf16(np.float32(0.987654))
    assert rounded.shape == ()
    assert rounded == torch.tensor(0.987654).to(torch.bfloat16).float().item()


def test_round_to_bf16_matches_the_wide_sum_on_every_kind_of_bit_pattern() -> None:
    # Every exponent, both signs, ties, infinities and NaNs: the 32-bit sum wraps where a 64-bit one would carry.
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64)
    bits[:4] = [0x7F800000, 0xFF800000, 0x7FFFFFFF, 0xFFFF8000]
    bits[4:8] = [0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00008000]
    wide = ((bits + ((bits >> 16) & 1) + 0x7FFF) & 0xFFFF0000).astype(np.uint32)
    values = bits.astype(np.uint32).view(np.float32)
    np.testing.assert_array_equal(round_to_bf16(values).view(np.uint32), wide)
    finite = np.isfinite(values)
    expected = torch.from_numpy(values[finite]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_to_bf16(values[finite]), expected)
